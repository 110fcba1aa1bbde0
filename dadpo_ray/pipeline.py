"""`dadpo-ray run`: the whole recipe from one YAML, under one run dir.

    <run_dir>/student-pruned/   prune     (prune.enabled)   the student, width-pruned from the teacher
    <run_dir>/dsft/             dSFT      (dsft.enabled)    the student fine-tuned on the teacher's answers
    <run_dir>/data/             generate                    the preference dataset (Parquet + manifest.json)
    <run_dir>/train/, model/    train                       Ray Train run dir, the exported student
    <run_dir>/ddpo/             baseline  (--compare)       the same training with b2 = 0 (dDPO)
    <run_dir>/eval/             eval                        answers, verdicts, results.json
    <run_dir>/report.md|html    report

Every stage writes its output atomically and is skipped when that output is already complete, so rerunning the
same command after a failure resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from dadpo_ray.config import ModelSpec, RecipeConfig, save_config
from dadpo_ray.errors import DadpoError
from dadpo_ray.records import MANIFEST_NAME, read_manifest, read_text


class StageClock:
    """Prints and keeps the wall time of each stage (the demo shows them; the report lists them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, done: bool = False):
        if done:
            print(f"[{name}] already complete, skipped", flush=True)
            self.seconds[name] = 0.0
            yield False
            return
        print(f"[{name}] starting", flush=True)
        started = time.time()
        yield True
        self.seconds[name] = time.time() - started
        print(f"[{name}] done in {self.seconds[name]:.0f}s", flush=True)


def dataset_complete(data_dir: Path, cfg: RecipeConfig) -> bool:
    if read_text(str(data_dir), MANIFEST_NAME) is None:
        return False
    return read_manifest(str(data_dir)).config_fingerprint == cfg.fingerprint("models", "prompts", "generate")


def with_student(cfg: RecipeConfig, path: Path) -> RecipeConfig:
    """The recipe with a new starting student; it is also the DPO reference unless one was set explicitly."""
    student = cfg.models.student.model_copy(update={"path": str(path), "revision": None})
    return cfg.model_copy(update={"models": cfg.models.model_copy(update={"student": student})}, deep=True)


def with_train(cfg: RecipeConfig, name: str, **train_updates) -> RecipeConfig:
    """A variant of the recipe for a second training run (baseline, dSFT) under its own run name."""
    loss = cfg.train.loss.model_copy(update=train_updates.pop("loss", {}))
    train = cfg.train.model_copy(update={"loss": loss, **train_updates})
    return cfg.model_copy(update={"name": name, "train": train}, deep=True)


def prune_student(cfg: RecipeConfig, out: Path) -> None:
    from dadpo_ray.models import load_model, load_tokenizer
    from dadpo_ray.prompts import load_prompts
    from dadpo_ray.prune import prune_model, save_pruned

    tokenizer, model = load_tokenizer(cfg.models.student), load_model(cfg.models.student, dtype="float32")
    prompts, _ = load_prompts(cfg.prompts)
    calibration = [
        tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
        for p in prompts[: cfg.prune.calibration_prompts]
    ]
    model, report = prune_model(model, cfg.prune.ratio, score=cfg.prune.score, calibration=calibration,
                                tokenizer=tokenizer, prune_heads=cfg.prune.prune_heads)
    save_pruned(model, tokenizer, out)
    print(f"[prune] {report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({cfg.prune.score}, ratio {cfg.prune.ratio})", flush=True)


def run_recipe(cfg: RecipeConfig, compare_ddpo: bool = False) -> dict:
    """Run every stage whose output is missing; returns the eval results, stage times and report path."""
    from dadpo_ray.evaluate import evaluate
    from dadpo_ray.generate import generate
    from dadpo_ray.report import write_report
    from dadpo_ray.train import train

    if "://" in cfg.run_dir:
        raise DadpoError(f"run_dir {cfg.run_dir}: the recipe writes its run dir with file I/O from every Ray node; "
                         "use a local or shared-filesystem path (only `dadpo-ray generate --out` takes a URI)")
    run_dir = Path(cfg.run_dir).resolve()
    save_config(cfg, run_dir / "config.yaml")
    clock = StageClock()
    teacher = cfg.models.teacher

    if cfg.prune.enabled:
        pruned = run_dir / "student-pruned"
        with clock.stage("prune", done=pruned.exists()) as todo:
            if todo:
                prune_student(cfg, pruned)
        cfg = with_student(cfg, pruned)

    if cfg.dsft.enabled:  # Zephyr-style: SFT on the teacher's answers, then sample from the SFT student
        sft_dir = run_dir / "dsft"
        sft_cfg = with_train(cfg, f"{cfg.name}-dsft", loss={"preset": "dsft"}, epochs=cfg.dsft.epochs,
                             lr=cfg.dsft.lr)
        with clock.stage("dsft generate", done=dataset_complete(sft_dir / "data", cfg)) as todo:
            if todo:
                generate(cfg, str(sft_dir / "data"))
        with clock.stage("dsft train", done=(sft_dir / "model").exists()) as todo:
            if todo:
                train(sft_cfg, str(sft_dir / "data"), str(sft_dir))
        cfg = with_student(cfg, sft_dir / "model")

    data = run_dir / "data"
    with clock.stage("generate", done=dataset_complete(data, cfg)) as todo:
        if todo:
            generate(cfg, str(data))
    with clock.stage("train", done=(run_dir / "model").exists()) as todo:
        if todo:
            train(cfg, str(data), str(run_dir))
    candidates = {"student before": cfg.models.student, "daDPO student": ModelSpec(path=str(run_dir / "model"))}
    metrics = {"daDPO": run_dir / "train" / cfg.name / "metrics.jsonl"}
    if compare_ddpo:
        baseline = with_train(cfg, f"{cfg.name}-ddpo", loss={"preset": "ddpo", "beta2": 0.0})
        with clock.stage("train dDPO baseline", done=(run_dir / "ddpo" / "model").exists()) as todo:
            if todo:
                train(baseline, str(data), str(run_dir / "ddpo"))
        candidates["dDPO student"] = ModelSpec(path=str(run_dir / "ddpo" / "model"))
        metrics["dDPO"] = run_dir / "ddpo" / "train" / baseline.name / "metrics.jsonl"
    candidates.update({spec.path: spec for spec in cfg.eval.compare})

    eval_dir = run_dir / "eval"
    with clock.stage("eval", done=(eval_dir / "results.json").exists()) as todo:
        if todo:
            evaluate(cfg, str(data), str(eval_dir), candidates)
    results = json.loads((eval_dir / "results.json").read_text())
    report = write_report(run_dir, cfg, results, {k: v for k, v in metrics.items() if v.exists()},
                          read_manifest(str(data)))
    return {"results": results, "stage_seconds": clock.seconds, "report": str(report), "teacher": teacher.path}
