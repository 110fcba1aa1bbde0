"""Which rows each worker trains on at each step: a deterministic split, restorable from one sample count.

Each epoch visits the training rows in a fixed permutation drawn from (seed, epoch). A global step consumes
the next G = micro * accum * world rows of that permutation; within the step, micro step a of rank r takes

    order[consumed + (a * world + r) * micro : consumed + (a * world + r + 1) * micro]

so the data position is just (epoch, consumed): it does not depend on the number of workers, and a run
resumed on fewer or more workers continues exactly where it stopped. Nothing is trained twice or skipped
within an epoch. The last `num_rows % G` rows of each epoch's permutation do not fill a step and are left
out of that epoch (a different set each epoch; every rank must run the same number of micro steps).

We use this rather than `ray.train.get_dataset_shard`: a streaming split cannot be restarted at an exact
sample, which resuming after a failure without repeating or skipping samples requires.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    consumed: int = 0  # rows of this epoch's permutation already trained (all workers together)
    step: int = 0  # optimizer steps done, all epochs
    samples_seen: int = 0  # rows trained, all epochs

    def as_dict(self) -> dict:
        return asdict(self)


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of row indices for one epoch; the same on every worker and every attempt."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def steps_left_in_epoch(num_rows: int, consumed: int, global_batch: int) -> int:
    return (num_rows - consumed) // global_batch


def total_steps(num_rows: int, global_batch: int, epochs: int, max_steps: int | None) -> int:
    steps = (num_rows // global_batch) * epochs
    return min(steps, max_steps) if max_steps else steps


def rank_micro_batches(order: np.ndarray, consumed: int, micro: int, accum: int, rank: int, world: int):
    """This rank's `accum` micro batches (lists of row indices) for the step starting at `consumed`."""
    batches = []
    for a in range(accum):
        start = consumed + (a * world + rank) * micro
        batches.append(order[start : start + micro].tolist())
    return batches
