"""Revisit consistency (streamkd/eval/revisit.py): trajectories leave a place for the gap they
promise and come back; the scores put ground truth, a blurred mean, a frame-0 copier and random
texture where they belong; the runner gives every row; bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from streamkd.data.toyworld import ToyWorld, ToyWorldConfig
from streamkd.eval.revisit import (
    GAPS, KINDS, evaluate_revisits, gap_buckets, object_mask, other_place_frames, revisit_actions, score_trajectory,
)
from streamkd.bundle import CausalConfig
from tests.test_serve_batching import tiny_causal_model

WORLD = ToyWorldConfig()
SPAN, CHUNK = 9, 3  # the shipped students: 3 sinks + 6 window frames, 3-frame chunks
PROMPT = "forest with red squares"


def _episode(kind: str, gap: int, seed: int = 5):
    traj = revisit_actions(kind, gap, SPAN, CHUNK, WORLD, np.random.default_rng(seed))
    toy = ToyWorld(WORLD, seed, PROMPT)
    truth = toy.render(traj.actions, len(traj.actions))
    return traj, toy, truth


def _score(pred, truth, traj, toy, protocol: str):
    return score_trajectory(pred, truth, traj.actions, WORLD, sinks=3, window=6, chunk=CHUNK, protocol=protocol,
                            start=traj.return_start if protocol == "observed" else 1,
                            objects_THW=object_mask(toy, traj.actions, truth))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gap", GAPS)
def test_trajectories_return_after_the_promised_gap(kind: str, gap: int) -> None:
    traj, toy, truth = _episode(kind, gap)
    assert traj.return_start % CHUNK == 0 and 0 < traj.return_start < len(traj.actions)
    returning, _ = _score(truth, truth, traj, toy, "observed")
    assert returning[gap].count > 500, f"{kind}: no returning pixels at gap {gap} x {SPAN} frames"
    assert returning[gap].result()["median_gap_frames"] >= (gap / 2) * SPAN * (0.5 if gap == 32 else 1)


def test_scores_put_the_references_in_order() -> None:
    """Observed protocol (against ground truth): ground truth > blurred mean > frame-0 copier >
    random texture. Generated protocol (self-consistency): ground truth and a constant blurred
    mean are perfectly consistent (why it is shown beside the realism metrics), a copier that
    paints every place with frame 0 is not, nor is random texture."""
    traj, toy, truth = _episode("out_and_back", 8)
    rng = np.random.default_rng(0)
    T = len(truth)
    refs = {
        "ground_truth": truth,
        "blurred_mean": np.broadcast_to(np.rint(truth.reshape(-1, 3).mean(0)).astype(np.uint8), truth.shape).copy(),
        "frame0_copy": np.repeat(truth[:1], T, axis=0),
        "random_texture": rng.integers(0, 256, truth.shape, dtype=np.uint8),
    }
    observed, generated = {}, {}
    for name, frames in refs.items():
        pred = truth.copy()
        pred[traj.return_start :] = frames[traj.return_start :]
        ret, _ = _score(pred, truth, traj, toy, "observed")
        observed[name] = ret[8].result()["psnr"]
        ret, _ = _score(frames, truth, traj, toy, "generated")
        generated[name] = ret[8].result()["psnr"]
    assert observed["ground_truth"] == 100.0
    assert observed["ground_truth"] > observed["blurred_mean"] > observed["frame0_copy"] > observed["random_texture"], observed
    assert generated["ground_truth"] == generated["blurred_mean"] == 100.0
    assert generated["frame0_copy"] < 25 and generated["random_texture"] < 12, generated
    # a realistic painter without memory (another map of the biome) is no better than the mean
    other = other_place_frames(5, PROMPT, traj.actions, WORLD)
    pred = truth.copy()
    pred[traj.return_start :] = other[traj.return_start :]
    assert _score(pred, truth, traj, toy, "observed")[0][8].result()["psnr"] < observed["blurred_mean"]


def test_in_window_stability_catches_a_repainting_model() -> None:
    """Temporal stability compares what stays in the cache's window with its first rendering:
    a model that re-paints every frame from scratch scores low, ground truth 100 dB."""
    traj, toy, truth = _episode("loop", 2)
    _, win = _score(truth, truth, traj, toy, "generated")
    assert win.result()["psnr"] == 100.0
    noisy = np.clip(truth.astype(int) + np.random.default_rng(1).integers(-40, 41, truth.shape), 0, 255).astype(np.uint8)
    _, win = _score(noisy, truth, traj, toy, "generated")
    assert win.result()["psnr"] < 20


def test_gap_buckets() -> None:
    np.testing.assert_array_equal(gap_buckets(np.array([9, 35, 36, 143, 144, 1000]), 9), [2, 2, 8, 8, 32, 32])


def test_runner_gives_every_row_on_a_tiny_model() -> None:
    model = tiny_causal_model(CausalConfig(3, 3, 6), guidance=1.0)
    result = evaluate_revisits(model, episodes=1, first_index=0, gaps=(2,), oracle_max_gap=2)
    for row in ("model", "full_kv_oracle", "floor_mean_colour", "floor_other_place", "ceiling"):
        for protocol in ("observed", "generated"):
            assert result[row][protocol]["returning"]["2"]["pixels"] > 0, (row, protocol)
    assert result["ceiling"]["generated"]["returning"]["2"]["psnr"] == 100.0
    assert result["trajectories"][0]["gap"] == 2 and result["span_frames"] == 9


def test_bad_input_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown trajectory kind"):
        revisit_actions("spiral", 2, SPAN, CHUNK, WORLD, np.random.default_rng(0))
    with pytest.raises(ValueError, match="must be >= 1"):
        revisit_actions("loop", 0, SPAN, CHUNK, WORLD, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no room"):
        revisit_actions("loop", 2, SPAN, CHUNK, ToyWorldConfig(frame_size=64, map_size=128), np.random.default_rng(0))
    traj, toy, truth = _episode("idle", 2)
    with pytest.raises(ValueError, match="protocol"):
        score_trajectory(truth, truth, traj.actions, WORLD, sinks=3, window=6, chunk=3, protocol="dreamed")
    with pytest.raises(ValueError, match="frames must both be"):
        score_trajectory(truth[:-1], truth[:-1], traj.actions, WORLD, sinks=3, window=6, chunk=3, protocol="observed")
    model = tiny_causal_model(CausalConfig(3, 3, 6), guidance=1.0)
    model.cfg.causal = None
    with pytest.raises(ValueError, match="no causal config"):
        evaluate_revisits(model, episodes=1, first_index=0, gaps=(2,))
