"""Shared test setup: CPU DeepSpeed, offline hubs, and one local Ray cluster per test session."""

import os
from pathlib import Path

# Set before anything imports transformers / deepspeed / ray.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download: a hub call fails loudly
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared; fails (never skips) with a clear message when the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: tests need the shared/ folder beside the checkout")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs), started once per session and stopped by the process that started it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("DS_ACCELERATOR", "HF_HUB_OFFLINE")}})
    yield ray
    if started:
        ray.shutdown()
