"""The shipped toy teacher, measured against toy-world ground truth on held-out episodes.

Targets (issue "Foundation"): the teacher's ``fidelity_psnr`` closes at least half of the dB gap
between the floor (first frame repeated) and the ceiling (first frame moved by the exact camera
motion), and its ``action_error_px`` is at most 0.5 px. Same command as the README figure:
``streamkd eval --checkpoint toy-teacher --episodes 16 --seed 0``.
"""

from __future__ import annotations

import pytest

from streamkd.eval.run import evaluate
from streamkd.models.world import SHIPPED, WorldModel


@pytest.fixture(scope="module")
def result() -> dict:
    if not (SHIPPED / "toy-teacher").is_dir():
        pytest.fail("streamkd/assets/toy-teacher is missing: the repo must ship the toy teacher")
    return evaluate(WorldModel.load("toy-teacher"), episodes=16, seed=0, frames=12)


def test_teacher_closes_half_the_gap(result: dict) -> None:
    assert result["ceiling"]["fidelity_psnr"] > result["floor"]["fidelity_psnr"]
    assert result["gap_closed"] >= 0.5, result


def test_teacher_follows_actions(result: dict) -> None:
    assert result["action_error_px"] <= 0.5, result
    assert result["floor"]["action_error_px"] > 2.0  # the metric does punish ignoring actions
