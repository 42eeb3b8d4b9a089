"""Block-sparse attention on CPU: the fast torch path and the reference against dense SDPA and the
fp32/fp64 masked-dense reference, the mask producers and converters, and every malformed-layout
check. The Triton kernels are tested in ``test_sparse_kernel.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamkd.attention.dispatch import attention
from streamkd.attention.layout import CausalLayout, block_causal_mask
from streamkd.attention.sparse import (
    BlockSparseConfig, BlockSparseLayout, adaptive_layout, random_layout, sparse_attention, sparse_self_attention,
    topk_layout, window_layout,
)
from streamkd.kernels import ops
from streamkd.kernels.reference import block_sparse_reference


def _qkv(B, L, S, H, D, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(B, L, H, D, generator=g) * scale).to(dtype), (torch.randn(B, S, H, D, generator=g) * scale).to(dtype),
            torch.randn(B, S, H, D, generator=g).to(dtype))


def _fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out, q.grad, k.grad, v.grad]


def _dense_sdpa_masked(q, k, v, mask_BHLS):
    """Dense SDPA under a token mask; rows that see nothing give 0 (SDPA alone would give NaN)."""
    row_ok = mask_BHLS.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask_BHLS | ~row_ok)
    return (out * row_ok).transpose(1, 2)


def _dense(q, k, v, mask=None):
    return attention(q, k, v, mask)


def _map_layout(rows, L, S, bq, bk, **kw):
    return BlockSparseLayout.from_block_mask(torch.tensor(rows, dtype=torch.bool)[None, None], L, S, bq, bk, **kw)


FAST_CASES = {
    "empty_rows": (lambda: _map_layout([[1, 0, 1], [0, 0, 0], [0, 1, 0]], 48, 48, 16, 16), 1, 48, 48),
    "single_block": (lambda: _map_layout([[0, 1], [0, 1], [1, 0]], 40, 32, 16, 16), 1, 40, 32),
    "kept_25": (lambda: random_layout(64, 128, 0.25, block_q=16, block_k=16, batch=2, heads=2,
                                      generator=torch.Generator().manual_seed(1)), 2, 64, 128),
    "kept_50_ragged": (lambda: random_layout(70, 90, 0.5, block_q=16, block_k=32, heads=2,
                                             generator=torch.Generator().manual_seed(2)), 1, 70, 90),
    "kept_100": (lambda: random_layout(96, 96, 1.0, block_q=32, block_k=32), 1, 96, 96),
    "q_ne_kv_cached_causal": (lambda: random_layout(40, 104, 0.75, block_q=16, block_k=16, q_offset=64,
                                                    causal_chunk=24, generator=torch.Generator().manual_seed(3)),
                              1, 40, 104),
    "adaptive_block_causal": (lambda: adaptive_layout(*_qkv(1, 96, 96, 2, 16)[:2], tau=0.6, block_q=16, block_k=16,
                                                      causal_chunk=20), 1, 96, 96),
}


@pytest.mark.parametrize("input_scale", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_path_matches_reference(case, input_scale):
    build, B, L, S = FAST_CASES[case]
    layout = build()
    H = layout.kv_count.shape[1] if layout.kv_count.shape[1] > 1 else 2
    q, k, v = _qkv(B, L, S, H, 16, scale=input_scale)
    dout = torch.randn(B, L, H, 16, generator=torch.Generator().manual_seed(9))
    got = _fwd_bwd(lambda a, b, c: sparse_attention(a, b, c, layout, backend="torch"), q, k, v, dout)
    truth = _fwd_bwd(lambda a, b, c: block_sparse_reference(
        a, b, c, layout.kv_count, layout.kv_index, layout.block_q, layout.block_k, layout.q_offset,
        layout.causal_chunk, compute_dtype=torch.float64)[0], q, k, v, dout)
    low = _fwd_bwd(lambda a, b, c: sparse_attention(a, b, c, layout, backend="reference"), q, k, v, dout)
    # The fast path runs CPU SDPA on the gathered blocks; CPU SDPA's fused kernel uses a fast
    # approximate exp and the flash-style backward, so its own dense error is the fair low-precision
    # reference too (at input scale 16 it exceeds the fp32 reference's by orders of magnitude).
    sdpa = _fwd_bwd(lambda a, b, c: _dense_sdpa_masked(a, b, c, layout.token_mask()), q, k, v, dout)
    for name, x, t, lo, sd in zip(("out", "dq", "dk", "dv"), got, truth, low, sdpa):
        err = (x.double() - t.double()).abs().max().item()
        err_low = max((lo.double() - t.double()).abs().max().item(), (sd.double() - t.double()).abs().max().item())
        assert err <= 2 * err_low + 1e-5 * max(1.0, t.abs().max().item()), (name, err, err_low)
    empty = ~layout.token_mask().expand(B, H, L, S).any(-1)
    assert (got[0].transpose(1, 2)[empty] == 0).all() and (got[1].transpose(1, 2)[empty] == 0).all()


def test_all_kept_equals_dense_sdpa_bidirectional_and_cached():
    q, k, v = _qkv(2, 100, 100, 2, 16)
    full = random_layout(100, 100, 1.0, block_q=32, block_k=16)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(sparse_attention(q, k, v, full, backend), _dense(q, k, v), atol=1e-5, rtol=1e-5)
    # cached streaming: a 30-token chunk against 70 cached keys plus itself, q_offset = S - L
    qc = q[:, 70:]
    cached = BlockSparseConfig(mode="adaptive", tau=1.0, block_q=16, block_k=16)
    torch.testing.assert_close(sparse_self_attention(qc, k, v, cached), _dense(qc, k, v), atol=1e-5, rtol=1e-5)


def test_all_kept_block_causal_equals_dense_block_causal_mask():
    """The student's full-sequence mode: chunks of 2 frames x 24 tokens, blocks not chunk-aligned."""
    T, frames, chunk = 24, 6, 2
    L = T * frames
    q, k, v = _qkv(1, L, L, 2, 16)
    mask = block_causal_mask(frames, T, CausalLayout(chunk_frames=chunk))
    cfg = BlockSparseConfig(mode="window", window_blocks=100, block_q=32, block_k=32)
    out = sparse_self_attention(q, k, v, cfg, q_offset=0, causal_chunk=T * chunk)
    torch.testing.assert_close(out, _dense(q, k, v, mask), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- producers
def test_adaptive_keeps_diagonal_and_sinks_and_grows_with_tau():
    q, k, _ = _qkv(1, 128, 128, 2, 16, scale=2.0)
    maps = [adaptive_layout(q, k, tau=t, block_q=16, block_k=16, sink_blocks=1).to_block_mask() for t in (0.3, 0.6, 0.95)]
    eye = torch.eye(8, dtype=torch.bool)
    for m in maps:
        assert m[..., eye].all() and m[..., :, 0].all()
    assert (maps[0] <= maps[1]).all() and (maps[1] <= maps[2]).all() and maps[0].sum() < maps[2].sum()
    assert adaptive_layout(q, k, tau=1.0, block_q=16, block_k=16).density() == 1.0


def test_adaptive_finds_the_block_that_holds_the_mass():
    """Keys of block 5 point where the queries point: at small tau that block (plus the forced
    diagonal and sink) is all that is kept."""
    q, k, _ = _qkv(1, 64, 128, 1, 16)
    q[..., 0] += 6.0
    k[:, 80:96, :, 0] += 6.0
    lay = adaptive_layout(q, k, tau=0.5, block_q=16, block_k=16, sink_blocks=1)
    m = lay.to_block_mask()[0, 0]
    assert m[:, 5].all()
    expected = torch.zeros_like(m)
    expected[:, 0] = expected[:, 5] = True
    expected[torch.arange(4), torch.arange(4)] = True
    assert torch.equal(m, expected)


def test_topk_and_window_layouts():
    q, k, _ = _qkv(2, 128, 128, 2, 16)
    lay = topk_layout(q, k, topk=3, block_q=16, block_k=16, sink_blocks=1)
    assert (lay.kv_count == 3).all()
    m = lay.to_block_mask()
    assert m[..., torch.eye(8, dtype=torch.bool)].all() and m[..., 0].all()
    causal = topk_layout(q, k, topk=3, block_q=16, block_k=16, causal_chunk=16).to_block_mask()
    assert not causal[..., torch.triu(torch.ones(8, 8, dtype=torch.bool), 1)].any()
    w = window_layout(64, 96, window_blocks=1, block_q=16, block_k=16, sink_blocks=1, q_offset=32).to_block_mask()
    # q-block i sits on kv block i + 2; window of 1 each side, plus sink block 0
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 1], [1, 0, 0, 0, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(w[0, 0], expected)


def test_sparsity_layout_keeps_the_fraction_of_admissible_blocks():
    q, k, _ = _qkv(2, 128, 128, 2, 16)
    for sparsity, kept in ((0.0, 8), (0.5, 4), (0.75, 2), (0.9, 1)):
        lay = topk_layout(q, k, sparsity=sparsity, block_q=16, block_k=16, sink_blocks=0)
        assert (lay.kv_count == kept).all(), sparsity
    # block-causal: q-block i has i + 1 admissible blocks, keeps ceil((1 - s)(i + 1)) of them
    causal = topk_layout(q, k, sparsity=0.5, block_q=16, block_k=16, sink_blocks=0, causal_chunk=16)
    assert causal.kv_count[0, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    # the same ratio through the model-facing config, and the same blocks as the equivalent topk
    cfg = BlockSparseConfig(mode="sparsity", sparsity=0.75, block_q=16, block_k=16, sink_blocks=1)
    assert torch.equal(cfg.layout_for(q, k).to_block_mask(),
                       topk_layout(q, k, topk=2, block_q=16, block_k=16, sink_blocks=1).to_block_mask())
    with pytest.raises(ValueError, match="exactly one of topk"):
        topk_layout(q, k, topk=2, sparsity=0.5)
    with pytest.raises(ValueError, match="fraction of blocks dropped"):
        BlockSparseConfig(mode="sparsity", sparsity=1.0)


def test_block_mask_and_flex_round_trip():
    lay = random_layout(80, 112, 0.4, block_q=16, block_k=16, batch=2, heads=2, causal_chunk=0,
                        generator=torch.Generator().manual_seed(5))
    m = lay.to_block_mask()
    back = BlockSparseLayout.from_block_mask(m, 80, 112, 16, 16)
    assert torch.equal(back.kv_index, lay.kv_index) and torch.equal(back.q_index, lay.q_index)
    flex = lay.to_flex_block_mask()
    again = BlockSparseLayout.from_flex_block_mask(flex)
    assert torch.equal(again.to_block_mask(), m)
    # and flex_attention (eager, CPU) under that BlockMask equals our reference
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _qkv(2, 80, 112, 2, 16)
    lay_c = random_layout(80, 112, 0.5, block_q=16, block_k=16, batch=2, heads=2, q_offset=32, causal_chunk=24,
                          generator=torch.Generator().manual_seed(6))
    out = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=lay_c.to_flex_block_mask()).transpose(1, 2)
    torch.testing.assert_close(out, sparse_attention(q, k, v, lay_c, "reference"), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- bad input
def _good():
    q, k, v = _qkv(1, 64, 64, 1, 32)
    return q, k, v, random_layout(64, 64, 0.5, block_q=16, block_k=16, generator=torch.Generator().manual_seed(0))


def _with(lay, **tensors):
    kw = dict(kv_count=lay.kv_count, kv_index=lay.kv_index, q_count=lay.q_count, q_index=lay.q_index)
    kw.update(tensors)
    return BlockSparseLayout(**kw, q_len=lay.q_len, kv_len=lay.kv_len, block_q=lay.block_q, block_k=lay.block_k)


def _bad_layouts():
    q, k, v, lay = _good()
    idx = lay.kv_index.clone()
    out_of_range = idx.clone()
    out_of_range[0, 0, 0, 0] = 4
    unsorted = idx.clone()
    unsorted[0, 0, 0, :2] = idx[0, 0, 0, :2].flip(0)
    duplicate = idx.clone()
    duplicate[0, 0, 0, 1] = duplicate[0, 0, 0, 0]
    too_many = lay.kv_count.clone()
    too_many[0, 0, 0] = idx.shape[-1] + 1
    negative = lay.kv_count.clone()
    negative[0, 0, 1] = -1
    mismatched = lay.q_count.clone()
    mismatched[0, 0, 0] -= 1
    return {
        "index out of range": (_with(lay, kv_index=out_of_range), "kv indices must lie in"),
        "unsorted": (_with(lay, kv_index=unsorted), "strictly increasing"),
        "duplicate": (_with(lay, kv_index=duplicate), "strictly increasing"),
        "count larger than list": (_with(lay, kv_count=too_many), "kv counts must lie in"),
        "negative count": (_with(lay, kv_count=negative), "kv counts must lie in"),
        "transpose disagrees": (_with(lay, q_count=mismatched), "transposed"),
        "wrong dtype": (_with(lay, kv_index=idx.long()), "must be int32"),
        "wrong device": (_with(lay, kv_count=lay.kv_count.to("meta")), "is on meta"),
        "wrong block count": (_with(lay, kv_count=lay.kv_count[..., :3].contiguous(),
                                    kv_index=idx[..., :3, :].contiguous()), "block sizes or sequence lengths"),
    }


@pytest.mark.parametrize("case", list(_bad_layouts()))
def test_malformed_layout_raises_before_any_launch(case, monkeypatch):
    bad, message = _bad_layouts()[case]
    q, k, v, _ = _good()
    # the Triton op must reject it before it ever reaches the kernels
    monkeypatch.setattr(ops, "_kernels", lambda: pytest.fail("kernel reached with a malformed layout"))
    with pytest.raises(ValueError, match=message):
        ops.block_sparse_attn(q, k, v, bad.kv_count, bad.kv_index, bad.q_count, bad.q_index, 16, 16, 0, 0, 1.0, True)
    with pytest.raises(ValueError, match=message):
        sparse_attention(q, k, v, bad, backend="torch")


def test_unsupported_head_dim_and_block_size_raise_for_the_kernel(monkeypatch):
    monkeypatch.setattr(ops, "_kernels", lambda: pytest.fail("kernel reached with bad input"))
    q, k, v = _qkv(1, 64, 64, 1, 48)
    lay = random_layout(64, 64, 0.5, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="head dims"):
        sparse_attention(q, k, v, lay, backend="triton")
    q, k, v = _qkv(1, 64, 64, 1, 32)
    lay = random_layout(64, 64, 0.5, block_q=24, block_k=16)
    with pytest.raises(ValueError, match="block_q"):
        sparse_attention(q, k, v, lay, backend="triton")
    # the CPU path takes any head dim
    q, k, v = _qkv(1, 64, 64, 1, 48)
    torch.testing.assert_close(sparse_attention(q, k, v, random_layout(64, 64, 1.0, block_q=16, block_k=16)),
                               F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2),
                               atol=1e-5, rtol=1e-5)


def test_wan_shaped_dit_benchmark(tmp_path) -> None:
    """bench_dit builds Wan2.1-1.3B's shape through the diffusers-config converter and times dense
    vs sparse steps on one set of weights (a tiny latent here; the figures are in docs)."""
    from streamkd.kernels import bench_dit

    cfg = bench_dit.wan_1_3b_config(30)
    assert (cfg.num_heads * cfg.head_dim, cfg.ffn_dim, cfg.num_layers, cfg.text_dim) == (1536, 8960, 30, 4096)
    rows = bench_dit.main(["--layers", "1", "--frames", "2", "--latent", "8", "8", "--prompt-tokens", "8", "--sparsity", "0.5",
                           "--block", "16", "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "dit.json")])
    assert len(rows) == 1 and rows[0]["L"] == 32 and rows[0]["dense_ms"] > 0 and rows[0]["sparse_ms"] > 0
