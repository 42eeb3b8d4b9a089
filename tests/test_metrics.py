"""World-model metrics, checked against the toy world's exact ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamkd.data.toyworld import ToyWorld, ToyWorldConfig, random_actions
from streamkd.eval.metrics import (
    action_error_px,
    ceiling_frames,
    floor_frames,
    frame_shifts,
    known_mask,
    phase_correlation_shift,
    psnr,
    psnr_per_frame,
)

CFG = ToyWorldConfig(speed_px=4)  # the shifts below are written for 4 px moves


WORLDS = [
    (0, "forest with red squares"),
    (3, "ocean with white circles"),
    (8, "snow with black triangles"),
]


@pytest.mark.parametrize("seed, prompt", WORLDS)
@pytest.mark.parametrize("dy, dx", [(0, 3), (3, 0), (0, -5), (-4, 0), (2, -7), (-6, 6), (0, 0)])
def test_phase_correlation_recovers_shifts(seed: int, prompt: str, dy: int, dx: int) -> None:
    world = ToyWorld(CFG, seed, prompt)
    y, x = world.default_start
    a = world.render_static(["none"], 1, start=(y, x))[0]
    # Moving the camera by (-dy, -dx) moves the content by (dy, dx).
    b = world.render_static(["none"], 1, start=(y - dy, x - dx))[0]
    est = phase_correlation_shift(a, b)
    assert abs(est[0] - dy) < 0.25 and abs(est[1] - dx) < 0.25, est


def test_phase_correlation_sign_convention_on_a_circular_shift() -> None:
    a = np.random.default_rng(0).random((32, 48))
    b = np.roll(a, (3, -5), axis=(0, 1))  # b[y, x] = a[y - 3, x + 5]
    # Not exact: the window is fixed while the content moves, which skews the peak slightly.
    np.testing.assert_allclose(phase_correlation_shift(a, b), (3, -5), atol=0.02)
    np.testing.assert_allclose(phase_correlation_shift(torch.from_numpy(a), b), (3, -5), atol=0.02)


def test_known_mask() -> None:
    actions = ["none", "right", "right", "down", "none"]
    mask = known_mask(actions, CFG)
    assert mask.shape == (5, 64, 64) and mask.dtype == bool
    assert mask[0].all() and mask[4].sum() == (64 - 8) * (64 - 4)
    assert mask[2, :, :56].all() and not mask[2, :, 56:].any()
    far = known_mask(["none"] + ["left"] * 20, CFG)
    assert not far[-1].any()  # 80 px away: nothing of frame 0 is visible
    n = CFG.map_size // CFG.speed_px
    assert known_mask(["none"] + ["up"] * n, CFG)[-1].all()  # back around the torus


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ceiling_is_exact_inside_the_known_mask(seed: int) -> None:
    world = ToyWorld(CFG, seed, "lava with yellow squares")
    actions = random_actions(np.random.default_rng(seed), 24)
    truth = world.render_static(actions, 24)
    ceiling = ceiling_frames(truth[0], actions, CFG)
    mask = known_mask(actions, CFG)
    assert ceiling.shape == truth.shape and ceiling.dtype == np.uint8
    np.testing.assert_array_equal(ceiling[mask], truth[mask])
    assert psnr(ceiling, truth, mask) == float("inf")
    floor = floor_frames(truth[0], 24)
    assert floor.shape == truth.shape
    assert psnr(floor, truth, mask) < 40.0


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_action_error_on_ground_truth_and_frozen_frames(seed: int) -> None:
    world = ToyWorld(CFG, seed, "meadow with blue circles")
    actions = random_actions(np.random.default_rng(seed), 24)
    assert action_error_px(world.render_static(actions, 24), actions, CFG) < 0.25
    # Full frames: moving objects are painted out, the camera motion is what is measured.
    assert action_error_px(world.render(actions, 24), actions, CFG) < 0.25
    moving = np.array([0] + [1, 1, 4, 4, 4, 2, 3, 3] * 2)
    frozen = floor_frames(world.render(moving, len(moving))[0], len(moving))
    assert abs(action_error_px(frozen, moving, CFG) - CFG.speed_px) < 0.25


def test_frame_shifts_shape_and_errors() -> None:
    frames = ToyWorld(CFG, 0, "desert with red triangles").render(["none", "left", "up"], 3)
    shifts = frame_shifts(torch.from_numpy(frames))
    np.testing.assert_allclose(shifts, [[0, 4], [4, 0]], atol=0.25)
    with pytest.raises(ValueError, match="T >= 2"):
        frame_shifts(frames[:1])
    with pytest.raises(ValueError, match="got 2 actions for 3 frames"):
        action_error_px(frames, ["none", "left"], CFG)


def test_psnr_values_and_mask() -> None:
    target = np.full((2, 8, 8, 3), 0.5)
    pred = target + 0.1  # mse 0.01 -> 20 dB
    assert psnr(pred, target) == pytest.approx(20.0)
    assert psnr(target, target) == float("inf")
    np.testing.assert_allclose(psnr(np.uint8([[[255]]]), np.uint8([[[0]]])), 0.0)
    # Errors only outside the mask do not count.
    pred = target.copy()
    pred[:, :, 4:] = 1.0
    mask = np.zeros((8, 8), dtype=bool)
    mask[:, :4] = True
    assert psnr(pred, target, mask) == float("inf")
    mask_THW = torch.from_numpy(np.broadcast_to(mask, (2, 8, 8)).copy())
    assert psnr(pred, target, mask_THW) == float("inf")
    assert psnr(pred, target) < 10.0
    # uint8 and float inputs agree.
    u8 = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert psnr(u8, target) == pytest.approx(psnr(u8 / 255.0, target))


def test_psnr_per_frame() -> None:
    target = np.zeros((3, 4, 4, 3))
    pred = target.copy()
    pred[1] = 0.1
    pred[2] = 1.0
    np.testing.assert_allclose(psnr_per_frame(pred, target), [np.inf, 20.0, 0.0])
    mask = np.ones((3, 4, 4), dtype=bool)
    mask[2] = False  # no known pixels in frame 2
    out = psnr_per_frame(pred, target, mask)
    assert out[0] == np.inf and out[1] == pytest.approx(20.0) and np.isnan(out[2])


def test_metric_input_errors() -> None:
    a = np.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="pred shape"):
        psnr(a, np.zeros((2, 4, 5, 3)))
    with pytest.raises(ValueError, match="mask selects no pixels"):
        psnr(a, a, np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="mask selects no pixels in any frame"):
        psnr_per_frame(a, a, np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        psnr(a, a, np.ones((4, 4)))
    with pytest.raises(ValueError, match="mask shape"):
        psnr(a, a, np.ones((3, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        psnr(a - 1.0, a)
    with pytest.raises(ValueError, match="a shape"):
        phase_correlation_shift(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="first_frame must be"):
        ceiling_frames(np.zeros((32, 32, 3), dtype=np.uint8), ["none"], CFG)
