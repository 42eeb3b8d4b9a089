"""The shipped toy checkpoints, measured against toy-world ground truth on held-out episodes.

Teacher (issue "Foundation"): ``fidelity_psnr`` closes at least half of the dB gap between the
floor (first frame repeated) and the ceiling (first frame moved by the exact camera motion), and
``action_error_px`` is at most 0.5 px. Students (issue "Distillation"): the self-forcing student
(4 steps, causal, streaming through the KV cache) against the same ground truth and the teacher.
What each reaches is asserted for real; targets not reached are strict xfails, so the suite says
so the day they are. README figures come from the same evaluation with 16 episodes:
``streamkd eval --checkpoint toy-teacher --checkpoint toy-student-ode --checkpoint toy-student
--checkpoint toy-student-fast-ode --checkpoint toy-student-fast`` (docs/eval_fast.md). The fast pair
(2 blocks, 1 step) is the student that streams > 20x faster than the teacher.
"""

from __future__ import annotations

import pytest

from streamkd.eval.run import evaluate
from streamkd.bundle import SHIPPED
from streamkd.models.world import WorldModel

EPISODES = 8


def _load(name: str) -> WorldModel:
    if not (SHIPPED / name).is_dir():
        pytest.fail(f"streamkd/assets/{name} is missing: the repo must ship it")
    return WorldModel.load(name)


@pytest.fixture(scope="module")
def teacher() -> dict:
    return evaluate(_load("toy-teacher"), episodes=EPISODES, seed=0, frames=12)


@pytest.fixture(scope="module")
def student() -> dict:
    return evaluate(_load("toy-student"), episodes=EPISODES, seed=0, frames=12, drift_multiples=(1, 10), drift_episodes=2)


@pytest.fixture(scope="module")
def student_fast() -> dict:
    return evaluate(_load("toy-student-fast"), episodes=EPISODES, seed=0, frames=12)


@pytest.fixture(scope="module")
def student_ode() -> dict:
    return evaluate(_load("toy-student-ode"), episodes=EPISODES, seed=0, frames=12, drift_multiples=(1, 10), drift_episodes=2)


def test_teacher_closes_half_the_gap_and_keeps_the_style(teacher: dict) -> None:
    assert teacher["ceiling"]["fidelity_psnr"] > teacher["floor"]["fidelity_psnr"] + 3
    assert teacher["gap_closed"] >= 0.5, teacher
    assert teacher["prompt_accuracy"] >= 0.9  # the biome of every generated frame is the prompt's


def test_teacher_follows_actions_with_its_x0_sampler() -> None:
    """The 4-level x0 sampler (predict x0, re-noise) moves content by the commanded camera motion."""
    from streamkd.bundle import SamplingConfig

    r = evaluate(_load("toy-teacher"), episodes=EPISODES, seed=0, frames=12, sampling=SamplingConfig(kind="few_step", num_steps=4))
    assert r["action_error_px"] <= 0.5, r
    assert r["gap_closed"] >= 0.9, r


@pytest.mark.xfail(strict=True, reason="Euler-24 samples carry high-frequency blotches that move phase correlation: README")
def test_teacher_follows_actions_with_euler_24(teacher: dict) -> None:
    assert teacher["action_error_px"] <= 0.5, teacher


@pytest.mark.parametrize("name", ["toy-student", "toy-student-ode"])
def test_students_are_causal_four_step_checkpoints(name: str) -> None:
    model = _load(name)
    assert model.is_causal and model.cfg.sampling.kind == "few_step" and len(model.cfg.sampling.sigmas) == 4


def test_student_matches_the_teacher(teacher: dict, student: dict) -> None:
    """Issue target: within 1 dB of the teacher at its full step count, action error no worse."""
    assert student["fidelity_psnr"] >= teacher["fidelity_psnr"] - 1.0, (student, teacher)
    assert student["action_error_px"] <= teacher["action_error_px"], (student, teacher)
    assert student["prompt_accuracy"] >= 0.9


