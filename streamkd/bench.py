"""Benchmarks (scripts, not timed tests): streaming cost against length, teacher training speed,
memory of a self-forcing step against rollout length.

``bench_stream`` streams one session chunk by chunk and reports, at each milestone (frames
generated so far), the median wall time per chunk over the last ``window`` chunks before it and the
process's peak RSS so far. Bounded cost means: the latency and memory at 10,000 frames are within
10% of the 100-frame figures. Each chunk is the full loop: N denoising passes, one cache-writing
pass, decode to RGB.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time

import numpy as np
import torch

from streamkd.data.toyworld import random_actions
from streamkd.generate import first_frame_for
from streamkd.models.world import CausalConfig, SamplingConfig, WorldModel
from streamkd.sampling.stream import StreamGenerator


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def bench_stream(
    model: WorldModel,
    sampling: SamplingConfig,
    causal: CausalConfig | None,
    milestones: list[int] = (100, 1000, 10000),
    window: int = 100,
    seed: int = 0,
) -> dict:
    if causal is None:
        raise ValueError("bench stream measures the causal chunk loop: use a causal checkpoint or pass --causal")
    prompt = "forest with red squares"
    stream = StreamGenerator(model, sampling.make(), causal=causal, guidance_scale=sampling.guidance_scale)
    stream.reset([prompt], torch.from_numpy(first_frame_for(model, seed, prompt))[None], torch.Generator().manual_seed(seed))
    F = causal.chunk_frames
    total = max(milestones)
    actions = torch.from_numpy(random_actions(np.random.default_rng(seed), total + F))
    chunk_ms: list[float] = []
    latency, rss = {}, {}
    targets = sorted(milestones)
    done = 0
    while targets:
        t0 = time.perf_counter()
        stream.decode(stream.next_chunk(actions[done : done + F][None]))
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
        "fps_end_to_end_steady": 1000 * F / float(np.mean(chunk_ms[len(chunk_ms) // 10 :])),
        "counts": (
            f"latency_ms: wall time per chunk of {F} frames ({sampler_passes(sampling)} denoising passes + 1 cache write "
            f"+ decode), median of the last {window} chunks before each milestone (median: one descheduled chunk on "
            f"a shared 2-core machine must not move the figure); peak_rss_mb: process peak RSS so far"
        ),
        "threads": torch.get_num_threads(),
    }


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
        "counts": "samples_per_s: clips (of horizon_frames frames) per second of whole optimizer steps, first step "
        "included; data_share: time rendering+collating batches / time of the steps",
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
