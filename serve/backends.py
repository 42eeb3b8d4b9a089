"""What the server's worker drives: a causal model through ``StreamGenerator`` (``ModelBackend``),
or the toy world's exact renderer (``WorldOracleBackend``, no model: for client development and
end-to-end tests of the action path, where a random-weight model cannot show a move).

Legend: B sessions in a batch, R cache rows (B, or 2B with CFG), C latent channels, F frames per
chunk, h/w latent size, N layers, S cache tokens, T tokens per frame.

Batching sessions into one forward
----------------------------------
Every session owns a single-stream ``StreamGenerator`` (its cache, prompt context, first frame,
noise generator, decoder). To batch, the worker groups sessions whose caches hold the same
*visible layout* -- same number of visible frames with the same re-based RoPE positions --
copies their cache rows into a B-stream generator, runs ``next_chunk`` once, and copies the rows
back. Noise is drawn per row from each session's own generator, so a session gives the same
frames alone or batched (to fp32 summation order; ``tests/test_serve_batching.py``).

Sessions that joined at different times sit at different ring phases, which would split them
into incompatible groups. ``rebase`` removes that: attention is a sum over keys, and keys are
cached before RoPE and rotated by their slot's re-based position at read time, so permuting the
ring slots into age order (oldest first) and setting ``frames_written = sinks + window`` changes
nothing but summation order. After every chunk the caches are rebased, so all sessions past the
warm-up share one layout and batch together. Gather and scatter copy each session's cache twice
per chunk (a few MB for the toy student), small next to five model passes.

A checkpoint with memory (``causal.memory``) streams on the paged store instead: every session's
pages live in one ``PagePool`` of the backend, a session's cache is a set of page tables, and a
batch is made of its sessions' tables -- gather and scatter copy no key or value (references
only), rows at different points of their streams batch as long as their sink + window counts
agree (different retrieved sets and tier sizes are padded with a key mask), and ``rebase`` has
nothing to do (pages carry no ring order).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from streamkd.cache.kv_cache import KVCache, KVCacheSnapshot
from streamkd.cache.memory import MemoryConfig
from streamkd.cache.paged import PagedKVCache, PagedSnapshot, PagePool
from streamkd.data.toyworld import ACTION_DELTAS, ACTIONS, ToyWorld, parse_prompt
from streamkd.generate import first_frame_for
from streamkd.models.world import WorldModel
from streamkd.sampling.stream import StreamGenerator


@dataclass
class StreamSpec:
    """What a session asked for (validated by the server)."""

    prompt: str
    seed: int
    first_frame: np.ndarray | str | None
    """uint8 HWC; "world": the toy world's frame 0 for (seed, prompt), resolved by the engine; None: text-to-video."""


# --------------------------------------------------------------------------------- cache layout
def _token_index(slots: list[int], tokens_per_frame: int) -> torch.Tensor:
    return (torch.tensor(slots)[:, None] * tokens_per_frame + torch.arange(tokens_per_frame)).flatten()


def rebase(cache: KVCache) -> None:
    """Put a full cache's ring in age order and set ``frames_written = sinks + window``.

    Nothing a later read sees changes (every key keeps its re-based position and camera
    offset); only slot order does -- see the module docstring. A cache that has not wrapped is
    already in age order and is left alone.
    """
    if isinstance(cache, PagedKVCache):
        return  # page tables are kept oldest first
    full = cache.sink_frames + cache.window_frames
    if cache.frames_written <= full:
        return
    s, w = cache.sink_frames, cache.window_frames
    first_ring = (cache.frames_written - full) % w  # ring slot of the oldest window frame
    slots = list(range(s)) + [s + (first_ring + i) % w for i in range(w)]
    idx = _token_index(slots, cache.tokens_per_frame)
    cache.restore(KVCacheSnapshot(cache.k_NBSHD[:, :, idx], cache.v_NBSHD[:, :, idx], full,
                                  cache.camera_BS2[:, slots], cache.camera_last_B2.clone()))


def layout_key(cache: KVCache) -> int:
    """Caches with equal keys (after ``rebase``) have the same visible layout and can be batched."""
    return min(cache.frames_written, cache.sink_frames + cache.window_frames)


