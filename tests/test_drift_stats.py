"""Drift statistics of untethered rollouts, checked on the toy world's ground truth and on
synthetic "models" with known failures (frozen, fading, blurred, noisy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamkd.data.toyworld import ToyWorld, ToyWorldConfig, heldout_seed, prompt_for_seed, random_actions, render
from streamkd.eval.drift import (
    FRAME_FLAGS,
    STATS,
    DriftConfig,
    DriftStats,
    frame_statistics,
    frozen_frames,
    ground_truth_reference,
    horizon_windows,
)

WORLD = ToyWorldConfig()
T = 240  # 20x a 12-frame horizon
WINDOWS = horizon_windows((1, 10, 20), 12)
# Held-out episodes 0, 1, 5: ocean, lava (the darkest biome), snow (the brightest).
EPISODE_INDICES = (0, 1, 5)
CONTINUOUS = ("brightness", "contrast", "hf_energy")


@pytest.fixture(scope="module")
def episodes() -> list[tuple[np.ndarray, np.ndarray]]:
    """(ground-truth frames uint8 [T, 64, 64, 3], actions [T]) of a few held-out episodes."""
    out = []
    for i in EPISODE_INDICES:
        seed = heldout_seed(i)
        actions = random_actions(np.random.default_rng(seed), T)
        out.append((render(seed, prompt_for_seed(seed), actions, T, WORLD), actions))
    return out


def _score(model, episodes) -> dict:
    acc = DriftStats(WINDOWS, WORLD)
    for gt, actions in episodes:
        acc.add(model(gt), gt, actions)
    return acc.result()


def _box_blur(frames: np.ndarray, radius: int) -> np.ndarray:
    k = 2 * radius + 1
    padded = np.pad(frames.astype(np.float64), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    blurred = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)) / k**2
    return blurred.round().astype(np.uint8)


def test_ground_truth_reference(episodes) -> None:
    assert "lava" in prompt_for_seed(heldout_seed(1))
    ref = ground_truth_reference(episodes, {**WINDOWS, "all": (0, T)}, WORLD)
    for name, r in ref.items():
        assert r["episodes"] == len(episodes)
        assert all(r["ratio"][s] == 1.0 for s in STATS), (name, r["ratio"])
        for side in ("model", "ground_truth"):
            assert r[side]["frozen"] == 0.0
            assert r[side]["black_frames"] == 0.0 and r[side]["white_frames"] == 0.0
        assert r["moving_frames"] > 0
    assert ref["all"]["moving_frames"] > 0.6 * ref["all"]["frames"]  # the camera moves most frames
    # p1/p99 over the whole episode leave out about 1% + 1% of its frames (6 of 240 here, ties
    # aside); the pixel shares have ties (e.g. no white pixel at all), so they leave out fewer.
    whole = ref["all"]["out_of_range"]
    for s in CONTINUOUS:
        assert 0.015 <= whole[s] <= 0.03, (s, whole[s])
    assert whole["black_px"] <= 0.03 and whole["white_px"] <= 0.03


def test_lava_is_dark_but_not_black(episodes) -> None:
    lava, _ = episodes[1]
    stats = frame_statistics(lava)
    assert stats["brightness"].max() < 0.25  # dark ...
    assert stats["black_px"].max() < 0.1  # ... but only the outlines are near-black


def test_repeated_first_frame_is_frozen(episodes) -> None:
    result = _score(lambda gt: np.repeat(gt[:1], len(gt), axis=0), episodes)
    for name, r in result.items():
        assert r["model"]["frozen"] == 1.0, name
        assert r["ground_truth"]["frozen"] == 0.0


def test_moving_objects_do_not_unfreeze_a_still_background() -> None:
    seed = heldout_seed(8)  # both objects in view for most of the first 60 frames
    world = ToyWorld(WORLD, seed, prompt_for_seed(seed))
    still = world.render(["none"] * 60, 60)  # camera still, objects moving
    raw_mad = np.abs(np.diff(still.astype(np.float64) / 255.0, axis=0)).mean(axis=(1, 2, 3))
    assert (raw_mad > DriftConfig().frozen_mad).mean() > 0.5  # objects alone would unfreeze it
    moves = np.array([0] + [4] * 59)  # ... while the actions say the camera moved right
    moved, frozen = frozen_frames(still, moves, WORLD)
    assert not moved[0] and moved[1:].all()
    assert frozen[1:].all()
    moved, frozen = frozen_frames(still, np.zeros(60, dtype=np.int64), WORLD)
    assert not moved.any() and not frozen.any()  # no camera motion: nothing to judge


def test_fade_to_black(episodes) -> None:
    def fade(gt: np.ndarray) -> np.ndarray:
        gain_T = np.linspace(1.0, 0.0, len(gt))[:, None, None, None]
        return (gt * gain_T).round().astype(np.uint8)

    result = _score(fade, episodes)
    black = [r["model"]["black_frames"] for r in result.values()]
    brightness = [r["ratio"]["brightness"] for r in result.values()]
    assert black[0] == 0.0 and black[-1] > 0.9
    assert np.all(np.diff(black) >= 0)
    assert np.all(np.diff(brightness) < 0) and brightness[-1] < 0.1
    assert result["20x"]["out_of_range"]["brightness"] == 1.0


def test_blurred_model(episodes) -> None:
    result = _score(lambda gt: _box_blur(gt, 2), episodes)
    for name, r in result.items():
        assert r["ratio"]["contrast"] < 0.75, (name, r["ratio"])
        assert r["ratio"]["hf_energy"] < 0.1, (name, r["ratio"])
        assert r["out_of_range"]["hf_energy"] > 0.5, (name, r["out_of_range"])
        assert abs(r["ratio"]["brightness"] - 1.0) < 0.01  # blur keeps the mean


def test_noise_model(episodes) -> None:
    rng = np.random.default_rng(0)
    result = _score(lambda gt: rng.integers(0, 256, gt.shape, dtype=np.uint8), episodes)
    for name, r in result.items():
        assert r["ratio"]["hf_energy"] > 5.0, (name, r["ratio"])
        assert r["out_of_range"]["hf_energy"] == 1.0


def test_pooling_is_exact(episodes) -> None:
    (gt_a, act_a), (gt_b, act_b) = episodes[0], episodes[2]
    model_a, model_b = _box_blur(gt_a, 1), gt_b[::-1].copy()
    both = DriftStats(WINDOWS, WORLD)
    both.add(model_a, gt_a, act_a)
    both.add(torch.from_numpy(model_b), torch.from_numpy(gt_b), torch.from_numpy(act_b))
    first, second = DriftStats(WINDOWS, WORLD), DriftStats(WINDOWS, WORLD)
    first.add(model_a, gt_a, act_a)
    second.add(model_b, gt_b, act_b)
    first.merge(second)
    assert first.result() == both.result()
    # The pooled mean is the mean over every frame of both episodes' windows, not of the means.
    lo, hi = WINDOWS["10x"]
    stats_a, stats_b = frame_statistics(model_a), frame_statistics(model_b)
    pooled = both.result()["10x"]
    for s in STATS:
        expected = np.concatenate([stats_a[s][lo:hi], stats_b[s][lo:hi]]).mean()
        assert pooled["model"][s] == pytest.approx(expected, rel=1e-12)
    assert pooled["frames"] == 2 * (hi - lo) and pooled["episodes"] == 2
    assert set(pooled["model"]) == set(STATS) | set(FRAME_FLAGS)


def test_bad_input(episodes) -> None:
    gt, actions = episodes[0]
    acc = DriftStats(WINDOWS, WORLD)
    with pytest.raises(ValueError, match="no episodes added"):
        acc.result()
    with pytest.raises(ValueError, match=r"model_frames shape .* != gt_frames shape"):
        acc.add(gt[:-1], gt, actions)
    with pytest.raises(ValueError, match=r"model_frames shape .* != gt_frames shape"):
        acc.add(gt[:, :32], gt, actions)
    with pytest.raises(ValueError, match="239 actions for 240 frames"):
        acc.add(gt, gt, actions[:-1])
    with pytest.raises(ValueError, match="windows reach frame 239 but the episode has 200 frames"):
        acc.add(gt[:200], gt[:200], actions[:200])
    with pytest.raises(ValueError, match="must be uint8"):
        acc.add(gt / 255.0, gt, actions)
    with pytest.raises(ValueError, match=r"must be \[T, H, W, 3\]"):
        acc.add(gt[..., 0], gt[..., 0], actions)
    with pytest.raises(ValueError, match="unknown action id 7"):
        acc.add(gt, gt, np.full(T, 7))
    with pytest.raises(ValueError, match=r"window '1x' = \[5, 5\)"):
        DriftStats({"1x": (5, 5)})
    with pytest.raises(ValueError, match="windows is empty"):
        DriftStats({})
    with pytest.raises(ValueError, match="same windows"):
        acc.merge(DriftStats({"1x": (1, 12)}, WORLD))
    with pytest.raises(ValueError, match="range_percentiles"):
        DriftConfig(range_percentiles=(99.0, 1.0))
    assert acc.episodes == 0  # refused episodes leave no trace
