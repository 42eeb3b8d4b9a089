"""Drift, honestly: frame statistics of long untethered rollouts against the ground truth's range.

Once the camera wanders far from everything the model was shown (10x, 50x, 200x the teacher's
horizon of random actions), there is no pixel a model could know, so fidelity cannot be scored.
What can be checked is whether the frames still *look like the world*: their statistics are
compared with those of the ground-truth frames of the same episode.

Per frame (``frame_statistics``; gray = channel mean in [0, 1]):

* ``brightness`` -- mean gray;
* ``contrast``   -- standard deviation of gray over the frame's pixels;
* ``hf_energy``  -- mean of ``(gray - box3(gray))**2`` over the interior pixels (the 1 px border,
                    where a 3x3 box has no full support, is left out): fine detail; blur lowers
                    it, noise raises it;
* ``black_px``   -- share of pixels that are near-black (every channel < ``black_level`` = 10);
* ``white_px``   -- share of pixels that are near-white-saturated (every channel > 245);
* ``frozen`` (``frozen_frames``) -- frame t >= 1 is *frozen* when the camera moved into it
  (``camera_offsets`` differ between t-1 and t) but the mean absolute RGB difference to frame
  t-1, in [0, 1] units, is below ``frozen_mad`` = 0.004 (about one gray level). Pixels that show
  the toy world's moving objects (``OBJECT_RGB``, dilated as in ``metrics``) in either frame are
  left out, so objects moving over a still background do not unfreeze it. Frame 0 and frames the
  camera did not move into are never frozen. Over 12,000 moving ground-truth steps (60 held-out
  episodes, every biome) the smallest such difference is 0.0077 (ocean), about twice the
  threshold. A frozen frame that a generator re-noises by more than about one gray level per
  pixel escapes this test; a (nearly) black frame is frozen too, so a fade to black scores both.

Per window of frame indices ``[lo, hi)`` (``DriftStats.result``; ``horizon_windows`` gives
``[(k-1)H, kH)`` per multiple k, ``[1, H)`` for k = 1 since frame 0 is the given first frame),
pooled over episodes by summing per-frame values and counts, so pooling is exact:

* ``model[s]``, ``ground_truth[s]`` -- mean of statistic s over the window's frames;
* ``ratio[s]`` -- ``model[s] / ground_truth[s]``; 1.0 when both are 0 (neither has any of it,
  e.g. no saturated pixels), ``inf`` when only the ground truth's is 0;
* ``out_of_range[s]`` -- share of the window's model frames whose s lies strictly outside the
  ground truth's [p1, p99] of s over the *whole* episode (all its frames, every window). By
  construction the ground truth itself scores about 2% on a continuous statistic (1% below p1,
  1% above p99), less on ones with ties such as ``white_px`` (often 0 throughout);
* ``model["frozen"]`` -- frozen frames / frames the camera moved into (NaN when the window has
  no such frame);
* ``model["black_frames"]``, ``model["white_frames"]`` -- share of frames with more than
  ``blank_frame_share`` = 50% near-black (near-white) pixels. The two pixel sets are disjoint,
  so a frame is at most one of them and "black or saturated" is their sum.

``ground_truth`` carries the same frame figures for the ground truth (``frozen`` 0 there);
``ground_truth_reference`` scores the ground truth as if it were the model, the row that makes
the others readable (ratios 1, out of range about 2%, frozen 0).

Dark biomes: lava is the darkest (mean gray 0.11 to 0.21), but its red channel stays >= 40
outside the outlines (40 seeds checked), so its pixels are not near-black and a lava episode has
no black frames (its near-black pixels, at most 6% of a frame, are the 1 px black outlines every
biome has). No biome is excluded; a fade to black does reach the near-black level earlier on lava
than on bright biomes.

Shape legend: T frames, H x W pixels, C = 3 channels (uint8 RGB), W_ windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamkd.data.toyworld import ToyWorldConfig, camera_offsets, to_action_ids
from streamkd.eval.metrics import _object_mask, _to_numpy

STATS: tuple[str, ...] = ("brightness", "contrast", "hf_energy", "black_px", "white_px")
"""Per-frame statistics compared with the ground truth's (mean, ratio, out of range)."""

