"""Which frames a chunk of queries sees, and where RoPE places them.

The causal student generates chunks of ``F`` latent frames. A query chunk starting at frame ``q0``
sees (``S`` = sink frames, ``W`` = window frames, ``W=None`` means unbounded):

    sinks   frames [0, min(S, q0))                       -- never evicted
    window  frames [max(S, q0 - W), q0)                  -- the most recent W non-sink frames
    itself  frames [q0, q0 + F)                          -- attends to its whole chunk

Positions (the temporal RoPE index) are *re-based*: the visible frames are laid out as one
contiguous sequence ``sinks, window, chunk`` numbered from 0. While nothing has been evicted this
is exactly the absolute frame index, so a model trained on the teacher's horizon sees the same
positions it was trained on; once the window slides, the largest position stays at
``S + W + F - 1`` forever, so an unbounded stream never leaves the trained range. Only the gap
between sinks and window collapses (sinks sit right before the oldest window frame, as in
StreamingLLM); distances inside the window and to the chunk stay exact.

The KV cache (``streamkd.cache``) implements the same rule with a ring buffer; the functions here
are the plain reference used by the full-sequence block-causal forward and by tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from streamkd.cache.memory import MemoryConfig


@dataclass(frozen=True)
class CausalLayout:
    """Block-causal attention over chunks of frames, with optional sinks and sliding window."""

    chunk_frames: int
    sink_frames: int = 0
    window_frames: int | None = None
    memory: MemoryConfig | None = field(default=None, compare=False, hash=False)
    """Memory beyond the window (``streamkd.cache.memory``): the full-sequence forward replays
    what a streaming paged cache with it would read."""

    def __post_init__(self) -> None:
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.window_frames is not None and self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1 or None (unbounded), got {self.window_frames}")

    def visible(self, q0: int) -> tuple[list[int], list[int], int]:
        """For the chunk starting at frame ``q0``: (visible past frames, their positions, the
        position of the chunk's first frame)."""
        sinks = list(range(min(self.sink_frames, q0)))
        w0 = self.sink_frames if self.window_frames is None else max(self.sink_frames, q0 - self.window_frames)
        window = list(range(w0, q0))
        frames = sinks + window
        return frames, list(range(len(frames))), len(frames)

    def evicts_within(self, num_frames: int) -> bool:
        """True when some chunk of a ``num_frames`` sequence has a gap between sinks and window."""
        if self.window_frames is None:
            return False
        last_q0 = ((num_frames - 1) // self.chunk_frames) * self.chunk_frames
        return last_q0 - self.window_frames > self.sink_frames


def block_causal_mask(
    num_frames: int, tokens_per_frame: int, layout: CausalLayout, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean ``(L, L)`` mask, True = attend, for a sequence with no eviction gap.

    With a gap the positions differ per query chunk, so the caller must go chunk by chunk
    (``layout.evicts_within`` tells); this mask alone would be wrong there.
    """
    assert not layout.evicts_within(num_frames), "positions differ per chunk: attend chunk by chunk"
    # Without a gap every chunk sees all earlier frames, so the window never bites here.
    chunk_F = torch.arange(num_frames, device=device) // layout.chunk_frames
    mask_FF = chunk_F[None, :] <= chunk_F[:, None]
    return mask_FF.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
