from pathlib import Path

import pytest

from dalle.config import Config, ConfigError, load_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)


def test_defaults_and_override_types():
    config = load_config(None, ["train.dvae.lr=3e-4", "dvae.hidden=32", "transformer.attention=[row, column]"])
    assert config.train.dvae.lr == pytest.approx(3e-4)
    assert config.dvae.hidden == 32
    assert config.transformer.attention == ["row", "column"]


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dvae:\n  hiden: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'dvae.hiden'"):
        load_config(path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  clip:\n    steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.clip.steps must be int, got str"):
        load_config(path)


def test_a_yaml_boolean_word_for_a_string_says_to_quote_it():
    quote = r"train.judge.mixed_precision must be str, got bool False \(YAML reads .*: quote the word\)"
    with pytest.raises(ConfigError, match=quote):
        load_config(None, ["train.judge.mixed_precision=no"])
    config = load_config(None, ['train.judge.mixed_precision="no"'])
    assert config.train.judge.mixed_precision == "no"


def test_validation_in_post_init():
    with pytest.raises(ConfigError, match="transformer.dim"):
        load_config(None, ["transformer.dim=30", "transformer.heads=4"])
    with pytest.raises(ConfigError, match="judge.eps must be finite and > 0"):
        load_config(None, ["judge.eps=0"])
    with pytest.raises(ConfigError, match="judge.final_eps must be finite and > 0"):
        load_config(None, ["judge.final_eps=-1"])
    with pytest.raises(ConfigError, match="judge.final_steps must be >= 0"):
        load_config(None, ["judge.final_steps=-5"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
