"""``streamkd eval``: a checkpoint measured against toy-world ground truth on held-out episodes.

Per episode (held-out seed ``heldout_seed(i)``, its prompt, piecewise-constant random actions):
the model continues the ground-truth first frame under the episode's actions, and we score

* ``fidelity_psnr``   -- PSNR (dB) of the squared error pooled over episodes, frames 1.. and the
                         pixels visible in frame 0
                         (``metrics.known_mask``): what a model could know from its condition
                         (capped at 100 dB);
* ``action_error_px`` -- mean |phase-correlation shift - commanded shift| between consecutive
                         frames (moving objects painted out);
* ``fps_end_to_end``  -- RGB frames out of the generator per second, decode included, first
                         chunk included (warm-up is a separate, unscored episode).

The same numbers for two reference "models" make them readable: the *floor* repeats the first
frame (ignores actions), the *ceiling* moves the first frame by the exact camera motion (perfect
on the static map; only moving objects and codec-free pixels differ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from streamkd.data.toyworld import ToyWorldConfig, heldout_seed, prompt_for_seed, random_actions, render
from streamkd.eval.metrics import action_error_px, ceiling_frames, floor_frames, known_mask
from streamkd.generate import generate_frames
from streamkd.models.world import CausalConfig, SamplingConfig, WorldModel


@dataclass
class Episode:
    seed: int
    prompt: str
    actions: np.ndarray
    frames: np.ndarray  # ground truth, uint8 [T, H, W, 3]


def heldout_episode(index: int, num_frames: int, world: ToyWorldConfig) -> Episode:
    seed = heldout_seed(index)
    prompt = prompt_for_seed(seed)
    actions = random_actions(np.random.default_rng(seed), num_frames)
    return Episode(seed, prompt, actions, render(seed, prompt, actions, num_frames, world))


def score(frames: np.ndarray, ep: Episode, world: ToyWorldConfig) -> dict[str, float]:
    """Squared error and count over the known pixels of frames 1.., and the action error."""
    mask_THW = known_mask(ep.actions, world)[1:]
    diff = frames[1:].astype(np.float64) / 255.0 - ep.frames[1:].astype(np.float64) / 255.0
    return {
        "sq_err": float((diff**2)[mask_THW].sum()),
        "count": float(mask_THW.sum() * 3),
        "action_error_px": action_error_px(frames, ep.actions, world),
    }


def _pool(rows: list[dict[str, float]]) -> dict[str, float]:
    """PSNR of the error pooled over all episodes (robust to a perfect episode: no inf average)."""
    mse = sum(r["sq_err"] for r in rows) / sum(r["count"] for r in rows)
    return {
        "fidelity_psnr": float(10 * np.log10(1.0 / max(mse, 1e-10))),
        "action_error_px": float(np.mean([r["action_error_px"] for r in rows])),
    }


def evaluate(
    model: WorldModel,
    *,
    episodes: int,
    seed: int,
    frames: int,
    sampling: SamplingConfig | None = None,
    causal: CausalConfig | None = None,
) -> dict:
    """Mean metrics over ``episodes`` held-out episodes starting at index ``seed``."""
    world = model.cfg.world

    def run(ep: Episode) -> np.ndarray:
        chunks = generate_frames(
            model, prompt=ep.prompt, seed=ep.seed, actions=ep.actions.tolist(), first_frame=ep.frames[0],
            sampling=sampling, causal=causal,
        )
        return np.concatenate(list(chunks))

    run(heldout_episode(seed + episodes, frames, world))  # warm-up, not scored
    model_rows, floor_rows, ceiling_rows = [], [], []
    gen_time = 0.0
    for i in range(seed, seed + episodes):
        ep = heldout_episode(i, frames, world)
        t0 = time.perf_counter()
        out = run(ep)
        gen_time += time.perf_counter() - t0
        model_rows.append(score(out, ep, world))
        floor_rows.append(score(floor_frames(ep.frames[0], frames), ep, world))
        ceiling_rows.append(score(ceiling_frames(ep.frames[0], ep.actions, world), ep, world))
    result = _pool(model_rows)
    result["fps_end_to_end"] = episodes * frames / gen_time
    result["floor"] = _pool(floor_rows)
    result["ceiling"] = _pool(ceiling_rows)
    gap = result["ceiling"]["fidelity_psnr"] - result["floor"]["fidelity_psnr"]
    result["gap_closed"] = (result["fidelity_psnr"] - result["floor"]["fidelity_psnr"]) / gap if gap > 0 else float("nan")
    result["episodes"], result["frames"], result["first_seed_index"] = episodes, frames, seed
    return result
