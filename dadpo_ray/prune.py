"""Structured width pruning of Llama / Qwen2 causal LMs: how the student of daDPO's first setting is made.

The daDPO paper's first setting distils an unpruned teacher into a 20%-pruned copy of itself (Vicuna-7B); our
offline demo prunes SmolLM2-135M-Instruct the same way. Pruning is *structured*: whole units are cut out and the
nn.Linear modules get smaller, so the result is a normal, smaller HF model dir that any loader runs.

Two kinds of unit, counted per decoder layer:

- an MLP intermediate channel j: row j of gate_proj and up_proj, column j of down_proj (and gate/up bias j);
- (with `prune_heads`) a KV group g: KV head g with the n_rep = heads / kv_heads query heads that read it under
  GQA, i.e. its rows of q_proj, k_proj, v_proj (and biases, Qwen2) and its query heads' columns of o_proj.

`config.intermediate_size` and the head counts are single numbers for all layers, so every layer removes the
same *count* of units; each layer chooses *which* from its own scores. A unit's score is a sum over its weights
of a per-element saliency:

    magnitude:  s(w) = w^2            -> the squared L2 norm of the unit (same ranking as the norm; needs no data)
    taylor:     s(w) = |w * dL/dw|    -> first-order Taylor estimate of the loss change when w is zeroed,
                                         L = mean LM loss over the calibration prompts (as in LLM-Pruner)

`prune_model` prunes in place (a 7B model is not copied) and returns the model and a small report;
`save_pruned` writes it atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dadpo_ray.errors import DadpoError
from dadpo_ray.models import replace_dir_atomically

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SCORES = ("taylor", "magnitude")
# Kept MLP widths are rounded to a multiple of 8: matmul kernels (tensor cores, fp16/bf16 GEMM tiles) run fastest
# when the inner dimension divides 8, and a width like 1229 would pad or fall back to slower paths.
CHANNEL_MULTIPLE = 8


class PruneError(DadpoError, ValueError):
    """Bad pruning input (ratio, score, architecture, calibration data). A ValueError, and a DadpoError for the CLI."""


# ------------------------------------------------------------------------------------------------ counts
def kept_count(n: int, ratio: float, multiple: int = 1) -> int:
    """How many of `n` units survive removing `ratio` of them: rounded, a multiple of `multiple` where that
    still leaves at least `multiple` units, never more than `n` and never zero.

    kept_count(1536, 0.2, 8) == 1232 (1228.8 -> 1232);  kept_count(128, 0.01, 8) == 128;  kept_count(3, 0.2) == 2.
    """
    exact = n * (1.0 - ratio)
    if exact >= multiple:
        kept = multiple * int(exact / multiple + 0.5)  # round half up, not Python's round-half-to-even
    else:
        kept = int(exact + 0.5)
    return min(n, max(1, kept))


def _check_inputs(model, ratio: float, score: str) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PruneError(
            f"cannot prune model_type {model_type!r}: only {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Llama-style gate/up/down MLP and q/k/v/o attention) are supported"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise PruneError(f"pruning ratio must be a number strictly between 0 and 1, got {ratio!r}")
    if score not in SCORES:
        raise PruneError(f"unknown importance score {score!r}: choose one of {', '.join(SCORES)}")


# ------------------------------------------------------------------------------------------------ scores
def _calibration_ids(calibration, tokenizer) -> list[torch.Tensor]:
    """Texts or token-id tensors -> a list of 1-D LongTensors of at least 2 tokens (one next-token target)."""
    if not calibration:
        raise PruneError("score='taylor' needs calibration prompts (texts or token ids); or use score='magnitude'")
    ids = []
    for i, item in enumerate(calibration):
        if isinstance(item, str):
            if tokenizer is None:
                raise PruneError("calibration texts need a tokenizer; pass tokenizer= or token-id tensors")
            item = tokenizer(item, return_tensors="pt").input_ids
        item = torch.as_tensor(item, dtype=torch.long).reshape(-1)  # [T] (accepts [1, T])
        if item.numel() < 2:
            raise PruneError(f"calibration prompt {i} has {item.numel()} token(s); at least 2 are needed")
        ids.append(item)
    return ids


def _prunable_linears(model) -> list[nn.Linear]:
    return [
        proj
        for layer in model.model.layers
        for proj in (
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        )
    ]


def _accumulate_grads(model, calibration_ids: list[torch.Tensor]) -> None:
    """Leave dL/dw in .grad of every prunable linear, L = mean over prompts of the LM loss. Only those linears
    get gradients (embeddings, norms and lm_head do not), one prompt at a time, to bound memory."""
    params = [p for lin in _prunable_linears(model) for p in lin.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    device = next(model.parameters()).device
    with torch.enable_grad():
        for ids in calibration_ids:
            ids = ids.to(device)[None]  # [1, T]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / len(calibration_ids)).backward()


def _saliency(lin: nn.Linear, score: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-element saliency of a linear's weight [out, in] and bias [out], in fp32."""

    def s(p):
        if p is None:
            return None
        w = p.detach().float()
        return w.square() if score == "magnitude" else (w * p.grad.float()).abs()

    return s(lin.weight), s(lin.bias)


