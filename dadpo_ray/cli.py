"""`dadpo-ray` command line: one subcommand per stage, each a thin call into the library.

Bad input raises DadpoError; it is printed as one line (`dadpo-ray: error: ...`) with exit code 2, and a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from dadpo_ray.errors import DadpoError

EXIT_BAD_INPUT = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys, e.g. train.lr=1e-5")


def _not_built(stage: str, issue: int):
    def run(args) -> int:
        print(f"dadpo-ray {stage}: not built yet (tracked in issue {issue})", file=sys.stderr)
        return 1

    return run


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


def _cmd_generate(args) -> int:
    from dadpo_ray.config import load_config
    from dadpo_ray.generate import generate
    from dadpo_ray.ray_session import ray_session

    cfg = load_config(args.config, args.overrides)
    with ray_session(cfg.ray):
        generate(cfg, args.out or f"{cfg.run_dir}/data", overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dadpo-ray",
        description="Distil a teacher chat model into a small student with daDPO on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad-input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stages = [
        ("demo", "run the whole recipe offline on SmolLM2-135M (or --quick: tiny models)", 5),
        ("run", "the whole recipe from one YAML: prune, generate, train, eval", 5),
        ("generate", "Ray Data: teacher + student actor pools -> preference Parquet with top-k", 3),
        ("train", "Ray Train + DeepSpeed ZeRO student training with the daDPO loss", 4),
        ("eval", "judge the student's answers against the teacher's on held-out prompts", 5),
        ("prune", "structured width pruning of a Llama/Qwen model", 5),
    ]
    for name, help_text, issue in stages:
        p = sub.add_parser(name, help=help_text)
        if name not in ("demo", "prune"):
            _add_config_args(p)
        p.set_defaults(func=_not_built(name, issue))
        if name == "generate":
            p.add_argument("--out", help="dataset dir (default: <run_dir>/data)")
            p.add_argument("--overwrite", action="store_true", help="replace a dataset made with another config")
            p.set_defaults(func=_cmd_generate)

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
