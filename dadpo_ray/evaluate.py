"""Evaluation stage: each candidate model answers the held-out prompts; a judge compares with the teacher.

    dadpo-ray eval --config CFG [overrides]      (the CLI calls `evaluate_from_config`)

    eval rows of the dataset (driver: refuse an empty eval split and eval prompts that repeat training prompts)
      -> per candidate, Ray Data: CandidateAnswerer pool -> TeacherJudge pool   (see dadpo_ray.eval_actors)
      -> judge='openai': the endpoint judges on the driver, with threads and a verdict cache
    out_dir/answered/<candidate>.jsonl   each candidate's pipeline output, stamped with a hash of the model (and
                            its files), the data and the settings: a rerun with nothing changed reuses it, so the
                            same answers meet the endpoint's verdict cache (e.g. after the endpoint failed)
    out_dir/answers.jsonl   one line per (candidate, prompt): both answers, proxies, both orders' verdicts
    out_dir/results.json    per candidate: wins/ties/losses, rates with bootstrap 95% intervals, proxies;
                            written last and atomically, so its presence means the eval finished

Offline proxies, always computed (no judge needed), token-weighted over all held-out prompts:
    teacher_nll      -sum log p_teacher(answer) / answer tokens: how teacher-like the candidate's own answers are
    top1_agreement   share of the teacher's answer tokens where argmax_candidate == argmax_teacher (top-k row 0)
    kl_teacher       KL(teacher || candidate) on the teacher's answers, top-k + tail bucket (losses.topk_kl_from_logps)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from dadpo_ray.config import ModelSpec, RecipeConfig
from dadpo_ray.errors import DadpoError
from dadpo_ray.eval_actors import CandidateAnswerer, TeacherJudge, answer_settings
from dadpo_ray.records import Manifest, check_tokenizer, open_dataset, read_rows
from dadpo_ray.verdicts import (
    CANDIDATE_FIRST, TEACHER_FIRST, combine_logprobs, combine_orders, judge_messages, ordered_answers, summarize,
)

RESULTS_NAME = "results.json"
ANSWERS_NAME = "answers.jsonl"
_COLUMNS = ["id", "split", "prompt_messages", "prompt_ids", "chosen_ids", "chosen_text", "chosen_topk_ids",
            "chosen_topk_logprobs"]


def _prompt_key(messages: list[dict]) -> tuple:
    """Two prompts are the same when their turns match up to whitespace."""
    return tuple((m["role"], " ".join(m["content"].split())) for m in messages)


def held_out_rows(rows: list[dict], data_dir: str) -> list[dict]:
    """The eval-split rows; refuses an empty eval split and eval prompts that also appear as training prompts."""
    train = {_prompt_key(r["prompt_messages"]): r["id"] for r in rows if r["split"] == "train"}
    held_out = [r for r in rows if r["split"] == "eval"]
    if not held_out:
        raise DadpoError(f"{data_dir}: the dataset has no eval rows (prompts.eval_fraction > 0 holds some out)")
    overlap = [(r["id"], train[k]) for r in held_out if (k := _prompt_key(r["prompt_messages"])) in train]
    if overlap:
        examples = ", ".join(f"eval {e} = train {t}" for e, t in overlap[:3])
        raise DadpoError(f"{data_dir}: {len(overlap)} of {len(held_out)} eval prompts are also training prompts "
                         f"({examples}); deduplicate the prompt set and regenerate, or results would be inflated")
    return sorted(held_out, key=lambda r: r["id"])


def _check_models(cfg: RecipeConfig, manifest: Manifest, data_dir: str, candidates: dict[str, ModelSpec]) -> None:
    """Every candidate's and the teacher's tokenizer loads (an error names the model) and is the dataset's."""
    from dadpo_ray.models import load_tokenizer, resolve_model_path, vocab_fingerprint

    if not candidates:
        raise DadpoError("eval: no candidate models to evaluate")
    for name, spec in {"teacher": cfg.models.teacher, **candidates}.items():
        local = Path(resolve_model_path(spec)).expanduser()
        if local.is_dir() and not ((local / "config.json").exists() and any(local.glob("*.safetensors"))):
            raise DadpoError(f"model {spec.path} ({name}): not a loadable model dir (needs config.json and "
                             "*.safetensors weights)")
        fp = vocab_fingerprint(load_tokenizer(spec))
        check_tokenizer(manifest, fp.size, fp.sha256, f"{data_dir} vs model {spec.path} ({name})")
    if cfg.eval.judge == "llm" and cfg.eval.judge_model is not None:
        load_tokenizer(cfg.eval.judge_model)  # any vocabulary: the judge reads text


