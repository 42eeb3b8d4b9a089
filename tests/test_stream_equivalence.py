"""The central test: cached streaming equals the full-sequence block-causal forward.

Two levels:
* model: feeding a sequence chunk by chunk through the KV cache gives, for every chunk, the same
  output as one block-causal forward over the whole sequence -- several chunk sizes, with and
  without sinks, across ring-buffer wraps (where the reference goes chunk by chunk with the
  re-based positions of ``attention.layout``);
* generator: every denoising step of ``StreamGenerator`` (first frame held clean, CFG on) equals
  the block-causal forward over [clean history at t=0, the noisy chunk] -- i.e. the cache holds
  exactly what training's block-causal forward would compute.
"""

from __future__ import annotations

import pytest
import torch

from streamkd.attention.layout import CausalLayout
from streamkd.data.toyworld import ToyWorldConfig, render
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiT, DiTConfig
from streamkd.bundle import CausalConfig
from streamkd.models.world import WorldModel, WorldModelConfig
from streamkd.sampling.schedule import EulerSampler, FewStepSampler
from streamkd.sampling.stream import StreamGenerator

TOL = 2e-5  # fp32: same math, different summation order (cache concat vs. masked full sequence)


def _randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


TOY_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


@pytest.fixture(
    scope="module", params=[(None, False), (TOY_SHIFTS, False), (TOY_SHIFTS, True)],
    ids=["plain-rope", "camera-rope", "camera-rope-anchor-warp"],
)
def dit(request) -> DiT:
    shifts, anchor = request.param
    cfg = DiTConfig(
        in_channels=4, out_channels=4, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=8, num_actions=5,
        action_shifts=shifts, anchor_warp=anchor,
    )
    model = DiT(cfg).eval()
    _randomize(model)
    return model


@pytest.mark.parametrize(
    "chunk, sinks, window, frames",
    [
        (3, 0, None, 12),  # plain block-causal, no eviction
        (3, 3, 6, 12),  # sinks + window, no gap yet
        (3, 3, 3, 15),  # window slides: gap between sinks and window
        (2, 1, 4, 14),  # sinks not a multiple of the chunk, ring wraps several times
        (4, 0, 4, 16),  # no sinks, window = one chunk
        (1, 2, 3, 10),  # frame-by-frame generation
    ],
)
def test_cached_chunks_equal_block_causal_forward(dit: DiT, chunk: int, sinks: int, window: int | None, frames: int) -> None:
    gen = torch.Generator().manual_seed(1)
    B, H, W = 2, 4, 6
    x = torch.randn(B, 4, frames, H, W, generator=gen)
    t = torch.rand(B, frames, generator=gen) * 1000
    ctx = torch.randn(B, 3, 8, generator=gen)
    actions = torch.randint(0, 6, (B, frames), generator=gen)
    layout = CausalLayout(chunk, sinks, window)
    with torch.no_grad():
        reference = dit(x, t, ctx, actions, layout=layout)
        cache = dit.new_cache(batch_size=B, height=H, width=W, sink_frames=sinks, window_frames=window or frames, chunk_frames=chunk)
        for q0 in range(0, frames, chunk):
            part = slice(q0, q0 + chunk)
            out = dit(x[:, :, part], t[:, part], ctx, actions[:, part], cache=cache, write_cache=True)
            torch.testing.assert_close(out, reference[:, :, part], atol=TOL, rtol=0)
    # the ring really wrapped and positions stayed bounded
    if window is not None and frames - sinks > window:
        assert cache.num_filled == sinks + window
        assert max(cache.slot_positions()) == sinks + window - 1


