"""Unseen-region realism metrics: trivial references land in the right order on each metric.

Held-out 64 x 64 toy-world episodes; the mask is the pixels of frames 1.. that frame 0 does not
show (``~known_mask``), as a caller evaluating a model conditioned on frame 0 would pass it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamkd.bundle import load_model
from streamkd.data.toyworld import (
    _BIOMES,
    _COLOURS,
    _SHAPES,
    ToyWorldConfig,
    _sprite,
    heldout_seed,
    parse_prompt,
    prompt_for_seed,
    random_actions,
    render,
)
from streamkd.eval.metrics import known_mask
from streamkd.eval.realism import (
    REFERENCES,
    RealismAccumulator,
    _palette_directions,
    box_blur,
    evaluate_references,
    landmark_components,
    landmark_stats,
    palette_distance,
    palette_spread,
    reference_models,
)

WORLD = ToyWorldConfig()
NUM_FRAMES = 16
NUM_EPISODES = 16


def _episode(index: int, world: ToyWorldConfig = WORLD) -> tuple[np.ndarray, np.ndarray, str]:
    """(gt frames [T, H, W, 3], unseen mask [T, H, W] with frame 0 excluded, prompt)."""
    seed = heldout_seed(index)
    prompt = prompt_for_seed(seed)
    actions_T = random_actions(np.random.default_rng(seed), NUM_FRAMES)
    frames_THWC = render(seed, prompt, actions_T, NUM_FRAMES, world)
    mask_THW = ~known_mask(actions_T, world)
    mask_THW[0] = False  # frame 0 is the condition
    return frames_THWC, mask_THW, prompt


@pytest.fixture(scope="module")
def episodes() -> list[tuple[np.ndarray, np.ndarray, str]]:
    return [_episode(i) for i in range(NUM_EPISODES)]


@pytest.fixture(scope="module")
def table(episodes) -> dict[str, dict[str, float]]:
    return evaluate_references(episodes, seed=0)


def test_episodes_have_unseen_pixels(table):
    assert table["ground_truth"]["masked_pixels"] > 100_000
    assert table["ground_truth"]["landmarks_gt"] > 50


def test_ground_truth_scores_exactly_one(table):
    gt = table["ground_truth"]
    for key in ("contrast_ratio", "hf_energy_ratio", "landmark_recall", "landmark_colour_recall"):
        assert gt[key] == 1.0, key
    assert gt["palette_distance"] == 0.0


def test_blurred_mean_is_a_floor(table):
    blurred = table["blurred_mean"]
    assert blurred["contrast_ratio"] < 0.5
    assert blurred["hf_energy_ratio"] < 0.5
    assert blurred["landmark_recall"] < 0.3
    assert blurred["landmark_colour_recall"] < 0.3


def test_random_texture_is_too_sharp_and_off_palette(episodes, table):
    noise = table["random_texture"]
    assert noise["hf_energy_ratio"] > 2.0
    assert noise["contrast_ratio"] > 1.5
    assert noise["landmark_recall"] < 0.1
    # Per episode: far beyond what another place of the same biome gives.
    for i, (gt_THWC, mask_THW, prompt) in enumerate(episodes[:6]):
        spread = palette_spread(WORLD, prompt)
        d = palette_distance(reference_models(gt_THWC, i, prompt)["random_texture"], mask_THW, gt_THWC)
        assert d > 4.0 * spread["max"], (prompt, d, spread)


def test_colour_blotches_are_not_landmarks(episodes, table):
    """Blocks of the prompt's colour at the ground truth's density (a guided teacher's artefact)
    have the colour, not the outline or the shape: far below half the ground truth's landmarks,
    while the ground truth scores 1.0 and its codec round trip >= 0.8 (next test)."""
    blotches = table["colour_blotches"]
    assert blotches["landmark_recall"] < 0.2, blotches["landmark_recall"]
    assert blotches["landmark_colour_recall"] > 0.5  # the colour is there: the outline is what tells them apart


def test_frame0_copy_is_realistic(episodes, table):
    copy = table["frame0_copy"]
    for key in ("contrast_ratio", "hf_energy_ratio", "landmark_recall"):
        assert 0.6 <= copy[key] <= 1.6, (key, copy[key])
    spreads = [palette_spread(WORLD, prompt)["max"] for _, _, prompt in episodes[:6]]
    assert copy["palette_distance"] < max(spreads)


def test_references_in_order(table):
    for key in ("contrast_ratio", "hf_energy_ratio"):
        assert (
            table["blurred_mean"][key]
            < table["frame0_copy"][key]
            < table["ground_truth"][key]
            < table["random_texture"][key]
        ), key
    palette = {name: table[name]["palette_distance"] for name in REFERENCES}
    assert palette["ground_truth"] < palette["frame0_copy"] < palette["random_texture"]


def _exact_landmark_count(frames_THWC: np.ndarray, prompt: str) -> int:
    """Components (4-connected, >= 6 px) of pixels exactly on the prompt colour's shade range:
    the landmarks a renderer-aware detector sees, to check the nearest-colour rule against."""
    colour_3 = np.asarray(_COLOURS[parse_prompt(prompt).colour], dtype=np.float64)
    rgb = frames_THWC.astype(np.float64)
    shade = rgb @ colour_3 / (colour_3 @ colour_3)
    off = np.linalg.norm(rgb - shade[..., None] * colour_3, axis=-1)
    exact_THW = (off < 1.5) & (shade > 0.79) & (shade < 1.01)
    count = 0
    for frame_HW in exact_THW:  # plain flood fill: an independent reference
        seen = np.zeros_like(frame_HW)
        for y, x in zip(*np.nonzero(frame_HW)):
            if seen[y, x]:
                continue
            stack, area = [(y, x)], 0
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                area += 1
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < frame_HW.shape[0] and 0 <= nx < frame_HW.shape[1]:
                        if frame_HW[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            count += area >= 6
    return count


def test_landmark_detection_on_ground_truth():
    found, truth, other_colour, densities = 0, 0, 0, []
    for i in range(24):
        frames_THWC, _, prompt = _episode(i)
        full_THW = np.ones(frames_THWC.shape[:3], dtype=bool)
        stats = landmark_stats(frames_THWC, full_THW, prompt)
        exact = _exact_landmark_count(frames_THWC, prompt)
        # No false positives; misses only slivers (under another landmark or a moving object).
        assert 0.6 * exact - 1 <= stats["colour"] <= exact + 1, (i, prompt, stats, exact)
        found += stats["colour"]
        truth += exact
        densities.append(1000.0 * stats["shape"] / stats["pixels"])
        style = parse_prompt(prompt)
        for colour in _COLOURS:
            if colour != style.colour:
                other = f"{style.biome} with {colour} {style.shape}"
                other_colour += landmark_stats(frames_THWC, full_THW, other)["colour"]
    assert found >= 0.9 * truth
    # Landmarks on most episodes, at about the map's density (24 per 256^2 map; landmarks cut by
    # the frame border count too, landmarks hidden under others do not).
    densities = np.asarray(densities)
    assert (densities > 0).mean() >= 0.75
    map_density = 1000.0 * WORLD.num_landmarks / WORLD.map_size**2
    assert 0.6 * map_density <= densities.mean() <= 1.6 * map_density
    # Another prompt colour finds (almost) nothing: outlines of the true colour are 1 px rings.
    assert other_colour <= 0.02 * found


def test_landmarks_survive_the_codec():
    """The toy codec's round trip (patch PCA: what any model's frames go through) keeps most
    detections; a 3 x 3 box blur plus pixel noise keeps the colour blobs but erases the 1 px
    outlines that tell a landmark from a blotch (``OUTLINE_MIN``): frames that blurry show none."""
    codec = load_model("toy-teacher").codec
    shape_gt = shape_rec = colour_gt = colour_rec = colour_blur = 0
    for i in range(12):
        frames_THWC, _, prompt = _episode(i)
        full_THW = np.ones(frames_THWC.shape[:3], dtype=bool)
        with torch.no_grad():
            rec_THWC = codec.decode(codec.encode(torch.from_numpy(frames_THWC)[None]))[0].numpy()
        noise = np.random.default_rng(i).normal(0.0, 4.0, frames_THWC.shape)
        blurred = np.clip(np.rint(box_blur(frames_THWC, 3) + noise), 0, 255).astype(np.uint8)
        gt, rec = landmark_stats(frames_THWC, full_THW, prompt), landmark_stats(rec_THWC, full_THW, prompt)
        shape_gt, shape_rec = shape_gt + gt["shape"], shape_rec + rec["shape"]
        colour_gt, colour_rec = colour_gt + gt["colour"], colour_rec + rec["colour"]
        colour_blur += landmark_stats(blurred, full_THW, prompt)["colour"]
    assert 0.9 <= colour_rec / colour_gt <= 1.05
    assert 0.8 <= shape_rec / shape_gt <= 1.05
    assert 0.9 <= colour_blur / colour_gt <= 1.05


@pytest.mark.parametrize("shape", _SHAPES)
def test_sprite_shapes_are_recognised(shape):
    """Every sprite size the worlds draw (64 px: 8..12, 32 px: 5..7), alone on a biome colour,
    is one landmark of its own shape and of no other."""
    lo = _BIOMES["meadow"][0][0]
    for size in range(5, 13):
        outline, fill = _sprite(shape, size)
        frame_HWC = np.empty((32, 32, 3), dtype=np.uint8)
        frame_HWC[:] = lo
        s = outline.shape[0]
        patch = frame_HWC[10 : 10 + s, 9 : 9 + s]
        patch[outline] = (0, 0, 0)
        patch[fill] = (200, 27, 27)  # red at shade 0.91
        comps = landmark_components(frame_HWC[None], f"meadow with red {shape}")
        assert list(comps["shape"]) == [shape], (size, comps)


def test_thirty_two_pixel_frames():
    world = ToyWorldConfig(frame_size=32, map_size=128)
    eps = [_episode(i, world) for i in range(6)]
    table = evaluate_references(eps)
    assert table["ground_truth"]["contrast_ratio"] == 1.0
    assert table["ground_truth"]["contrast_patches"] > 0
    assert table["blurred_mean"]["hf_energy_ratio"] < 0.5
    assert table["random_texture"]["hf_energy_ratio"] > 2.0


def test_palette_distance_units_and_unequal_sizes():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 0.8, (3, 8, 8, 3))
    mask = rng.random((3, 8, 8)) < 0.5
    shifted = a + 0.1
    expected = np.abs(_palette_directions() @ np.full(3, 0.1)).mean()
    assert palette_distance(shifted, mask, a) == pytest.approx(expected, rel=1e-9)
    # The same colours twice over (2N pixels against N) are the same distribution.
    twice, mask_twice = np.concatenate([a, a]), np.concatenate([mask, mask])
    assert palette_distance(shifted, mask, twice, mask_twice) == pytest.approx(expected, rel=1e-9)


def test_bad_inputs(episodes):
    gt_THWC, mask_THW, prompt = episodes[0]
    acc = RealismAccumulator()
    with pytest.raises(ValueError, match="shape"):
        acc.add(gt_THWC[:-1], gt_THWC, mask_THW, prompt)
    with pytest.raises(ValueError, match="mask shape"):
        acc.add(gt_THWC, gt_THWC, mask_THW[:-1], prompt)
    with pytest.raises(ValueError, match="boolean"):
        acc.add(gt_THWC, gt_THWC, mask_THW.astype(np.uint8), prompt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc.add(gt_THWC / 127.5, gt_THWC, mask_THW, prompt)
    with pytest.raises(ValueError, match="T, H, W, 3"):
        acc.add(gt_THWC[..., 0], gt_THWC[..., 0], mask_THW, prompt)
    with pytest.raises(ValueError, match="prompt"):
        acc.add(gt_THWC, gt_THWC, mask_THW, "forest with purple squares")
    with pytest.raises(ValueError, match="uint8"):
        reference_models(gt_THWC / 255.0, 0, prompt)
    assert acc.result()["episodes"] == 0  # nothing was added by the failed calls


def test_empty_mask_gives_nan_and_zero_counts(episodes):
    """Documented: an empty mask adds counts of 0, and a metric over nothing is NaN."""
    gt_THWC, mask_THW, prompt = episodes[0]
    acc = RealismAccumulator()
    acc.add(gt_THWC, gt_THWC, np.zeros_like(mask_THW), prompt)
    out = acc.result()
    assert out["episodes"] == 1 and out["masked_pixels"] == 0 and out["contrast_patches"] == 0
    for key in ("contrast_ratio", "hf_energy_ratio", "palette_distance", "landmark_recall"):
        assert math.isnan(out[key]), key
    # Added to a real episode, it changes nothing but the episode count.
    acc.add(gt_THWC, gt_THWC, mask_THW, prompt)
    assert acc.result()["contrast_ratio"] == 1.0
