"""World memory beyond the window: a compressed tier and a smart memory bank.

Legend: N layers, B streams, T tokens per frame (gh x gw grid), H heads, D head dim, P pages.

The sinks + window cache forgets a frame once it slides out of the window. Two tiers keep it:

* **Compressed tier** (RELIC, FramePack): every frame leaving the window is *demoted*, not
  dropped. Its pre-RoPE keys and values are mean-pooled over ``pool x pool`` token cells
  (level 1); once more than ``fine_frames`` frames sit in the tier, the oldest level-1 frame is
  pooled again by ``pool`` (level 2); beyond ``compressed_frames`` the oldest frame goes. Tokens
  are stored int8 -- keys with one scale per channel of the frame (keys have outlier channels:
  KIVI, KVQuant), values with one scale per token -- or as floats (``quantize: none``), so the
  cost of int8 can be measured against the same tier unquantized.
* **Memory bank** (HQ-SMem's keep-relevant / drop-redundant, WorldMem and Context-as-Memory's
  retrieval by view overlap): entries are full-resolution frames (the frame's own pages: admission
  copies nothing) with the camera rectangle and the frame index. A frame leaving the window is
  admitted when at least ``admit_coverage`` of its view is not covered by the bank yet; a full
  bank evicts the entry most covered by the others (ties: the oldest; the first entry is pinned).
  Before every chunk, up to ``retrieve_frames`` entries are retrieved greedily by how much of the
  *next* chunk's views they cover that the sinks and window do not, discounted by age
  (``age_weight`` per ``window_frames``). The next views follow from the chunk's actions, known before it is
  generated. Models without camera actions (text-to-video) retrieve by similarity instead: the
  cosine between an entry's mean key (layer 0) and the mean key of the newest window frame.

Cost model (bytes of history kept per stream, ``n = heads x head_dim`` channels, fp16 pages):
    window / bank frame:     N x T x n x 2 (k, v) x 2 bytes
    compressed level 1:      N x (T / pool^2) x n x 2 x 1 byte  +  N x (n + T / pool^2) x 2 (fp16 scales)
    compressed level 2:      N x (T / pool^4) x n x 2 x 1 byte  +  N x (n + T / pool^4) x 2
    bank entry:              a window frame (bank_level 0) or a compressed frame of its level
so at pool 2 a level-1 frame costs 1/8 of an fp16 frame plus scales, and a bounded tier of
``compressed_frames`` frames costs at most ``compressed_frames`` level-1 frames whatever the stream
length. ``memory_bytes_per_frame`` computes these figures for any model shape.

Layout of what a chunk attends to (token order in the gathered buffer), and temporal RoPE
positions (spatial positions follow the camera, see ``streamkd.models.rope``):

    [ sinks | retrieved | compressed | window | chunk ]
      0..s-1  s-1 (all)   s-1 (all)    s..      s+w..

Sinks, window and chunk keep exactly the positions of the cache without memory (a student trained
on sinks + window sees the distances it was trained on, and a memory configuration with both tiers
off is bit-for-bit today's cache). Memory frames all sit at the last sink's temporal position:
"old context, like the sinks", a distance the student has seen; what tells them apart is space.
With camera-anchored RoPE a memory token's spatial position is the world position of what it saw
(pooled tokens at the centroid of their cell); on a torus world (``wrap_tokens``) the entry's
camera is moved by whole periods to lie nearest the chunk's camera, so a place seen a lap ago
lines up with the same place now.

**Rendered memory** (``render``, anchor-warp models; Gen3C and the reprojected-memory world
models condition on memory drawn into the new view the same way). Attention can read a retrieved
entry, but copying a place from it is a pattern a small student must learn from noise; the
first frame is copied through a per-token map instead (the anchor channels: its latent moved by
the camera, and a mask of where it is known). With ``render`` the chunk's retrieved entries are
drawn into that map as well: per frame of the chunk, each entry's clean latent, moved by the
camera difference (torus-wrapped like its keys), over the first frame where it sees the place,
oldest first so the newest view of a place wins. The same entries are attended to as before; a
page then also holds its frame's clean latent (``C x h x w`` values: 1/16 of the frame's keys
and values at the toy size -- a narrow 6-layer model --, ~1/1440 at Wan2.1-1.3B's), so snapshots
and branches share it.

**Pooled bank** (``bank_level`` 1 or 2): an admitted frame's keys and values are pooled and
quantized exactly like the compressed tier's level 1 (or 2) and its pages given back; retrieved
entries are read at the pooled centroids. With ``render`` the entry keeps its full-resolution
clean latent beside the pooled tokens: the map keeps every detail, attention reads a coarse copy.

Memory is a deterministic function of the history: the planner below decides from frame indices
and cameras only (host integers), so a full-sequence forward can replay it (tests).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch


@dataclass
class MemoryConfig:
    """Memory tiers of a causal checkpoint (in latent frames). All zero: sinks + window only."""

    compressed_frames: int = 0
    """Capacity of the compressed tier (0: off). Frames beyond it are dropped, oldest first."""
    fine_frames: int = 0
    """Newest frames of the tier kept at level 1 (pooled once); older ones are pooled again
    (level 2). ``fine_frames = compressed_frames`` keeps the whole tier at level 1; 0 pools every
    frame to level 2 as soon as it is demoted."""
    pool: int = 2
    """Spatial pooling per level (pool x pool token cells); must divide the latent token grid."""
    quantize: Literal["int8", "none"] = "int8"
    """int8 (per-channel key scales, per-token value scales) or unquantized floats."""
    bank_frames: int = 0
    """Capacity of the memory bank in full-resolution frames (0: off)."""
    retrieve_frames: int = 0
    """Bank entries attended to per chunk (<= bank_frames)."""
    admit_coverage: float = 0.25
    """Admit a frame to the bank when at least this share of its view is new to the bank."""
    age_weight: float = 0.02
    """Retrieval discount per ``window_frames`` of an entry's age: its coverage gain is multiplied
    by ``exp(-age_weight * age / window_frames)`` -- a preference for recent views among entries
    that cover alike, never a reason to retrieve nothing (an additive penalty grew past any gain
    after ~300 frames and left long streams' banks unread)."""
    retrieval: Literal["auto", "camera", "similarity"] = "auto"
    """camera: by coverage of the next views (needs camera-anchored actions); similarity: by mean
    key cosine (text-to-video); auto: camera when the model has camera actions."""
    wrap_tokens: int = 0
    """World period in tokens on a torus world (the toy world: map size / token size); 0: open."""
    bank_level: int = 0
    """How bank entries keep their keys and values. 0: the frame's own full-resolution pages; 1 or
    2: pooled (and quantized per ``quantize``) like the compressed tier's level 1 or 2 when the
    frame is admitted, its pages given back -- ``pool**(2*level)`` times fewer tokens per entry,
    read at the pooled centroids. Rendered memory still draws the entry's full-resolution clean
    latent (kept beside the pooled tokens), so the map keeps its detail while attention reads a
    coarse copy."""
    render: bool = False
    """Also render the retrieved bank entries into the chunk's anchor channels (models with
    ``dit.anchor_warp``): where an entry saw the place a frame looks at, its clean latent, moved
    by the camera, takes the place of the first frame's; the newest entry wins. What attention
    would have to find in memory becomes a per-token map, as for the first frame (see
    "Rendered memory" above). Pages then also keep their frame's clean latent."""

    def __post_init__(self) -> None:
        for name in ("compressed_frames", "fine_frames", "bank_frames", "retrieve_frames", "wrap_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"memory.{name} must be >= 0, got {getattr(self, name)}")
        if self.pool < 1:
            raise ValueError(f"memory.pool must be >= 1, got {self.pool}")
        if self.fine_frames > self.compressed_frames:
            raise ValueError(f"memory.fine_frames ({self.fine_frames}) must be <= memory.compressed_frames "
                             f"({self.compressed_frames}): the level-1 frames are the newest of the tier")
        if self.retrieve_frames > self.bank_frames:
            raise ValueError(f"memory.retrieve_frames ({self.retrieve_frames}) is larger than the bank "
                             f"(memory.bank_frames = {self.bank_frames}); lower it or grow the bank")
        if self.bank_frames and not self.retrieve_frames:
            raise ValueError("memory.bank_frames > 0 with retrieve_frames = 0 keeps a bank nothing reads; "
                             "set memory.retrieve_frames >= 1")
        if not 0.0 <= self.admit_coverage <= 1.0:
            raise ValueError(f"memory.admit_coverage must be in [0, 1], got {self.admit_coverage}")
        if self.quantize not in ("int8", "none"):
            raise ValueError(f"memory.quantize must be 'int8' or 'none', got {self.quantize!r}")
        if self.retrieval not in ("auto", "camera", "similarity"):
            raise ValueError(f"memory.retrieval must be 'auto', 'camera' or 'similarity', got {self.retrieval!r}")
        if self.bank_level not in (0, 1, 2):
            raise ValueError(f"memory.bank_level must be 0 (full resolution), 1 or 2 (pooled once or twice), "
                             f"got {self.bank_level}")
        if self.bank_level and not self.bank_frames:
            raise ValueError(f"memory.bank_level={self.bank_level} compresses bank entries, but there is no bank "
                             "(memory.bank_frames = 0); set bank_frames or bank_level 0")
        if self.render and not self.bank_frames:
            raise ValueError("memory.render draws the retrieved bank entries into the anchor: it needs a bank "
                             "(memory.bank_frames >= 2, retrieve_frames >= 1)")
        if self.render and self.retrieval == "similarity":
            raise ValueError("memory.render places bank entries by their camera: it needs camera retrieval "
                             "(memory.retrieval 'camera' or 'auto'), not 'similarity'")

    @property
    def enabled(self) -> bool:
        return bool(self.compressed_frames or self.bank_frames)

    def without_bank(self) -> MemoryConfig:
        """This memory with the bank off (and with it what only a bank has: its level, rendering)."""
        return replace(self, bank_frames=0, retrieve_frames=0, bank_level=0, render=False)

    def check(self, grid_h: int, grid_w: int, chunk_frames: int) -> None:
        """Raise when this memory cannot work with a model's token grid and chunking."""
        levels = 0
        if self.compressed_frames:
            levels = 2 if self.fine_frames < self.compressed_frames else 1
        if self.bank_frames:
            levels = max(levels, self.bank_level)
        cell = self.pool**levels
        if grid_h % cell or grid_w % cell:
            raise ValueError(f"memory.pool={self.pool} ({levels} level(s): cells of {cell}x{cell} tokens) does "
                             f"not divide the latent token grid {grid_h}x{grid_w}; choose a pool that divides it")
        if self.compressed_frames and self.compressed_frames < chunk_frames:
            raise ValueError(f"memory.compressed_frames ({self.compressed_frames}) is below a chunk "
                             f"({chunk_frames} frames leave the window together); raise it or set 0")
        if self.bank_frames and self.bank_frames < 2:
            raise ValueError("memory.bank_frames must be >= 2 (the first entry is pinned) or 0")


# ------------------------------------------------------------------------------------ geometry
def wrap_near(camera: tuple[int, int], near: tuple[int, int], period: int) -> tuple[int, int]:
    """``camera`` moved by whole periods to lie nearest ``near`` (identity when period is 0)."""
    if not period:
        return camera
    return tuple(c + period * round((n - c) / period) for c, n in zip(camera, near))  # type: ignore[return-value]


def _spans(start: int, length: int, period: int, size: int) -> list[slice]:
    """The (at most two) slices of ``[0, size)`` that ``start .. start + length - 1`` covers,
    modulo ``period`` when it is not 0 (a span that wraps around the torus is split in two)."""
    if not period:
        lo, hi = max(start, 0), min(start + length, size)
        return [slice(lo, hi)] if lo < hi else []
    if length >= period:
        return [slice(0, min(period, size))]
    s = start % period
    e = s + length
    parts = [(s, min(e, period))] + ([(0, e - period)] if e > period else [])
    return [slice(a, min(b, size)) for a, b in parts if a < min(b, size)]


def _raster(rects: list[tuple[int, int]], grid: tuple[int, int], origin: tuple[int, int], size: tuple[int, int],
            period: int) -> np.ndarray:
    """Boolean ``size`` raster of the union of frame rectangles (top-left camera, ``grid`` tokens)
    in a frame of reference starting at ``origin`` (on a torus: modulo the period). Rectangles
    are written as slices (~5x faster than index arrays; rasters are made every chunk)."""
    out = np.zeros(size, dtype=bool)
    gh, gw = grid
    for r, c in rects:
        for rows in _spans(r - origin[0], gh, period, size[0]):
            for cols in _spans(c - origin[1], gw, period, size[1]):
                out[rows, cols] = True
    return out


class Coverage:
    """View coverage on the token grid of the world: a torus of ``period`` tokens, or an open
    plane (rasterised over the bounding box of the rectangles involved)."""

    def __init__(self, grid: tuple[int, int], period: int) -> None:
        self.grid, self.period = grid, period

    def frame(self, rects: list[tuple[int, int]], around: list[tuple[int, int]]) -> tuple[np.ndarray, tuple, tuple]:
        if self.period:
            size = (self.period, self.period)
            return _raster(rects, self.grid, (0, 0), size, self.period), (0, 0), size
        allr = rects + around
        r0, c0 = min(r for r, _ in allr), min(c for _, c in allr)
        size = (max(r for r, _ in allr) - r0 + self.grid[0], max(c for _, c in allr) - c0 + self.grid[1])
        return _raster(rects, self.grid, (r0, c0), size, 0), (r0, c0), size

    def new_share(self, rect: tuple[int, int], covered: list[tuple[int, int]]) -> float:
        """Share of ``rect``'s view that ``covered`` does not cover."""
        if not covered:
            return 1.0
        mask, origin, size = self.frame(covered, [rect])
        own = _raster([rect], self.grid, origin, size, self.period)
        return float((own & ~mask).sum() / own.sum())


# ------------------------------------------------------------------------------------- planner
@dataclass
class FrameInfo:
    frame: int
    camera: tuple[int, int]
    mean_key: torch.Tensor | None = None  # layer-0 mean key (similarity retrieval only)


@dataclass
class MemoryView:
    """What one chunk attends to beyond sinks and window: bank entries (frame indices) and
    compressed frames with their level, oldest first."""

    retrieved: list[int] = field(default_factory=list)
    compressed: list[tuple[int, int]] = field(default_factory=list)  # (frame, level)


@dataclass
class Transition:
    """One change of the tiers after a commit; the store applies them in order."""

    kind: Literal["compress", "coarsen", "drop_compressed", "admit", "evict", "release"]
    frame: int


class MemoryPlanner:
    """Host-side bookkeeping of one stream's memory: which frame is in which tier.

    Decisions use frame indices and cameras only (plus, for similarity retrieval, the mean keys
    the store hands in), so the streaming cache and a full-sequence replay decide alike.
    """

    def __init__(self, cfg: MemoryConfig, *, sink_frames: int, window_frames: int, grid: tuple[int, int],
                 use_camera: bool) -> None:
        self.cfg = cfg
        self.sink_frames, self.window_frames = sink_frames, window_frames
        self.cov = Coverage(grid, cfg.wrap_tokens)
        self.use_camera = use_camera and cfg.retrieval != "similarity"
        if cfg.retrieval == "camera" and not use_camera:
            raise ValueError("memory.retrieval='camera' needs a model with camera actions (dit.action_shifts); "
                             "use 'similarity' or 'auto'")
        self.frames: list[FrameInfo] = []
        self.window: deque[int] = deque()
        self.compressed: deque[tuple[int, int]] = deque()  # (frame, level), oldest first
        self.bank: list[int] = []  # frame indices, admission order (entry 0 pinned)

    def clone(self) -> MemoryPlanner:
        other = MemoryPlanner.__new__(MemoryPlanner)
        other.__dict__.update(self.__dict__)
        other.frames, other.window = list(self.frames), deque(self.window)
        other.compressed, other.bank = deque(self.compressed), list(self.bank)
        return other

    def camera(self, frame: int) -> tuple[int, int]:
        return self.frames[frame].camera

    # ---------------------------------------------------------------------------------- commit
    def commit(self, cameras: list[tuple[int, int]], mean_keys: list[torch.Tensor] | None = None) -> list[Transition]:
        """Record the frames of a committed chunk (their cameras; for similarity retrieval their
        layer-0 mean keys); returns the tier transitions, in order."""
        if not self.use_camera and self.cfg.bank_frames and mean_keys is None:
            raise ValueError("a similarity memory bank needs the frames' mean keys")
        out: list[Transition] = []
        for i, camera in enumerate(cameras):
            f = len(self.frames)
            self.frames.append(FrameInfo(f, camera, None if mean_keys is None else mean_keys[i]))
            if f < self.sink_frames:
                continue
            self.window.append(f)
            if len(self.window) > self.window_frames:
                out += self._leave_window(self.window.popleft())
        return out

    def _leave_window(self, f: int) -> list[Transition]:
        cfg, out = self.cfg, []
        if cfg.compressed_frames:
            self.compressed.append((f, 1))
            out.append(Transition("compress", f))
            if cfg.fine_frames < cfg.compressed_frames:
                fine = [i for i, (_, lvl) in enumerate(self.compressed) if lvl == 1]
                if len(fine) > cfg.fine_frames:
                    i = fine[0]
                    self.compressed[i] = (self.compressed[i][0], 2)
                    out.append(Transition("coarsen", self.compressed[i][0]))
            if len(self.compressed) > cfg.compressed_frames:
                out.append(Transition("drop_compressed", self.compressed.popleft()[0]))
        if cfg.bank_frames and self._admit(f):
            self.bank.append(f)
            out.append(Transition("admit", f))
            if len(self.bank) > cfg.bank_frames:
                out.append(Transition("evict", self.bank.pop(self._most_covered())))
        else:
            out.append(Transition("release", f))  # its full-resolution pages are no longer needed
        return out

    def _admit(self, f: int) -> bool:
        if not self.bank:
            return True
        if not self.use_camera:
            return True  # similarity banks admit every frame and evict the most redundant
        share = self.cov.new_share(self.camera(f), [self.camera(b) for b in self.bank])
        return share >= self.cfg.admit_coverage

    def _most_covered(self) -> int:
        """Index (in ``bank``) of the entry most covered by the others -- by view, or without
        cameras the entry whose mean key is closest to another's; never entry 0 (pinned)."""
        if not self.use_camera:
            keys = torch.stack([self.frames[b].mean_key for b in self.bank])
            sim = torch.nn.functional.cosine_similarity(keys[:, None], keys[None], dim=-1)
            sim.fill_diagonal_(-2.0)
            score = sim.max(1).values
            return 1 + int(score[1:].argmax())
        # one raster per entry and a count of entries per cell: entry i is covered where the
        # count without it is still positive (linear in the bank, not quadratic)
        cams = [self.camera(b) for b in self.bank]
        _, origin, size = self.cov.frame(cams, [])
        rasters = [_raster([c], self.cov.grid, origin, size, self.cov.period) for c in cams]
        count = np.sum(rasters, axis=0)
        best, best_i = -1.0, 1
        for i in range(1, len(self.bank)):
            own = rasters[i]
            covered = float((own & (count - own > 0)).sum() / own.sum())
            if covered > best + 1e-9:  # ties keep the earliest (oldest) candidate
                best, best_i = covered, i
        return best_i

    # -------------------------------------------------------------------------------- retrieve
    def view(self, next_cameras: list[tuple[int, int]] | None) -> MemoryView:
        """What the next chunk reads beyond sinks and window. ``next_cameras``: the cameras of
        the chunk's frames (camera retrieval); similarity retrieval compares each entry's mean key
        with the newest frame's."""
        out = MemoryView(compressed=list(self.compressed))
        k = min(self.cfg.retrieve_frames, len(self.bank))
        if not k:
            return out
        now = len(self.frames)
        decay = {b: math.exp(-self.cfg.age_weight * (now - b) / self.window_frames) for b in self.bank}
        if not self.use_camera:
            keys = torch.stack([self.frames[b].mean_key for b in self.bank])
            query_key = self.frames[-1].mean_key
            sim = torch.nn.functional.cosine_similarity(keys, query_key[None], dim=-1).tolist()
            order = sorted(range(len(self.bank)), key=lambda i: (-(sim[i] * decay[self.bank[i]]), i))
            out.retrieved = sorted(self.bank[i] for i in order[:k])
            return out
        assert next_cameras, "camera retrieval needs the next chunk's cameras"
        near = next_cameras[0]
        held = [self.camera(f) for f in range(min(self.sink_frames, now))] + [self.camera(f) for f in self.window]
        wrap = self.cfg.wrap_tokens
        targets = [wrap_near(c, near, wrap) for c in next_cameras]
        cands = {b: wrap_near(self.camera(b), near, wrap) for b in self.bank}
        mask, origin, size = self.cov.frame(targets, held + list(cands.values()))
        covered = _raster(held, self.cov.grid, origin, size, wrap) if held else np.zeros(size, dtype=bool)
        need = mask & ~covered
        rasters = {b: _raster([cam], self.cov.grid, origin, size, wrap) for b, cam in cands.items()}  # once
        area = max(int(mask.sum()), 1)
        chosen: list[int] = []
        for _ in range(k):
            best, best_b = None, None
            for b in cands:
                if b in chosen:
                    continue
                score = (rasters[b] & need).sum() / area * decay[b]
                if best is None or score > best + 1e-12:
                    best, best_b = score, b
            if best_b is None or best <= 0.0:
                break
            chosen.append(best_b)
            need &= ~rasters[best_b]
        out.retrieved = sorted(chosen)
        return out


def attended(sinks: list[int], window: list[int], view: MemoryView, cameras: list[tuple[int, int]],
             near: tuple[int, int], wrap: int, bank_level: int = 0) -> list[tuple[int, int, tuple[int, int], int]]:
    """What a chunk attends to, in token order ``[sinks | retrieved | compressed | window]``:
    ``(frame, temporal position, camera, level)`` (level 0: full resolution; retrieved entries at
    ``bank_level``). Sinks and window keep the positions of the cache without memory; memory
    frames share the last sink's; their cameras are moved by whole torus periods next to ``near``
    (the chunk's first camera)."""
    ns = len(sinks)
    mem_t = max(ns - 1, 0)
    out = [(f, i, cameras[f], 0) for i, f in enumerate(sinks)]
    out += [(f, mem_t, wrap_near(cameras[f], near, wrap), bank_level) for f in view.retrieved]
    out += [(f, mem_t, wrap_near(cameras[f], near, wrap), lvl) for f, lvl in view.compressed]
    out += [(f, ns + j, cameras[f], 0) for j, f in enumerate(window)]
    return out


def piece_positions(pieces: list[tuple[int, tuple[int, int], int]], grid: tuple[int, int], pool: int,
                    camera: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RoPE positions of every token of the attended ``pieces`` -- ``(temporal position, camera,
    level)`` each, in token order: integer temporal positions, and float rows / columns (cell
    centres of pooled tokens, plus the piece's camera when ``camera``)."""
    t, rows, cols = [], [], []
    for t_pos, cam, level in pieces:
        rr, cc = pooled_centroids(grid, pool if level else 1, level)
        off = cam if camera else (0, 0)
        t.append(np.full(len(rr), t_pos, dtype=np.int64))
        rows.append(rr + off[0])
        cols.append(cc + off[1])
    if not t:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
    return np.concatenate(t), np.concatenate(rows), np.concatenate(cols)


def replay(memory: MemoryConfig, *, sink_frames: int, window_frames: int, chunk_frames: int, num_frames: int,
           grid: tuple[int, int], cameras: list[list[tuple[int, int]]] | None) -> list[list[tuple[list[tuple], int, list[int]]]]:
    """Per row, per chunk: (the attended pieces, the temporal position of the chunk's first frame,
    the retrieved bank entries, oldest first) of a ``num_frames`` sequence -- what a streaming
    paged cache with this memory reads, decided from the cameras alone (``cameras[b][f]``; None:
    a model without camera actions, which cannot replay similarity retrieval). Used by the
    full-sequence forward (training, the equivalence test)."""
    use_camera = cameras is not None
    if memory.enabled and not use_camera and memory.bank_frames:
        raise ValueError("a full-sequence forward replays camera retrieval only; a similarity memory bank "
                         "(text-to-video) runs in streaming (StreamGenerator)")
    rows = cameras if cameras is not None else [[(0, 0)] * num_frames]
    out = []
    for cams in rows:
        planner = MemoryPlanner(memory, sink_frames=sink_frames, window_frames=window_frames, grid=grid,
                                use_camera=use_camera) if memory.enabled else None
        window: deque[int] = deque()
        per_chunk = []
        for q0 in range(0, num_frames, chunk_frames):
            q1 = min(q0 + chunk_frames, num_frames)
            sinks = list(range(min(sink_frames, q0)))
            view = planner.view(cams[q0:q1]) if planner is not None else MemoryView()
            per_chunk.append((attended(sinks, list(window), view, cams, cams[q0], memory.wrap_tokens, memory.bank_level),
                              len(sinks) + len(window), view.retrieved))
            for f in range(q0, q1):
                if f >= sink_frames:
                    window.append(f)
                    if len(window) > window_frames:
                        window.popleft()
            if planner is not None:
                planner.commit(cams[q0:q1])
        out.append(per_chunk)
    return out


# --------------------------------------------------------------------------------- compression
def pool_tokens(x_BTHD: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """Mean over ``pool x pool`` cells of a frame's tokens ``(..., gh * gw, H, D)`` (row-major), in
    fp32. The ``pool**2`` strided views of the cells are added elementwise: ~5x faster on the CPU
    than one reduction over the two non-adjacent cell axes (measured at the toy size), and the
    cost is paid by every chunk that pushes frames into the compressed tier."""
    gh, gw = grid
    lead = x_BTHD.shape[:-3]
    x = x_BTHD.float().reshape(*lead, gh // pool, pool, gw // pool, pool, *x_BTHD.shape[-2:])
    total = x[..., :, 0, :, 0, :, :].clone()
    for i in range(pool):
        for j in range(pool):
            if i or j:
                total += x[..., :, i, :, j, :, :]
    return total.div_(pool * pool).reshape(*lead, (gh // pool) * (gw // pool), *x_BTHD.shape[-2:])


@functools.lru_cache(maxsize=64)
def pooled_centroids(grid: tuple[int, int], pool: int, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column (token units, float) of each pooled token's cell centre, row-major (cached:
    every chunk asks for the same few; the arrays are read-only)."""
    cell = pool**level
    rows = np.arange(grid[0] // cell) * cell + (cell - 1) / 2
    cols = np.arange(grid[1] // cell) * cell + (cell - 1) / 2
    out = np.repeat(rows, len(cols)), np.tile(cols, len(rows))
    for a in out:
        a.flags.writeable = False
    return out


@dataclass
class Packed:
    """One compressed frame of all layers: ``k``/``v`` ``(N, T', H, D)`` int8 with scales, or floats."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None  # (N, 1, H, D) fp16: per channel
    v_scale: torch.Tensor | None = None  # (N, T', 1, 1) fp16: per token

    def unpack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_scale is None:
            return self.k.to(dtype), self.v.to(dtype)
        return (self.k.float() * self.k_scale.float()).to(dtype), (self.v.float() * self.v_scale.float()).to(dtype)

    def frames_layer(self, i: int) -> Packed:
        """Layer ``i`` of frames stacked on a leading axis: ``(frames, layers, ...)`` -> ``(frames, ...)``."""
        return Packed(*(None if t is None else t[:, i] for t in (self.k, self.v, self.k_scale, self.v_scale)))

    def layer(self, i: int) -> Packed:
        return Packed(self.k[i], self.v[i], None if self.k_scale is None else self.k_scale[i],
                      None if self.v_scale is None else self.v_scale[i])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)


def _q8(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with fp16 scales (the absolute maximum over ``dims`` maps to 127)."""
    scale = (x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-4) / 127.0).half()
    return torch.round(x / scale.float()).clamp(-127, 127).to(torch.int8), scale


def pack(k_TxHD: torch.Tensor, v_TxHD: torch.Tensor, quantize: str, dtype: torch.dtype) -> Packed:
    """Tokens ``(..., T', H, D)`` (any leading dims: layers) as int8 -- keys per channel (the
    maximum over the frame's tokens), values per token (over heads and channels) -- or floats."""
    if quantize == "none":
        return Packed(k_TxHD.to(dtype), v_TxHD.to(dtype))
    kq, ks = _q8(k_TxHD.float(), (-3,))
    vq, vs = _q8(v_TxHD.float(), (-2, -1))
    return Packed(kq, vq, ks, vs)


def compress_frame(k_NTHD: torch.Tensor, v_NTHD: torch.Tensor, cfg: MemoryConfig, grid: tuple[int, int]) -> Packed:
    """Level 1 of a frame leaving the window (pre-RoPE keys/values of every layer)."""
    return pack(pool_tokens(k_NTHD, grid, cfg.pool), pool_tokens(v_NTHD, grid, cfg.pool), cfg.quantize, k_NTHD.dtype)


def compress_frames(k_FNTHD: torch.Tensor, v_FNTHD: torch.Tensor, cfg: MemoryConfig, grid: tuple[int, int]) -> list[Packed]:
    """``compress_frame`` of several frames in one pass (the frames a chunk pushes out of the
    window): a few batched ops instead of a few per frame. Each frame's tokens and scales are
    its own copies, so a frame that leaves the tier frees its bytes."""
    both = compress_frame(k_FNTHD, v_FNTHD, cfg, grid)
    return [_frame_of(both, f) for f in range(k_FNTHD.shape[0])]


def coarsen_all(packed: list[Packed], cfg: MemoryConfig, grid: tuple[int, int], dtype: torch.dtype) -> list[Packed]:
    """``coarsen`` of several level-1 frames in one pass."""
    stacked = Packed(*(None if packed[0].k_scale is None and name.endswith("scale") else torch.stack([getattr(p, name) for p in packed])
                       for name in ("k", "v", "k_scale", "v_scale")))
    both = coarsen(stacked, cfg, grid, dtype)
    return [_frame_of(both, f) for f in range(len(packed))]


def _frame_of(packed: Packed, f: int) -> Packed:
    return Packed(*(None if t is None else t[f].clone() for t in (packed.k, packed.v, packed.k_scale, packed.v_scale)))


def coarsen(packed: Packed, cfg: MemoryConfig, grid: tuple[int, int], dtype: torch.dtype) -> Packed:
    """Level 2 from level 1: pooled again (from the stored, dequantized tokens) and re-packed."""
    k, v = packed.unpack(torch.float32)
    g1 = (grid[0] // cfg.pool, grid[1] // cfg.pool)
    return pack(pool_tokens(k, g1, cfg.pool), pool_tokens(v, g1, cfg.pool), cfg.quantize, dtype)


def memory_bytes_per_frame(*, num_layers: int, tokens_per_frame: int, channels: int, cfg: MemoryConfig,
                           page_bytes_per_value: int = 2) -> dict[str, float]:
    """Bytes per frame of history in each tier (the cost model of the module docstring)."""
    full = num_layers * tokens_per_frame * channels * 2 * page_bytes_per_value
    out = {"window_or_bank_frame": float(full)}
    for level in (1, 2):
        t = tokens_per_frame / cfg.pool ** (2 * level)
        if cfg.quantize == "int8":
            out[f"compressed_level{level}"] = num_layers * (t * channels * 2 + (channels + t) * 2)
        else:
            out[f"compressed_level{level}"] = num_layers * t * channels * 2 * page_bytes_per_value
    out["bank_entry"] = out[f"compressed_level{cfg.bank_level}"] if cfg.bank_level else float(full)
    return out
