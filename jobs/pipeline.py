"""Ray job entrypoint for the whole recipe (prune, dSFT, generate, train, eval, report). From the repo root:

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pipeline.py --config jobs/configs/SETTING.yaml [--compare] [key.sub=value ...]

Same as `dadpo-ray run`: inside a Ray job RAY_ADDRESS is set, so it joins the cluster. Every stage is skipped
when its output is complete, so submitting the same command again resumes after a failure.
"""

import sys

from dadpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
