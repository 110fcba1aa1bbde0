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
        # Ray Train's placement-group cleaner polls the State API, which the dashboard serves (without it, a
        # warning every few seconds); bound to loopback, it is reachable from this machine only.
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()
