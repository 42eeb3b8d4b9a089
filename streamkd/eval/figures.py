"""Figures of ``streamkd eval``: revisit PSNR against the gap, and a frame grid -- ground truth
beside each model along a wandering camera -- so a reader sees what the numbers say."""

from __future__ import annotations

import numpy as np

from streamkd.eval.revisit import GAPS

ROW_LABELS = {"model": "model (its cache)", "full_kv_oracle": "full-KV oracle", "floor_mean_colour": "floor: mean colour",
              "floor_other_place": "floor: another place", "ceiling": "ceiling"}


def plot_revisits(results: dict[str, dict], path: str) -> None:
    """Returning-pixel PSNR against the gap (in cache spans), observed protocol on the left,
    generated (self-consistency) on the right; one line per checkpoint, dashed references of the
    first checkpoint's run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, row) for name, r in results.items() if "revisit" in r for row in ("model", "full_kv_oracle")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    first = next((r["revisit"] for r in results.values() if "revisit" in r), None)
    handles: dict[str, object] = {}
    for ax, protocol in zip(axes, ("observed", "generated")):
        oracles_drawn: set[tuple] = set()
        for i, (name, row) in enumerate(rows):
            ys = [results[name]["revisit"][row][protocol]["returning"][str(g)]["psnr"] for g in GAPS]
            if all(y is None for y in ys):
                continue
            if row == "full_kv_oracle":  # the oracle ignores memory: one line per distinct curve
                key = tuple(ys)
                if key in oracles_drawn:
                    continue
                oracles_drawn.add(key)
            label = f"{name}: {ROW_LABELS[row]}"
            (line,) = ax.plot(GAPS, [np.nan if y is None else y for y in ys], "-o" if row == "model" else ":s",
                              color=f"C{(i // 2) % 10}", label=label)
            handles.setdefault(label, line)
        if first is not None:
            for row in ("floor_mean_colour", "floor_other_place", "ceiling"):
                ys = [first[row][protocol]["returning"][str(g)]["psnr"] for g in GAPS]
                ax.plot(GAPS, [np.nan if y is None else min(y, 45.0) for y in ys], "--", color="grey", lw=1)
                if ys[-1] is not None:
                    ax.annotate(ROW_LABELS[row], (GAPS[-1], min(ys[-1], 45.0)), fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks(GAPS, [f"{g}x" for g in GAPS])
        ax.set_xlabel("gap before the return (x sinks + window)")
        ax.set_title({"observed": "observed: vs ground truth", "generated": "generated: vs its own first rendering"}[protocol])
    axes[0].set_ylabel("PSNR of returning pixels (dB)")
    # the legend below the plots: with many rows inside it would hide the curves
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=1,
               fontsize=7, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def frame_grid(rows: dict[str, np.ndarray], frame_ids: list[int], path: str, scale: int = 2,
               titles: list[str] | None = None) -> None:
    """A PNG: one row per entry of ``rows`` (name -> uint8 ``[T, H, W, 3]``, ground truth first),
    the frames ``frame_ids`` as columns, nearest-neighbour upscaled by ``scale``. A row shorter
    than a column's frame (a bidirectional model stops at its horizon) leaves that cell empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    h, w = next(iter(rows.values())).shape[1:3]
    fig, axes = plt.subplots(len(names), len(frame_ids), figsize=(len(frame_ids) * w * scale / 100 + 1.5,
                                                                 len(names) * (h * scale / 100 + 0.15)), squeeze=False)
    for i, name in enumerate(names):
        for j, t in enumerate(frame_ids):
            ax = axes[i][j]
            if t < len(rows[name]):
                ax.imshow(rows[name][t], interpolation="nearest")
            else:
                ax.set_facecolor("white")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j] if titles else f"frame {t}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
