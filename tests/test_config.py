"""Tests for streamkd.config: typed dataclass configs from YAML files and overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from streamkd.config import (ConfigError, config_diff, describe, dump_yaml, field_docs,
                             from_dict, load_config, parse_overrides, to_dict)


@dataclass
class AttnConfig:
    kind: Literal["dense", "block_sparse"] = "dense"
    """Attention implementation."""
    window: tuple[int, int] = (4, 4)
    """Local window (frames before, frames after)."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Number of transformer blocks."""
    dim: int = 64
    """Hidden width; must be divisible by num_heads."""
    num_heads: int = 4
    """Attention heads."""
    attn: AttnConfig = field(default_factory=AttnConfig)
    """Attention settings."""

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                             f"pick a dim that is a multiple of num_heads")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student model."""
    lr: float = 1e-3
    """Peak learning rate."""
    compile: bool = False
    """Wrap blocks in torch.compile."""
    name: str = "run"
    """Run name, used for the output folder."""
    resume_from: str | None = None
    """Checkpoint to resume from, if any."""
    sizes: tuple[int, ...] = (1, 2, 3)
    """Chunk sizes in frames."""
    tags: list[str] = field(default_factory=list)
    """Free-form labels."""
    loss_weights: dict[str, float] = field(default_factory=lambda: {"dmd": 1.0})
    """Weight of each loss term."""


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_round_trip() -> None:
    cfg = from_dict(TrainConfig, {"model": {"num_layers": 6, "attn": {"window": [2, 1]}},
                                  "lr": 3, "tags": ["a"], "loss_weights": {"dmd": 2, "reg": 0.5}})
    assert cfg.model.num_layers == 6 and cfg.model.dim == 64
    assert cfg.model.attn.window == (2, 1) and isinstance(cfg.lr, float)
    data = to_dict(cfg)
    assert data["sizes"] == [1, 2, 3] and data["model"]["attn"]["window"] == [2, 1]
    assert from_dict(TrainConfig, data) == cfg
    assert config_diff(cfg, from_dict(TrainConfig, data)) == []


def test_dump_yaml_loads_back(tmp_path) -> None:
    cfg = TrainConfig(lr=2e-4, tags=["x"])
    assert load_config(TrainConfig, _write(tmp_path, "c.yaml", dump_yaml(cfg))) == cfg


def test_parse_overrides_nested_and_typed() -> None:
    got = parse_overrides(["model.attn.kind=block_sparse", "lr=1e-4", "compile=true",
                           "sizes=[1,2]", "name=foo", "model.num_layers=8"])
    assert got == {"model": {"attn": {"kind": "block_sparse"}, "num_layers": 8},
                   "lr": 1e-4, "compile": True, "sizes": [1, 2], "name": "foo"}


def test_load_config_applies_overrides_over_file(tmp_path) -> None:
    path = _write(tmp_path, "c.yaml", "lr: 1e-4\nmodel:\n  num_layers: 3\n  dim: 128\n")
    cfg = load_config(TrainConfig, path, ["model.num_layers=5", "compile=1", "tags=[a, b]",
                                          "resume_from=null", "sizes=[8]"])
    assert cfg.lr == 1e-4 and cfg.model.num_layers == 5 and cfg.model.dim == 128
    assert cfg.compile is True and cfg.tags == ["a", "b"] and cfg.sizes == (8,)
    assert load_config(TrainConfig, overrides=["compile=no"]).compile is False


def test_override_without_equals() -> None:
    with pytest.raises(ConfigError, match=r"'model\.num_layers'.*key\.sub=value"):
        parse_overrides(["model.num_layers"])


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, {"model": {"num_layer": 3}})
    msg = str(e.value)
    assert "model.num_layer" in msg and "ModelConfig" in msg and "'num_layers'" in msg
    with pytest.raises(ConfigError, match="valid keys: model, lr, compile"):
        load_config(TrainConfig, overrides=["zzz=1"])


@pytest.mark.parametrize("overrides, needle", [
    (["model.num_layers=abc"], r"model\.num_layers: expected int, got 'abc' \(str\); give a whole"),
    (["lr=fast"], r"lr: expected float, got 'fast'.*give a number"),
    (["compile=2"], r"compile: expected bool, got 2.*write true or false"),
    (["model.attn.window=[1,2,3]"], r"model\.attn\.window: expected tuple\[int, int\].*exactly 2"),
    (["sizes=[1,x]"], r"sizes\[1\]: expected int, got 'x'"),
    (["loss_weights.dmd=high"], r"loss_weights\.dmd: expected float, got 'high'"),
    (["model=3"], r"model: expected a mapping of ModelConfig fields"),
])
def test_wrong_type_names_field_and_fix(overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainConfig, overrides=overrides)


def test_bool_field_rejects_ints_in_files() -> None:
    with pytest.raises(ConfigError, match="compile: expected bool, got 1"):
        from_dict(TrainConfig, {"compile": 1})


def test_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["model.attn.kind=sparse"])
    assert "model.attn.kind: 'sparse' is not allowed" in str(e.value)
    assert "'dense', 'block_sparse'" in str(e.value)


def test_post_init_error_carries_section_path() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["model.dim=30"])
    msg = str(e.value)
    assert msg.startswith("model: dim=30 is not divisible by num_heads=4")
    assert "multiple of num_heads" in msg and "\n" not in msg


def test_base_inheritance(tmp_path) -> None:
    (tmp_path / "presets").mkdir()
    _write(tmp_path, "default.yaml", "lr: 0.01\nmodel:\n  num_layers: 4\n  dim: 128\n")
    child = _write(tmp_path, "presets/small.yaml", "base: ../default.yaml\nmodel:\n  dim: 32\n")
    cfg = load_config(TrainConfig, child, ["lr=0.5"])
    assert (cfg.lr, cfg.model.num_layers, cfg.model.dim) == (0.5, 4, 32)


def test_base_cycle_detected(tmp_path) -> None:
    _write(tmp_path, "a.yaml", "base: b.yaml\nlr: 1.0\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(TrainConfig, tmp_path / "a.yaml")


def test_missing_file_names_path(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    child = _write(tmp_path, "c.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone\.yaml \(the base of .*c\.yaml\)"):
        load_config(TrainConfig, child)


def test_bad_yaml_names_file_and_line(tmp_path) -> None:
    path = _write(tmp_path, "bad.yaml", "lr: 0.1\nmodel:\n  dim: [1, 2\n  num_heads: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(TrainConfig, _write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_config_diff_lists_changed_fields() -> None:
    old = TrainConfig()
    new = dataclasses.replace(old, lr=1e-4, model=ModelConfig(num_layers=3),
                              loss_weights={"dmd": 1.0, "reg": 0.1})
    assert config_diff(old, new) == ["model.num_layers: 2 -> 3", "lr: 0.001 -> 0.0001",
                                      "loss_weights.reg: '<unset>' -> 0.1"]


def test_field_docs_and_describe() -> None:
    docs = field_docs(ModelConfig)
    assert docs["num_layers"] == "Number of transformer blocks."
    assert docs["attn"] == "Attention settings."
    text = describe(TrainConfig)
    assert "  lr: float = 0.001\n      Peak learning rate." in text
    assert "    window: tuple[int, int] = [4, 4]" in text
    assert "resume_from: str | None = None" in text
