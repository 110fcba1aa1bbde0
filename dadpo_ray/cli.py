"""`dadpo-ray` command line: one subcommand per stage, each a thin call into the library.

Bad input raises DadpoError; it is printed as one line (`dadpo-ray: error: ...`) with exit code 2, and a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from dadpo_ray.errors import DadpoError

EXIT_BAD_INPUT = 2
DEMO_CONFIGS = Path(__file__).parent / "configs"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys, e.g. train.lr=1e-5")


def _load(args):
    from dadpo_ray.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_generate(args) -> int:
    from dadpo_ray.generate import generate
    from dadpo_ray.ray_session import ray_session

    cfg = _load(args)
    with ray_session(cfg.ray):
        generate(cfg, args.out or f"{cfg.run_dir}/data", overwrite=args.overwrite)
    return 0


def _cmd_train(args) -> int:
    from dadpo_ray.ray_session import ray_session
    from dadpo_ray.train import train_from_config

    cfg = _load(args)
    with ray_session(cfg.ray):
        result = train_from_config(cfg)
    print(f"model: {result['model_dir']}\nmetrics: {result['metrics_file']}")
    return 0


def _cmd_eval(args) -> int:
    from dadpo_ray.evaluate import evaluate_from_config
    from dadpo_ray.ray_session import ray_session
    from dadpo_ray.records import read_manifest
    from dadpo_ray.report import format_table, write_report

    cfg = _load(args)
    with ray_session(cfg.ray):
        results = evaluate_from_config(cfg)
    report = write_report(cfg.run_dir, cfg, results, None, read_manifest(f"{cfg.run_dir}/data"))
    print(format_table(results))
    print(f"report: {report}")
    return 0


def _print_summary(result: dict) -> None:
    from dadpo_ray.report import format_table

    stages = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in result["stage_seconds"].items())
    print(f"\nstage times: {stages}")
    print(format_table(result["results"]))
    print(f"report: {result['report']}")


def _cmd_run(args) -> int:
    from dadpo_ray.pipeline import run_recipe
    from dadpo_ray.ray_session import ray_session

    cfg = _load(args)
    if args.schedule:
        from dadpo_ray.schedule import run_scheduled

        outcome = run_scheduled(cfg, compare_ddpo=args.compare)
        if outcome.result is not None:
            _print_summary(outcome.result)
        print(outcome.message)
        return 0
    with ray_session(cfg.ray):
        _print_summary(run_recipe(cfg, compare_ddpo=args.compare))
    return 0


def _cmd_demo(args) -> int:
    import time

    from dadpo_ray.config import load_config
    from dadpo_ray.pipeline import run_recipe
    from dadpo_ray.ray_session import ray_session

    name = "demo_quick" if args.quick else "demo"
    overrides = [f"run_dir={args.out}"] if args.out else []
    cfg = load_config(DEMO_CONFIGS / f"{name}.yaml", overrides + args.overrides)
    started = time.time()
    with ray_session(cfg.ray):
        result = run_recipe(cfg, compare_ddpo=args.compare)
    _print_summary(result)
    print(f"demo finished in {time.time() - started:.0f}s")
    return 0


def _cmd_prune(args) -> int:
    from dadpo_ray.config import load_config
    from dadpo_ray.pipeline import prune_student

    cfg = load_config(None, base={
        "models": {"teacher": {"path": args.model}, "student": {"path": args.model}},
        "prompts": {"source": args.calibration},
        "prune": {"enabled": True, "ratio": args.ratio, "score": args.score, "prune_heads": args.heads,
                  "calibration_prompts": args.calibration_prompts},
    })
    prune_student(cfg, Path(args.out))
    print(f"pruned model: {args.out}")
    return 0


def _cmd_check_data(args) -> int:
    from dadpo_ray.records import open_dataset, read_rows, row_problems

    manifest = open_dataset(args.data_dir)
    table = read_rows(args.data_dir, manifest.files)
    bad = [(row["id"], p) for row in table.to_pylist() for p in row_problems(row, manifest.topk)]
    for row_id, problem in bad[:20]:
        print(f"{args.data_dir}: row {row_id}: {problem}", file=sys.stderr)
    print(f"{args.data_dir}: {table.num_rows} rows, k={manifest.topk}, splits {manifest.rows}, "
          f"{manifest.rejected_rows} rejected at generation, {len(bad)} contract violations")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dadpo-ray",
        description="Distil a teacher chat model into a small student with daDPO on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad-input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole recipe offline on SmolLM2-135M (--quick: tiny models, < 2 min)")
    p.add_argument("--quick", action="store_true", help="tiny random models: the same path in under 2 minutes")
    p.add_argument("--compare", action="store_true", help="also train the dDPO baseline and add its row")
    p.add_argument("--out", help="run dir (default: ./runs/demo or ./runs/demo-quick)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override demo config keys")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="the whole recipe from one YAML: prune, dSFT, generate, train, eval, report")
    _add_config_args(p)
    p.add_argument("--compare", action="store_true", help="also train the dDPO baseline and add its row")
    p.add_argument("--schedule", action="store_true",
                   help="one scheduled tick: only prompts no earlier run consumed, a dated run dir, continue from "
                        "the last model, under a lock (exit 0 when locked or nothing is new); see schedule.py")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("generate", help="Ray Data: teacher + student actor pools -> preference Parquet with top-k")
    _add_config_args(p)
    p.add_argument("--out", help="dataset dir or URI (default: <run_dir>/data)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made with another config")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("train", help="Ray Train + DeepSpeed ZeRO student training with the daDPO loss")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="judge the student's answers against the teacher's on held-out prompts")
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("prune", help="structured width pruning of a Llama/Qwen2 model into a new model dir")
    p.add_argument("--model", required=True, help="hub id, local dir or built-in name")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of MLP channels removed (default 0.2)")
    p.add_argument("--out", required=True, help="output model dir (must not exist)")
    p.add_argument("--score", choices=["taylor", "magnitude"], default="taylor")
    p.add_argument("--heads", action="store_true", help="also remove whole KV groups of attention heads")
    p.add_argument("--calibration", default="builtin:demo", help="prompt set for the Taylor score")
    p.add_argument("--calibration-prompts", type=int, default=16)
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("check-data", help="validate a generated dataset against its manifest and the contract")
    p.add_argument("data_dir")
    p.set_defaults(func=_cmd_check_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DadpoError as e:
        if args.debug:
            traceback.print_exc()
        print(f"dadpo-ray: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dadpo-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
