"""The toy world: a procedural 2D world with an exactly known ground truth.

Every stage of the pipeline (teacher pretraining, ODE pairs, distillation, evaluation) runs on
this world on a CPU with no downloads, and every metric in ``streamkd.eval`` is computed against
its exact renders. See DESIGN.md section 4.

An episode is fixed by ``(seed, prompt, actions, cfg)``:

* the *seed* fixes the geometry: smooth-field and texture noise, landmark positions and sizes,
  moving objects, and the default camera start;
* the *prompt* ``"{biome} with {colour} {shape}"`` fixes the appearance: the biome picks the
  palette of the smooth colour field and the texture, colour/shape pick the landmarks. The same
  seed under two prompts therefore gives the same layout in two styles (a prompt switch);
* the *actions* move a square camera viewport over the map, ``speed_px`` pixels per frame.

The map is a torus (``map_size`` x ``map_size``), so the camera never hits an edge and episodes
are unbounded. Moving objects (constant velocity, bouncing in a fixed world-space box) are
drawn over the static map. Map construction uses only IEEE add/mul/compare on numbers drawn from
``np.random.default_rng`` (no transcendental functions, no BLAS), so renders are bit-identical
across machines, not only across runs.

Shape legend: T frames, H = W = frame_size, C = 3 (RGB, uint8), M = map_size, N objects.
Coordinates are always ``(y, x)``; ``y`` grows downwards.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

ACTIONS: tuple[str, ...] = ("none", "up", "down", "left", "right")
"""Action names; the index is the action id."""

ACTION_DELTAS: np.ndarray = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)], dtype=np.int64)
"""[5, 2] camera displacement (dy, dx) per action in units of ``speed_px``. The camera moving
right (+x) shifts the frame content left."""
ACTION_DELTAS.flags.writeable = False

HELDOUT_SEED_BASE = 1_000_000_000
"""Held-out episodes use seeds ``HELDOUT_SEED_BASE + i``; training seeds stay below it."""

# Salts that separate the per-episode random streams. They go first in the SeedSequence entropy
# because SeedSequence pads short entropy with zeros: [seed] and [seed, 0] are the same stream.
_PROMPT_SALT = 0x9E3779B1
_ACTIONS_SALT = 0x85EBCA77
_TRAIN_SEED_SALT = 0xC2B2AE3D


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class ToyWorldConfig:
    """Size and dynamics of the toy world (the prompt sets its look, the seed its layout)."""

    frame_size: int = 64
    """Height and width of a rendered frame (the camera viewport) in pixels."""

    map_size: int = 256
    """Side of the square world map in pixels. The map is a torus: the camera wraps around."""

    speed_px: int = 8
    """Camera displacement in pixels per frame while a move action is held. 8 px is one DiT token
    of the toy model (4 px codec cells x 2x2 patches), so a move shifts the content by whole
    tokens: the model learns it as attention to a neighbouring token. At 4 px every output token
    had to be recombined from halves of two source tokens, which a small teacher did not learn
    in a CPU budget."""

    num_objects: int = 2
    """Moving objects (constant velocity, bouncing in a world-space box around the start view)."""

    num_landmarks: int = 24
    """Landmark shapes scattered on the map; their edges make camera shifts measurable."""

    def __post_init__(self) -> None:
        for name in ("frame_size", "map_size", "speed_px", "num_objects", "num_landmarks"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"ToyWorldConfig.{name} must be an int, got {value!r}")
        if self.frame_size < 16:
            raise ValueError(
                f"ToyWorldConfig.frame_size={self.frame_size} is too small: landmarks and objects "
                "need room; use frame_size >= 16"
            )
        if self.map_size < 2 * self.frame_size:
            # With a smaller map one world point could appear twice in a frame, and the camera
            # could never leave a place, which breaks known-pixel masks and revisit metrics.
            raise ValueError(
                f"ToyWorldConfig.map_size={self.map_size} must be at least 2 * frame_size "
                f"(= {2 * self.frame_size}); raise map_size or lower frame_size"
            )
        if not 1 <= self.speed_px <= self.frame_size // 4:
            raise ValueError(
                f"ToyWorldConfig.speed_px={self.speed_px} must be in 1..frame_size // 4 "
                f"(= {self.frame_size // 4}) so consecutive frames overlap by at least 3/4; "
                "lower speed_px or raise frame_size"
            )
        if not 0 <= self.num_objects <= 16:
            raise ValueError(
                f"ToyWorldConfig.num_objects={self.num_objects} must be in 0..16; "
                "more objects would hide the map"
            )
        if not 0 <= self.num_landmarks <= 4096:
            raise ValueError(
                f"ToyWorldConfig.num_landmarks={self.num_landmarks} must be in 0..4096"
            )


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

# Biome -> (low, high, accent) RGB of the smooth colour field, and the texture kind.
_BIOMES: dict[str, tuple[tuple[tuple[int, int, int], ...], str]] = {
    "forest": (((20, 70, 25), (70, 130, 45), (95, 70, 35)), "blotches"),
    "desert": (((200, 165, 100), (240, 215, 150), (175, 120, 70)), "dunes"),
    "ocean": (((10, 40, 110), (30, 110, 170), (20, 150, 150)), "waves"),
    "snow": (((200, 210, 225), (245, 248, 252), (170, 185, 210)), "grain"),
    "lava": (((40, 10, 5), (110, 25, 10), (70, 40, 35)), "cracks"),
    "meadow": (((110, 170, 60), (165, 205, 85), (90, 140, 50)), "flowers"),
}
_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 60, 230),
    "yellow": (245, 215, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "cyan": (20, 220, 230),
}
_SHAPES: tuple[str, ...] = ("squares", "circles", "triangles")
OBJECT_RGB: tuple[int, int, int] = (235, 40, 235)
"""Fill colour of moving objects (with a 1 px black outline). No prompt gives landmarks or a
biome this colour, so metrics can tell objects from the camera-fixed world."""

STYLE_VOCAB: tuple[str, ...] = (*_BIOMES, "with", *_COLOURS, *_SHAPES)
"""Every word a prompt can contain, in a fixed order (token ids for the tiny text encoder)."""


@dataclass(frozen=True)
class Style:
    """A parsed prompt."""

    biome: str
    colour: str
    shape: str

    @property
    def prompt(self) -> str:
        return f"{self.biome} with {self.colour} {self.shape}"


def all_prompts() -> list[str]:
    """Every valid prompt, sorted."""
    return sorted(
        Style(b, c, s).prompt for b, c, s in itertools.product(_BIOMES, _COLOURS, _SHAPES)
    )


_ALL_PROMPTS = tuple(all_prompts())


def parse_prompt(text: str) -> Style:
    """Parse ``"{biome} with {colour} {shape}"`` (case and surrounding whitespace ignored)."""
    words = text.strip().lower().split()
    if len(words) != 4 or words[1] != "with":
        raise ValueError(
            f"prompt {text!r} must have the form '<biome> with <colour> <shape>', "
            f"e.g. 'forest with red squares'"
        )
    for word, allowed, kind in (
        (words[0], tuple(_BIOMES), "biome"),
        (words[2], tuple(_COLOURS), "colour"),
        (words[3], _SHAPES, "shape"),
    ):
        if word not in allowed:
            raise ValueError(
                f"unknown {kind} {word!r} in prompt {text!r}; allowed: {', '.join(allowed)}"
            )
    return Style(words[0], words[2], words[3])


def prompt_for_seed(seed: int) -> str:
    """The prompt an episode seed uses in the datasets (uniform over ``all_prompts()``)."""
    rng = np.random.default_rng([_PROMPT_SALT, _check_seed(seed)])
    return _ALL_PROMPTS[int(rng.integers(len(_ALL_PROMPTS)))]


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Actions and camera
# ---------------------------------------------------------------------------------------------


def to_action_ids(actions: Sequence[int | str] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Action ids or names -> int64 ids [T], validated."""
    if isinstance(actions, torch.Tensor):
        actions = actions.detach().cpu().numpy()
    if isinstance(actions, str):
        raise ValueError(f"actions must be a sequence of ids or names, got the string {actions!r}")
    if not (isinstance(actions, np.ndarray) and actions.dtype.kind in "iu"):
        # Lists (possibly mixing names and ids); arrays of ints skip this per-element loop.
        ids = []
        for t, a in enumerate(actions):
            if isinstance(a, str):
                if a not in ACTIONS:
                    raise ValueError(
                        f"unknown action name {a!r} at t={t}; allowed: {', '.join(ACTIONS)}"
                    )
                a = ACTIONS.index(a)
            elif not isinstance(a, (int, np.integer)) or isinstance(a, bool):
                raise ValueError(f"action at t={t} must be an int id or a name, got {a!r}")
            ids.append(int(a))
        actions = np.asarray(ids, dtype=np.int64)
    if actions.ndim != 1:
        raise ValueError(f"actions must be 1-D [T], got shape {actions.shape}")
    bad = np.flatnonzero((actions < 0) | (actions >= len(ACTIONS)))
    if bad.size:
        t = int(bad[0])
        raise ValueError(
            f"unknown action id {actions[t]} at t={t}; "
            f"allowed ids 0..{len(ACTIONS) - 1} = {', '.join(ACTIONS)}"
        )
    return actions.astype(np.int64)


