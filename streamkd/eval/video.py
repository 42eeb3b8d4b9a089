"""Fidelity against held-out videos: the ground truth a real model has (``streamkd eval --data``).

The toy world renders exact ground truth for every metric of ``streamkd.eval.run``; a Wan model
has none of that, but a folder of held-out captioned videos (``streamkd.data.video``: the format
training reads, with optional per-frame actions) is ground truth for image-to-video: each clip's
first frame and caption (and actions, for a model that takes them) condition the model, which
makes the clip's length; the frames after the first are compared with the video's.

Beside each model figure, its floor and its ceiling, measured on the same clips:

    floor    ``frame0_copy``: the first frame repeated -- what a model that ignores time scores
    ceiling  ``codec_round_trip``: the real clip through the model's own codec (encode, decode) --
             the best any latent model with this codec can score

A model's ``gap_closed`` = (model - floor) / (ceiling - floor) on PSNR: 0 is the floor, 1 the
ceiling. PSNR over frames 1.. (frame 0 is given), all pixels, per clip, then averaged over clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamkd.bundle import CausalConfig, SamplingConfig, latent_actions, pixel_frames
from streamkd.eval.metrics import psnr
from streamkd.generate import generate_frames

__all__ = ["VideoEvalResult", "evaluate_on_videos"]


@dataclass
class VideoEvalResult:
    """Mean PSNR (dB) over clips of the model and of its floor and ceiling, and the share of the
    floor-to-ceiling gap the model closes."""

    psnr: float
    floor_psnr: float
    ceiling_psnr: float
    gap_closed: float
    clips: int
    frames: int

    def as_dict(self) -> dict:
        return {
            "video_psnr": self.psnr, "floor": {"video_psnr": self.floor_psnr}, "ceiling": {"video_psnr": self.ceiling_psnr},
            "gap_closed": self.gap_closed, "clips": self.clips, "frames": self.frames,
            "counts": "video_psnr: PSNR (dB) of frames 1.. against the held-out video's, all pixels, mean over clips; "
                      "floor: the first frame repeated; ceiling: the video through the model's codec (encode + decode)",
        }


def evaluate_on_videos(model, source: str | Path, *, clips: int, seed: int = 0, sampling: SamplingConfig | None = None,
                       causal: CausalConfig | None = None) -> VideoEvalResult:
    """Image-to-video fidelity of ``model`` on the first ``clips`` videos of ``source`` (a folder
    or manifest), at the model's size and horizon (``streamkd.data.video.VideoClipDataset``)."""
    from streamkd.data.video import VideoClipDataset

    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    tf = model.codec.temporal_factor
    F = model.horizon_frames
    H, W = model.frame_hw
    data = VideoClipDataset(source, pixel_frames(F, tf), H, W)
    if len(data) < clips:
        raise ValueError(f"{source} holds {len(data)} usable videos; asked to evaluate {clips}: pass --episodes {len(data)}")
    model_db, floor_db, ceiling_db = [], [], []
    for i in range(clips):
        clip = data[i]
        real = clip["frames"].numpy()  # (T, H, W, 3) uint8
        if model.num_actions and "actions" in clip:
            actions = latent_actions(clip["actions"][None], tf)[0].tolist()
        else:
            actions = [0] * F  # ignored by a model without actions
        made = np.concatenate(list(generate_frames(model, prompt=clip["prompt"], seed=seed + i, actions=actions,
                                                   first_frame=real[0], sampling=sampling, causal=causal)))
        with torch.no_grad():
            round_trip = model.codec.decode(model.codec.encode(clip["frames"][None]))[0].cpu().numpy()
        model_db.append(psnr(made[1:], real[1:]))
        floor_db.append(psnr(np.repeat(real[:1], len(real) - 1, axis=0), real[1:]))
        ceiling_db.append(psnr(round_trip[1:], real[1:]))
    m, lo, hi = (float(np.mean(x)) for x in (model_db, floor_db, ceiling_db))
    return VideoEvalResult(m, lo, hi, (m - lo) / (hi - lo) if hi > lo else float("nan"), clips, len(real))