def _rows(lin: nn.Linear, score: str) -> torch.Tensor:
    """Saliency summed over each output row (with its bias): [out]."""
    w, b = _saliency(lin, score)
    return w.sum(dim=1) + (b if b is not None else 0.0)


def _cols(lin: nn.Linear, score: str) -> torch.Tensor:
    """Saliency summed over each input column: [in]. (The bias is per output, not per column.)"""
    return _saliency(lin, score)[0].sum(dim=0)


def mlp_channel_scores(layer, score: str) -> torch.Tensor:
    """[intermediate]: channel j's saliency in gate row j + up row j + down column j."""
    mlp = layer.mlp
    return _rows(mlp.gate_proj, score) + _rows(mlp.up_proj, score) + _cols(mlp.down_proj, score)


def kv_group_scores(layer, score: str, head_dim: int) -> torch.Tensor:
    """[kv_heads]: group g's saliency in its q/k/v rows and its query heads' o_proj columns."""
    attn = layer.self_attn
    n_kv = attn.k_proj.out_features // head_dim
    q = _rows(attn.q_proj, score) + _cols(attn.o_proj, score)  # [heads * head_dim]
    kv = _rows(attn.k_proj, score) + _rows(attn.v_proj, score)  # [kv_heads * head_dim]
    # query heads g*n_rep .. g*n_rep+n_rep-1 read KV head g, so q rows are laid out [kv_heads, n_rep, head_dim]
    return q.reshape(n_kv, -1).sum(dim=1) + kv.reshape(n_kv, head_dim).sum(dim=1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (kept units stay in their original order)."""
    return torch.topk(scores, k).indices.sort().values


# ------------------------------------------------------------------------------------------------ surgery
@torch.no_grad()
def _sliced_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller nn.Linear holding old.weight[rows][:, cols] (and old.bias[rows])."""
    w = old.weight
    w = w if rows is None else w[rows.to(w.device)]
    w = w if cols is None else w[:, cols.to(w.device)]
    new = nn.utils.skip_init(
        nn.Linear, w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype
    )
    new.weight.copy_(w)
    if old.bias is not None:
        new.bias.copy_(old.bias if rows is None else old.bias[rows.to(w.device)])
    new.requires_grad_(old.weight.requires_grad)
    return new


def prune_mlp_channels(model, keep: list[torch.Tensor]) -> None:
    """Keep only channels keep[i] (same count in every layer) of layer i's MLP; updates config.intermediate_size."""
    assert len({len(k) for k in keep}) == 1, "every layer must keep the same number of MLP channels"
    for layer, idx in zip(model.model.layers, keep):
        mlp = layer.mlp
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=idx)
        mlp.up_proj = _sliced_linear(mlp.up_proj, rows=idx)
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx)
        mlp.intermediate_size = len(idx)
    model.config.intermediate_size = len(keep[0])


