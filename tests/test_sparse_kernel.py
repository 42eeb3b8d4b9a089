"""Triton block-sparse attention kernels (``streamkd.kernels``) against the masked-dense reference.

On a CPU machine the kernels run under ``TRITON_INTERPRET=1`` at small sizes (set here, before the
kernel module is imported); with a GPU they are compiled and the ``gpu`` tests also run at
realistic sizes in bf16. Error bound (flash-attention's test rule): the kernel's error against a
high-precision reference is at most twice the error of the same reference computed in the input
precision, plus ``atol``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from streamkd.attention.sparse import BlockSparseLayout, random_layout  # noqa: E402
from streamkd.kernels import ops  # noqa: E402
from streamkd.kernels.reference import block_sparse_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


def _run(layout: BlockSparseLayout, q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ops.block_sparse_attn(q, k, v, layout.kv_count, layout.kv_index, layout.q_count, layout.q_index,
                                 layout.block_q, layout.block_k, layout.q_offset, layout.causal_chunk, scale, True)


def _ref(layout, q, k, v, compute_dtype):
    return block_sparse_reference(q, k, v, layout.kv_count, layout.kv_index, layout.block_q, layout.block_k,
                                  layout.q_offset, layout.causal_chunk, compute_dtype=compute_dtype)


def _fwd_bwd(fn, q, k, v, dout, dlse):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    # the LSE's gradient is part of the op's contract (used by e.g. ring/merged attention)
    torch.autograd.backward([out, torch.where(lse.isfinite(), lse, 0.0)], [dout, dlse])
    return [out, torch.where(lse.isfinite(), lse, -1e4)] + [t.grad for t in (q, k, v)]


def check_against_reference(layout, B, L, S, H, D, dtype, input_scale=1.0, seed=0, atol=None):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, L, H, D, generator=g) * input_scale).to(DEVICE, dtype)
    k = (torch.randn(B, S, H, D, generator=g) * input_scale).to(DEVICE, dtype)
    v = torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype)
    dout = torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype)
    dlse = torch.randn(B, H, L, generator=g).to(DEVICE)
    layout = layout.to(DEVICE)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    got = _fwd_bwd(lambda a, b, c: _run(layout, a, b, c), q, k, v, dout, dlse)
    truth = _fwd_bwd(lambda a, b, c: _ref(layout, a, b, c, hi), q, k, v, dout, dlse)
    low = _fwd_bwd(lambda a, b, c: _ref(layout, a, b, c, None), q, k, v, dout, dlse)
    atol = atol if atol is not None else (1e-5 if dtype == torch.float32 else 2e-3)
    for name, x, t, lo in zip(("out", "lse", "dq", "dk", "dv"), got, truth, low):
        err = (x.double() - t.double()).abs().max().item()
        err_low = (lo.double() - t.double()).abs().max().item()
        assert err <= 2 * err_low + atol * max(1.0, t.abs().max().item()), (name, err, err_low)
    # rows that see nothing: output 0 and LSE -inf, exactly
    out, lse = _run(layout, q, k, v)
    empty = ~layout.token_mask().expand(B, H, L, S).any(-1)  # (B, H, L)
    assert torch.equal(lse.isneginf(), empty)
    assert (out.transpose(1, 2)[empty] == 0).all()


def _map_layout(keep_MN, L, S, bq, bk, q_offset=0, causal_chunk=0):
    return BlockSparseLayout.from_block_mask(keep_MN[None, None], L, S, bq, bk, q_offset, causal_chunk)


CASES = {
    # name: (layout builder, B, L, S, H, D)
    "empty_rows": (lambda: _map_layout(torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool),
                                       48, 48, 16, 16), 1, 48, 48, 2, 32),
    "single_block": (lambda: _map_layout(torch.eye(4, dtype=torch.bool).flip(0), 64, 64, 16, 16), 1, 64, 64, 1, 32),
    "kept_25": (lambda: random_layout(64, 128, 0.25, block_q=16, block_k=16, batch=2, heads=2,
                                      generator=torch.Generator().manual_seed(1)), 2, 64, 128, 2, 32),
    "kept_50_ragged": (lambda: random_layout(70, 90, 0.5, block_q=16, block_k=32, heads=2,
                                             generator=torch.Generator().manual_seed(2)), 1, 70, 90, 2, 32),
    "kept_100_block64": (lambda: random_layout(96, 96, 1.0, block_q=64, block_k=64), 1, 96, 96, 1, 64),
    "q_ne_kv_cached_causal": (lambda: random_layout(40, 104, 0.75, block_q=16, block_k=16, q_offset=64,
                                                    causal_chunk=24, generator=torch.Generator().manual_seed(3)),
                              1, 40, 104, 1, 32),
    "block_causal_d128": (lambda: random_layout(64, 64, 1.0, block_q=16, block_k=32, causal_chunk=20), 1, 64, 64,
                          1, 128),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_fp32(case):
    build, B, L, S, H, D = CASES[case]
    check_against_reference(build(), B, L, S, H, D, torch.float32)


@pytest.mark.parametrize("input_scale", [1.0, 4.0, 16.0])
def test_kernel_input_scales(input_scale):
    layout = random_layout(48, 64, 0.5, block_q=16, block_k=16, generator=torch.Generator().manual_seed(4))
    # At scale 16 rows are near one-hot: the flash-style backward takes delta = rowsum(dO * O), so
    # the forward's last-ulp rounding of O is amplified by 1 / p of the runner-up key (~1e5 here),
    # while the fp32 reference differentiates the softmax directly. Measured: 5e-5 of max |dq|.
    atol = 1e-4 if input_scale > 4 else None
    check_against_reference(layout, 1, 48, 64, 1, 32, torch.float32, input_scale=input_scale, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_low_precision(dtype):
    layout = random_layout(64, 80, 0.5, block_q=16, block_k=16, causal_chunk=16,
                           generator=torch.Generator().manual_seed(5))
    check_against_reference(layout, 1, 64, 80, 2, 32, dtype)


def test_all_kept_equals_dense_sdpa():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 80, 2, 32, generator=g).to(DEVICE) for _ in range(3))
    layout = random_layout(80, 80, 1.0, block_q=32, block_k=16).to(DEVICE)
    out, _ = _run(layout, q, k, v)
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_opcheck():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 32, 1, 32, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    lay = random_layout(32, 32, 0.5, block_q=16, block_k=16, causal_chunk=16).to(DEVICE)
    args = (q, k, v, lay.kv_count, lay.kv_index, lay.q_count, lay.q_index, 16, 16, 0, 16, 32**-0.5, False)
    torch.library.opcheck(ops.block_sparse_attn, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("D", [64, 128])
def test_compiled_kernel_bf16_realistic(D):
    layout = random_layout(1000, 1500, 0.3, block_q=64, block_k=64, batch=2, heads=4, q_offset=500,
                           causal_chunk=250, generator=torch.Generator().manual_seed(8))
    check_against_reference(layout, 2, 1000, 1500, 4, D, torch.bfloat16)


def test_gpu_benchmark_script_runs(tmp_path) -> None:
    """The GPU benchmark's code paths (kernel fwd and fwd+bwd beside dense SDPA), at a tiny size;
    interpreted on a CPU machine, where its timings mean nothing."""
    import json

    from streamkd.kernels import bench_gpu

    extra = [] if DEVICE == "cuda" else ["--no-flex"]
    out = tmp_path / "gpu.json"
    rows = bench_gpu.main(["--device", DEVICE, "--lengths", "128", "--head-dims", "32", "--width", "64", "--block", "32",
                           "--sparsity", "0", "0.5", "--repeats", "1", "--json", str(out), *extra])
    assert [(r["pass_"], r["sparsity"]) for r in rows] == [("fwd", 0.0), ("fwd", 0.5), ("fwd+bwd", 0.0), ("fwd+bwd", 0.5)]
    assert all(r["triton_ms"] > 0 and r["sdpa_ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
