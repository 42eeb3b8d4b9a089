"""Whole-clip sampling with a bidirectional model (the teacher): all frames denoised together.

Same conventions as ``streamkd.sampling.stream`` (per-frame timesteps, frame 0 held clean for
image-to-video, CFG as ``uncond + s (cond - uncond)`` dropping prompt and actions together).
A Wan2.1 image-to-video model (``dit.cfg.image_dim`` set) is conditioned as its pipeline does
instead: every frame is denoised, and the first frame enters as concatenated condition channels and
CLIP tokens (``WanModel.image_inputs``), the same in both CFG rows (only the prompt is dropped).
"""

from __future__ import annotations

import torch

from streamkd.bundle import ModelBundle
from streamkd.sampling.stream import guided, with_image


@torch.no_grad()
def sample_clip(
    model: ModelBundle,
    sampler,
    prompts: list[str],
    first_frames_BHWC: torch.Tensor | None,
    actions_BF: torch.Tensor | None,
    num_frames: int,
    generator: torch.Generator,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Clean latents ``(B, C, num_frames, h, w)``."""
    B = len(prompts)
    param = model.dit.proj_out.weight
    device, dtype = param.device, param.dtype
    shape = (B, model.codec.latent_channels, num_frames, *model.latent_hw)
    use_cfg = guidance_scale != 1.0
    context = model.encode_prompts(list(prompts) + ([model.null_prompt] * B if use_cfg else [])).to(dtype)
    actions = None
    if actions_BF is not None and model.dit.action_embed is not None:
        actions = actions_BF.to(device)
        if use_cfg:
            actions = torch.cat([actions, torch.full_like(actions, model.dit.null_action)])
    rows = 2 if use_cfg else 1
    image = None
    if model.dit.cfg.image_dim is not None:  # Wan2.1 I2V (a WanModel): the first frame as CLIP tokens + channels
        if first_frames_BHWC is None:
            raise ValueError("this is an image-to-video model: pass the first frames (generate: --image)")
        image = model.image_inputs(first_frames_BHWC, num_frames)
        first_frames_BHWC = None  # not held clean: the condition carries it
    first = None if first_frames_BHWC is None else model.codec.encode(first_frames_BHWC[:, None]).to(device, dtype)
    x = torch.randn(shape, generator=generator).to(device, dtype)
    t_BF = torch.empty(B * rows, num_frames, device=device)
    for i in range(sampler.num_steps):
        if first is not None:
            x[:, :, :1] = first
        t_BF.fill_(1000.0 * sampler.sigmas[i])
        if first is not None:
            t_BF[:, 0] = 0.0
        x_in, image_kw = with_image(x.repeat(rows, 1, 1, 1, 1), image, rows)
        v = guided(model.dit(x_in, t_BF, context, actions, **image_kw), B, guidance_scale)
        noise = torch.randn(shape, generator=generator).to(device, dtype) if sampler.stochastic else None
        x = sampler.step(v, i, x, noise)
    if first is not None:
        x[:, :, :1] = first
    return x
