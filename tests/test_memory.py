"""World memory: the paged KV store, the compressed tier and the memory bank.

The central property: streaming through the paged cache with memory equals the full-sequence
forward that replays the same memory (``CausalLayout(memory=...)``), for every chunk -- memory is
a deterministic function of the history. Around it: the paged store without memory agrees with
the contiguous cache; snapshots are page-table copies; the planner keeps what covers new ground,
drops what is covered, retrieves what covers the next view; compression costs what its docstring
says; bad configurations are refused with the field and the fix.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from streamkd.attention.layout import CausalLayout
from streamkd.cache.memory import (
    Coverage, MemoryConfig, MemoryPlanner, coarsen, compress_frame, memory_bytes_per_frame, pool_tokens,
)
from streamkd.cache.paged import PagedKVCache
from streamkd.config import ConfigError, from_dict
from streamkd.models.dit import DiT, DiTConfig
from streamkd.bundle import CausalConfig
from streamkd.models.world import WorldModel
from streamkd.sampling.stream import StreamGenerator

TOY_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
COMPRESSED = MemoryConfig(compressed_frames=4, fine_frames=2)
BANK = MemoryConfig(bank_frames=3, retrieve_frames=2, admit_coverage=0.1, wrap_tokens=8)
BOTH = MemoryConfig(compressed_frames=4, fine_frames=2, bank_frames=3, retrieve_frames=2, admit_coverage=0.1, wrap_tokens=8)
RENDERED = replace(BANK, render=True)
POOLED = replace(RENDERED, bank_level=1)  # bank entries pooled 2x2 + int8, drawn from full-resolution latents


def _dit(shifts, anchor_warp: bool = False) -> DiT:
    cfg = DiTConfig(in_channels=4, out_channels=4, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=8,
                    num_actions=5, action_shifts=shifts, anchor_warp=anchor_warp)
    dit = DiT(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return dit


def _walk(frames: int, B: int, gen: torch.Generator) -> torch.Tensor:
    """Actions that leave and come back: a few steps one way, the same steps back, repeated."""
    out = []
    for _ in range(B):
        a = []
        while len(a) < frames:
            move = int(torch.randint(1, 5, (1,), generator=gen))
            back = {1: 2, 2: 1, 3: 4, 4: 3}[move]
            n = int(torch.randint(2, 5, (1,), generator=gen))
            a += [move] * n + [back] * n
        out.append(a[:frames])
    return torch.tensor(out)


@pytest.mark.parametrize(
    "shifts, memory",
    [(None, COMPRESSED), (None, replace(COMPRESSED, quantize="none")), (TOY_SHIFTS, COMPRESSED),
     (TOY_SHIFTS, BANK), (TOY_SHIFTS, BOTH), (TOY_SHIFTS, RENDERED), (TOY_SHIFTS, POOLED),
     (TOY_SHIFTS, replace(BOTH, bank_level=2))],
    ids=["plain-compressed-int8", "plain-compressed-float", "camera-compressed", "camera-bank", "camera-both",
         "camera-bank-rendered", "camera-bank-pooled-rendered", "camera-both-bank-level2"],
)
def test_streaming_with_memory_equals_full_sequence_replay(shifts, memory: MemoryConfig) -> None:
    dit = _dit(shifts, anchor_warp=memory.render)
    gen = torch.Generator().manual_seed(1)
    B, H, W, frames, chunk, sinks, window = 2, 8, 8, 24, 2, 1, 3
    x = torch.randn(B, 4, frames, H, W, generator=gen)
    t = torch.rand(B, frames, generator=gen) * 1000
    ctx = torch.randn(B, 3, 8, generator=gen)
    actions = _walk(frames, B, gen)
    with torch.no_grad():
        reference = dit(x, t, ctx, actions, layout=CausalLayout(chunk, sinks, window, memory=memory))
        without = dit(x, t, ctx, actions, layout=CausalLayout(chunk, sinks, window))
        cache = dit.new_cache(batch_size=B, height=H, width=W, sink_frames=sinks, window_frames=window,
                              chunk_frames=chunk, memory=memory)
        for q0 in range(0, frames, chunk):
            part = slice(q0, q0 + chunk)
            out = dit(x[:, :, part], t[:, part], ctx, actions[:, part], cache=cache, write_cache=True)
            torch.testing.assert_close(out, reference[:, :, part], atol=2e-5, rtol=0)
    # the memory was read: it changes the output, and the tiers hold what they should
    assert (reference - without).abs().max() > 1e-2
    tiers = cache.tier_bytes()
    assert (tiers["compressed"] > 0) == bool(memory.compressed_frames)
    assert (tiers["bank"] > 0) == bool(memory.bank_frames)
    if memory.bank_frames:
        assert cache.stats["retrieved"] > 0
    if memory.bank_level:  # entries hold pooled tokens (and the latent when rendering), no page
        costs = memory_bytes_per_frame(num_layers=2, tokens_per_frame=16, channels=24, cfg=memory, page_bytes_per_value=4)
        latent = 4 * H * W * 4 if memory.render else 0
        entries = [len(r.bank_packed) for r in cache._rows]
        assert not any(r.bank for r in cache._rows) and min(entries) >= 2
        assert tiers["bank"] == sum(entries) * (costs["bank_entry"] + latent)
        assert costs["bank_entry"] * 3 < costs["window_or_bank_frame"]
    if memory.render:  # the rendering is read too: the same bank without it gives other frames
        with torch.no_grad():
            unrendered = dit(x, t, ctx, actions, layout=CausalLayout(chunk, sinks, window, memory=replace(memory, render=False)))
        assert (reference - unrendered).abs().max() > 1e-2


def test_rendered_memory_draws_a_revisited_place_from_the_bank() -> None:
    """In a static world every frame is a crop of one latent canvas at its camera, so whatever
    the anchor channels show must be that canvas. Going out of the first frame's view and coming
    back past it, rendered memory shows the canvas wherever the bank saw the place -- more than
    the first frame alone knows -- and exactly it."""
    dit = _dit(TOY_SHIFTS, anchor_warp=True)
    gen = torch.Generator().manual_seed(4)
    H = W = 8  # latent pixels; 4x4 tokens of 2x2
    canvas = torch.randn(4, 16, 16, generator=gen).repeat(1, 4, 4)  # a torus of 8 tokens (BANK.wrap_tokens)
    actions = torch.tensor([[0] + [4] * 7 + [3] * 8 + [2] * 4])  # right 7 tokens, back 8, down 4
    camera = dit.camera_offsets(actions, 1, actions.shape[1])[0]
    o = 24
    frames = torch.stack([canvas[:, o + 2 * r : o + 2 * r + H, o + 2 * c : o + 2 * c + W] for r, c in camera.tolist()], 1)[None]
    ctx = torch.randn(1, 3, 8, generator=gen)
    seen = []
    embed = dit._embed_patches
    dit._embed_patches = lambda x: (seen.append(x[:, 4:]), embed(x))[1]  # spy: the anchor channels and mask
    known = {}
    for memory in (RENDERED, BANK):
        cache = dit.new_cache(batch_size=1, height=H, width=W, sink_frames=1, window_frames=2, chunk_frames=2,
                              memory=memory)
        seen.clear()
        with torch.no_grad():
            for q0 in range(0, actions.shape[1], 2):
                part = slice(q0, q0 + 2)
                dit(frames[:, :, part], torch.zeros(1, 2), ctx, actions[:, part], cache=cache, write_cache=True)
        assert len(seen) == actions.shape[1] // 2
        masks = []
        for q0, cond in zip(range(0, actions.shape[1], 2), seen):
            anchor, mask = cond[:, :4], cond[:, 4:] > 0
            truth = frames[:, :, q0 : q0 + 2]
            torch.testing.assert_close(anchor * mask, truth * mask, atol=0, rtol=0)
            masks.append(mask)
        known[memory.render] = torch.stack(masks)
    # rendered memory knows everything the first frame knows, and more once the bank has entries
    assert (known[True] >= known[False]).all()
    assert known[True].sum() > known[False].sum() + 64


def test_paged_store_without_memory_equals_contiguous_cache() -> None:
    """Both tiers off: the paged store is today's sinks + window cache (keys in another order,
    so equal up to summation order), over ring wraps and with camera RoPE."""
    dit = _dit(TOY_SHIFTS)
    gen = torch.Generator().manual_seed(2)
    B, H, W, frames, chunk = 2, 8, 8, 21, 3
    x = torch.randn(B, 4, frames, H, W, generator=gen)
    t = torch.rand(B, frames, generator=gen) * 1000
    ctx = torch.randn(B, 3, 8, generator=gen)
    actions = torch.randint(0, 6, (B, frames), generator=gen)
    kw = dict(batch_size=B, height=H, width=W, sink_frames=2, window_frames=4, chunk_frames=chunk)
    contiguous, paged = dit.new_cache(**kw), dit.new_cache(**kw, memory=MemoryConfig())
    assert isinstance(paged, PagedKVCache)
    with torch.no_grad():
        for q0 in range(0, frames, chunk):
            part = slice(q0, q0 + chunk)
            a = dit(x[:, :, part], t[:, part], ctx, actions[:, part], cache=contiguous, write_cache=True)
            b = dit(x[:, :, part], t[:, part], ctx, actions[:, part], cache=paged, write_cache=True)
            torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    # bounded: sinks + window pages in use, whatever the length
    assert paged.pool.in_use == B * (2 + 4)


def _gen(memory: MemoryConfig | None, batch: int = 1) -> tuple[WorldModel, StreamGenerator]:
    model = WorldModel.load("toy-student-fast")
    causal = replace(model.cfg.causal, memory=memory)
    return model, StreamGenerator(model, model.cfg.sampling.make(), causal=causal, batch_size=batch)


def _start(stream: StreamGenerator, seed: int = 0) -> None:
    from streamkd.data.toyworld import heldout_seed, prompt_for_seed

    stream.reset([prompt_for_seed(heldout_seed(seed))] * stream.batch_size, None,
                 [torch.Generator().manual_seed(seed + b) for b in range(stream.batch_size)])


def test_snapshot_is_a_page_table_copy_and_branches_independently() -> None:
    model, stream = _gen(MemoryConfig(compressed_frames=6, fine_frames=3, bank_frames=4, retrieve_frames=2))
    _start(stream)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(8):
            stream.next_chunk(torch.randint(0, 5, (1, 3), generator=gen))
        cache = stream.cache
        k_before = cache.pool.k
        in_use = cache.pool.in_use
        snap = cache.snapshot()
        # copying no key or value: the pool is the same tensor, no page was allocated
        assert cache.pool.k is k_before and cache.pool.in_use == in_use
        actions = torch.randint(0, 5, (1, 3), generator=gen)
        stream.generator = [torch.Generator().manual_seed(9)]
        first = stream.next_chunk(actions)
        cache.restore(snap)
        stream.generator = [torch.Generator().manual_seed(9)]
        again = stream.next_chunk(actions)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    snap.release()
    stream.cache.reset()
    assert stream.cache.pool.in_use == 0  # every reference given back


def test_pages_stay_bounded_over_a_long_stream() -> None:
    memory = MemoryConfig(compressed_frames=6, fine_frames=3, bank_frames=4, retrieve_frames=2)
    model, stream = _gen(memory)
    _start(stream)
    gen = torch.Generator().manual_seed(4)
    used, tier = [], []
    with torch.no_grad():
        for i in range(40):
            stream.next_chunk(torch.randint(0, 5, (1, 3), generator=gen))
            used.append(stream.cache.pool.in_use)
            tier.append(stream.cache.tier_bytes())
    c = model.cfg.causal
    assert max(used) <= c.sink_frames + c.window_frames + memory.bank_frames
    assert tier[-1] == tier[20]  # every tier at capacity: bytes flat
    assert stream.cache.pool.grows == 0


def test_observe_writes_every_tier() -> None:
    """Observing a stream's own latents reproduces its memory tiers and its next chunk."""
    memory = MemoryConfig(compressed_frames=6, fine_frames=3, bank_frames=4, retrieve_frames=2)
    model, a = _gen(memory)
    _, b = _gen(memory)
    _start(a)
    _start(b)
    gen = torch.Generator().manual_seed(5)
    actions = torch.randint(0, 5, (1, 30), generator=gen)
    with torch.no_grad():
        latents = torch.cat([a.next_chunk(actions[:, i : i + 3]) for i in range(0, 27, 3)], 2)
        b.observe_latents(latents, actions[:, :27])
        assert a.cache.tier_bytes() == b.cache.tier_bytes()
        ra, rb = a.cache._rows[0], b.cache._rows[0]
        assert sorted(ra.bank) == sorted(rb.bank) and sorted(ra.compressed) == sorted(rb.compressed)
        a.generator = [torch.Generator().manual_seed(7)]
        b.generator = [torch.Generator().manual_seed(7)]
        torch.testing.assert_close(a.next_chunk(actions[:, 27:]), b.next_chunk(actions[:, 27:]), atol=1e-5, rtol=0)


