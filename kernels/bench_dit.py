"""End-to-end DiT step time, dense vs block-sparse self-attention, on a Wan2.1-1.3B-shaped config.

    python -m streamkd.kernels.bench_dit [--layers 1] [--frames 21] [--latent 32 48]
                                          [--sparsity 0.5 0.75 0.9] [--json out.json]

The model is Wan2.1-T2V-1.3B's transformer shape (width 1536 = 12 heads x 128, FFN 8960, text
width 4096, 512 prompt tokens by default, patch 1x2x2, 16 latent channels) with random weights; only
``--layers`` of its 30 identical blocks are built, so a full step is ``30 / layers`` times the block
part of these figures (patch embedding and head are a few percent). ``--latent 60 104 --frames 21``
is the real 480p, 81-frame size (32,760 tokens); the CPU defaults use a smaller latent.

What each figure counts (one denoising forward, bidirectional attention as the teacher runs it,
fp32 on CPU / bf16 on CUDA, batch 1, best of ``--repeats``, measured side by side in one run on one
set of weights):
    dense_ms     the step with dense SDPA self-attention;
    attn_ms      dense SDPA alone on this step's q/k/v shapes, times the layers: attention's part;
    sparse_ms    the step with ``BlockSparseConfig(mode="sparsity")``: top blocks of pooled q.k
                 scores, the fraction ``sparsity`` of kv blocks dropped per q-block, mask built
                 inside the step (its cost included), the gather path on CPU / Triton on CUDA;
    speedup      dense_ms / sparse_ms;
    ideal        the speed-up if attention took exactly (1 - sparsity) of its dense time and
                 everything else stayed: dense / (dense - attn + (1 - sparsity) attn);
    of_ideal     speedup / ideal.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
import torch.nn.functional as F

from streamkd.attention.sparse import BlockSparseConfig
from streamkd.kernels.bench import best_time
from streamkd.models.dit import DiT, DiTConfig
from streamkd.models.wan import dit_config_from_diffusers


WAN21_T2V_1_3B = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 12, "attention_head_dim": 128,
                  "ffn_dim": 8960, "num_layers": 30, "in_channels": 16, "out_channels": 16, "text_dim": 4096}
"""The fields of Wan2.1-T2V-1.3B's ``transformer/config.json`` that differ from diffusers' defaults."""


def wan_1_3b_config(num_layers: int) -> DiTConfig:
    """Wan2.1-T2V-1.3B's transformer shape, through the same converter as real checkpoints, ``num_layers`` deep."""
    return replace(dit_config_from_diffusers(WAN21_T2V_1_3B), num_layers=num_layers)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1, help="blocks built (Wan2.1-1.3B has 30)")
    p.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames = 21)")
    p.add_argument("--latent", type=int, nargs=2, default=[32, 48], metavar=("H", "W"), help="latent height, width")
    p.add_argument("--prompt-tokens", type=int, default=512, help="text tokens (Wan pads umT5 prompts to 512)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=str, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    torch.manual_seed(0)
    cfg = wan_1_3b_config(args.layers)
    dit = DiT(cfg).to(dev, dtype).eval()
    h, w = args.latent
    x = torch.randn(1, cfg.in_channels, args.frames, h, w, device=dev, dtype=dtype)
    t = torch.full((1,), 500.0, device=dev)
    ctx = torch.randn(1, args.prompt_tokens, cfg.text_dim, device=dev, dtype=dtype)
    L = args.frames * (h // 2) * (w // 2)
    q, k, v = (torch.randn(1, cfg.num_heads, L, cfg.head_dim, device=dev, dtype=dtype) for _ in range(3))

    def step():
        with torch.inference_mode():
            dit(x, t, ctx)

    with torch.inference_mode():
        attn = best_time(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats, sync) * args.layers
    dit.cfg = replace(cfg, sparse=None)
    dense = best_time(step, args.repeats, sync)
    print(f"Wan2.1-1.3B-shaped DiT, {args.layers} of 30 blocks, L={L} tokens ({args.frames}x{h // 2}x{w // 2}), "
          f"{dtype}, {dev}, threads={torch.get_num_threads()}, block={args.block}")
    print(f"dense step {dense * 1e3:.0f} ms, of which dense attention {attn * 1e3:.0f} ms ({attn / dense:.0%})")
    print(f"{'sparsity':>8} {'dense_ms':>9} {'sparse_ms':>9} {'speedup':>8} {'ideal':>6} {'of_ideal':>8}")
    rows = []
    for sp in args.sparsity:
        dit.cfg = replace(cfg, sparse=BlockSparseConfig(mode="sparsity", sparsity=sp, block_q=args.block,
                                                        block_k=args.block, sink_blocks=0))
        sparse = best_time(step, args.repeats, sync)
        ideal = dense / (dense - attn + (1 - sp) * attn)
        row = dict(L=L, layers=args.layers, sparsity=sp, dense_ms=dense * 1e3, attn_ms=attn * 1e3,
                   sparse_ms=sparse * 1e3, speedup=dense / sparse, ideal=ideal, of_ideal=dense / sparse / ideal)
        rows.append(row)
        print(f"{sp:>8.2f} {row['dense_ms']:>9.0f} {row['sparse_ms']:>9.0f} {row['speedup']:>8.2f} {ideal:>6.2f} "
              f"{row['of_ideal']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=str(dev), dtype=str(dtype), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
