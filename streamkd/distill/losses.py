"""Distillation losses: ODE regression, DMD (distribution matching) and the critic's flow matching.

Conventions as in ``streamkd.sampling.schedule``: ``x_s = (1 - s) x0 + s noise``, models predict
``v = noise - x0``, so ``x0_hat = x_s - s v``. Frame 0 may be the given first frame: it is held
clean (t = 0) in every pass and left out of every loss (``weight_BF``).

DMD (Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024,
eq. 7-8; DMD2 for the two-time-scale critic): the gradient of KL(p_student || p_data) w.r.t. a
student sample ``x`` is estimated, at a random noise level ``s``, by the difference of the two
denoisers' x0 predictions on ``x_s``:

    grad = (x0_fake(x_s) - x0_real(x_s)) / mean|x - x0_real(x_s)|        (normalised, eq. 8)

``x0_real`` is the teacher with CFG, ``v = v_uncond + g (v_cond - v_uncond)`` (``g`` =
``teacher_guidance``, 1 disables it); ``x0_fake`` is the critic, a copy of the teacher trained with
flow matching on the student's own samples. The generator minimises
``0.5 || x - stopgrad(x - grad) ||^2``, whose gradient w.r.t. ``x`` is exactly ``grad``.
"""

from __future__ import annotations

import torch

from streamkd.attention.layout import CausalLayout
from streamkd.bundle import ModelBundle
from streamkd.sampling.schedule import shift_sigmas
from streamkd.sampling.stream import ImageInputs, guided, with_image


def _bcast(s_BF: torch.Tensor) -> torch.Tensor:
    return s_BF[:, None, :, None, None]


def weighted_mse(a: torch.Tensor, b: torch.Tensor, weight_BF: torch.Tensor) -> torch.Tensor:
    """Mean squared error per frame, averaged with per-frame weights (fp32)."""
    err_BF = (a.float() - b.float()).pow(2).mean(dim=(1, 3, 4))
    return (err_BF * weight_BF).sum() / weight_BF.sum()


