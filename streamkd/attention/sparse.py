"""Block-sparse attention: the layout object, mask producers, the CPU fast path, and the dispatch entry.

Legend: B batch, L query tokens, S key tokens, H heads, D head dim, M = ceil(L / block_q) query
blocks, N = ceil(S / block_k) key blocks, K index-list length.

**Layout.** ``BlockSparseLayout`` is the one canonical form every producer emits and every backend
reads: per (batch, head, q-block) a count and a sorted int32 list of kv-block indices, plus the
transposed lists (per kv-block, the q-blocks reading it) for the kernel's dK/dV pass. Batch and head
dims may be 1 (broadcast). Token-level rules ride along: ragged tails are masked, ``q_offset`` puts
query ``l`` at key position ``q_offset + l`` (cached streaming: ``q_offset = S - L``), and
``causal_chunk > 0`` is the block-causal rule ``s // C <= (q_offset + l) // C`` over chunks of
``C = causal_chunk`` tokens (the student's ``chunk_frames * tokens_per_frame``).

**Producers** (all return a ``BlockSparseLayout``): ``adaptive_layout`` (pooled Q/K block scores,
keep blocks in score order until the cumulative block attention mass reaches ``tau``; the diagonal
and sink blocks are always kept), ``topk_layout``, ``window_layout`` (static sliding window + sinks);
converters ``from_block_mask`` / ``to_block_mask`` and ``from_flex_block_mask`` /
``to_flex_block_mask`` (``torch.nn.attention.flex_attention.BlockMask``).

**Backends** of ``sparse_attention``:
    * ``triton`` -- ``streamkd.kernels.ops.block_sparse_attn`` (CUDA; head dims 32/64/128);
    * ``torch``  -- the CPU fast path: for every q-block gather its kept kv blocks and run SDPA on
      them, so the work is proportional to the kept blocks (see ``docs/sparse_attention.md``);
    * ``reference`` -- the fp32 masked-dense reference (tests, debugging).
``auto`` takes ``triton`` for CUDA tensors when triton is installed and ``torch`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from streamkd.kernels.layout import block_map, check_layout, num_blocks
from streamkd.kernels.reference import block_sparse_reference, token_mask

SparseBackend = Literal["auto", "triton", "torch", "reference"]


# --------------------------------------------------------------------------------------------- layout
def _lists_from_map(map_BHRC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and sorted int32 index lists (padded with 0, trimmed to the longest list)."""
    cols = map_BHRC.shape[-1]
    count = map_BHRC.sum(-1, dtype=torch.int32)
    width = max(int(count.max()) if count.numel() else 0, 1)
    ar = torch.arange(cols, device=map_BHRC.device, dtype=torch.int32)
    index = torch.sort(torch.where(map_BHRC, ar, cols), -1).values[..., :width]
    index = torch.where(index == cols, 0, index).to(torch.int32).contiguous()
    return count.contiguous(), index


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Which kv blocks every q-block attends to; see the module docstring for the tensor forms."""

    kv_count: torch.Tensor  # (B|1, H|1, M) int32
    kv_index: torch.Tensor  # (B|1, H|1, M, K) int32, sorted
    q_count: torch.Tensor  # (B|1, H|1, N) int32
    q_index: torch.Tensor  # (B|1, H|1, N, K') int32, sorted
    q_len: int
    kv_len: int
    block_q: int = 64
    block_k: int = 64
    q_offset: int = 0
    causal_chunk: int = 0
    validated: bool = field(default=False, compare=False)

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.kv_len, self.block_k)

    @classmethod
    def from_block_mask(
        cls, mask_BHMN: torch.Tensor, q_len: int, kv_len: int, block_q: int = 64, block_k: int = 64,
        q_offset: int = 0, causal_chunk: int = 0,
    ) -> BlockSparseLayout:
        """From a boolean ``(B|1, H|1, M, N)`` block map (True = keep the block)."""
        M, N = num_blocks(q_len, block_q), num_blocks(kv_len, block_k)
        if mask_BHMN.dtype != torch.bool or mask_BHMN.ndim != 4 or tuple(mask_BHMN.shape[2:]) != (M, N):
            raise ValueError(f"block map must be a bool (B, H, {M}, {N}) tensor for q_len={q_len}, kv_len={kv_len}, "
                             f"blocks ({block_q}, {block_k}); got {mask_BHMN.dtype} {tuple(mask_BHMN.shape)}")
        kv_count, kv_index = _lists_from_map(mask_BHMN)
        q_count, q_index = _lists_from_map(mask_BHMN.transpose(-1, -2))
        return cls(kv_count, kv_index, q_count, q_index, q_len, kv_len, block_q, block_k, q_offset, causal_chunk,
                   validated=True)  # correct by construction

    def to_block_mask(self) -> torch.Tensor:
        """Boolean ``(B|1, H|1, M, N)`` block map."""
        return block_map(self.kv_count, self.kv_index, self.num_kv_blocks)

    def token_mask(self) -> torch.Tensor:
        """Boolean ``(B|1, H|1, L, S)`` token mask (block map, ragged tails, causal rule)."""
        return token_mask(self.q_len, self.kv_len, self.kv_count, self.kv_index, self.block_q, self.block_k,
                          self.q_offset, self.causal_chunk)

    def density(self) -> float:
        """Kept fraction of the ``M * N`` block pairs, averaged over batch and heads."""
        return float(self.kv_count.sum()) / (self.kv_count.numel() * self.num_kv_blocks)

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def to(self, device: torch.device | str) -> BlockSparseLayout:
        t = [x.to(device) for x in (self.kv_count, self.kv_index, self.q_count, self.q_index)]
        return BlockSparseLayout(*t, self.q_len, self.kv_len, self.block_q, self.block_k, self.q_offset,
                                 self.causal_chunk, validated=self.validated)

    def check(self, q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, kernel: bool = False) -> None:
        """Raise ``ValueError`` if this layout does not fit q/k/v or is malformed (values are read once
        per layout object)."""
        if q_BLHD.ndim == 4 and k_BSHD.ndim == 4 and (q_BLHD.shape[1], k_BSHD.shape[1]) != (self.q_len, self.kv_len):
            raise ValueError(f"layout is for q_len={self.q_len}, kv_len={self.kv_len} but got L={q_BLHD.shape[1]}, "
                             f"S={k_BSHD.shape[1]}")
        check_layout(q_BLHD, k_BSHD, v_BSHD, self.kv_count, self.kv_index, self.q_count, self.q_index,
                     self.block_q, self.block_k, self.q_offset, self.causal_chunk,
                     check_values=not self.validated, kernel=kernel)
        object.__setattr__(self, "validated", True)

    # ---- flex_attention interop
    def flex_kv_lists(self, batch: int | None = None, heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_count (B, H, M), kv_index (B, H, M, N))`` as flex_attention's ``BlockMask`` takes
        them: explicit batch/head sizes (flex needs them when this layout broadcasts), every list
        padded to all ``N`` kv blocks."""
        B = batch or self.kv_count.shape[0]
        H = heads or self.kv_count.shape[1]
        M, N = self.num_q_blocks, self.num_kv_blocks
        kv_count = self.kv_count.expand(B, H, M).contiguous()
        kv_index = torch.zeros(B, H, M, N, dtype=torch.int32, device=self.kv_index.device)
        kv_index[..., : self.kv_index.shape[-1]] = self.kv_index
        return kv_count, kv_index

    def to_flex_block_mask(self, batch: int | None = None, heads: int | None = None):
        """A ``flex_attention`` ``BlockMask`` with the same blocks; ragged tails and the causal rule
        become its ``mask_mod``."""
        from torch.nn.attention.flex_attention import BlockMask

        kv_count, kv_index = self.flex_kv_lists(batch, heads)
        B, H, M, N = kv_index.shape
        L, S, off, C = self.q_len, self.kv_len, self.q_offset, self.causal_chunk
        bq, bk = self.block_q, self.block_k
        bmap = self.to_block_mask().expand(B, H, M, N)

        # the block map is in the mask_mod too: eager flex_attention applies only the mask_mod
        def mask_mod(b, h, q_idx, kv_idx):
            keep = (q_idx < L) & (kv_idx < S) & bmap[b, h, (q_idx // bq).clamp(max=M - 1), (kv_idx // bk).clamp(max=N - 1)]
            if C > 0:
                keep = keep & (kv_idx // C <= (q_idx + off) // C)
            return keep

        return BlockMask.from_kv_blocks(kv_count, kv_index, BLOCK_SIZE=(self.block_q, self.block_k),
                                        mask_mod=mask_mod, seq_lengths=(L, S))

    @classmethod
    def from_flex_block_mask(cls, block_mask, q_offset: int = 0, causal_chunk: int = 0) -> BlockSparseLayout:
        """Partial and full blocks of a ``BlockMask`` both become kept blocks; its ``mask_mod`` is not
        carried over (pass the causal rule as ``q_offset`` / ``causal_chunk``)."""
        L, S = block_mask.seq_lengths
        bq, bk = block_mask.BLOCK_SIZE
        dense = block_mask.to_dense()[..., : num_blocks(L, bq), : num_blocks(S, bk)] > 0
        return cls.from_block_mask(dense, L, S, bq, bk, q_offset, causal_chunk)


# ------------------------------------------------------------------------------------------ producers
def _geometry(q_len: int, kv_len: int, block_q: int, block_k: int, q_offset: int, causal_chunk: int,
              sink_blocks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(admissible_MN, forced_MN)``: blocks holding at least one visible token pair, and the blocks
    every producer keeps (the diagonal -- kv blocks at the q-block's own positions -- and sinks)."""
    M, N = num_blocks(q_len, block_q), num_blocks(kv_len, block_k)
    i = torch.arange(M, device=device)
    j = torch.arange(N, device=device)
    q_first = q_offset + i * block_q
    q_last = q_offset + torch.clamp((i + 1) * block_q, max=q_len) - 1
    if causal_chunk > 0:
        admissible = (j[None, :] * block_k) // causal_chunk <= q_last[:, None] // causal_chunk
    else:
        admissible = torch.ones(M, N, dtype=torch.bool, device=device)
    diag = (j[None, :] >= q_first[:, None] // block_k) & (j[None, :] <= q_last[:, None] // block_k)
    forced = (diag | (j[None, :] < sink_blocks)) & admissible
    return admissible, forced


def _pool(x_BLHD: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of tokens (ragged last block: mean over the tokens it has) -> (B, H, n, D)."""
    B, L, H, D = x_BLHD.shape
    n = num_blocks(L, block)
    x = F.pad(x_BLHD.float(), (0, 0, 0, 0, 0, n * block - L)).view(B, n, block, H, D).sum(2)
    sizes = torch.clamp(L - torch.arange(n, device=x.device) * block, max=block).float()
    return (x / sizes[None, :, None, None]).transpose(1, 2)


def _block_scores(q_BLHD, k_BSHD, block_q, block_k, admissible_MN) -> torch.Tensor:
    """Estimated attention mass of every block pair, ``(B, H, M, N)``, rows summing to 1 over the
    admissible blocks: softmax of pooled-q . pooled-k, plus log(block size) so a block's mass counts
    all its keys (SpargeAttn / VSA-style coarse stage)."""
    pq, pk = _pool(q_BLHD, block_q), _pool(k_BSHD, block_k)
    S = k_BSHD.shape[1]
    sizes = torch.clamp(S - torch.arange(pk.shape[2], device=pk.device) * block_k, max=block_k).float()
    logits = (pq @ pk.transpose(-1, -2)) * q_BLHD.shape[-1] ** -0.5 + sizes.log()
    logits = logits.masked_fill(~admissible_MN, float("-inf"))
    # a q-block with no admissible block (softmax of all -inf) scores zero everywhere
    return torch.where(admissible_MN.any(-1, keepdim=True), torch.softmax(logits, -1), 0.0)


def adaptive_layout(
    q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, *, tau: float = 0.9, block_q: int = 64, block_k: int = 64,
    sink_blocks: int = 1, q_offset: int = 0, causal_chunk: int = 0,
) -> BlockSparseLayout:
    """Per (batch, head, q-block): keep kv blocks in decreasing estimated mass until the kept mass
    reaches ``tau`` (0 < tau <= 1); the diagonal and the first ``sink_blocks`` blocks are always kept."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau is the attention mass to keep, in (0, 1]; got {tau}")
    L, S = q_BLHD.shape[1], k_BSHD.shape[1]
    with torch.no_grad():
        admissible, forced = _geometry(L, S, block_q, block_k, q_offset, causal_chunk, sink_blocks, q_BLHD.device)
        p_BHMN = _block_scores(q_BLHD, k_BSHD, block_q, block_k, admissible)
        p_sorted, order = torch.sort(p_BHMN, -1, descending=True)
        before = torch.cumsum(p_sorted, -1) - p_sorted  # mass of the blocks ranked above this one
        keep_sorted = (before < tau) & (p_sorted > 0)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        keep = (keep | forced) & admissible
    return BlockSparseLayout.from_block_mask(keep, L, S, block_q, block_k, q_offset, causal_chunk)


def topk_layout(
    q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, *, topk: int | None = None, block_q: int = 64, block_k: int = 64,
    sink_blocks: int = 1, q_offset: int = 0, causal_chunk: int = 0, sparsity: float | None = None,
) -> BlockSparseLayout:
    """Per (batch, head, q-block): the diagonal and sink blocks, then the highest-scoring admissible
    blocks until ``topk`` blocks are kept (more only when the forced blocks alone exceed ``topk``).

    ``sparsity`` instead of ``topk`` (VSA-style): each q-block keeps ``ceil((1 - sparsity) n)`` of
    its ``n`` admissible blocks, so the ratio holds while a cache fills and across causal rows."""
    if (topk is None) == (sparsity is None):
        raise ValueError("pass exactly one of topk (blocks kept) and sparsity (fraction dropped)")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity is the fraction of blocks dropped, in [0, 1); got {sparsity}")
    L, S = q_BLHD.shape[1], k_BSHD.shape[1]
    with torch.no_grad():
        admissible, forced = _geometry(L, S, block_q, block_k, q_offset, causal_chunk, sink_blocks, q_BLHD.device)
        p_BHMN = _block_scores(q_BLHD, k_BSHD, block_q, block_k, admissible)
        rank = torch.where(forced, 2.0, p_BHMN).masked_fill(~admissible, -1.0)  # forced blocks rank first
        order = torch.argsort(rank, -1, descending=True)
        budget = topk
        if sparsity is not None:  # per q-block budget (M, 1); float slack keeps exact ratios exact
            budget = torch.ceil((1.0 - sparsity) * admissible.sum(-1, keepdim=True) - 1e-6).clamp_min(1)
        keep_sorted = torch.arange(rank.shape[-1], device=rank.device) < budget
        keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, order, keep_sorted.expand_as(rank))
        keep = (keep | forced) & admissible
    return BlockSparseLayout.from_block_mask(keep, L, S, block_q, block_k, q_offset, causal_chunk)


def window_layout(
    q_len: int, kv_len: int, *, window_blocks: int, block_q: int = 64, block_k: int = 64, sink_blocks: int = 1,
    q_offset: int = 0, causal_chunk: int = 0, device: torch.device | str | None = None,
) -> BlockSparseLayout:
    """Static: kv blocks within ``window_blocks`` blocks of the q-block's diagonal (both sides; the
    causal rule removes the future), plus sinks. Shared by all batches and heads."""
    if window_blocks < 0:
        raise ValueError(f"window_blocks must be >= 0, got {window_blocks}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    admissible, forced = _geometry(q_len, kv_len, block_q, block_k, q_offset, causal_chunk, sink_blocks, device)
    M, N = admissible.shape
    i = torch.arange(M, device=device)
    lo = (q_offset + i * block_q) // block_k - window_blocks
    hi = (q_offset + torch.clamp((i + 1) * block_q, max=q_len) - 1) // block_k + window_blocks
    j = torch.arange(N, device=device)
    keep = ((j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None]) | forced) & admissible
    return BlockSparseLayout.from_block_mask(keep[None, None], q_len, kv_len, block_q, block_k, q_offset, causal_chunk)


def random_layout(
    q_len: int, kv_len: int, density: float, *, block_q: int = 64, block_k: int = 64, batch: int = 1,
    heads: int = 1, q_offset: int = 0, causal_chunk: int = 0, generator: torch.Generator | None = None,
) -> BlockSparseLayout:
    """Exactly ``round(density * N)`` random kv blocks per q-block (at least 1): tests and benchmarks."""
    M, N = num_blocks(q_len, block_q), num_blocks(kv_len, block_k)
    n_keep = min(N, max(1, round(density * N)))
    order = torch.rand(batch, heads, M, N, generator=generator).argsort(-1)
    keep = torch.zeros(batch, heads, M, N, dtype=torch.bool).scatter_(-1, order[..., :n_keep], True)
    return BlockSparseLayout.from_block_mask(keep, q_len, kv_len, block_q, block_k, q_offset, causal_chunk)


# ------------------------------------------------------------------------------------ CPU fast path
_GATHER_BUDGET_BYTES = 64 * 2**20  # autograd: gathered k/v per chunk
_INFER_CHUNK_BYTES = 2 * 2**20  # inference: gathered k (and v) per chunk, reused


def _head_major(x_BLHD: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, H, length, D)`` contiguous, zero-padded past ``L``: one copy (``F.pad`` of the
    transposed view would make two)."""
    B, L, H, D = x_BLHD.shape
    if length == L:
        return x_BLHD.transpose(1, 2).contiguous()
    out = x_BLHD.new_zeros(B, H, length, D)
    out[:, :, :L].copy_(x_BLHD.transpose(1, 2))
    return out


def torch_block_sparse(
    q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, layout: BlockSparseLayout,
    scale: float | None = None,
) -> torch.Tensor:
    """Gather each q-block's kept kv blocks and run SDPA on them (differentiable, any device/head dim).

    Work and memory scale with the kept blocks. q-blocks are processed in groups so the gathered
    keys/values stay small (cache-sized, in reused buffers, when no gradient is needed). A token mask is built only when needed
    (unequal counts, a ragged kept tail, or the causal rule). Rows that see nothing give 0.
    """
    B, L, H, D = q_BLHD.shape
    S = k_BSHD.shape[1]
    bq, bk = layout.block_q, layout.block_k
    M, N = layout.num_q_blocks, layout.num_kv_blocks
    count_BHM = layout.kv_count.expand(B, H, M)
    kmax = int(count_BHM.max())
    if kmax == 0:
        return torch.zeros_like(q_BLHD)  # nothing is attended anywhere
    index_BHMK = layout.kv_index.expand(B, H, M, layout.kv_index.shape[-1])[..., :kmax].long()
    live_BHMK = torch.arange(kmax, device=q_BLHD.device) < count_BHM[..., None]
    C = layout.causal_chunk
    need_mask = bool((count_BHM != kmax).any()) or S % bk != 0 or C > 0

    # (B*H*M, bq, D) query blocks and (B*H*N, bk*D) key/value blocks, tails zero-padded
    q_blocks = _head_major(q_BLHD, M * bq).view(B * H * M, bq, D)
    k_blocks = _head_major(k_BSHD, N * bk).view(B * H * N, bk * D)
    v_blocks = _head_major(v_BSHD, N * bk).view(B * H * N, bk * D)
    bh_base = (torch.arange(B * H, device=q_BLHD.device) * N).view(B, H, 1, 1)
    flat_index = torch.where(live_BHMK, index_BHMK, 0) + bh_base  # dead slots read block 0, masked below
    flat_index = flat_index.reshape(B * H * M, kmax)
    if need_mask:
        k_pos = (index_BHMK[..., None] * bk + torch.arange(bk, device=q_BLHD.device)).flatten(-2)  # (B,H,M,kmax*bk)
        valid = (live_BHMK.repeat_interleave(bk, -1) & (k_pos < S))[..., None, :]  # (B, H, M, 1, kmax*bk)
        if C > 0:
            q_pos = (layout.q_offset + torch.arange(M * bq, device=q_BLHD.device)).view(M, bq, 1)
            valid = valid & (k_pos[..., None, :] // C <= q_pos // C)  # (B, H, M, bq, kmax*bk)
        valid = valid.reshape(B * H * M, valid.shape[-2], kmax * bk)
        row_ok = valid.any(-1, keepdim=True)  # (BHM, 1|bq, 1)
        valid = valid | (~row_ok & (torch.arange(kmax * bk, device=valid.device) == 0))  # no all-False rows

    rows = B * H * M
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BLHD, k_BSHD, v_BSHD))
    per_row = kmax * bk * D * q_BLHD.element_size()
    # Inference gathers into two small reused buffers: fresh multi-MB allocations page-fault on every
    # call and cost more than the attention itself; cache-sized chunks also stay hot for SDPA.
    # With autograd the gathered blocks are saved for backward anyway, so plain index_select.
    step = max(1, (_GATHER_BUDGET_BYTES if grad else _INFER_CHUNK_BYTES) // per_row)
    if not grad:
        k_buf = k_blocks.new_empty(min(step, rows) * kmax, bk * D)
        v_buf = v_blocks.new_empty(min(step, rows) * kmax, bk * D)
    outs = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        idx = flat_index[r0:r1].reshape(-1)
        if grad:
            kg, vg = k_blocks.index_select(0, idx), v_blocks.index_select(0, idx)
        else:
            kg = torch.index_select(k_blocks, 0, idx, out=k_buf[: idx.numel()])
            vg = torch.index_select(v_blocks, 0, idx, out=v_buf[: idx.numel()])
        kg, vg = kg.view(r1 - r0, 1, kmax * bk, D), vg.view(r1 - r0, 1, kmax * bk, D)
        mask = valid[r0:r1, None] if need_mask else None
        o = F.scaled_dot_product_attention(q_blocks[r0:r1, None], kg, vg, attn_mask=mask, scale=scale)[:, 0]
        if need_mask:
            o = o * row_ok[r0:r1]
        outs.append(o)
    out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
    return out.view(B, H, M * bq, D)[:, :, :L].transpose(1, 2)


# --------------------------------------------------------------------------------------- dispatch
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def sparse_attention(
    q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, layout: BlockSparseLayout,
    backend: SparseBackend = "auto", scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention over ``(B, L, H, D)`` tensors; returns ``(B, L, H, D)``.

    Same calling convention as ``streamkd.attention.dispatch.attention`` with the block layout in
    place of the dense mask. All-blocks-kept equals dense attention (under the layout's causal rule).
    """
    if backend == "auto":
        backend = "triton" if q_BLHD.is_cuda and _triton_available() else "torch"
    if backend not in ("triton", "torch", "reference"):
        raise ValueError(f"unknown block-sparse backend {backend!r}; use 'auto', 'triton', 'torch' or 'reference'")
    layout.check(q_BLHD, k_BSHD, v_BSHD, kernel=backend == "triton")
    scale = q_BLHD.shape[-1] ** -0.5 if scale is None else scale
    if backend == "triton":
        from streamkd.kernels.ops import block_sparse_attn

        out, _ = block_sparse_attn(q_BLHD, k_BSHD, v_BSHD, layout.kv_count, layout.kv_index, layout.q_count,
                                   layout.q_index, layout.block_q, layout.block_k, layout.q_offset,
                                   layout.causal_chunk, scale, False)
        return out
    if backend == "reference":
        return block_sparse_reference(q_BLHD, k_BSHD, v_BSHD, layout.kv_count, layout.kv_index, layout.block_q,
                                      layout.block_k, layout.q_offset, layout.causal_chunk, scale)[0]
    return torch_block_sparse(q_BLHD, k_BSHD, v_BSHD, layout, scale)


# ------------------------------------------------------------------------------------------- config
@dataclass
class BlockSparseConfig:
    """How self-attention is sparsified (one per model; ``None`` on the model means dense)."""

    mode: Literal["adaptive", "topk", "sparsity", "window"] = "adaptive"
    """Mask producer: ``adaptive`` (cumulative mass ``tau``), ``topk`` (``topk`` blocks), ``sparsity``
    (top blocks, a fixed fraction ``sparsity`` of each q-block's admissible blocks dropped), ``window``."""
    tau: float = 0.9
    """adaptive: attention mass to keep per q-block, in (0, 1]."""
    topk: int = 8
    """topk: kv blocks kept per q-block."""
    sparsity: float = 0.75
    """sparsity: fraction of admissible kv blocks dropped per q-block, in [0, 1)."""
    window_blocks: int = 2
    """window: kv blocks kept on each side of the diagonal."""
    sink_blocks: int = 1
    """Leading kv blocks every q-block keeps (attention sinks; the first frame's tokens)."""
    block_q: int = 64
    block_k: int = 64
    backend: SparseBackend = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("adaptive", "topk", "sparsity", "window"):
            raise ValueError(f"sparse mode must be 'adaptive', 'topk', 'sparsity' or 'window', got {self.mode!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity is the fraction of blocks dropped, in [0, 1); got {self.sparsity}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.topk < 1 or self.window_blocks < 0 or self.sink_blocks < 0:
            raise ValueError("topk must be >= 1, window_blocks and sink_blocks >= 0")
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block sizes must be >= 1, got ({self.block_q}, {self.block_k})")

    def layout_for(self, q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, q_offset: int = 0,
                   causal_chunk: int = 0) -> BlockSparseLayout:
        common = dict(block_q=self.block_q, block_k=self.block_k, sink_blocks=self.sink_blocks,
                      q_offset=q_offset, causal_chunk=causal_chunk)
        if self.mode == "adaptive":
            return adaptive_layout(q_BLHD, k_BSHD, tau=self.tau, **common)
        if self.mode == "topk":
            return topk_layout(q_BLHD, k_BSHD, topk=self.topk, **common)
        if self.mode == "sparsity":
            return topk_layout(q_BLHD, k_BSHD, sparsity=self.sparsity, **common)
        return window_layout(q_BLHD.shape[1], k_BSHD.shape[1], window_blocks=self.window_blocks,
                             device=q_BLHD.device, **common)


def sparse_self_attention(
    q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, cfg: BlockSparseConfig,
    q_offset: int | None = None, causal_chunk: int = 0,
) -> torch.Tensor:
    """Build the layout from ``cfg`` (adaptive masks read this call's q/k) and attend.

    ``q_offset`` defaults to ``S - L``: the queries are the last ``L`` keys (cached streaming, where
    the chunk's own keys are appended after the cache; 0 for full-sequence attention).
    """
    L, S = q_BLHD.shape[1], k_BSHD.shape[1]
    q_offset = S - L if q_offset is None else q_offset
    layout = cfg.layout_for(q_BLHD, k_BSHD, q_offset, causal_chunk)
    return sparse_attention(q_BLHD, k_BSHD, v_BSHD, layout, cfg.backend)

