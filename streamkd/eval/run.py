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

from streamkd.data.toyworld import ToyWorldConfig, heldout_seed, prompt_for_seed, random_actions, render, tethered_actions
from streamkd.eval.metrics import action_error_px, ceiling_frames, floor_frames, known_mask
from streamkd.eval.prompt_classifier import PromptClassifier
from streamkd.generate import generate_frames
from streamkd.models.world import CausalConfig, SamplingConfig, WorldModel


@dataclass
class Episode:
    seed: int
    prompt: str
    actions: np.ndarray
    frames: np.ndarray  # ground truth, uint8 [T, H, W, 3]


def heldout_episode(index: int, num_frames: int, world: ToyWorldConfig, tethered: bool = False) -> Episode:
    """Held-out episode ``index``. ``tethered`` actions keep the camera within half a frame of its
    start (a random walk that turns back at the edge), so the view keeps returning to what frame 0
    showed and fidelity stays measurable over long horizons (drift, revisits)."""
    seed = heldout_seed(index)
    prompt = prompt_for_seed(seed)
    rng = np.random.default_rng(seed)
    actions = tethered_actions(rng, num_frames, world) if tethered else random_actions(rng, num_frames)
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


def _psnr(sq_err: float, count: float) -> float:
    return float(10 * np.log10(1.0 / max(sq_err / count, 1e-10))) if count else float("nan")


def evaluate(
    model: WorldModel,
    *,
    episodes: int,
    seed: int,
    frames: int,
    sampling: SamplingConfig | None = None,
    causal: CausalConfig | None = None,
    drift_multiples: tuple[int, ...] = (1, 10),
    drift_episodes: int = 4,
    classifier: PromptClassifier | None = None,
) -> dict:
    """Metrics over ``episodes`` held-out episodes starting at index ``seed``.

    Always: fidelity, action error, floor/ceiling, end-to-end frames/s, first-frame latency,
    prompt accuracy. For streaming (causal) runs also ``drift_psnr``: fidelity over the frames
    ``[(k-1)H, kH)`` of tethered rollouts ``max(k) * H`` frames long (H = the teacher's horizon),
    and ``psnr_curve``, the per-frame PSNR of those rollouts (for the plot).
    """
    world = model.cfg.world
    causal = causal or model.cfg.causal
    classifier = classifier or PromptClassifier(world)

    def run(ep: Episode) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        chunks = generate_frames(
            model, prompt=ep.prompt, seed=ep.seed, actions=ep.actions.tolist(), first_frame=ep.frames[0],
            sampling=sampling, causal=causal,
        )
        first = next(chunks)
        latency = time.perf_counter() - t0
        return np.concatenate([first, *chunks]), latency

    run(heldout_episode(seed + episodes, frames, world))  # warm-up, not scored
    model_rows, floor_rows, ceiling_rows, latencies, prompt_acc, colour_ok = [], [], [], [], [], []
    gen_time = 0.0
    for i in range(seed, seed + episodes):
        ep = heldout_episode(i, frames, world)
        t0 = time.perf_counter()
        out, latency = run(ep)
        gen_time += time.perf_counter() - t0
        latencies.append(latency)
        model_rows.append(score(out, ep, world))
        floor_rows.append(score(floor_frames(ep.frames[0], frames), ep, world))
        ceiling_rows.append(score(ceiling_frames(ep.frames[0], ep.actions, world), ep, world))
        prompt_acc.append(classifier.accuracy(out[1:], ep.prompt))
        colour_ok.append(classifier.colour_correct(out[1:], ep.prompt))
    result = _pool(model_rows)
    result["fps_end_to_end"] = episodes * frames / gen_time
    result["first_frame_latency_ms"] = 1000 * float(np.median(latencies))
    result["prompt_accuracy"] = float(np.mean(prompt_acc))
    result["landmark_colour_accuracy"] = float(np.mean(colour_ok))
    result["prompt_accuracy_ground_truth"], result["landmark_colour_accuracy_ground_truth"] = classifier.heldout_accuracy()
    result["floor"] = _pool(floor_rows)
    result["ceiling"] = _pool(ceiling_rows)
    gap = result["ceiling"]["fidelity_psnr"] - result["floor"]["fidelity_psnr"]
    result["gap_closed"] = (result["fidelity_psnr"] - result["floor"]["fidelity_psnr"]) / gap if gap > 0 else float("nan")
    result["episodes"], result["frames"], result["first_seed_index"] = episodes, frames, seed
    if causal is not None:
        result.update(_drift(run, model, drift_multiples, drift_episodes, seed))
    return result


def _drift(run, model: WorldModel, multiples: tuple[int, ...], episodes: int, seed: int) -> dict:
    world, H = model.cfg.world, model.cfg.horizon_frames
    total = max(multiples) * H
    err_T, cnt_T = np.zeros(total), np.zeros(total)
    for i in range(seed, seed + episodes):
        ep = heldout_episode(i, total, world, tethered=True)
        out, _ = run(ep)
        mask_THW = known_mask(ep.actions, world)
        diff = (out.astype(np.float64) - ep.frames.astype(np.float64)) / 255.0
        err_T += ((diff**2).sum(-1) * mask_THW).sum((1, 2))
        cnt_T += mask_THW.sum((1, 2)) * 3
    drift = {}
    for k in multiples:
        lo = 1 if k == 1 else (k - 1) * H
        drift[f"{k}x"] = _psnr(err_T[lo : k * H].sum(), cnt_T[lo : k * H].sum())
    curve = [_psnr(e, c) for e, c in zip(err_T[1:], cnt_T[1:])]
    return {"drift_psnr": drift, "psnr_curve": curve, "drift_episodes": episodes}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated checkpoint, plus the floor and ceiling of the first."""
    cols = ["fidelity_psnr", "action_error_px", "drift_psnr 1x", "drift_psnr 10x", "prompt_accuracy",
            "fps_end_to_end", "first_frame_latency_ms"]
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def cell(r: dict, c: str) -> str:
        if c.startswith("drift_psnr"):
            v = r.get("drift_psnr", {}).get(c.split()[1])
        else:
            v = r.get(c)
        return "–" if v is None else f"{v:.3f}" if c == "action_error_px" else f"{v:.2f}"

    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(r, c) for c in cols) + " |")
    first = next(iter(results.values()))
    for ref in ("floor", "ceiling"):
        lines.append(f"| {ref} | " + " | ".join(cell(first[ref], c) for c in cols) + " |")
    return "\n".join(lines)


def plot_psnr_curves(results: dict[str, dict], path: str) -> None:
    """PSNR (known pixels) against frame index, one line per checkpoint with a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in results.items():
        if "psnr_curve" in r:
            ax.plot(range(1, len(r["psnr_curve"]) + 1), r["psnr_curve"], label=name, lw=1.2)
    horizon = next((r["frames"] for r in results.values()), None)
    if horizon:
        ax.axvline(horizon, color="grey", ls=":", lw=1, label="teacher horizon")
    ax.set_xlabel("frame index")
    ax.set_ylabel("PSNR on known pixels (dB)")
    ax.set_title("toy world, held-out tethered episodes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
