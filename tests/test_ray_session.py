"""The local Ray a command starts when no cluster is given: its dashboard listens on loopback only, and it serves
the State API that Ray Train's placement-group cleaner polls."""

import json
import os
import subprocess
import sys

from conftest import REPO

PROBE = """
import json, ray
from dadpo_ray.config import RayConfig
from dadpo_ray.ray_session import ray_session
from ray.util.state import list_nodes

with ray_session(RayConfig(num_cpus=1)):
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    # The address matters: the test session's own Ray runs beside this one.
    nodes = list_nodes(address=ray.get_runtime_context().gcs_address)
    print(json.dumps({"dashboard": url, "nodes": len(nodes)}))
print(json.dumps({"after": ray.is_initialized()}))
"""


def test_local_session_dashboard_is_loopback_only_and_state_api_answers():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, not the test cluster
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    during, after = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert during["dashboard"].split(":")[0] == "127.0.0.1", during
    assert during["nodes"] == 1  # the State API answered
    assert after == {"after": False}  # the session stopped the Ray it started
