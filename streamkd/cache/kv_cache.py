"""The streaming KV cache: sink frames plus a ring-buffer window, preallocated once.

Legend: N layers, B batch, S cache tokens (= slots x tokens per frame), H heads, D head dim.

Storage is two tensors ``k_NBSHD`` / ``v_NBSHD`` allocated at construction; nothing is copied
per chunk except the new chunk's own keys and values. Slots are whole frames:

    slots [0, sink_frames)                               the first frames of the stream, kept forever
    slots [sink_frames, sink_frames + window_frames)     a ring over the most recent other frames

Bookkeeping (which frame sits in which slot, how many frames were written) lives on the host as
Python integers, so the hot loop never synchronises with the device.

Keys are stored *before* RoPE. Positions are re-based on every read following
``streamkd.attention.layout``: visible frames are numbered contiguously ``sinks, window, chunk``.
While nothing has been evicted that is the absolute frame index; afterwards positions stop
growing at ``sink_frames + window_frames + chunk_frames - 1``, so an unbounded stream never sees a
position it was not trained on. Rotating cached keys at read time is an elementwise pass over the
cache, far cheaper than the attention that follows.

A chunk runs several passes (its denoising steps, then the clean pass) against the *same* cache
contents, so ``attention_kv`` rotates the cached keys once per cache state and keeps them, with
the cached values, in a per-layer buffer that has room for the chunk's own keys/values behind
them: later passes copy only the chunk's tokens in, not the cache. The price is one more copy of
the visible keys and values (``reuse_rotated=False`` trades it back for re-rotating every pass).
Anything derived from the contents lives in ``derived`` and is dropped whenever they change
(``commit``, ``reset``, ``restore``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def with_chunk(
    derived: dict, layer: int, history: Callable[[], tuple[torch.Tensor, torch.Tensor]], k_BLHD: torch.Tensor,
    v_BLHD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attended history (rotated keys, values: made by ``history()`` once per cache state and
    layer, kept in ``derived``) followed by the chunk's own ``k``/``v``, in one reused buffer.

    Without autograd the result is the buffer itself (valid until the next call for this layer);
    a pass that records a graph gets fresh tensors, so no later in-place write can touch what its
    backward needs."""
    L = k_BLHD.shape[1]
    buffers = derived.get(("kv", layer))
    if buffers is None or buffers[0].shape[1] != buffers[2] + L or buffers[0].dtype != k_BLHD.dtype:
        with torch.no_grad():
            kc_BSHD, vc_BSHD = history()
            S = kc_BSHD.shape[1]
            k_buf = k_BLHD.new_empty((k_BLHD.shape[0], S + L, *k_BLHD.shape[2:]))
            v_buf = v_BLHD.new_empty((v_BLHD.shape[0], S + L, *v_BLHD.shape[2:]))
            k_buf[:, :S] = kc_BSHD
            v_buf[:, :S] = vc_BSHD
        buffers = derived[("kv", layer)] = (k_buf, v_buf, S)
    k_buf, v_buf, S = buffers
    if torch.is_grad_enabled() and (k_BLHD.requires_grad or v_BLHD.requires_grad):
        return torch.cat([k_buf[:, :S], k_BLHD], 1), torch.cat([v_buf[:, :S], v_BLHD], 1)
    k_buf[:, S:] = k_BLHD
    v_buf[:, S:] = v_BLHD
    return k_buf, v_buf


@dataclass(frozen=True)
class KVCacheSnapshot:
    """A detached copy of a cache, for sessions that pause, branch or reset."""

    k: torch.Tensor
    v: torch.Tensor
    frames_written: int
    camera: torch.Tensor
    camera_last: torch.Tensor
    anchor: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def rows(self, index: list[int]) -> KVCacheSnapshot:
        """The snapshot of some streams (batch rows) only."""
        anchor = None if self.anchor is None else tuple(a[index] for a in self.anchor)
        return KVCacheSnapshot(self.k[:, index], self.v[:, index], self.frames_written, self.camera[index],
                               self.camera_last[index], anchor)

    @staticmethod
    def concat(parts: list[KVCacheSnapshot]) -> KVCacheSnapshot:
        """Streams of several snapshots taken at the same stream position, as one batch."""
        if len({p.frames_written for p in parts}) != 1 or len({p.anchor is None for p in parts}) != 1:
            raise ValueError("snapshots at different stream positions cannot be batched; rebase them first")
        anchor = None if parts[0].anchor is None else tuple(torch.cat(a) for a in zip(*(p.anchor for p in parts)))
        return KVCacheSnapshot(
            torch.cat([p.k for p in parts], 1), torch.cat([p.v for p in parts], 1), parts[0].frames_written,
            torch.cat([p.camera for p in parts]), torch.cat([p.camera_last for p in parts]), anchor,
        )


