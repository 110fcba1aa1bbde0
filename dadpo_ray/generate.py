"""Generation stage: one Ray Data pipeline from prompts to the preference dataset training reads.

    prompts (driver: validate, template, split, skip ids already written)
      -> StudentSampler   actor pool, student (+ reference) model: y_s (rejected) and its reference log-prob
      -> TeacherScorer    actor pool, teacher + reference model:   y_t (chosen) with the teacher's log-prob and
                          top-k, the teacher's log-prob of y_s (and its top-k if configured), the reference's of y_t
      -> write_shard      tasks: validate rows, write one Parquet shard atomically, named by its ids
    manifest.json (driver, last: its presence means the dataset is complete)

A model scores its own samples from the raw logits of the same generate() call (`sample_and_score`), so beyond
sampling a batch costs two forward passes (the teacher over y_s, the reference over y_t), not four. The reference
is by default the student itself: the student pool then loads nothing more. Resume: shards are idempotent and
named by a hash of their ids, so a rerun of the same command skips every id already on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter

import pyarrow as pa

from dadpo_ray.config import RecipeConfig
from dadpo_ray.errors import DadpoError
from dadpo_ray.records import (
    Manifest, ModelRecord, delete, list_names, list_shards, read_rows, read_text, row_problems, rows_to_table,
    write_manifest, write_rejects, write_shard, write_text,
)

RUN_STAMP = "generation.json"  # the config fingerprint a partial dataset was started with


def _seed(base: int, ids: list[str]) -> int:
    """Per-batch sampling seed from the config seed and the batch's ids (stable across reruns)."""
    return int(hashlib.sha256(f"{base}:{','.join(ids)}".encode()).hexdigest()[:8], 16)


def _threads(num_cpus: float) -> int:
    return max(1, int(num_cpus))


