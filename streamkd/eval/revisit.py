"""Revisit consistency: does a world model keep a place when the camera comes back to it?

Trajectories (``revisit_actions``) start at the episode's first view, explore a little beyond it,
leave for a gap of about ``g x (sinks + window)`` frames -- longer than anything the cache can
still hold -- and come back:

* ``out_and_back``: out along a random path inside a band of rows that never sees the rows of the
  start, back along the same path reversed;
* ``loop``: out the same way, back by another path (the displacement undone column-first instead
  of row-first);
* ``offset``: out and back, the return ending half a frame to the side of the way out;
* ``idle``: straight out of view, a long idle (action ``none``), straight back.

Pixels are tracked in world coordinates on the torus (the camera follows from the actions). A
pixel of frame t is *returning* when its world point was seen before, its last sighting is older
than the window of frames the cache holds while t's chunk is generated, it never was in a sink
frame (so not in frame 0 either), and no moving object covers it now or at the sighting it is
compared with. Two protocols:

* **observed**: the frames before the return are given (ground truth, ``StreamGenerator.observe``)
  and the model generates the return; returning pixels are scored against ground truth (PSNR,
  SSIM). What the model must reproduce left its cache long ago.
* **generated**: the model makes every frame after frame 0; returning pixels are scored against
  the model's *own first rendering* of the same world point (self-consistency). Beside it, the
  same figure for pixels first seen by a frame the cache still holds (temporal stability: what
  stays in the window should stay put).

Rows that make the numbers readable (``evaluate_revisits``): the model with its own cache; the
same weights with the whole history uncompressed in the cache (full-KV oracle: a window as long
as the episode; cached frames keep re-based positions, so temporal distances up to the episode
length reach RoPE, far beyond the sinks + window the student was trained with -- it shows what
the weights can do with the history, not a deployable cache); two no-memory floors (the mean
colour of the episode's map; a realistic painter that paints another place of the same biome:
ground truth of another seed); and the ceiling (observed: ground truth through the model's
codec; generated: ground truth's own self-consistency, 100 dB up to moving objects).

Legend: T frames, H = W = frame size, M map size (torus), S = sinks + window.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from streamkd.data.toyworld import ACTION_DELTAS, ToyWorld, ToyWorldConfig, camera_offsets, heldout_seed, prompt_for_seed
from streamkd.eval.metrics import _object_mask

KINDS = ("out_and_back", "loop", "offset", "idle")
GAPS = (2, 8, 32)
_NONE, _UP, _DOWN, _LEFT, _RIGHT = range(5)
_INVERSE = {_NONE: _NONE, _UP: _DOWN, _DOWN: _UP, _LEFT: _RIGHT, _RIGHT: _LEFT}
PSNR_CAP = 100.0


@dataclass
class Trajectory:
    kind: str
    gap: int
    """g: the return comes about g x (sinks + window) frames after the place was last seen (the
    trajectory also revisits its own wander at shorter gaps: pixels are scored in the bucket of
    their own gap, ``gap_buckets``)."""
    actions: np.ndarray
    """int64 [T]: ``actions[t]`` is the move into frame t."""
    return_start: int
    """First frame of the return (a multiple of the chunk size): the observed protocol gives the
    frames before it."""


def revisit_actions(kind: str, gap: int, span: int, chunk: int, world: ToyWorldConfig, rng: np.random.Generator) -> Trajectory:
    """A trajectory of ``kind`` whose return comes about ``gap * span`` frames after the place it
    returns to was last seen (``span`` = sinks + window of the model under test)."""
    if kind not in KINDS:
        raise ValueError(f"unknown trajectory kind {kind!r}; choose from {KINDS}")
    if gap < 1 or span < 1 or chunk < 1:
        raise ValueError(f"gap, span and chunk must be >= 1, got {gap}, {span}, {chunk}")
    view = world.frame_size // world.speed_px  # a frame, in camera steps
    lap = world.map_size // world.speed_px  # the torus, in camera steps
    if lap < 3 * view:
        raise ValueError(f"map_size {world.map_size} leaves no room to go out of view and back; it must be >= 3 frames")
    away = gap * span  # frames between leaving the place and seeing it again
    out: list[int] = [_NONE] + [_RIGHT] * (view // 2)  # explore half a frame beyond frame 0
    if kind == "idle":
        up = [_UP] * view  # just out of view of everything seen so far
        idle = [_NONE] * max(0, away - 2 * view)
        path = up + idle
        back = [_DOWN] * view
    else:
        # a random walk in the rows [view, lap - view] below the start (never seeing its rows),
        # columns free: starts by going down out of view, then wanders for the rest of the gap
        down = [_DOWN] * (view + 1)
        wander: list[int] = []
        row = view + 1
        steps = max(0, (away - 2 * len(down)) // 2)
        while len(wander) < steps:
            move, run = int(rng.integers(1, 5)), int(rng.integers(1, 4))
            if move in (_UP, _DOWN):
                new_row = row + run * (1 if move == _DOWN else -1)
                if not view + 1 <= new_row <= lap - view - 1:
                    continue  # would bring the start's rows into view
                row = new_row
            wander += [move] * run
        path = down + wander[:steps]
        if kind == "loop":
            dy, dx = ACTION_DELTAS[np.asarray(path)].sum(0)
            back = ([_LEFT] * dx if dx > 0 else [_RIGHT] * -dx) + ([_UP] * dy if dy > 0 else [_DOWN] * -dy)
        else:
            back = [_INVERSE[a] for a in reversed(path)]
            if kind == "offset":
                back = back[: len(back) - 1] + [_LEFT] * (view // 2)  # come back half a frame to the left
    # pad the way out so the return starts on a chunk boundary (the observed protocol gives whole chunks)
    before = out + path
    before += [_NONE] * (-len(before) % chunk)
    actions = np.asarray(before + back + [_NONE] * chunk, dtype=np.int64)
    return Trajectory(kind, gap, actions, len(before))


def object_mask(world: ToyWorld, actions: np.ndarray, truth_THWC: np.ndarray, dilate: int = 2) -> np.ndarray:
    """bool [T, H, W]: pixels a moving object covers (exact: the render differs from the static
    map there), dilated by ``dilate`` px for the blur of generated frames."""
    hit = (truth_THWC != world.render_static(actions, len(actions))).any(-1)
    h, w = hit.shape[1:]
    padded = np.pad(hit, ((0, 0), (dilate, dilate), (dilate, dilate)))
    out = np.zeros_like(hit)
    for dy in range(2 * dilate + 1):
        for dx in range(2 * dilate + 1):
            out |= padded[:, dy : dy + h, dx : dx + w]
    return out


def gap_buckets(gaps_N: np.ndarray, span: int) -> np.ndarray:
    """The bucket of ``GAPS`` of each returning pixel, by the frames since it was last seen in
    units of the cache span S: 2 for gaps under 4 S, 8 under 16 S, 32 beyond."""
    ratio = gaps_N / span
    return np.where(ratio < 4, 2, np.where(ratio < 16, 8, 32))


def _ssim_map(a_HW: np.ndarray, b_HW: np.ndarray, r: int = 3) -> np.ndarray:
    """Structural similarity of two grayscale images in [0, 1], per pixel, over (2r+1)^2 box windows
    (edge-padded); the constants of Wang et al. 2004 for a dynamic range of 1."""
    c1, c2 = 0.01**2, 0.03**2

    def box(x: np.ndarray) -> np.ndarray:
        p = np.pad(x, r, mode="edge")
        s = np.cumsum(np.cumsum(np.pad(p, ((1, 0), (1, 0))), 0), 1)
        k = 2 * r + 1
        return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / k**2

    mu_a, mu_b = box(a_HW), box(b_HW)
    var_a, var_b = box(a_HW * a_HW) - mu_a**2, box(b_HW * b_HW) - mu_b**2
    cov = box(a_HW * b_HW) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


@dataclass
class Score:
    """Pooled squared error, SSIM sum and pixel count (pooling over episodes stays exact)."""

    sq_err: float = 0.0
    ssim: float = 0.0
    count: int = 0
    gaps: list[int] = field(default_factory=list)

    def add(self, pred_N3: np.ndarray, ref_N3: np.ndarray, ssim_N: np.ndarray, gaps_N: np.ndarray | None = None) -> None:
        self.sq_err += float(np.square(pred_N3 - ref_N3).sum())
        self.ssim += float(ssim_N.sum())
        self.count += len(pred_N3)
        if gaps_N is not None and len(gaps_N):
            self.gaps.append(int(np.median(gaps_N)))

    def merge(self, other: "Score") -> None:
        self.sq_err += other.sq_err
        self.ssim += other.ssim
        self.count += other.count
        self.gaps += other.gaps

    def result(self) -> dict:
        if not self.count:
            return {"psnr": None, "ssim": None, "pixels": 0}
        mse = self.sq_err / (3 * self.count)
        psnr = PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else float(10 * np.log10(1.0 / mse))
        out = {"psnr": psnr, "ssim": self.ssim / self.count, "pixels": self.count}
        if self.gaps:
            out["median_gap_frames"] = int(np.median(self.gaps))
        return out


def score_trajectory(
    pred_THWC: np.ndarray, truth_THWC: np.ndarray, actions: np.ndarray, world: ToyWorldConfig, *,
    sinks: int, window: int, chunk: int, protocol: str, start: int = 1, objects_THW: np.ndarray | None = None,
) -> tuple[dict[int, Score], Score]:
    """(returning scores by gap bucket (``gap_buckets``), in-window score) of one trajectory; see
    the module docstring.

    ``protocol``: "observed" scores against ``truth_THWC``; "generated" against the first
    rendering in ``pred_THWC`` of each world point. Frames before ``start`` are not scored
    (the observed protocol starts at the return). ``sinks`` / ``window`` / ``chunk`` say what the
    cache holds (those of the model under test, also for the oracle rows: the masks stay put).
    ``objects_THW``: where moving objects are (``object_mask``); default: found by their colour.
    """
    if protocol not in ("observed", "generated"):
        raise ValueError(f"protocol must be 'observed' or 'generated', got {protocol!r}")
    T, f = len(actions), world.frame_size
    if pred_THWC.shape != truth_THWC.shape or pred_THWC.shape != (T, f, f, 3):
        raise ValueError(f"frames must both be ({T}, {f}, {f}, 3) for {T} actions, got {pred_THWC.shape} and {truth_THWC.shape}")
    m = world.map_size
    off_T2 = camera_offsets(actions, world)
    pred = pred_THWC.astype(np.float64) / 255.0
    truth = truth_THWC.astype(np.float64) / 255.0
    if objects_THW is None:
        objects_THW = _object_mask(truth)
    last_seen = np.full((m, m), -1, dtype=np.int64)
    first_seen = np.full((m, m), -1, dtype=np.int64)
    first_rgb = np.zeros((m, m, 3))
    first_gray = np.zeros((m, m))
    first_obj = np.zeros((m, m), dtype=bool)
    in_sink = np.zeros((m, m), dtype=bool)
    returning, in_window = {g: Score() for g in GAPS}, Score()
    span = sinks + window
    pix = np.arange(f)
    for t in range(T):
        ys, xs = (off_T2[t, 0] + pix) % m, (off_T2[t, 1] + pix) % m
        ix = np.ix_(ys, xs)
        if t >= start:
            chunk_start = (t // chunk) * chunk
            held_from = chunk_start - window  # the cache holds frames [held_from, chunk_start) and the sinks
            clean = ~objects_THW[t] & ~first_obj[ix]
            prev = last_seen[ix]
            ret = clean & (prev >= 0) & (prev < held_from) & ~in_sink[ix]
            first = first_seen[ix]
            win = clean & (first >= max(held_from, sinks)) & (first < chunk_start)
            if ret.any() or win.any():
                gray_t = pred[t].mean(-1)
                if protocol == "observed":
                    ref_rgb, ref_gray = truth[t], truth[t].mean(-1)
                else:
                    ref_rgb, ref_gray = first_rgb[ix], first_gray[ix]
                ssim = _ssim_map(gray_t, ref_gray)
                gap_bucket = gap_buckets((t - prev)[ret], span)
                for g in GAPS:
                    sel = gap_bucket == g
                    if sel.any():
                        returning[g].add(pred[t][ret][sel], ref_rgb[ret][sel], ssim[ret][sel], (t - prev)[ret][sel])
                # temporal stability is about the model's own rendering (both protocols)
                win_ssim = ssim if protocol == "generated" else _ssim_map(gray_t, first_gray[ix])
                in_window.add(pred[t][win], first_rgb[ix][win], win_ssim[win])
        new = first_seen[ix] < 0
        if new.any():
            rgb = pred[t] if t >= start or protocol == "generated" else truth[t]
            fr, fg, fo, fs = first_rgb[ix], first_gray[ix], first_obj[ix], first_seen[ix]
            fr[new], fg[new], fo[new], fs[new] = rgb[new], rgb.mean(-1)[new], objects_THW[t][new], t
            first_rgb[ix], first_gray[ix], first_obj[ix], first_seen[ix] = fr, fg, fo, fs
        last_seen[ix] = t
        if t < sinks:
            in_sink[ix] = True
    return returning, in_window


def revisit_trajectories(gaps: tuple[int, ...], episodes: int, first_index: int, span: int, chunk: int,
                         world: ToyWorldConfig) -> list[tuple[int, str, Trajectory]]:
    """(seed, prompt, trajectory) per episode: ``episodes`` per gap on held-out seeds, the kinds
    taken in turn so that every kind appears."""
    out = []
    for gi, g in enumerate(gaps):
        for j in range(episodes):
            index = first_index + gi * episodes + j
            seed = heldout_seed(index)
            rng = np.random.default_rng(seed)
            traj = revisit_actions(KINDS[(gi + j) % len(KINDS)], g, span, chunk, world, rng)
            out.append((seed, prompt_for_seed(seed), traj))
    return out


def mean_colour_frames(truth_THWC: np.ndarray, world_map: np.ndarray) -> np.ndarray:
    """The no-memory, no-texture floor: every frame the mean colour of the episode's map."""
    mean = np.rint(world_map.reshape(-1, 3).mean(0)).astype(np.uint8)
    return np.broadcast_to(mean, truth_THWC.shape).copy()