# ----------------------------------------------------------------------------- model sessions
@dataclass
class _Visible:
    """Clean latents and actions of the frames the cache holds, for the KV re-cache."""

    sink_frames: int
    window_frames: int
    sinks: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (frame index, latent_C1hw, action)
    window: deque = field(default_factory=deque)
    # frames past the window that a memory tier (bank, compressed) still holds: frame -> (latent_C1hw,
    # action). A latent frame is a few hundred times smaller than its keys and values.
    memory: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)

    def push(self, first_index: int, latents_CFhw: torch.Tensor, actions: list[int]) -> None:
        for i, a in enumerate(actions):
            item = (first_index + i, latents_CFhw[:, i : i + 1].clone(), a)
            if len(self.sinks) < self.sink_frames:
                self.sinks.append(item)
            else:
                self.window.append(item)
                if len(self.window) > self.window_frames:
                    f, latent, action = self.window.popleft()
                    self.memory[f] = (latent, action)

    def keep_memory(self, frames: set[int]) -> None:
        """Forget the latents of frames no memory tier holds any more."""
        for f in [f for f in self.memory if f not in frames]:
            del self.memory[f]

    def frames(self) -> list[tuple[int, torch.Tensor, int]]:
        """Oldest first: the cache's slot order after ``rebase``."""
        return self.sinks + list(self.window)


@dataclass
class ModelStream:
    """One session's generator state."""

    gen: StreamGenerator
    visible: _Visible
    frames_done: int = 0


