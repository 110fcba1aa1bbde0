"""Training throughput: our training stage vs TRL's DPOTrainer, same model, data, precision, batch and CPUs.

    PYTHONPATH=/tmp/trl-site .venv/bin/python benchmarks/bench_trl.py          # SmolLM2-135M, 12 pairs, 6 steps each
    PYTHONPATH=/tmp/trl-site .venv/bin/python benchmarks/bench_trl.py --reverse   # the same, in reverse order
    PYTHONPATH=/tmp/trl-site .venv/bin/python benchmarks/bench_trl.py --student tiny-student --steps 3   # quick

TRL is not a dependency of dadpo-ray: install it apart, without touching the project's packages, e.g.
`.venv/bin/python -m pip install --target /tmp/trl-site trl==1.16.0 --no-deps`, and put it on PYTHONPATH.

Three runs, one after another, on one synthetic preference set built once (prompt + two responses of random
single-token words, tokenized the way TRL tokenizes text: prompt, then prompt + response + EOS):

- `ours`: `dadpo_ray.train.train` with the ddpo preset (DPO, beta 0.1), 1 Ray Train worker x 2 CPUs, ZeRO-0,
  reading the data contract with its precomputed reference log-probs (as our design always does).
- `trl_ref_model`: `DPOTrainer` (sigmoid loss, beta 0.1) with its reference model in memory.
- `trl_precomputed`: `DPOTrainer` with `precompute_ref_log_probs=True` (done in its constructor, timed apart).

All: fp32, no gradient checkpointing, AdamW (torch), lr 1e-6, the same micro batch, no accumulation, 2 torch
threads. Throughput = tokens of the step's micro batch (attention-mask sum: prompt + chosen + prompt + rejected,
as our metrics count them) / the step's wall time, median over the steps after the first; `agg` = all tokens /
all time of those steps. Ours times a step inside the worker (collate, forward, backward, optimizer step, metric
all-reduce); TRL's step time is the interval between consecutive `on_step_end` callbacks (the batch fetch and
collate, forward, backward, optimizer step, logging). Each TRL run is a subprocess of its own, so its peak RSS is
its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS = 2


def build_pairs(student: str, pairs: int, prompt_words: int, response_words: int, seed: int = 0) -> list[dict]:
    """Text pairs of random single-token words, and their token ids as TRL's `_prepare_dataset` makes them."""
    import numpy as np

    from dadpo_ray.config import ModelSpec
    from dadpo_ray.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(path=student))
    words = sorted({tok.decode([i]) for i in range(len(tok))})
    words = [w for w in words if len(w) > 2 and w[0] == " " and w[1:].isalpha() and len(tok(w)["input_ids"]) == 1]
    words = words or list("abcdefghijklmnopqrstuvwxyz")  # a byte-level tokenizer (tiny-student): letters
    rng = np.random.default_rng(seed)

    def text(n):
        return "".join(rng.choice(words, n))

    out = []
    for i in range(pairs):
        prompt, chosen, rejected = text(prompt_words), text(response_words), text(response_words)
        prompt_ids = tok(prompt)["input_ids"]
        ids = {side: tok(prompt + resp + tok.eos_token)["input_ids"] for side, resp in (("chosen", chosen),
                                                                                         ("rejected", rejected))}
        assert all(v[: len(prompt_ids)] == prompt_ids for v in ids.values())
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "prompt_ids": prompt_ids,
                    "chosen_ids": ids["chosen"][len(prompt_ids):], "rejected_ids": ids["rejected"][len(prompt_ids):]})
    return out


def summarize(tokens: list[float], times: list[float]) -> dict:
    """Steps after the first: median tokens/s, aggregate tokens/s, median step time."""
    tokens, times = tokens[1:], times[1:]
    return {"steps_timed": len(times), "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)),
            "tokens_per_s_agg": sum(tokens) / sum(times), "step_time_s": statistics.median(times),
            "tokens_per_step": statistics.median(tokens)}


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_ours(work: Path, student: str, micro: int, steps: int) -> dict:
    import ray

    from dadpo_ray.config import load_config
    from dadpo_ray.train import train

    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)}})
    cfg = load_config(None, [
        "name=bench-trl-ours", "train.loss.preset=ddpo", "train.num_workers=1", f"train.cpus_per_worker={THREADS}",
        f"train.micro_batch_size={micro}", "train.grad_accum=1", "train.epochs=1", f"train.max_steps={steps}",
        "train.zero_stage=0", "train.checkpoint_every=100000", "train.lr=1e-6", "train.warmup_ratio=0",
        "train.schedule=constant",
    ], base={"models": {"teacher": {"path": student}, "student": {"path": student}},
             "prompts": {"source": "builtin:demo"}})
    # Which dadpo_ray the workers import (a clean checkout on PYTHONPATH comes before the editable install).
    package = ray.get(ray.remote(lambda: __import__("dadpo_ray").__file__).remote())
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = train(cfg, str(work / "data"), str(work / "ours"))
    wall = time.perf_counter() - started
    ray.shutdown()
    lines = [json.loads(x) for x in Path(result["metrics_file"]).read_text().splitlines()]
    out = summarize([m["tokens_per_s"] * m["step_time_s"] for m in lines], [m["step_time_s"] for m in lines])
    return {**out, "peak_rss_mb": max(m["peak_mem_mb_rank0"] for m in lines), "run_wall_s": wall,
            "worker_package": package, "load_before": load, "load_after": os.getloadavg()[0]}


