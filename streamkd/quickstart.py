"""``streamkd quickstart``: the main job on the embedded toy world, end to end, on a CPU.

1. evaluate the shipped teacher against toy-world ground truth (with floor and ceiling);
2. render a teacher clip (bidirectional, its horizon) to mp4;
3. stream a long video through the causal chunk loop (KV cache, sinks + ring window) to mp4 --
   with the teacher's weights until a distilled student ships;
4. print a markdown table of what was measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from streamkd.data.toyworld import random_actions
from streamkd.eval.run import evaluate
from streamkd.generate import first_frame_for, generate_frames
from streamkd.media.video import VideoWriter, check_output_path
from streamkd.models.world import CausalConfig, WorldModel

PROMPT = "meadow with red squares"


def _render(model: WorldModel, out: Path, actions: np.ndarray, seed: int, causal: CausalConfig | None) -> float:
    """Write the video; returns end-to-end frames/s (generation + decode, mp4 encode excluded)."""
    gen_s = 0.0
    with VideoWriter(out) as writer:
        chunks = generate_frames(model, prompt=PROMPT, seed=seed, actions=actions.tolist(),
                                 first_frame=first_frame_for(model, seed, PROMPT), causal=causal)
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            gen_s += time.perf_counter() - t0
            if chunk is None:
                break
            writer.write(chunk)
    return len(actions) / gen_s


def run(checkpoint: str, out_dir: str, episodes: int, long_frames: int) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher_mp4, long_mp4 = out / "teacher_clip.mp4", out / "causal_long.mp4"
    for path in (teacher_mp4, long_mp4):
        check_output_path(path)
    model = WorldModel.load(checkpoint)
    horizon = model.cfg.horizon_frames
    print(f"[1/3] evaluating {checkpoint} on {episodes} held-out episodes of {horizon} frames ...", flush=True)
    result = evaluate(model, episodes=episodes, seed=0, frames=horizon)
    seed = 7
    print(f"[2/3] teacher clip -> {teacher_mp4}", flush=True)
    teacher_fps = _render(model, teacher_mp4, random_actions(np.random.default_rng(seed), horizon), seed, None)
    causal = model.cfg.causal or CausalConfig()
    print(f"[3/3] {long_frames}-frame causal stream -> {long_mp4}", flush=True)
    long_fps = _render(model, long_mp4, random_actions(np.random.default_rng(seed), long_frames), seed, causal)
    rows = [
        ("model", result["fidelity_psnr"], result["action_error_px"], result["fps_end_to_end"]),
        ("floor (repeat frame 0)", result["floor"]["fidelity_psnr"], result["floor"]["action_error_px"], float("nan")),
        ("ceiling (exact shift)", result["ceiling"]["fidelity_psnr"], result["ceiling"]["action_error_px"], float("nan")),
    ]
    lines = ["| | fidelity_psnr (dB) | action_error_px | fps_end_to_end |", "|---|---|---|---|"]
    lines += [f"| {name} | {p:.2f} | {a:.3f} | {f:.2f} |" for name, p, a, f in rows]
    lines.append(f"\ngap closed (floor -> ceiling, dB): {result['gap_closed']:.2f}")
    lines.append(f"teacher clip: {teacher_mp4} ({teacher_fps:.2f} frames/s end to end)")
    lines.append(
        f"causal stream: {long_mp4} ({long_frames} frames, {long_fps:.2f} frames/s end to end, chunk "
        f"{causal.chunk_frames}, sinks {causal.sink_frames}, window {causal.window_frames})"
    )
    return "\n".join(lines)
