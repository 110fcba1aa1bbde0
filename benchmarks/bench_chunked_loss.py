"""Peak memory and time of the chunked LM-head log-prob path vs the naive one (all [N, V] logits at once).

    .venv/bin/python -m benchmarks.bench_chunked_loss [--chunk 128] [--fallback]   # vocab 49152 and 151936, seq 1024

"chunked" is `token_logps_chunked` with an nn.Linear head: the fused autograd Function. --fallback measures its
fused=False path instead (each chunk under torch.utils.checkpoint, calling the head module: what ZeRO-3 uses).

Each measurement runs in a fresh process: forward + backward of per-token target log-probs and the teacher's
top-k log-probs (k = 20) from hidden states [seq, hidden] through an LM head [vocab, hidden], fp32 on CPU.
Peak memory = the process's peak RSS during one step minus its RSS just before, after a warm-up step and with
the inputs, the head and their gradient buffers allocated (any method needs those), so it counts what the loss
path itself holds: logits, softmax intermediates and their gradients. The peak is reset through
/proc/self/clear_refs, and glibc is told to mmap every block over 64 KiB, so freed tensors leave the RSS.
Time = median of 3 further steps, as process CPU time (all threads) and wall time: on a shared machine the CPU
time is the steadier measure of the work done.
Targets (issue 4): chunked >= 4x lower peak, <= 1.15x the naive time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from dadpo_ray.losses import token_logps_chunked, token_logps_naive

K = 20


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def one(method: str, vocab: int, seq: int, hidden: int, chunk: int) -> dict:
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(seq, hidden, requires_grad=True)
    targets = torch.randint(vocab, (seq,))
    topk = torch.randint(vocab, (seq, K))
    fn = {"naive": token_logps_naive, "chunked": token_logps_chunked,
          "checkpointed": functools.partial(token_logps_chunked, fused=False)}[method]
    head.weight.grad, h.grad = torch.zeros_like(head.weight), torch.zeros_like(h)  # backward accumulates here

    def step():
        target_lp, topk_lp = fn(h, head, targets, topk, chunk_size=chunk)
        (-(target_lp.sum()) - topk_lp.sum()).backward()

    step()  # warm-up: lazy initialisations are not part of the loss path's memory
    reset_peak_rss()
    before = status_mb("VmRSS")
    step()
    peak = status_mb("VmHWM") - before
    walls, cpus = [], []
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"method": method, "vocab": vocab, "seq": seq, "hidden": hidden, "chunk": chunk,
            "peak_extra_mb": round(peak, 1), "cpu_s": round(statistics.median(cpus), 3),
            "wall_s": round(statistics.median(walls), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VOCAB"))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M
    parser.add_argument("--chunk", type=int, default=128)  # at most seq/chunk times fewer logits
    parser.add_argument("--fallback", action="store_true", help="measure fused=False (the ZeRO-3 path)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.seq, args.hidden, args.chunk)))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, seq {args.seq}, hidden {args.hidden}, "
          f"chunk {args.chunk}, k {K}, chunked path: {'checkpointed (fused=False)' if args.fallback else 'fused'}")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| vocab | naive peak MB | chunked peak MB | peak ratio | naive CPU s | chunked CPU s | CPU time ratio "
          "| naive wall s | chunked wall s | wall ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for vocab in (49152, 151936):
        r = {}
        for method in ("naive", "checkpointed" if args.fallback else "chunked"):
            cmd = [sys.executable, __file__, "--one", method, str(vocab), "--seq", str(args.seq),
                   "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back to the OS
            r[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
        n, c = r["naive"], r["checkpointed" if args.fallback else "chunked"]
        print(f"| {vocab} | {n['peak_extra_mb']} | {c['peak_extra_mb']} | "
              f"{n['peak_extra_mb'] / c['peak_extra_mb']:.1f}x | {n['cpu_s']} | {c['cpu_s']} | "
              f"{c['cpu_s'] / n['cpu_s']:.2f}x | {n['wall_s']} | {c['wall_s']} | {c['wall_s'] / n['wall_s']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
