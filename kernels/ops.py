"""Block-sparse attention as registered torch ops: ``streamkd::block_sparse_attn`` (forward, returns
``(out, lse)``) and ``streamkd::block_sparse_attn_bwd``, with fake (meta) and autograd registrations.

Scope and limits (opt-in: nothing in streamkd calls these unless block-sparse attention is
configured, see ``streamkd.attention.sparse``):
    * Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
      ``streamkd.kernels.triton_block_sparse`` was first imported (tests do this on CPU machines);
    * head dims 32 / 64 / 128; block sizes 16 / 32 / 64 / 128 (64 default); fp16, bf16, fp32
      (fp32 dots use IEEE precision, meant for tests);
    * ``q_len != kv_len`` with ``q_offset`` (query ``l`` sits at key position ``q_offset + l``) and a
      block-causal mode over chunks of ``causal_chunk`` tokens;
    * gradients for q, k, v, and the LSE's gradient is honoured.
Malformed layouts raise ``ValueError`` before any launch (``streamkd.kernels.layout.check_layout``);
index values are read (one sync) when ``check_values`` is True.
"""

from __future__ import annotations

import torch

from streamkd.kernels.layout import check_layout


def _kernels():
    try:
        from streamkd.kernels import triton_block_sparse
    except ImportError as e:  # triton is an optional dependency
        raise RuntimeError("block-sparse Triton kernels need triton: pip install 'streamkd[kernels]'") from e
    return triton_block_sparse


def _check_device(q: torch.Tensor) -> None:
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and _kernels().INTERPRET:
        return
    raise RuntimeError(
        f"the Triton block-sparse kernel runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got "
        f"{q.device}; on CPU use streamkd.attention.sparse.sparse_attention(..., backend='torch')"
    )


@torch.library.custom_op("streamkd::block_sparse_attn", mutates_args=())
def block_sparse_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_count: torch.Tensor, kv_index: torch.Tensor, q_count: torch.Tensor, q_index: torch.Tensor,
    block_q: int, block_k: int, q_offset: int, causal_chunk: int, scale: float, check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out_BLHD, lse_BHL)``: q ``(B, L, H, D)``, k/v ``(B, S, H, D)``; layout as in ``kernels.layout``."""
    check_layout(q, k, v, kv_count, kv_index, q_count, q_index, block_q, block_k, q_offset, causal_chunk,
                 check_values=check_values)
    _check_device(q)
    return _kernels().forward(q, k, v, kv_count, kv_index, block_q, block_k, q_offset, causal_chunk, scale)


@block_sparse_attn.register_fake
def _(q, k, v, kv_count, kv_index, q_count, q_index, block_q, block_k, q_offset, causal_chunk, scale, check_values):
    # host-level checks (shapes, dtypes, devices) also hold under tracing; values cannot be read here
    check_layout(q, k, v, kv_count, kv_index, q_count, q_index, block_q, block_k, q_offset, causal_chunk,
                 check_values=False)
    B, L, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("streamkd::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(
    dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    kv_count: torch.Tensor, kv_index: torch.Tensor, q_count: torch.Tensor, q_index: torch.Tensor,
    block_q: int, block_k: int, q_offset: int, causal_chunk: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` for ``block_sparse_attn``; the layout was checked by the forward."""
    _check_device(q)
    return _kernels().backward(dout, q, k, v, out, lse, dlse, kv_count, kv_index, q_count, q_index,
                               block_q, block_k, q_offset, causal_chunk, scale)


@block_sparse_attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, kv_count, kv_index, q_count, q_index, block_q, block_k, q_offset,
      causal_chunk, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_count, kv_index, q_count, q_index, block_q, block_k, q_offset, causal_chunk, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_count, kv_index, q_count, q_index)
    ctx.args = (block_q, block_k, q_offset, causal_chunk, scale)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_count, kv_index, q_count, q_index = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = block_sparse_attn_bwd(dout, dlse, q, k, v, out, lse, kv_count, kv_index, q_count, q_index, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


block_sparse_attn.register_autograd(_backward, setup_context=_setup_context)