class ModelBackend:
    """A causal ``WorldModel`` stepped for groups of sessions, batched into one forward."""

    def __init__(self, model: WorldModel, max_batch: int = 8) -> None:
        if not model.is_causal:
            raise ValueError(
                "this checkpoint is bidirectional (config.json has no 'causal' section); the server streams "
                "causal students only -- distil one (streamkd distill) or pass a causal checkpoint such as toy-student"
            )
        self.model = model
        self.causal = model.cfg.causal
        self.sampling = model.cfg.sampling
        self.max_batch = max_batch
        self.frame_hw = model.frame_hw
        # frames a steady chunk decodes to (a codec 4x in time: 4 F; its first chunk 1 + 4 (F - 1))
        self.chunk_frames = self.causal.chunk_frames * model.codec.temporal_factor
        self.actions = self._action_names(model)
        self.image_to_video = model.dit.cfg.image_dim is not None
        """Every session starts from an image (Wan2.1 I2V: its condition channels and CLIP tokens)."""
        self._scratch: StreamGenerator | None = None  # see _scratch_for
        self.pool: PagePool | None = None
        if self.causal.memory is not None:
            # one pool for every session's pages: the one a max_batch cache sizes for itself (a new
            # cache holds no page yet; the pool grows by doubling if sessions need more)
            self.pool = self._generator(max_batch).cache.pool
        self.recached_memory_frames = 0
        """Memory-tier frames (bank and compressed) re-written by prompt switches so far."""
        self.copied_bytes = 0
        """Bytes of cached keys/values copied by batching (gather + scatter) so far: the contiguous
        cache copies every session's cache twice per batched chunk, the paged store none."""

    def _generator(self, batch_size: int) -> StreamGenerator:
        return StreamGenerator(self.model, self.sampling.make(), causal=self.causal,
                               guidance_scale=self.sampling.guidance_scale, batch_size=batch_size, pool=self.pool)

    @staticmethod
    def _action_names(model) -> list[str]:
        """The protocol's action names (the model's, index = id); none for a model without actions."""
        return list(model.action_names) if model.num_actions else []

    def check_prompt(self, prompt: str) -> str:
        return self.model.check_prompt(prompt)

    def world_first_frame(self, seed: int, prompt: str) -> np.ndarray | None:
        return first_frame_for(self.model, seed, prompt)

    def start(self, spec: StreamSpec) -> ModelStream:
        gen = self._generator(1)
        first = None if spec.first_frame is None else torch.from_numpy(spec.first_frame)[None]
        gen.reset([spec.prompt], first, torch.Generator().manual_seed(spec.seed))
        return ModelStream(gen, _Visible(self.causal.sink_frames, self.causal.window_frames))

    def group_key(self, stream: ModelStream) -> tuple[int, bool]:
        gen = stream.gen
        return layout_key(gen.cache), gen.chunk_index == 0 and gen.first_latent is not None

    @torch.no_grad()
    def step(self, streams: list[ModelStream], actions: list[int]) -> list[np.ndarray | Exception]:
        """One chunk for every stream (all with the same ``group_key``): uint8 ``(F, H, W, 3)`` each,
        or the exception that ended that stream alone. ``actions[b]`` is held for the whole chunk of
        stream b. Raises when the shared forward fails: with several streams none of them has
        changed then (the batch runs on a scratch copy, written back only after the forward), so
        the engine can retry them one by one; a single stream that raises is ended."""
        F = self.causal.chunk_frames  # latent frames (the chunk decodes to chunk_frames frames)
        actions_BF = torch.tensor(actions, dtype=torch.long)[:, None].expand(-1, F).contiguous()
        if len(streams) == 1:
            gen = streams[0].gen
            latents = gen.next_chunk(actions_BF)
            rebase(gen.cache)
        else:
            big = self._scratch_for(len(streams))
            self._gather(big, [s.gen for s in streams])
            latents = big.next_chunk(actions_BF)
            rebase(big.cache)
            self._scatter(big, [s.gen for s in streams])
        out: list[np.ndarray | Exception] = []
        for b, stream in enumerate(streams):
            try:
                stream.visible.push(stream.frames_done, latents[b], [actions[b]] * F)
                stream.visible.keep_memory(_memory_frames(stream.gen.cache))
                stream.frames_done += F
                # decoded per session: a temporal codec (the Wan VAE) keeps per-stream state
                out.append(stream.gen.decode(latents[b : b + 1])[0].cpu().numpy())
            except Exception as e:
                out.append(e)
        return out

    def _scratch_for(self, batch_size: int) -> StreamGenerator:
        """The one batched generator, remade when the batch size changes: the server holds at most
        one scratch cache, of at most ``max_batch`` streams, whatever the session churn."""
        if self._scratch is None or self._scratch.batch_size != batch_size:
            self._scratch = None  # free the old cache before allocating the new one
            self._scratch = self._generator(batch_size)
        return self._scratch

    @staticmethod
    def _rows(batch: int, b: int, halves: int) -> list[int]:
        """Rows of stream b in a cache of ``batch`` streams: conditional half first, then unconditional."""
        return [h * batch + b for h in range(halves)]

    def _gather(self, big: StreamGenerator, gens: list[StreamGenerator]) -> None:
        """Load the sessions' state into the batched generator (rows: all cond, then all uncond)."""
        B, halves = len(gens), big.rows // big.batch_size
        order = [(h, b) for h in range(halves) for b in range(B)]
        snaps = [g.cache.snapshot() for g in gens]
        if isinstance(big.cache, PagedKVCache):  # page tables by reference: no key or value copied
            parts = [snaps[b].rows([h]) for h, b in order]
            joined = PagedSnapshot.concat(parts)
            big.cache.restore(joined)
            for snap in (*snaps, *parts, joined):
                snap.release()
        else:
            big.cache.restore(KVCacheSnapshot.concat([snaps[b].rows([h]) for h, b in order]))
            self.copied_bytes += 2 * sum(s.k.nbytes + s.v.nbytes for s in snaps)
        big.context = torch.cat([gens[b].context[h : h + 1] for h, b in order])
        fixed = gens[0].chunk_index == 0 and gens[0].first_latent is not None
        big.first_latent = torch.cat([g.first_latent for g in gens]) if fixed else None
        big.chunk_index = gens[0].chunk_index
        big.generator = [g.generator for g in gens]

    def _scatter(self, big: StreamGenerator, gens: list[StreamGenerator]) -> None:
        snap = big.cache.snapshot()
        halves = big.rows // big.batch_size
        for b, g in enumerate(gens):
            rows = self._rows(len(gens), b, halves)
            part = snap.rows(rows)
            g.cache.restore(part)
            if isinstance(part, PagedSnapshot):
                part.release()
            g.chunk_index += 1
        if isinstance(snap, PagedSnapshot):
            snap.release()
            big.cache.reset()  # the scratch keeps no reference: an ended session's pages go back at once

    def memory_stats(self, stream: ModelStream) -> dict | None:
        """Memory tiers of a session (bytes, pages) and retrieval counts, for the server's stats."""
        cache = stream.gen.cache
        if not isinstance(cache, PagedKVCache):
            return None
        row = cache._rows[0]
        return {"tier_bytes": cache.tier_bytes(), "bank_frames": len(row.bank) + len(row.bank_packed),
                "compressed_frames": len(row.compressed),
                "retrieved_last_chunk": row.retrieved_last, "retrieved_total": row.retrieved_total,
                "pool_pages_in_use": cache.pool.in_use, "pool_pages": cache.pool.capacity,
                "batch_copied_bytes": self.copied_bytes, "recached_memory_frames": self.recached_memory_frames}

    @torch.no_grad()
    def switch_prompt(self, stream: ModelStream, prompt: str) -> None:
        """New prompt for the next chunks, with the KV re-cache (LongLive-style): the cached keys/values
        of every visible frame are recomputed under the new prompt from the frames' clean latents,
        so the next chunk attends to history that agrees with its prompt instead of jumping.

        Frames are replayed oldest first in their original chunks, at their original re-based
        positions and camera offsets; what the replay cannot restore is the context of frames
        already evicted (as in LongLive). With nothing evicted yet and an unchanged prompt, the
        re-cache reproduces the cache (``tests/test_serve_batching.py``).

        Memory tiers are re-cached too (``_recache_memory``): every frame the bank or the
        compressed tier holds is re-written under the new prompt, so retrieved memory does not
        bring the old prompt back.
        """
        gen = stream.gen
        gen.set_prompts([prompt])
        frames = stream.visible.frames()
        cache = gen.cache
        assert len(frames) == cache.num_filled, "visible-frame history out of step with the cache"
        if not frames:
            return
        if isinstance(cache, PagedKVCache):
            # re-write sinks + window into a scratch paged cache without memory (same pool), then
            # take its pages; the memory tiers are re-written after them
            target = cache
            cache = self._scratch_cache(gen, target)
            self._write_frames(cache, frames, self._cameras(target, [f for f, _, _ in frames]), gen)
            target.replace_recent(cache)
            target.camera_known_B.copy_(cache.camera_known_B)
            cache.reset()
            self._recache_memory(stream, target)
        else:
            camera = cache.camera_BS2[:, : cache.num_filled].clone()
            cache.reset()
            self._write_frames(cache, frames, camera, gen)

    @staticmethod
    def _cameras(cache: PagedKVCache, kept: list[int]) -> torch.Tensor:
        """``(rows, len(kept), 2)`` camera offsets of frames ``kept`` in every row of ``cache``."""
        camera = torch.tensor([[list(c) for c in r.cameras] for r in cache._rows], dtype=torch.long)
        return camera[:, kept] if camera.numel() else camera

    def _scratch_cache(self, gen: StreamGenerator, target: PagedKVCache) -> PagedKVCache:
        """An empty paged cache without memory on the backend's pool, with ``target``'s anchor."""
        h, w = self.model.latent_hw
        cache = self.model.dit.new_cache(batch_size=gen.rows, height=h, width=w, sink_frames=self.causal.sink_frames,
                                         window_frames=self.causal.window_frames, chunk_frames=self.causal.chunk_frames,
                                         memory=MemoryConfig(), pool=self.pool)
        if target.anchor_BCHW is not None:
            cache.anchor_BCHW = target.anchor_BCHW.clone()
        cache.anchor_camera_B2.copy_(target.anchor_camera_B2)
        cache.anchor_valid_B.copy_(target.anchor_valid_B)
        cache.camera_known_B.copy_(target.camera_known_B)
        cache.keeps_latents = target.keeps_latents  # its pages replace target's: rendered memory reads them
        return cache

    def _write_frames(self, cache: KVCache, frames: list[tuple[int, torch.Tensor, int]], camera: torch.Tensor,
                      gen: StreamGenerator) -> None:
        """Write ``frames`` (clean latents) into ``cache`` under ``gen``'s prompt context, grouped by
        their original chunks, each at camera offset ``camera[:, i]``."""
        dit, F = self.model.dit, self.causal.chunk_frames
        halves = gen.rows // gen.batch_size
        start = 0
        while start < len(frames):
            end = start + 1
            while end < len(frames) and frames[end][0] // F == frames[start][0] // F and frames[end][0] == frames[end - 1][0] + 1:
                end += 1
            group = frames[start:end]
            x = torch.cat([lat for _, lat, _ in group], 1)[None].repeat(halves, 1, 1, 1, 1)
            a = torch.tensor([[act for _, _, act in group]])
            if halves > 1:
                a = torch.cat([a, torch.full_like(a, dit.null_action)])
            if dit.action_shifts is not None:
                # continue from the camera that makes cumsum(shift) land on the stored offsets
                cache.camera_last_B2.copy_(camera[:, start] - dit.action_shifts[a[:, 0]])
            dit(x, torch.zeros(halves, len(group)), gen.context, a if dit.action_embed is not None else None,
                cache=cache, write_cache=True, output=False)
            start = end

    def _recache_memory(self, stream: ModelStream, target: PagedKVCache) -> None:
        """Re-write every frame a memory tier of ``target`` holds under the new prompt.

        The rule for a memory frame's context: it is re-written as a one-frame chunk right after the
        (re-written) sinks, with its own camera offset -- the position retrieved entries are read at
        (just behind the sinks' block) and the one context every frame of the stream shares. The
        context the frame was first written with (the window of its time) is gone, as it is for
        the window's own evicted history. The cache's tiers take what they keep from the new pages
        (``PagedKVCache.replace_memory``: the page, or its tokens pooled again at the frame's level)."""
        held = _memory_frames(target)
        if not held:
            return
        gen = stream.gen
        missing = held - stream.visible.memory.keys()
        assert not missing, f"latents of memory frames {sorted(missing)} were not kept"
        scratch = self._scratch_cache(gen, target)
        sinks = stream.visible.sinks
        self._write_frames(scratch, sinks, self._cameras(target, [f for f, _, _ in sinks]), gen)
        base = scratch.snapshot()
        pages = [{} for _ in target._rows]
        for f in sorted(held):
            latent, action = stream.visible.memory[f]
            self._write_frames(scratch, [(f, latent, action)], self._cameras(target, [f]), gen)
            for b, (mine, theirs) in enumerate(zip(target._rows, scratch._rows)):
                if f in mine.memory_frames():
                    page = theirs.window[-1][1] if theirs.window else theirs.sinks[-1]
                    self.pool.incref(page)  # handed to target by replace_memory
                    pages[b][f] = page
            scratch.restore(base)
        base.release()
        scratch.reset()
        target.replace_memory(pages)
        self.recached_memory_frames += len(held)


