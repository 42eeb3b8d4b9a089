"""Sessions batched into one forward give the frames they give alone; rebase and the KV re-cache
keep the cache's meaning (see serve/backends.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from streamkd.data.toyworld import ToyClipDataset, ToyWorldConfig, render
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiTConfig
from streamkd.cache.memory import MemoryConfig, coarsen, compress_frame
from streamkd.bundle import CausalConfig, SamplingConfig
from streamkd.models.world import WorldModel, WorldModelConfig
from streamkd.serve.backends import ModelBackend, StreamSpec, layout_key, rebase

TOY_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
PROMPTS = ["forest with red squares", "snow with blue circles", "desert with yellow triangles"]


def tiny_causal_model(causal: CausalConfig, guidance: float = 2.0, shifts=TOY_SHIFTS, seed: int = 0,
                      anchor_warp: bool = False) -> WorldModel:
    cfg = WorldModelConfig(
        dit=DiTConfig(in_channels=8, out_channels=8, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16,
                      num_actions=5, action_shifts=shifts, anchor_warp=anchor_warp),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128),
        causal=causal,
        sampling=SamplingConfig(kind="few_step", sigmas=[1.0, 0.6, 0.3], guidance_scale=guidance),
    )
    gen = torch.Generator().manual_seed(seed)
    model = WorldModel(cfg).eval()
    clips = ToyClipDataset(cfg.world, 2)  # a fitted codec: decoded frames look like the toy world
    model.codec.fit(torch.stack([clips[i]["frames"] for i in range(4)]))
    with torch.no_grad():
        for p in model.dit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _spec(i: int, world: ToyWorldConfig) -> StreamSpec:
    prompt = PROMPTS[i % len(PROMPTS)]
    first = render(10 + i, prompt, [0], 1, world)[0] if i % 2 == 0 else None  # with and without first frame
    return StreamSpec(prompt, seed=100 + i, first_frame=first)


def _actions(i: int, chunk: int) -> int:
    return (3 * i + chunk) % 5


@pytest.mark.parametrize("causal", [CausalConfig(2, 1, 4), CausalConfig(3, 3, 6)], ids=["c2s1w4", "c3s3w6"])
@pytest.mark.parametrize("anchor_warp", [False, True], ids=["camera-rope", "anchor-warp"])
def test_batched_sessions_equal_unbatched(causal: CausalConfig, anchor_warp: bool) -> None:
    model = tiny_causal_model(causal, anchor_warp=anchor_warp)
    # sessions join at different ticks: different cache fill and ring phase
    _batched_equals_alone(ModelBackend(model), model, joins=[0, 0, 3, 4], ticks=9)


def _batched_equals_alone(backend: ModelBackend, model: WorldModel, joins: list[int], ticks: int) -> dict:
    """Each session stepped alone, then all of them stepped by groups of equal ``group_key`` as the
    engine does: the frames agree (to uint8 rounding) and, after warm-up, everyone shares one
    batch. Returns the batched sessions' streams."""
    alone: dict[int, list[np.ndarray]] = {}
    for i, join in enumerate(joins):
        stream = backend.start(_spec(i, model.cfg.world))
        alone[i] = [backend.step([stream], [_actions(i, c)])[0] for c in range(ticks - join)]
        stream.gen.cache.reset()
    streams, got, batch_sizes = {}, {i: [] for i in range(len(joins))}, []
    for tick in range(ticks):
        for i, join in enumerate(joins):
            if join == tick:
                streams[i] = backend.start(_spec(i, model.cfg.world))
        groups: dict = {}
        for i, s in streams.items():
            groups.setdefault(backend.group_key(s), []).append(i)
        for members in groups.values():
            frames = backend.step([streams[i] for i in members], [_actions(i, len(got[i])) for i in members])
            batch_sizes.append(len(members))
            for i, f in zip(members, frames):
                got[i].append(f)
    assert max(batch_sizes) == len(joins), "after warm-up every session should share one batch"
    for i in alone:
        a, b = np.stack(alone[i]).astype(int), np.stack(got[i]).astype(int)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1, f"session {i}: batched frames differ from unbatched"
    return streams


MEMORY = MemoryConfig(compressed_frames=4, fine_frames=2, bank_frames=4, retrieve_frames=2, admit_coverage=0.1)
RENDERED = replace(MEMORY, render=True)
POOLED = replace(MEMORY, bank_level=1)


@pytest.mark.parametrize("guidance, memory", [(1.0, MEMORY), (2.0, MEMORY), (2.0, RENDERED),
                                              (2.0, replace(RENDERED, bank_level=1))],
                         ids=["plain", "cfg", "cfg-rendered", "cfg-rendered-pooled-bank"])
