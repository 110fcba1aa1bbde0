"""Peak memory and time of the chunked LM-head log-prob path vs the naive one (all [N, V] logits at once).

    .venv/bin/python benchmarks/bench_chunked_loss.py            # vocab 49152 and 151936, seq 1024, hidden 576

Each measurement runs in a fresh process: forward + backward of per-token target log-probs and the teacher's
top-k log-probs (k = 20) from hidden states [seq, hidden] through an LM head [vocab, hidden], fp32 on CPU.
Peak memory = the process's peak RSS during the step minus its RSS just before (inputs and head already
allocated), so it counts the logits and their gradients, not the fixed weights. Time = median of 3 steps.
Targets (issue 4): chunked >= 4x lower peak, <= 1.15x the naive time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from dadpo_ray.losses import token_logps_chunked, token_logps_naive

K = 20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one(method: str, vocab: int, seq: int, hidden: int, chunk: int) -> dict:
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(seq, hidden, requires_grad=True)
    targets = torch.randint(vocab, (seq,))
    topk = torch.randint(vocab, (seq, K))
    fn = token_logps_chunked if method == "chunked" else token_logps_naive
    times = []
    before = rss_mb()
    for _ in range(3):
        start = time.perf_counter()
        target_lp, topk_lp = fn(h, head, targets, topk, chunk_size=chunk)
        (-(target_lp.sum()) - topk_lp.sum()).backward()
        times.append(time.perf_counter() - start)
        head.weight.grad = h.grad = None
    return {"method": method, "vocab": vocab, "seq": seq, "hidden": hidden, "chunk": chunk,
            "peak_extra_mb": round(peak_rss_mb() - before, 1), "time_s": round(statistics.median(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VOCAB"))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M
    parser.add_argument("--chunk", type=int, default=256)  # train.chunk_size default
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.seq, args.hidden, args.chunk)))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, seq {args.seq}, hidden {args.hidden}, "
          f"chunk {args.chunk}, k {K}")
    print("| vocab | naive peak MB | chunked peak MB | peak ratio | naive s | chunked s | time ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for vocab in (49152, 151936):
        r = {}
        for method in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--one", method, str(vocab), "--seq", str(args.seq),
                   "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
            r[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        n, c = r["naive"], r["chunked"]
        print(f"| {vocab} | {n['peak_extra_mb']} | {c['peak_extra_mb']} | "
              f"{n['peak_extra_mb'] / c['peak_extra_mb']:.1f}x | {n['time_s']} | {c['time_s']} | "
              f"{c['time_s'] / n['time_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
