"""The shipped toy teacher, measured against toy-world ground truth on held-out episodes.

Issue targets: ``fidelity_psnr`` closes at least half of the dB gap between the floor (first frame
repeated) and the ceiling (first frame moved by the exact camera motion), and ``action_error_px``
is at most 0.5 px. The current teacher does not reach them (README, docs/teacher.md): those two
tests are strict xfails, so the day a retrained teacher meets them the suite says so. What it
does reach is asserted for real. Same command as the README figure:
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


def test_teacher_beats_the_floor_and_keeps_the_style(result: dict) -> None:
    assert result["ceiling"]["fidelity_psnr"] > result["floor"]["fidelity_psnr"] + 3
    assert result["fidelity_psnr"] > result["floor"]["fidelity_psnr"] + 1.0, result
    assert result["prompt_accuracy"] >= 0.9  # the biome of every generated frame is the prompt's


@pytest.mark.xfail(strict=True, reason="teacher not trained far enough yet: see docs/teacher.md")
def test_teacher_closes_half_the_gap(result: dict) -> None:
    assert result["gap_closed"] >= 0.5, result


@pytest.mark.xfail(strict=True, reason="teacher does not follow actions yet: see docs/teacher.md")
def test_teacher_follows_actions(result: dict) -> None:
    assert result["action_error_px"] <= 0.5, result
