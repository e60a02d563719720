"""Typed configs and crash-safe writes."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common import ConfigError, atomic_dir, atomic_write_json, config_from_dict, config_to_dict, load_config


@dataclass
class Inner:
    size: int = 4
    ratio: float = 0.5
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    shape: tuple[int, ...] = (1, 2)
    flag: bool = False


def test_yaml_sections_and_overrides(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("stage:\n  inner:\n    size: 8\n  shape: [3, 4]\nother: {}\n")
    cfg = load_config(Outer, path, ["inner.ratio=1e-3", "flag=true", "inner.name=abc"], section="stage")
    assert cfg == Outer(Inner(8, 0.001, "abc"), (3, 4), True)
    assert config_from_dict(Outer, config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="no 'missing:' section"):
        load_config(Outer, path, section="missing")


@pytest.mark.parametrize("override,message", [
    ("inner.sise=3", r"unknown key\(s\) \['sise'\]"),
    ("inner.size=1.5", "inner.size: expected an integer"),
    ("flag=maybe", "flag: expected true or false"),
    ("shape=3", "shape: expected a list"),
    ("noequals", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text().strip() == '{\n  "a": 1\n}'


def test_yaml_no_stays_a_string():
    @dataclass
    class Precision:
        mixed_precision: str = "bf16"
        flag: bool = True

    assert load_config(Precision, None, ["mixed_precision=no", "flag=false"]) == Precision("no", False)
    with pytest.raises(ConfigError, match="flag: expected true or false"):
        load_config(Precision, None, ["flag=yes"])
