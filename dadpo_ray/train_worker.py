"""The Ray Train worker: one DeepSpeed rank training the student on the combined daDPO loss.

`train_loop_per_worker(config)` reads top to bottom: set up (config, rows, model, engine, resume) -> train
(steps, metrics, checkpoints) -> export. The driver (`dadpo_ray.train`) has validated everything before any
worker starts; `config` is a plain dict: {"recipe": RecipeConfig dump, "data_dir", "files", "row_indices",
"run_dir", "model_dir", "manifest"}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dadpo_ray.batching import TRAIN_COLUMNS, collate, sequence_sums
from dadpo_ray.config import LossConfig, RecipeConfig
from dadpo_ray.errors import DadpoError
from dadpo_ray.losses import PRESETS, LossWeights, combined_loss, token_logps_chunked, topk_kl_from_logps
from dadpo_ray.sampler import Position, epoch_order, rank_micro_batches, steps_left_in_epoch

POSITION_FILE = "position.json"
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside each Ray checkpoint dir
METRICS_FILE = "metrics.jsonl"


def loss_weights(loss: LossConfig) -> LossWeights:
    """The preset's weights with every non-None override from `train.loss` applied."""
    overrides = {k: v for k, v in loss.model_dump().items() if k != "preset" and v is not None}
    try:
        return dataclasses.replace(PRESETS[loss.preset], **overrides)
    except ValueError as e:
        raise DadpoError(f"train.loss: {e}") from None


class PolicyLogps(torch.nn.Module):
    """The student as DeepSpeed sees it: forward returns per-token log-probs, never [tokens, vocab] logits.

    The base model's hidden states are taken only at response positions, then the LM head *module* is applied
    chunk by chunk (`token_logps_chunked`), so ZeRO-3's hooks gather the head's partitioned weight.
    """

    def __init__(self, model, chunk_size: int, temperature: float):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, target_ids, response_mask, topk_ids):
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[response_mask]       # [N, H], row-major: chosen rows' tokens first
        targets = target_ids[response_mask]  # [N]
        head = self.model.get_output_embeddings()
        n_chosen = topk_ids.shape[0]
        chosen, topk = token_logps_chunked(hidden[:n_chosen], head, targets[:n_chosen], topk_ids,
                                           self.chunk_size, self.temperature)  # [Nc], [Nc, K]
        if hidden.shape[0] == n_chosen:
            return chosen, topk
        rejected, _ = token_logps_chunked(hidden[n_chosen:], head, targets[n_chosen:], None, self.chunk_size)
        return torch.cat([chosen, rejected]), topk  # [N], [Nc, K]


def micro_batch_loss(engine, weights: LossWeights, rows: list[dict], pad_id: int) -> tuple[torch.Tensor, dict]:
    """Forward one micro batch through the engine; returns the loss and its detached metric parts."""
    pairs = len(rows)
    with_rejected = weights.w_pref > 0
    batch = collate(rows, pad_id, with_rejected=with_rejected, with_topk=True)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    token_logps, topk_logps = engine(batch["input_ids"], batch["attention_mask"], batch["target_ids"],
                                     batch["response_mask"], batch["topk_ids"])
    seq = sequence_sums(token_logps, batch["response_mask"])  # [S]
    n_chosen = batch["topk_ids"].shape[0]
    out = combined_loss(
        weights,
        policy_chosen_logps=seq[:pairs], policy_rejected_logps=seq[pairs:] if with_rejected else None,
        ref_chosen_logps=batch["ref_logps"][:pairs], ref_rejected_logps=batch["ref_logps"][pairs:],
        teacher_chosen_logps=batch["teacher_logps"][:pairs], teacher_rejected_logps=batch["teacher_logps"][pairs:],
        chosen_token_logps=token_logps[:n_chosen], student_topk_logps=topk_logps,
        teacher_topk_logps=batch["topk_logprobs"])
    loss = out.pop("loss")
    # The token KL is logged for every preset (top-k ids are in the batch anyway), trained on only if w_tok > 0.
    with torch.no_grad():
        out["token_kl"] = topk_kl_from_logps(topk_logps.detach(), batch["topk_logprobs"], None,
                                             weights.tail, weights.temperature).item()
    out["loss"] = loss.item()
    out["tokens"] = float(batch["attention_mask"].sum())
    return loss, out


def mean_over_ranks(parts: list[dict], device) -> dict:
    """Average each metric over micro batches, then over ranks (NaN = term not active)."""
    keys = sorted(parts[0])
    local = torch.tensor([[p[k] for k in keys] for p in parts], dtype=torch.float64).mean(0)
    local[keys.index("tokens")] *= len(parts)  # tokens are summed, not averaged
    import torch.distributed as dist

    summed = local.to(device)
    dist.all_reduce(summed)
    world = dist.get_world_size()
    summed = summed.cpu().tolist()
    return {k: (v if k == "tokens" else v / world) for k, v in zip(keys, summed)}


def peak_memory_mb() -> float:
    """This worker's peak memory: accelerator memory on GPU, the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def grad_norm(engine) -> float:
    """Norm of the last step's gradients before clipping (DeepSpeed returns None when it has none)."""
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