def test_batched_rows_with_different_retrieved_sets_equal_each_alone() -> None:
    """Two streams batched (different cameras: different retrieved sets and bank sizes, padded
    with a key mask) give what each gives alone."""
    memory = MemoryConfig(compressed_frames=6, fine_frames=3, bank_frames=4, retrieve_frames=2)
    gen = torch.Generator().manual_seed(6)
    actions = torch.randint(0, 5, (2, 36), generator=gen)
    outs = []
    for rows in ([0, 1], [0], [1]):
        _, stream = _gen(memory, batch=len(rows))
        _start(stream)
        stream.generator = [torch.Generator().manual_seed(10 + r) for r in rows]
        with torch.no_grad():
            outs.append(torch.cat([stream.next_chunk(actions[rows, i : i + 3]) for i in range(0, 36, 3)], 2))
    torch.testing.assert_close(outs[0][0:1], outs[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[0][1:2], outs[2], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- planner
def test_bank_admits_new_ground_evicts_the_most_covered_and_pins_the_first() -> None:
    cfg = MemoryConfig(bank_frames=3, retrieve_frames=1, admit_coverage=0.25)
    p = MemoryPlanner(cfg, sink_frames=0, window_frames=1, grid=(4, 4), use_camera=True)
    # frame 0 at (0, 0); frame 1 at (0, 1): 3/4 overlap -> 1/4 new: admitted (>= 0.25)
    # frame 2 at (0, 1) again: nothing new -> not admitted; frame 3 far away -> admitted
    p.commit([(0, 0), (0, 1), (0, 1), (10, 10), (10, 11)])
    assert p.bank == [0, 1, 3]  # frame 4 is still in the window
    p.commit([(20, 20)])  # frame 4 leaves: (10, 11) overlaps frame 3 by 3/4 -> 1/4 new -> admitted
    # over capacity: the most covered entry goes; frame 0 is pinned even though frame 1 covers 3/4 of it
    # entries 1, 3 and 4 are each 3/4 covered by another: the oldest of them goes
    assert p.bank == [0, 3, 4]


def test_retrieval_takes_what_covers_the_next_view() -> None:
    cfg = MemoryConfig(bank_frames=4, retrieve_frames=1, admit_coverage=0.25)
    p = MemoryPlanner(cfg, sink_frames=0, window_frames=1, grid=(4, 4), use_camera=True)
    p.commit([(0, 0), (0, 20), (20, 0), (40, 40)])  # bank: 0, 1, 2; window: 3
    assert p.view([(20, 1)]).retrieved == [2]
    assert p.view([(0, 19)]).retrieved == [1]
    assert p.view([(40, 40)]).retrieved == []  # the window already shows it: nothing new to retrieve


def test_torus_wrap_aligns_a_place_seen_a_lap_ago() -> None:
    cfg = MemoryConfig(bank_frames=2, retrieve_frames=1, wrap_tokens=32)
    p = MemoryPlanner(cfg, sink_frames=0, window_frames=1, grid=(4, 4), use_camera=True)
    p.commit([(0, 5), (16, 16)])
    assert p.view([(32, 5)]).retrieved == [0]  # (32, 5) is (0, 5) one lap later
    assert Coverage((4, 4), 32).new_share((32, 5), [(0, 5)]) == 0.0


# ------------------------------------------------------------------------------- compression
def test_pooling_and_int8_error() -> None:
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(2, 16, 2, 12, generator=gen)
    v = torch.randn(2, 16, 2, 12, generator=gen)
    pooled = pool_tokens(k, (4, 4), 2)
    torch.testing.assert_close(pooled[:, 0], k[:, [0, 1, 4, 5]].mean(1))
    cfg = MemoryConfig(compressed_frames=4, fine_frames=2)
    packed = compress_frame(k, v, cfg, (4, 4))
    assert packed.k.dtype == torch.int8 and packed.k.shape == (2, 4, 2, 12)
    kq, vq = packed.unpack(torch.float32)
    # symmetric int8: error at most half a step of each scale
    assert (kq - pooled).abs().max() <= packed.k_scale.float().max() * 0.51
    assert (vq - pool_tokens(v, (4, 4), 2)).abs().max() <= packed.v_scale.float().max() * 0.51
    level2 = coarsen(packed, cfg, (4, 4), torch.float32)
    assert level2.k.shape == (2, 1, 2, 12)


def test_tier_bytes_follow_the_cost_model() -> None:
    cfg = MemoryConfig(compressed_frames=8, fine_frames=4)
    costs = memory_bytes_per_frame(num_layers=6, tokens_per_frame=64, channels=128, cfg=cfg)
    assert costs["window_or_bank_frame"] / costs["compressed_level1"] > 7
    assert costs["window_or_bank_frame"] / costs["compressed_level2"] > 20
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(6, 64, 4, 32, generator=gen)
    assert compress_frame(k, k, cfg, (8, 8)).nbytes == costs["compressed_level1"]


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"retrieve_frames": 5, "bank_frames": 4}, "retrieve_frames (5) is larger than the bank"),
        ({"bank_frames": 4}, "set memory.retrieve_frames >= 1"),
        ({"fine_frames": 5, "compressed_frames": 4}, "fine_frames (5) must be <="),
        ({"compressed_frames": -1}, "compressed_frames must be >= 0"),
        ({"quantize": "int4"}, "memory.quantize: 'int4' is not allowed"),
        ({"admit_coverage": 2}, "admit_coverage must be in [0, 1]"),
        ({"render": True}, "memory.render draws the retrieved bank entries into the anchor: it needs a bank"),
        ({"render": True, "bank_frames": 4, "retrieve_frames": 2, "retrieval": "similarity"},
         "it needs camera retrieval"),
        ({"bank_level": 3, "bank_frames": 4, "retrieve_frames": 2}, "bank_level must be 0 (full resolution), 1 or 2"),
        ({"bank_level": 1}, "bank_level=1 compresses bank entries, but there is no bank"),
    ],
)
def test_bad_memory_configs_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        from_dict(CausalConfig, {"memory": fields})