def camera_offsets(
    actions: Sequence[int | str] | np.ndarray | torch.Tensor, cfg: ToyWorldConfig
) -> np.ndarray:
    """int64 [T, 2]: camera displacement (dy, dx) in pixels of frame t relative to frame 0.

    ``actions[t]`` is the move into frame t, so ``actions[0]`` has no effect. Not wrapped to the
    torus: the offsets keep counting past ``map_size``.
    """
    ids = to_action_ids(actions)
    deltas_T2 = ACTION_DELTAS[ids] * cfg.speed_px
    deltas_T2[:1] = 0
    return np.cumsum(deltas_T2, axis=0)


def random_actions(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """int64 [T]: piecewise-constant random actions, each draw held 1..8 frames; [0] is 0."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    actions = np.zeros(num_frames, dtype=np.int64)
    t = 1
    while t < num_frames:
        action = rng.integers(len(ACTIONS))
        hold = int(rng.integers(1, 9))
        actions[t : t + hold] = action
        t += hold
    return actions


def tethered_actions(rng: np.random.Generator, num_frames: int, world: ToyWorldConfig) -> np.ndarray:
    """Piecewise-constant random moves; a move that would take the camera more than half a frame
    from its start is replaced by the move back towards it."""
    limit = world.frame_size // 2
    base = random_actions(rng, num_frames)
    out = np.zeros(num_frames, dtype=np.int64)
    pos = np.zeros(2, dtype=np.int64)
    back = {(0, 1): 1, (0, -1): 2, (1, 1): 3, (1, -1): 4}  # (axis, sign of offset) -> move towards 0
    for t in range(1, num_frames):
        a = int(base[t])
        delta = ACTION_DELTAS[a] * world.speed_px
        if np.abs(pos + delta).max() > limit:
            axis = int(np.argmax(np.abs(pos)))
            a = back[(axis, int(np.sign(pos[axis])))]
            delta = ACTION_DELTAS[a] * world.speed_px
        pos += delta
        out[t] = a
    return out


# ---------------------------------------------------------------------------------------------
# Map construction
# ---------------------------------------------------------------------------------------------


def _periodic_interp(g: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (i0, i1) and weights w [size] that resample g periodic knots to size samples."""
    u = np.arange(size, dtype=np.float64) * (g / size)
    i0 = np.floor(u).astype(np.int64)
    w = (u - i0).astype(np.float32)
    w = w * w * (3.0 - 2.0 * w)  # smoothstep: hides the knot lines plain linear would show
    return i0, (i0 + 1) % g, w


def _periodic_upsample_1d(values_g: np.ndarray, size: int) -> np.ndarray:
    """[g] -> [size] float32 smooth interpolation that wraps seamlessly."""
    i0, i1, w = _periodic_interp(values_g.shape[0], size)
    return values_g[i0] * (1.0 - w) + values_g[i1] * w


def _periodic_upsample(grid_gg: np.ndarray, size: int) -> np.ndarray:
    """[g, g] -> [size, size] float32 smooth interpolation that tiles seamlessly (torus)."""
    i0, i1, w = _periodic_interp(grid_gg.shape[0], size)
    rows_Sg = grid_gg[i0] * (1.0 - w)[:, None] + grid_gg[i1] * w[:, None]
    return rows_Sg[:, i0] * (1.0 - w)[None, :] + rows_Sg[:, i1] * w[None, :]


@functools.lru_cache(maxsize=None)
def _sprite(shape: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(outline, fill) boolean masks [size + 2, size + 2] for a shape with a 1 px outline."""
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "squares":
        fill = np.ones((size, size), dtype=bool)
    elif shape == "circles":
        c = (size - 1) / 2
        fill = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    elif shape == "triangles":
        # Apex up: row y spans a width growing linearly from 1 pixel to the full base.
        half = (yy + 1) * (size / 2) / size
        fill = np.abs(xx - (size - 1) / 2) <= half
    else:
        raise AssertionError(f"no sprite for shape {shape!r}")
    fill_p = np.pad(fill, 1)
    # 3x3 dilation by shifted ORs gives the outline ring around the fill.
    dilated = np.zeros_like(fill_p)
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        dilated |= np.roll(fill_p, (dy, dx), axis=(0, 1))
    fill_p.flags.writeable = False
    dilated.flags.writeable = False
    return dilated, fill_p


def _wrapped_windows(profile_M: np.ndarray) -> np.ndarray:
    """[M, M] strided view (no copy) with windows[s, i] = profile[(s + i) % M]."""
    m = profile_M.shape[0]
    return np.lib.stride_tricks.sliding_window_view(np.tile(profile_M, 2), m)[:m]


def _texture(kind: str, rng: np.random.Generator, m: int, bend_M: np.ndarray) -> np.ndarray:
    """[M, M] float32 relative brightness change for a biome, roughly in [-0.5, 0.5].

    Draws only the noise its kind needs from ``rng``; it must run after every layout draw so
    that the layout of a seed does not depend on the biome.
    """

    def grain() -> np.ndarray:  # blotches about 2 px across, in [0, 1]
        return _periodic_upsample(rng.random((m // 2,) * 2, dtype=np.float32), m)

    def pixel() -> np.ndarray:  # independent per-pixel noise in [0, 1)
        return rng.random((m, m), dtype=np.float32)

    def profile() -> np.ndarray:  # smooth periodic 1-D profile [M] in [0, 1]
        return _periodic_upsample_1d(rng.random(max(2, m // 8), dtype=np.float32), m)

    if kind == "blotches":
        return 0.12 * (2.0 * grain() - 1.0)
    if kind == "grain":
        return 0.05 * (2.0 * pixel() - 1.0)
    if kind == "dunes":
        # Diagonal ridges: value at (y, x) is profile[(y + x) % M].
        ridges_MM = _wrapped_windows(profile())
        return 0.10 * (2.0 * ridges_MM - 1.0) + 0.03 * (2.0 * pixel() - 1.0)
    if kind == "waves":
        # Horizontal swell, its crests shifted per column by a smooth profile so they undulate:
        # value at (y, x) is profile[(y + shift[x]) % M]. The faint pixel noise keeps x-shifts
        # measurable in views without a landmark.
        shift_M = (bend_M * 12.0).astype(np.int64)
        swell_MM = _wrapped_windows(profile())[shift_M].T
        return 0.12 * (2.0 * swell_MM - 1.0) + 0.03 * (2.0 * pixel() - 1.0)
    if kind == "cracks":
        return 0.45 * (np.abs(grain() - 0.5) < 0.04) + 0.05 * (2.0 * pixel() - 1.0)
    if kind == "flowers":
        return 0.35 * (pixel() > 0.97) + 0.06 * (2.0 * grain() - 1.0)
    raise AssertionError(f"no texture {kind!r}")


class ToyWorld:
    """One world (map + moving objects) for a (cfg, seed, prompt); renders camera episodes.

    Building costs a few milliseconds, cheap enough to build one per training sample.
    """

    def __init__(self, cfg: ToyWorldConfig, seed: int, prompt: str) -> None:
        self.cfg = cfg
        self.seed = _check_seed(seed)
        self.style = parse_prompt(prompt)
        self.prompt = self.style.prompt
        f, m = cfg.frame_size, cfg.map_size
        # One generator, drawn in a fixed order: layout first (independent of the prompt, so a
        # seed keeps its layout under every style), then the biome's texture noise.
        rng = np.random.default_rng(self.seed)

        # 1. camera start (draw)
        self.default_start: tuple[int, int] = tuple(int(v) for v in rng.integers(0, m, size=2))

        # 2. smooth colour field (draw): two periodic random grids, coarse and medium
        coarse = _periodic_upsample(rng.random((max(2, m // 64),) * 2, dtype=np.float32), m)
        medium = _periodic_upsample(rng.random((max(2, m // 32),) * 2, dtype=np.float32), m)

        # 3. landmarks (draw)
        size_lo, size_hi = max(5, f // 8), max(7, f // 5)
        lm_pos_L2 = rng.integers(0, m, size=(cfg.num_landmarks, 2))
        lm_size_L = rng.integers(size_lo, size_hi + 1, size=cfg.num_landmarks)
        lm_shade_L = rng.uniform(0.8, 1.0, size=cfg.num_landmarks).astype(np.float32)

        # 4. moving objects (draw): start in the box as a fraction of its free range; px/frame
        obj_frac_N2 = rng.random((cfg.num_objects, 2))
        obj_speed_N2 = rng.uniform(0.4, 1.6, size=(cfg.num_objects, 2))
        obj_sign_N2 = np.where(rng.random((cfg.num_objects, 2)) < 0.5, -1.0, 1.0)

        # 5. colour field x texture (draws the texture noise last), in float [0, 255] and
        # channel-first: numpy broadcasts over a trailing axis of 3 several times slower.
        (lo, hi, accent), texture_kind = _BIOMES[self.style.biome]
        lo_, hi_, acc_ = (np.asarray(c, dtype=np.float32)[:, None, None] for c in (lo, hi, accent))
        accent_w = 0.4 * medium
        map_CMM = lo_ + (hi_ - lo_) * coarse
        map_CMM *= 1.0 - accent_w
        map_CMM += acc_ * accent_w
        map_CMM *= 1.0 + _texture(texture_kind, rng, m, bend_M=coarse[0])
        # Round half up (values are >= 0); clamp first so bright texture saturates, not wraps.
        np.minimum(map_CMM, 255.0, out=map_CMM)
        map_CMM += 0.5
        map_MMC = np.stack(tuple(map_CMM), axis=-1).astype(np.uint8)

        # 6. landmarks over the field, outlined so their edges are sharp on every biome
        colour = np.asarray(_COLOURS[self.style.colour], dtype=np.float32)
        outline_rgb = (240, 240, 240) if self.style.colour == "black" else (0, 0, 0)
        for (y, x), size, shade in zip(lm_pos_L2, lm_size_L, lm_shade_L):
            outline, fill = _sprite(self.style.shape, int(size))
            s = outline.shape[0]
            if y + s <= m and x + s <= m:
                patch = map_MMC[y : y + s, x : x + s]  # a view: writes land in the map
                patch[outline] = outline_rgb
                patch[fill] = np.rint(colour * shade).astype(np.uint8)
            else:  # straddles the torus seam: gather with wrapped indices, draw, scatter back
                ix = np.ix_((y + np.arange(s)) % m, (x + np.arange(s)) % m)
                patch = map_MMC[ix]
                patch[outline] = outline_rgb
                patch[fill] = np.rint(colour * shade).astype(np.uint8)
                map_MMC[ix] = patch
        # 7. wrap-padded copy: any viewport whose top-left lies in [0, M)^2 is a plain slice.
        padded = np.empty((m + f, m + f, 3), dtype=np.uint8)
        padded[:m, :m] = map_MMC
        padded[m:, :m] = map_MMC[:f]
        padded[:, m:] = padded[:, :f]
        padded.flags.writeable = False
        self._padded_map = padded
        self.static_map: np.ndarray = padded[:m, :m]
        """uint8 [M, M, 3] read-only static map (no moving objects)."""

        # 8. objects bounce in a fixed world-space box centred on the default start view, so a
        # default episode starts with them in or near view.
        self._obj_outline, self._obj_fill = _sprite("circles", max(4, f // 10))
        obj_size = self._obj_outline.shape[0]
        box = min(2 * f, m)
        self._box_origin = np.asarray(self.default_start, dtype=np.float64) + (f - box) / 2
        self._box_range = float(box - obj_size)
        self._obj_start_N2 = obj_frac_N2 * self._box_range
        # Per-axis speeds rather than angle + magnitude: no sin/cos keeps renders bit-exact
        # across libm implementations.
        self._obj_vel_N2 = obj_sign_N2 * obj_speed_N2

    def object_positions(self, num_frames: int) -> np.ndarray:
        """int64 [T, N, 2]: world (y, x) of each object's sprite top-left at frames 0..T-1."""
        t_T = np.arange(num_frames, dtype=np.float64)
        travel_TN2 = self._obj_start_N2[None] + self._obj_vel_N2[None] * t_T[:, None, None]
        # Elastic bounce in [0, R] is a triangle wave of the unbounded travel, period 2R.
        r = self._box_range
        bounced_TN2 = r - np.abs(np.mod(travel_TN2, 2.0 * r) - r)
        return np.rint(self._box_origin + bounced_TN2).astype(np.int64)

    def _camera(
        self,
        actions: Sequence[int | str] | np.ndarray | torch.Tensor,
        num_frames: int,
        start: tuple[int, int] | None,
    ) -> np.ndarray:
        """int64 [T, 2]: top-left of the viewport of each frame, wrapped into [0, M)."""
        ids = to_action_ids(actions)
        if len(ids) != num_frames:
            raise ValueError(
                f"got {len(ids)} actions for num_frames={num_frames}; pass one action per frame "
                "(actions[t] is the move into frame t, actions[0] is ignored)"
            )
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        start_2 = np.asarray(self.default_start if start is None else start, dtype=np.int64)
        if start_2.shape != (2,):
            raise ValueError(f"start must be a (y, x) pair, got {start!r}")
        return (start_2 + camera_offsets(ids, self.cfg)) % self.cfg.map_size

    def render_static(
        self,
        actions: Sequence[int | str] | np.ndarray | torch.Tensor,
        num_frames: int,
        start: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """uint8 [T, H, W, 3]: the viewport over the static map only (no moving objects)."""
        return self._crop(self._camera(actions, num_frames, start))

    def render(
        self,
        actions: Sequence[int | str] | np.ndarray | torch.Tensor,
        num_frames: int,
        start: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """uint8 [T, H, W, 3]: the viewport over the map with the moving objects drawn on top."""
        cam_T2 = self._camera(actions, num_frames, start)
        frames_THWC = self._crop(cam_T2)
        if self.cfg.num_objects > 0:
            self._draw_objects(frames_THWC, cam_T2)
        return frames_THWC

    def _crop(self, cam_T2: np.ndarray) -> np.ndarray:
        f = self.cfg.frame_size
        frames_THWC = np.empty((len(cam_T2), f, f, 3), dtype=np.uint8)
        for t, (y, x) in enumerate(cam_T2):
            frames_THWC[t] = self._padded_map[y : y + f, x : x + f]
        return frames_THWC

    def _draw_objects(self, frames_THWC: np.ndarray, cam_T2: np.ndarray) -> None:
        f, m = self.cfg.frame_size, self.cfg.map_size
        s = self._obj_outline.shape[0]
        # Object position relative to the viewport, taken to the signed range (-s, M - s] so an
        # object straddling the viewport's top/left edge (across the torus seam) is still drawn.
        rel_TN2 = np.mod(self.object_positions(len(cam_T2)) - cam_T2[:, None, :], m)
        rel_TN2 = np.where(rel_TN2 > m - s, rel_TN2 - m, rel_TN2)
        for t, n in zip(*np.nonzero(np.all(rel_TN2 < f, axis=2))):
            y, x = rel_TN2[t, n]
            y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + s, f), min(x + s, f)
            patch = frames_THWC[t, y0:y1, x0:x1]  # a view: writes land in the frame
            sub = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
            patch[self._obj_outline[sub]] = (0, 0, 0)
            patch[self._obj_fill[sub]] = OBJECT_RGB


def render(
    seed: int,
    prompt: str,
    actions: Sequence[int | str] | np.ndarray | torch.Tensor,
    num_frames: int,
    cfg: ToyWorldConfig | None = None,
    start: tuple[int, int] | None = None,
) -> np.ndarray:
    """uint8 [T, H, W, 3]: ground-truth frames of an episode, bit-exact given its inputs."""
    return ToyWorld(cfg or ToyWorldConfig(), seed, prompt).render(actions, num_frames, start)


# ---------------------------------------------------------------------------------------------
# Episodes and dataset
# ---------------------------------------------------------------------------------------------

SPLITS = ("train", "heldout")


def heldout_seed(index: int) -> int:
    """Seed of held-out episode ``index``; fixed across runs so evaluations are comparable."""
    return HELDOUT_SEED_BASE + index


def episode_seed(split: str, index: int, base_seed: int = 0) -> int:
    """Seed of episode ``index`` of a split. Train seeds are hashed from (base_seed, index)
    into [0, HELDOUT_SEED_BASE); held-out seeds ignore base_seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"episode index must be a non-negative int, got {index!r}")
    if split == "heldout":
        return heldout_seed(int(index))
    state = np.random.SeedSequence(
        [_TRAIN_SEED_SALT, _check_seed(base_seed), int(index)]
    ).generate_state(1, np.uint64)
    return int(state[0] % HELDOUT_SEED_BASE)


def episode(
    split: str, index: int, num_frames: int, cfg: ToyWorldConfig, base_seed: int = 0
) -> dict[str, Any]:
    """One episode: dict(frames=uint8 tensor [T,H,W,3], actions=int64 tensor [T], prompt, seed).

    A pure function of its arguments; ``ToyClipDataset[i]`` is ``episode(split, i, ...)``.
    """
    seed = episode_seed(split, index, base_seed)
    prompt = prompt_for_seed(seed)
    actions_T = random_actions(np.random.default_rng([_ACTIONS_SALT, seed]), num_frames)
    frames_THWC = ToyWorld(cfg, seed, prompt).render(actions_T, num_frames)
    return {
        "frames": torch.from_numpy(frames_THWC),
        "actions": torch.from_numpy(actions_T),
        "prompt": prompt,
        "seed": seed,
    }


class ToyClipDataset(Dataset):
    """Map-style dataset of toy-world clips. Item i is a pure function of (base_seed, split, i),
    so resuming a data position only needs the index (no iterator state)."""

    def __init__(
        self,
        cfg: ToyWorldConfig,
        num_frames: int,
        base_seed: int = 0,
        split: str = "train",
        length: int = 1_000_000,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.cfg = cfg
        self.num_frames = num_frames
        self.base_seed = _check_seed(base_seed)
        self.split = split
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        return episode(self.split, index, self.num_frames, self.cfg, self.base_seed)


def collate_clips(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items: frames uint8 [B,T,H,W,3], actions int64 [B,T], prompt/seed as lists."""
    return {
        "frames": torch.stack([item["frames"] for item in batch]),
        "actions": torch.stack([item["actions"] for item in batch]),
        "prompt": [item["prompt"] for item in batch],
        "seed": [item["seed"] for item in batch],
    }
