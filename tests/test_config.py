"""Typed configs: strict loading, overrides, and errors that name the file and key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ldm.config import ConfigError, load_config, save_config
from ldm.toy import ToyConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: Literal["a", "b"] = "a"
    widths: tuple[int, ...] = (32, 64)
    gamma: float | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class Outer:
    train: Inner = field(default_factory=Inner)
    flag: bool = False


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_the_dataclass(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-4\n  widths: [8, 16, 32]\nflag: true\n")
    cfg = load_config(Outer, path, ["train.steps=5", "train.gamma=5.0", "train.name=b"])
    assert cfg == Outer(Inner(lr=1e-4, steps=5, name="b", widths=(8, 16, 32), gamma=5.0), flag=True)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("train:\n  lrr: 1\n", [], r"c\.yaml: unknown key 'train\.lrr'"),
        ("train:\n  steps: ten\n", [], r"c\.yaml: train\.steps: expected an integer"),
        ("train:\n  steps: 1.5\n", [], r"train\.steps: expected an integer"),
        ("flag: 1\n", [], r"flag: expected bool"),
        ("train:\n  name: c\n", [], r"train\.name: 'c' is not one of 'a', 'b'"),
        ("train:\n  steps: 0\n", [], r"c\.yaml: train: steps must be >= 1"),
        ("", ["train.steps"], r"expected KEY=VALUE"),
        ("", ["train.widths=[1, x]"], r"train\.widths\[1\]: expected an integer"),
        ("- 1\n", [], r"top level must be a mapping"),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, write(tmp_path, text), overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = Outer(Inner(lr=3e-4, widths=(1, 2)), flag=True)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Outer, tmp_path / "config.yaml") == cfg


def test_toy_yaml_equals_the_dataclass_defaults():
    assert load_config(ToyConfig, ROOT / "configs" / "toy.yaml") == ToyConfig()
