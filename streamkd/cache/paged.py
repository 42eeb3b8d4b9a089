"""The paged KV store: every tier of a stream's memory is a list of pages in one shared pool.

Legend: N layers, B streams (rows), P pages, T tokens per frame, H heads, D head dim, S keys.

A *page* holds the pre-RoPE keys and values of one latent frame of one stream, for every layer:
``pool.k[:, page]`` is ``(N, T, H, D)``. Pages are written once (the chunk's clean pass) and never
modified, so sharing them is copy-on-write for free: a snapshot, a branch, the bank's copy of a
frame leaving the window are all a page id and a reference count (PagedAttention's block table,
flash-attn's ``block_table``, FlexAttention's paged attention). Each stream (``_Rows`` entry) owns
only host-side tables:

    sinks       page ids of the first frames, kept forever
    window      (frame, page) of the most recent frames, oldest first
    bank        frame -> page of the memory bank's full-resolution entries
    compressed  frame -> ``Packed`` (int8 or float tokens, see ``streamkd.cache.memory``)
    planner     which frame is in which tier (``MemoryPlanner``)

Reading: before a chunk's first pass the cache gathers, per layer, the pages (and dequantized
compressed tokens) a row attends to into one contiguous buffer, rotated once (camera-anchored
RoPE per token), with room behind it for the chunk's own keys -- the chunk's later passes copy
only their own tokens. That gather is the only per-chunk copy of history; a batch of streams at
different points (different retrieved sets, different tier sizes) is one buffer padded to the
longest row, with a key mask. Writing: the chunk's clean pass writes its new pages; ``commit``
files them into the tables and applies the planner's transitions (compress, coarsen, drop, admit,
evict, release).

With ``MemoryConfig()`` (both tiers off) this is the sinks + window cache of
``streamkd.cache.kv_cache`` on pages; tests check they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from streamkd.cache.kv_cache import with_chunk
from streamkd.cache.memory import (
    MemoryConfig, MemoryPlanner, MemoryView, Packed, attended, coarsen_all, compress_frames, piece_positions,
    wrap_near,
)


class PagePool:
    """Full-resolution pages ``(N, P, T, H, D)`` with reference counts; grows by doubling."""

    def __init__(self, num_layers: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int) -> None:
        shape = (num_layers, max(capacity, 1), tokens, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * shape[1]
        self.free = list(range(shape[1] - 1, -1, -1))
        self.grows = 0
        self.latent: torch.Tensor | None = None
        """``(P, C, h, w)``: each page's clean frame latent, for rendered memory (allocated by the
        first ``write_latents``; None when nothing renders)."""

    def write_latents(self, pages: list[int], x_PCHW: torch.Tensor) -> None:
        if self.latent is None:
            self.latent = torch.zeros(self.capacity, *x_PCHW.shape[1:], dtype=x_PCHW.dtype, device=self.k.device)
        if self.latent.shape[1:] != x_PCHW.shape[1:]:
            raise ValueError(f"latent frames of {tuple(x_PCHW.shape[1:])} written into a page pool holding "
                             f"{tuple(self.latent.shape[1:])}: one pool serves one latent size")
        self.latent[torch.tensor(pages, dtype=torch.long, device=self.latent.device)] = x_PCHW.to(self.latent.dtype)

    @property
    def capacity(self) -> int:
        return len(self.refs)

    @property
    def in_use(self) -> int:
        return self.capacity - len(self.free)

    def alloc(self) -> int:
        if not self.free:
            n = self.capacity
            self.k = torch.cat([self.k, torch.zeros_like(self.k)], 1)
            self.v = torch.cat([self.v, torch.zeros_like(self.v)], 1)
            if self.latent is not None:
                self.latent = torch.cat([self.latent, torch.zeros_like(self.latent)])
            self.refs += [0] * n
            self.free = list(range(2 * n - 1, n - 1, -1))
            self.grows += 1
        page = self.free.pop()
        self.refs[page] = 1
        return page

    def incref(self, page: int) -> None:
        assert self.refs[page] > 0, "page is free"
        self.refs[page] += 1

    def decref(self, page: int) -> None:
        assert self.refs[page] > 0, "page is free"
        self.refs[page] -= 1
        if not self.refs[page]:
            self.free.append(page)

    @property
    def page_bytes(self) -> int:
        """Keys and values of one page, plus its clean latent when pages keep them."""
        return 2 * self.k[:, 0].nbytes + (0 if self.latent is None else self.latent[0].nbytes)


@dataclass
class _Row:
    """One stream's tables (host only)."""

    planner: MemoryPlanner | None
    sinks: list[int] = field(default_factory=list)
    window: list[tuple[int, int]] = field(default_factory=list)  # (frame, page), oldest first
    bank: dict[int, int] = field(default_factory=dict)  # frame -> page (memory.bank_level 0)
    bank_packed: dict[int, Packed] = field(default_factory=dict)  # frame -> pooled tokens (bank_level 1, 2)
    bank_latent: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> clean latent (pooled + render)
    compressed: dict[int, Packed] = field(default_factory=dict)
    cameras: list[tuple[int, int]] = field(default_factory=list)  # per frame
    retrieved_last: int = 0  # bank entries the last chunk read
    retrieved_total: int = 0

    def pages(self) -> list[int]:
        return self.sinks + [p for _, p in self.window] + list(self.bank.values())

    def memory_frames(self) -> set[int]:
        """Frames past the window that a memory tier still holds."""
        return {*self.bank, *self.bank_packed, *self.compressed}

    def copy(self) -> _Row:
        return _Row(None if self.planner is None else self.planner.clone(), list(self.sinks), list(self.window),
                    dict(self.bank), dict(self.bank_packed), dict(self.bank_latent), dict(self.compressed),
                    list(self.cameras), self.retrieved_last, self.retrieved_total)


