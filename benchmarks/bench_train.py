"""Training speed and memory per loss preset: ddpo vs dadpo vs dadpo_tok, through the real training stage.

    .venv/bin/python benchmarks/bench_train.py                      # SmolLM2-135M, 2 workers, ZeRO-2, fp32
    .venv/bin/python benchmarks/bench_train.py --student tiny-student --steps 8   # a quick check
    .venv/bin/python benchmarks/bench_train.py --loss-path-only      # the presets' step cost, interleaved

Each preset runs `dadpo_ray.train.train` (Ray Train + DeepSpeed, the chunked log-prob path) for a few steps on a
synthetic dataset in the data contract: random token ids of fixed lengths with made-up log-probs and a top-k of
20 (speed does not depend on the token values). Reports the median step time and training tokens/s over the
steps after the first, and rank 0's peak memory (RSS on CPU). Targets (issue 4): dadpo within 1.05x of ddpo's
step time, dadpo_tok within 1.15x.

On a shared machine the wall time of whole runs, one preset after another, mostly measures the neighbours'
load. `--loss-path-only` measures what differs between presets, without Ray or DeepSpeed: forward + backward of
one micro batch through the worker's own `PolicyLogps` and `micro_batch_loss`, presets interleaved round by
round, as process CPU time (all threads); the optimizer step and gradient all-reduce are the same for every
preset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from dadpo_ray.config import ModelSpec, load_config
from dadpo_ray.models import load_tokenizer, vocab_fingerprint
from dadpo_ray.records import Manifest, ModelRecord, write_manifest, write_shard

K = 20


def write_dataset(out_dir: str, student: str, pairs: list[dict], name: str = "bench", finish: str = "length") -> None:
    """`pairs` (prompt_ids, chosen_ids, rejected_ids; optional prompt/chosen/rejected texts) as a dataset in the
    data contract, with made-up reference/teacher log-probs and top-K (speed does not depend on the values)."""
    tokenizer = load_tokenizer(ModelSpec(path=student))
    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(pairs):
        n = len(p["chosen_ids"])
        rows.append({
            "id": f"{name}{i}", "split": "train", "prompt_messages": [{"role": "user", "content": p.get("prompt", "x")}],
            "prompt_ids": p["prompt_ids"], "chosen_ids": p["chosen_ids"], "chosen_text": p.get("chosen", ""),
            "chosen_finish": finish, "rejected_ids": p["rejected_ids"], "rejected_text": p.get("rejected", ""),
            "rejected_finish": finish, "teacher_chosen_logp": -50.0, "teacher_rejected_logp": -80.0,
            "ref_chosen_logp": -70.0, "ref_rejected_logp": -60.0,
            "chosen_topk_ids": rng.integers(0, len(tokenizer), (n, K)).tolist(),
            "chosen_topk_logprobs": (-np.sort(rng.exponential(2.0, (n, K)), axis=1)).tolist(),  # descending
            "rejected_topk_ids": None, "rejected_topk_logprobs": None,
        })
    files = [write_shard(out_dir, "part-00000.parquet", rows)]
    write_manifest(out_dir, Manifest(
        config_fingerprint=name, teacher=ModelRecord(path=student), student=ModelRecord(path=student),
        reference=ModelRecord(path=student), topk=K, topk_for_rejected=False, generation={},
        rows={"train": len(rows)}, rejected_rows=0, rejected_reasons={}, files=files,
        **vocab_fingerprint(tokenizer).as_dict()))


def synthetic_dataset(out_dir: str, student: str, rows: int, prompt_len: int, response_len: int) -> None:
    """`rows` pairs of random token ids of fixed lengths."""
    vocab = len(load_tokenizer(ModelSpec(path=student)))
    rng = np.random.default_rng(1)

    def ids(n):
        return rng.integers(0, vocab, n).tolist()

    write_dataset(out_dir, student, [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len),
                                      "rejected_ids": ids(response_len)} for _ in range(rows)])


def loss_path_only(student: str, rounds: int, micro: int, prompt_len: int, response_len: int, presets) -> None:
    import time

    import torch

    from dadpo_ray.config import LossConfig
    from dadpo_ray.models import load_model
    from dadpo_ray.records import read_rows
    from dadpo_ray.train_worker import PolicyLogps, loss_weights, micro_batch_loss

    work = Path(tempfile.mkdtemp(prefix="bench-loss-path-"))
    synthetic_dataset(str(work / "data"), student, micro, prompt_len, response_len)
    rows = read_rows(str(work / "data")).to_pylist()
    pad = load_tokenizer(ModelSpec(path=student)).pad_token_id
    model = load_model(ModelSpec(path=student), dtype="float32").train()
    engines = {}
    for preset in presets:
        weights = loss_weights(LossConfig(preset=preset))
        policy = PolicyLogps(model, chunk_size=256, temperature=weights.temperature)
        policy.device = torch.device("cpu")  # micro_batch_loss moves the batch to engine.device
        engines[preset] = (policy, weights)
    cpu = {p: [] for p in presets}
    for _ in range(rounds):
        for preset, (policy, weights) in engines.items():
            start = time.process_time()
            loss, _ = micro_batch_loss(policy, weights, rows, pad)
            loss.backward()
            cpu[preset].append(time.process_time() - start)
            model.zero_grad(set_to_none=True)
    base = statistics.median(cpu[presets[0]])
    print(f"student {student}, {micro} pair(s) per micro batch, prompt {prompt_len} + response {response_len} "
          f"tokens, {rounds} interleaved rounds, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| preset | forward+backward CPU s (median) | min | vs {presets[0]} (median) |")
    print("| --- | --- | --- | --- |")
    for preset, times in cpu.items():
        print(f"| {preset} | {statistics.median(times):.3f} | {min(times):.3f} | "
              f"{statistics.median(times) / base:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", default="smollm2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--presets", default="ddpo,dadpo,dadpo_tok")
    parser.add_argument("--loss-path-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.loss_path_only:
        loss_path_only(args.student, args.rounds, args.micro, args.prompt_len, args.response_len,
                       args.presets.split(","))
        return

    import ray

    from dadpo_ray.train import train

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = args.steps * args.micro * args.workers
    synthetic_dataset(str(work / "data"), args.student, rows, args.prompt_len, args.response_len)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}})
    results = {}
    for preset in args.presets.split(","):
        cfg = load_config(None, [
            f"name=bench-{preset}", f"train.loss.preset={preset}", f"train.num_workers={args.workers}",
            f"train.micro_batch_size={args.micro}", "train.grad_accum=1", "train.epochs=1",
            f"train.zero_stage={args.zero}", "train.checkpoint_every=100000", "train.lr=1e-6",
        ], base={"models": {"teacher": {"path": args.student}, "student": {"path": args.student}},
                 "prompts": {"source": "builtin:demo"}})
        result = train(cfg, str(work / "data"), str(work / preset))
        lines = [json.loads(x) for x in Path(result["metrics_file"]).read_text().splitlines()][1:]
        results[preset] = {
            "step_time_s": statistics.median(m["step_time_s"] for m in lines),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in lines),
            "peak_mem_mb_rank0": max(m["peak_mem_mb_rank0"] for m in lines),
        }
        print(preset, results[preset], flush=True)
    base = results.get("ddpo", {}).get("step_time_s")
    print(f"\nstudent {args.student}, {args.workers} workers, ZeRO-{args.zero} fp32, micro batch {args.micro} pair(s), "
          f"prompt {args.prompt_len} + response {args.response_len} tokens, {args.steps} steps (first excluded)")
    print("| preset | step time s (median) | vs ddpo | train tokens/s | peak RSS rank 0 MB |")
    print("| --- | --- | --- | --- | --- |")
    for preset, r in results.items():
        ratio = f"{r['step_time_s'] / base:.3f}x" if base else "-"
        print(f"| {preset} | {r['step_time_s']:.3f} | {ratio} | {r['tokens_per_s']:.0f} "
              f"| {r['peak_mem_mb_rank0']:.0f} |")


if __name__ == "__main__":
    main()
