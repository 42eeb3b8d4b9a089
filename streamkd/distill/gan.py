"""An adversarial term on the critic (DMD2: Yin et al., "Improved Distribution Matching
Distillation for Fast Image Synthesis", NeurIPS 2024, sec. 4.3).

DMD matches the student's distribution to the teacher's through the teacher's score. Where the
teacher itself paints mush (the toy teacher's unseen regions: docs/teacher.md), matching it
cannot give the student detail the teacher lacks. DMD2 adds a discriminator that compares the
student's samples with *real data*: a small head on the fake-score critic's features, trained
to tell noised real clips from noised student clips, and a non-saturating generator loss that
pushes the student's samples toward what real clips look like to it.

Here the head reads the hidden states after one transformer block of the critic (``layer``) and
gives one logit per token -- a patch discriminator over space and time: what it can judge is
local (texture, edges, an outlined landmark), not the layout. Both sides are noised to the same
level ``s`` as the critic's flow-matching loss (the critic is a denoiser at those levels, so its
features mean something there); frames held clean (a given first frame) are left out.

Legend: B clips, F latent frames, T tokens per frame, L = F x T, E width.
"""

from __future__ import annotations

import torch
from torch import nn

from streamkd.bundle import ModelBundle
from streamkd.sampling.stream import ImageInputs, with_image


class GANHead(nn.Module):
    """Per-token logits from the critic's hidden states ``(B, L, E)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, h_BLE: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(h_BLE.float())))).squeeze(-1)


def discriminate(
    critic: ModelBundle, head: GANHead, layer: int, x_BCFhw: torch.Tensor, s_BF: torch.Tensor, noise: torch.Tensor,
    context_B: torch.Tensor, actions_B: torch.Tensor | None, anchor=None, image: ImageInputs | None = None,
) -> torch.Tensor:
    """Per-frame logits ``(B, F)``: ``x`` noised to ``s``, through the critic up to block
    ``layer``, the head's token logits averaged over each frame's tokens."""
    x_s = (1 - s_BF[:, None, :, None, None]) * x_BCFhw + s_BF[:, None, :, None, None] * noise
    captured: list[torch.Tensor] = []

    class _Stop(Exception):
        pass

    def grab(_module, _inputs, output):
        captured.append(output)
        raise _Stop  # the blocks after ``layer`` and the output head are not needed

    handle = critic.dit.blocks[layer].register_forward_hook(grab)
    x_in, kw = with_image(x_s, image)
    try:
        critic.dit(x_in, 1000.0 * s_BF, context_B, actions_B, anchor=anchor, **kw)
    except _Stop:
        pass
    finally:
        handle.remove()
    logits_BL = head(captured[0])
    B, F = s_BF.shape
    return logits_BL.reshape(B, F, -1).mean(-1)


def _weighted_mean(value_BF: torch.Tensor, s_BF: torch.Tensor) -> torch.Tensor:
    weight = (s_BF > 0).float()  # frames held clean are not judged
    return (value_BF * weight).sum() / weight.sum().clamp_min(1.0)


def generator_loss(fake_logits_BF: torch.Tensor, s_BF: torch.Tensor) -> torch.Tensor:
    """Non-saturating: ``softplus(-D(fake))``, the student wants its clips called real."""
    return _weighted_mean(nn.functional.softplus(-fake_logits_BF), s_BF)


def discriminator_loss(real_logits_BF: torch.Tensor, fake_logits_BF: torch.Tensor, s_BF: torch.Tensor) -> torch.Tensor:
    """``softplus(-D(real)) + softplus(D(fake))``: real clips called real, the student's fake."""
    return _weighted_mean(nn.functional.softplus(-real_logits_BF) + nn.functional.softplus(fake_logits_BF), s_BF)