@dataclass(frozen=True)
class PagedSnapshot:
    """Streams of a paged cache, by reference: their tables and the pages' extra references.

    Taking one copies no key or value; the pages stay alive until ``release``. Rows of snapshots
    taken at different stream positions can be batched (``concat``)."""

    pool: PagePool
    rows_: tuple[_Row, ...]
    frames_written: tuple[int, ...]
    device_state: dict[str, torch.Tensor]
    memory: MemoryConfig
    layout: tuple[int, int, int]  # sinks, window, chunk

    def rows(self, index: list[int]) -> PagedSnapshot:
        state = {k: v[index] for k, v in self.device_state.items()}
        rows = tuple(self.rows_[i].copy() for i in index)
        for r in rows:
            for p in r.pages():
                self.pool.incref(p)
        return PagedSnapshot(self.pool, rows, tuple(self.frames_written[i] for i in index), state, self.memory, self.layout)

    @staticmethod
    def concat(parts: list[PagedSnapshot]) -> PagedSnapshot:
        first = parts[0]
        if any(p.pool is not first.pool or p.memory != first.memory or p.layout != first.layout for p in parts):
            raise ValueError("snapshots of different page pools or memory layouts cannot be batched")
        rows = tuple(r.copy() for p in parts for r in p.rows_)
        for r in rows:
            for pg in r.pages():
                first.pool.incref(pg)
        keys = first.device_state.keys()
        state = {k: torch.cat([p.device_state[k] for p in parts]) for k in keys}
        return PagedSnapshot(first.pool, rows, tuple(f for p in parts for f in p.frames_written), state,
                             first.memory, first.layout)

    def release(self) -> None:
        """Give back this snapshot's page references (it must not be used afterwards)."""
        for r in self.rows_:
            for p in r.pages():
                self.pool.decref(p)


