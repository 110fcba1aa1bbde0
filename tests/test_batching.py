"""Fast unit tests of the training stage's parts (no Ray, no DeepSpeed engine): collate, sampler, DS config."""

import numpy as np
import pytest
import torch

from dadpo_ray.batching import collate, fits, sequence_sums
from dadpo_ray.config import LossConfig, TrainConfig
from dadpo_ray.deepspeed_config import check_hardware, deepspeed_config, global_batch
from dadpo_ray.errors import DadpoError
from dadpo_ray.sampler import epoch_order, rank_micro_batches, steps_left_in_epoch
from dadpo_ray.train_worker import loss_weights


def row(prompt, chosen, rejected, k=2):
    return {
        "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
        "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0, "teacher_chosen_logp": -3.0,
        "teacher_rejected_logp": -4.0,
        # top-k row j names response token j first, so alignment errors show up as wrong ids
        "chosen_topk_ids": [[t, 0] for t in chosen], "chosen_topk_logprobs": [[-0.5, -1.5]] * len(chosen),
    }


def test_collate_aligns_response_positions_with_topk_rows():
    rows = [row([1, 2, 3], [10, 11], [20]), row([4], [12, 13, 14], [21, 22])]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 10, 11], [4, 12, 13, 14, 0], [1, 2, 3, 20, 0], [4, 21, 22, 0, 0]]
    # Position t predicts token t+1; response_mask marks the positions predicting response tokens.
    assert b["response_mask"].int().tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]]
    targets = b["target_ids"][b["response_mask"]].tolist()
    assert targets == [10, 11, 12, 13, 14, 20, 21, 22]
    # Top-k row j of a chosen response predicts its token j: the first Nc targets, in the same order.
    assert b["topk_ids"][:, 0].tolist() == targets[:5]
    assert b["ref_logps"].tolist() == [-1.0, -1.0, -2.0, -2.0]
    assert b["teacher_logps"].tolist() == [-3.0, -3.0, -4.0, -4.0]


def test_collate_chosen_only_and_sequence_sums():
    rows = [row([1, 2], [10, 11], [20]), row([3], [12], [21])]
    b = collate(rows, pad_id=0, with_rejected=False)
    assert b["input_ids"].shape == (2, 4)
    token_logps = torch.tensor([-1.0, -2.0, -4.0])  # row 0 has two response tokens, row 1 one
    assert sequence_sums(token_logps, b["response_mask"]).tolist() == [-3.0, -4.0]


def test_fits_counts_prompt_plus_longer_response():
    r = row([1] * 5, [2] * 3, [3] * 4)
    assert fits(r, 9) and not fits(r, 8)


def test_sampler_position_is_independent_of_world_size():
    """Two workers for a step, then one worker: the same rows in the same order as one worker all along."""
    order = epoch_order(16, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(16))
    assert not np.array_equal(order, epoch_order(16, seed=0, epoch=1))
    seen, consumed = [], 0
    for world, steps in ((2, 1), (1, 2)):
        for _ in range(steps):
            for micro in range(2):  # accum = 2
                for rank in range(world):
                    seen += rank_micro_batches(order, consumed, 2, 2, rank, world)[micro]
            consumed += 2 * 2 * world
    assert seen == order.tolist()  # each row once, nothing skipped
    assert steps_left_in_epoch(16, consumed, 4) == 0


def test_deepspeed_config_derives_batches_and_schedule():
    t = TrainConfig(micro_batch_size=3, grad_accum=4, zero_stage=3, precision="bf16", schedule="linear",
                    warmup_ratio=0.1)
    ds = deepspeed_config(t, world_size=2, total_steps=100)
    assert ds["train_batch_size"] == global_batch(t, 2) == 24
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["scheduler"]["type"] == "WarmupDecayLR" and ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert deepspeed_config(TrainConfig(zero_stage=2), 1, 10, load_universal=True)["checkpoint"]["load_universal"]


def test_hardware_refusals():
    with pytest.raises(DadpoError, match="train.precision: fp16 needs a GPU"):
        check_hardware(TrainConfig(precision="fp16"), gpus_available=0)
    with pytest.raises(DadpoError, match="train.offload_optimizer"):
        check_hardware(TrainConfig(offload_optimizer=True), gpus_available=0)
    with pytest.raises(DadpoError, match="2 workers need one GPU each"):
        check_hardware(TrainConfig(use_gpu=True, num_workers=2), gpus_available=1)
    check_hardware(TrainConfig(use_gpu=True, precision="fp16", num_workers=2), gpus_available=2)


def test_loss_weights_apply_overrides_to_the_preset():
    w = loss_weights(LossConfig(preset="dadpo_tok", beta2=0.2, tail=False))
    assert (w.beta1, w.beta2, w.w_tok, w.tail) == (0.1, 0.2, 1.0, False)
    with pytest.raises(DadpoError, match="train.loss"):
        loss_weights(LossConfig(preset="ddpo", beta1=0.0))
