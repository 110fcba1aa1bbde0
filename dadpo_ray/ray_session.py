"""Join the configured Ray cluster, or start a local one for the length of a command and stop it after."""

from __future__ import annotations

import os
from contextlib import contextmanager

from dadpo_ray.config import RayConfig


@contextmanager
def ray_session(cfg: RayConfig):
    import ray

    if ray.is_initialized():  # a caller (a test, a job driver) already connected
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)  # local: nothing listens beyond this machine
    try:
        yield
    finally:
        ray.shutdown()
