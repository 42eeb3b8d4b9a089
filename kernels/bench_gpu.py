"""GPU benchmark: the Triton block-sparse kernel vs dense SDPA and compiled flex_attention.

    python -m streamkd.kernels.bench_gpu [--lengths 8192 16384 32768 65536] [--head-dims 64 128]
                                         [--sparsity 0.0 0.5 0.75 0.9] [--json out.json]

What each figure counts (B = 1, H = 1536 / D heads -- Wan2.1-1.3B's width --, bf16, blocks
64 x 64, a random layout with exactly ``round((1 - sparsity) N)`` kv blocks per q-block shared by
all three sparse paths, measured side by side in one run; CUDA-event time, median of
``--repeats`` after warm-up and compilation):
    pass         fwd, or fwd+bwd (``out.backward(dout)``: dQ, dK, dV);
    sdpa_ms      dense ``scaled_dot_product_attention`` (the backend torch picks: flash / cuDNN);
    triton_ms    ``streamkd::block_sparse_attn`` (and its backward op);
    flex_ms      ``torch.compile(flex_attention)`` with the same blocks as *full* blocks (no mask_mod
                 work), or ``-`` when ``--no-flex``;
    tflops       effective TFLOP/s of the Triton kernel: the FLOPs of the kept blocks (4 L S D H
                 density forward, 2.5x that backward) per second;
    of_ideal     (sdpa_ms / triton_ms) x density: 1.0 = the ideal speed-up 1 / density; at
                 sparsity 0 it is the all-kept kernel's speed relative to dense SDPA.

Also runs on CPU tensors under ``TRITON_INTERPRET=1`` at small sizes (``--device cpu --no-flex``):
how CI checks that this script's code paths work; its timings then mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from streamkd.attention.sparse import random_layout
from streamkd.kernels.ops import block_sparse_attn


def _timer(device: torch.device):
    """Seconds of ``fn()``: CUDA events on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _median(fn, repeats: int, timer) -> float:
    fn()  # warm-up (and compilation)
    fn()
    return statistics.median(timer(fn) for _ in range(repeats))


def _flex_full_blocks(layout, B: int, H: int):
    """The layout as a flex ``BlockMask`` of full blocks (valid: block-aligned, no causal rule)."""
    from torch.nn.attention.flex_attention import BlockMask

    count, index = layout.flex_kv_lists(B, H)
    return BlockMask.from_kv_blocks(torch.zeros_like(count), index, full_kv_num_blocks=count, full_kv_indices=index,
                                    BLOCK_SIZE=(layout.block_q, layout.block_k), seq_lengths=(layout.q_len, layout.kv_len))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    p.add_argument("--width", type=int, default=1536, help="heads x head dim (Wan2.1-1.3B: 1536)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--no-flex", action="store_true", help="skip compiled flex_attention")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=str, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    timer = _timer(dev)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (TRITON_INTERPRET)"
    print(f"{name}, torch {torch.__version__}, {dtype}, B=1, width {args.width}, blocks {args.block}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'L':>6} {'D':>4} {'sparsity':>8} {'pass':>8} {'sdpa_ms':>8} {'triton_ms':>9} {'flex_ms':>8} "
          f"{'tflops':>7} {'of_ideal':>8}")
    g = torch.Generator().manual_seed(0)
    rows = []
    for L in args.lengths:
        for D in args.head_dims:
            H = args.width // D
            q, k, v, dout = (torch.randn(1, L, H, D, generator=g).to(dev, dtype) for _ in range(4))
            qt, kt, vt, dt = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
            for pass_ in args.passes:
                bwd = pass_ == "fwd+bwd"
                for t in (q, k, v, qt, kt, vt):
                    t.requires_grad_(bwd)

                def sdpa():
                    out = F.scaled_dot_product_attention(qt, kt, vt)
                    if bwd:
                        out.backward(dt)

                sdpa_s = _median(sdpa, args.repeats, timer)
                for sp in args.sparsity:
                    layout = random_layout(L, L, 1 - sp, block_q=args.block, block_k=args.block, heads=H,
                                           generator=g).to(dev)
                    density = layout.density()

                    def triton():
                        out, _ = block_sparse_attn(q, k, v, layout.kv_count, layout.kv_index, layout.q_count,
                                                   layout.q_index, args.block, args.block, 0, 0, D**-0.5, False)
                        if bwd:
                            out.backward(dout)

                    triton_s = _median(triton, args.repeats, timer)
                    flex_s = None
                    if flex is not None:
                        mask = _flex_full_blocks(layout, 1, H)

                        def flex_run():
                            out = flex(qt, kt, vt, block_mask=mask)
                            if bwd:
                                out.backward(dt)

                        flex_s = _median(flex_run, args.repeats, timer)
                    flops = 4 * L * L * D * H * density * (3.5 if bwd else 1.0)
                    row = dict(L=L, D=D, heads=H, sparsity=round(1 - density, 4), pass_=pass_, sdpa_ms=sdpa_s * 1e3,
                               triton_ms=triton_s * 1e3, flex_ms=None if flex_s is None else flex_s * 1e3,
                               tflops=flops / triton_s / 1e12, of_ideal=sdpa_s / triton_s * density)
                    rows.append(row)
                    flex_txt = "-" if flex_s is None else f"{flex_s * 1e3:.2f}"
                    print(f"{L:>6} {D:>4} {row['sparsity']:>8.3f} {pass_:>8} {row['sdpa_ms']:>8.2f} "
                          f"{row['triton_ms']:>9.2f} {flex_txt:>8} {row['tflops']:>7.1f} {row['of_ideal']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=name, torch=torch.__version__, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
