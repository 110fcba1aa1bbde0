"""One collate function: data-contract rows -> the tensors of one training micro batch.

Layout of a batch of B pairs (S = 2B sequences, or S = B when the rejected side is not needed):

    rows 0..B-1     prompt + chosen (teacher) response
    rows B..2B-1    prompt + rejected (student) response
    input_ids       [S, L] right-padded; L = the longest sequence of the batch
    attention_mask  [S, L]
    target_ids      [S, L] input_ids shifted left: position t holds token t + 1 (the token it predicts)
    response_mask   [S, L] True where position t predicts a response token, i.e. t in
                    [len(prompt) - 1, len(prompt) + len(response) - 2]
    ref_logps, teacher_logps   [S] summed log-probs of each response from the dataset
    topk_ids, topk_logprobs    [Nc, K] the teacher's top-k for the chosen response tokens, flattened in
                    row-major order, i.e. the same order as `response_mask[:B]` selects positions

Alignment (records.py): top-k row j of a response predicts response token j from position len(prompt) + j - 1,
which is exactly the j-th True of that row's `response_mask`.

Pairs are never truncated: the dataset's summed reference/teacher log-probs cover the whole response, and a cut
response would compare the student's partial sum with them. `fits` tells the driver which rows to skip (counted
and logged) when prompt + response is longer than train.max_seq_len.
"""

from __future__ import annotations

import torch

# Columns the training loop reads; the text columns stay on disk.
TRAIN_COLUMNS = [
    "id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logp", "ref_rejected_logp",
    "teacher_chosen_logp", "teacher_rejected_logp", "chosen_topk_ids", "chosen_topk_logprobs",
]


def fits(row: dict, max_seq_len: int) -> bool:
    """Both prompt + chosen and prompt + rejected fit in max_seq_len tokens."""
    prompt = len(row["prompt_ids"])
    return prompt + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_seq_len


def collate(rows: list[dict], pad_id: int, with_rejected: bool = True, with_topk: bool = True) -> dict:
    """Rows of the data contract -> tensors (see the module docstring for the layout)."""
    sides = ["chosen", "rejected"] if with_rejected else ["chosen"]
    sequences, prompt_lens = [], []
    for side in sides:
        for row in rows:
            sequences.append(list(row["prompt_ids"]) + list(row[f"{side}_ids"]))
            prompt_lens.append(len(row["prompt_ids"]))
    length = max(len(s) for s in sequences)
    count = len(sequences)

    input_ids = torch.full((count, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((count, length), dtype=torch.long)
    response_mask = torch.zeros((count, length), dtype=torch.bool)
    for i, (seq, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        response_mask[i, prompt_len - 1 : len(seq) - 1] = True  # positions predicting response tokens
    target_ids = torch.full_like(input_ids, pad_id)
    target_ids[:, :-1] = input_ids[:, 1:]  # [S, L]: position t predicts token t + 1

    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "target_ids": target_ids,
        "response_mask": response_mask,
        "ref_logps": torch.tensor([r[f"ref_{s}_logp"] for s in sides for r in rows], dtype=torch.float32),
        "teacher_logps": torch.tensor([r[f"teacher_{s}_logp"] for s in sides for r in rows], dtype=torch.float32),
    }
    if with_topk:
        batch["topk_ids"] = torch.tensor(
            [k for r in rows for k in r["chosen_topk_ids"]], dtype=torch.long)          # [Nc, K]
        batch["topk_logprobs"] = torch.tensor(
            [k for r in rows for k in r["chosen_topk_logprobs"]], dtype=torch.float32)  # [Nc, K]
    return batch


def sequence_sums(token_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [N] (row-major over response_mask [S, L]) -> summed per sequence [S]."""
    rows = torch.arange(response_mask.shape[0], device=response_mask.device)
    row_of_token = rows[:, None].expand_as(response_mask)[response_mask]  # [N]
    sums = torch.zeros(response_mask.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, row_of_token, token_logps)  # [S]
