"""KV cache object: ring-buffer wrap, sink retention, bounded positions, snapshot/restore, size."""

from __future__ import annotations

import pytest
import torch

from streamkd.attention.layout import CausalLayout
from streamkd.cache.kv_cache import KVCache

T, H, D = 2, 1, 4  # tokens per frame, heads, head dim


def _cache(sinks: int, window: int, chunk: int) -> KVCache:
    return KVCache(num_layers=2, batch_size=1, tokens_per_frame=T, num_heads=H, head_dim=D,
                   sink_frames=sinks, window_frames=window, chunk_frames=chunk)


def _write_chunk(cache: KVCache, first_frame: int, num_frames: int) -> None:
    """Write frames whose every key value is the frame index, so slots can be read back."""
    k = torch.arange(first_frame, first_frame + num_frames).float().repeat_interleave(T)
    k_BLHD = k[None, :, None, None].expand(1, num_frames * T, H, D)
    for layer in range(cache.num_layers):
        cache.write(layer, k_BLHD, -k_BLHD)
    cache.commit()


def _frames_in_cache(cache: KVCache, layer: int = 0) -> list[int]:
    k, v = cache.read(layer)
    assert torch.equal(v, -k)
    return [int(x) for x in k[0, ::T, 0, 0].tolist()]


@pytest.mark.parametrize("sinks, window, chunk", [(3, 6, 3), (1, 4, 2), (0, 5, 2), (2, 3, 1)])
def test_ring_wraps_keeps_sinks_and_matches_layout(sinks: int, window: int, chunk: int) -> None:
    cache = _cache(sinks, window, chunk)
    layout = CausalLayout(chunk, sinks, window)
    storage = cache.k_NBSHD.data_ptr()
    for q0 in range(0, 40, chunk):
        # before writing chunk q0: the cache holds exactly the frames the layout says are visible,
        # at the positions the layout gives them
        visible, positions, q_pos = layout.visible(q0)
        in_cache = _frames_in_cache(cache) if cache.num_filled else []
        by_frame = dict(zip(in_cache, cache.slot_positions()))
        assert sorted(in_cache) == visible
        assert [by_frame[f] for f in visible] == positions
        assert cache.query_position == q_pos
        _write_chunk(cache, q0, chunk)
    assert cache.k_NBSHD.data_ptr() == storage  # preallocated, never reallocated
    assert _frames_in_cache(cache)[:sinks] == list(range(sinks))  # sinks survive every wrap
    assert max(cache.slot_positions()) == sinks + window - 1  # bounded positions


def test_snapshot_restore_and_reset() -> None:
    cache = _cache(1, 4, 2)
    for q0 in range(0, 8, 2):
        _write_chunk(cache, q0, 2)
    snap = cache.snapshot()
    before = _frames_in_cache(cache)
    for q0 in range(8, 14, 2):
        _write_chunk(cache, q0, 2)
    assert _frames_in_cache(cache) != before
    cache.restore(snap)
    assert _frames_in_cache(cache) == before and cache.frames_written == 8
    cache.reset()
    assert cache.num_filled == 0 and cache.read(0)[0].shape[1] == 0


def test_nbytes_counts_keys_and_values() -> None:
    cache = _cache(3, 6, 3)
    assert cache.nbytes == 2 * 2 * 1 * (3 + 6) * T * H * D * 4


def test_window_smaller_than_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="window_frames .* must be >= chunk_frames"):
        _cache(0, 2, 3)


def test_attention_kv_reuses_rotated_cache_and_keeps_graphs_safe() -> None:
    """Every pass of a chunk sees what re-rotating the cache and concatenating gives; a pass with
    a graph gets fresh tensors, so a later no-grad pass writing the reused buffer in place cannot
    break its backward; changing the contents drops the reused buffers."""
    reuse, plain = _cache(2, 4, 2), KVCache(num_layers=2, batch_size=1, tokens_per_frame=T, num_heads=H, head_dim=D,
                                            sink_frames=2, window_frames=4, chunk_frames=2, reuse_rotated=False)
    for cache in (reuse, plain):
        for q0 in range(0, 8, 2):
            _write_chunk(cache, q0, 2)
    calls = []

    def rotate(k):  # stands in for RoPE: any deterministic function of the cached keys
        calls.append(1)
        return k * 2.0 + 1.0

    for _ in range(3):  # three no-grad passes of one chunk
        k_new, v_new = torch.randn(1, 2 * T, H, D), torch.randn(1, 2 * T, H, D)
        got, want = reuse.attention_kv(0, k_new, v_new, rotate), plain.attention_kv(0, k_new, v_new, rotate)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(calls) == 1 + 3  # rotated once for the reusing cache, every pass for the other
    k_grad = torch.randn(1, 2 * T, H, D, requires_grad=True)
    k_all, _ = reuse.attention_kv(0, k_grad, torch.randn(1, 2 * T, H, D), rotate)
    reuse.attention_kv(0, torch.zeros(1, 2 * T, H, D), torch.zeros(1, 2 * T, H, D), rotate)  # a later no-grad pass
    (k_all ** 2).sum().backward()  # would raise if the buffer behind k_all had been written in place
    assert torch.equal(k_grad.grad, 2 * k_grad.detach())
    _write_chunk(reuse, 8, 2)
    assert not reuse.derived
    reuse.attention_kv(0, k_new, v_new, rotate)
    assert len(calls) == 4 + 1  # the graph pass reused the rotation; the commit forced a fresh one