def _memory_frames(cache: KVCache) -> set[int]:
    """Frames any row's bank or compressed tier holds (none for caches without memory)."""
    if not isinstance(cache, PagedKVCache):
        return set()
    return {f for r in cache._rows for f in r.memory_frames()}


@dataclass
class OracleStream:
    world: ToyWorld
    camera: np.ndarray  # (y, x) top-left of the last frame sent
    started: bool = False


class WorldOracleBackend:
    """Ground truth instead of a model: the toy world's static map under the camera, moved by the
    actions exactly as the world model should. Prompts restyle the same map."""

    def __init__(self, world_cfg, chunk_frames: int = 3) -> None:
        self.world_cfg = world_cfg
        self.frame_hw = (world_cfg.frame_size, world_cfg.frame_size)
        self.chunk_frames = chunk_frames
        self.max_batch = 1
        self.actions = list(ACTIONS)
        self.image_to_video = False

    def check_prompt(self, prompt: str) -> str:
        return parse_prompt(prompt).prompt

    def world_first_frame(self, seed: int, prompt: str) -> np.ndarray:
        return ToyWorld(self.world_cfg, seed, prompt).render_static([0], 1)[0]

    def start(self, spec: StreamSpec) -> OracleStream:
        world = ToyWorld(self.world_cfg, spec.seed, spec.prompt)
        return OracleStream(world, np.asarray(world.default_start, dtype=np.int64))

    def group_key(self, stream: OracleStream) -> int:
        return 0

    def step(self, streams: list[OracleStream], actions: list[int]) -> list[np.ndarray]:
        out = []
        F = self.chunk_frames
        for stream, action in zip(streams, actions):
            # ids[0] is the view at ``camera`` (not a move): frame 0 of the first chunk, skipped after
            moves = F - 1 if not stream.started else F
            ids = [0] + [action] * moves
            out.append(stream.world.render_static(ids, len(ids), tuple(stream.camera))[len(ids) - F :])
            stream.camera = (stream.camera + ACTION_DELTAS[action] * self.world_cfg.speed_px * moves) % self.world_cfg.map_size
            stream.started = True
        return out

    def switch_prompt(self, stream: OracleStream, prompt: str) -> None:
        stream.world = ToyWorld(self.world_cfg, stream.world.seed, prompt)
