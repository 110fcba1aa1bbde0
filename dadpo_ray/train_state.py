"""Training state that survives a restart: DeepSpeed checkpoint + data position + RNG, through Ray Train.

A Ray checkpoint dir holds `ds/` (DeepSpeed's files, each rank writes its ZeRO partition), `position.json`
(the data position and the world size that wrote it) and `rng_rank<r>.pt`. Ray Train merges the ranks' dirs
into one and keeps the last `train.keep_checkpoints`. A checkpoint written by another number of workers is
converted to DeepSpeed's universal format first, since ZeRO partitions depend on the world size.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from dadpo_ray.sampler import Position

POSITION_FILE = "position.json"
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside each Ray checkpoint dir
METRICS_FILE = "metrics.jsonl"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_position(checkpoint) -> tuple[Position, int] | None:
    """(position, world size that wrote it) from a Ray checkpoint, or None for a fresh start."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        saved = json.loads((Path(d) / POSITION_FILE).read_text())
    return Position(**saved["position"]), saved["world_size"]


def save_checkpoint(engine, pos: Position, rank: int, world: int, metrics: dict) -> None:
    """DeepSpeed state + data position + RNG, reported through Ray Train (which merges all ranks' files)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="dadpo-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        torch.save(rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        if rank == 0:
            (Path(tmp) / POSITION_FILE).write_text(json.dumps({"position": pos.as_dict(), "world_size": world}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{pos.step:07d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_universal(ds_dir: str, out_dir: str) -> None:
    """Convert a DeepSpeed ZeRO checkpoint to the universal format, which loads on any number of workers."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    main(argparse.Namespace(input_folder=ds_dir, output_folder=out_dir, num_extract_workers=1,
                            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))


def load_checkpoint(engine, checkpoint, rank: int, local_rank: int, world: int, saved_world: int) -> None:
    """Restore DeepSpeed state (and each rank's RNG when the ranks are the same ones)."""
    import torch.distributed as dist

    with checkpoint.as_directory() as d:
        if saved_world == world:
            path, _ = engine.load_checkpoint(d, tag=DS_TAG)
            rng_file = Path(d) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # ZeRO partitions depend on the world size: convert (once per node), then load
            digest = hashlib.sha1(checkpoint.path.encode()).hexdigest()[:12]  # the same on every rank of a node
            universal = Path(tempfile.gettempdir()) / f"dadpo-universal-{digest}"
            if local_rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
                to_universal(str(Path(d) / DS_TAG), str(universal / DS_TAG))
            dist.barrier()
            path, _ = engine.load_checkpoint(str(universal), tag=DS_TAG)
            dist.barrier()
            if local_rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {d}/{DS_TAG}")


def trim_metrics(run_dir: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: the log then describes the weights we keep."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
