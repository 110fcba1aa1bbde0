"""Generation throughput: the Ray Data pipeline vs plain single-process loops, and top-k storage cost.

    .venv/bin/python -m benchmarks.bench_generate --model tiny --prompts 64
    .venv/bin/python -m benchmarks.bench_generate --model smollm2 --prompts 32

Three measurements, side by side in one run, on the same prompts, batch size and CPU count:
  pipeline        `dadpo_ray.generate.generate` (Ray Data, student pool 1 actor x 1 CPU, teacher pool
                  1 actor x 1 CPU): samples both answers, scores both under teacher and reference, top-k.
  generate loop   one process, torch on all CPUs: student.generate + teacher.generate per batch, nothing else
                  (what the issue calls "a plain model.generate loop").
  same-work loop  one process doing exactly the pipeline's work (both samples + the four scoring passes).
tokens/s counts sampled response tokens (chosen + rejected). Then the bytes per response token of the top-k
columns at k = 8, 20, 64, 128 (zstd Parquet), from one k=128 run truncated to each k (top-k is sorted, so a
prefix of the top-128 is the top-k).
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
            rejected = [ids for ids, _ in student.sample(batch, gen, seed=i)]
            chosen = [ids for ids, _ in teacher.sample(batch, gen, seed=i + 1)]
            tokens += sum(map(len, rejected)) + sum(map(len, chosen))
            if score:
                teacher.score(batch, chosen, gen.topk)
                teacher.score(batch, rejected, None)
                student.score(batch, chosen, None)
                student.score(batch, rejected, None)
        wall = time.time() - started
        results[name] = {"tokens": tokens, "seconds": round(wall, 1), "tokens_per_s": round(tokens / wall, 1)}
    return results


def run_pipeline(cfg, out: str) -> dict:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.time()
        generate(cfg, out)
        wall = time.time() - started
    finally:
        ray.shutdown()
    table = read_rows(out)
    tokens = sum(len(x) for col in ("chosen_ids", "rejected_ids") for x in table.column(col).to_pylist())
    return {"tokens": tokens, "seconds": round(wall, 1), "tokens_per_s": round(tokens / wall, 1)}, table


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
        pipeline, table = run_pipeline(cfg, os.path.join(out, "data"))
        loops = run_loops(cfg)
        report = {
            "model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "pipeline": pipeline, **loops,
            "pipeline_vs_generate_loop": round(pipeline["tokens_per_s"] / loops["generate_loop"]["tokens_per_s"], 2),
            "pipeline_vs_same_work_loop": round(pipeline["tokens_per_s"] / loops["same_work_loop"]["tokens_per_s"], 2),
            "topk_bytes_per_response_token": topk_bytes_per_token(table, [8, 20, 64, 128]),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
