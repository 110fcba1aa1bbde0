"""Config loading: YAML + dotted overrides, unknown keys and wrong types refused with the key's path."""

import pytest
import yaml

from dadpo_ray.config import load_config
from dadpo_ray.errors import DadpoError

MINIMAL = {
    "models": {"teacher": {"path": "tiny-teacher"}, "student": {"path": "tiny-student"}},
    "prompts": {"source": "builtin:demo"},
}


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    return path


def test_defaults_and_overrides(cfg_file):
    cfg = load_config(cfg_file, ["train.lr=1e-4", "train.loss.preset=ddpo", "generate.topk=8",
                                 "models.reference.path=tiny-student", "train.use_gpu=true"])
    assert cfg.train.lr == 1e-4 and cfg.train.loss.preset == "ddpo" and cfg.generate.topk == 8
    assert cfg.models.reference.path == "tiny-student" and cfg.train.use_gpu is True
    assert cfg.models.teacher.trust_remote_code is False  # off unless asked for
    assert load_config(cfg_file).models.reference_or_student().path == "tiny-student"


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("generate.teacher_pool.max_size=0", "generate.teacher_pool.max_size"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("bogus=1", "bogus: unknown key"),
])
def test_bad_overrides_name_the_key(cfg_file, override, key):
    with pytest.raises(DadpoError) as err:
        load_config(cfg_file, [override])
    assert str(err.value).startswith(str(cfg_file)) and key in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path, cfg_file):
    with pytest.raises(DadpoError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(DadpoError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(DadpoError, match="expected key.sub=value"):
        load_config(cfg_file, ["train.lr"])
    with pytest.raises(DadpoError, match="prompts.source is not a section"):
        load_config(cfg_file, ["prompts.source.x=1"])


def test_fingerprint_tracks_only_named_sections(cfg_file):
    a = load_config(cfg_file)
    b = load_config(cfg_file, ["train.lr=1e-3"])
    c = load_config(cfg_file, ["generate.topk=4"])
    assert a.fingerprint("models", "generate") == b.fingerprint("models", "generate")
    assert a.fingerprint("models", "generate") != c.fingerprint("models", "generate")