# ------------------------------------------------------------------------------------ Ray Data UDF classes
class StudentSampler:
    """Loads the student once per actor (and the reference, when it is another model); samples the rejected
    answer y_s for each prompt and its reference log-prob."""

    def __init__(self, config: dict):
        from dadpo_ray.engines import make_engine

        self.cfg = RecipeConfig.model_validate(config)
        gen, models = self.cfg.generate, self.cfg.models
        threads = _threads(gen.student_pool.num_cpus)
        self.engine = make_engine(gen.backend, models.student, threads)
        self.reference = None if models.reference is None else make_engine(gen.backend, models.reference, threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        gen = self.cfg.generate
        rows = batch.to_pylist()
        prompts, seed = [r["prompt_ids"] for r in rows], _seed(gen.seed, [r["id"] for r in rows])
        if self.reference is None:  # the student is the reference: it scores its samples as it draws them
            samples, ref_scores = self.engine.sample_and_score(prompts, gen, seed, None)
        else:
            samples = self.engine.sample(prompts, gen, seed)
            ref_scores = self.reference.score(prompts, [ids for ids, _ in samples], None)
        for row, (ids, finish), ref in zip(rows, samples, ref_scores):
            row.update(rejected_ids=ids, rejected_finish=finish, ref_rejected_logp=ref.logp,
                       rejected_text=self.engine.tokenizer.decode(ids, skip_special_tokens=True))
        return pa.Table.from_pylist(rows)


class TeacherScorer:
    """Loads the teacher and the reference once per actor; samples y_t (the teacher scores it as it draws it),
    scores y_s under the teacher and y_t under the reference."""

    def __init__(self, config: dict):
        from dadpo_ray.engines import make_engine

        self.cfg = RecipeConfig.model_validate(config)
        gen, models = self.cfg.generate, self.cfg.models
        threads = _threads(gen.teacher_pool.num_cpus)
        self.teacher = make_engine(gen.backend, models.teacher, threads)
        self.reference = make_engine(gen.backend, models.reference_or_student(), threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        gen = self.cfg.generate
        rows = batch.to_pylist()
        prompts = [r["prompt_ids"] for r in rows]
        samples, t_chosen = self.teacher.sample_and_score(prompts, gen, _seed(gen.seed + 1, [r["id"] for r in rows]),
                                                          gen.topk)
        chosen = [ids for ids, _ in samples]
        rejected = [r["rejected_ids"] for r in rows]
        t_rejected = self.teacher.score(prompts, rejected, gen.topk if gen.topk_for_rejected else None)
        r_chosen = self.reference.score(prompts, chosen, None)
        for i, row in enumerate(rows):
            row.update(
                chosen_ids=chosen[i], chosen_finish=samples[i][1],
                chosen_text=self.teacher.tokenizer.decode(chosen[i], skip_special_tokens=True),
                teacher_chosen_logp=t_chosen[i].logp, teacher_rejected_logp=t_rejected[i].logp,
                ref_chosen_logp=r_chosen[i].logp,
                chosen_topk_ids=t_chosen[i].topk_ids, chosen_topk_logprobs=t_chosen[i].topk_logprobs,
                rejected_topk_ids=t_rejected[i].topk_ids, rejected_topk_logprobs=t_rejected[i].topk_logprobs,
            )
        return rows_to_table(rows)


def write_batch(batch: pa.Table, out_dir: str, k: int) -> pa.Table:
    """Validate rows against the contract, write the good ones as one shard; report shard, count and rejects."""
    good, rejects = [], []
    for row in batch.to_pylist():
        problems = row_problems(row, k)
        if problems:
            rejects.append({"id": row["id"], "reason": "breaks the data contract", "detail": "; ".join(problems)})
        else:
            good.append(row)
    name = ""
    if good:
        digest = hashlib.sha256("\n".join(sorted(r["id"] for r in good)).encode()).hexdigest()[:20]
        name = write_shard(out_dir, f"part-{digest}.parquet", good)
    tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in batch.to_pylist())
    return pa.Table.from_pylist([{"shard": name, "rows": len(good), "tokens": tokens,
                                  "rejects": json.dumps(rejects)}])


# -------------------------------------------------------------------------------------------------- driver
def _check_before_start(cfg: RecipeConfig):
    """Everything that can be refused without an actor: models exist, one vocabulary, k fits it."""
    from dadpo_ray.models import check_same_vocab, load_tokenizer

    named = {"teacher": cfg.models.teacher, "student": cfg.models.student}
    if cfg.models.reference is not None:
        named["reference"] = cfg.models.reference
    tokenizers = {name: load_tokenizer(spec) for name, spec in named.items()}
    fingerprint = check_same_vocab(tokenizers)
    if cfg.generate.topk > fingerprint.size:
        raise DadpoError(f"generate.topk={cfg.generate.topk} is larger than the vocabulary ({fingerprint.size})")
    return tokenizers["student"], fingerprint


def _prepare_out_dir(out: str, fingerprint: str, overwrite: bool) -> None:
    names = list_names(out)
    stamp = read_text(out, RUN_STAMP)
    existing = json.loads(stamp)["config_fingerprint"] if stamp else None
    if names and existing != fingerprint:
        if not overwrite:
            raise DadpoError(
                f"{out}: holds a dataset made with a different config (fingerprint {existing}, now {fingerprint}); "
                "pass --overwrite to replace it or choose another output dir"
            )
        delete(out)
    delete(out, [n for n in list_names(out) if ".tmp-" in n])  # leftovers of writes killed mid-way
    write_text(out, RUN_STAMP, json.dumps({"config_fingerprint": fingerprint}))


def _template(prompts, tokenizer, max_prompt_tokens: int):
    rows, rejects = [], []
    for p in prompts:
        ids = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, return_dict=False)
        if len(ids) > max_prompt_tokens:
            rejects.append({"id": p.id, "reason": "prompt too long",
                            "detail": f"{len(ids)} tokens after templating > generate.max_prompt_tokens"})
            continue
        rows.append({"id": p.id, "split": p.split, "prompt_messages": p.messages, "prompt_ids": ids})
    return rows, rejects


