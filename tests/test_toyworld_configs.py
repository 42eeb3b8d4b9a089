"""Every shipped toy-world config parses into the config of the command its docs name (a typo'd
key or an out-of-range value fails here, not an hour into a background run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamkd.config import load_config
from streamkd.distill.ode_pairs import ODEPairsConfig
from streamkd.train.distill import DistillConfig
from streamkd.train.teacher import TeacherTrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "toyworld").rglob("*.yaml"))


def _kind(path: Path) -> type:
    if path.name.startswith("teacher"):
        return TeacherTrainConfig
    if "ode_pairs" in path.name:
        return ODEPairsConfig
    return DistillConfig  # distill_*.yaml, quickstart/{ode,dmd}.yaml, sparse/dmd_*.yaml


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_toyworld_config_parses(path: Path) -> None:
    cfg = load_config(_kind(path), path, [])
    assert cfg.out_dir


def test_every_config_is_found() -> None:
    assert len(CONFIGS) >= 20 and any(p.name == "teacher_v2.yaml" for p in CONFIGS)
