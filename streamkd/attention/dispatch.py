"""One entry point for every attention call in streamkd.

Layout legend (used in every tensor name of this package):
    B batch, L query tokens, S key tokens, H heads, D head dim.

Backends:
    * ``sdpa``  -- ``torch.nn.functional.scaled_dot_product_attention``. On CPU this is also the
      training path for masked (block-causal) attention, because flex_attention has no CPU backward.
    * ``flash`` -- ``flash_attn.flash_attn_func`` when it is importable, the tensors are on CUDA in
      fp16/bf16 and no mask is needed (cached streaming and bidirectional attention need none).

``backend="auto"`` takes flash when it applies and SDPA otherwise. Asking for ``flash`` where it
cannot run raises instead of silently falling back.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "sdpa", "flash"]


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_func


def _flash_applies(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return (
        mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and _flash_attn_func() is not None
    )


def attention(
    q_BLHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    mask_LS: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Softmax attention over ``(B, L, H, D)`` tensors; ``mask_LS`` is boolean, True = attend.

    Returns ``(B, L, H, D)``.
    """
    if backend == "flash" and not _flash_applies(q_BLHD, mask_LS):
        raise RuntimeError(
            "attention backend 'flash' needs flash-attn installed, CUDA fp16/bf16 tensors and no mask; "
            "use backend='auto' or 'sdpa'"
        )
    if backend in ("auto", "flash") and _flash_applies(q_BLHD, mask_LS):
        return _flash_attn_func()(q_BLHD, k_BSHD, v_BSHD)
    out_BHLD = F.scaled_dot_product_attention(
        q_BLHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), attn_mask=mask_LS
    )
    return out_BHLD.transpose(1, 2)
