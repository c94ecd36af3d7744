from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.config import from_dict, load_config, parse_override, save_config, to_dict
from vqtok.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Model:
    kind: Literal["vq", "fsq"] = "vq"
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    dim: int | None = None


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    ema: bool = False


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  kind: fsq\n  levels: [7, 5]\nsteps: 3\n")
    cfg = load_config(Run, path, ["optim.lr=3e-4", "model.dim=8", "ema=true", "optim.betas=[0.5, 0.9]"])
    assert cfg.model.kind == "fsq" and cfg.model.levels == [7, 5] and cfg.model.dim == 8
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == (0.5, 0.9)
    assert cfg.steps == 3 and cfg.ema is True


def test_roundtrip(tmp_path):
    cfg = load_config(Run, None, ["model.levels=[8,8]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = from_dict(Run, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.bogus=1"], "unknown config key 'model.bogus'; valid keys under 'model': kind, levels, dim"),
        (["nope=1"], "unknown config key 'nope'; valid keys: model, optim, steps, ema"),
        (["steps=abc"], "'steps' must be an integer, got 'abc'"),
        (["ema=3"], "'ema' must be true or false"),
        (["model.kind=lfq"], "'model.kind' must be one of vq, fsq"),
        (["model.levels=5"], "'model.levels' must be a list"),
        (["optim.betas=[1,2,3]"], "'optim.betas' must have 2 items"),
        (["steps"], "is not of the form key.sub=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(Run, None, overrides)
    assert message in str(exc.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'; valid keys under 'optim': lr, betas"):
        load_config(Run, path)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, bad)


def test_parse_override_values():
    assert parse_override("a.b=1e-4") == (["a", "b"], "1e-4")  # YAML 1.1: float conversion happens by type
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)


def test_cli_info_runs():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "device" in result.output
