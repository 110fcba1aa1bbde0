"""The Ray Train worker: one DeepSpeed rank training the student on the combined daDPO loss.

`train_loop_per_worker(config)` reads top to bottom: set up (config, rows, model, engine, resume) -> train
(steps, metrics, checkpoints) -> export. The driver (`dadpo_ray.train`) has validated everything before any
worker starts; `config` is a plain dict: {"recipe": RecipeConfig dump, "data_dir", "files", "row_indices",
"run_dir", "model_dir", "manifest"}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import pyarrow as pa
import torch

from dadpo_ray.batching import TRAIN_COLUMNS, collate, sequence_sums
from dadpo_ray.config import LossConfig, RecipeConfig
from dadpo_ray.errors import DadpoError
from dadpo_ray.losses import PRESETS, LossWeights, combined_loss, token_logps_chunked, topk_kl_from_logps
from dadpo_ray.sampler import Position, epoch_order, rank_micro_batches, steps_left_in_epoch
from dadpo_ray.train_state import METRICS_FILE, load_checkpoint, read_position, save_checkpoint, trim_metrics


def loss_weights(loss: LossConfig) -> LossWeights:
    """The preset's weights with every non-None override from `train.loss` applied."""
    overrides = {k: v for k, v in loss.model_dump().items() if k != "preset" and v is not None}
    try:
        return dataclasses.replace(PRESETS[loss.preset], **overrides)
    except ValueError as e:
        raise DadpoError(f"train.loss: {e}") from None