def other_place_frames(seed: int, prompt: str, actions: np.ndarray, world: ToyWorldConfig) -> np.ndarray:
    """The no-memory, realistic floor: the same camera path over another map of the same biome."""
    return ToyWorld(world, seed + 7919, prompt).render(actions, len(actions))


# ------------------------------------------------------------------------------------ the runner
def _stream(model, prompt: str, seed: int, actions: np.ndarray, truth: np.ndarray, causal, sampling,
            observed: int | None) -> np.ndarray:
    """The model's frames of a trajectory: frame 0 given (generated protocol), or the first
    ``observed`` frames given (observed protocol, those frames copied into the result)."""
    from streamkd.generate import generate_frames

    if observed is None:
        chunks = generate_frames(model, prompt=prompt, seed=seed, actions=actions.tolist(), first_frame=truth[0],
                                 sampling=sampling, causal=causal)
        return np.concatenate(list(chunks))
    chunks = generate_frames(model, prompt=prompt, seed=seed, actions=actions.tolist(), first_frame=None,
                             sampling=sampling, causal=causal, observed=truth[:observed])
    return np.concatenate([truth[:observed], *chunks])


def _reference_frames(name: str, truth: np.ndarray, seed: int, prompt: str, traj: Trajectory, world: ToyWorldConfig,
                      codec) -> np.ndarray:
    """Frames of a reference row: ground truth up to the return, then what the reference paints."""
    T = len(traj.actions)
    if name == "ceiling":
        import torch

        with torch.no_grad():
            return codec.decode(codec.encode(torch.from_numpy(truth)[None]))[0].numpy()
    world_map = ToyWorld(world, seed, prompt).static_map
    after = mean_colour_frames(truth, world_map) if name == "floor_mean_colour" else other_place_frames(seed, prompt, traj.actions, world)
    out = truth.copy()
    out[traj.return_start : T] = after[traj.return_start : T]
    return out


