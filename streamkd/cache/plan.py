"""Memory planning past this machine: what world memory costs at Wan2.1 scale, from shapes alone.

No weights are loaded; every byte figure is the cost model of ``streamkd.cache.memory``
(``memory_bytes_per_frame``), so this table and the running cache cannot disagree about what a
frame costs. For each model shape and each memory variant (sinks + window only; the compressed
tier alone; the bank alone; both, as configured) the table gives:

* bytes per latent frame of history in each tier (window / bank frame, compressed level 1 and 2);
* the KV bytes one stream holds with every tier at capacity -- sinks + window + bank + compressed
  (``fine_frames`` at level 1, the rest at level 2). Bounded: the same for a 1-minute and a
  60-minute stream once the tiers have filled (after ``sinks + window + max(compressed, bank)``
  latent frames, a few seconds of video);
* what keeping the *uncompressed full history* (every latent frame at full resolution) would cost
  for streams of 1, 10 and 60 minutes, and the ratio memory / full history;
* sessions per GPU: ``floor((GPU - weights - activation reserve) / KV bytes per stream)``;
* keys attended per chunk, ``[sinks | retrieved | compressed | window | chunk]`` in tokens, beside
  sinks + window + chunk only, and their ratio as the per-chunk attention cost ratio (queries are
  the chunk's tokens in both cases, so attention FLOPs scale with the keys; the rest of a chunk --
  projections, FFN, cross-attention -- does not change, so the whole chunk grows by less);
* the gathered buffer a chunk in flight holds: this implementation gathers each layer's attended
  history into one contiguous bf16 buffer (compressed tokens dequantized) and keeps every layer's
  buffer until the chunk commits, so a stream mid-chunk holds ``N x attended x n x 2 x 2`` bytes
  on top of its pages. Given as its own column and as a second sessions figure (every session's
  chunk in flight at once, as in one server batch), not folded into the activation reserve.

Assumptions (all stated in the output as well):

* Wan2.1-T2V-1.3B: 30 layers, 12 heads x 128 = 1536 channels; Wan2.1-T2V-14B: 40 layers, 40 heads x
  128 = 5120 channels. Both patchify latents by (1, 2, 2); the VAE compresses 8x in space and 4x in
  time. At 480 x 832 a latent frame is 60 x 104, i.e. a token grid of 30 x 52 = 1560 tokens.
* 16 fps video -> 16 / 4 = 4 latent frames per second (the VAE's extra first frame is ignored).
* Pages in bf16 (2 bytes per value); compressed tokens int8 with fp16 scales (the memory config's
  ``quantize``). Level-2 token counts are taken as ``T / pool^4`` even where that is fractional.
* Weights in bf16: 1.3B -> 2.6 GB, 14B -> 28 GB. The umT5 text encoder and the VAE are not counted
  (the prompt is encoded once per prompt change and the encoder can live elsewhere); an activation
  reserve of 10 GB (1.3B) / 20 GB (14B) covers activations, the decoder and allocator slack.
* GB = 10^9 bytes; an "80 GB" card is taken as 80 x 10^9 bytes (an 80 GB H100 has ~85.9 x 10^9, so
  session counts are on the safe side).
* The memory bank is counted full; a bank admits by view coverage, so a stream that stays in one
  place fills it more slowly (its cost is an upper bound).

One check that is *not* only arithmetic: ``MemoryConfig.check`` against the 30 x 52 grid. Two
compression levels at pool 2 need 4 x 4 cells, and 30 is not a multiple of 4, so such a config is
refused by the cache at 480 x 832; the ``runs`` column says so (the bytes are still the model's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from streamkd.cache.memory import MemoryConfig, memory_bytes_per_frame

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """What the KV cost of a video DiT depends on (no weights)."""

    name: str
    num_layers: int
    num_heads: int
    head_dim: int
    grid: tuple[int, int]
    """Latent token grid of one frame (after patchify)."""
    latent_fps: float
    """Latent frames per second of video."""
    weight_gb: float
    """bf16 weights."""
    reserve_gb: float
    """Activation reserve (activations, decoder, allocator slack) per GPU."""

    @property
    def channels(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]


# 480 x 832 pixels / 8 (VAE) / 2 (patch) = 30 x 52 tokens; 16 fps / 4 (VAE, time) = 4 latent frames/s
WAN_GRID = (480 // 8 // 2, 832 // 8 // 2)
WAN_SHAPES = (
    ModelShape("Wan2.1-T2V-1.3B", 30, 12, 128, WAN_GRID, 16 / 4, weight_gb=2.6, reserve_gb=10.0),
    ModelShape("Wan2.1-T2V-14B", 40, 40, 128, WAN_GRID, 16 / 4, weight_gb=28.0, reserve_gb=20.0),
)

DEFAULT_MEMORY = MemoryConfig(compressed_frames=48, fine_frames=16, pool=2, quantize="int8", bank_frames=32,
                              retrieve_frames=4)


def variants(memory: MemoryConfig) -> list[tuple[str, MemoryConfig]]:
    """The ablations of ``memory`` worth a row: no memory, each tier alone, both (those that exist),
    and a full-resolution bank's entries pooled (``bank_level`` 1)."""
    out = [("window", MemoryConfig())]
    if memory.compressed_frames and memory.bank_frames:
        out.append(("compressed", memory.without_bank()))
        out.append(("bank", replace(memory, compressed_frames=0, fine_frames=0)))
        out.append(("both", memory))
    elif memory.compressed_frames:
        out.append(("compressed", memory))
    elif memory.bank_frames:
        out.append(("bank", memory))
    if memory.bank_frames and not memory.bank_level:  # what the same bank costs with pooled entries
        out.append(("bank pooled", replace(memory, compressed_frames=0, fine_frames=0, bank_level=1)))
    return out


