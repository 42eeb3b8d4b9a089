"""Parallelism, applied from outside the model code (which stays single-device).

Launch with ``torchrun --nproc_per_node N -m streamkd.cli train ...``: the trainers call
``init()``, which joins the process group torchrun describes (NCCL on CUDA, gloo on CPU), then
``parallelize()`` shards the world model with FSDP2 (``fully_shard`` per DiT block, then the DiT
and the prompt encoder: parameters, gradients and optimizer state are split across ranks; the
codec's buffers stay whole on every rank).

Data parallel semantics are chosen so that N processes reproduce the single-process run: every
rank draws the *global* batch's randomness from the same generator and computes the loss on its
own equal slice of rows; FSDP averages gradients, so the update is the global-batch mean.

Checkpoints go through ``torch.distributed.checkpoint.state_dict``: full (unsharded) state dicts,
written by rank 0 only, readable by any world size -- a run can resume on a different number of
processes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def rows(self, batch: int) -> slice:
        """This rank's slice of a global batch (equal slices: the mean over ranks is the global mean)."""
        if batch % self.world:
            raise ValueError(f"batch_size {batch} must be divisible by the number of processes ({self.world})")
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (for logging and NaN checks every rank agrees on)."""
        if not self.enabled:
            return float(value.detach())
        v = value.detach().float().clone()
        dist.all_reduce(v)
        return float(v) / self.world


def init() -> DistInfo:
    """Join torchrun's process group if there is one (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Leave the process group (no-op outside torchrun). Called when a launched job ends: a group
    left to interpreter teardown can abort the process ("terminate called without an active
    exception") after all work succeeded, which torchrun reports as a failed rank."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int) -> None:
    """End a torchrun worker whose job has finished (every checkpoint closed, the group left).

    Interpreter teardown of a process that ran gloo collectives is not safe: destructors of
    torch's C++ objects (gloo work queues, FSDP2 hooks) race the finalizer. Twice in CI (2 cores)
    a rank aborted with "terminate called without an active exception" *after* the job had
    succeeded -- once with the group already destroyed; it never reproduced in dozens of local runs. torchrun then
    reports the job as failed. A worker that is done has nothing left to tear down, so it flushes
    its streams and leaves with ``os._exit``. Outside torchrun this returns and the caller exits
    normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def parallelize(model: torch.nn.Module, engine: str = "fsdp2", compute_dtype: torch.dtype | None = None) -> None:
    """Shard ``model`` (a model bundle) in place. Call before creating its optimizer.

    ``compute_dtype`` (bf16 training of fp32 master weights): parameters are all-gathered in that
    dtype and gradients reduced in fp32 (FSDP2's ``MixedPrecisionPolicy``)."""
    if engine != "fsdp2":
        raise ValueError(f"unknown parallel engine {engine!r}; this build supports 'fsdp2'")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if compute_dtype is not None and compute_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # Trainers call model.dit(...) and model.encode_prompts(...), not model(...): FSDP2's gather
    # hooks sit on forward(), so the modules whose forward runs are the ones sharded.
    for block in model.dit.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model.dit, **kwargs)
    # a text encoder inside the module tree (the toy world's, trained with the teacher) is sharded
    # too; a frozen one kept outside it (Wan's UMT5, shared by every bundle) is replicated
    if any(module is model.text_encoder for module in model.children()):
        fully_shard(model.text_encoder, **kwargs)


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state.

    A root module that ran forward without backward (a prompt encoder called under no_grad in a
    rollout) keeps its parameters unsharded; elementwise updates across two models (EMA) need
    both sharded alike. A no-op for unsharded models.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state dicts; a collective under FSDP (call on every rank)."""
    if opt is None:
        model_sd, _ = get_state_dict(model, [], options=_FULL)
        return model_sd, None
    return get_state_dict(model, opt, options=_FULL)


def load_full_state(model: torch.nn.Module, model_sd: dict, opt: torch.optim.Optimizer | None = None, opt_sd: dict | None = None) -> None:
    options = StateDictOptions(full_state_dict=True)
    if opt is None:
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=options)
    else:
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd, options=options)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
