"""Export the trained student as a Hugging Face model dir: safetensors, tokenizer, generation config, model card.

Called on every rank (under ZeRO-3 the weights are partitioned and gathering them is a collective); only rank 0
writes. The dir is written under a temp name beside the target and renamed, so `out_dir/model` is either the
previous complete export or the new complete one, never half of either.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from dadpo_ray.models import replace_dir_atomically


def gathered_state_dict(model: torch.nn.Module, zero_stage: int, rank: int) -> dict | None:
    """Full weights on rank 0 (None elsewhere). Tied weights stay one tensor, so safetensors stores them once."""
    import deepspeed

    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gather:
        if rank != 0:
            return None
        copies: dict[int, torch.Tensor] = {}  # id of the source tensor -> its copy (keeps ties tied)
        state = {}
        for name, tensor in model.state_dict(keep_vars=False).items():
            key = id(tensor) if tensor.data_ptr() == 0 else tensor.data_ptr()
            if key not in copies:
                copies[key] = tensor.detach().to("cpu", copy=True)
            state[name] = copies[key]
        return state


def model_card(teacher: str, student: str, manifest: dict, loss: dict, train: dict, name: str) -> str:
    """README.md of the exported model: what it was distilled from, on what data, with which loss."""
    return "\n".join([
        f"# {name}: {student} distilled from {teacher} with dadpo-ray",
        "",
        f"- **Teacher**: `{teacher}`",
        f"- **Student (initial weights)**: `{student}`",
        f"- **Dataset**: manifest created {manifest.get('created_at')}, config fingerprint "
        f"`{manifest.get('config_fingerprint')}`, rows {manifest.get('rows')}, top-k {manifest.get('topk')}",
        f"- **Loss** (preset `{train['loss']['preset']}`, resolved weights): `{json.dumps(loss, sort_keys=True)}`",
        f"- **Training**: ZeRO stage {train['zero_stage']}, {train['precision']}, lr {train['lr']}, "
        f"{train['epochs']} epoch(s), micro batch {train['micro_batch_size']} x accumulation {train['grad_accum']} "
        f"x {train['num_workers']} worker(s)",
        "",
        "## Dataset manifest",
        "",
        "```json",
        json.dumps(manifest, indent=2, sort_keys=True),
        "```",
        "",
    ])


def write_model_dir(hf_model, state: dict, tokenizer, card: str, target: str) -> str:
    """Write the model dir to a temp dir beside `target`, then swap it into place (see replace_dir_atomically)."""
    def write(tmp: Path) -> None:
        hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)

    return str(replace_dir_atomically(Path(target), write))
