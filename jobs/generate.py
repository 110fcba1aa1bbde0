"""Ray job entrypoint for the generation stage. Submit from the repository root:

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \
        -- python jobs/generate.py --config jobs/configs/SETTING.yaml [--overwrite] [key.sub=value ...]

Same as `dadpo-ray generate`: inside a Ray job, RAY_ADDRESS is set, so it joins the cluster instead of starting
one. Writes `<run_dir>/data`; submitting the same command again resumes with the prompts not yet written.
"""

import sys

from dadpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
