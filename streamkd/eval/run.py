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
from streamkd.eval.drift import DriftStats, ground_truth_reference, horizon_windows
from streamkd.eval.metrics import action_error_px, ceiling_frames, floor_frames, known_mask
from streamkd.eval.realism import RealismAccumulator, evaluate_references
from streamkd.eval.revisit import GAPS, evaluate_revisits
from streamkd.eval.prompt_classifier import PromptClassifier
from streamkd.generate import generate_frames
from streamkd.bundle import CausalConfig, SamplingConfig
from streamkd.models.world import WorldModel


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
    untethered_multiples: tuple[int, ...] = (),
    untethered_episodes: int = 2,
    revisit_episodes: int = 0,
    revisit_gaps: tuple[int, ...] = GAPS,
    oracle_max_gap: int | None = 8,
    t2v_episodes: int = 0,
) -> dict:
    """Metrics over ``episodes`` held-out episodes starting at index ``seed``.

    Always: fidelity, action error, floor/ceiling, frames/s and first-frame latency (generated
    frames only), prompt accuracy (whole frames, and on the pixels frame 0 did not show),
    unseen-region realism with its reference rows (``realism``, ``realism_references``). For
    streaming (causal) runs also ``drift_psnr``: fidelity over the frames ``[(k-1)H, kH)`` of
    tethered rollouts ``max(k) * H`` frames long (H = the teacher's horizon), beside the floor and
    ceiling on the same episodes, and ``psnr_curve`` (for the plot). Opt-in (the CLI turns them on
    for causal checkpoints): ``untethered_multiples`` (drift statistics of random-action rollouts,
    ``streamkd.eval.drift``; realism is then measured on their first 10 horizons),
    ``revisit_episodes`` per gap (``streamkd.eval.revisit``), ``t2v_episodes`` (text-to-video:
    no first frame, prompt accuracy on every frame).
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
    unseen_acc, main_frames = [], []
    gen_time, steady_time, steady_frames = 0.0, 0.0, 0
    for i in range(seed, seed + episodes):
        ep = heldout_episode(i, frames, world)
        t0 = time.perf_counter()
        out, latency = run(ep)
        elapsed = time.perf_counter() - t0
        gen_time += elapsed
        latencies.append(latency)
        if causal is not None and frames > causal.chunk_frames:  # steady state: the chunks after the first
            steady_time += elapsed - latency
            steady_frames += frames - causal.chunk_frames
        main_frames.append((out, ep))
        model_rows.append(score(out, ep, world))
        floor_rows.append(score(floor_frames(ep.frames[0], frames), ep, world))
        ceiling_rows.append(score(ceiling_frames(ep.frames[0], ep.actions, world), ep, world))
        prompt_acc.append(classifier.accuracy(out[1:], ep.prompt))
        unseen_acc.append(classifier.accuracy(out[1:], ep.prompt, ~known_mask(ep.actions, world)[1:]))
        colour_ok.append(classifier.colour_correct(out[1:], ep.prompt))
    result = _pool(model_rows)
    # speed (DESIGN section 6): only generated frames count (frame 0 is given)
    result["fps_end_to_end"] = episodes * (frames - 1) / gen_time
    result["fps_steady_state"] = steady_frames / steady_time if steady_time > 0 else None
    result["first_frame_latency_ms"] = 1000 * float(np.median(latencies))
    result["prompt_accuracy"] = float(np.mean(prompt_acc))
    result["prompt_accuracy_unseen"] = float(np.nanmean(unseen_acc)) if not np.all(np.isnan(unseen_acc)) else None
    result["landmark_colour_accuracy"] = float(np.mean(colour_ok))
    result["prompt_accuracy_ground_truth"], result["landmark_colour_accuracy_ground_truth"] = classifier.heldout_accuracy()
    result["floor"] = _pool(floor_rows)
    result["ceiling"] = _pool(ceiling_rows)
    gap = result["ceiling"]["fidelity_psnr"] - result["floor"]["fidelity_psnr"]
    result["gap_closed"] = (result["fidelity_psnr"] - result["floor"]["fidelity_psnr"]) / gap if gap > 0 else float("nan")
    result["episodes"], result["frames"], result["first_seed_index"] = episodes, frames, seed
    realism_episodes = main_frames
    if causal is not None:
        result.update(_drift(run, model, drift_multiples, drift_episodes, seed))
    needs_stream = [name for name, on in (("untethered drift", untethered_multiples), ("revisit", revisit_episodes)) if on]
    if needs_stream and causal is None:
        raise ValueError(f"{' and '.join(needs_stream)} stream the model: this checkpoint has no causal config "
                         "(config.json 'causal'); pass --causal to stream a bidirectional checkpoint")
    if untethered_multiples:
        untethered, realism_episodes = _untethered(run, model, untethered_multiples, untethered_episodes, seed + 1000)
        result["drift_untethered"] = untethered
    result.update(_realism(realism_episodes, world, seed))
    if revisit_episodes:
        result["revisit"] = evaluate_revisits(model, episodes=revisit_episodes, first_index=seed + 2000, gaps=revisit_gaps,
                                              sampling=sampling, causal=causal, oracle_max_gap=oracle_max_gap)
    if t2v_episodes:
        result.update(_text_to_video(model, classifier, t2v_episodes, seed + 3000, frames, sampling, causal))
    return result


def _realism(episodes: list[tuple[np.ndarray, Episode]], world: ToyWorldConfig, seed: int) -> dict:
    """Unseen-region realism of the model's frames (pixels frame 0 did not show) beside the
    reference "models" on the same episodes."""
    acc = RealismAccumulator()
    refs = []
    for out, ep in episodes:
        mask_THW = ~known_mask(ep.actions, world)[1:]
        acc.add(out[1:], ep.frames[1:], mask_THW, ep.prompt)
        refs.append((ep.frames[1:], mask_THW, ep.prompt))
    return {"realism": acc.result(), "realism_references": evaluate_references(refs, seed),
            "realism_frames": int(sum(len(out) - 1 for out, _ in episodes))}


def _untethered(run, model: WorldModel, multiples: tuple[int, ...], episodes: int, first_index: int):
    """Drift statistics of untethered random-action rollouts ``max(multiples) * H`` long (and the
    episodes' first 10 horizons, for realism)."""
    world, H = model.cfg.world, model.cfg.horizon_frames
    total = max(multiples) * H
    windows = horizon_windows(multiples, H)
    acc = DriftStats(windows, world)
    truths, heads = [], []
    for i in range(first_index, first_index + episodes):
        ep = heldout_episode(i, total, world)
        out, _ = run(ep)
        acc.add(out, ep.frames, ep.actions)
        truths.append((ep.frames, ep.actions))
        head = min(total, 10 * H)
        heads.append((out[:head], Episode(ep.seed, ep.prompt, ep.actions[:head], ep.frames[:head])))
    floor = DriftStats(windows, world)
    for frames_THWC, actions in truths:
        floor.add(floor_frames(frames_THWC[0], total), frames_THWC, actions)
    return {"model": acc.result(), "ground_truth": ground_truth_reference(truths, windows, world),
            "floor_frame0": floor.result(), "episodes": episodes, "frames": total}, heads


def _text_to_video(model: WorldModel, classifier: PromptClassifier, episodes: int, first_index: int, frames: int,
                   sampling, causal) -> dict:
    """Text-to-video: no first frame; the biome must come from the prompt alone. Realism is
    measured on every pixel (nothing was shown), against the episode's ground truth: the whole
    frame is the model's picture of the prompt's world -- palette, texture, landmarks."""
    world = model.cfg.world
    acc, realism = [], RealismAccumulator()
    for i in range(first_index, first_index + episodes):
        ep = heldout_episode(i, frames, world)
        chunks = generate_frames(model, prompt=ep.prompt, seed=ep.seed, actions=ep.actions.tolist(), first_frame=None,
                                 sampling=sampling, causal=causal)
        out = np.concatenate(list(chunks))
        acc.append(classifier.accuracy(out, ep.prompt))
        realism.add(out, ep.frames, np.ones(out.shape[:3], dtype=bool), ep.prompt)
    return {"t2v_prompt_accuracy": float(np.mean(acc)), "t2v_episodes": episodes, "t2v_chance": 1.0 / len(classifier.biomes),
            "t2v_realism": realism.result()}


def _drift(run, model: WorldModel, multiples: tuple[int, ...], episodes: int, seed: int) -> dict:
    """Tethered drift: fidelity on known pixels over windows of long tethered rollouts, for the
    model and, on the same episodes, the floor (frame 0 repeated: on a tethered walk it stays
    close to the view, so it scores well -- the number a model must beat) and the ceiling."""
    world, H = model.cfg.world, model.cfg.horizon_frames
    total = max(multiples) * H
    err = {name: np.zeros(total) for name in ("model", "floor", "ceiling")}
    cnt_T = np.zeros(total)
    for i in range(seed, seed + episodes):
        ep = heldout_episode(i, total, world, tethered=True)
        out, _ = run(ep)
        mask_THW = known_mask(ep.actions, world)
        refs = {"model": out, "floor": floor_frames(ep.frames[0], total), "ceiling": ceiling_frames(ep.frames[0], ep.actions, world)}
        for name, frames_THWC in refs.items():
            diff = (frames_THWC.astype(np.float64) - ep.frames.astype(np.float64)) / 255.0
            err[name] += ((diff**2).sum(-1) * mask_THW).sum((1, 2))
        cnt_T += mask_THW.sum((1, 2)) * 3

    def windows(err_T: np.ndarray) -> dict[str, float]:
        out = {}
        for k in multiples:
            lo = 1 if k == 1 else (k - 1) * H
            out[f"{k}x"] = _psnr(err_T[lo : k * H].sum(), cnt_T[lo : k * H].sum())
        return out

    curve = [_psnr(e, c) for e, c in zip(err["model"][1:], cnt_T[1:])]
    return {"drift_psnr": windows(err["model"]), "drift_psnr_floor": windows(err["floor"]),
            "drift_psnr_ceiling": windows(err["ceiling"]), "psnr_curve": curve, "drift_episodes": episodes}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per evaluated checkpoint, plus the floor and ceiling of the first (their tethered
    drift columns measured on the same episodes)."""
    cols = ["fidelity_psnr", "action_error_px", "drift_psnr 1x", "drift_psnr 10x", "t2v_prompt_accuracy",
            "fps_end_to_end", "fps_steady_state", "first_frame_latency_ms"]
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def cell(r: dict, c: str, drift_key: str = "drift_psnr") -> str:
        if c.startswith("drift_psnr"):
            v = r.get(drift_key, {}).get(c.split()[1])
        else:
            v = r.get(c)
        return "–" if v is None else f"{v:.3f}" if c == "action_error_px" else f"{v:.2f}"

    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(r, c) for c in cols) + " |")
    first = next(iter(results.values()))
    # tethered drift references come from the first streaming run (a bidirectional teacher has none)
    drifting = next((r for r in results.values() if "drift_psnr_floor" in r), first)
    # text-to-video prompt accuracy: the floor guesses a biome (chance), the ceiling is the
    # classifier on held-out ground truth
    t2v_refs = {"floor": first.get("t2v_chance"), "ceiling": first.get("prompt_accuracy_ground_truth")}
    for ref in ("floor", "ceiling"):
        row = dict(first[ref], **{f"drift_psnr_{ref}": drifting.get(f"drift_psnr_{ref}", {})})
        row["t2v_prompt_accuracy"] = t2v_refs[ref] if "t2v_prompt_accuracy" in first else None
        lines.append(f"| {ref} | " + " | ".join(cell(row, c, f"drift_psnr_{ref}") for c in cols) + " |")
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


def _f(v, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def realism_table(results: dict[str, dict]) -> str:
    """Unseen-region realism: each checkpoint, then the references of the first (on its episodes)."""
    cols = ["contrast_ratio", "hf_energy_ratio", "palette_distance", "landmark_recall", "landmark_colour_recall"]
    lines = ["| unseen pixels | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        if "realism" in r:
            lines.append(f"| {name} | " + " | ".join(_f(r["realism"].get(c)) for c in cols) + " |")
        if "t2v_realism" in r:  # every pixel of text-to-video frames (nothing shown)
            lines.append(f"| {name} (text-to-video, all pixels) | " + " | ".join(_f(r["t2v_realism"].get(c)) for c in cols) + " |")
    first = next((r for r in results.values() if "realism_references" in r), None)
    if first is not None:
        for ref, figures in first["realism_references"].items():
            lines.append(f"| {ref.replace('_', ' ')} | " + " | ".join(_f(figures.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def revisit_table(results: dict[str, dict]) -> str:
    """Returning-pixel PSNR / SSIM by gap, observed and generated protocols, with the references."""
    head = (["observed " + f"{g}x" for g in GAPS] + ["generated " + f"{g}x" for g in GAPS] + ["in-window (generated)"]
            + ["history bytes held " + " / ".join(f"{g}x" for g in GAPS) + " (way back: first - last chunk)"])
    lines = ["| revisits: PSNR dB / SSIM | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]

    def row(label: str, rv: dict, held: dict | None = None) -> str:
        cells = []
        for protocol in ("observed", "generated"):
            for g in GAPS:
                fig = rv[protocol]["returning"][str(g)]
                cells.append("–" if fig["psnr"] is None else f"{fig['psnr']:.2f} / {fig['ssim']:.2f}")
        win = rv["generated"]["in_window"]
        cells.append("–" if win["psnr"] is None else f"{win['psnr']:.2f} / {win['ssim']:.2f}")
        cells.append("–" if not held else " / ".join(
            f"{100 * held[str(g)][0]:.0f}-{100 * held[str(g)][1]:.0f}%" if str(g) in held else "–" for g in GAPS))
        return f"| {label} | " + " | ".join(cells) + " |"

    first = None
    for name, r in results.items():
        if "revisit" in r:
            first = first or r["revisit"]
            lines.append(row(name, r["revisit"]["model"], r["revisit"].get("history_held")))
            lines.append(row(f"{name}: full-KV oracle", r["revisit"]["full_kv_oracle"]))
    if first is not None:
        for ref in ("floor_mean_colour", "floor_other_place", "ceiling"):
            lines.append(row(ref.replace("_", " "), first[ref]))
    return "\n".join(lines)


def untethered_table(results: dict[str, dict]) -> str:
    """Untethered drift: ratios to ground truth, out-of-range share, frozen and blank frames."""
    lines = ["| untethered drift | window | brightness ratio | contrast ratio | HF ratio | out of range (contrast / HF) | frozen | black or white frames |",
             "|---|---|---|---|---|---|---|---|"]

    def rows(label: str, by_window: dict) -> None:
        for window, w in by_window.items():
            m = w["model"]
            lines.append(f"| {label} | {window} | {_f(w['ratio']['brightness'])} | {_f(w['ratio']['contrast'])} | "
                         f"{_f(w['ratio']['hf_energy'])} | {_f(w['out_of_range']['contrast'])} / {_f(w['out_of_range']['hf_energy'])} | "
                         f"{_f(m['frozen'])} | {_f(m['black_frames'] + m['white_frames'])} |")

    first = None
    for name, r in results.items():
        if "drift_untethered" in r:
            first = first or r["drift_untethered"]
            rows(name, r["drift_untethered"]["model"])
    if first is not None:
        rows("floor: frame 0 repeated", first["floor_frame0"])
        rows("ground truth", first["ground_truth"])
    return "\n".join(lines)


def markdown_report(results: dict[str, dict]) -> str:
    """Every table of a run: the main one, realism, and (when measured) revisits and untethered drift."""
    parts = [markdown_table(results), realism_table(results)]
    if any("revisit" in r for r in results.values()):
        parts.append(revisit_table(results))
    if any("drift_untethered" in r for r in results.values()):
        parts.append(untethered_table(results))
    return "\n\n".join(parts)


def wandering_frames(model: WorldModel, index: int, frames: int, sampling=None, causal=None) -> tuple[np.ndarray, np.ndarray]:
    """One held-out random-action (untethered) episode: the model's frames and the ground truth,
    for the frame grid -- where the camera wanders off, unseen places show what the model paints."""
    ep = heldout_episode(index, frames, model.cfg.world)
    chunks = generate_frames(model, prompt=ep.prompt, seed=ep.seed, actions=ep.actions.tolist(),
                             first_frame=ep.frames[0], sampling=sampling, causal=causal or model.cfg.causal)
    return np.concatenate(list(chunks)), ep.frames