def test_cache_writing_pass_without_output_stores_the_same_cache(dit: DiT) -> None:
    """``output=False`` (the clean pass of streaming) stops the last block at its keys/values: the
    cache must hold bit-for-bit what a full pass writes, and later chunks must read the same."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 9, 4, 6, generator=gen)
    ctx = torch.randn(1, 3, 8, generator=gen)
    actions = torch.randint(0, 6, (1, 9), generator=gen)
    caches = [dit.new_cache(batch_size=1, height=4, width=6, sink_frames=1, window_frames=3, chunk_frames=3) for _ in range(2)]
    with torch.no_grad():
        for q0 in range(0, 9, 3):
            part = slice(q0, q0 + 3)
            full = dit(x[:, :, part], torch.zeros(1, 3), ctx, actions[:, part], cache=caches[0], write_cache=True)
            none = dit(x[:, :, part], torch.zeros(1, 3), ctx, actions[:, part], cache=caches[1], write_cache=True, output=False)
            assert full is not None and none is None
            assert torch.equal(caches[0].k_NBSHD, caches[1].k_NBSHD) and torch.equal(caches[0].v_NBSHD, caches[1].v_NBSHD)
            assert torch.equal(caches[0].camera_BS2, caches[1].camera_BS2)
    with pytest.raises(ValueError, match="only makes sense with write_cache"):
        dit(x[:, :, :3], torch.zeros(1, 3), ctx, cache=caches[0], output=False)


def test_read_only_pass_leaves_cache_untouched(dit: DiT) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, 4, 6, generator=gen)
    ctx = torch.randn(1, 3, 8, generator=gen)
    cache = dit.new_cache(batch_size=1, height=4, width=6, sink_frames=0, window_frames=6, chunk_frames=3)
    with torch.no_grad():
        dit(x, torch.zeros(1, 3), ctx, cache=cache, write_cache=True)
        before = cache.snapshot()
        a = dit(x, torch.full((1, 3), 500.0), ctx, cache=cache)
        b = dit(x, torch.full((1, 3), 500.0), ctx, cache=cache)
    assert cache.frames_written == 3
    torch.testing.assert_close(cache.k_NBSHD[:, :, : before.k.shape[2]], before.k, atol=0, rtol=0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def _tiny_world_model(causal: CausalConfig, action_shifts=None, anchor_warp: bool = False) -> WorldModel:
    cfg = WorldModelConfig(
        dit=DiTConfig(
            in_channels=8, out_channels=8, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16, num_actions=5,
            action_shifts=action_shifts, anchor_warp=anchor_warp,
        ),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128),
        causal=causal,
    )
    model = WorldModel(cfg).eval()
    _randomize(model.dit, std=0.1)
    return model


@pytest.mark.parametrize("sampler_kind", ["few_step", "euler"])
@pytest.mark.parametrize(
    "causal, shifts, anchor",
    [(CausalConfig(3, 3, 6), None, False), (CausalConfig(2, 1, 4), None, False),
     (CausalConfig(2, 1, 4), TOY_SHIFTS, False), (CausalConfig(2, 1, 4), TOY_SHIFTS, True)],
    ids=["c3s3w6", "c2s1w4", "c2s1w4-camera-rope", "c2s1w4-anchor-warp"],
)
def test_stream_generator_matches_block_causal_forward(sampler_kind: str, causal: CausalConfig, shifts, anchor) -> None:
    model = _tiny_world_model(causal, shifts, anchor)
    sampler = FewStepSampler([1.0, 0.75, 0.5, 0.25]) if sampler_kind == "few_step" else EulerSampler(3, shift=2.0)
    steps: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    gen = StreamGenerator(model, sampler, guidance_scale=2.5, batch_size=2, on_step=lambda *a: steps.append(a))
    first = torch.from_numpy(render(5, "forest with red squares", [0], 1, ToyWorldConfig(frame_size=32, map_size=128))[0])
    gen.reset(["forest with red squares", "snow with blue circles"], first.expand(2, -1, -1, -1), torch.Generator().manual_seed(3))
    num_chunks = 6  # 18 / 12 frames: the window ring wraps
    actions = torch.randint(0, 5, (2, num_chunks * causal.chunk_frames), generator=torch.Generator().manual_seed(4))
    clean = torch.cat([gen.next_chunk(actions[:, c * causal.chunk_frames : (c + 1) * causal.chunk_frames]) for c in range(num_chunks)], 2)

    layout = CausalLayout(causal.chunk_frames, causal.sink_frames, causal.window_frames)
    ctx = model.encode_prompts(["forest with red squares", "snow with blue circles", "", ""])
    null = torch.full_like(actions, model.dit.null_action)
    F = causal.chunk_frames
    with torch.no_grad():
        for chunk, _, x_chunk, t_chunk, v_stream in steps:
            q0 = chunk * F
            x = torch.cat([clean[:, :, :q0], x_chunk], 2).repeat(2, 1, 1, 1, 1)
            t = torch.cat([torch.zeros(2, q0), t_chunk], 1).repeat(2, 1)
            a = torch.cat([actions[:, : q0 + F], null[:, : q0 + F]])
            v_full = model.dit(x, t, ctx, a, layout=layout)[:, :, q0:]
            v_ref = v_full[2:] + 2.5 * (v_full[:2] - v_full[2:])
            torch.testing.assert_close(v_stream, v_ref, atol=5e-5, rtol=0)
    assert len(steps) == num_chunks * sampler.num_steps
    # the first frame is the conditioning frame, exactly
    torch.testing.assert_close(clean[:, :, 0], model.codec.encode(first[None, None])[:, :, 0].expand(2, -1, -1, -1))


@pytest.mark.parametrize("mode", ["bidirectional", "block-causal", "cached"])
def test_block_sparse_with_every_block_kept_equals_dense(mode: str) -> None:
    """The DiT's sparse path (CPU gather path) with tau = 1 keeps every block: dense results, in
    every attention mode; a real sparsity level changes them."""
    from streamkd.attention.sparse import BlockSparseConfig

    base = dict(in_channels=4, out_channels=4, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=8,
                num_actions=5, action_shifts=TOY_SHIFTS)
    dense = DiT(DiTConfig(**base)).eval()
    _randomize(dense)
    outs = {}
    for name, sparse in (("dense", None), ("all-kept", BlockSparseConfig(tau=1.0, block_q=16, block_k=16)),
                         ("sparse", BlockSparseConfig(mode="topk", topk=2, sink_blocks=0, block_q=16, block_k=16))):
        model = DiT(DiTConfig(**base, sparse=sparse)).eval()
        model.load_state_dict(dense.state_dict())
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(1, 4, 6, 4, 8, generator=gen)  # 32 tokens per frame
        t, ctx = torch.rand(1, 6, generator=gen) * 1000, torch.randn(1, 3, 8, generator=gen)
        a = torch.randint(0, 5, (1, 6), generator=gen)
        with torch.no_grad():
            if mode == "cached":
                cache = model.new_cache(batch_size=1, height=4, width=8, sink_frames=1, window_frames=3, chunk_frames=3)
                outs[name] = torch.cat([model(x[:, :, c : c + 3], t[:, c : c + 3], ctx, a[:, c : c + 3], cache=cache, write_cache=True)
                                        for c in (0, 3)], 2)
            else:
                layout = CausalLayout(3) if mode == "block-causal" else None
                outs[name] = model(x, t, ctx, a, layout=layout)
    torch.testing.assert_close(outs["all-kept"], outs["dense"], atol=TOL, rtol=0)
    assert (outs["sparse"] - outs["dense"]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "causal, shifts, anchor",
    [(CausalConfig(2, 1, 4), TOY_SHIFTS, False), (CausalConfig(2, 1, 4), TOY_SHIFTS, True), (CausalConfig(3, 3, 6), None, False)],
    ids=["camera-rope", "anchor-warp", "c3s3w6"],
)
def test_observing_a_streams_own_latents_reproduces_its_cache_and_next_chunk(causal, shifts, anchor) -> None:
    """``observe`` is equivalent to having generated the frames: a second stream that observes the
    first stream's clean latents (with the same actions) holds the same cache, bit for bit, and
    continues with the same next chunk given the same noise."""
    model = _tiny_world_model(causal, shifts, anchor)
    world = ToyWorldConfig(frame_size=32, map_size=128)
    first = torch.from_numpy(render(5, "forest with red squares", [0], 1, world)[0])[None]
    prompts = ["forest with red squares"]
    F, num_chunks = causal.chunk_frames, 5  # the window ring wraps
    actions = torch.randint(0, 5, (1, (num_chunks + 1) * F), generator=torch.Generator().manual_seed(4))
    made = StreamGenerator(model, FewStepSampler([1.0, 0.5]), guidance_scale=2.0)
    made.reset(prompts, first, torch.Generator().manual_seed(3))
    latents = torch.cat([made.next_chunk(actions[:, c * F : (c + 1) * F]) for c in range(num_chunks)], 2)

    seen = StreamGenerator(model, FewStepSampler([1.0, 0.5]), guidance_scale=2.0)
    seen.reset(prompts, first, torch.Generator().manual_seed(99))
    seen.observe_latents(latents, actions[:, : num_chunks * F])
    assert seen.chunk_index == made.chunk_index and seen.cache.frames_written == made.cache.frames_written
    for a, b in zip(seen.cache.snapshot().__dict__.values(), made.cache.snapshot().__dict__.values()):
        if isinstance(a, tuple):  # the anchor of anchor-warp models
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=0, rtol=0)
        elif isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        else:
            assert a == b
    made.generator, seen.generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    nxt = actions[:, num_chunks * F :]
    torch.testing.assert_close(seen.next_chunk(nxt), made.next_chunk(nxt), atol=0, rtol=0)


def test_observe_frames_encodes_and_refuses_bad_input() -> None:
    model = _tiny_world_model(CausalConfig(2, 1, 4), TOY_SHIFTS)
    world = ToyWorldConfig(frame_size=32, map_size=128)
    frames = torch.from_numpy(render(5, "forest with red squares", [0, 4, 4, 4], 4, world))[None]
    a = StreamGenerator(model, FewStepSampler([1.0]))
    a.reset(["forest with red squares"], None, torch.Generator().manual_seed(0))
    latents = a.observe(frames, torch.tensor([[0, 4, 4, 4]]))
    b = StreamGenerator(model, FewStepSampler([1.0]))
    b.reset(["forest with red squares"], None, torch.Generator().manual_seed(0))
    b.observe_latents(model.codec.encode(frames), torch.tensor([[0, 4, 4, 4]]))
    torch.testing.assert_close(a.cache.k_NBSHD, b.cache.k_NBSHD, atol=0, rtol=0)
    assert latents.shape[2] == 4 and a.chunk_index == 2
    with pytest.raises(ValueError, match="whole chunks"):
        a.observe(frames[:, :3])
    with pytest.raises(ValueError, match="32, 32, 3"):
        a.observe(torch.zeros(1, 2, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="actions must be"):
        a.observe(frames, torch.zeros(1, 3, dtype=torch.long))
