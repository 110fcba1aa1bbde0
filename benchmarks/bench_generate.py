"""Generation throughput: the Ray Data pipeline vs plain single-process loops, and top-k storage cost.

    .venv/bin/python -m benchmarks.bench_generate --model tiny --prompts 64
    .venv/bin/python -m benchmarks.bench_generate --model smollm2 --prompts 32

Three measurements, side by side in one run, on the same prompts, batch size and CPU count:
  pipeline        `dadpo_ray.generate.generate` (Ray Data, student pool 1 actor x 1 CPU, teacher pool
                  1 actor x 1 CPU): samples both answers, scores both under teacher and reference, top-k.
  generate loop   one process, torch on all CPUs: student.generate + teacher.generate per batch, nothing else
                  (what the issue calls "a plain model.generate loop").
  same-work loop  one process doing exactly the pipeline's work (both samples, each scored from its own
                  generate() logits, plus the two cross-scoring passes).
tokens/s counts sampled response tokens (chosen + rejected). The pipeline also runs on one batch first (after
a warm-up run): the difference between the two runs is its steady-state rate (its fixed start-up cost, ~7 s
here, cancels out; the loops load their models before their clock starts). Then the bytes per response token
of the top-k columns at k = 8, 20, 64, 128 (zstd Parquet), from one k=128 run truncated to each k (top-k is
sorted, so a prefix of the top-128 is the top-k).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dadpo_ray.config import load_config
from dadpo_ray.engines import HFEngine
from dadpo_ray.generate import _template, generate
from dadpo_ray.prompts import load_prompts
from dadpo_ray.records import read_rows

SHARED_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "prompts",
                              "conversational_prompts.jsonl")
MODELS = {"tiny": ("tiny-teacher", "tiny-student", "float32"), "smollm2": ("smollm2", "smollm2", "bfloat16")}


def make_config(model: str, prompts: int, out: str, k: int, max_new_tokens: int, batch_size: int):
    teacher, student, dtype = MODELS[model]
    return load_config(None, base={
        "name": "bench-generate", "run_dir": out,
        "models": {"teacher": {"path": teacher, "dtype": dtype}, "student": {"path": student, "dtype": dtype}},
        "prompts": {"source": os.path.abspath(SHARED_PROMPTS), "limit": prompts, "eval_fraction": 0.0},
        "generate": {"max_new_tokens": max_new_tokens, "topk": k, "batch_size": batch_size,
                     "rows_per_shard": 256, "max_prompt_tokens": 256,
                     "teacher_pool": {"num_cpus": 1}, "student_pool": {"num_cpus": 1}},
        "ray": {"num_cpus": 2},
    })


def _rate(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}


def run_loops(cfg) -> dict:
    """Both single-process baselines on the pipeline's prompts, with torch on every CPU."""
    torch.set_num_threads(os.cpu_count())
    gen = cfg.generate
    student, teacher = HFEngine(cfg.models.student), HFEngine(cfg.models.teacher)
    prompts, _ = load_prompts(cfg.prompts)
    rows, _ = _template(prompts, student.tokenizer, gen.max_prompt_tokens)
    batches = [[r["prompt_ids"] for r in rows[i:i + gen.batch_size]] for i in range(0, len(rows), gen.batch_size)]
    results = {}
    for name, score in (("generate_loop", False), ("same_work_loop", True)):
        tokens, started = 0, time.time()
        for i, batch in enumerate(batches):
            if score:  # the pipeline's work: each model scores its samples as it draws them, then the other's
                rejected = [ids for ids, _ in student.sample_and_score(batch, gen, i, None)[0]]
                chosen = [ids for ids, _ in teacher.sample_and_score(batch, gen, i + 1, gen.topk)[0]]
                teacher.score(batch, rejected, None)
                student.score(batch, chosen, None)
            else:
                rejected = [ids for ids, _ in student.sample(batch, gen, seed=i)]
                chosen = [ids for ids, _ in teacher.sample(batch, gen, seed=i + 1)]
            tokens += sum(map(len, rejected)) + sum(map(len, chosen))
        results[name] = _rate(tokens, time.time() - started)
    return results


def run_pipeline(cfg, out: str) -> tuple[dict, dict, pa.Table]:
    """The pipeline on one batch of prompts, then on all of them, in one Ray session warmed by a first one-batch
    run. Each run pays the same fixed cost (actor start, model loads, Ray Data scheduling), so the difference
    between the two is the steady-state rate."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = []
        batch = cfg.generate.batch_size
        for limit, name in ((batch, "warm-up"), (batch, "one-batch"), (cfg.prompts.limit, "all")):
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.prompts.limit = limit
            started = time.time()
            generate(run_cfg, os.path.join(out, name))
            wall = time.time() - started
            table = read_rows(os.path.join(out, name))
            runs.append((sum(len(x) for col in ("chosen_ids", "rejected_ids") for x in table.column(col).to_pylist()),
                         wall, table))
    finally:
        ray.shutdown()
    (one_tokens, one_wall, _), (tokens, wall, table) = runs[1:]
    return _rate(tokens, wall), _rate(tokens - one_tokens, wall - one_wall), table


def topk_bytes_per_token(table: pa.Table, ks: list[int]) -> dict:
    tokens = sum(len(x) for x in table.column("chosen_ids").to_pylist())
    ids, logprobs = table.column("chosen_topk_ids").to_pylist(), table.column("chosen_topk_logprobs").to_pylist()
    result = {}
    for k in ks:
        cut = pa.table({"chosen_topk_ids": [[row[:k] for row in resp] for resp in ids],
                        "chosen_topk_logprobs": [[row[:k] for row in resp] for resp in logprobs]},
                       schema=pa.schema([("chosen_topk_ids", pa.list_(pa.list_(pa.int32()))),
                                         ("chosen_topk_logprobs", pa.list_(pa.list_(pa.float32())))]))
        sink = pa.BufferOutputStream()
        pq.write_table(cut, sink, compression="zstd")
        result[k] = round(sink.getvalue().size / tokens, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="bench-generate-")
    try:
        cfg = make_config(args.model, args.prompts, out, 128, args.max_new_tokens, args.batch_size)
        pipeline, marginal, table = run_pipeline(cfg, out)
        loops = run_loops(cfg)
        generate_loop, same_work_loop = loops["generate_loop"]["tokens_per_s"], loops["same_work_loop"]["tokens_per_s"]
        report = {
            "model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "pipeline": pipeline, "pipeline_past_first_batch": marginal, **loops,
            "pipeline_vs_generate_loop": round(pipeline["tokens_per_s"] / generate_loop, 2),
            "pipeline_vs_same_work_loop": round(pipeline["tokens_per_s"] / same_work_loop, 2),
            "steady_pipeline_vs_generate_loop": round(marginal["tokens_per_s"] / generate_loop, 2),
            "steady_pipeline_vs_same_work_loop": round(marginal["tokens_per_s"] / same_work_loop, 2),
            "topk_bytes_per_response_token": topk_bytes_per_token(table, [8, 20, 64, 128]),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