def test_memory_sessions_batch_by_page_tables(guidance: float, memory: MemoryConfig) -> None:
    """A memory checkpoint: sessions at different points of their streams (different retrieved
    sets and tier sizes, each rendering its own) batch into one forward by their page tables,
    give what they give alone, and batching copies no cached key or value."""
    model = tiny_causal_model(CausalConfig(2, 1, 4, memory=memory), guidance=guidance, anchor_warp=memory.render)
    backend = ModelBackend(model)
    streams = _batched_equals_alone(backend, model, joins=[0, 0, 3, 5], ticks=14)
    assert backend.copied_bytes == 0
    stats = backend.memory_stats(streams[0])
    assert stats["tier_bytes"]["compressed"] > 0 and stats["bank_frames"] > 0 and stats["retrieved_total"] > 0
    # ending sessions gives their pages back to the shared pool
    for st in streams.values():
        st.gen.cache.reset()
    assert backend.pool.in_use == 0


@pytest.mark.parametrize("memory", [MEMORY, POOLED], ids=["bank-pages", "bank-pooled"])
def test_memory_recache_rewrites_recent_keys_and_memory_tiers(memory: MemoryConfig) -> None:
    """The prompt re-cache of a memory checkpoint re-writes sinks + window (same prompt, nothing
    evicted: the same keys) and every frame the bank and the compressed tier hold: each is
    written again under the new prompt as a one-frame chunk after the re-written sinks, at its
    own camera offset (the rule of ``ModelBackend._recache_memory``); tiers keep their frames
    (a pooled bank its level), and no page leaks."""
    model = tiny_causal_model(CausalConfig(2, 1, 4, memory=memory), guidance=2.0)
    backend = ModelBackend(model)
    stream = backend.start(_spec(0, model.cfg.world))
    for c in range(2):  # 4 frames: nothing evicted yet
        backend.step([stream], [_actions(3, c)])
    cache = stream.gen.cache
    pages = lambda: cache._rows[0].sinks + [p for _, p in cache._rows[0].window]  # noqa: E731
    k_before = cache.pool.k[:, pages()].clone()
    backend.switch_prompt(stream, PROMPTS[0])
    torch.testing.assert_close(cache.pool.k[:, pages()], k_before, atol=2e-5, rtol=0)
    for c in range(2, 10):
        backend.step([stream], [_actions(3, c)])
    rows = cache._rows
    bank = [dict(r.bank_packed if memory.bank_level else r.bank) for r in rows]
    compressed = [dict(r.compressed) for r in rows]
    assert bank[0] and compressed[0] and set(stream.visible.memory) == set(bank[0]) | set(compressed[0])
    k_before, in_use = cache.pool.k[:, pages()].clone(), cache.pool.in_use
    backend.switch_prompt(stream, PROMPTS[1])
    assert not torch.allclose(cache.pool.k[:, pages()], k_before)
    assert cache.pool.in_use == in_use  # old bank pages given back, new ones taken
    assert backend.memory_stats(stream)["recached_memory_frames"] == len(set(bank[0]) | set(compressed[0]))

    # the reference: sinks, then the memory frame, written under the new prompt into a fresh cache
    dit, gen = model.dit, stream.gen
    for f in sorted(set(bank[0]) | set(compressed[0])):
        ref = dit.new_cache(batch_size=2, height=8, width=8, sink_frames=1, window_frames=4, chunk_frames=2,
                            memory=MemoryConfig(), pool=cache.pool)
        ref.anchor_valid_B.copy_(cache.anchor_valid_B)
        for g, latent, action in [*stream.visible.sinks, (f, *stream.visible.memory[f])]:
            a = torch.tensor([[action], [dit.null_action]])
            ref.camera_last_B2.copy_(torch.tensor([rows[b].cameras[g] for b in range(2)]) - dit.action_shifts[a[:, 0]])
            dit(latent[None].repeat(2, 1, 1, 1, 1), torch.zeros(2, 1), gen.context, a, cache=ref, write_cache=True, output=False)
        for b in range(2):
            page = ref._rows[b].window[-1][1]
            if f in bank[b] and not memory.bank_level:
                assert rows[b].bank[f] != bank[b][f]  # a new page
                torch.testing.assert_close(cache.pool.k[:, rows[b].bank[f]], cache.pool.k[:, page], atol=1e-6, rtol=0)
            pooled = [(rows[b].compressed, compressed[b], dict(rows[b].planner.compressed).get(f))]
            if memory.bank_level:
                pooled.append((rows[b].bank_packed, bank[b], memory.bank_level))
            for tier, before, level in pooled:
                if f not in before:
                    continue
                want = compress_frame(cache.pool.k[:, page], cache.pool.v[:, page], memory, cache.grid)
                if level == 2:
                    want = coarsen(want, memory, cache.grid, cache.dtype)
                got, old = tier[f].unpack(torch.float32), before[f].unpack(torch.float32)
                for x, y, z in zip(got, want.unpack(torch.float32), old):
                    torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
                    assert x.shape == z.shape  # the same level
                    # new tokens (row 1 is guidance's unconditional row: no prompt to change)
                    assert b == 1 or not torch.equal(x, z)
        ref.reset()
    frames = backend.step([stream], [1])[0]
    assert frames.shape == (2, 32, 32, 3)