def ode_regression_loss(
    student: ModelBundle, layout: CausalLayout, x_levels: torch.Tensor, sigmas: list[float], context: torch.Tensor,
    actions: torch.Tensor | None, gen: torch.Generator, global_batch: tuple[int, slice] | None = None,
    first_given: bool = True, image: ImageInputs | None = None,
) -> torch.Tensor:
    """Self-Forcing / CausVid ODE init: each chunk gets its own random level ``k``; the student,
    block-causal, maps the teacher's trajectory point ``x_levels[:, k]`` to its end ``x_levels[:, -1]``.

    ``x_levels``: ``(B, K+1, C, F, h, w)``; frame 0 is the given first frame when ``first_given``
    (image-to-video: held clean, not scored), else generated like the rest (text-to-video, and
    Wan2.1 image-to-video, whose image enters through ``image``).
    ``global_batch``: (size, rows) when ``x_levels`` is a data-parallel slice; the levels are drawn
    for the whole batch.
    """
    B, K1, _, num_f = x_levels.shape[:4]
    num_chunks = -(-num_f // layout.chunk_frames)
    size, rows = global_batch or (B, slice(None))
    level_BC = torch.randint(0, K1 - 1, (size, num_chunks), generator=gen)[rows]
    dev = x_levels.device  # levels are drawn on the host generator (every rank alike), used on the device
    level_BF = level_BC.repeat_interleave(layout.chunk_frames, 1)[:, :num_f].to(dev)
    frames_F = torch.arange(num_f, device=dev)
    x_in = torch.stack([x_levels[b, level_BF[b], :, frames_F] for b in range(B)])  # (B, F, C, h, w)
    x_in = x_in.permute(0, 2, 1, 3, 4)
    s_BF = torch.tensor(sigmas, dtype=torch.float32, device=dev)[level_BF]
    x0 = x_levels[:, -1]
    weight_BF = torch.ones(B, num_f, device=dev)
    if first_given:
        s_BF[:, 0] = 0.0
        x_in[:, :, 0] = x0[:, :, 0]
        weight_BF[:, 0] = 0.0
    x_dit, kw = with_image(x_in, image)
    v = student.dit(x_dit, 1000.0 * s_BF, context, actions, layout=layout, **kw)
    return weighted_mse(x_in - _bcast(s_BF) * v, x0, weight_BF)


def sample_levels(B: int, num_f: int, gen: torch.Generator, shift: float, s_min: float, s_max: float,
                  first_given: bool = True) -> torch.Tensor:
    """One noise level per clip, ``shift(U[0,1])`` clamped to ``[s_min, s_max]``; frame 0 at 0
    when it is the given first frame."""
    s = shift_sigmas(torch.rand(B, generator=gen), shift).clamp(s_min, s_max)
    s_BF = s[:, None].expand(B, num_f).clone()
    if first_given:
        s_BF[:, 0] = 0.0
    return s_BF


def _frame_weights(s_BF: torch.Tensor) -> torch.Tensor:
    """Per-frame loss weights: frames held clean (the given first frame, level 0) do not count."""
    return (s_BF > 0).float()


def dmd_loss(
    x0_student: torch.Tensor, teacher: ModelBundle, critic: ModelBundle, context_2B: torch.Tensor, actions_2B: torch.Tensor | None,
    s_BF: torch.Tensor, noise: torch.Tensor, teacher_guidance: float, anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
    image: ImageInputs | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD generator loss on a batch of student clips (gradient flows into ``x0_student`` only);
    its statistics stay tensors (the trainer reads them once per step, with the loss).

    ``context_2B`` / ``actions_2B``: conditional rows then unconditional rows (empty prompt, null
    actions) for the teacher's CFG; the critic uses the conditional half. ``anchor``: the stream's
    first frame for clips that are windows of longer rollouts (``DiT.forward``), ``B`` rows.
    ``image``: the clips' image-to-video inputs (Wan2.1 I2V), ``B`` rows.
    """
    B, num_f = s_BF.shape
    with torch.no_grad():
        x = x0_student.detach()
        x_s = (1 - _bcast(s_BF)) * x + _bcast(s_BF) * noise
        t = 1000.0 * s_BF
        rows = 2 if teacher_guidance != 1.0 else 1
        anchor_rows = None if anchor is None else (anchor[0].repeat(rows, 1, 1, 1), anchor[1].repeat(rows, 1))
        actions_real = None if actions_2B is None else actions_2B[: rows * B]
        actions_fake = None if actions_2B is None else actions_2B[:B]
        x_real, kw_real = with_image(x_s.repeat(rows, 1, 1, 1, 1), image, rows)
        v_real = guided(teacher.dit(x_real, t.repeat(rows, 1), context_2B[: rows * B], actions_real,
                                    anchor=anchor_rows, **kw_real), B, teacher_guidance)
        x_fake, kw_fake = with_image(x_s, image)
        v_fake = critic.dit(x_fake, t, context_2B[:B], actions_fake, anchor=anchor, **kw_fake)
        x0_real = x_s - _bcast(s_BF) * v_real
        x0_fake = x_s - _bcast(s_BF) * v_fake
        norm = (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = (x0_fake - x0_real) / norm
        target = x - grad
    return 0.5 * weighted_mse(x0_student, target, _frame_weights(s_BF)), {"dmd_grad_norm": grad.pow(2).mean().sqrt()}


def critic_loss(
    critic: ModelBundle, x0_student: torch.Tensor, context_B: torch.Tensor, actions_B: torch.Tensor, s_BF: torch.Tensor,
    noise: torch.Tensor, anchor: tuple[torch.Tensor, torch.Tensor] | None = None, image: ImageInputs | None = None,
) -> torch.Tensor:
    """Flow matching of the fake-score critic on (detached) student samples (``anchor`` and
    ``image`` as in ``dmd_loss``)."""
    x = x0_student.detach()
    x_s = (1 - _bcast(s_BF)) * x + _bcast(s_BF) * noise
    x_in, kw = with_image(x_s, image)
    v = critic.dit(x_in, 1000.0 * s_BF, context_B, actions_B, anchor=anchor, **kw)
    return weighted_mse(v, noise - x, _frame_weights(s_BF))