def history_held(model, causal, traj: Trajectory, at: int | None = None, bytes_per_value: int = 2) -> dict:
    """What the model's cache holds before the chunk of frame ``at`` (default: the first frame of
    the way back), against the whole history: bytes of keys and values (plus the clean latents a
    rendered memory keeps) of sinks, window and memory tiers -- replayed by the planner from the
    trajectory's cameras, as the stream decides them -- over the bytes of every frame so far in
    full-resolution pages. ``bytes_per_value``: the pages' dtype (2: fp16/bf16, how a GPU serves
    them; int8 tiers are counted as stored)."""
    import torch

    from streamkd.cache.memory import MemoryConfig, MemoryPlanner, memory_bytes_per_frame

    dit, mem = model.dit, causal.memory or MemoryConfig()
    lh, lw = model.latent_hw
    _, ph, pw = dit.cfg.patch_size
    grid = (lh // ph, lw // pw)
    cost = memory_bytes_per_frame(num_layers=dit.cfg.num_layers, tokens_per_frame=grid[0] * grid[1],
                                  channels=dit.cfg.num_heads * dit.cfg.head_dim, cfg=mem, page_bytes_per_value=bytes_per_value)
    full = cost["window_or_bank_frame"]
    at = traj.return_start if at is None else at
    q0 = at // causal.chunk_frames * causal.chunk_frames  # frames written before that chunk
    sinks = min(causal.sink_frames, q0)
    window = min(causal.window_frames, q0 - sinks)
    held = (sinks + window) * full
    bank = compressed = 0
    if mem.enabled:
        # a model without camera actions retrieves by key similarity, which needs its keys: count
        # its bank full (an upper bound) and replay the compressed tier alone
        camera = dit.action_shifts is not None
        replay_mem = mem if camera else mem.without_bank()
        planner = MemoryPlanner(replay_mem, sink_frames=causal.sink_frames, window_frames=causal.window_frames,
                                grid=grid, use_camera=camera)
        cams = dit.camera_offsets(torch.from_numpy(traj.actions[None, :q0]), 1, q0)
        planner.commit([tuple(c) for c in cams[0].tolist()] if camera else [(0, 0)] * q0)
        past = max(q0 - causal.sink_frames - causal.window_frames, 0)
        bank = len(planner.bank) if camera else min(mem.bank_frames, past)
        compressed = list(planner.compressed)
        held += bank * cost["bank_entry"] + sum(cost[f"compressed_level{lvl}"] for _, lvl in compressed)
        if mem.render:  # every page, and every pooled bank entry, keeps its clean latent
            held += (sinks + window + bank) * dit.cfg.out_channels * lh * lw * bytes_per_value
    return {"frames": q0, "bank_entries": bank, "compressed_frames": len(compressed) if mem.enabled else 0,
            "held_bytes": held, "history_bytes": q0 * full, "share": held / max(q0 * full, 1)}


def evaluate_revisits(model, *, episodes: int, first_index: int, gaps: tuple[int, ...] = GAPS, sampling=None,
                      causal=None, oracle_max_gap: int | None = 8) -> dict:
    """Revisit consistency of a streaming model, with the reference rows; see the module docstring.

    ``episodes`` trajectories per gap, on held-out seeds from ``first_index``. The full-KV oracle
    row runs on the trajectories of gaps up to ``oracle_max_gap`` (None: none; its cost grows
    with the square of the episode length). Returns ``{row: {protocol: {"returning": {gap:
    figures}, "in_window": figures}}}`` plus ``trajectories`` (seed, kind, gap, frames, the share of
    the history's bytes the cache holds when the way back starts: ``history_held``) and
    ``history_held`` (that share's mean per gap, when the way back starts and before its last chunk:
    the history grows while the returning pixels are scored).
    """

    causal = causal or model.cfg.causal
    if causal is None:
        raise ValueError("revisit consistency streams the model: this checkpoint has no causal config "
                         "(config.json 'causal'); pass --causal to stream a bidirectional checkpoint")
    world = model.cfg.world
    span = causal.sink_frames + causal.window_frames
    trajs = revisit_trajectories(gaps, episodes, first_index, span, causal.chunk_frames, world)
    rows = ["model", "full_kv_oracle", "floor_mean_colour", "floor_other_place", "ceiling"]
    acc = {r: {p: ({g: Score() for g in GAPS}, Score()) for p in ("observed", "generated")} for r in rows}
    for seed, prompt, traj in trajs:
        T = len(traj.actions)
        toy = ToyWorld(world, seed, prompt)
        truth = toy.render(traj.actions, T)
        objects = object_mask(toy, traj.actions, truth)
        frames: dict[str, dict[str, np.ndarray]] = {}
        frames["model"] = {p: _stream(model, prompt, seed, traj.actions, truth, causal, sampling,
                                      traj.return_start if p == "observed" else None) for p in ("observed", "generated")}
        if oracle_max_gap is not None and traj.gap <= oracle_max_gap:
            window = -(-T // causal.chunk_frames) * causal.chunk_frames
            full = replace(causal, window_frames=max(window, causal.window_frames))
            frames["full_kv_oracle"] = {p: _stream(model, prompt, seed, traj.actions, truth, full, sampling,
                                                   traj.return_start if p == "observed" else None) for p in ("observed", "generated")}
        for name in ("floor_mean_colour", "floor_other_place", "ceiling"):
            ref = _reference_frames(name, truth, seed, prompt, traj, world, model.codec)
            frames[name] = {"observed": ref, "generated": ref if name != "ceiling" else truth}
        for row, by_protocol in frames.items():
            for protocol, pred in by_protocol.items():
                ret, win = score_trajectory(pred, truth, traj.actions, world, sinks=causal.sink_frames,
                                            window=causal.window_frames, chunk=causal.chunk_frames, protocol=protocol,
                                            start=traj.return_start if protocol == "observed" else 1, objects_THW=objects)
                for g in GAPS:
                    acc[row][protocol][0][g].merge(ret[g])
                acc[row][protocol][1].merge(win)
    out: dict = {}
    for row, by_protocol in acc.items():
        out[row] = {p: {"returning": {str(g): s.result() for g, s in ret.items()}, "in_window": win.result()}
                    for p, (ret, win) in by_protocol.items()}
    out["trajectories"] = [{"seed": s, "kind": t.kind, "gap": t.gap, "frames": len(t.actions), "return_start": t.return_start,
                            "history_held": history_held(model, causal, t),
                            "history_held_end": history_held(model, causal, t, at=len(t.actions) - 1)} for s, _, t in trajs]
    out["history_held"] = {
        str(g): [float(np.mean([t[key]["share"] for t in out["trajectories"] if t["gap"] == g]))
                 for key in ("history_held", "history_held_end")]
        for g in gaps}
    out["span_frames"] = span
    out["oracle_max_gap"] = oracle_max_gap
    return out


def observed_return(model, *, gap: int, index: int, sampling=None, causal=None) -> tuple[np.ndarray, np.ndarray, Trajectory]:
    """The model's frames and the ground truth of one observed revisit (the way out given, the way
    back generated): the first trajectory of ``gap`` at held-out index ``index`` -- for looking at
    what the numbers say."""
    causal = causal or model.cfg.causal
    world = model.cfg.world
    span = causal.sink_frames + causal.window_frames
    seed, prompt, traj = revisit_trajectories((gap,), 1, index, span, causal.chunk_frames, world)[0]
    truth = ToyWorld(world, seed, prompt).render(traj.actions, len(traj.actions))
    out = _stream(model, prompt, seed, traj.actions, truth, causal, sampling, traj.return_start)
    return out, truth, traj

