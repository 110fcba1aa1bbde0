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


def _response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Yield log_softmax [len(response), V] (fp32) per response, or None for an empty one.

    One forward over left-padded prompt + response; only the last max(len(response)) + 1 positions get logits.
    """
    ids, mask = left_pad([p + r for p, r in zip(prompts, responses)], pad_id)
    keep = max(len(r) for r in responses) + 1
    logits = model(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
        position_ids=positions_from_mask(mask).to(model.device), logits_to_keep=keep,
    ).logits  # [B, keep, V]
    for i, response in enumerate(responses):
        n = len(response)
        # kept index keep-1 is the last position (predicts past the end); response token j is predicted at
        # kept index keep - 1 - n + j.
        yield torch.log_softmax(logits[i, keep - 1 - n: keep - 1].float(), dim=-1) if n else None  # [n, V]


def _scored(logprobs: torch.Tensor | None, response: list[int], k: int | None) -> Scored:
    """One response's Scored from its [len(response), V] log-probs (None for an empty response)."""
    if logprobs is None:
        return Scored(0.0, [] if k else None, [] if k else None)
    target = torch.tensor(response, device=logprobs.device)
    logp = logprobs.gather(-1, target[:, None]).sum().item()
    if not k:
        return Scored(logp, None, None)
    values, indices = logprobs.topk(k, dim=-1)  # [n, k], sorted descending
    return Scored(logp, indices.tolist(), values.tolist())


@torch.no_grad()
def score_responses(
    model, prompts: list[list[int]], responses: list[list[int]], k: int | None, pad_id: int
) -> list[Scored]:
    """Summed log-prob of each response, and its top-k per response token when k is given."""
    return [_scored(logprobs, response, k)
            for response, logprobs in zip(responses, _response_logprobs(model, prompts, responses, pad_id))]


@torch.no_grad()
def score_from_step_logits(step_logits: tuple[torch.Tensor, ...], responses: list[list[int]],
                           k: int | None) -> list[Scored]:
    """The same Scored, from the raw logits `generate(output_logits=True)` returned while sampling the responses.

    step_logits[j] is [B, V]: the raw distribution that predicted token j of every row, which is exactly the
    alignment rule above, so sampling and scoring share one pass (no second forward over prompt + response).
    """
    def row_logprobs(i: int, n: int) -> torch.Tensor:  # [n, V], one row at a time: no [B, T, V] copy
        return torch.log_softmax(torch.stack([step[i] for step in step_logits[:n]]).float(), dim=-1)

    return [_scored(row_logprobs(i, len(r)) if r else None, r, k) for i, r in enumerate(responses)]


@dataclass
class AtIds:
    logprobs: list[list[float]]  # [T][k]: log p(id | prompt, response tokens before j) for each given id
    top1: list[int]  # [T]: the model's most likely token at each position


@torch.no_grad()
def logprobs_at_ids(
    model, prompts: list[list[int]], responses: list[list[int]], ids: list[list[list[int]]], pad_id: int
) -> list[AtIds]:
    """This model's log-probs at given ids per response token (e.g. another model's stored top-k ids), plus its
    own top-1, under the same alignment rule; ids[i] is [len(responses[i])][k]."""
    results = []
    for at, logprobs in zip(ids, _response_logprobs(model, prompts, responses, pad_id)):
        if logprobs is None:
            results.append(AtIds([], []))
            continue
        index = torch.tensor(at, dtype=torch.long, device=logprobs.device)  # [n, k]
        results.append(AtIds(logprobs.gather(-1, index).tolist(), logprobs.argmax(-1).tolist()))
    return results


@torch.no_grad()
def next_token_logprobs(model, prompts: list[list[int]], ids: list[int], pad_id: int) -> list[list[float]]:
    """log p(next token = id | prompt) for each given id, per prompt: [B][len(ids)] (fp32 log_softmax)."""
    input_ids, mask = left_pad(prompts, pad_id)
    logits = model(
        input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
        position_ids=positions_from_mask(mask).to(model.device), logits_to_keep=1,
    ).logits[:, -1]  # [B, V]
    return torch.log_softmax(logits.float(), dim=-1)[:, ids].tolist()
