"""Ray job entrypoint for the training stage. Submit from the repository root:

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/train.py --config jobs/configs/SETTING.yaml [key.sub=value ...]

Same as `dadpo-ray train`: inside a Ray job, RAY_ADDRESS is set, so it joins the cluster instead of starting one.
Reads `<run_dir>/data`, writes `<run_dir>/train/<name>/` (checkpoints, metrics.jsonl) and `<run_dir>/model/`;
submitting the same command again resumes from the last checkpoint.
"""

import sys

from dadpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
