"""The canonical block-sparse layout, as plain tensors, and its checks.

Legend: B batch, H heads, M = ceil(L / block_q) query blocks, N = ceil(S / block_k) key blocks.

    kv_count_BHM   int32 (B|1, H|1, M)      how many kv blocks q-block m reads
    kv_index_BHMK  int32 (B|1, H|1, M, K)   their indices, strictly increasing in [0, N); entries at
                                            positions >= count are padding and never read
    q_count_BHN    int32 (B|1, H|1, N)      the transpose: how many q-blocks read kv-block n
    q_index_BHNK   int32 (B|1, H|1, N, K')  their indices, strictly increasing in [0, M)

A batch or head dim of 1 broadcasts (the kernels read it with stride 0). Both directions must
describe the same block map; the dK/dV pass walks the transposed lists, so no atomics are needed.

``check_layout`` raises ``ValueError`` with what is wrong and how to fix it, before any kernel
launch. Shape, dtype and device checks are host-only; ``check_values=True`` also reads the index
tensors (one device sync) to check counts, ranges, order and that both directions agree.
"""

from __future__ import annotations

import torch

KERNEL_HEAD_DIMS = (32, 64, 128)
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def _check_index_pair(name: str, count: torch.Tensor, index: torch.Tensor, B: int, H: int, rows: int, cols: int,
                      device: torch.device) -> None:
    for what, t in ((f"{name} count", count), (f"{name} index", index)):
        if t.dtype != torch.int32:
            raise ValueError(f"block-sparse layout: {what} must be int32, got {t.dtype}; build layouts with "
                             "streamkd.attention.sparse.BlockSparseLayout.from_block_mask or .to(torch.int32)")
        if t.device != device:
            raise ValueError(f"block-sparse layout: {what} is on {t.device} but q is on {device}; move the layout "
                             "with layout.to(q.device)")
    if count.ndim != 3 or index.ndim != 4:
        raise ValueError(f"block-sparse layout: {name} count must be 3-D and index 4-D, got shapes "
                         f"{tuple(count.shape)} and {tuple(index.shape)}")
    for t in (count, index):
        if t.shape[0] not in (1, B) or t.shape[1] not in (1, H) or t.shape[2] != rows:
            raise ValueError(f"block-sparse layout: {name} tensors must be (1|{B}, 1|{H}, {rows}, ...), got "
                             f"{tuple(t.shape)}; the block sizes or sequence lengths do not match q/k")
    if index.shape[3] > cols:
        raise ValueError(f"block-sparse layout: {name} index lists are {index.shape[3]} long but there are only "
                         f"{cols} blocks to choose from")


def _values_ok(count: torch.Tensor, index: torch.Tensor, cols: int) -> tuple[torch.Tensor, ...]:
    """Per check, a 0-d bool tensor: counts in range, indices in range, strictly increasing."""
    K = index.shape[-1]
    pos = torch.arange(K, device=index.device)
    live = pos < count[..., None].long()
    count_ok = ((count >= 0) & (count <= K)).all()
    range_ok = (~live | ((index >= 0) & (index < cols))).all()
    inc = index[..., 1:] > index[..., :-1]
    order_ok = (~live[..., 1:] | inc).all()
    return count_ok, range_ok, order_ok


def block_map(count: torch.Tensor, index: torch.Tensor, cols: int) -> torch.Tensor:
    """Boolean ``(B|1, H|1, rows, cols)`` block map of one direction (assumes a checked layout)."""
    K = index.shape[-1]
    live = torch.arange(K, device=index.device) < count[..., None].long()
    out = torch.zeros(*index.shape[:-1], cols + 1, dtype=torch.bool, device=index.device)
    out.scatter_(-1, torch.where(live, index.long(), cols), True)
    return out[..., :cols]


def check_layout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_count: torch.Tensor, kv_index: torch.Tensor, q_count: torch.Tensor, q_index: torch.Tensor,
    block_q: int, block_k: int, q_offset: int, causal_chunk: int,
    *, check_values: bool = True, kernel: bool = True,
) -> None:
    """Raise ``ValueError`` on any malformed input. ``kernel=True`` adds the Triton kernel's limits
    (head dim, block sizes, contiguous last dims)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"block-sparse attention takes (B, L, H, D) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, L, H, D = q.shape
    S = k.shape[1]
    if k.shape != (B, S, H, D) or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, S, H, D) = ({B}, S, {H}, {D}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    if q_offset < 0 or (causal_chunk > 0 and q_offset + L > S):
        raise ValueError(f"q_offset={q_offset} with L={L} queries must fit inside the S={S} keys for causal masking")
    if causal_chunk < 0:
        raise ValueError(f"causal_chunk must be >= 0 (0 = no causal mask), got {causal_chunk}")
    if kernel:
        if D not in KERNEL_HEAD_DIMS:
            raise ValueError(f"the Triton block-sparse kernel supports head dims {KERNEL_HEAD_DIMS}, got {D}; "
                             "use the CPU path (backend='torch') or pad the head dim")
        for name, bs in (("block_q", block_q), ("block_k", block_k)):
            if bs not in KERNEL_BLOCK_SIZES:
                raise ValueError(f"the Triton kernel needs {name} in {KERNEL_BLOCK_SIZES}, got {bs}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32, got {q.dtype}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous head dim (stride 1), got strides {t.stride()}")
    M, N = num_blocks(L, block_q), num_blocks(S, block_k)
    _check_index_pair("kv", kv_count, kv_index, B, H, M, N, q.device)
    _check_index_pair("q", q_count, q_index, B, H, N, M, q.device)
    if not check_values:
        return
    checks = (*_values_ok(kv_count, kv_index, N), *_values_ok(q_count, q_index, M))
    ok = torch.stack(list(checks)).tolist()  # one sync for all checks
    names = ("kv counts must lie in [0, index list length]", "kv indices must lie in [0, N)",
             "kv index lists must be strictly increasing (sorted, no duplicates)",
             "q counts must lie in [0, index list length]", "q indices must lie in [0, M)",
             "q index lists must be strictly increasing (sorted, no duplicates)")
    for good, name in zip(ok, names):
        if not good:
            raise ValueError(f"malformed block-sparse layout: {name} (M={M} q-blocks, N={N} kv-blocks); build "
                             "layouts with BlockSparseLayout.from_block_mask")
    fwd_map = block_map(kv_count, kv_index, N)
    bwd_map = block_map(q_count, q_index, M).transpose(-1, -2)
    if not torch.equal(*torch.broadcast_tensors(fwd_map, bwd_map)):
        raise ValueError("malformed block-sparse layout: the transposed (q) lists do not describe the same block "
                         "map as the kv lists; rebuild both with BlockSparseLayout.from_block_mask")
