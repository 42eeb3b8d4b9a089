"""Triton block-sparse attention: forward (with LSE), dQ pass and dK/dV pass.

Legend: B batch, L query tokens, S key tokens, H heads, D head dim, M query blocks, N key blocks.

Layout (see ``streamkd.kernels.layout``): per (batch, head, q-block) a count and a sorted int32
list of kv-block indices; the transposed lists (per kv-block, the q-blocks that read it) drive the
dK/dV pass, so every program owns its output tile and no atomics are needed.

Token-level masking on top of the block lists:
    * ragged tails: rows >= L and key columns >= S are masked;
    * ``CAUSAL`` (``causal_chunk > 0``): query token ``l`` sits at key position ``q_offset + l`` and
      sees key ``s`` iff ``s // causal_chunk <= (q_offset + l) // causal_chunk`` -- block-causal
      attention over chunks of ``causal_chunk`` tokens (``causal_chunk = 1`` is token-causal).

Rows that see no key give output 0 and LSE -inf (the reference does the same).

Interpreter: ``TRITON_INTERPRET=1`` is read when this module is imported (Triton decides at
``triton.jit`` time). Under the interpreter the kernels run on CPU tensors with numpy, which has no
bf16, so ``UPCAST`` casts tiles to fp32 before every ``tl.dot``. No autotuning: the launch config
is fixed (``num_warps`` 4, or 8 for D = 128), which keeps the interpreter path identical to the
compiled one and the kernel cheap to launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False



@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in fp32; IEEE-exact fp32 products when ``IEEE`` (fp32 tests)."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _load_tile(ptr, rows, row_stride, offs_d, row_ok, UPCAST: tl.constexpr):
    """The ``(len(rows), HEAD_D)`` tile of token rows ``rows`` (zeros where not ``row_ok``), in fp32
    when ``UPCAST``."""
    tile = tl.load(ptr + rows[:, None] * row_stride + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _visible(ok, q_tok, k_tok, q_offset, causal_chunk, CAUSAL: tl.constexpr):
    """``ok``, and with ``CAUSAL`` the block-causal rule for query ``q_tok`` / key ``k_tok`` (any
    broadcastable shapes: the dK/dV pass works on transposed tiles)."""
    if CAUSAL:
        ok = ok & ((k_tok // causal_chunk) <= ((q_tok + q_offset) // causal_chunk))
    return ok


@triton.jit
def _row_stats(Lse, Delta, base, offs_m, row_ok):
    """LSE and delta of the query rows ``offs_m`` for a backward pass. Empty rows (LSE -inf) must
    give p = 0: their LSE becomes +inf. Natural exp throughout: at large logits the extra log2e
    rescaling of s and LSE costs fp32 digits that dq/dk would inherit."""
    lse = tl.load(Lse + base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + base + offs_m, mask=row_ok, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse), delta


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KVCount, KVIndex,
    sqb, sql, sqh, skb, sks, skh, svb, svs, svh, sob, sol, soh, slb, slh,
    scb, sch, sib, sih, sim,
    H, L, S, q_offset, causal_chunk, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < L

    q = _load_tile(Q + b * sqb + h * sqh, offs_m, sql, offs_d, row_ok, UPCAST)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_D], tl.float32)

    count = tl.load(KVCount + b * scb + h * sch + pid_m)
    idx_ptr = KVIndex + b * sib + h * sih + pid_m * sim
    for it in range(0, count):
        j = tl.load(idx_ptr + it)
        offs_s = j * BLOCK_K + offs_n
        col_ok = offs_s < S
        k = _load_tile(K + b * skb + h * skh, offs_s, sks, offs_d, col_ok, UPCAST)
        v = _load_tile(V + b * svb + h * svh, offs_s, svs, offs_d, col_ok, UPCAST)
        # natural-log domain, the same rounding as the backward's recomputation exp(s * scale - lse):
        # with exp2 the log2e rescaling makes forward LSE and backward logits disagree by an ulp of
        # the logit, which at large logits (input scale 16) is a 1e-4 relative error in dq/dk
        s = _dot(q, tl.trans(k), IEEE) * scale
        valid = _visible(col_ok[None, :] & row_ok[:, None], offs_m[:, None], offs_s[None, :], q_offset, causal_chunk,
                         CAUSAL)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing valid yet keeps m = -inf; subtract 0 instead so exp gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + b * slb + h * slh + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, KVCount, KVIndex,
    sqb, sql, sqh, skb, sks, skh, svb, svs, svh, sdob, sdol, sdoh, sdqb, sdql, sdqh, slb, slh,
    scb, sch, sib, sih, sim,
    H, L, S, q_offset, causal_chunk, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < L

    q = _load_tile(Q + b * sqb + h * sqh, offs_m, sql, offs_d, row_ok, UPCAST)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, sdol, offs_d, row_ok, UPCAST)
    lse, delta = _row_stats(Lse, Delta, b * slb + h * slh, offs_m, row_ok)
    dq = tl.zeros([BLOCK_Q, HEAD_D], tl.float32)

    count = tl.load(KVCount + b * scb + h * sch + pid_m)
    idx_ptr = KVIndex + b * sib + h * sih + pid_m * sim
    for it in range(0, count):
        j = tl.load(idx_ptr + it)
        offs_s = j * BLOCK_K + offs_n
        col_ok = offs_s < S
        k = _load_tile(K + b * skb + h * skh, offs_s, sks, offs_d, col_ok, UPCAST)
        v = _load_tile(V + b * svb + h * svh, offs_s, svs, offs_d, col_ok, UPCAST)
        s = _dot(q, tl.trans(k), IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        valid = _visible(col_ok[None, :] & row_ok[:, None], offs_m[:, None], offs_s[None, :], q_offset, causal_chunk,
                         CAUSAL)
        p = tl.where(valid, tl.exp(s * scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdql + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, QCount, QIndex,
    sqb, sql, sqh, skb, sks, skh, svb, svs, svh, sdob, sdol, sdoh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh, slb, slh,
    scb, sch, sib, sih, sin,
    H, L, S, q_offset, causal_chunk, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = pid_n * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_s < S

    k = _load_tile(K + b * skb + h * skh, offs_s, sks, offs_d, col_ok, UPCAST)
    v = _load_tile(V + b * svb + h * svh, offs_s, svs, offs_d, col_ok, UPCAST)
    dk = tl.zeros([BLOCK_K, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_K, HEAD_D], tl.float32)

    count = tl.load(QCount + b * scb + h * sch + pid_n)
    idx_ptr = QIndex + b * sib + h * sih + pid_n * sin
    for it in range(0, count):
        i = tl.load(idx_ptr + it)
        offs_m = i * BLOCK_Q + offs_r
        row_ok = offs_m < L
        q = _load_tile(Q + b * sqb + h * sqh, offs_m, sql, offs_d, row_ok, UPCAST)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, sdol, offs_d, row_ok, UPCAST)
        lse, delta = _row_stats(Lse, Delta, b * slb + h * slh, offs_m, row_ok)
        # transposed tiles: rows are keys, columns are queries
        st = _dot(k, tl.trans(q), IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        valid = _visible(col_ok[:, None] & row_ok[None, :], offs_m[None, :], offs_s[:, None], q_offset, causal_chunk,
                         CAUSAL)
        pt = tl.where(valid, tl.exp(st * scale - lse[None, :]), 0.0)
        dst = pt * (dpt - delta[None, :])
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dk += _dot(dst.to(q.dtype), q, IEEE)
    dk = dk * scale
    tl.store(DK + b * sdkb + h * sdkh + offs_s[:, None] * sdks + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + b * sdvb + h * sdvh + offs_s[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


def _expand(t: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Broadcast a (1|B, 1|H, ...) layout tensor to (B, H, ...) with stride 0 (no copy); the kernels
    assume unit stride on the last dim."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.expand(B, H, *t.shape[2:])


def _launch_cfg(D: int) -> dict:
    return {} if INTERPRET else {"num_warps": 8 if D >= 128 else 4, "num_stages": 2}


def forward(q, k, v, kv_count, kv_index, block_q, block_k, q_offset, causal_chunk, scale):
    """``(out_BLHD, lse_BHL)``; inputs already checked by ``streamkd.kernels.layout.check_layout``."""
    B, L, H, D = q.shape
    S = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    cnt, idx = _expand(kv_count, B, H), _expand(kv_index, B, H)
    grid = (triton.cdiv(L, block_q), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, cnt, idx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), cnt.stride(0), cnt.stride(1), idx.stride(0), idx.stride(1), idx.stride(2),
        H, L, S, q_offset, max(causal_chunk, 1), scale,
        BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_D=D, CAUSAL=causal_chunk > 0,
        UPCAST=INTERPRET or q.dtype == torch.float32, IEEE=q.dtype == torch.float32, **_launch_cfg(D),
    )
    return out, lse


def backward(dout, q, k, v, out, lse, dlse, kv_count, kv_index, q_count, q_index,
             block_q, block_k, q_offset, causal_chunk, scale):
    """``(dq, dk, dv)``. ``dlse`` (the LSE's incoming gradient, may be None) folds into delta:
    d lse / d s = p, so ``ds = p * (dp - (delta - dlse))``."""
    B, L, H, D = q.shape
    S = k.shape[1]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # (B, H, L)
    if dlse is not None:
        delta = delta - dlse.float()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.contiguous()
    common = dict(BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_D=D, CAUSAL=causal_chunk > 0,
                  UPCAST=INTERPRET or q.dtype == torch.float32, IEEE=q.dtype == torch.float32, **_launch_cfg(D))
    cnt, idx = _expand(kv_count, B, H), _expand(kv_index, B, H)
    _bwd_dq_kernel[(triton.cdiv(L, block_q), B * H)](
        q, k, v, dout, dq, lse, delta, cnt, idx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), lse.stride(0), lse.stride(1),
        cnt.stride(0), cnt.stride(1), idx.stride(0), idx.stride(1), idx.stride(2),
        H, L, S, q_offset, max(causal_chunk, 1), scale, **common,
    )
    cnt, idx = _expand(q_count, B, H), _expand(q_index, B, H)
    _bwd_dkdv_kernel[(triton.cdiv(S, block_k), B * H)](
        q, k, v, dout, dk, dv, lse, delta, cnt, idx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), cnt.stride(0), cnt.stride(1), idx.stride(0), idx.stride(1), idx.stride(2),
        H, L, S, q_offset, max(causal_chunk, 1), scale, **common,
    )
    return dq, dk, dv

