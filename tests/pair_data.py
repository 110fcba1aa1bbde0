"""Build small data-contract datasets for training tests, without Ray: the tiny teacher and student generate
and score directly (the generation stage produces the same contract at scale)."""

from __future__ import annotations

import torch

from dadpo_ray.config import ModelSpec
from dadpo_ray.models import load_model, load_tokenizer, vocab_fingerprint
from dadpo_ray.records import Manifest, ModelRecord, write_manifest, write_shard
from dadpo_ray.scoring import score_responses

TEACHER, STUDENT = ModelSpec(path="tiny-teacher"), ModelSpec(path="tiny-student")


def _sample(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> tuple[list[int], str]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                         top_p=1.0, pad_token_id=eos_id)
    response = out[0, len(prompt):].tolist()
    if eos_id in response:
        return response[: response.index(eos_id) + 1], "stop"
    return response, "length"


def generate_rows(n_rows: int, max_new_tokens: int = 8, k: int = 4, seed: int = 0) -> list[dict]:
    """n_rows pairs: the teacher's sampled answer is chosen, the student's is rejected; scored per the contract."""
    tokenizer = load_tokenizer(TEACHER)
    teacher, student = load_model(TEACHER), load_model(STUDENT)
    torch.manual_seed(seed)
    messages = [[{"role": "user", "content": f"Tell me about number {i}."}] for i in range(n_rows)]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in messages]
    eos = tokenizer.eos_token_id
    chosen, rejected = zip(*[(_sample(teacher, p, max_new_tokens, eos), _sample(student, p, max_new_tokens, eos))
                             for p in prompts])
    chosen_ids, rejected_ids = [c[0] for c in chosen], [r[0] for r in rejected]
    pad = tokenizer.pad_token_id
    t_chosen = score_responses(teacher, prompts, chosen_ids, k, pad)
    t_rejected = score_responses(teacher, prompts, rejected_ids, None, pad)
    r_chosen = score_responses(student, prompts, chosen_ids, None, pad)  # reference = the untrained student
    r_rejected = score_responses(student, prompts, rejected_ids, None, pad)
    rows = []
    for i in range(n_rows):
        rows.append({
            "id": f"row{i:03d}", "split": "train", "prompt_messages": messages[i], "prompt_ids": prompts[i],
            "chosen_ids": chosen_ids[i], "chosen_text": tokenizer.decode(chosen_ids[i]), "chosen_finish": chosen[i][1],
            "rejected_ids": rejected_ids[i], "rejected_text": tokenizer.decode(rejected_ids[i]),
            "rejected_finish": rejected[i][1],
            "teacher_chosen_logp": t_chosen[i].logp, "teacher_rejected_logp": t_rejected[i].logp,
            "ref_chosen_logp": r_chosen[i].logp, "ref_rejected_logp": r_rejected[i].logp,
            "chosen_topk_ids": t_chosen[i].topk_ids, "chosen_topk_logprobs": t_chosen[i].topk_logprobs,
            "rejected_topk_ids": None, "rejected_topk_logprobs": None,
        })
    return rows


def write_dataset(out_dir: str, rows: list[dict], k: int = 4, vocab: dict | None = None,
                  rows_per_shard: int = 8) -> Manifest:
    """Shards + manifest (written last, as the generation stage does). `vocab` overrides the fingerprint."""
    files = [write_shard(out_dir, f"part-{i // rows_per_shard:05d}.parquet", rows[i:i + rows_per_shard])
             for i in range(0, len(rows), rows_per_shard)]
    vocab = vocab or vocab_fingerprint(load_tokenizer(STUDENT)).as_dict()
    manifest = Manifest(
        config_fingerprint="tests", teacher=ModelRecord(path=TEACHER.path), student=ModelRecord(path=STUDENT.path),
        reference=ModelRecord(path=STUDENT.path), topk=k, topk_for_rejected=False,
        generation={"backend": "hf", "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 0},
        rows={"train": sum(r["split"] == "train" for r in rows), "eval": sum(r["split"] == "eval" for r in rows)},
        rejected_rows=0, rejected_reasons={}, files=files, **vocab)
    write_manifest(out_dir, manifest)
    return manifest
