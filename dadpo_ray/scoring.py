"""Score given responses under a model: summed log-prob and sparse top-k per response token.

Implements the alignment rule of `dadpo_ray.records`: for response token j the distribution is
log_softmax(raw logits) at position len(prompt) + j - 1 of one forward pass over prompt + response, temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scored:
    logp: float  # sum over response tokens of log p(token | prompt, earlier tokens)
    topk_ids: list[list[int]] | None  # [T][k]
    topk_logprobs: list[list[float]] | None  # [T][k]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] ragged ids -> input_ids [B, L], attention_mask [B, L], padded on the left (as generate() wants)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, so a padded row sees the same positions as when run alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def score_responses(
    model, prompts: list[list[int]], responses: list[list[int]], k: int | None, pad_id: int
) -> list[Scored]:
    """One forward over left-padded prompt + response; only the last max(len(response)) + 1 positions get logits."""
    ids, mask = left_pad([p + r for p, r in zip(prompts, responses)], pad_id)
    keep = max(len(r) for r in responses) + 1
    logits = model(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
        position_ids=positions_from_mask(mask).to(model.device), logits_to_keep=keep,
    ).logits  # [B, keep, V]
    results = []
    for i, response in enumerate(responses):
        n = len(response)
        if n == 0:
            results.append(Scored(0.0, [] if k else None, [] if k else None))
            continue
        # kept index keep-1 is the last position (predicts past the end); response token j is predicted at
        # kept index keep - 1 - n + j.
        logprobs = torch.log_softmax(logits[i, keep - 1 - n: keep - 1].float(), dim=-1)  # [n, V]
        target = torch.tensor(response, device=logprobs.device)
        logp = logprobs.gather(-1, target[:, None]).sum().item()
        if k:
            values, indices = logprobs.topk(k, dim=-1)  # [n, k], sorted descending
            results.append(Scored(logp, indices.tolist(), values.tolist()))
        else:
            results.append(Scored(logp, None, None))
    return results
