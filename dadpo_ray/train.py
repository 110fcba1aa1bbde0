"""The training stage's driver: validate everything, then hand one plain dict to Ray Train workers.

    dadpo-ray train --config CFG [overrides]      (the CLI calls `train_from_config`)
    python jobs/train.py --config CFG [overrides]  (the same, inside `ray job submit`)

Layout under `out_dir` (the recipe's run_dir): `train/<name>/` is the Ray Train run (checkpoints,
`metrics.jsonl`, `config.yaml`), `model/` the exported Hugging Face model. Running the same command again (same
`name`, same `run_dir`) resumes from the last checkpoint.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from dadpo_ray.batching import fits
from dadpo_ray.config import RecipeConfig, save_config
from dadpo_ray.deepspeed_config import check_hardware, global_batch
from dadpo_ray.errors import DadpoError
from dadpo_ray.records import Manifest, open_dataset, read_rows, row_problems
from dadpo_ray.train_state import METRICS_FILE
from dadpo_ray.train_worker import loss_weights, train_loop_per_worker

# What validation reads: everything the contract checks, without the text columns.
_CHECK_COLUMNS = [
    "id", "split", "prompt_ids", "chosen_ids", "rejected_ids", "teacher_chosen_logp", "teacher_rejected_logp",
    "ref_chosen_logp", "ref_rejected_logp", "chosen_topk_ids", "chosen_topk_logprobs", "rejected_topk_ids",
    "rejected_topk_logprobs",
]


def _has_nonfinite(row: dict) -> bool:
    numbers = [row[c] for c in ("teacher_chosen_logp", "teacher_rejected_logp", "ref_chosen_logp", "ref_rejected_logp")]
    for side in ("chosen", "rejected"):
        for values in row[f"{side}_topk_logprobs"] or []:
            numbers.extend(values)
    return not all(math.isfinite(x) for x in numbers)


def select_rows(data_dir: str, manifest: Manifest, train) -> tuple[list[int], dict]:
    """Indices (into the manifest's shards, in order) of the train rows to train on, and counts: the rows set
    aside, and `pair_tokens`, the kept pairs' tokens (prompt + chosen + prompt + rejected).

    Refused (DadpoError naming the row ids): rows that break the contract (e.g. top-k length != response
    length), and rows with NaN/inf log-probs unless train.skip_bad_rows. Skipped and counted: rows too long
    for train.max_seq_len (see dadpo_ray.batching: pairs are never cut).
    """
    rows = read_rows(data_dir, manifest.files, columns=_CHECK_COLUMNS).to_pylist()
    keep, refused = [], []
    counts = {"eval_rows": 0, "bad_rows_skipped": 0, "too_long_skipped": 0, "pair_tokens": 0}
    for index, row in enumerate(rows):
        if row["split"] != "train":
            counts["eval_rows"] += 1
            continue
        problems = row_problems(row, manifest.topk)
        if not row["prompt_ids"]:
            problems.append("empty prompt")
        if problems:
            if train.skip_bad_rows and _has_nonfinite(row):
                counts["bad_rows_skipped"] += 1
                continue
            refused.append(f"{row['id']} ({'; '.join(problems)})")
        elif not fits(row, train.max_seq_len):
            counts["too_long_skipped"] += 1
        else:
            keep.append(index)
            counts["pair_tokens"] += 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
    if refused:
        hint = " (train.skip_bad_rows=true skips rows with NaN/inf log-probs)" if not train.skip_bad_rows else ""
        raise DadpoError(f"{data_dir}: {len(refused)} bad row(s){hint}: " + ", ".join(refused[:5])
                         + (" ..." if len(refused) > 5 else ""))
    return keep, counts


def train(cfg: RecipeConfig, data_dir: str, out_dir: str) -> dict:
    """Validate, then run Ray Train to the end (or resume it). Returns where things are and what was skipped."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dadpo_ray.models import load_tokenizer, vocab_fingerprint

    t = cfg.train
    if "://" in out_dir:  # workers write metrics and the export with plain file I/O
        raise DadpoError(f"{out_dir}: training writes to a local or shared filesystem path, not a URI")
    weights = loss_weights(t.loss)  # refuses impossible loss mixes before anything is read
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise DadpoError("train.tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    fingerprint = vocab_fingerprint(load_tokenizer(cfg.models.student))
    manifest = open_dataset(data_dir, fingerprint.size, fingerprint.sha256)
    keep, counts = select_rows(data_dir, manifest, t)
    for reason, n in counts.items():
        if n and reason in ("bad_rows_skipped", "too_long_skipped"):
            print(f"[dadpo-ray train] {reason.replace('_', ' ')}: {n} row(s) of {data_dir}", flush=True)
    batch = global_batch(t, t.num_workers)
    if len(keep) < batch:
        raise DadpoError(f"{data_dir}: {len(keep)} usable train rows fill no step of {batch} pairs "
                         f"(train.micro_batch_size x train.grad_accum x train.num_workers)")
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    check_hardware(t, ray.cluster_resources().get("GPU", 0))

    out = Path(out_dir).resolve()
    run_dir = out / "train" / cfg.name
    save_config(cfg, run_dir / "config.yaml")
    tokens_per_step = counts["pair_tokens"] / len(keep) * batch
    print(f"[dadpo-ray train] {len(keep)} pairs, global batch {batch} pairs = {t.micro_batch_size} micro x "
          f"{t.grad_accum} accumulation x {t.num_workers} workers (~{tokens_per_step:.0f} tokens per step), "
          f"preset {t.loss.preset} ({weights}), ZeRO-{t.zero_stage} {t.precision}, run dir {run_dir}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": cfg.model_dump(mode="json"),
            "data_dir": data_dir if "://" in data_dir else os.path.abspath(data_dir),
            "files": manifest.files, "row_indices": keep, "run_dir": str(run_dir),
            "model_dir": str(out / "model"), "manifest": manifest.model_dump(mode="json"),
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=str(out / "train"),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    result = trainer.fit()
    return {"model_dir": str(out / "model"), "run_dir": str(run_dir), "metrics_file": str(run_dir / METRICS_FILE),
            "rows": len(keep), **counts, "metrics": result.metrics}


def train_from_config(cfg: RecipeConfig) -> dict:
    """`dadpo-ray train`: the dataset under `<run_dir>/data`, outputs under `<run_dir>`."""
    return train(cfg, str(Path(cfg.run_dir) / "data"), cfg.run_dir)
