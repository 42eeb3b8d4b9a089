"""Benchmarks (scripts, not timed tests): streaming cost against length, teacher training speed,
memory of a self-forcing step against rollout length.

``bench_stream`` streams one session chunk by chunk and reports, at each milestone (frames
generated so far), the median wall time per chunk over the last ``window`` chunks before it and the
process's peak RSS so far. Bounded cost means: the latency and memory at 10,000 frames are within
10% of the 100-frame figures. Each chunk is the full loop: N denoising passes, one cache-writing
pass, decode to RGB.

``bench_memory`` asks the same of world memory (``streamkd.cache.memory``): one stream per memory
variant, advanced in lockstep, with cache bytes per tier, pages in use and the bytes the memory
gather copies per chunk at each milestone, beside the sinks + window cache of the same run.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from streamkd.cache.memory import MemoryConfig
from streamkd.data.toyworld import random_actions
from streamkd.generate import first_frame_for
from streamkd.bundle import CausalConfig, SamplingConfig
from streamkd.models.world import WorldModel
from streamkd.sampling.stream import StreamGenerator


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


STREAM_PROMPTS = {"toy": "forest with red squares", "wan": "a red car drives through a forest at sunset"}
"""The prompt ``bench stream`` streams, per kind of bundle (the toy grammar; free text for Wan)."""


def bench_stream(
    model,
    sampling: SamplingConfig,
    causal: CausalConfig | None,
    milestones: list[int] = (100, 1000, 10000),
    window: int = 100,
    seed: int = 0,
    prompt: str | None = None,
) -> dict:
    """Latency and memory of one stream against its length (``milestones`` in latent frames), for
    any causal bundle: toy (from the episode's first frame, random camera actions) or Wan
    (text-to-video from ``prompt``; actions only if the model takes them)."""
    if causal is None:
        raise ValueError("bench stream measures the causal chunk loop: use a causal checkpoint or pass --causal")
    prompt = prompt or STREAM_PROMPTS[getattr(model.cfg, "kind", "toy")]
    stream = StreamGenerator(model, sampling.make(), causal=causal, guidance_scale=sampling.guidance_scale)
    first = first_frame_for(model, seed, prompt)
    stream.reset([prompt], None if first is None else torch.from_numpy(first)[None], torch.Generator().manual_seed(seed))
    F = causal.chunk_frames
    total = max(milestones)
    actions = torch.from_numpy(random_actions(np.random.default_rng(seed), total + F)) if model.num_actions else None
    chunk_ms: list[float] = []
    frames_out = 0
    latency, rss = {}, {}
    targets = sorted(milestones)
    done = 0
    while targets:
        t0 = time.perf_counter()
        frames_out += stream.decode(stream.next_chunk(None if actions is None else actions[done : done + F][None])).shape[1]
        chunk_ms.append(1000 * (time.perf_counter() - t0))
        done += F
        if done >= targets[0]:
            recent = chunk_ms[-window:]
            latency[str(targets[0])] = float(np.median(recent))
            rss[str(targets[0])] = _peak_rss_mb()
            targets.pop(0)
    first, last = str(min(milestones)), str(max(milestones))
    return {
        "latency_ms": latency,
        "peak_rss_mb": rss,
        "latency_ratio_last_vs_first": latency[last] / latency[first],
        "rss_ratio_last_vs_first": rss[last] / rss[first],
        "cache_mb": stream.cache.nbytes / 2**20,
        # RGB frames per chunk: F for the toy codec, temporal_factor x F for Wan's VAE past the first chunk
        "fps_end_to_end_steady": 1000 * F * model.codec.temporal_factor / float(np.mean(chunk_ms[len(chunk_ms) // 10 :])),
        "frames_out": frames_out,
        "counts": (
            f"latency_ms: wall time per chunk of {F} latent frames ({F * model.codec.temporal_factor} RGB frames once "
            f"streaming; {sampler_passes(sampling)} denoising passes + 1 cache write "
            f"+ decode), median of the last {window} chunks before each milestone (median: one descheduled chunk on "
            f"a shared 2-core machine must not move the figure); peak_rss_mb: process peak RSS so far"
        ),
        "threads": torch.get_num_threads(),
    }


DEFAULT_MEMORIES: dict[str, MemoryConfig | None] = {
    "window": None,
    "compressed": MemoryConfig(compressed_frames=12, fine_frames=6),
    "bank": MemoryConfig(bank_frames=16, retrieve_frames=3),
    "both": MemoryConfig(compressed_frames=12, fine_frames=6, bank_frames=16, retrieve_frames=3),
    "bank rendered": MemoryConfig(bank_frames=16, retrieve_frames=3, render=True),
    "pooled bank rendered": MemoryConfig(bank_frames=16, retrieve_frames=3, render=True, bank_level=1),
}
"""Memory variants of ``bench_memory``: none (the contiguous sinks + window cache), each tier alone,
both, and the bank rendered into the anchor (for models with anchor channels), its entries at full
resolution or pooled (``bank_level`` 1)."""


def _cache_figures(cache) -> dict:
    """Bytes per tier, pages in use and the bytes of one frame of ``cache`` (paged or contiguous)."""
    if hasattr(cache, "tier_bytes"):
        return {"tier_bytes": cache.tier_bytes(), "pages_in_use": cache.pool.in_use, "pool_pages": cache.pool.capacity,
                "frame_bytes": cache.pool.page_bytes * cache.batch_size}
    # the contiguous cache is preallocated in equal frame slots: split its bytes by slot
    slots = cache.sink_frames + cache.window_frames
    per_slot = cache.nbytes // slots
    return {"tier_bytes": {"sinks": per_slot * cache.sink_frames, "window": per_slot * cache.window_frames, "bank": 0,
                           "compressed": 0},
            "pages_in_use": None, "pool_pages": None, "frame_bytes": per_slot}


def _history_tokens(cache) -> int:
    """Tokens of history copied so far into the attention buffers (summed over layers and rows).

    The paged cache counts what ``_gather`` copies; the contiguous cache copies its filled sinks +
    window into the same kind of buffer once per chunk and layer (``with_chunk``) without counting,
    so its figure is the layout's -- call this before the chunk, while it holds that history."""
    if hasattr(cache, "stats"):
        return cache.stats["gathered_tokens"]
    return cache.num_filled * cache.tokens_per_frame * cache.num_layers * cache.batch_size


def bench_memory(
    model: WorldModel,
    causal: CausalConfig | None,
    frames: tuple[int, ...] = (1000, 10000),
    memories: dict[str, MemoryConfig | None] | None = None,
    *,
    sampling: SamplingConfig | None = None,
    window: int = 30,
    seed: int = 0,
) -> dict:
    """What each memory variant costs per chunk and holds, at each milestone of one long stream.

    One stream per entry of ``memories`` (None: no memory, the contiguous cache), same first frame,
    prompt, noise seed and random actions; the streams advance in lockstep, one chunk each in turn,
    so that whatever else loads the machine loads every variant alike and the latency ratios against
    ``window`` compare chunks of the same moment. ``frames``: the milestones (frames generated)."""
    if causal is None:
        raise ValueError("bench memory measures the causal chunk loop: use a causal checkpoint or pass --causal")
    if memories is None:
        memories = {name: m for name, m in DEFAULT_MEMORIES.items()
                    if m is None or not m.render or model.dit.cfg.anchor_warp}
    memories = dict(memories)
    if not memories or not frames or min(frames) < 1:
        raise ValueError("bench memory needs at least one memory variant and positive frame milestones")
    sampling = sampling or model.cfg.sampling
    prompt = "forest with red squares"
    first = torch.from_numpy(first_frame_for(model, seed, prompt))[None]
    F = causal.chunk_frames
    targets = sorted(set(frames))
    chunks = -(-targets[-1] // F)
    num_actions = model.cfg.dit.num_actions
    actions = (torch.randint(0, num_actions, (1, chunks * F), generator=torch.Generator().manual_seed(seed))
               if num_actions else None)
    streams = {}
    for name, memory in memories.items():
        stream = StreamGenerator(model, sampling.make(), causal=replace(causal, memory=memory),
                                 guidance_scale=sampling.guidance_scale)
        stream.reset([prompt], first, torch.Generator().manual_seed(seed))
        streams[name] = stream
    dit = model.dit.cfg
    ms: dict[str, list[float]] = {name: [] for name in streams}
    copied: dict[str, list[int]] = {name: [] for name in streams}
    retrieved: dict[str, list[int]] = {name: [] for name in streams}
    at: dict[str, dict[str, dict]] = {name: {} for name in streams}
    with torch.no_grad():
        for c in range(chunks):
            a = None if actions is None else actions[:, c * F : (c + 1) * F]
            for name, stream in streams.items():
                cache = stream.cache
                paged = hasattr(cache, "stats")
                tokens0 = _history_tokens(cache)
                got0 = cache.stats["retrieved"] if paged else 0
                t0 = time.perf_counter()
                stream.decode(stream.next_chunk(a))
                ms[name].append(1000 * (time.perf_counter() - t0))
                tokens = _history_tokens(cache) - tokens0 if paged else tokens0
                # tokens already sum over layers (one gather per layer and chunk): k and v, H x D values each
                itemsize = (cache.pool.k if paged else cache.k_NBSHD).element_size()
                copied[name].append(tokens * dit.num_heads * dit.head_dim * 2 * itemsize)
                retrieved[name].append(cache.stats["retrieved"] - got0 if paged else 0)
            done = (c + 1) * F
            while targets and done >= targets[0]:
                for name, stream in streams.items():
                    fig = _cache_figures(stream.cache)
                    at[name][str(targets[0])] = {
                        "frames_generated": done,
                        "latency_ms": float(np.median(ms[name][-window:])),
                        # paired: each chunk against the window stream's chunk of the same round, so a
                        # burst of load from elsewhere moves both sides of a ratio alike
                        "latency_ratio_vs_window": None if "window" not in ms else float(np.median(
                            np.array(ms[name][-window:]) / np.array(ms["window"][-window:]))),
                        "tier_bytes": fig["tier_bytes"],
                        "cache_bytes": sum(fig["tier_bytes"].values()),
                        "pages_in_use": fig["pages_in_use"],
                        "pool_pages": fig["pool_pages"],
                        "gathered_bytes_per_chunk": float(np.median(copied[name][-window:])),
                        "chunk_own_bytes": F * fig["frame_bytes"],
                        "retrieved_per_chunk": float(np.mean(retrieved[name][-window:])),
                    }
                targets.pop(0)
    lo, hi = str(min(frames)), str(max(frames))
    base = at.get("window")

    def flat(name: str, key: str) -> float | None:
        a, b = at[name][lo][key], at[name][hi][key]
        return None if a is None or b is None or not a else b / a

    return {
        "frames": sorted(set(frames)),
        "chunk_frames": F,
        "variants": {name: {"memory": None if m is None else asdict(streams[name].cache.memory), "at": at[name]}
                     for name, m in memories.items()},
        "latency_ratio_vs_window": None if base is None else {
            name: {f: v["latency_ratio_vs_window"] for f, v in at[name].items()} for name in at},
        "cache_bytes_ratio_vs_window": None if base is None else {
            name: {f: v["cache_bytes"] / base[f]["cache_bytes"] for f, v in at[name].items()} for name in at},
        "flatness": {name: {key: flat(name, key) for key in ("latency_ms", "cache_bytes", "pages_in_use",
                                                              "gathered_bytes_per_chunk")} for name in at},
        "counts": (
            f"latency_ms: wall time per chunk of {F} frames ({sampler_passes(sampling)} denoising passes + 1 cache write + "
            f"decode), median of the last {window} chunks before each milestone, the variants advanced one chunk each in "
            "turn; x window (latency_ratio_vs_window): median over the same chunks of the chunk's time / the window "
            "stream's time in the same turn; cache_bytes: keys/values the stream's cache holds (paged: tier_bytes(), "
            "the sinks, window and bank pages -- with the clean latent each keeps under rendered memory -- , pooled bank entries and "
            "the compressed tier's packed tokens and scales; contiguous: its preallocated slots, split by "
            "slot); pages_in_use: pages of the pool referenced (contiguous: none); gathered_bytes_per_chunk: keys and "
            "values of history copied into the attention buffers for one chunk, all layers (paged: the gather's own "
            "count; contiguous: its filled sinks + window), median of the same chunks; chunk_own_bytes: the new "
            "chunk's own pages; retrieved_per_chunk: bank entries read per chunk; flatness: figure at the last "
            "milestone / figure at the first"
        ),
        "threads": torch.get_num_threads(),
    }


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.3g}"


def bench_memory_markdown(result: dict) -> str:
    """The figures of ``bench_memory`` as two tables (per milestone; flatness) and what they count."""
    lo, hi = str(min(result["frames"])), str(max(result["frames"]))
    ratio = result["latency_ratio_vs_window"] or {}
    out = ["| variant | frames | chunk ms | x window | cache MB (sinks / window / bank / compressed) | pages in use | "
           "gathered MB per chunk | new chunk MB | retrieved per chunk |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        for f, r in v["at"].items():
            t = r["tier_bytes"]
            x = ratio.get(name, {}).get(f)
            out.append(f"| {name} | {f} | {r['latency_ms']:.1f} | {'-' if x is None else f'{x:.2f}'} | "
                       f"{_mb(r['cache_bytes'])} ({_mb(t['sinks'])} / {_mb(t['window'])} / {_mb(t['bank'])} / "
                       f"{_mb(t['compressed'])}) | {'-' if r['pages_in_use'] is None else r['pages_in_use']} | "
                       f"{_mb(r['gathered_bytes_per_chunk'])} | {_mb(r['chunk_own_bytes'])} | "
                       f"{r['retrieved_per_chunk']:.2f} |")

    def f2(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    out += ["", f"Flatness (figure at {hi} frames / figure at {lo}):", "",
            "| variant | chunk ms | cache bytes | pages in use | gathered bytes per chunk |", "|---|---|---|---|---|"]
    for name, fl in result["flatness"].items():
        out.append(f"| {name} | {f2(fl['latency_ms'])} | {f2(fl['cache_bytes'])} | {f2(fl['pages_in_use'])} | "
                   f"{f2(fl['gathered_bytes_per_chunk'])} |")
    memories = "; ".join(
        f"{name}: " + ("sinks + window only (contiguous cache)" if v["memory"] is None else ", ".join(
            f"{k}={v['memory'][k]}" for k in ("compressed_frames", "fine_frames", "bank_frames", "retrieve_frames",
                                              "bank_level", "render")
            if v["memory"].get(k)))
        for name, v in result["variants"].items())
    out += ["", f"Variants: {memories}. MB = 10^6 bytes; {result['threads']} torch threads.", "",
            f"What each figure counts: {result['counts']}."]
    return "\n".join(out)


def sampler_passes(sampling: SamplingConfig) -> int:
    passes = sampling.num_steps if sampling.sigmas is None else len(sampling.sigmas)
    return passes * (2 if sampling.guidance_scale != 1.0 else 1)


def bench_train(cfg, steps: int = 10) -> dict:
    """Teacher-training throughput: samples/s and the share of a step spent loading data, as the
    trainer itself measures them (wall time of whole optimizer steps, data fetch timed inside)."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from streamkd.train.teacher import TeacherTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(cfg, out_dir=tmp, max_steps=steps, ckpt_every=10**9, log_every=steps, tensorboard=False, codec_fit_clips=16)
        TeacherTrainer(cfg).train(progress=False)
        record = json.loads((Path(tmp) / "losses.jsonl").read_text().splitlines()[-1])
    return {
        "samples_per_s": record["samples_per_s"],
        "step_s": cfg.batch_size / record["samples_per_s"],
        "data_share": record["data_share"],
        "batch_size": cfg.batch_size,
        "steps": steps,
        "data": cfg.data or "toy world (rendered)",
        "num_workers": cfg.num_workers,
        "counts": "samples_per_s: clips (of horizon_frames frames) per second of whole optimizer steps, first step "
        "(and worker start-up) included; data_share: time the step waits for its batch (rendering / decoding / "
        "reading shards + collating, in this process or not yet ready from the workers) / time of the steps",
        "threads": torch.get_num_threads(),
    }


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _one_dmd_step(cfg) -> dict:
    """In a fresh process: build the trainer, then run one student (+ critic) step."""
    from streamkd.train.distill import DistillTrainer

    trainer = DistillTrainer(cfg)
    trainer.data[0]  # warm the renderer
    base = _current_rss_mb()
    t0 = time.perf_counter()
    trainer.train(stop_after=1, progress=False)
    return {"step_s": time.perf_counter() - t0, "rss_before_step_mb": base, "peak_rss_mb": _peak_rss_mb()}


def bench_distill_memory(cfg, multiples: list[int] = (1, 2, 4)) -> dict:
    """Peak memory of one self-forcing DMD step (student update + critic update) for rollouts of
    ``m`` x the teacher's horizon, each in a fresh process so that peaks do not mix."""
    import multiprocessing as mp
    from dataclasses import replace

    from streamkd.models.world import WorldModel

    horizon = WorldModel.load(cfg.teacher).cfg.horizon_frames
    rows = {}
    ctx = mp.get_context("spawn")
    for m in multiples:
        with tempfile.TemporaryDirectory() as tmp:
            run = replace(cfg, method="dmd", out_dir=tmp, rollout_frames=m * horizon, max_steps=1, ckpt_every=10**9,
                          tensorboard=False)
            with ctx.Pool(1) as pool:
                r = pool.apply(_one_dmd_step, (run,))
        r["step_mb"] = r["peak_rss_mb"] - r["rss_before_step_mb"]
        rows[f"{m}x"] = r
    first = rows[f"{min(multiples)}x"]["step_mb"]
    return {
        "rollout_frames": {f"{m}x": m * horizon for m in multiples},
        "steps": rows,
        "step_mb_ratio_vs_1x": {k: v["step_mb"] / first for k, v in rows.items()},
        "counts": "step_mb: peak RSS during one student+critic DMD step minus RSS before it (activations, "
        "gradients, optimizer state first touched, rollout caches); each rollout length in a fresh process",
        "threads": torch.get_num_threads(),
    }


DEFAULT_SHAPES = (
    # (blocks, steps, chunk, sinks, window)
    (6, 4, 3, 3, 6), (6, 2, 3, 3, 6), (3, 2, 3, 3, 6), (2, 2, 3, 3, 6), (3, 1, 3, 3, 6), (2, 1, 3, 3, 6),
    (2, 2, 6, 3, 6), (2, 2, 3, 1, 3), (1, 1, 3, 3, 6),
)


def bench_student_shapes(teacher, shapes=DEFAULT_SHAPES, chunks: int = 40, seed: int = 0) -> dict:
    """What a causal student of a given shape costs per frame, beside the teacher's clip, on this
    machine: the question "how small must a student be to stream N x faster than its teacher".

    Each student is the teacher's network cut to ``blocks`` blocks with random weights (cost does
    not depend on the weights), streamed through ``StreamGenerator`` exactly as ``generate`` does.
    The teacher samples whole clips with its own default sampler; both include decoding to RGB."""
    from dataclasses import replace

    from streamkd.sampling.bidirectional import sample_clip
    from streamkd.sampling.schedule import FewStepSampler

    prompt = "forest with red squares"
    first = torch.from_numpy(first_frame_for(teacher, seed, prompt))[None]
    horizon = teacher.cfg.horizon_frames
    longest = max(horizon, chunks * max(shape[2] for shape in shapes))
    actions = torch.from_numpy(random_actions(np.random.default_rng(seed), longest))
    clip_s = []
    with torch.no_grad():
        for i in range(4):
            t0 = time.perf_counter()
            latents = sample_clip(teacher, teacher.cfg.sampling.make(), [prompt], first, actions[None, :horizon], horizon,
                                  torch.Generator().manual_seed(i), teacher.cfg.sampling.guidance_scale)
            teacher.codec.decode(latents)
            clip_s.append(time.perf_counter() - t0)
    teacher_clip_s = float(np.median(clip_s[1:]))
    teacher_fps = horizon / teacher_clip_s
    rows = []
    for blocks, steps, chunk, sinks, window in shapes:
        cfg = replace(teacher.cfg, dit=replace(teacher.cfg.dit, num_layers=blocks))
        model = WorldModel(cfg).eval()
        sigmas = torch.linspace(1.0, 0.1, steps).tolist()  # cost does not depend on the levels
        stream = StreamGenerator(model, FewStepSampler(sigmas), causal=CausalConfig(chunk, sinks, window))
        chunk_ms = []
        with torch.no_grad():
            stream.reset([prompt], first, torch.Generator().manual_seed(seed))
            for c in range(chunks):
                t0 = time.perf_counter()
                stream.decode(stream.next_chunk(actions[None, c * chunk : (c + 1) * chunk]))
                chunk_ms.append(1000 * (time.perf_counter() - t0))
        ms = float(np.median(chunk_ms[chunks // 8 :]))
        fps = 1000 * chunk / ms
        rows.append({"blocks": blocks, "steps": steps, "chunk_frames": chunk, "sink_frames": sinks, "window_frames": window,
                     "chunk_ms": ms, "fps": fps, "x_teacher": fps / teacher_fps})
    return {
        "teacher": {"blocks": teacher.cfg.dit.num_layers, "sampler": f"{teacher.cfg.sampling.kind} {teacher.cfg.sampling.num_steps}",
                    "clip_s": teacher_clip_s, "fps": teacher_fps},
        "students": rows,
        "counts": f"teacher fps: frames of one {horizon}-frame clip (first frame given) / wall time of sampling + decoding it, "
        "median of 3 after a warm-up; student chunk_ms: wall time of one chunk (denoising passes + cache write + decode), median "
        f"over chunks {chunks // 8}..{chunks - 1}; x_teacher = student fps / teacher fps, same process, same machine",
        "threads": torch.get_num_threads(),
    }