def test_memory_that_cannot_fit_the_model_is_refused() -> None:
    dit = _dit(TOY_SHIFTS)
    kw = dict(batch_size=1, height=8, width=8, sink_frames=1, window_frames=3, chunk_frames=2)
    with pytest.raises(ValueError, match="pool=3 .* does not divide the latent token grid 4x4"):
        dit.new_cache(**kw, memory=MemoryConfig(compressed_frames=4, pool=3))
    with pytest.raises(ValueError, match="below a chunk"):
        dit.new_cache(**kw, memory=MemoryConfig(compressed_frames=1))
    with pytest.raises(ValueError, match="pool=3 .1 level.s.: cells of 3x3 tokens. does not divide"):
        dit.new_cache(**kw, memory=MemoryConfig(bank_frames=2, retrieve_frames=1, bank_level=1, pool=3))
    with pytest.raises(ValueError, match="retrieval='camera' needs a model with camera actions"):
        _dit(None).new_cache(**kw, memory=MemoryConfig(bank_frames=2, retrieve_frames=1, retrieval="camera"))
    with pytest.raises(ValueError, match="this model has none .dit.anchor_warp: false.; set memory.render: false"):
        dit.new_cache(**kw, memory=RENDERED)


def test_snapshot_of_another_layout_is_refused() -> None:
    _, a = _gen(MemoryConfig(compressed_frames=6))
    _, b = _gen(MemoryConfig(compressed_frames=9))
    b.cache.pool = a.cache.pool  # even sharing a pool, the layouts differ
    with pytest.raises(ValueError, match="another memory layout"):
        b.cache.restore(a.cache.snapshot())