def run_trl(work: Path, student: str, micro: int, steps: int, precompute: bool) -> dict:
    """One DPOTrainer run in this process (called in a subprocess by main)."""
    import torch

    torch.set_num_threads(THREADS)
    import datasets
    import trl
    from transformers import TrainerCallback

    from dadpo_ray.config import ModelSpec
    from dadpo_ray.models import load_model, load_tokenizer

    pairs = json.loads((work / "pairs.json").read_text())
    tokenizer = load_tokenizer(ModelSpec(path=student))
    model = load_model(ModelSpec(path=student), dtype="float32")
    ref = None if precompute else load_model(ModelSpec(path=student), dtype="float32")
    data = datasets.Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    args = trl.DPOConfig(
        output_dir=str(work / f"trl-{precompute}"), per_device_train_batch_size=micro, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
        loss_type=["sigmoid"], bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        precompute_ref_log_probs=precompute, max_length=None, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=0, disable_tqdm=True)

    class Times(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *a, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            self.ends.append(time.perf_counter())

    load = os.getloadavg()[0]
    times, batch_tokens = Times(), []
    started = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[times])
    construct_s = time.perf_counter() - started
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):  # TRL trains on exactly our token ids
        assert trainer.train_dataset[name] == [p[name] for p in pairs], f"{name} differs from ours"
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        batch_tokens.append(float(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    step_times = [b - a for a, b in zip(times.ends, times.ends[1:])]
    assert len(step_times) == steps and len(batch_tokens) >= steps, (len(step_times), len(batch_tokens))
    return {**summarize(batch_tokens[:steps], step_times), "constructor_s": construct_s,
            "ref_model_in_memory": trainer.ref_model is not None, "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": peak_rss_mb(), "trl": trl.__version__,
            "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", default="smollm2")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=96)
    parser.add_argument("--reverse", action="store_true", help="run TRL precomputed, TRL ref model, then ours")
    parser.add_argument("--trl-only", choices=["ref_model", "precomputed"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_only:  # the subprocess of one TRL run: its result is the last stdout line
        result = run_trl(Path(args.work), args.student, args.micro, args.steps, args.trl_only == "precomputed")
        print(json.dumps(result), flush=True)
        return

    import torch
    from bench_train import write_dataset  # this script runs as a file: benchmarks/ is on sys.path

    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    pairs = build_pairs(args.student, args.pairs, args.prompt_len, args.response_len)
    (work / "pairs.json").write_text(json.dumps(pairs))
    write_dataset(str(work / "data"), args.student, pairs, name="trl", finish="stop")
    print(f"{len(pairs)} pairs, prompt {statistics.mean(len(p['prompt_ids']) for p in pairs):.0f} + responses "
          f"{statistics.mean(len(p['chosen_ids']) for p in pairs):.0f} tokens (mean), micro batch {args.micro}, "
          f"{args.steps} steps, work dir {work}", flush=True)
    results = {}
    runs = ["ours", "ref_model", "precomputed"]
    for mode in (runs[::-1] if args.reverse else runs):  # --reverse: a second pass, the other way round
        if mode == "ours":
            results["ours"] = run_ours(work, args.student, args.micro, args.steps)
            print("ours", json.dumps(results["ours"]), flush=True)
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_DATASETS_CACHE": str(work / "hf-datasets")}
        proc = subprocess.run([sys.executable, __file__, "--trl-only", mode, "--work", str(work), "--student",
                               args.student, "--micro", str(args.micro), "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
            raise SystemExit(f"TRL run {mode} failed (exit {proc.returncode})")
        results[f"trl_{mode}"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"trl_{mode}", json.dumps(results[f"trl_{mode}"]), flush=True)
    ours = results["ours"]["tokens_per_s"]
    summary = {
        "student": args.student, "pairs": len(pairs), "micro_batch": args.micro, "steps": args.steps,
        "threads": THREADS, "order": list(results), "results": results,
        "ours_vs_trl": {k: ours / r["tokens_per_s"] for k, r in results.items() if k != "ours"},
        "ours_vs_trl_agg": {k: results["ours"]["tokens_per_s_agg"] / r["tokens_per_s_agg"]
                            for k, r in results.items() if k != "ours"},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
