"""The whole DeepSpeed config, derived in one place from `TrainConfig` and the world size.

Every batch-size number comes from here: micro batch (per worker per forward), accumulation, and the global
batch `micro * accum * world` that the data sampler (`dadpo_ray.sampler`) and the start-up log use.
Hardware the config cannot run on is refused here, before any worker starts.
"""

from __future__ import annotations

from dadpo_ray.config import TrainConfig
from dadpo_ray.errors import DadpoError


def global_batch(train: TrainConfig, world_size: int) -> int:
    """Preference pairs per optimizer step across all workers."""
    return train.micro_batch_size * train.grad_accum * world_size


def check_hardware(train: TrainConfig, gpus_available: float) -> None:
    """Refuse what the accelerator cannot run: fp16 needs a GPU, offload needs a GPU to offload from."""
    if not train.use_gpu:
        if train.precision == "fp16":
            raise DadpoError("train.precision: fp16 needs a GPU (DeepSpeed on CPU runs bf16 or fp32); "
                             "use train.precision=bf16 or fp32")
        if train.offload_optimizer:
            raise DadpoError("train.offload_optimizer: offload moves optimizer state from GPU to CPU memory; "
                             "without a GPU (train.use_gpu=false) it is already in CPU memory")
    elif gpus_available < train.num_workers:
        raise DadpoError(f"train.use_gpu: {train.num_workers} workers need one GPU each, the Ray cluster has "
                         f"{gpus_available:g}")
    if train.offload_optimizer and train.zero_stage == 0:
        raise DadpoError("train.offload_optimizer: optimizer offload needs ZeRO stage 1, 2 or 3 (train.zero_stage=0)")


def _scheduler(train: TrainConfig, total_steps: int) -> dict:
    # DeepSpeed's warmup schedulers need at least one warmup step (WarmupCosineLR uses max(2, n)).
    warmup = max(1, round(train.warmup_ratio * total_steps))
    total = max(total_steps, warmup + 1)
    if train.schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total, "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    if train.schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total, "warmup_num_steps": warmup, "warmup_min_lr": 0.0,
            "warmup_max_lr": train.lr, "warmup_type": "linear"}}
    return {"type": "WarmupLR", "params": {
        "warmup_num_steps": warmup, "warmup_min_lr": 0.0, "warmup_max_lr": train.lr, "warmup_type": "linear"}}


def deepspeed_config(train: TrainConfig, world_size: int, total_steps: int, load_universal: bool = False) -> dict:
    """The DeepSpeed dict for `deepspeed.initialize(config=...)`. `total_steps` sizes the LR schedule.

    load_universal: the checkpoint to resume from was converted to DeepSpeed's universal format, because it
    was written by another number of workers (ZeRO partitions depend on the world size).
    """
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # Gather the 16-bit weights on save, so the export writes one consolidated state dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": global_batch(train, world_size),
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay,
            # Plain torch.optim.AdamW: nothing is compiled at start-up, and it runs on CPU and GPU alike.
            "torch_adam": True}},
        "scheduler": _scheduler(train, total_steps),
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10**9,  # we log every step ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return config
