"""Masked-dense torch reference for block-sparse attention (differentiable).

Legend: B batch, L query tokens, S key tokens, H heads, D head dim, M/N query/key blocks.

It expands the block lists to a dense ``(B, H, L, S)`` token mask and runs plain softmax attention,
so its cost is the dense cost: it is the ground truth for tests, never a fast path. Rows that see
no key return output 0 and LSE -inf, with finite (zero) gradients -- the kernels do the same.
"""

from __future__ import annotations

import torch

from streamkd.kernels.layout import block_map, num_blocks


def token_mask(
    L: int, S: int, kv_count: torch.Tensor, kv_index: torch.Tensor, block_q: int, block_k: int,
    q_offset: int = 0, causal_chunk: int = 0,
) -> torch.Tensor:
    """Boolean ``(B|1, H|1, L, S)`` mask, True = attend: block map, ragged tails, block-causal rule."""
    bmap = block_map(kv_count, kv_index, num_blocks(S, block_k))
    mask = bmap.repeat_interleave(block_q, -2)[..., :L, :].repeat_interleave(block_k, -1)[..., :S]
    if causal_chunk > 0:
        q_pos = torch.arange(L, device=mask.device) + q_offset
        k_pos = torch.arange(S, device=mask.device)
        mask = mask & (k_pos[None, :] // causal_chunk <= q_pos[:, None] // causal_chunk)
    return mask


def masked_attention(
    q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, mask: torch.Tensor,
    scale: float | None = None, compute_dtype: torch.dtype | None = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under a boolean ``(B|1, H|1, L, S)`` mask; returns ``(out_BLHD, lse_BHL)``.

    ``compute_dtype=float32`` is the reference; ``None`` computes in the inputs' dtype (the
    "low-precision reference" whose error bounds the kernel's: ``err_kernel <= 2 * err_lowprec + atol``).
    """
    dtype = q_BLHD.dtype
    cd = compute_dtype or dtype
    q, k, v = (t.transpose(1, 2).to(cd) for t in (q_BLHD, k_BSHD, v_BSHD))  # (B, H, *, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s_BHLS = (q @ k.transpose(-1, -2)) * scale
    empty_BHL1 = ~mask.any(-1, keepdim=True)
    # masked_fill to -inf, but keep empty rows finite so logsumexp and its gradient stay finite
    s_BHLS = s_BHLS.masked_fill(~mask & ~empty_BHL1, float("-inf"))
    lse_BHL1 = torch.logsumexp(s_BHLS.float(), -1, keepdim=True).to(cd)
    p_BHLS = torch.exp(s_BHLS - lse_BHL1).masked_fill(~mask, 0.0)
    out = (p_BHLS @ v).transpose(1, 2).to(dtype)
    lse = lse_BHL1.squeeze(-1).float().masked_fill(empty_BHL1.squeeze(-1), float("-inf"))
    return out, lse


def block_sparse_reference(
    q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
    kv_count: torch.Tensor, kv_index: torch.Tensor, block_q: int, block_k: int,
    q_offset: int = 0, causal_chunk: int = 0, scale: float | None = None,
    compute_dtype: torch.dtype | None = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block-sparse attention: ``(out_BLHD, lse_BHL)``, output in the inputs' dtype."""
    mask = token_mask(q_BLHD.shape[1], k_BSHD.shape[1], kv_count, kv_index, block_q, block_k, q_offset, causal_chunk)
    return masked_attention(q_BLHD, k_BSHD, v_BSHD, mask, scale, compute_dtype)