def _fields(m: MemoryConfig) -> dict:
    return {k: getattr(m, k) for k in ("compressed_frames", "fine_frames", "pool", "quantize", "bank_frames",
                                       "retrieve_frames", "bank_level")}


def _tier_frames(m: MemoryConfig) -> tuple[int, int]:
    """Frames of the compressed tier at capacity at level 1 and level 2, as ``MemoryPlanner`` files
    them: the newest ``fine_frames`` at level 1, the rest at level 2 (so ``fine_frames = 0`` puts
    every frame at level 2 -- what the planner does, whatever the field's docstring says)."""
    fine = min(m.fine_frames, m.compressed_frames)
    return fine, m.compressed_frames - fine


def memory_plan_table(
    memory: MemoryConfig = DEFAULT_MEMORY,
    *,
    shapes: tuple[ModelShape, ...] = WAN_SHAPES,
    sink_frames: int = 3,
    window_frames: int = 6,
    chunk_frames: int = 3,
    minutes: tuple[float, ...] = (1, 10, 60),
    gpu_gb: float = 80.0,
    bytes_per_value: int = 2,
) -> list[dict]:
    """One row per (model shape, memory variant of ``memory``); see the module docstring."""
    rows = []
    for shape in shapes:
        T, n, N = shape.tokens_per_frame, shape.channels, shape.num_layers
        for variant, m in variants(memory):
            cost = memory_bytes_per_frame(num_layers=N, tokens_per_frame=T, channels=n, cfg=m,
                                          page_bytes_per_value=bytes_per_value)
            full, l1, l2 = cost["window_or_bank_frame"], cost["compressed_level1"], cost["compressed_level2"]
            fine, coarse = _tier_frames(m)
            tiers = {
                "sinks": sink_frames * full,
                "window": window_frames * full,
                "bank": m.bank_frames * cost["bank_entry"],
                "compressed": fine * l1 + coarse * l2,
            }
            kv = sum(tiers.values())
            # keys one chunk attends to; queries are the chunk's own T x chunk tokens either way
            window_keys = (sink_frames + window_frames + chunk_frames) * T
            keys = window_keys + m.retrieve_frames * T / m.pool ** (2 * m.bank_level) + fine * T / m.pool**2 + coarse * T / m.pool**4
            gather = N * keys * n * 2 * bytes_per_value
            free = (gpu_gb - shape.weight_gb - shape.reserve_gb) * GB
            try:
                m.check(*shape.grid, chunk_frames)
                runs = "yes"
            except ValueError as e:
                runs = f"no: {e}"
            history = {str(mins): mins * 60 * shape.latent_fps * full for mins in minutes}
            rows.append({
                "model": shape.name,
                "variant": variant,
                "layers": N,
                "channels": n,
                "tokens_per_frame": T,
                "latent_fps": shape.latent_fps,
                "layout": {"sink_frames": sink_frames, "window_frames": window_frames, "chunk_frames": chunk_frames},
                "memory": _fields(m),
                "configured_memory": _fields(memory),
                "runs_on_grid": runs,
                "bytes_per_frame": cost,
                "tier_bytes": tiers,
                "kv_bytes_per_stream": kv,
                "frames_to_capacity": sink_frames + window_frames + max(m.compressed_frames, m.bank_frames),
                "full_history_bytes": history,
                "memory_over_full_history": {k: kv / v for k, v in history.items()},
                "weights_gb": shape.weight_gb,
                "activation_reserve_gb": shape.reserve_gb,
                "gpu_gb": gpu_gb,
                "sessions_per_gpu": max(int(free // kv), 0),
                "gather_bytes_in_flight": gather,
                "sessions_per_gpu_all_in_flight": max(int(free // (kv + gather)), 0),
                "attended_tokens_per_chunk": keys,
                "attended_tokens_window_only": window_keys,
                "attention_cost_ratio": keys / window_keys,
            })
    return rows


def _gb(x: float) -> str:
    return f"{x / GB:.3g}" if x < 100 * GB else f"{x / GB:,.0f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:.3g}" if x < 1000e6 else f"{x / 1e6:,.0f}"


def markdown(rows: list[dict]) -> str:
    """Two tables -- per-frame costs per model, then the plan per (model, variant) -- and the
    assumptions behind them."""
    first = rows[0]
    mins = list(first["full_history_bytes"])
    out = ["Bytes per latent frame of history (MB = 10^6 bytes) and what the uncompressed full history would hold "
           "(GB = 10^9 bytes):", "",
           "| model | layers x channels | tokens/frame | window/bank frame MB | compressed L1 MB | compressed L2 MB | "
           + " | ".join(f"full history {m} min GB" for m in mins) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(mins)]
    seen = set()
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        c = r["bytes_per_frame"]
        out.append(f"| {r['model']} | {r['layers']} x {r['channels']} | {r['tokens_per_frame']} | "
                   f"{_mb(c['window_or_bank_frame'])} | {_mb(c['compressed_level1'])} | {_mb(c['compressed_level2'])} | "
                   + " | ".join(_gb(r["full_history_bytes"][m]) for m in mins) + " |")
    out += ["", "Per stream with every tier at capacity, against the full history; sessions per GPU; keys attended "
            "per chunk:", "",
            "| model | variant | KV per stream GB (sinks+window / bank / compressed) | "
            + " | ".join(f"/ full {m} min" for m in mins)
            + " | sessions per GPU | gather in flight GB | sessions, all in flight | keys per chunk | attention x window "
            "| runs at this grid |",
            "|---|---|---|" + "---|" * len(mins) + "---|---|---|---|---|---|"]
    for r in rows:
        t = r["tier_bytes"]
        runs = "yes" if r["runs_on_grid"] == "yes" else "no (see note)"
        out.append(
            f"| {r['model']} | {r['variant']} | {_gb(r['kv_bytes_per_stream'])} ({_gb(t['sinks'] + t['window'])} / "
            f"{_gb(t['bank'])} / {_gb(t['compressed'])}) | "
            + " | ".join(f"{r['memory_over_full_history'][m]:.2%}" for m in mins)
            + f" | {r['sessions_per_gpu']} | {_gb(r['gather_bytes_in_flight'])} | {r['sessions_per_gpu_all_in_flight']} | "
            f"{r['attended_tokens_per_chunk']:,.0f} | {r['attention_cost_ratio']:.2f} | {runs} |")
    out += ["", "Assumptions:", *(f"- {line}" for line in assumptions(rows))]
    return "\n".join(out)


def assumptions(rows: list[dict]) -> list[str]:
    """The assumptions behind ``rows``, one sentence each (printed under the tables, kept in the JSON)."""
    first = rows[0]
    lay, mem = first["layout"], first["configured_memory"]
    models = sorted({(r["model"], r["weights_gb"], r["activation_reserve_gb"]) for r in rows})
    out = [
        f"layout: {lay['sink_frames']} sink + {lay['window_frames']} window latent frames, chunks of "
        f"{lay['chunk_frames']}; memory: compressed_frames={mem['compressed_frames']} (fine_frames="
        f"{mem['fine_frames']} at level 1, the rest at level 2), pool={mem['pool']}, {mem['quantize']}; "
        f"bank_frames={mem['bank_frames']}, retrieve_frames={mem['retrieve_frames']}, bank_level={mem['bank_level']}; "
        "'compressed' and 'bank' are "
        "that config with the other tier off, 'window' has neither; 'bank pooled' is the bank with its entries kept "
        "at the compressed tier's level 1 (memory.bank_level = 1; a rendered bank's kept latents, 0.2 MB per frame, "
        "not counted).",
        f"token grid of {first['tokens_per_frame']} tokens per latent frame (480x832, VAE 8x spatial, patch 2x2), "
        f"{first['latent_fps']:g} latent frames/s (16 fps, VAE 4x temporal); pages bf16, compressed tokens int8 + "
        "fp16 scales (streamkd.cache.memory.memory_bytes_per_frame); level-2 token counts T/pool^4 even when "
        "fractional.",
        "KV per stream: every tier full (the bank counted at capacity: an upper bound), reached after "
        f"{max(r['frames_to_capacity'] for r in rows)} latent frames at most, so the 1-minute and 60-minute "
        "figures are the same.",
        f"sessions per GPU = floor(({first['gpu_gb']:g} GB - bf16 weights - activation reserve) / KV per stream); "
        + "; ".join(f"{name}: weights {w:g} GB, reserve {res:g} GB" for name, w, res in models)
        + "; text encoder and VAE not counted; GB = 10^9 bytes.",
        "gather in flight: the attended keys/values of every layer, gathered into bf16 buffers that this "
        "implementation keeps until the chunk commits; 'sessions, all in flight' adds them to every session.",
        "attention x window: keys attended per chunk over sinks + window + chunk keys (same queries); the chunk's "
        "other work does not grow, so a whole chunk grows by less.",
    ]
    for why in sorted({r["runs_on_grid"] for r in rows if r["runs_on_grid"] != "yes"}):
        out.append(f"not runnable as configured at this grid -- {why[len('no: '):]}. One compression level "
                   "(fine_frames = compressed_frames) or a grid with sides divisible by 4 (448x832 -> 28x52) would run.")
    return out
