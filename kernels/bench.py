"""CPU benchmark: block-sparse fast path (``streamkd.attention.sparse.torch_block_sparse``) vs dense SDPA.

    python -m streamkd.kernels.bench [--lengths 4096 8192 16384] [--sparsity 0.5 0.75 0.9 0.95]

What each figure counts (forward only, fp32, B=1, H heads, D head dim, blocks 64x64, random layout
with exactly ``round((1 - sparsity) * N)`` kv blocks per q-block, measured side by side in one run,
best of ``--repeats``):
    dense_ms     dense SDPA over all L x L pairs;
    sparse_ms    the fast path on the kept blocks;
    speedup      dense_ms / sparse_ms;
    efficiency   speedup * (1 - sparsity): 1.0 = the ideal speed-up 1 / (1 - sparsity);
    mask_share   adaptive_layout (pooled scores + cumulative-mass selection, tau chosen to land near
                 the sparsity) time as a share of sparse_ms.
The GPU benchmark (Triton kernel vs SDPA / flex_attention) is not in this script yet.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from streamkd.attention.sparse import adaptive_layout, random_layout, torch_block_sparse


def best_time(fn, repeats: int, sync=None) -> float:
    """Best wall time of ``repeats`` calls after one warm-up; ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs before the clock stops."""
    sync = sync or (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"threads={args.threads} heads={args.heads} D={args.head_dim} block={args.block} fp32 forward")
    print(f"{'L':>6} {'sparsity':>8} {'dense_ms':>9} {'sparse_ms':>9} {'speedup':>8} {'efficiency':>10} {'mask_share':>10}")
    with torch.inference_mode():
        for L in args.lengths:
            q, k, v = (torch.randn(1, L, args.heads, args.head_dim, generator=g) for _ in range(3))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            dense = best_time(lambda: F.scaled_dot_product_attention(qt, kt, vt), args.repeats)
            for sp in args.sparsity:
                layout = random_layout(L, L, 1 - sp, block_q=args.block, block_k=args.block, heads=args.heads,
                                       generator=g)
                sparse = best_time(lambda: torch_block_sparse(q, k, v, layout), args.repeats)
                mask = best_time(lambda: adaptive_layout(q, k, tau=1 - sp, block_q=args.block, block_k=args.block),
                             args.repeats)
                kept = layout.density()
                row = dict(L=L, sparsity=round(1 - kept, 4), dense_ms=dense * 1e3, sparse_ms=sparse * 1e3,
                           speedup=dense / sparse, efficiency=dense / sparse * kept, mask_share=mask / sparse)
                rows.append(row)
                print(f"{L:>6} {row['sparsity']:>8.3f} {row['dense_ms']:>9.1f} {row['sparse_ms']:>9.1f} "
                      f"{row['speedup']:>8.2f} {row['efficiency']:>10.2f} {row['mask_share']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