def answer_and_score(cfg: RecipeConfig, rows: list[dict], name: str, spec: ModelSpec) -> list[dict]:
    """One Ray Data pipeline: the candidate answers, the teacher scores (and the llm judge judges)."""
    import ray
    from ray.data import ActorPoolStrategy

    ev = cfg.eval
    config = cfg.model_dump(mode="json")
    stages = [(CandidateAnswerer, ev.candidate_pool, {"config": config, "spec": spec.model_dump(mode="json"),
                                                      "name": name}),
              (TeacherJudge, ev.judge_pool, {"config": config})]
    ds = ray.data.from_items(rows)
    for udf, pool, kwargs in stages:
        ds = ds.map_batches(udf, batch_size=ev.batch_size, batch_format="pyarrow", fn_constructor_kwargs=kwargs,
                            compute=ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
                            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                            max_restarts=cfg.generate.max_restarts, max_task_retries=cfg.generate.max_restarts)
    return sorted(ds.take_all(), key=lambda r: r["id"])


def _model_files(spec: ModelSpec) -> list:
    """Size and mtime of a local model dir's files: a retrained model at the same path gets a new stamp."""
    path = Path(spec.path).expanduser()
    if not path.is_dir():
        return []
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())


def _answers_stamp(cfg: RecipeConfig, spec: ModelSpec, manifest: Manifest, rows: list[dict]) -> str:
    ev, settings = cfg.eval, answer_settings(cfg)
    parts = {
        "model": spec.model_dump(mode="json"), "model_files": _model_files(spec),
        "teacher": cfg.models.teacher.model_dump(mode="json"),
        "data": [manifest.config_fingerprint, manifest.created_at, [r["id"] for r in rows]],
        "sampling": [settings.temperature, settings.top_p, settings.seed, settings.max_new_tokens],
        "judge": [ev.judge, ev.judge_model and ev.judge_model.model_dump(mode="json"), ev.tie_margin]
        if ev.judge == "llm" else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def answers_of(cfg: RecipeConfig, manifest: Manifest, rows: list[dict], name: str, spec: ModelSpec,
               out: Path) -> list[dict]:
    """The candidate's answered rows: reused from `out/answered/` when the stamp matches, else computed."""
    path = out / "answered" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".jsonl")
    stamp = _answers_stamp(cfg, spec, manifest, rows)
    if path.exists():
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and json.loads(lines[0]).get("stamp") == stamp:
            print(f"eval: {name}: reusing the answers in {path}", flush=True)
            return [json.loads(line) for line in lines[1:] if line]
    answered = answer_and_score(cfg, rows, name, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"stamp": stamp})] + [json.dumps(row, ensure_ascii=False) for row in answered]
    _write_atomically(path, "".join(line + "\n" for line in lines))
    return answered


def judge_with_endpoint(cfg: RecipeConfig, out: Path, answered: dict[str, list[dict]]) -> int:
    """Fill both orders' labels of every answer from the endpoint; returns the number of requests sent."""
    from dadpo_ray.endpoint_judge import CACHE_NAME, EndpointJudge

    judge = EndpointJudge(cfg.eval, out / CACHE_NAME)
    rows = [row for name in answered for row in answered[name]]
    requests = [(judge_messages(row["prompt_messages"], *ordered_answers(order, row["teacher_answer"], row["answer"])),
                 order) for row in rows for order in (TEACHER_FIRST, CANDIDATE_FIRST)]
    verdicts = judge.judge(requests)
    for i, row in enumerate(rows):
        for j, order in enumerate((TEACHER_FIRST, CANDIDATE_FIRST)):
            v = verdicts[2 * i + j]
            row[f"{order}_label"], row[f"{order}_raw"] = v["label"] or "", v["raw"]
    return judge.requests_sent


def _outcome(cfg: RecipeConfig, row: dict) -> int | None:
    """+1 / 0 / -1 for the candidate from both orders' verdicts (see dadpo_ray.verdicts); None without a judge."""
    if cfg.eval.judge == "llm":
        return combine_logprobs(row[f"{TEACHER_FIRST}_logprobs"], row[f"{CANDIDATE_FIRST}_logprobs"],
                                cfg.eval.tie_margin, cfg.eval.tie_label)
    if cfg.eval.judge == "openai":
        return combine_orders(row[f"{TEACHER_FIRST}_label"] or None, row[f"{CANDIDATE_FIRST}_label"] or None)
    return None