class PolicyLogps(torch.nn.Module):
    """The student as DeepSpeed sees it: forward returns per-token log-probs, never [tokens, vocab] logits.

    The base model's hidden states are taken only at response positions, then the LM head is applied chunk by
    chunk (`token_logps_chunked`). fused=True uses the head's weight directly (the fused autograd Function: less
    memory and time); under ZeRO-3 that weight is partitioned and only the head *module*'s hooks gather it, so
    ZeRO-3 needs fused=False (the checkpointed path that calls the module): `fused = zero_stage < 3`.
    """

    def __init__(self, model, chunk_size: int, temperature: float, fused: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.temperature = temperature
        self.fused = fused

    def forward(self, input_ids, attention_mask, target_ids, response_mask, topk_ids):
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[response_mask]       # [N, H], row-major: chosen rows' tokens first
        targets = target_ids[response_mask]  # [N]
        head = self.model.get_output_embeddings()
        n_chosen = topk_ids.shape[0]
        chosen, topk = token_logps_chunked(hidden[:n_chosen], head, targets[:n_chosen], topk_ids,
                                           self.chunk_size, self.temperature, fused=self.fused)  # [Nc], [Nc, K]
        if hidden.shape[0] == n_chosen:
            return chosen, topk
        rejected, _ = token_logps_chunked(hidden[n_chosen:], head, targets[n_chosen:], None, self.chunk_size,
                                          fused=self.fused)
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


class MetricsLog:
    """Rank 0's view of the run: metrics.jsonl (one line per step), a progress bar with ETA, TensorBoard."""

    def __init__(self, run_dir: str, rank: int, step: int, total: int, tensorboard: bool):
        from tqdm import tqdm

        self.enabled = rank == 0
        self.bar = tqdm(total=total, initial=step, desc="train", disable=not self.enabled, dynamic_ncols=True)
        self.file = self.board = None
        if self.enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            trim_metrics(run_dir, step)
            self.file = open(Path(run_dir) / METRICS_FILE, "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.board:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(key, value, metrics["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=metrics["reward_acc"])

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()


def train_step(engine, weights: LossWeights, rows: pa.Table, micro_batches: list[list[int]], pad_id: int) -> dict:
    """One optimizer step over this rank's micro batches; returns metrics averaged over all ranks."""
    started = time.perf_counter()
    parts = []
    for ids in micro_batches:
        loss, part = micro_batch_loss(engine, weights, rows.take(ids).to_pylist(), pad_id)
        engine.backward(loss)
        engine.step()  # DeepSpeed updates the weights only at the accumulation boundary
        parts.append(part)
    metrics = mean_over_ranks(parts, engine.device)
    elapsed = time.perf_counter() - started
    metrics.update(lr=engine.get_lr()[0], grad_norm=grad_norm(engine), step_time_s=elapsed,
                   tokens_per_s=metrics.pop("tokens") / elapsed, peak_mem_mb_rank0=peak_memory_mb())
    return metrics


def planned_steps(pos: Position, num_rows: int, batch: int, train) -> int:
    """Total optimizer steps of the run, counted from the position (the batch changes with the world size)."""
    left = steps_left_in_epoch(num_rows, pos.consumed, batch) + (train.epochs - pos.epoch - 1) * (num_rows // batch)
    return pos.step + (min(left, train.max_steps - pos.step) if train.max_steps else left)


# ---------------------------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = RecipeConfig.model_validate(config["recipe"])
    train = cfg.train
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
    import deepspeed

    from dadpo_ray.deepspeed_config import deepspeed_config, global_batch
    from dadpo_ray.models import load_model, load_tokenizer
    from dadpo_ray.records import read_rows

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    weights = loss_weights(train.loss)

    # --- setup: rows, model, data position, engine, restored state
    # Rows stay in Arrow (about 10x smaller than Python objects for top-k columns); a micro batch becomes Python
    # rows only when it is used.
    rows = read_rows(config["data_dir"], config["files"], columns=TRAIN_COLUMNS).take(config["row_indices"])
    tokenizer = load_tokenizer(cfg.models.student)
    torch.manual_seed(train.seed)
    model = load_model(cfg.models.student, dtype="float32").train()  # fp32 master weights
    policy = PolicyLogps(model, train.chunk_size, weights.temperature, fused=train.zero_stage < 3)

    checkpoint = ray.train.get_checkpoint()
    pos, saved_world = read_position(checkpoint) or (Position(), world)
    batch = global_batch(train, world)
    total = planned_steps(pos, len(rows), batch, train)
    ds_config = deepspeed_config(train, world, total, load_universal=saved_world != world)
    engine, _, _, _ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=ds_config,
                                           dist_init_required=False)  # reuses Ray Train's process group
    if checkpoint is not None:
        load_checkpoint(engine, checkpoint, rank, ctx.get_local_rank(), world, saved_world)
    if rank == 0:
        print(f"[dadpo-ray train] {len(rows)} rows, global batch {batch} pairs = {train.micro_batch_size} micro x "
              f"{train.grad_accum} accum x {world} workers, {total} steps, from {pos.as_dict()}", flush=True)

    # --- train
    log = MetricsLog(config["run_dir"], rank, pos.step, total, train.tensorboard)
    resumed_from = last_saved = pos.step  # resumed_from > 0 in the log shows where a run was resumed
    metrics = {}
    while pos.epoch < train.epochs and pos.step < total:
        order = epoch_order(len(rows), train.seed, pos.epoch)
        while steps_left_in_epoch(len(rows), pos.consumed, batch) > 0 and pos.step < total:
            micro_batches = rank_micro_batches(order, pos.consumed, train.micro_batch_size, train.grad_accum,
                                               rank, world)
            metrics = train_step(engine, weights, rows, micro_batches, tokenizer.pad_token_id)
            metrics.update(step=pos.step + 1, epoch=pos.epoch, epoch_start=pos.consumed,
                           epoch_end=pos.consumed + batch, samples_seen=pos.samples_seen + batch,
                           world_size=world, resumed_from=resumed_from)
            metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            pos = Position(pos.epoch, pos.consumed + batch, pos.step + 1, pos.samples_seen + batch)
            log.write(metrics)
            if pos.step % train.checkpoint_every == 0:
                save_checkpoint(engine, pos, rank, world, metrics)
                last_saved = pos.step
            else:
                ray.train.report(metrics)
        if steps_left_in_epoch(len(rows), pos.consumed, batch) == 0:
            pos = Position(pos.epoch + 1, 0, pos.step, pos.samples_seen)
    if pos.step != last_saved:  # a rerun of a finished run must find the end, not redo the last steps
        save_checkpoint(engine, pos, rank, world, metrics)
    log.close()

    # --- export
    export_model(engine, cfg, config, weights, tokenizer, rank)


def export_model(engine, cfg: RecipeConfig, config: dict, weights: LossWeights, tokenizer, rank: int) -> None:
    from dadpo_ray.export import gathered_state_dict, model_card, write_model_dir

    state = gathered_state_dict(engine.module.model, cfg.train.zero_stage, rank)  # a collective under ZeRO-3
    if rank == 0:
        card = model_card(cfg.models.teacher.path, cfg.models.student.path, config["manifest"],
                          dataclasses.asdict(weights), cfg.train.model_dump(mode="json"), cfg.name)
        write_model_dir(engine.module.model, state, tokenizer, card, config["model_dir"])
        print(f"[dadpo-ray train] exported {config['model_dir']}", flush=True)