FRAME_FLAGS: tuple[str, ...] = ("frozen", "black_frames", "white_frames")
"""Per-frame flags reported as shares (``frozen`` among frames the camera moved into)."""

# Frames processed at once: bounds the float64 copies (object mask, gray) of 2400-frame rollouts.
_CHUNK_FRAMES = 256


@dataclass
class DriftConfig:
    """Thresholds of the drift statistics (see the module docstring for what each counts)."""

    frozen_mad: float = 0.004
    """A camera move whose frame differs from the previous one by less than this mean absolute
    RGB difference (in [0, 1], object pixels aside) is frozen. About one gray level; the ground
    truth's smallest difference over a move is 0.0077."""

    black_level: int = 10
    """A pixel is near-black when every channel is below this (uint8)."""

    white_level: int = 245
    """A pixel is near-white-saturated when every channel is above this (uint8)."""

    blank_frame_share: float = 0.5
    """A frame is black (white) when more than this share of its pixels is near-black (white)."""

    range_percentiles: tuple[float, float] = (1.0, 99.0)
    """The ground truth's range of a statistic over an episode: these percentiles of it."""

    def __post_init__(self) -> None:
        if not 0.0 < self.frozen_mad < 1.0:
            raise ValueError(f"DriftConfig.frozen_mad={self.frozen_mad} must be in (0, 1) (RGB in [0, 1])")
        if not 0 < self.black_level < self.white_level < 255:
            raise ValueError(
                f"DriftConfig needs 0 < black_level < white_level < 255, got "
                f"black_level={self.black_level}, white_level={self.white_level}"
            )
        if not 0.0 <= self.blank_frame_share < 1.0:
            raise ValueError(f"DriftConfig.blank_frame_share={self.blank_frame_share} must be in [0, 1)")
        lo, hi = self.range_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(
                f"DriftConfig.range_percentiles={self.range_percentiles} must be (lo, hi) with "
                "0 <= lo < hi <= 100, e.g. (1.0, 99.0)"
            )


def horizon_windows(multiples: Sequence[int], horizon: int) -> dict[str, tuple[int, int]]:
    """``{"kx": (lo, hi)}``: frames ``[(k-1)H, kH)`` of each multiple k of the horizon H.

    The 1x window starts at frame 1: frame 0 is the ground-truth first frame the model was given.
    """
    if horizon < 2:
        raise ValueError(f"horizon must be >= 2 frames, got {horizon}")
    windows = {}
    for k in multiples:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"multiples must be positive ints, got {k!r} in {tuple(multiples)}")
        windows[f"{k}x"] = (1 if k == 1 else (k - 1) * horizon, k * horizon)
    return windows