def generate(cfg: RecipeConfig, out_dir: str, overwrite: bool = False) -> Manifest:
    """Run the generation pipeline into `out_dir` (local dir or pyarrow URI); returns the manifest it wrote."""
    import ray
    from ray.data import ActorPoolStrategy

    from dadpo_ray.prompts import load_prompts

    started = time.time()
    gen = cfg.generate
    tokenizer, vocab = _check_before_start(cfg)
    fingerprint = cfg.fingerprint("models", "prompts", "generate")
    out = out_dir if "://" in out_dir else os.path.abspath(out_dir)  # local dir or a pyarrow URI (s3://...)
    _prepare_out_dir(out, fingerprint, overwrite)

    prompts, rejects = load_prompts(cfg.prompts)
    rows, too_long = _template(prompts, tokenizer, gen.max_prompt_tokens)
    rejects += too_long
    done = set(read_rows(out, columns=["id"]).column("id").to_pylist())
    todo = sorted((r for r in rows if r["id"] not in done), key=lambda r: len(r["prompt_ids"]))  # less padding
    print(f"generate: {len(rows)} prompts, {len(done)} already on disk, {len(todo)} to go, "
          f"{len(rejects)} set aside", flush=True)

    tokens = 0
    if todo:
        config = cfg.model_dump(mode="json")
        retry = dict(max_restarts=gen.max_restarts, max_task_retries=gen.max_restarts)
        pools = [(StudentSampler, gen.student_pool), (TeacherScorer, gen.teacher_pool)]
        ds = ray.data.from_items(todo)
        for udf, pool in pools:
            ds = ds.map_batches(
                udf, batch_size=gen.batch_size, batch_format="pyarrow", fn_constructor_kwargs={"config": config},
                compute=ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
                num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, **retry,
            )
        # The writer is I/O: it reserves no CPU, so shards land while the two pools hold every core
        # (with a CPU share it waited for the pools to finish, and a killed run lost all its work).
        ds = ds.map_batches(write_batch, batch_size=gen.rows_per_shard, batch_format="pyarrow",
                            fn_kwargs={"out_dir": out, "k": gen.topk}, num_cpus=0)
        for result in ds.iter_rows():
            tokens += result["tokens"]
            rejects += json.loads(result["rejects"])

    files = list_shards(out)
    table = read_rows(out, files, columns=["id", "split"])
    ids = table.column("id").to_pylist()
    if len(ids) != len(set(ids)):
        dupes = [i for i, n in Counter(ids).items() if n > 1]
        raise RuntimeError(f"{out}: ids written twice: {dupes[:5]}")  # a bug, never bad input
    write_rejects(out, rejects)
    reasons = Counter(r["reason"] for r in rejects)
    m = cfg.models
    manifest = Manifest(
        config_fingerprint=fingerprint,
        teacher=ModelRecord(path=m.teacher.path, revision=m.teacher.revision),
        student=ModelRecord(path=m.student.path, revision=m.student.revision),
        reference=ModelRecord(path=m.reference_or_student().path, revision=m.reference_or_student().revision),
        vocab_size=vocab.size, vocab_hash=vocab.sha256, topk=gen.topk, topk_for_rejected=gen.topk_for_rejected,
        generation={"backend": gen.backend, "temperature": gen.temperature, "top_p": gen.top_p,
                    "max_new_tokens": gen.max_new_tokens, "max_prompt_tokens": gen.max_prompt_tokens,
                    "seed": gen.seed, "topk_temperature": 1.0},
        rows=dict(Counter(table.column("split").to_pylist())), rejected_rows=len(rejects),
        rejected_reasons=dict(reasons), files=files,
    )
    write_manifest(out, manifest)
    wall = time.time() - started
    print(f"generate: wrote {len(ids)} rows ({manifest.rows}) in {len(files)} shards to {out}; "
          f"{len(rejects)} rejected {dict(reasons)}; {tokens} tokens generated this run, "
          f"{tokens / wall:.1f} tokens/s, {wall:.1f}s wall", flush=True)
    return manifest
