"""Unseen-region realism: does what a world model paints where no condition could show it look
like the toy world, even though it cannot match it pixel for pixel?

Fidelity (``streamkd.eval.metrics.psnr``) cannot judge pixels whose world location no condition
revealed: any plausible painting is as good as any other. These metrics compare *statistics* of
the model's frames to those of the ground truth of the same episode, both taken on the same
boolean mask of unseen pixels (typically ``~known_mask(actions, world)`` over frames 1..):

* ``contrast_ratio``: mean local standard deviation of grayscale (channel mean, [0, 1]) over the
  masked pixels of non-overlapping 8 x 8 patches that lie at least 75% inside the mask (8 x 8 at
  every frame size; a ragged right/bottom margin is left out), model / ground truth, over the
  same patches. Flat or blurred paintings score << 1, noise >> 1.
* ``hf_energy_ratio``: mean squared high-pass response (grayscale minus its 3 x 3 box blur) at
  the masked pixels whose 3 x 3 neighbourhood lies inside the frame, model / ground truth.
* ``palette_distance``: sliced Wasserstein-1 distance (32 fixed random unit directions, [0, 1]
  RGB units) between the model's and the ground truth's masked pixel colours, each subsampled
  to at most 20000 pixels by a fixed seed (the same pixels for both when the masks match);
  averaged over episodes. ``palette_spread`` gives the same distance between ground truths of
  different held-out seeds under one prompt: the natural variation of a biome.
* ``landmark_recall``: landmarks of the prompt's colour *and* shape per 1000 masked pixels,
  model / ground truth (``landmark_colour_recall``: of its colour, any shape). Detection per
  frame (``landmark_components``): a pixel is of the prompt's colour when, of all reference
  colours (every landmark colour over its shade range [0.8, 1.0], the moving objects' colour,
  samples of the prompt biome's colour field), it is nearest to that one, and within 80 RGB
  units of it; moving objects and their outline are painted out. 4-connected components of
  >= 6 px with a solid core (not a 1 px line: the outlines of landmarks are of another colour,
  and a black or white prompt would otherwise count every outline ring) are landmarks. A
  component's shape is judged by its fill ratio (area / bbox area) and, for apex-up triangles,
  by its centroid sitting low in its bbox (``SHAPE_RULES``), unless it touches the frame border:
  a cut landmark counts without a shape check. A component counts when its centroid lies in the
  mask; a landmark seen in several frames counts once per frame, for model and ground truth
  alike. On ground truth the detector finds the exact-colour landmarks of the view (up to
  slivers under other landmarks or moving objects), and ~none for another colour.

Pooling: every metric is a ratio of sums (or, for the palette, a mean of per-episode distances),
so ``RealismAccumulator`` adds episodes and divides once at the end; an episode weighs by its
masked pixels/patches, not equally. The ``*_stats`` functions give the sums for one set of frames
if a caller wants to pool differently.

What references score (``reference_models``; tests/test_realism.py: 16 held-out 64 x 64
episodes of 16 frames, mask ``~known_mask`` over frames 1.., pooled)::

                    contrast  hf      palette  landmark recall (colour only)
    ground_truth    1.000     1.000   0.000    1.000 (1.000)    exact by construction
    frame0_copy     0.815     0.792   0.022    0.720 (0.714)    realistic, unfaithful
    blurred_mean    0.185     0.001   0.022    0.000 (0.124)    15 x 15 box blur of ground truth
    random_texture  3.609     6.810   0.286    0.000 (0.004)    uniform RGB noise
    colour_blotches 0.179     0.118   0.020    0.079 (1.108)    blurred mean + 8 x 8 blocks of the
                                                               landmark colour at the GT's density

A landmark must have its outline (``OUTLINE_MIN``): without that rule the colour blotches a
guided teacher paints counted as landmarks (docs/teacher.md, 2026-12-03); the toy codec's round
trip of ground truth keeps 0.92 of the landmarks with it.

The ground-truth palette spread (``palette_spread``, same prompt, other seeds) is 0.02 on
average, 0.03 at most over those prompts: a palette distance below it is as close as another
place of the same biome; noise is ~10x beyond it. The palette alone does not see blur (the
blurred mean keeps the colours on average): contrast and HF energy do.

Empty masks: an episode whose mask (or usable patch/pixel set) is empty adds counts of 0; a
metric whose pooled denominator is 0 (no masked pixel at all, or no landmark in the ground
truth) is NaN in ``result()``, next to the counts that explain it.

Legend: T frames, H x W pixels, C = 3 (RGB), N pixels, D projection directions, L landmark
colours, P point reference colours, U distinct pixel colours.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamkd.data.toyworld import (
    _BIOMES,
    _COLOURS,
    OBJECT_RGB,
    ToyWorld,
    ToyWorldConfig,
    heldout_seed,
    parse_prompt,
    random_actions,
)
from streamkd.eval.metrics import _object_mask, _to_numpy, _to_unit_float

PATCH = 8
PATCH_MIN_INSIDE = 0.75
PALETTE_DIRECTIONS = 32
PALETTE_SEED = 0x5EED
PALETTE_MAX_PIXELS = 20_000
LANDMARK_TOL_RGB = 80.0
LANDMARK_MIN_AREA = 6
SHAPE_RULES: dict[str, tuple[float, float, bool]] = {
    "triangles": (0.40, 0.80, True),
    "circles": (0.60, 0.90, False),
    "squares": (0.90, 1.0 + 1e-9, False),
}
"""Shape -> (fill lo, fill hi, apex up): a component is of a shape when its fill ratio (area /
bbox area) is in [lo, hi) and its centroid sits low in its bbox (``TRIANGLE_DROP``) exactly when
apex up. The toy sprites give fill 1.0 (squares), 0.76-0.89 (circles), 0.58-0.68 (triangles) and
a relative centroid height of 0.5, 0.5 and 0.6-0.67; the ranges are generous so that a codec's
blur (rounded corners, eroded tips) still fits: a 3 x 3 box blur takes a circle's fill down to
about 0.65, into the triangles' fill range, and the centroid height still tells them apart. The
rules do not overlap."""

OUTLINE_MIN = 0.5
"""Share of a component's outer 4-neighbours in the outline colour (black; white around black
landmarks) at or above which it counts as a landmark: every toy-world landmark has a 1 px outline,
a blotch of the right colour has none (a guided teacher paints such blotches: docs/teacher.md)."""
OUTLINE_DARK = 80.0 / 255.0
"""An outline pixel of a non-black landmark has every channel at or below this."""
OUTLINE_LIGHT = 170.0 / 255.0
"""An outline pixel of a black landmark has every channel at or above this."""
TRIANGLE_DROP = 0.545
"""(centroid row - top row) / (bottom row - top row) at or above which a component is apex up."""


# ---------------------------------------------------------------------------------------------
# Input checks and small image helpers
# ---------------------------------------------------------------------------------------------


def _check_frames(frames: Any, name: str) -> np.ndarray:
    """[T, H, W, 3] uint8 or float in [0, 1] -> float64 [T, H, W, 3] in [0, 1]."""
    frames_THWC = _to_unit_float(frames, name)
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"{name} must be frames [T, H, W, 3], got shape {frames_THWC.shape}")
    if min(frames_THWC.shape[1:3]) < PATCH:
        raise ValueError(
            f"{name} frames {frames_THWC.shape[1:3]} are smaller than {PATCH} x {PATCH} pixels"
        )
    return frames_THWC


def _check_mask(mask: Any, frames_THWC: np.ndarray) -> np.ndarray:
    mask_THW = _to_numpy(mask, "mask")
    if mask_THW.dtype != np.bool_:
        raise ValueError(
            f"mask must be boolean [T, H, W], got dtype {mask_THW.dtype}; e.g. ~known_mask(...)"
        )
    if mask_THW.shape != frames_THWC.shape[:3]:
        raise ValueError(
            f"mask shape {mask_THW.shape} != frames' [T, H, W] {frames_THWC.shape[:3]}"
        )
    return mask_THW


def _check_pair(model: Any, gt: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model_THWC = _check_frames(model, "model_frames")
    gt_THWC = _check_frames(gt, "gt_frames")
    if model_THWC.shape != gt_THWC.shape:
        raise ValueError(
            f"model_frames shape {model_THWC.shape} != gt_frames shape {gt_THWC.shape}"
        )
    return model_THWC, gt_THWC, _check_mask(mask, gt_THWC)


def _box_sum(x_THW: np.ndarray, k: int) -> np.ndarray:
    """[T, H - k + 1, W - k + 1]: sums over every k x k window (valid positions only)."""
    c = np.cumsum(np.cumsum(x_THW, axis=1), axis=2)
    c = np.pad(c, ((0, 0), (1, 0), (1, 0)))
    return c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]


def box_blur(frames: Any, k: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: k x k box blur (odd k) of each frame, edges replicated."""
    frames_THWC = _check_frames(frames, "frames")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"box blur size must be odd and >= 1, got {k}")
    r = k // 2
    out_THWC = np.empty_like(frames_THWC)
    for c in range(3):
        padded_THW = np.pad(frames_THWC[..., c], ((0, 0), (r, r), (r, r)), mode="edge")
        out_THWC[..., c] = _box_sum(padded_THW, k) / (k * k)
    return np.rint(out_THWC * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# 1. contrast and 2. high-frequency energy
# ---------------------------------------------------------------------------------------------


def contrast_stats(frames: Any, mask: Any) -> dict[str, float]:
    """Sum of grayscale standard deviations over the usable 8 x 8 patches, and their count.

    A patch is usable when >= 75% of its pixels are masked; its std is taken over those masked
    pixels. Which patches are usable depends on the mask only, so model and ground truth sums
    taken with one mask cover the same patches.
    """
    frames_THWC = _check_frames(frames, "frames")
    mask_THW = _check_mask(mask, frames_THWC)
    t, h, w = mask_THW.shape
    ph, pw = h // PATCH, w // PATCH
    gray_THW = frames_THWC.mean(axis=-1)

    def patches(x_THW: np.ndarray) -> np.ndarray:  # -> [T, ph, pw, PATCH * PATCH]
        x = x_THW[:, : ph * PATCH, : pw * PATCH].reshape(t, ph, PATCH, pw, PATCH)
        return x.transpose(0, 1, 3, 2, 4).reshape(t, ph, pw, PATCH * PATCH)

    gray_P, mask_P = patches(gray_THW), patches(mask_THW)
    inside = mask_P.sum(axis=-1)
    usable = inside >= PATCH_MIN_INSIDE * PATCH * PATCH
    n = np.maximum(inside, 1)
    mean = np.where(mask_P, gray_P, 0.0).sum(axis=-1) / n
    var = np.where(mask_P, np.square(gray_P - mean[..., None]), 0.0).sum(axis=-1) / n
    return {"sum": float(np.sqrt(var)[usable].sum()), "count": int(usable.sum())}


def hf_stats(frames: Any, mask: Any) -> dict[str, float]:
    """Sum of squared high-pass responses (gray - 3 x 3 box mean) over the masked pixels whose
    3 x 3 neighbourhood is inside the frame, and their count."""
    frames_THWC = _check_frames(frames, "frames")
    mask_THW = _check_mask(mask, frames_THWC)
    gray_THW = frames_THWC.mean(axis=-1)
    high_THW = gray_THW[:, 1:-1, 1:-1] - _box_sum(gray_THW, 3) / 9.0
    inner_THW = mask_THW[:, 1:-1, 1:-1]
    return {"sum": float(np.square(high_THW)[inner_THW].sum()), "count": int(inner_THW.sum())}


# ---------------------------------------------------------------------------------------------
# 3. palette
# ---------------------------------------------------------------------------------------------


def _palette_directions() -> np.ndarray:
    """[D, 3] fixed random unit directions."""
    d_D3 = np.random.default_rng(PALETTE_SEED).standard_normal((PALETTE_DIRECTIONS, 3))
    return d_D3 / np.linalg.norm(d_D3, axis=1, keepdims=True)


def _masked_colours(frames_THWC: np.ndarray, mask_THW: np.ndarray, max_pixels: int) -> np.ndarray:
    """[N, 3] masked pixel colours, subsampled by a fixed seed to at most max_pixels: two calls
    with the same mask pick the same pixels."""
    colours_N3 = frames_THWC[mask_THW]
    if len(colours_N3) > max_pixels:
        rng = np.random.default_rng(PALETTE_SEED)
        keep_N = np.sort(rng.choice(len(colours_N3), max_pixels, replace=False))
        colours_N3 = colours_N3[keep_N]
    return colours_N3


def _sliced_w1(a_N3: np.ndarray, b_M3: np.ndarray) -> float:
    """Mean over the fixed directions of the exact 1-D Wasserstein-1 distance between the
    projected empirical distributions: the integral over q in (0, 1) of |F_a^-1(q) - F_b^-1(q)|,
    the quantile functions being step functions with breaks at i/N and j/M."""
    n, m = len(a_N3), len(b_M3)
    dirs_D3 = _palette_directions()
    a_DN = np.sort(dirs_D3 @ a_N3.T, axis=1)
    b_DM = np.sort(dirs_D3 @ b_M3.T, axis=1)
    if n == m:
        return float(np.abs(a_DN - b_DM).mean())
    breaks = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    width = np.diff(breaks, prepend=0.0)
    mid = breaks - width / 2
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return float((np.abs(a_DN[:, ia] - b_DM[:, ib]) * width).sum(axis=1).mean())


def palette_distance(
    frames_a: Any,
    mask_a: Any,
    frames_b: Any,
    mask_b: Any | None = None,
    max_pixels: int = PALETTE_MAX_PIXELS,
) -> float:
    """Sliced W1 distance ([0, 1] RGB units) between the colours of two sets of masked pixels.

    ``mask_b`` defaults to ``mask_a`` (model vs ground truth of one episode). NaN when either
    mask is empty.
    """
    a_THWC = _check_frames(frames_a, "frames_a")
    ma_THW = _check_mask(mask_a, a_THWC)
    b_THWC = _check_frames(frames_b, "frames_b")
    mb_THW = ma_THW if mask_b is None else _check_mask(mask_b, b_THWC)
    if mb_THW.shape != b_THWC.shape[:3]:
        raise ValueError(f"mask shape {mb_THW.shape} != frames_b's [T, H, W] {b_THWC.shape[:3]}")
    if not ma_THW.any() or not mb_THW.any():
        return float("nan")
    return _sliced_w1(
        _masked_colours(a_THWC, ma_THW, max_pixels), _masked_colours(b_THWC, mb_THW, max_pixels)
    )


def palette_spread(
    world: ToyWorldConfig,
    prompt: str,
    num_seeds: int = 4,
    num_frames: int = 16,
    first_index: int = 1000,
) -> dict[str, float]:
    """Palette distance between ground truths of different held-out seeds under one prompt.

    Renders held-out episodes ``first_index .. first_index + num_seeds - 1`` with ``prompt`` and
    random actions (seeded by the episode seed), and returns the mean, min and max of the
    distance over all pairs, on all pixels of frames 1.. (a place of the same biome elsewhere).
    A model whose ``palette_distance`` is within ``max`` paints colours as a ground truth of
    another place would.
    """
    if num_seeds < 2 or num_frames < 2:
        raise ValueError(f"need num_seeds >= 2 and num_frames >= 2, got {num_seeds}, {num_frames}")
    episodes = []
    for i in range(num_seeds):
        seed = heldout_seed(first_index + i)
        actions_T = random_actions(np.random.default_rng(seed), num_frames)
        episodes.append(ToyWorld(world, seed, prompt).render(actions_T, num_frames)[1:])
    full_THW = np.ones(episodes[0].shape[:3], dtype=bool)
    dists = [
        palette_distance(a, full_THW, b, full_THW)
        for a, b in itertools.combinations(episodes, 2)
    ]
    return {"mean": float(np.mean(dists)), "min": float(np.min(dists)), "max": float(np.max(dists))}


# ---------------------------------------------------------------------------------------------
# 4. landmarks
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _reference_colours(prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Reference colours of a prompt's world in RGB [0, 255] for the nearest-colour rule.

    Returns the landmark colours' shade segments (ends lo_L3, hi_L3 over shades [0.8, 1.0]),
    the point colours P3 (the moving objects' colour and samples of the biome's colour field)
    and the index of the prompt's colour in the segments. The field is sampled over its whole
    construction (``lo + (hi - lo) c``, accent weight ``a`` in [0, 0.4], texture brightness
    x0.9..1.1), so a field pixel lies close to some sample and is not taken for a landmark just
    because it is far from the biome's three palette corners.
    """
    style = parse_prompt(prompt)
    names = list(_COLOURS)
    base_L3 = np.asarray([_COLOURS[c] for c in names], dtype=np.float64)
    (f_lo, f_hi, f_acc), _ = _BIOMES[style.biome]
    f_lo, f_hi, f_acc = (np.asarray(c, dtype=np.float64) for c in (f_lo, f_hi, f_acc))
    grid = np.meshgrid(
        np.linspace(0.0, 1.0, 9),  # c: low -> high
        np.linspace(0.0, 0.4, 5),  # a: accent weight
        np.linspace(0.9, 1.1, 5),  # g: texture brightness
        indexing="ij",
    )
    cc, aa, gg = (v.reshape(-1, 1) for v in grid)
    field_P3 = np.minimum(((f_lo + (f_hi - f_lo) * cc) * (1.0 - aa) + f_acc * aa) * gg, 255.0)
    points_P3 = np.concatenate([np.asarray([OBJECT_RGB], dtype=np.float64), field_P3])
    lo_L3 = 0.8 * base_L3
    for array in (lo_L3, base_L3, points_P3):  # cached: shared by every call
        array.flags.writeable = False
    return lo_L3, base_L3, points_P3, names.index(style.colour)


def landmark_hits(frames: Any, prompt: str) -> np.ndarray:
    """bool [T, H, W]: pixels taken for the prompt's landmark colour.

    A pixel is a hit when its nearest reference colour (``_reference_colours``: every landmark
    colour's shade segment, the moving-object colour, samples of the prompt biome's colour
    field) is the prompt's landmark colour, within ``LANDMARK_TOL_RGB`` Euclidean RGB units.
    Pixels of moving objects (and their outline, ``metrics._object_mask``) never are.
    """
    frames_THWC = _check_frames(frames, "frames")
    lo_L3, hi_L3, points_P3, target = _reference_colours(prompt)
    rgb_N3 = frames_THWC.reshape(-1, 3) * 255.0
    seg_L3 = hi_L3 - lo_L3

    def seg_d2(x_N3: np.ndarray, lo_3: np.ndarray, seg_3: np.ndarray) -> np.ndarray:
        """Squared distance to a segment: project, clip to it, measure."""
        u_N = np.clip((x_N3 - lo_3) @ seg_3 / (seg_3 @ seg_3), 0.0, 1.0)
        return np.square(x_N3 - lo_3 - u_N[:, None] * seg_3).sum(axis=1)

    # Only pixels within the tolerance of the prompt's colour can be hits; the competitors are
    # measured on their distinct colours alone (frames repeat most colours), which keeps this
    # cheap on ~200 field samples.
    target_d2_N = seg_d2(rgb_N3, lo_L3[target], seg_L3[target])
    cand_N = np.flatnonzero(target_d2_N <= LANDMARK_TOL_RGB**2)
    colours_U3, inverse_N = np.unique(rgb_N3[cand_N], axis=0, return_inverse=True)
    target_d2_U = seg_d2(colours_U3, lo_L3[target], seg_L3[target])
    point_d2_U = np.empty(len(colours_U3))
    for i in range(0, len(colours_U3), 8192):  # chunks bound the [U, P] matrix's memory
        c_U3 = colours_U3[i : i + 8192]
        point_d2_U[i : i + 8192] = (
            (c_U3**2).sum(axis=1)[:, None] - 2.0 * c_U3 @ points_P3.T + (points_P3**2).sum(axis=1)
        ).min(axis=1)
    nearest_U = target_d2_U < point_d2_U
    for other in range(len(lo_L3)):
        if other != target:
            nearest_U &= target_d2_U < seg_d2(colours_U3, lo_L3[other], seg_L3[other])
    hits_N = np.zeros(len(rgb_N3), dtype=bool)
    hits_N[cand_N] = nearest_U[inverse_N.reshape(-1)]
    return hits_N.reshape(frames_THWC.shape[:3]) & ~_object_mask(frames_THWC)


def _label_components(hits_THW: np.ndarray) -> np.ndarray:
    """int64 [T, H, W]: 4-connected component labels within each frame (-1 off the hits).

    Min-label propagation: every hit starts with its own flat index and takes the smallest
    label among its 4 neighbours until nothing changes; a component ends up labelled by its
    smallest flat index. Iterations grow with a component's geodesic length, small here.
    """
    big = np.iinfo(np.int64).max
    labels = np.where(hits_THW, np.arange(hits_THW.size).reshape(hits_THW.shape), big)
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        new = np.minimum.reduce([
            labels,
            padded[:, :-2, 1:-1],
            padded[:, 2:, 1:-1],
            padded[:, 1:-1, :-2],
            padded[:, 1:-1, 2:],
        ])
        new = np.where(hits_THW, new, big)
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(hits_THW, labels, -1)


def _solid(hits_THW: np.ndarray) -> np.ndarray:
    """bool [T, H, W]: hits whose 4 neighbours are hits too, outside the frame counting as a hit
    (so a landmark cut by the border keeps its core). 1 px lines, the outlines of landmarks of
    another colour, have none."""
    p = np.pad(hits_THW, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    return hits_THW & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]


def landmark_components(frames: Any, prompt: str) -> dict[str, np.ndarray]:
    """Landmark candidates of the prompt's colour: one entry per component, arrays [K].

    A component is a 4-connected set of ``landmark_hits`` in one frame with at least
    ``LANDMARK_MIN_AREA`` pixels and a solid core (``_solid``: not a 1 px line or ring). Keys:
    ``t``, ``y``, ``x`` (frame and rounded centroid), ``area``, ``fill`` (area / bbox area),
    ``cut`` (touches the frame border), ``shape`` (the ``SHAPE_RULES`` name it fits, "" for
    none; cut components are not judged and get ""), ``outlined`` (the share of its outer
    4-neighbours in the outline's colour).
    """
    frames_THWC = _check_frames(frames, "frames")
    hits_THW = landmark_hits(frames_THWC, prompt)
    _, h, w = hits_THW.shape
    labels_THW = _label_components(hits_THW)
    tt, yy, xx = np.nonzero(hits_THW)
    ids, comp = np.unique(labels_THW[tt, yy, xx], return_inverse=True)
    n = len(ids)
    area = np.bincount(comp, minlength=n)
    core = np.bincount(comp, weights=_solid(hits_THW)[tt, yy, xx], minlength=n)
    cy = np.bincount(comp, weights=yy, minlength=n) / np.maximum(area, 1)
    cx = np.bincount(comp, weights=xx, minlength=n) / np.maximum(area, 1)
    first = np.unique(comp, return_index=True)[1]
    y0, x0 = np.full(n, h), np.full(n, w)
    y1, x1 = np.full(n, -1), np.full(n, -1)
    np.minimum.at(y0, comp, yy)
    np.minimum.at(x0, comp, xx)
    np.maximum.at(y1, comp, yy)
    np.maximum.at(x1, comp, xx)
    fill = area / np.maximum((y1 - y0 + 1) * (x1 - x0 + 1), 1)
    apex_up = (cy - y0) / np.maximum(y1 - y0, 1) >= TRIANGLE_DROP
    # outer ring: the in-frame 4-neighbours of a component's pixels that are not hits, and how
    # many of them have the outline's colour (a neighbour shared by two sides counts twice)
    if parse_prompt(prompt).colour == "black":
        outline_THW = (frames_THWC >= OUTLINE_LIGHT).all(axis=-1)
    else:
        outline_THW = (frames_THWC <= OUTLINE_DARK).all(axis=-1)
    ring = np.zeros(n)
    ring_outline = np.zeros(n)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = yy + dy, xx + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        ny, nx, t_in, c_in = ny[inside], nx[inside], tt[inside], comp[inside]
        outer = ~hits_THW[t_in, ny, nx]
        np.add.at(ring, c_in[outer], 1.0)
        np.add.at(ring_outline, c_in[outer], outline_THW[t_in, ny, nx][outer])
    outlined = ring_outline / np.maximum(ring, 1.0)
    cut = (y0 == 0) | (x0 == 0) | (y1 == h - 1) | (x1 == w - 1)
    shape = np.full(n, "", dtype=object)
    for name, (lo, hi, up) in SHAPE_RULES.items():
        shape[~cut & (fill >= lo) & (fill < hi) & (apex_up == up)] = name
    keep = (area >= LANDMARK_MIN_AREA) & (core > 0)
    return {
        "t": tt[first][keep],
        "y": np.rint(cy[keep]).astype(np.int64),
        "x": np.rint(cx[keep]).astype(np.int64),
        "area": area[keep],
        "fill": fill[keep],
        "cut": cut[keep],
        "shape": shape[keep],
        "outlined": outlined[keep],
    }


def landmark_stats(frames: Any, mask: Any, prompt: str) -> dict[str, int]:
    """Landmarks of the prompt's colour in the masked region of one set of frames.

    Returns ``shape`` (components of the prompt's colour and shape, outlined as every landmark
    is: ``OUTLINE_MIN``), ``colour`` (of its colour, any shape or outline) and ``pixels`` (masked
    pixels, the density's denominator). Components as in ``landmark_components``, counted when
    their centroid is a masked pixel; one cut by the frame border counts for the shape without a
    shape check (too little of it is in view), not without its outline.
    """
    frames_THWC = _check_frames(frames, "frames")
    mask_THW = _check_mask(mask, frames_THWC)
    c = landmark_components(frames_THWC, prompt)
    counted = mask_THW[c["t"], c["y"], c["x"]]
    shaped = (c["cut"] | (c["shape"] == parse_prompt(prompt).shape)) & (c["outlined"] >= OUTLINE_MIN)
    return {
        "shape": int((counted & shaped).sum()),
        "colour": int(counted.sum()),
        "pixels": int(mask_THW.sum()),
    }


# ---------------------------------------------------------------------------------------------
# Pooling and references
# ---------------------------------------------------------------------------------------------


_COUNT_KEYS = (
    "contrast_patches", "hf_pixels", "palette_episodes", "landmarks_model", "landmarks_gt",
    "colour_blobs_model", "colour_blobs_gt", "masked_pixels", "episodes",
)  # fmt: skip


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


class RealismAccumulator:
    """Pools the realism metrics over episodes: ``add`` one episode at a time, then ``result``.

    Ratios are ratios of pooled sums (an episode weighs by its masked patches/pixels); the
    palette distance is the mean over episodes with a non-empty mask.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {
            "contrast_model": 0.0, "contrast_gt": 0.0, "contrast_patches": 0,
            "hf_model": 0.0, "hf_gt": 0.0, "hf_pixels": 0,
            "palette_sum": 0.0, "palette_episodes": 0,
            "landmarks_model": 0, "landmarks_gt": 0,
            "colour_blobs_model": 0, "colour_blobs_gt": 0,
            "masked_pixels": 0, "episodes": 0,
        }  # fmt: skip

    def add(self, model_frames: Any, gt_frames: Any, mask: Any, prompt: str) -> None:
        """One episode: model and ground-truth frames [T, H, W, 3] (uint8, or float in [0, 1])
        and the bool mask [T, H, W] of pixels no condition could reveal."""
        model_THWC, gt_THWC, mask_THW = _check_pair(model_frames, gt_frames, mask)
        parse_prompt(prompt)
        s = self._sums
        cm, cg = contrast_stats(model_THWC, mask_THW), contrast_stats(gt_THWC, mask_THW)
        s["contrast_model"] += cm["sum"]
        s["contrast_gt"] += cg["sum"]
        s["contrast_patches"] += cg["count"]
        hm, hg = hf_stats(model_THWC, mask_THW), hf_stats(gt_THWC, mask_THW)
        s["hf_model"] += hm["sum"]
        s["hf_gt"] += hg["sum"]
        s["hf_pixels"] += hg["count"]
        if mask_THW.any():
            s["palette_sum"] += palette_distance(model_THWC, mask_THW, gt_THWC)
            s["palette_episodes"] += 1
        lm = landmark_stats(model_THWC, mask_THW, prompt)
        lg = landmark_stats(gt_THWC, mask_THW, prompt)
        s["landmarks_model"] += lm["shape"]
        s["landmarks_gt"] += lg["shape"]
        s["colour_blobs_model"] += lm["colour"]
        s["colour_blobs_gt"] += lg["colour"]
        s["masked_pixels"] += lg["pixels"]
        s["episodes"] += 1

    def result(self) -> dict[str, float]:
        """The metrics (NaN where a denominator is 0) and the counts behind them.

        Keys: contrast_ratio, hf_energy_ratio, palette_distance, landmark_recall,
        landmark_colour_recall, landmark_density_model, landmark_density_gt (per 1000 masked
        pixels), and the raw sums/counts (contrast_patches, hf_pixels, palette_episodes,
        landmarks_model, landmarks_gt, colour_blobs_model, colour_blobs_gt, masked_pixels,
        episodes).
        """
        s = self._sums
        per_k = s["masked_pixels"] / 1000.0
        out = {
            "contrast_ratio": _ratio(s["contrast_model"], s["contrast_gt"]),
            "hf_energy_ratio": _ratio(s["hf_model"], s["hf_gt"]),
            "palette_distance": _ratio(s["palette_sum"], s["palette_episodes"]),
            "landmark_recall": _ratio(s["landmarks_model"], s["landmarks_gt"]),
            "landmark_colour_recall": _ratio(s["colour_blobs_model"], s["colour_blobs_gt"]),
            "landmark_density_model": _ratio(s["landmarks_model"], per_k),
            "landmark_density_gt": _ratio(s["landmarks_gt"], per_k),
        }
        out.update((key, s[key]) for key in _COUNT_KEYS)
        return out


REFERENCES: tuple[str, ...] = ("ground_truth", "frame0_copy", "blurred_mean", "random_texture", "colour_blotches")


def reference_models(gt_frames: Any, seed: int, prompt: str) -> dict[str, np.ndarray]:
    """Trivial "models" of an episode, uint8 [T, H, W, 3] each, keyed by ``REFERENCES``.

    * ``ground_truth``: the frames themselves (the ceiling: 1.0 on every ratio, palette 0);
    * ``frame0_copy``: frame 0 repeated: realistic (another place of the same world), unfaithful;
    * ``blurred_mean``: each frame under a 15 x 15 box blur: right colours on average, no detail;
    * ``random_texture``: uniform random RGB noise from ``seed``;
    * ``colour_blotches``: the blurred mean with solid 8 x 8 blocks of the prompt's landmark colour
      on the token grid, as many per frame as the ground truth has landmarks in view (at least
      one) -- what a guided teacher paints where it should paint landmarks (docs/teacher.md):
      the right colour at the right density, no shape, no outline.
    """
    gt_THWC = _to_numpy(gt_frames, "gt_frames")
    if gt_THWC.dtype != np.uint8 or gt_THWC.ndim != 4 or gt_THWC.shape[-1] != 3:
        raise ValueError(
            f"gt_frames must be uint8 [T, H, W, 3], got {gt_THWC.dtype} {gt_THWC.shape}"
        )
    rng = np.random.default_rng(seed)
    return {
        "ground_truth": gt_THWC.copy(),
        "frame0_copy": np.repeat(gt_THWC[:1], len(gt_THWC), axis=0),
        "blurred_mean": box_blur(gt_THWC, 15),
        "random_texture": rng.integers(0, 256, size=gt_THWC.shape, dtype=np.uint8),
        "colour_blotches": _colour_blotches(gt_THWC, prompt, rng),
    }


def _colour_blotches(gt_THWC: np.ndarray, prompt: str, rng: np.random.Generator, block: int = 8) -> np.ndarray:
    """The ``colour_blotches`` reference (see ``reference_models``)."""
    out = box_blur(gt_THWC, 15)
    colour = np.asarray(_COLOURS[parse_prompt(prompt).colour], dtype=np.uint8)
    per_frame = np.bincount(landmark_components(gt_THWC, prompt)["t"], minlength=len(gt_THWC))
    T, H, W, _ = gt_THWC.shape
    for t in range(T):
        for _ in range(max(1, int(per_frame[t]))):
            y, x = block * rng.integers(0, H // block), block * rng.integers(0, W // block)
            out[t, y : y + block, x : x + block] = colour
    return out


def evaluate_references(
    episodes: Sequence[tuple[np.ndarray, np.ndarray, str]], seed: int = 0
) -> dict[str, dict[str, float]]:
    """``RealismAccumulator.result()`` of every reference over episodes (gt_frames, mask,
    prompt): the table that makes a model's numbers readable."""
    accs = {name: RealismAccumulator() for name in REFERENCES}
    for i, (gt_THWC, mask_THW, prompt) in enumerate(episodes):
        for name, frames_THWC in reference_models(gt_THWC, seed + i, prompt).items():
            accs[name].add(frames_THWC, gt_THWC, mask_THW, prompt)
    return {name: acc.result() for name, acc in accs.items()}
