"""Flow-matching noise schedules and samplers (the ``set_timesteps`` / ``step`` contract).

Convention (rectified flow, as Wan2.1 and SD3): ``x_t = (1 - s) x0 + s * noise`` with noise level
``s`` in [0, 1]; the model's timestep input is ``1000 s``; the model predicts the velocity
``v = noise - x0``. Hence ``x0 = x_t - s v`` and an Euler step is ``x_{s'} = x_s + (s' - s) v``.

Shift (SD3 eq. 23, Wan's ``shift``): ``s' = shift s / (1 + (shift - 1) s)`` spends more steps at high
noise; it matters more the more tokens a frame has.

Two samplers share one interface (``sigmas``, ``step(v, i, x, noise)``):
* ``EulerSampler`` -- the teacher's many-step ODE solver.
* ``FewStepSampler`` -- the distilled student: at each listed level predict ``x0``, then re-noise it
  to the next level with fresh noise (the consistency-style sampler of DMD / Self-Forcing).
"""

from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class EulerSampler:
    """Deterministic Euler solver of the flow ODE from s=1 to s=0 over ``num_steps`` steps."""

    stochastic = False

    def __init__(self, num_steps: int, shift: float = 1.0) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.num_steps = num_steps
        self.shift = shift
        self.sigmas = shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).tolist()

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v


class FewStepSampler:
    """Predict x0 at each listed noise level, re-noise to the next (fresh noise each step)."""

    stochastic = True

    def __init__(self, sigmas: list[float] | tuple[float, ...]) -> None:
        levels = [float(s) for s in sigmas]
        if not levels or any(not 0 < s <= 1 for s in levels) or levels != sorted(levels, reverse=True):
            raise ValueError(f"few-step sigmas must be decreasing values in (0, 1], got {list(sigmas)}")
        self.num_steps = len(levels)
        self.sigmas = levels + [0.0]

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        x0 = x - self.sigmas[i] * v
        s_next = self.sigmas[i + 1]
        if s_next == 0.0:
            return x0
        assert noise is not None, "few-step sampling re-noises: pass fresh noise"
        return (1 - s_next) * x0 + s_next * noise


def make_sampler(kind: str, num_steps: int, shift: float, sigmas: list[float] | None = None):
    if kind == "euler":
        return EulerSampler(num_steps, shift)
    if kind == "few_step":
        if sigmas is None:
            sigmas = shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)[:-1].tolist()
        return FewStepSampler(sigmas)
    raise ValueError(f"unknown sampler {kind!r}; choose 'euler' or 'few_step'")