# -------------------------------------------------------------------------------------------- checkpoints
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
            universal = Path(tempfile.gettempdir()) / f"dadpo-universal-{hashlib.sha1(str(d).encode()).hexdigest()[:12]}"
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


# ---------------------------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = RecipeConfig.model_validate(config["recipe"])
    train = cfg.train
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
    import deepspeed

    from dadpo_ray.deepspeed_config import deepspeed_config, global_batch
    from dadpo_ray.export import gathered_state_dict, model_card, write_model_dir
    from dadpo_ray.models import load_model, load_tokenizer
    from dadpo_ray.records import read_rows

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    weights = loss_weights(train.loss)

    # --- setup: rows, model, position, engine
    table = read_rows(config["data_dir"], config["files"], columns=TRAIN_COLUMNS)
    all_rows = table.to_pylist()
    rows = [all_rows[i] for i in config["row_indices"]]
    del all_rows, table
    tokenizer = load_tokenizer(cfg.models.student)
    torch.manual_seed(train.seed)
    model = load_model(cfg.models.student, dtype="float32").train()  # fp32 master weights
    policy = PolicyLogps(model, train.chunk_size, weights.temperature)

    checkpoint = ray.train.get_checkpoint()
    restored = read_position(checkpoint)
    pos, saved_world = restored if restored else (Position(), world)
    G = global_batch(train, world)
    per_epoch = len(rows) // G
    left = steps_left_in_epoch(len(rows), pos.consumed, G) + (train.epochs - pos.epoch - 1) * per_epoch
    total = pos.step + (min(left, train.max_steps - pos.step) if train.max_steps else left)

    ds_config = deepspeed_config(train, world, total, load_universal=saved_world != world)
    engine, _, _, _ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=ds_config,
                                           dist_init_required=False)  # reuses Ray Train's process group
    if checkpoint is not None:
        load_checkpoint(engine, checkpoint, rank, ctx.get_local_rank(), world, saved_world)
    run_dir = config["run_dir"]
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        trim_metrics(run_dir, pos.step)
        print(f"[dadpo-ray train] {len(rows)} rows, global batch {G} pairs = {train.micro_batch_size} micro x "
              f"{train.grad_accum} accum x {world} workers, {total} steps, resuming at {pos.as_dict()}", flush=True)

    # --- train
    from tqdm import tqdm

    bar = tqdm(total=total, initial=pos.step, desc="train", disable=rank != 0, dynamic_ncols=True)
    log = open(Path(run_dir) / METRICS_FILE, "a") if rank == 0 else None
    board = None
    if train.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(Path(run_dir) / "tensorboard"))
    last_saved = resumed_from = pos.step  # resumed_from > 0 in the log shows where a run was resumed
    while pos.epoch < train.epochs and pos.step < total:
        order = epoch_order(len(rows), train.seed, pos.epoch)
        while steps_left_in_epoch(len(rows), pos.consumed, G) > 0 and pos.step < total:
            started = time.perf_counter()
            parts = []
            for ids in rank_micro_batches(order, pos.consumed, train.micro_batch_size, train.grad_accum, rank, world):
                loss, part = micro_batch_loss(engine, weights, [rows[i] for i in ids], tokenizer.pad_token_id)
                engine.backward(loss)
                engine.step()  # DeepSpeed updates only at the accumulation boundary
                parts.append(part)
            metrics = mean_over_ranks(parts, engine.device)
            elapsed = time.perf_counter() - started
            metrics.update(
                step=pos.step + 1, epoch=pos.epoch, epoch_start=pos.consumed, epoch_end=pos.consumed + G,
                samples_seen=pos.samples_seen + G, lr=engine.get_lr()[0],
                grad_norm=grad_norm(engine),
                tokens_per_s=metrics.pop("tokens") / elapsed, step_time_s=elapsed, world_size=world,
                resumed_from=resumed_from, peak_mem_mb_rank0=peak_memory_mb())
            pos = Position(pos.epoch, pos.consumed + G, pos.step + 1, pos.samples_seen + G)
            metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
            if log:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if board:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and key != "step":
                        board.add_scalar(key, value, metrics["step"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=metrics["reward_acc"])
            if pos.step % train.checkpoint_every == 0:
                save_checkpoint(engine, pos, rank, world, metrics)
                last_saved = resumed_from = pos.step  # resumed_from > 0 in the log shows where a run was resumed
            else:
                ray.train.report(metrics)
        if steps_left_in_epoch(len(rows), pos.consumed, G) == 0:
            pos = Position(pos.epoch + 1, 0, pos.step, pos.samples_seen)
    if pos.step != last_saved:  # a rerun of a finished run must find the end, not redo the last steps
        save_checkpoint(engine, pos, rank, world, metrics)
    bar.close()
    if log:
        log.close()
    if board:
        board.close()

    # --- export
    state = gathered_state_dict(engine.module.model, train.zero_stage, rank)
    if rank == 0:
        card = model_card(cfg.models.teacher.path, cfg.models.student.path, config["manifest"],
                          dataclasses.asdict(weights), train.model_dump(mode="json"), cfg.name)
        write_model_dir(engine.module.model, state, tokenizer, card, config["model_dir"])
        print(f"[dadpo-ray train] exported {config['model_dir']}", flush=True)
