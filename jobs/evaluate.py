"""Ray job entrypoint for the evaluation stage. From the repo root:

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/evaluate.py --config jobs/configs/SETTING.yaml [key.sub=value ...]

Same as `dadpo-ray eval`: answers the held-out prompts with the student(s) and judges them against the teacher.
"""

import sys

from dadpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