def test_self_forcing_drifts_less_than_ode_init(student: dict, student_ode: dict) -> None:
    """Issue target (Self-Forcing's exposure-bias result): at 10x the teacher's horizon the
    self-forcing student, trained on its own long rollouts, stays closer to the ground truth than
    the ODE-init student it started from (README: 20.63 vs 17.55 dB over 8 episodes)."""
    assert student["drift_psnr"]["10x"] > student_ode["drift_psnr"]["10x"] + 1.0, (student, student_ode)


@pytest.mark.parametrize("name", ["toy-student-fast", "toy-student-fast-ode"])
def test_fast_students_are_causal_two_block_one_step_checkpoints(name: str) -> None:
    """The real-time pair (README "fast student"): 2 of the teacher's 6 blocks, one sampler step."""
    model = _load(name)
    assert model.is_causal and model.cfg.dit.num_layers == 2 and model.cfg.sampling.sigmas == [1.0]


def test_fast_student_keeps_the_teachers_fidelity(teacher: dict, student_fast: dict) -> None:
    """Issue target (within 1 dB of the teacher) for the student that streams > 20x faster
    (README: 24.44 vs 23.77 dB over 16 episodes -- above the teacher, as it distils the teacher's
    x0 sampler)."""
    assert student_fast["fidelity_psnr"] >= teacher["fidelity_psnr"] - 1.0, (student_fast, teacher)
    assert student_fast["prompt_accuracy"] >= 0.9


def test_fast_student_follows_actions_as_well_as_the_teacher() -> None:
    """Issue target: action error no worse than the teacher's (README: 1.09 vs 1.49 px). Over the
    README's 16 episodes, not 8: the mean is made by the few frame pairs where phase correlation
    locks onto something else (median error 0.05 px for both), and on the first 8 episodes the two
    are within 0.01 px of each other (1.756 vs 1.745), too close for the sample to decide."""
    kw = dict(episodes=16, seed=0, frames=12)
    teacher, fast = evaluate(_load("toy-teacher"), **kw), evaluate(_load("toy-student-fast"), **kw)
    assert fast["action_error_px"] <= teacher["action_error_px"], (fast, teacher)


@pytest.mark.parametrize("name, margin", [("toy-student-memory", 0.2), ("toy-student-memory6", 4.0)])
def test_memory_student_reads_its_memory_on_revisits(name: str, margin: float) -> None:
    """``toy-student-memory`` (the fast student tuned with a compressed tier and a memory bank)
    and ``toy-student-memory6`` (the 6-block student tuned with a rendered bank):
    on observed revisits (the way out shown, the way back generated) its memory brings back more
    of the place than its window alone (memory6 on these episodes: +5.6 dB; the same bank not
    rendered: +0.8), and novel views are untouched (memory never engages on a 12-frame
    episode). Figures with more episodes and every row: docs/memory.md."""
    from dataclasses import replace

    from streamkd.eval.revisit import evaluate_revisits

    model = _load(name)
    assert model.cfg.causal.memory is not None and model.cfg.causal.memory.bank_frames > 0
    psnr = {}
    variants = [("window", None), ("memory", model.cfg.causal.memory)]
    if model.cfg.causal.memory.render:
        variants.append(("unrendered", replace(model.cfg.causal.memory, render=False)))
    for name, memory in variants:
        r = evaluate_revisits(model, episodes=2, first_index=2000, gaps=(2, 8),
                              causal=replace(model.cfg.causal, memory=memory), oracle_max_gap=None)
        psnr[name] = sum(r["model"]["observed"]["returning"][g]["psnr"] for g in ("2", "8")) / 2
    assert psnr["memory"] > psnr["window"] + margin, psnr
    if "unrendered" in psnr:  # the rendering is what brings the place back
        assert psnr["memory"] > psnr["unrendered"] + 3.0, psnr
    with_memory = evaluate(model, episodes=2, seed=0, frames=12, drift_episodes=0)
    without = evaluate(model, episodes=2, seed=0, frames=12, drift_episodes=0,
                       causal=replace(model.cfg.causal, memory=None))
    assert abs(with_memory["fidelity_psnr"] - without["fidelity_psnr"]) < 0.01
