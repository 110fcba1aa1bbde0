"""Ray job entrypoint for the training stage. Submit from the repository root:

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/train.py --config jobs/configs/SETTING.yaml [key.sub=value ...]

Reads `<run_dir>/data` (the generation stage's output) and writes `<run_dir>/train/<name>/` (checkpoints,
metrics.jsonl) and `<run_dir>/model/`. Submitting the same command again resumes from the last checkpoint.
"""

import argparse
import sys

import ray

from dadpo_ray.config import load_config
from dadpo_ray.errors import DadpoError
from dadpo_ray.train import train_from_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        ray.init(address=cfg.ray.address or "auto")
        result = train_from_config(cfg)
    except DadpoError as e:
        print(f"jobs/train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"model: {result['model_dir']}\nmetrics: {result['metrics_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