def test_memory_recache_keeps_rendered_latents() -> None:
    """With rendered memory every page keeps its frame's clean latent; the prompt-switch
    re-cache gives sinks, window and bank new pages, and each new page holds the same latent."""
    model = tiny_causal_model(CausalConfig(2, 1, 4, memory=RENDERED), guidance=2.0, anchor_warp=True)
    backend = ModelBackend(model)
    stream = backend.start(_spec(0, model.cfg.world))
    for c in range(10):
        backend.step([stream], [_actions(3, c)])
    cache = stream.gen.cache
    row = cache._rows[0]

    def latents() -> dict:
        pages = dict(enumerate(row.sinks)) | dict(row.window) | row.bank
        return {f: (p, cache.pool.latent[p].clone()) for f, p in pages.items()}

    before = latents()
    assert row.bank and len(before) == len(row.sinks) + len(row.window) + len(row.bank)
    backend.switch_prompt(stream, PROMPTS[1])
    after = latents()
    assert after.keys() == before.keys()
    for f, (page, latent) in after.items():
        assert page != before[f][0], f"frame {f} kept its old page"
        torch.testing.assert_close(latent, before[f][1], atol=0, rtol=0)
    assert backend.step([stream], [1])[0].shape == (2, 32, 32, 3)


def test_rebase_keeps_the_next_chunk() -> None:
    causal = CausalConfig(2, 1, 4)
    model = tiny_causal_model(causal, guidance=1.0)
    backend = ModelBackend(model)
    a, b = backend.start(_spec(0, model.cfg.world)), backend.start(_spec(0, model.cfg.world))
    for c in range(5):  # wraps the ring; ``step`` rebases a, b is stepped without it
        backend.step([a], [_actions(0, c)])
        b.gen.next_chunk(torch.full((1, 2), _actions(0, c)))
    assert b.gen.cache.frames_written != a.gen.cache.frames_written == layout_key(b.gen.cache)
    assert a.gen.cache.slot_positions() == list(range(5))
    la = a.gen.next_chunk(torch.full((1, 2), 4))
    lb = b.gen.next_chunk(torch.full((1, 2), 4))
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
    rebase(a.gen.cache)
    rebase(b.gen.cache)
    torch.testing.assert_close(a.gen.cache.k_NBSHD, b.gen.cache.k_NBSHD, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_recache_with_same_prompt_reproduces_cache(guidance: float) -> None:
    """Nothing evicted yet: replaying the visible frames under the same prompt gives the same keys."""
    model = tiny_causal_model(CausalConfig(3, 3, 6), guidance=guidance)
    backend = ModelBackend(model)
    stream = backend.start(_spec(0, model.cfg.world))
    for c in range(3):
        backend.step([stream], [_actions(1, c)])
    before = stream.gen.cache.snapshot()
    backend.switch_prompt(stream, PROMPTS[0])
    after = stream.gen.cache.snapshot()
    assert after.frames_written == before.frames_written
    torch.testing.assert_close(after.k, before.k, atol=2e-5, rtol=0)
    torch.testing.assert_close(after.v, before.v, atol=2e-5, rtol=0)
    torch.testing.assert_close(after.camera, before.camera)
    torch.testing.assert_close(after.camera_last, before.camera_last)


def test_recache_with_new_prompt_changes_cache_and_streams_on() -> None:
    model = tiny_causal_model(CausalConfig(2, 1, 4))
    backend = ModelBackend(model)
    stream = backend.start(_spec(0, model.cfg.world))
    for c in range(5):  # evicts
        backend.step([stream], [_actions(2, c)])
    before = stream.gen.cache.snapshot()
    backend.switch_prompt(stream, PROMPTS[1])
    after = stream.gen.cache.snapshot()
    assert after.frames_written == before.frames_written and after.k.shape == before.k.shape
    assert not torch.allclose(after.k, before.k)
    torch.testing.assert_close(after.camera, before.camera)
    frames = backend.step([stream], [1])[0]
    assert frames.shape == (2, 32, 32, 3) and frames.dtype == np.uint8


def test_non_causal_checkpoint_is_refused() -> None:
    model = tiny_causal_model(CausalConfig())
    model.cfg.causal = None
    with pytest.raises(ValueError, match="bidirectional"):
        ModelBackend(model)


def test_serve_memory_override(tmp_path, capsys) -> None:
    """``streamkd serve --memory``: every session streams with that memory on the paged store;
    'window' turns a memory checkpoint's memory off; bad specs and bidirectional checkpoints are refused."""
    from streamkd.cli import main
    from streamkd.serve.server import build_backend

    backend = build_backend("toy-student-fast", False, 2, MemoryConfig(bank_frames=4, retrieve_frames=2))
    assert backend.pool is not None and backend.causal.memory.bank_frames == 4
    assert build_backend("toy-student-memory", False, 2, None).pool is None
    assert build_backend("toy-student-memory", False, 2).pool is not None
    with pytest.raises(ValueError, match="bidirectional: --memory needs a causal checkpoint"):
        build_backend("toy-teacher", False, 2, None)
    assert main(["serve", "--memory", "banks=1"]) == 2
    assert "unknown key 'memory.banks'" in capsys.readouterr().err
