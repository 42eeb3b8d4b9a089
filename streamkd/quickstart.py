"""``streamkd quickstart``: the main job on the embedded toy world, end to end, on a CPU.

1. distil the shipped teacher with the quickstart preset (``configs/toyworld/quickstart/``):
   ODE pairs -> ODE-regression init -> self-forcing DMD. Each stage resumes where it stopped, so
   an interrupted quickstart continues, and a finished one skips straight to the measurements;
2. evaluate teacher, the student just distilled and the shipped students side by side against
   toy-world ground truth (with floor and ceiling);
3. stream a long video from the shipped student (the quickstart's own is a short demo run)
   through the causal chunk loop (KV cache, sinks + ring window) to mp4;
4. print the markdown table of what was measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from streamkd.data.toyworld import random_actions
from streamkd.eval.run import evaluate, markdown_table
from streamkd.generate import first_frame_for, generate_frames
from streamkd.media.video import VideoWriter, check_output_path
from streamkd.bundle import SHIPPED
from streamkd.models.world import WorldModel

PROMPT = "meadow with red squares"
PRESETS = Path(__file__).resolve().parent.parent / "configs" / "toyworld" / "quickstart"


def _render(model: WorldModel, out: Path, actions: np.ndarray, seed: int) -> float:
    """Write the video; returns end-to-end frames/s (generation + decode, mp4 encode excluded)."""
    gen_s = 0.0
    with VideoWriter(out) as writer:
        chunks = generate_frames(model, prompt=PROMPT, seed=seed, actions=actions.tolist(),
                                 first_frame=first_frame_for(model, seed, PROMPT))
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            gen_s += time.perf_counter() - t0
            if chunk is None:
                break
            writer.write(chunk)
    return len(actions) / gen_s


def distill(presets: Path = PRESETS, overrides: tuple[str, ...] = ()) -> Path:
    """ODE pairs, ODE init and self-forcing DMD with the quickstart preset; the student's folder."""
    from streamkd.config import load_config
    from streamkd.distill.ode_pairs import ODEPairsConfig, generate_ode_pairs
    from streamkd.train.distill import DistillConfig, DistillTrainer

    if not presets.is_dir():
        raise FileNotFoundError(f"quickstart presets not found at {presets}: run quickstart from a source checkout (pip install -e .)")
    pairs = load_config(ODEPairsConfig, presets / "ode_pairs.yaml", overrides)
    print(f"[1/5] ODE pairs: {pairs.num_clips} teacher trajectories ({pairs.num_steps} Euler steps) -> {pairs.out_dir}", flush=True)
    generate_ode_pairs(pairs)
    ode = load_config(DistillConfig, presets / "ode.yaml", overrides)
    print(f"[2/5] ODE-regression init: {ode.max_steps} steps -> {ode.out_dir}", flush=True)
    DistillTrainer(ode).train()
    dmd = load_config(DistillConfig, presets / "dmd.yaml", overrides)
    print(f"[3/5] self-forcing DMD: {dmd.max_steps} critic steps (student every {dmd.critic_ratio}) -> {dmd.out_dir}", flush=True)
    DistillTrainer(dmd).train()
    return Path(dmd.out_dir) / "final"


def run(out_dir: str, episodes: int, long_frames: int, teacher: str = "toy-teacher") -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    long_mp4 = check_output_path(out / "student_long.mp4")
    student_dir = distill(overrides=(f"teacher={teacher}",) if teacher != "toy-teacher" else ())
    rows = {"teacher (Euler 24 steps)": WorldModel.load(teacher), "student (quickstart, 4 steps)": WorldModel.load(student_dir)}
    for name in ("toy-student-ode", "toy-student"):
        if (SHIPPED / name).is_dir():
            rows[f"{name} (shipped, 4 steps)"] = WorldModel.load(name)
    horizon = rows["teacher (Euler 24 steps)"].cfg.horizon_frames
    print(f"[4/5] evaluating {len(rows)} checkpoints on {episodes} held-out episodes of {horizon} frames ...", flush=True)
    results = {name: evaluate(model, episodes=episodes, seed=0, frames=horizon) for name, model in rows.items()}
    streamer = rows.get("toy-student (shipped, 4 steps)", rows["student (quickstart, 4 steps)"])
    seed = 7
    print(f"[5/5] {long_frames}-frame stream -> {long_mp4}", flush=True)
    long_fps = _render(streamer, long_mp4, random_actions(np.random.default_rng(seed), long_frames), seed)
    causal = streamer.cfg.causal
    lines = [markdown_table(results), ""]
    lines.append(f"student distilled here: {student_dir}")
    lines.append(
        f"long stream: {long_mp4} ({long_frames} frames, {long_fps:.1f} RGB frames/s end to end, chunk "
        f"{causal.chunk_frames}, sinks {causal.sink_frames}, window {causal.window_frames})"
    )
    return "\n".join(lines)
