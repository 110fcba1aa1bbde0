"""Every shipped recipe config validates, and the paper settings are what the paper describes."""

from pathlib import Path

import pytest

from dadpo_ray.config import load_config
from tests.conftest import REPO

CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml")) + sorted((REPO / "dadpo_ray" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_names_its_command(path: Path):
    cfg = load_config(path)
    assert cfg.models.teacher.trust_remote_code is False
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(("# dadpo-ray ", "# ray job submit")), "every config starts with its command"


def test_paper_settings():
    vicuna = load_config(REPO / "jobs" / "configs" / "vicuna7b_pruned20.yaml")
    assert vicuna.prune.enabled and vicuna.prune.ratio == 0.2
    assert vicuna.models.teacher.path == vicuna.models.student.path
    qwen = load_config(REPO / "jobs" / "configs" / "qwen25_7b_to_1p5b.yaml")
    assert qwen.dsft.enabled and "1.5B" in qwen.models.student.path and "7B" in qwen.models.teacher.path
    for cfg in (vicuna, qwen):
        assert cfg.train.use_gpu and cfg.train.loss.preset == "dadpo" and cfg.ray.address == "auto"
