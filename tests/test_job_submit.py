"""A real `ray job submit` of the quick pipeline, the way jobs/pipeline.py documents it, to a Ray head this test
starts (and alone stops): token auth on, the job's code uploaded from the working tree, jobs/runtime_env.yaml.

jobs/runtime_env.yaml is used as shipped, plus the two env vars it tells a CPU-only cluster to add
(DS_ACCELERATOR=cpu) and that keep this machine offline (HF_HUB_OFFLINE=1): Ray accepts one of --runtime-env and
--runtime-env-json, so the test writes the shipped file with those two added. Its `pip: requirements.txt` clones
the head's virtualenv (this .venv) and finds every pin already satisfied, offline; PIP_NO_INDEX=1 in the head's
environment makes a missing package fail at once instead of reaching for the network. The head's environment
lacks DS_ACCELERATOR and HF_HUB_OFFLINE, so the job only has them if the runtime env delivers them: a first job,
`printenv`, checks that they arrive (the entrypoint is quoted by `ray job submit`, so no `&&` chaining).
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

RAY = str(Path(sys.executable).with_name("ray"))
JOB_ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
PATIENCE_S = 1800  # give up on a `ray job` command that never ends (a hang, not a speed target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Processes of the head's session: the Ray processes it started that did not start a session of their own."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the command: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture
def ray_head():
    """A Ray head in its own process session and temp dir (other Ray instances may run on this machine); stopped
    by signalling only its own process group, then any worker left in its session, by pid."""
    temp = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Every port Ray would otherwise take at a fixed default (GCS 6379, dashboard 8265, its agent 52365, the Ray
    # client server 10001) is a free one: another Ray on this machine may hold the defaults.
    port, dashboard, agent, client = (_free_port() for _ in range(4))
    log = open(temp / "head.log", "w")
    head = subprocess.Popen([RAY, "start", "--head", "--num-cpus", "2", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
                             "--temp-dir", str(temp / "ray"), "--block"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's own group: gcs, raylet, dashboard, agents
        try:
            # `ray start --block` then tries to drain its node through the GCS it shares the signal with, and
            # waits out a GCS timeout (about 100 s here); nothing is left to save by then.
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        deadline = time.monotonic() + 30  # workers (own process groups, same session) exit when the raylet goes
        while _session_pids(head.pid) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in _session_pids(head.pid):
            os.kill(pid, signal.SIGKILL)
        log.close()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _ray_job(address: str, env: dict, command: str, *args: str) -> str:
    """`ray job COMMAND --address ADDRESS ARGS` (ARGS may end with `-- entrypoint`), from the repository root.
    `submit` without --no-wait tails the job's logs until it ends and exits 1 if it failed. The head's job agent
    registers a little after the dashboard answers; until then Ray refuses a submission with "No available agent
    to submit job, please try again later", and the test does as told."""
    deadline = time.monotonic() + 180
    while True:
        done = subprocess.run([RAY, "job", command, "--address", address, *args], env=env, capture_output=True,
                              text=True, cwd=REPO, timeout=PATIENCE_S)
        out = done.stdout + done.stderr
        if "No available agent to submit job" not in out or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, f"ray job {command}: exit {done.returncode}\n{out[-6000:]}"
    return out


def _submit(address: str, env: dict, runtime_env: Path, *entrypoint: str) -> str:
    """Submit, wait for the end, and return the job's logs; fails unless `ray job status` says it succeeded."""
    job = f"dadpo-test-{uuid.uuid4().hex[:8]}"
    logs = _ray_job(address, env, "submit", "--runtime-env", str(runtime_env), "--submission-id", job,
                    "--", *entrypoint)
    status = _ray_job(address, env, "status", job)
    assert f"Job '{job}' succeeded" in status, f"{status[-500:]}\n--- job logs ---\n{logs[-6000:]}"
    return logs


@pytest.mark.ray
@pytest.mark.slow
def test_submitted_pipeline_job_succeeds_and_writes_the_run_dir(ray_head, tmp_path):
    address, env = ray_head
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(JOB_ENV)
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    # The same runtime env (set up once, then cached): what a job sees.
    assert "cpu\n1\n" in _submit(address, env, env_file, "printenv", *JOB_ENV)

    run_dir = tmp_path / "run"
    _submit(address, env, env_file, "python", "jobs/pipeline.py", "--config", "dadpo_ray/configs/demo_quick.yaml",
            f"run_dir={run_dir}", "prompts.limit=24", "generate.max_new_tokens=8", "eval.max_new_tokens=8",
            "eval.judge=none")
    assert (run_dir / "model").is_dir()
    assert (run_dir / "eval" / "results.json").is_file() and (run_dir / "report.md").is_file()
