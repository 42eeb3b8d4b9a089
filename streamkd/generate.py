"""Generate videos from a checkpoint bundle: the library behind ``streamkd generate`` and eval.

A causal checkpoint (or any checkpoint run with ``causal=CausalConfig(...)``) streams through
``StreamGenerator`` chunk by chunk: memory is constant in the number of frames. A bidirectional
checkpoint denoises its whole clip at once, up to its training horizon.

Lengths are counted in *latent* frames here (one action per latent frame); a codec that is 4x in
time (Wan's VAE) turns F latent frames into 1 + 4 (F - 1) frames (``streamkd.bundle.pixel_frames``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from streamkd.bundle import CausalConfig, ModelBundle, SamplingConfig
from streamkd.sampling.bidirectional import sample_clip
from streamkd.sampling.stream import StreamGenerator


def first_frame_for(model: ModelBundle, seed: int, prompt: str) -> np.ndarray | None:
    """The default image-to-video condition of a stream: the toy world's frame 0 for (seed,
    prompt); None (text-to-video) for a model without one."""
    return model.first_frame(seed, prompt)


def check_length(model: ModelBundle, num_frames: int, causal: CausalConfig | None) -> None:
    """Refuse, before any work, a clip a bidirectional checkpoint cannot generate (latent frames)."""
    horizon = model.horizon_frames
    if causal is None and num_frames > horizon:
        raise ValueError(
            f"this bidirectional checkpoint generates at most its horizon of {horizon} latent frames, asked for "
            f"{num_frames}; lower --frames, or stream with a causal checkpoint (or --causal)"
        )


def generate_frames(
    model: ModelBundle,
    *,
    prompt: str,
    seed: int,
    actions: list[int],
    first_frame: np.ndarray | None,
    sampling: SamplingConfig | None = None,
    causal: CausalConfig | None = None,
    observed: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Yield uint8 ``(n, H, W, 3)`` chunks: ``len(actions)`` latent frames in all, decoded
    (``pixel_frames(len(actions), codec.temporal_factor)`` frames).

    ``actions[t]`` is the move into latent frame t (ignored by a model without actions); ``first_frame`` (uint8 HWC) is frame 0 when given.
    ``causal`` forces streaming (the causal path) even for a bidirectional checkpoint.
    ``observed`` (uint8 ``(n, H, W, 3)``, n a multiple of the chunk size; streaming only): frames
    ``0 .. n-1`` are given, not generated -- the stream observes them (``StreamGenerator.observe``)
    and yields only the frames after them; frame 0 is then ``observed[0]`` (pass no first_frame).
    """
    sampling = sampling or model.cfg.sampling
    sampler = sampling.make()
    causal = causal or model.cfg.causal
    num_frames = len(actions)
    gen = torch.Generator().manual_seed(seed)
    first = None if first_frame is None else torch.from_numpy(np.ascontiguousarray(first_frame))[None]
    actions_T = torch.tensor(actions, dtype=torch.long)
    check_length(model, num_frames, causal)
    if observed is not None and causal is None:
        raise ValueError("observed frames need streaming: a causal checkpoint (or --causal)")
    if causal is None:
        latents = sample_clip(model, sampler, [prompt], first, actions_T[None], num_frames, gen, sampling.guidance_scale)
        yield model.codec.decode(latents)[0].cpu().numpy()
        return
    stream = StreamGenerator(model, sampler, causal=causal, guidance_scale=sampling.guidance_scale)
    stream.reset([prompt], first, gen)
    F = causal.chunk_frames
    done = 0
    if observed is not None:
        if first_frame is not None:
            raise ValueError("with observed frames, frame 0 is observed[0]: pass first_frame=None")
        n = len(observed)
        if observed.ndim != 4 or n == 0 or n % F or n >= num_frames:
            raise ValueError(f"observed must be uint8 (n, H, W, 3) with n a multiple of chunk_frames={F} and below "
                             f"the {num_frames} frames asked for, got shape {observed.shape}")
        stream.observe(torch.from_numpy(np.ascontiguousarray(observed))[None], actions_T[None, :n])
        done = n
    tf = model.codec.temporal_factor
    while done < num_frames:
        chunk_actions = actions_T[done : done + F]
        if len(chunk_actions) < F:  # last partial chunk: pad, then drop the extra frames
            chunk_actions = torch.cat([chunk_actions, chunk_actions[-1:].expand(F - len(chunk_actions))])
        frames = stream.decode(stream.next_chunk(chunk_actions[None]))[0]
        take = min(F, num_frames - done)
        # the first decoded chunk holds 1 + tf (F - 1) frames, later ones tf F
        yield frames[: (1 + tf * (take - 1)) if done == 0 else tf * take].cpu().numpy()
        done += take


def with_overrides(sampling: SamplingConfig, **changes) -> SamplingConfig:
    """``sampling`` with the non-None ``changes`` applied (validated again)."""
    return replace(sampling, **{k: v for k, v in changes.items() if v is not None})