def _candidate_results(cfg: RecipeConfig, spec: ModelSpec, rows: list[dict]) -> dict:
    judged = cfg.eval.judge != "none"
    outcomes = [row["outcome"] for row in rows] if judged else []
    answer_tokens = sum(len(r["answer_ids"]) for r in rows)
    teacher_tokens = sum(r["teacher_answer_tokens"] for r in rows)
    return {
        "model": spec.path, **summarize(outcomes, cfg.eval.bootstrap, cfg.eval.seed),
        "unparseable": sum(not r.get(f"{o}_label") for r in rows for o in (TEACHER_FIRST, CANDIDATE_FIRST))
        if judged else 0,
        "teacher_nll": -sum(r["teacher_logp"] for r in rows) / max(answer_tokens, 1),
        "top1_agreement": sum(r["top1_matches"] for r in rows) / max(teacher_tokens, 1),
        "kl_teacher": sum(r["kl_sum"] for r in rows) / max(teacher_tokens, 1),
        "answer_tokens_mean": answer_tokens / len(rows),
        "answers_cut_at_max_tokens": sum(r["answer_finish"] == "length" for r in rows),
    }


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def evaluate(cfg: RecipeConfig, data_dir: str, out_dir: str, candidates: dict[str, ModelSpec]) -> dict:
    """Evaluate each candidate (display name -> model) on the dataset's eval rows; writes and returns results."""
    started = time.time()
    if "://" in out_dir:
        raise DadpoError(f"{out_dir}: eval writes to a local or shared filesystem path, not a URI")
    manifest = open_dataset(data_dir)
    rows = held_out_rows(read_rows(data_dir, manifest.files, columns=_COLUMNS).to_pylist(), data_dir)
    _check_models(cfg, manifest, data_dir, candidates)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_NAME).unlink(missing_ok=True)  # present only once this run has finished
    ev = cfg.eval
    print(f"eval: {len(rows)} held-out prompts, {len(candidates)} candidates ({', '.join(candidates)}), "
          f"judge {ev.judge}", flush=True)

    answered = {name: answers_of(cfg, manifest, rows, name, spec, out) for name, spec in candidates.items()}
    requests_sent = judge_with_endpoint(cfg, out, answered) if ev.judge == "openai" else 0
    for name, answers in answered.items():
        for row in answers:
            row["candidate"] = name
            row["outcome"] = _outcome(cfg, row)
    lines = [json.dumps({k: v for k, v in row.items() if k not in ("prompt_ids", "answer_ids")}, ensure_ascii=False)
             for name in answered for row in answered[name]]
    _write_atomically(out / ANSWERS_NAME, "".join(line + "\n" for line in lines))

    judge = {"llm": (ev.judge_model or cfg.models.teacher).path, "openai": f"{ev.endpoint_model} at {ev.endpoint}",
             "none": None}[ev.judge]
    results = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "judge": ev.judge, "judge_model": judge, "data_dir": data_dir, "eval_prompts": len(rows),
        "teacher": cfg.models.teacher.path, "max_new_tokens": answer_settings(cfg).max_new_tokens,
        "bootstrap": ev.bootstrap, "endpoint_requests": requests_sent,
        "candidates": {name: _candidate_results(cfg, candidates[name], answered[name]) for name in answered},
    }
    _write_atomically(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    print(f"eval: wrote {out / RESULTS_NAME} in {time.time() - started:.1f}s", flush=True)
    return results


def default_candidates(cfg: RecipeConfig) -> dict[str, ModelSpec]:
    """The student before training, the trained student (if `<run_dir>/model` exists), and eval.compare."""
    candidates = {"student before": cfg.models.student}
    trained = Path(cfg.run_dir) / "model"
    if trained.is_dir():
        candidates["student after"] = ModelSpec(path=str(trained.resolve()), dtype=cfg.models.student.dtype)
    for spec in cfg.eval.compare:
        candidates[spec.path] = spec
    return candidates


def evaluate_from_config(cfg: RecipeConfig, candidates: dict[str, ModelSpec] | None = None) -> dict:
    """`dadpo-ray eval`: the dataset under `<run_dir>/data`, outputs under `<run_dir>/eval`."""
    return evaluate(cfg, str(Path(cfg.run_dir) / "data"), str(Path(cfg.run_dir) / "eval"),
                    candidates if candidates is not None else default_candidates(cfg))
