"""Devices, precision, activation checkpointing and compile: applied to a model bundle from outside.

Model code is single-device and dtype-agnostic; this module decides where a bundle runs and in
what precision, in one place and in a fixed order (torchtitan's parallelize order):

    place on the device  ->  activation checkpointing per DiT block  ->  torch.compile per block  ->  FSDP2

Precision (``precision: bf16``, DESIGN §3):

* **trainable** models (student, critic, teacher being pretrained) keep fp32 parameters -- the
  master weights the optimizer updates -- and run their forward under ``torch.autocast`` in
  bf16; under FSDP2 the parameters are also all-gathered in bf16 and gradients reduced in fp32
  (``MixedPrecisionPolicy``). Losses are computed in fp32 (the loss functions upcast).
* **frozen** models (a distillation teacher, the EMA used for sampling) are stored in bf16: they
  need no master copy.
* **codecs stay fp32**: the toy PCA codec and the Wan VAE decode in fp32 (bf16 decoding bands
  colours; diffusers runs the Wan VAE in fp32 too).

Activation checkpointing recomputes each DiT block's activations in the backward pass instead of
storing them (memory ~ each block's input plus one block's activations instead of all of them),
the rollouts' cache-reading passes included (``checkpoint_blocks``). It is only active while
autograd records: the KV-cache-writing passes run under ``no_grad`` and are never recomputed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class RuntimeConfig:
    device: str = "auto"
    """``auto`` (the local rank's CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``. Under torchrun ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 compute with fp32 master weights and fp32 losses (see the module docstring)."""
    activation_checkpointing: bool = False
    """Recompute each DiT block in the backward pass (training memory ~ one block's activations)."""
    compile: bool = False
    """``torch.compile`` each DiT block (the first steps pay the compile time)."""
    compile_backend: str = "inductor"
    """torch.compile backend (``inductor``; ``aot_eager`` checks tracing without generating code)."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device {self.device!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
            if dev.type not in ("cpu", "cuda", "meta"):
                raise ValueError(f"device {self.device!r}: streamkd runs on cpu or cuda (auto picks)")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV caches, frozen weights)."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def torch_device(self) -> torch.device:
        """The device this process works on; refuses a CUDA device on a machine without one."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.device == "auto":
            return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} asked for, but torch sees no CUDA GPU "
                                 f"(torch {torch.__version__}); use device: cpu or auto")
            if dev.index is None:
                dev = torch.device("cuda", local_rank)
        return dev

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context of trainable models: bf16 autocast, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device().type, dtype=torch.bfloat16)


def place(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move a bundle to ``device``; with ``dtype``, cast its denoiser and text encoder (the codec
    stays fp32). Frozen components kept outside the module tree (Wan's shared UMT5 and VAE) move
    through the bundle's own ``to``."""
    model.to(device)
    if dtype is not None and dtype != torch.float32:
        model.dit.to(dtype)
        text = getattr(model, "text_encoder", None)
        if isinstance(text, nn.Module):
            text.to(dtype)
    return model


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing on every DiT block (non-reentrant: works with FSDP2's hooks and
    with keyword arguments). Wraps the instance's ``forward``, so parameter names and state dicts
    do not change.

    Full-sequence passes (teacher, critic, the ODE and DMD losses) and the self-forcing rollout's
    exit-step passes, which read the KV cache, are checkpointed. The chunk's cache-writing pass
    runs after such a pass and before the backward, so its recomputation must not read the cache:
    the pass keeps the history it read in its attention plan (``_SelfAttnPlan.history``), and the
    recomputation reads that. Cache-writing passes run without a graph and are never checkpointed."""
    from torch.utils.checkpoint import checkpoint

    for block in model.dit.blocks:
        inner = block.forward

        # DiTBlock.forward(x, ctx, tproj, plan, layer, kv_only=False)
        def forward(x, ctx, tproj, plan, layer, _inner=inner, **kwargs):
            if not torch.is_grad_enabled() or plan.write_cache:
                return _inner(x, ctx, tproj, plan, layer, **kwargs)
            return checkpoint(_inner, x, ctx, tproj, plan, layer, use_reentrant=False, **kwargs)

        block.forward = forward


def compile_blocks(model: nn.Module, backend: str) -> None:
    """``torch.compile`` each DiT block in place (block by block: one small graph reused by every
    layer, as torchtitan does, instead of one graph for the whole model)."""
    for block in model.dit.blocks:
        block.compile(backend=backend)


def prepare(model: nn.Module, runtime: RuntimeConfig, *, trainable: bool) -> nn.Module:
    """Place ``model`` and apply checkpointing / compile (trainable models) in the fixed order.
    FSDP2 comes after (``streamkd.distributed.parallelize``), then the optimizer."""
    device = runtime.torch_device()
    place(model, device, None if trainable else runtime.dtype)
    if trainable and runtime.activation_checkpointing:
        checkpoint_blocks(model)
    if runtime.compile:
        compile_blocks(model, runtime.compile_backend)
    return model
