from pathlib import Path

import pytest

from pipeline import PROFILES_DIR
from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_every_shipped_profile_validates(profile):
    cfg = load_config(profile=profile)
    assert isinstance(cfg, RunConfig)


def test_default_profile_is_the_embedded_cpu_demo():
    cfg = load_config()
    assert cfg.teacher.backend == "llamacpp" and cfg.student.source == "embedded-cut"


def test_unknown_key_names_key_file_and_known_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  modle: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(config_file=bad)
    msg = str(e.value)
    assert "teacher.modle" in msg and str(bad) in msg and "model" in msg


def test_impossible_values_are_rejected_with_the_field():
    with pytest.raises(ConfigError, match=r"generate.temperature"):
        load_config(overrides=["generate.temperature=5"])
    with pytest.raises(ConfigError, match=r"generate.target_instructions"):
        load_config(overrides=["generate.target_instructions=-3"])


def test_yaml_syntax_error_gives_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("teacher:\n  model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(config_file=bad)


def test_overrides_are_typed_and_applied():
    cfg = load_config(overrides=["train.lora_r=8", "student.drop_layers=[3, 1, 3]", "runs_dir=/tmp/x"])
    assert cfg.train.lora_r == 8
    assert cfg.student.drop_layers == [1, 3]
    assert cfg.runs_dir == Path("/tmp/x")


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="cpu-demo"):
        load_config(profile="nope")


def test_fingerprint_changes_with_config():
    assert load_config().fingerprint() != load_config(overrides=["train.lora_r=4"]).fingerprint()