def _check_frames(frames: Any, name: str) -> np.ndarray:
    frames_THWC = _to_numpy(frames, name)
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"{name} must be [T, H, W, 3], got shape {frames_THWC.shape}")
    if frames_THWC.dtype != np.uint8:
        # The near-black/white levels are uint8 levels; a float frame would need a guess at scale.
        raise ValueError(
            f"{name} must be uint8 RGB, got dtype {frames_THWC.dtype}; convert float [0, 1] "
            "frames with (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if len(frames_THWC) < 1 or frames_THWC.shape[1] < 3 or frames_THWC.shape[2] < 3:
        raise ValueError(f"{name} needs T >= 1 frames of at least 3x3 pixels, got shape {frames_THWC.shape}")
    return frames_THWC


def frame_statistics(frames: Any, cfg: DriftConfig | None = None) -> dict[str, np.ndarray]:
    """float64 [T] per statistic in ``STATS``. frames: uint8 [T, H, W, 3] (numpy or torch)."""
    cfg = cfg or DriftConfig()
    frames_THWC = _check_frames(frames, "frames")
    out = {s: np.empty(len(frames_THWC)) for s in STATS}
    for t0 in range(0, len(frames_THWC), _CHUNK_FRAMES):
        chunk_NHWC = frames_THWC[t0 : t0 + _CHUNK_FRAMES]
        sl = slice(t0, t0 + len(chunk_NHWC))
        gray_NHW = chunk_NHWC.astype(np.float64).mean(axis=-1) / 255.0
        out["brightness"][sl] = gray_NHW.mean(axis=(1, 2))
        out["contrast"][sl] = gray_NHW.std(axis=(1, 2))
        # 3x3 box blur on the interior: sum of the nine shifted views / 9.
        h, w = gray_NHW.shape[1:]
        box_NHW = sum(gray_NHW[:, dy : h - 2 + dy, dx : w - 2 + dx] for dy in range(3) for dx in range(3)) / 9.0
        out["hf_energy"][sl] = np.square(gray_NHW[:, 1:-1, 1:-1] - box_NHW).mean(axis=(1, 2))
        out["black_px"][sl] = (chunk_NHWC < cfg.black_level).all(axis=-1).mean(axis=(1, 2))
        out["white_px"][sl] = (chunk_NHWC > cfg.white_level).all(axis=-1).mean(axis=(1, 2))
    return out


def frozen_frames(
    frames: Any,
    actions: Sequence[int | str] | Any,
    world: ToyWorldConfig | None = None,
    cfg: DriftConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(moved, frozen), bool [T] each: the camera moved into frame t; frame t is frozen.

    frames: uint8 [T, H, W, 3]; actions: [T] toy-world action ids or names (``actions[t]`` is the
    move into frame t). ``frozen`` implies ``moved``; both are False at t = 0.
    """
    cfg, world = cfg or DriftConfig(), world or ToyWorldConfig()
    frames_THWC = _check_frames(frames, "frames")
    ids_T = to_action_ids(actions)
    if len(ids_T) != len(frames_THWC):
        raise ValueError(f"got {len(ids_T)} actions for {len(frames_THWC)} frames; pass one action per frame")
    offsets_T2 = camera_offsets(ids_T, world)
    moved_T = np.zeros(len(frames_THWC), dtype=bool)
    moved_T[1:] = np.any(offsets_T2[1:] != offsets_T2[:-1], axis=1)
    mad_T = np.full(len(frames_THWC), np.inf)  # frame 0 has no previous frame
    # Chunks overlap by one frame so that every pair (t-1, t) lies in one chunk.
    for t0 in range(0, len(frames_THWC) - 1, _CHUNK_FRAMES):
        chunk_NHWC = frames_THWC[t0 : t0 + _CHUNK_FRAMES + 1].astype(np.float64) / 255.0
        objects_NHW = _object_mask(chunk_NHWC)
        keep_NHW = ~(objects_NHW[1:] | objects_NHW[:-1])
        diff_NHW = np.abs(chunk_NHWC[1:] - chunk_NHWC[:-1]).mean(axis=-1)
        kept_N = keep_NHW.sum(axis=(1, 2))
        # A pair whose pixels are all object pixels has nothing to judge: not frozen (inf).
        with np.errstate(invalid="ignore", divide="ignore"):
            mad_N = np.where(kept_N > 0, (diff_NHW * keep_NHW).sum(axis=(1, 2)) / kept_N, np.inf)
        mad_T[t0 + 1 : t0 + 1 + len(mad_N)] = mad_N
    return moved_T, moved_T & (mad_T < cfg.frozen_mad)


def _frame_flags(
    stats: dict[str, np.ndarray],
    frames_THWC: np.ndarray,
    actions_T: np.ndarray,
    world: ToyWorldConfig,
    cfg: DriftConfig,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(moved [T], {flag: bool [T]}) for the flags in ``FRAME_FLAGS``."""
    moved_T, frozen_T = frozen_frames(frames_THWC, actions_T, world, cfg)
    return moved_T, {
        "frozen": frozen_T,
        "black_frames": stats["black_px"] > cfg.blank_frame_share,
        "white_frames": stats["white_px"] > cfg.blank_frame_share,
    }


class DriftStats:
    """Accumulates drift statistics over episodes, per window; pooling is exact (sums and counts).

    ``windows``: ``{name: (lo, hi)}``, frame indices ``[lo, hi)`` (e.g. ``horizon_windows``);
    every episode must have at least ``max(hi)`` frames. ``world`` supplies ``speed_px`` for
    ``camera_offsets`` (the default ``ToyWorldConfig()`` when None).
    """

    def __init__(
        self,
        windows: Mapping[str, tuple[int, int]],
        world: ToyWorldConfig | None = None,
        cfg: DriftConfig | None = None,
    ) -> None:
        if not windows:
            raise ValueError("windows is empty; pass {name: (lo, hi)}, e.g. horizon_windows((1, 10), 12)")
        for name, bounds in windows.items():
            if len(bounds) != 2 or not all(isinstance(b, (int, np.integer)) for b in bounds):
                raise ValueError(f"window {name!r} must be a pair of ints (lo, hi), got {bounds!r}")
            lo, hi = bounds
            if not 0 <= lo < hi:
                raise ValueError(f"window {name!r} = [{lo}, {hi}) must satisfy 0 <= lo < hi")
        self.windows = {name: (int(lo), int(hi)) for name, (lo, hi) in windows.items()}
        self.world = world or ToyWorldConfig()
        self.cfg = cfg or DriftConfig()
        w = len(self.windows)
        self.episodes = 0
        self.frames_W = np.zeros(w, dtype=np.int64)
        self.moving_W = np.zeros(w, dtype=np.int64)
        # Sums over each window's frames: statistic values (model, ground truth), out-of-range
        # counts, and flag counts (frozen counts only frames the camera moved into).
        self.model_sum = {s: np.zeros(w) for s in STATS}
        self.gt_sum = {s: np.zeros(w) for s in STATS}
        self.out_count = {s: np.zeros(w, dtype=np.int64) for s in STATS}
        self.model_flags = {f: np.zeros(w, dtype=np.int64) for f in FRAME_FLAGS}
        self.gt_flags = {f: np.zeros(w, dtype=np.int64) for f in FRAME_FLAGS}

    def add(self, model_frames: Any, gt_frames: Any, actions: Sequence[int | str] | Any) -> None:
        """Add one episode: model and ground-truth frames uint8 [T, H, W, 3], actions [T]."""
        model_THWC = _check_frames(model_frames, "model_frames")
        gt_THWC = _check_frames(gt_frames, "gt_frames")
        if model_THWC.shape != gt_THWC.shape:
            raise ValueError(
                f"model_frames shape {model_THWC.shape} != gt_frames shape {gt_THWC.shape}; "
                "pass the ground truth of the same episode, frame for frame"
            )
        actions_T = to_action_ids(actions)
        num_frames = len(gt_THWC)
        if len(actions_T) != num_frames:
            raise ValueError(f"got {len(actions_T)} actions for {num_frames} frames; pass one action per frame")
        longest = max(hi for _, hi in self.windows.values())
        if longest > num_frames:
            raise ValueError(
                f"windows reach frame {longest - 1} but the episode has {num_frames} frames; "
                f"roll out at least {longest} frames or drop the longer windows"
            )
        model_stats = frame_statistics(model_THWC, self.cfg)
        gt_stats = frame_statistics(gt_THWC, self.cfg)
        moved_T, model_flags = _frame_flags(model_stats, model_THWC, actions_T, self.world, self.cfg)
        _, gt_flags = _frame_flags(gt_stats, gt_THWC, actions_T, self.world, self.cfg)
        lo_pct, hi_pct = self.cfg.range_percentiles
        outside = {}
        for s in STATS:
            # The ground truth's range over the whole episode, not the window: far windows are
            # judged against everything the world shows along this path.
            p_lo, p_hi = np.percentile(gt_stats[s], [lo_pct, hi_pct])
            outside[s] = (model_stats[s] < p_lo) | (model_stats[s] > p_hi)
        for i, (lo, hi) in enumerate(self.windows.values()):
            self.frames_W[i] += hi - lo
            self.moving_W[i] += int(moved_T[lo:hi].sum())
            for s in STATS:
                self.model_sum[s][i] += model_stats[s][lo:hi].sum()
                self.gt_sum[s][i] += gt_stats[s][lo:hi].sum()
                self.out_count[s][i] += int(outside[s][lo:hi].sum())
            for f in FRAME_FLAGS:
                self.model_flags[f][i] += int(model_flags[f][lo:hi].sum())
                self.gt_flags[f][i] += int(gt_flags[f][lo:hi].sum())
        self.episodes += 1

    def merge(self, other: DriftStats) -> None:
        """Add another accumulator's episodes (e.g. from another process) into this one."""
        if other.windows != self.windows or other.cfg != self.cfg or other.world != self.world:
            raise ValueError("can only merge DriftStats with the same windows, DriftConfig and ToyWorldConfig")
        self.episodes += other.episodes
        self.frames_W += other.frames_W
        self.moving_W += other.moving_W
        for s in STATS:
            self.model_sum[s] += other.model_sum[s]
            self.gt_sum[s] += other.gt_sum[s]
            self.out_count[s] += other.out_count[s]
        for f in FRAME_FLAGS:
            self.model_flags[f] += other.model_flags[f]
            self.gt_flags[f] += other.gt_flags[f]

    def result(self) -> dict[str, dict[str, Any]]:
        """``{window: {frames, moving_frames, episodes, model, ground_truth, ratio, out_of_range}}``.

        ``model`` and ``ground_truth``: the mean of each of ``STATS`` and the share of each of
        ``FRAME_FLAGS``; ``ratio`` and ``out_of_range``: one entry per statistic in ``STATS``.
        """
        if self.episodes == 0:
            raise ValueError("no episodes added; call add(model_frames, gt_frames, actions) first")
        out: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self.windows):
            n, moving = int(self.frames_W[i]), int(self.moving_W[i])

            def side(sums: dict[str, np.ndarray], flags: dict[str, np.ndarray]) -> dict[str, float]:
                figures = {s: float(sums[s][i] / n) for s in STATS}
                figures["frozen"] = float(flags["frozen"][i] / moving) if moving else float("nan")
                figures["black_frames"] = float(flags["black_frames"][i] / n)
                figures["white_frames"] = float(flags["white_frames"][i] / n)
                return figures

            model, gt = side(self.model_sum, self.model_flags), side(self.gt_sum, self.gt_flags)
            out[name] = {
                "frames": n,
                "moving_frames": moving,
                "episodes": self.episodes,
                "model": model,
                "ground_truth": gt,
                "ratio": {s: _ratio(model[s], gt[s]) for s in STATS},
                "out_of_range": {s: float(self.out_count[s][i] / n) for s in STATS},
            }
        return out


def _ratio(model: float, gt: float) -> float:
    """model / gt; 1.0 when both are 0 (the same: none), inf when only gt is 0."""
    if gt == 0.0:
        return 1.0 if model == 0.0 else float("inf")
    return model / gt


def ground_truth_reference(
    episodes: Iterable[tuple[Any, Sequence[int | str] | Any]],
    windows: Mapping[str, tuple[int, int]],
    world: ToyWorldConfig | None = None,
    cfg: DriftConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """``DriftStats.result()`` with the ground truth as the model: the reference row.

    episodes: ``(gt_frames [T, H, W, 3], actions [T])`` pairs. Expect ratios 1, out of range
    about 2% (p1/p99), frozen 0, and no black or white frames.
    """
    acc = DriftStats(windows, world, cfg)
    for gt_frames, actions in episodes:
        acc.add(gt_frames, gt_frames, actions)
    return acc.result()