def test_similarity_bank_streams_without_camera_actions() -> None:
    """Text-to-video models (no camera actions) keep a bank by key similarity."""
    dit = _dit(None)
    memory = MemoryConfig(bank_frames=3, retrieve_frames=1)
    cache = dit.new_cache(batch_size=1, height=8, width=8, sink_frames=1, window_frames=2, chunk_frames=1, memory=memory)
    gen = torch.Generator().manual_seed(9)
    ctx = torch.randn(1, 3, 8, generator=gen)
    with torch.no_grad():
        for _ in range(12):
            dit(torch.randn(1, 4, 1, 8, 8, generator=gen), torch.zeros(1, 1), ctx, None, cache=cache, write_cache=True)
    assert len(cache._rows[0].bank) == 3 and cache.stats["retrieved"] > 0
    with pytest.raises(ValueError, match="similarity memory bank"):
        dit(torch.randn(1, 4, 6, 8, 8), torch.zeros(1, 6), ctx, None, layout=CausalLayout(1, 1, 2, memory=memory))
    assert np.isfinite(cache.nbytes)


def test_an_old_entry_is_still_retrieved_in_a_long_stream() -> None:
    """The age term discounts, it never outweighs coverage: a place seen 2,000 frames ago is
    retrieved when the camera comes back (an additive penalty once left long streams' banks unread)."""
    cfg = MemoryConfig(bank_frames=4, retrieve_frames=1, age_weight=0.02)
    p = MemoryPlanner(cfg, sink_frames=0, window_frames=6, grid=(4, 4), use_camera=True)
    p.commit([(0, 0)] + [(100, 100)] * 2000)
    assert 0 in p.bank
    assert p.view([(0, 1)]).retrieved == [0]
    # among entries that cover alike, the newer wins
    q = MemoryPlanner(replace(cfg, admit_coverage=0.0), sink_frames=0, window_frames=1, grid=(4, 4), use_camera=True)
    q.commit([(50, 50), (0, 0), (20, 20), (0, 0), (40, 40)])
    assert q.bank == [0, 1, 2, 3] and q.view([(0, 0)]).retrieved == [3]