def prune_kv_groups(model, keep: list[torch.Tensor]) -> None:
    """Keep only KV groups keep[i] (same count in every layer) of layer i's attention; updates the head counts
    and pins config.head_dim, which HF would otherwise re-derive as hidden_size // num_attention_heads."""
    assert len({len(k) for k in keep}) == 1, "every layer must keep the same number of KV groups"
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    offsets = torch.arange(head_dim)
    for layer, groups in zip(model.model.layers, keep):
        groups = groups.cpu()
        kv_rows = (groups[:, None] * head_dim + offsets).reshape(-1)  # [kept * head_dim]
        heads = (groups[:, None] * n_rep + torch.arange(n_rep)).reshape(-1)  # [kept * n_rep] query heads
        q_rows = (heads[:, None] * head_dim + offsets).reshape(-1)  # [kept * n_rep * head_dim]
        attn = layer.self_attn
        attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)
        # attn.head_dim and attn.num_key_value_groups (= n_rep) are unchanged by removing whole groups
    cfg.head_dim = head_dim
    cfg.num_key_value_heads = len(keep[0])
    cfg.num_attention_heads = len(keep[0]) * n_rep


# ------------------------------------------------------------------------------------------------ entry points
def prune_model(
    model,
    ratio: float,
    *,
    score: str = "taylor",
    calibration=None,
    tokenizer=None,
    prune_heads: bool = False,
):
    """Remove `ratio` of the MLP channels (and, with `prune_heads`, of the KV groups) of every layer, IN PLACE.

    calibration: texts (needs `tokenizer`) or token-id tensors; required for score="taylor", unused otherwise.
    Returns (model, report); report = params before/after, per-layer kept counts, effective ratios, score.
    """
    _check_inputs(model, ratio, score)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    before = {
        "params": sum(p.numel() for p in model.parameters()),  # parameters() counts tied weights once
        "mlp": cfg.intermediate_size, "heads": cfg.num_attention_heads, "kv": cfg.num_key_value_heads,
    }
    n_mlp = kept_count(cfg.intermediate_size, ratio, CHANNEL_MULTIPLE)
    n_kv = kept_count(cfg.num_key_value_heads, ratio) if prune_heads else cfg.num_key_value_heads

    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()  # no dropout while scoring
    try:
        if score == "taylor":
            _accumulate_grads(model, _calibration_ids(calibration, tokenizer))
        keep_mlp = [_top(mlp_channel_scores(layer, score), n_mlp) for layer in model.model.layers]
        if prune_heads:
            keep_kv = [_top(kv_group_scores(layer, score, head_dim), n_kv) for layer in model.model.layers]
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.grad = None
            p.requires_grad_(flag)
    prune_mlp_channels(model, keep_mlp)
    if prune_heads:
        prune_kv_groups(model, keep_kv)
    model.train(was_training)

    report = {
        "score": score,
        "ratio": ratio,
        "params_before": before["params"],
        "params_after": sum(p.numel() for p in model.parameters()),
        "layers": len(model.model.layers),
        "mlp_channels_per_layer": {"before": before["mlp"], "kept": n_mlp},
        "kv_heads_per_layer": {"before": before["kv"], "kept": cfg.num_key_value_heads},
        "attention_heads_per_layer": {"before": before["heads"], "kept": cfg.num_attention_heads},
        "effective_ratio": {
            "mlp": round(1 - n_mlp / before["mlp"], 4),
            "kv_groups": round(1 - n_kv / before["kv"], 4),
        },
    }
    return model, report


def save_pruned(model, tokenizer, out_dir, *, overwrite: bool = False) -> Path:
    """Write a normal HF model dir (safetensors, config, generation config if any, tokenizer if given).

    Written into a temp dir beside out_dir, then renamed into place, so a crash never leaves a half-written
    out_dir. An existing non-empty out_dir is refused unless overwrite=True; then it is moved aside and deleted
    only after the new dir is in place.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise PruneError(f"{out} already exists and is not empty; pass overwrite=True to replace it")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return replace_dir_atomically(out, write)
