"""The evaluation's Ray Data UDFs: plain classes that load their models once and transform a batch of rows.

    eval rows -> CandidateAnswerer  (one per evaluated model) answers each held-out prompt, and on the
                                    teacher's held-out answer gives its log-probs at the teacher's top-k ids
                                    (-> top-1 agreement and KL(teacher || candidate))
              -> TeacherJudge       the teacher scores each answer (-> per-token NLL); with judge='llm' the judge
                                    model compares it with the teacher's answer in both orders

Both run on the HF engine: the proxies need log-probs at given ids, which only the HF engine gives.
Labels are strings in the rows ("" = unparseable), so every block has the same Arrow types.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import torch

from dadpo_ray.config import GenerateConfig, ModelSpec, RecipeConfig
from dadpo_ray.errors import DadpoError
from dadpo_ray.losses import topk_kl_from_logps
from dadpo_ray.scoring import logprobs_at_ids, next_token_logprobs
from dadpo_ray.verdicts import LABELS, ORDERS, PREFILL, judge_messages, label_from_logprobs, ordered_answers


def answer_settings(cfg: RecipeConfig) -> GenerateConfig:
    """Generation's sampling settings with the eval's answer length cap."""
    return cfg.generate.model_copy(update={"max_new_tokens": cfg.eval.max_new_tokens or cfg.generate.max_new_tokens})


def _seed(base: int, name: str, ids: list[str]) -> int:
    """Per-batch sampling seed from the config seed, the candidate's name and the batch's ids."""
    return int(hashlib.sha256(f"{base}:{name}:{','.join(ids)}".encode()).hexdigest()[:8], 16)


class CandidateAnswerer:
    """Loads one evaluated model once per actor; answers the prompts and reads it on the teacher's answers."""

    def __init__(self, config: dict, spec: dict, name: str):
        from dadpo_ray.engines import HFEngine

        self.cfg = RecipeConfig.model_validate(config)
        self.name = name
        self.engine = HFEngine(ModelSpec.model_validate(spec), max(1, int(self.cfg.eval.candidate_pool.num_cpus)))
        self.settings = answer_settings(self.cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prompts = [r["prompt_ids"] for r in rows]
        samples = self.engine.sample(prompts, self.settings, _seed(self.settings.seed, self.name, [r["id"] for r in rows]))
        teacher_answers = [r["chosen_ids"] for r in rows]
        at_ids = logprobs_at_ids(self.engine.model, prompts, teacher_answers, [r["chosen_topk_ids"] for r in rows],
                                 self.engine.tokenizer.pad_token_id)
        out = []
        for row, (ids, finish), at in zip(rows, samples, at_ids):
            n = len(row["chosen_ids"])
            kl = topk_kl_from_logps(torch.tensor(at.logprobs), torch.tensor(row["chosen_topk_logprobs"]), tail=True)
            out.append({
                "id": row["id"], "prompt_messages": row["prompt_messages"], "prompt_ids": row["prompt_ids"],
                "teacher_answer": row["chosen_text"], "answer_ids": ids, "answer_finish": finish,
                "answer": self.engine.tokenizer.decode(ids, skip_special_tokens=True),
                "teacher_answer_tokens": n, "kl_sum": kl.item() * n,
                "top1_matches": sum(own == top[0] for own, top in zip(at.top1, row["chosen_topk_ids"])),
            })
        return pa.Table.from_pylist(out)


def label_token_ids(tokenizer, judge_name: str) -> tuple[list[int], list[int]]:
    """(ids appended after the judge's chat prompt, one next-token id per label).

    The prompt ends with PREFILL; a label is " A" / " B" / " C". Tokens the three labels share (a byte-level
    tokenizer's space) go into the prompt, so the verdict is the next token's distribution over three ids.
    """
    prefill = tokenizer.encode(PREFILL, add_special_tokens=False)
    tails = []
    for label in LABELS:
        full = tokenizer.encode(f"{PREFILL} {label}", add_special_tokens=False)
        if full[: len(prefill)] != prefill:
            raise DadpoError(f"judge model {judge_name}: '{PREFILL} {label}' does not tokenize as '{PREFILL}' + label")
        tails.append(full[len(prefill):])
    shared = 0
    while all(len(t) > shared + 1 for t in tails) and len({tuple(t[: shared + 1]) for t in tails}) == 1:
        shared += 1
    if any(len(t) != shared + 1 for t in tails) or len({t[shared] for t in tails}) != len(LABELS):
        raise DadpoError(f"judge model {judge_name}: the labels {LABELS} are not distinct single tokens after "
                         f"'{PREFILL}'; choose another judge model or judge='openai'")
    return prefill + tails[0][:shared], [t[shared] for t in tails]


class TeacherJudge:
    """Loads the teacher (and the judge model, when judge='llm' and it is another model) once per actor."""

    def __init__(self, config: dict):
        from dadpo_ray.engines import HFEngine

        self.cfg = RecipeConfig.model_validate(config)
        threads = max(1, int(self.cfg.eval.judge_pool.num_cpus))
        self.teacher = HFEngine(self.cfg.models.teacher, threads)
        self.judge = None
        if self.cfg.eval.judge == "llm":
            spec = self.cfg.eval.judge_model
            self.judge = self.teacher if spec in (None, self.cfg.models.teacher) else HFEngine(spec, threads)
            self.judge_name = (spec or self.cfg.models.teacher).path
            self.suffix, self.label_ids = label_token_ids(self.judge.tokenizer, self.judge_name)

    def _judge_prompt(self, row: dict, order: str) -> list[int]:
        first, second = ordered_answers(order, row["teacher_answer"], row["answer"])
        chat = judge_messages(row["prompt_messages"], first, second)
        ids = self.judge.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        return list(ids) + self.suffix

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        scored = self.teacher.score([r["prompt_ids"] for r in rows], [r["answer_ids"] for r in rows], None)
        for row, s in zip(rows, scored):
            row["teacher_logp"] = s.logp
        if self.judge is not None:
            prompts = [self._judge_prompt(row, order) for row in rows for order in ORDERS]  # [2B], row-major
            logprobs = next_token_logprobs(self.judge.model, prompts, self.label_ids, self.judge.tokenizer.pad_token_id)
            for i, row in enumerate(rows):
                for j, order in enumerate(ORDERS):
                    lp = logprobs[2 * i + j]
                    row[f"{order}_label"] = label_from_logprobs(lp, self.cfg.eval.tie_margin) or ""
                    row[f"{order}_raw"] = " ".join(f"{label}={x:.4f}" for label, x in zip(LABELS, lp))
                    row[f"{order}_logprobs"] = lp
        return pa.Table.from_pylist(rows)