class KVCache:
    """Self-attention keys/values of every layer for one stream (or a batch of streams)."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        sink_frames: int,
        window_frames: int,
        chunk_frames: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        reuse_rotated: bool = True,
    ) -> None:
        if window_frames < chunk_frames:
            raise ValueError(
                f"window_frames ({window_frames}) must be >= chunk_frames ({chunk_frames}): a chunk "
                "written into a smaller ring would overwrite itself; raise window_frames"
            )
        if sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {sink_frames}")
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.sink_frames = sink_frames
        self.window_frames = window_frames
        self.chunk_frames = chunk_frames
        num_slots = sink_frames + window_frames
        shape = (num_layers, batch_size, num_slots * tokens_per_frame, num_heads, head_dim)
        self.k_NBSHD = torch.zeros(shape, dtype=dtype, device=device)
        self.v_NBSHD = torch.zeros(shape, dtype=dtype, device=device)
        # camera-anchored RoPE (models with ``action_shifts``): each slot's cumulative camera
        # offset in tokens, and the offset of the last written frame, from which the next chunk
        # continues. Kept on the device: they come from action tensors, and reading them back
        # would synchronise every chunk.
        self.camera_BS2 = torch.zeros(batch_size, num_slots, 2, dtype=torch.long)  # host, like camera_last_B2
        self.camera_last_B2 = torch.zeros(batch_size, 2, dtype=torch.long)  # host: camera offsets are host data
        # anchor-warp models: the stream's first frame (latent) and camera, kept like sink frame 0
        self.anchor_BCHW: torch.Tensor | None = None
        self.anchor_camera_B2 = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
        self.anchor_valid_B = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.camera_known_B = torch.ones(batch_size, dtype=torch.bool, device=device)  # no null action yet
        self.frames_written = 0
        self._pending: int | None = None
        self.reuse_rotated = reuse_rotated
        self.derived: dict = {}
        """Values computed from the current contents (RoPE tables of the cached frames, rotated
        key/value buffers); cleared whenever the contents change."""

    # ----------------------------------------------------------------------------------- host side
    @property
    def batch_size(self) -> int:
        return self.k_NBSHD.shape[1]

    @property
    def num_sinks_filled(self) -> int:
        return min(self.sink_frames, self.frames_written)

    @property
    def num_window_filled(self) -> int:
        return min(self.window_frames, max(0, self.frames_written - self.sink_frames))

    @property
    def num_filled(self) -> int:
        """Visible frames; they always occupy slots ``[0, num_filled)``."""
        return self.num_sinks_filled + self.num_window_filled

    def slot_of(self, frame: int) -> int:
        if frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % self.window_frames

    def slot_positions(self) -> list[int]:
        """RoPE position of each filled slot, in slot order (see module docstring).

        Sinks keep positions ``0..n_sink-1``; ring slot ``r`` holds window frame ``j`` and gets
        ``n_sink + (j - oldest)``, its rank in the window, oldest first.
        """
        n_sink, n_win = self.num_sinks_filled, self.num_window_filled
        oldest = self.frames_written - n_win
        first_ring = (oldest - self.sink_frames) % self.window_frames if n_win else 0
        ranks = [(ring - first_ring) % self.window_frames for ring in range(n_win)]
        return list(range(n_sink)) + [n_sink + rank for rank in ranks]

    @property
    def query_position(self) -> int:
        """RoPE position of the first frame of the next chunk."""
        return self.num_filled

    def key_rope(self, rope, gh: int, gw: int, camera_BF2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the cached keys in slot order (re-based positions, camera offsets when the
        model anchors RoPE to the camera); computed once per cache state."""
        tables = self.derived.get("rope")
        if tables is None:
            device = self.k_NBSHD.device
            c_pos = self.slot_positions()
            c_cam = self.camera_BS2[:, : self.num_filled] if camera_BF2 is not None else None
            if self.num_filled:
                tables = rope.table(c_pos, gh, gw, c_cam)
            else:
                d = rope.cos.shape[1]
                empty = torch.zeros((self.batch_size, 0, d) if c_cam is not None else (0, d), device=device)
                tables = (empty, empty)
            self.derived["rope"] = tables
        return tables

    def key_mask(self, query_tokens: int) -> None:
        """Every row of a contiguous cache attends to the same keys: no mask."""
        return None

    # --------------------------------------------------------------------------------- device side
    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of the filled keys and values of ``layer``: ``(B, S, H, D)`` each."""
        n = self.num_filled * self.tokens_per_frame
        return self.k_NBSHD[layer, :, :n], self.v_NBSHD[layer, :, :n]

    def attention_kv(
        self, layer: int, k_BLHD: torch.Tensor, v_BLHD: torch.Tensor, rotate: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a chunk attends to at ``layer``: the cached keys, rotated by ``rotate`` (once per
        cache state when ``reuse_rotated``), and values, followed by the chunk's own ``k``/``v``
        (already rotated). ``(B, S + L, H, D)`` each.

        Without autograd the result is the reused buffer itself (valid until the next call for this
        layer); a pass that records a graph gets fresh tensors, so no later in-place write can touch
        what its backward needs."""
        kc_BSHD, vc_BSHD = self.read(layer)
        if not self.reuse_rotated:
            return torch.cat([rotate(kc_BSHD), k_BLHD], 1), torch.cat([vc_BSHD, v_BLHD], 1)
        return with_chunk(self.derived, layer, lambda: (rotate(kc_BSHD), vc_BSHD), k_BLHD, v_BLHD)

    def history_kv(self, layer: int, rotate: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys (rotated by ``rotate``) and values of ``layer`` as fresh tensors that no
        later write to the cache touches (what a pass with a graph keeps for its backward)."""
        kc_BSHD, vc_BSHD = self.read(layer)
        return rotate(kc_BSHD), vc_BSHD.clone()

    def write(self, layer: int, k_BLHD: torch.Tensor, v_BLHD: torch.Tensor) -> None:
        """Store the un-rotated keys/values of the chunk that follows the written frames.

        Every layer writes the same chunk; ``commit`` then advances the frame counter once.
        """
        T = self.tokens_per_frame
        num_frames = k_BLHD.shape[1] // T
        assert k_BLHD.shape[1] == num_frames * T, "chunk is not a whole number of frames"
        assert self._pending in (None, num_frames), "layers wrote chunks of different lengths"
        self._pending = num_frames
        for i in range(num_frames):
            slot = self.slot_of(self.frames_written + i)
            self.k_NBSHD[layer, :, slot * T : (slot + 1) * T] = k_BLHD[:, i * T : (i + 1) * T]
            self.v_NBSHD[layer, :, slot * T : (slot + 1) * T] = v_BLHD[:, i * T : (i + 1) * T]

    def write_anchor(self, anchor_BCHW: torch.Tensor, camera_B2: torch.Tensor, valid_B: torch.Tensor) -> None:
        """Keep the first frame's latent for anchor-warp conditioning (written with frame 0)."""
        assert self.frames_written == 0, "the anchor is the stream's first frame"
        if self.anchor_BCHW is None or self.anchor_BCHW.shape != anchor_BCHW.shape:
            self.anchor_BCHW = torch.empty_like(anchor_BCHW)  # allocated once per stream shape
        self.anchor_BCHW.copy_(anchor_BCHW)
        self.anchor_camera_B2.copy_(camera_B2)
        self.anchor_valid_B.copy_(valid_B)

    def write_camera(self, camera_BF2: torch.Tensor) -> None:
        """Store the camera offsets of the chunk being written (before ``commit``)."""
        assert self._pending == camera_BF2.shape[1], "write the chunk's keys before its camera offsets"
        for i in range(camera_BF2.shape[1]):
            self.camera_BS2[:, self.slot_of(self.frames_written + i)] = camera_BF2[:, i]
        self.camera_last_B2.copy_(camera_BF2[:, -1])

    def commit(self) -> None:
        """Advance past the chunk every layer has just written."""
        assert self._pending is not None, "commit without write"
        self.frames_written += self._pending
        self._pending = None
        self.derived.clear()

    def reset(self) -> None:
        """Forget the stream; storage is kept (and stale values are never read)."""
        self.frames_written = 0
        self._pending = None
        self.derived.clear()
        self.camera_last_B2.zero_()
        self.anchor_valid_B.zero_()
        self.camera_known_B.fill_(True)

    def snapshot(self) -> KVCacheSnapshot:
        n = self.num_filled * self.tokens_per_frame
        return KVCacheSnapshot(
            self.k_NBSHD[:, :, :n].clone(), self.v_NBSHD[:, :, :n].clone(), self.frames_written,
            self.camera_BS2[:, : self.num_filled].clone(), self.camera_last_B2.clone(),
            None if self.anchor_BCHW is None else
            (self.anchor_BCHW.clone(), self.anchor_camera_B2.clone(), self.anchor_valid_B.clone(), self.camera_known_B.clone()),
        )

    def restore(self, snap: KVCacheSnapshot) -> None:
        n = snap.k.shape[2]
        if snap.k.shape[:2] != self.k_NBSHD.shape[:2] or snap.k.shape[3:] != self.k_NBSHD.shape[3:]:
            raise ValueError("snapshot was taken from a cache of a different shape")
        self.k_NBSHD[:, :, :n] = snap.k
        self.v_NBSHD[:, :, :n] = snap.v
        self.frames_written = snap.frames_written
        self.camera_BS2[:, : snap.camera.shape[1]] = snap.camera
        self.camera_last_B2.copy_(snap.camera_last)
        if snap.anchor is not None:
            if self.anchor_BCHW is None:
                self.anchor_BCHW = torch.empty_like(snap.anchor[0])
            self.anchor_BCHW.copy_(snap.anchor[0])
            self.anchor_camera_B2.copy_(snap.anchor[1])
            self.anchor_valid_B.copy_(snap.anchor[2])
            self.camera_known_B.copy_(snap.anchor[3])
        self._pending = None
        self.derived.clear()

    @property
    def nbytes(self) -> int:
        return self.k_NBSHD.nbytes + self.v_NBSHD.nbytes