class PagedKVCache:
    """Sinks, window, compressed tier and memory bank of ``B`` streams, on one page pool.

    The interface the DiT uses is the one of ``KVCache`` (``attention_kv``, ``write``,
    ``write_camera``, ``commit``, ``key_rope``, ...), plus ``key_mask`` for batches whose rows
    attend to different numbers of keys.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        grid: tuple[int, int],
        num_heads: int,
        head_dim: int,
        sink_frames: int,
        window_frames: int,
        chunk_frames: int,
        memory: MemoryConfig,
        use_camera: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pool: PagePool | None = None,
    ) -> None:
        if window_frames < chunk_frames:
            raise ValueError(f"window_frames ({window_frames}) must be >= chunk_frames ({chunk_frames})")
        memory.check(*grid, chunk_frames)
        self.num_layers, self.grid = num_layers, grid
        self.tokens_per_frame = grid[0] * grid[1]
        self.sink_frames, self.window_frames, self.chunk_frames = sink_frames, window_frames, chunk_frames
        self.memory, self.use_camera = memory, use_camera
        self.dtype, self.device = dtype, torch.device(device)
        per_row = sink_frames + window_frames + chunk_frames + memory.bank_frames
        self.pool = pool or PagePool(num_layers, self.tokens_per_frame, num_heads, head_dim, dtype, device,
                                     batch_size * per_row)
        self._rows = [self._new_row() for _ in range(batch_size)]
        self.camera_last_B2 = torch.zeros(batch_size, 2, dtype=torch.long)  # host: camera offsets are host data
        self.anchor_BCHW: torch.Tensor | None = None
        self.anchor_camera_B2 = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
        self.anchor_valid_B = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.camera_known_B = torch.ones(batch_size, dtype=torch.bool, device=device)
        self._pending: list[list[int]] | None = None  # new pages per row of the chunk being written
        self._pending_cameras: list[list[tuple[int, int]]] | None = None
        self.derived: dict = {}
        self.stats = {"gathered_tokens": 0, "retrieved": 0, "chunks": 0}
        self.keeps_latents = memory.render
        """Pages of this cache keep their frame's clean latent (rendered memory reads them back). A
        scratch cache writing pages for such a cache (the server's prompt-switch re-cache) sets it."""
        self.hide_window = 0
        """Training only (history drop): the next chunk does not read the oldest ``hide_window``
        window frames, so it must find them in memory. Positions of the rest are unchanged."""

    def _new_row(self) -> _Row:
        planner = None
        if self.memory.enabled:
            planner = MemoryPlanner(self.memory, sink_frames=self.sink_frames, window_frames=self.window_frames,
                                    grid=self.grid, use_camera=self.use_camera)
        return _Row(planner)

    # ----------------------------------------------------------------------------------- host side
    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @property
    def frames_written(self) -> int:
        """Frames written into the least advanced row (rows of a server batch may be at different
        points of their streams; all of them have started, or none)."""
        return min(len(r.cameras) for r in self._rows)

    @property
    def num_filled(self) -> int:
        """Sink + window frames of row 0 (every row of a batch must agree: they share query positions)."""
        return len(self._rows[0].sinks) + len(self._rows[0].window)

    @property
    def query_position(self) -> int:
        pos = {len(r.sinks) + len(r.window) for r in self._rows}
        if len(pos) != 1:
            raise ValueError("rows of a batch must have the same number of sink + window frames (the chunk's "
                             "temporal RoPE position); batch sessions once their windows are full")
        return pos.pop()

    # ------------------------------------------------------------------------------- the read side
    def _views(self, camera_BF2: torch.Tensor | None) -> list[MemoryView]:
        views = self.derived.get("views")
        if views is None:
            cams = camera_BF2.tolist() if camera_BF2 is not None else None
            views = []
            for b, r in enumerate(self._rows):
                if r.planner is None:
                    views.append(MemoryView())
                else:
                    views.append(r.planner.view([tuple(c) for c in cams[b]] if cams is not None else None))
            self.derived["views"] = views
            self.stats["chunks"] += 1
            self.stats["retrieved"] += sum(len(v.retrieved) for v in views)
            for r, v in zip(self._rows, views):
                r.retrieved_last = len(v.retrieved)
                r.retrieved_total += len(v.retrieved)
        return views

    def _layout(self, camera_BF2: torch.Tensor | None) -> list[list[tuple]]:
        """Per row, the attended pieces in token order ``[sinks | retrieved | compressed | window]``
        (``streamkd.cache.memory.attended``): ``(kind, ref, t_pos, camera, level)`` with kind
        ``page`` (ref: page id) or ``packed`` (ref: the pooled tokens -- a compressed-tier frame or
        a pooled bank entry)."""
        pieces = self.derived.get("pieces")
        if pieces is not None:
            return pieces
        views = self._views(camera_BF2)
        near_all = camera_BF2[:, 0].tolist() if camera_BF2 is not None else None
        pieces = []
        for b, (r, view) in enumerate(zip(self._rows, views)):
            near = tuple(near_all[b]) if near_all is not None else (0, 0)
            page_of = {f: p for f, p in enumerate(r.sinks)} | dict(r.window) | r.bank
            order = attended(list(range(len(r.sinks))), [f for f, _ in r.window], view, r.cameras, near,
                             self.memory.wrap_tokens, self.memory.bank_level)
            bank_end = len(r.sinks) + len(view.retrieved)  # order: sinks, retrieved, compressed, window
            if self.hide_window:  # training's history drop: the oldest window frames are not read
                hidden = {f for f, _ in r.window[: self.hide_window]}
                order = [piece for piece in order if not (piece[3] == 0 and piece[0] in hidden and piece[0] not in view.retrieved)]
            pieces.append([("page", page_of[f], t, cam, 0) if level == 0 else
                           ("packed", r.bank_packed[f] if i < bank_end else r.compressed[f], t, cam, level)
                           for i, (f, t, cam, level) in enumerate(order)])
        self.derived["pieces"] = pieces
        return pieces

    def _piece_tokens(self, level: int) -> int:
        return self.tokens_per_frame // (self.memory.pool ** (2 * level)) if level else self.tokens_per_frame

    def key_rope(self, rope, gh: int, gw: int, camera_BF2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``(B, S, D/2)`` of every attended key (once per cache state)."""
        tables = self.derived.get("rope")
        if tables is not None:
            return tables
        pieces = self._layout(camera_BF2)
        S = max(sum(self._piece_tokens(p[4]) for p in row) for row in pieces)
        B = len(pieces)
        t_BS = np.zeros((B, S), dtype=np.int64)  # rows shorter than S are masked (key_mask)
        r_BS = np.zeros((B, S), dtype=np.float64)
        c_BS = np.zeros((B, S), dtype=np.float64)
        for b, row in enumerate(pieces):
            t, r, c = piece_positions([(p[2], p[3], p[4]) for p in row], (gh, gw), self.memory.pool, camera_BF2 is not None)
            t_BS[b, : len(t)], r_BS[b, : len(t)], c_BS[b, : len(t)] = t, r, c
        if t_BS.size:
            rope.check_positions(int(t_BS.max()))
        dev = self.device
        tables = rope.token_table(torch.from_numpy(t_BS).to(dev), torch.from_numpy(r_BS).to(dev),
                                  torch.from_numpy(c_BS).to(dev))
        self.derived["rope"] = tables
        return tables

    def key_mask(self, query_tokens: int) -> torch.Tensor | None:
        """``(B, 1, 1, S + L)`` True = attend, when rows attend to different numbers of keys; else None."""
        pieces = self.derived["pieces"]
        lens = [sum(self._piece_tokens(p[4]) for p in row) for row in pieces]
        if len(set(lens)) == 1:
            return None
        S = max(lens)
        keep = torch.arange(S + query_tokens, device=self.device)[None] < torch.tensor(lens, device=self.device)[:, None]
        keep[:, S:] = True
        return keep[:, None, None]

    def _row_plan(self, b: int, row: list[tuple]) -> list[tuple]:
        """Copies that fill row ``b``'s gather buffer, once per cache state: one for every
        full-resolution page (an indexed copy of all of them) and one per compression level (its
        frames stacked once for all layers, dequantized per layer in one multiply); each with its
        tokens' places in the buffer."""
        plans = self.derived.setdefault("row_plans", {})
        if b in plans:
            return plans[b]
        dev, at = self.device, 0
        groups: dict[int, tuple[list, list]] = {}
        for kind, ref, _, _, level in row:
            n = self._piece_tokens(level)
            refs, dest = groups.setdefault(level, ([], []))
            refs.append(ref)
            dest.append(torch.arange(at, at + n))
            at += n
        plan = []
        for level, (refs, dest) in groups.items():
            dest_t = torch.cat(dest).to(dev)
            if level == 0:
                plan.append((0, torch.tensor(refs, dtype=torch.long, device=dev), dest_t))
            else:  # the level's frames stacked once for every layer: (frames, layers, tokens, H, D)
                packed = refs
                plan.append((level, Packed(*(None if getattr(packed[0], name) is None else
                                             torch.stack([getattr(p, name) for p in packed])
                                             for name in ("k", "v", "k_scale", "v_scale"))), dest_t))
        plans[b] = plan
        return plan

    def _gather(self, layer: int, pieces: list[list[tuple]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        S = self.derived.get("gather_tokens")
        if S is None:  # once per cache state, not per layer
            S = self.derived["gather_tokens"] = max(sum(self._piece_tokens(p[4]) for p in row) for row in pieces)
        B = len(pieces)
        H, D = self.pool.k.shape[-2:]
        k = torch.zeros(B, S, H, D, dtype=self.dtype, device=self.device)
        v = torch.zeros(B, S, H, D, dtype=self.dtype, device=self.device)
        for b, row in enumerate(pieces):
            for level, refs, dest in self._row_plan(b, row):
                if level == 0:
                    k[b, dest] = self.pool.k[layer, refs].flatten(0, 1)
                    v[b, dest] = self.pool.v[layer, refs].flatten(0, 1)
                    continue
                kk, vv = refs.frames_layer(layer).unpack(self.dtype)
                k[b, dest] = kk.flatten(0, 1)
                v[b, dest] = vv.flatten(0, 1)
        self.stats["gathered_tokens"] += B * S
        return k, v, S

    def attention_kv(
        self, layer: int, k_BLHD: torch.Tensor, v_BLHD: torch.Tensor, rotate: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attended keys (rotated by ``rotate``) and values, followed by the chunk's own."""
        def history() -> tuple[torch.Tensor, torch.Tensor]:
            kc, vc, _ = self._gather(layer, self.derived["pieces"])
            return rotate(kc), vc

        return with_chunk(self.derived, layer, history, k_BLHD, v_BLHD)

    def history_kv(self, layer: int, rotate: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attended keys (rotated) and values of ``layer``, gathered into fresh tensors."""
        kc, vc, _ = self._gather(layer, self.derived["pieces"])
        return rotate(kc), vc

    # ------------------------------------------------------------------------------ the write side
    def write(self, layer: int, k_BLHD: torch.Tensor, v_BLHD: torch.Tensor) -> None:
        """Store the un-rotated keys/values of the chunk that follows the written frames."""
        T = self.tokens_per_frame
        num_frames = k_BLHD.shape[1] // T
        assert k_BLHD.shape[1] == num_frames * T, "chunk is not a whole number of frames"
        idx = torch.tensor(self._pending_pages(num_frames), dtype=torch.long, device=self.device)
        self.pool.k[layer, idx] = k_BLHD.reshape(-1, T, *k_BLHD.shape[2:]).to(self.dtype)
        self.pool.v[layer, idx] = v_BLHD.reshape(-1, T, *v_BLHD.shape[2:]).to(self.dtype)

    def _pending_pages(self, num_frames: int) -> list[int]:
        """The new pages of the chunk being written, row-major (allocated by its first write)."""
        if self._pending is None:
            self._pending = [[self.pool.alloc() for _ in range(num_frames)] for _ in self._rows]
        assert len(self._pending[0]) == num_frames, "the chunk's writes disagree on its length"
        return [p for row in self._pending for p in row]

    def write_latents(self, x_BCFHW: torch.Tensor) -> None:
        """Keep the chunk's clean latents beside its keys (rendered memory reads them back)."""
        if self.keeps_latents:
            pages = self._pending_pages(x_BCFHW.shape[2])
            self.pool.write_latents(pages, x_BCFHW.detach().transpose(1, 2).flatten(0, 1))

    def render_sources(self, camera_BF2: torch.Tensor) -> list[list[tuple[torch.Tensor, tuple[int, int]]]] | None:
        """Per row, the retrieved bank entries the chunk draws into its anchor (rendered memory):
        ``(clean latent (C, h, w), camera moved next to the chunk's)``, oldest first; None when
        this memory does not render."""
        if not self.memory.render:
            return None
        if self.pool.latent is None:
            return [[] for _ in self._rows]
        views = self._views(camera_BF2)
        near_all = camera_BF2[:, 0].tolist()
        return [[(r.bank_latent[f] if self.memory.bank_level else self.pool.latent[r.bank[f]],
                  wrap_near(r.cameras[f], tuple(near_all[b]), self.memory.wrap_tokens))
                 for f in view.retrieved]
                for b, (r, view) in enumerate(zip(self._rows, views))]

    def write_anchor(self, anchor_BCHW: torch.Tensor, camera_B2: torch.Tensor, valid_B: torch.Tensor) -> None:
        assert all(not r.cameras for r in self._rows), "the anchor is the stream's first frame"
        if self.anchor_BCHW is None or self.anchor_BCHW.shape != anchor_BCHW.shape:
            self.anchor_BCHW = torch.empty_like(anchor_BCHW)
        self.anchor_BCHW.copy_(anchor_BCHW)
        self.anchor_camera_B2.copy_(camera_B2)
        self.anchor_valid_B.copy_(valid_B)

    def write_camera(self, camera_BF2: torch.Tensor) -> None:
        assert self._pending is not None and len(self._pending[0]) == camera_BF2.shape[1], \
            "write the chunk's keys before its camera offsets"
        self._pending_cameras = [[tuple(c) for c in row] for row in camera_BF2.tolist()]
        self.camera_last_B2.copy_(camera_BF2[:, -1])

    def commit(self) -> None:
        """File the chunk's new pages into the tables and move frames between tiers."""
        assert self._pending is not None, "commit without write"
        cams = self._pending_cameras or [[(0, 0)] * len(p) for p in self._pending]
        for b, (r, pages) in enumerate(zip(self._rows, self._pending)):
            start = len(r.cameras)
            r.cameras += cams[b]
            for i, page in enumerate(pages):
                f = start + i
                if f < self.sink_frames:
                    r.sinks.append(page)
                else:
                    r.window.append((f, page))
            if r.planner is None:
                while len(r.window) > self.window_frames:
                    self.pool.decref(r.window.pop(0)[1])
                continue
            mean_keys = None
            if not r.planner.use_camera and self.memory.bank_frames:
                mean_keys = [self.pool.k[0, p].float().mean(dim=(0, 1)).flatten() for p in pages]
            transitions = r.planner.commit(cams[b], mean_keys)
            leaving = {}
            while len(r.window) > self.window_frames:
                f, page = r.window.pop(0)
                leaving[f] = page
            self._apply(r, transitions, leaving)
        self._pending = None
        self._pending_cameras = None
        self.derived.clear()

    def _apply(self, r: _Row, transitions, leaving: dict[int, int]) -> None:
        # the frames a chunk pushes into the compressed tier are pooled and quantized together,
        # then those moving to level 2 coarsened together (a few batched ops, not a few per frame);
        # both read pages that "release" below gives back
        compress = [tr.frame for tr in transitions if tr.kind == "compress"]
        if compress:
            r.compressed.update(zip(compress, self._pool_pages([leaving[f] for f in compress], 1)))
        coarse = [tr.frame for tr in transitions if tr.kind == "coarsen"]
        if coarse:
            r.compressed.update(zip(coarse, coarsen_all([r.compressed[f] for f in coarse], self.memory, self.grid, self.dtype)))
        admitted = [tr.frame for tr in transitions if tr.kind == "admit"]
        if admitted and self.memory.bank_level:
            r.bank_packed.update(zip(admitted, self._pool_pages([leaving[f] for f in admitted], self.memory.bank_level)))
            if self.pool.latent is not None:
                r.bank_latent.update((f, self.pool.latent[leaving[f]].clone()) for f in admitted)
        for tr in transitions:
            f = tr.frame
            if tr.kind in ("compress", "coarsen"):
                continue
            elif tr.kind == "drop_compressed":
                del r.compressed[f]
            elif tr.kind == "admit":
                if self.memory.bank_level:
                    self.pool.decref(leaving[f])  # pooled above: the full-resolution page goes back
                else:
                    r.bank[f] = leaving[f]  # the frame's own page: no copy
            elif tr.kind == "evict":
                if self.memory.bank_level:
                    del r.bank_packed[f]
                    r.bank_latent.pop(f, None)
                else:
                    self.pool.decref(r.bank.pop(f))
            elif tr.kind == "release":
                self.pool.decref(leaving[f])

    def _pool_pages(self, pages: list[int], level: int) -> list[Packed]:
        """The keys and values of ``pages`` pooled (and quantized) to ``level``, one ``Packed``
        per page, in a few batched ops for all of them."""
        idx = torch.tensor(pages, dtype=torch.long, device=self.device)
        packed = compress_frames(self.pool.k[:, idx].transpose(0, 1), self.pool.v[:, idx].transpose(0, 1),
                                 self.memory, self.grid)
        return coarsen_all(packed, self.memory, self.grid, self.dtype) if level == 2 else packed

    def reset(self) -> None:
        for r in self._rows:
            for p in r.pages():
                self.pool.decref(p)
        self._rows = [self._new_row() for _ in self._rows]
        self._pending = None
        self.derived.clear()
        self.camera_last_B2.zero_()
        self.anchor_valid_B.zero_()
        self.camera_known_B.fill_(True)

    # ------------------------------------------------------------------------------- snapshots
    def _device_state(self) -> dict[str, torch.Tensor]:
        state = {"camera_last": self.camera_last_B2, "anchor_camera": self.anchor_camera_B2,
                 "anchor_valid": self.anchor_valid_B, "camera_known": self.camera_known_B}
        if self.anchor_BCHW is not None:
            state["anchor"] = self.anchor_BCHW
        return {k: v.clone() for k, v in state.items()}

    def snapshot(self) -> PagedSnapshot:
        """The streams by reference (page tables + references): copies no key or value."""
        rows = tuple(r.copy() for r in self._rows)
        for r in rows:
            for p in r.pages():
                self.pool.incref(p)
        return PagedSnapshot(self.pool, rows, tuple(len(r.cameras) for r in self._rows), self._device_state(),
                             self.memory, (self.sink_frames, self.window_frames, self.chunk_frames))

    def restore(self, snap: PagedSnapshot) -> None:
        if snap.pool is not self.pool:
            raise ValueError("snapshot belongs to another page pool")
        if snap.memory != self.memory or snap.layout != (self.sink_frames, self.window_frames, self.chunk_frames):
            raise ValueError(f"snapshot of another memory layout (memory {snap.memory}, sinks/window/chunk "
                             f"{snap.layout}); restore it into a cache built with the same causal config")
        for r in self._rows:
            for p in r.pages():
                self.pool.decref(p)
        self._rows = [r.copy() for r in snap.rows_]
        for r in self._rows:
            for p in r.pages():
                self.pool.incref(p)
        B = len(self._rows)
        st = snap.device_state
        self.camera_last_B2 = st["camera_last"].clone()
        self.anchor_camera_B2 = st["anchor_camera"].clone()
        self.anchor_valid_B = st["anchor_valid"].clone()
        self.camera_known_B = st["camera_known"].clone()
        self.anchor_BCHW = st["anchor"].clone() if "anchor" in st else None
        assert self.camera_last_B2.shape[0] == B
        self._pending = None
        self.derived.clear()

    def replace_recent(self, other: PagedKVCache) -> None:
        """Take the sink and window pages of ``other`` (a cache that re-wrote the same frames, e.g.
        under a new prompt) in place of this cache's own, row by row; memory tiers stay as they
        are. Used by the server's prompt-switch re-cache."""
        for mine, theirs in zip(self._rows, other._rows):
            if len(mine.sinks) != len(theirs.sinks) or len(mine.window) != len(theirs.window):
                raise ValueError("the re-written cache holds other frames than this one")
            for p in theirs.sinks + [p for _, p in theirs.window]:
                self.pool.incref(p)
            for p in mine.sinks + [p for _, p in mine.window]:
                self.pool.decref(p)
            mine.sinks = list(theirs.sinks)
            mine.window = [(f, p) for (f, _), (_, p) in zip(mine.window, theirs.window)]
        self.derived.clear()

    def replace_memory(self, pages: list[dict[int, int]]) -> None:
        """Per row, a new page for every frame its memory tiers hold (the same frames, re-written:
        e.g. under a new prompt); each tier takes what it keeps from it -- the page itself (bank at
        level 0), or tokens pooled again at the frame's level (compressed tier, pooled bank). The
        caller's reference to each new page passes to this cache. Used by the server's
        prompt-switch re-cache."""
        for r, new in zip(self._rows, pages):
            if set(new) != r.memory_frames():
                raise ValueError(f"the re-written memory holds frames {sorted(new)}, this cache's tiers "
                                 f"{sorted(r.memory_frames())}")
            levels = dict(r.planner.compressed) if r.planner is not None else {}
            for lvl in (1, 2):
                frames = [f for f in r.compressed if levels[f] == lvl]
                if frames:
                    r.compressed.update(zip(frames, self._pool_pages([new[f] for f in frames], lvl)))
            if r.bank_packed:
                frames = list(r.bank_packed)
                r.bank_packed.update(zip(frames, self._pool_pages([new[f] for f in frames], self.memory.bank_level)))
            for f, page in new.items():
                if f in r.bank:
                    self.pool.decref(r.bank[f])
                    r.bank[f] = page
                else:
                    self.pool.decref(page)  # pooled above; the page itself is not kept
        self.derived.clear()

    # ------------------------------------------------------------------------------------ sizes
    def tier_bytes(self) -> dict[str, int]:
        """Bytes held per tier over all rows (pages shared between rows counted once per row)."""
        page = self.pool.page_bytes
        out = {"sinks": 0, "window": 0, "bank": 0, "compressed": 0}
        for r in self._rows:
            out["sinks"] += page * len(r.sinks)
            out["window"] += page * len(r.window)
            out["bank"] += page * len(r.bank) + sum(p.nbytes for p in r.bank_packed.values())
            out["bank"] += sum(x.nbytes for x in r.bank_latent.values())
            out["compressed"] += sum(p.nbytes for p in r.compressed.values())
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.tier_bytes().values())
