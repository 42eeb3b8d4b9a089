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

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from streamkd.bundle import trains_text_encoder
from streamkd.checkpoint import CheckpointError


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

    def per_rank(self, batch: int) -> int:
        """Rows of a global batch each rank works on."""
        if batch % self.world:
            raise ValueError(f"batch_size {batch} must be divisible by the number of processes ({self.world})")
        return batch // self.world

    def rows(self, batch: int) -> slice:
        """This rank's slice of a global batch (equal slices: the mean over ranks is the global mean)."""
        per = self.per_rank(batch)
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (for logging and NaN checks every rank agrees on)."""
        if not self.enabled:
            return float(value.detach())
        v = value.detach().float().clone()
        dist.all_reduce(v)
        return float(v) / self.world


def init(device: torch.device | None = None, engine: str = "fsdp2") -> DistInfo:
    """Join the process group torchrun or the ``deepspeed`` launcher describes (idempotent): NCCL
    when this process works on a CUDA device, gloo on the CPU.

    DeepSpeed needs a group even in one process (``parallel: deepspeed`` without a launcher): a
    group of one is made from an in-memory store, so one process runs the same engine as N."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 and engine != "deepspeed":
        return DistInfo()
    if not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("LOCAL_RANK", "0")  # what DeepSpeed reads to find this process's device
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    if world == 1:
        return DistInfo()
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
    if engine == "deepspeed":
        return  # the DeepSpeed engine partitions the trainable models itself (Optimized); frozen ones stay whole
    if engine != "fsdp2":
        raise ValueError(f"unknown parallel engine {engine!r}: use fsdp2 or deepspeed")
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
    if trains_text_encoder(model):
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


# ----------------------------------------------------------------------------------- DeepSpeed
@dataclass
class DeepSpeedOptions:
    """``parallel: deepspeed``: ZeRO through DeepSpeed's engine instead of FSDP2."""

    stage: int = 2
    """ZeRO stage: 2 (optimizer state and gradients partitioned across ranks) or 3 (parameters
    too, gathered per module as it runs)."""
    config: str | None = None
    """A DeepSpeed JSON config merged over the one streamkd writes (e.g. ``zero_optimization.
    offload_optimizer``). The keys streamkd sets from the training config -- batch sizes,
    gradient_clipping, precision, zero_optimization.stage -- are refused there."""

    def __post_init__(self) -> None:
        if self.stage not in (2, 3):
            raise ValueError(f"deepspeed.stage must be 2 or 3, got {self.stage}; FSDP2 (parallel: fsdp2) covers full sharding too")


_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
               "bf16", "fp16", "optimizer", "scheduler")


def _deepspeed_config(options: DeepSpeedOptions, micro_batch: int, grad_clip: float) -> dict:
    """The engine's config: one micro-batch per step and rank (the trainer already splits the
    global batch into equal rows), clipping by the trainer's value, fp32 parameters (bf16 compute
    comes from autocast, as with FSDP2: the codec's buffers must not be cast)."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": options.stage},
        "zero_allow_untested_optimizer": True,  # the trainer's own torch AdamW, wrapped by ZeRO
        "steps_per_print": 2**31 - 1,
    }
    if options.config is None:
        return config
    import json

    try:
        extra = json.loads(Path(options.config).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"deepspeed.config {options.config}: cannot read a JSON DeepSpeed config ({e})") from None
    owned = [k for k in _OWNED_KEYS if k in extra] + (["zero_optimization.stage"] if "stage" in extra.get("zero_optimization", {}) else [])
    if owned:
        raise ValueError(f"deepspeed.config {options.config} sets {', '.join(owned)}, which streamkd derives from the training "
                         "config (batch_size, grad_clip, runtime.precision, deepspeed.stage, lr): remove them there")
    zero = {**config["zero_optimization"], **extra.pop("zero_optimization", {})}
    return {**config, **extra, "zero_optimization": zero}


def _require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ValueError("parallel: deepspeed needs DeepSpeed: pip install 'streamkd[deepspeed]' (or use parallel: fsdp2)") from None
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


class Optimized:
    """A trainable model and its AdamW, stepped by the run's engine (``parallel``): the one place a
    trainer runs backward, clips and steps. ``fsdp2`` uses the optimizer directly (on a model
    ``parallelize`` sharded, or whole in one process); ``deepspeed`` hands model and optimizer to a
    DeepSpeed engine (ZeRO-2/3), which partitions optimizer state, gradients and, at stage 3,
    parameters, and clips with the same global-norm rule. ``micro_batch``: rows per rank and step."""

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], *, lr: float, weight_decay: float, grad_clip: float,
                 parallel: str, micro_batch: int, deepspeed: DeepSpeedOptions | None = None) -> None:
        self.model = model
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
        self.engine = None
        if parallel == "deepspeed":
            ds = _require_deepspeed()
            config = _deepspeed_config(deepspeed or DeepSpeedOptions(), micro_batch, grad_clip)
            self.engine, self.opt, _, _ = ds.initialize(model=model, optimizer=self.opt, config=config)
            if config["zero_optimization"]["stage"] == 3:
                _zero3_units(ds, model)

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of this rank's ``loss``, clip to ``grad_clip``, one optimizer step; returns the
        global gradient norm before clipping."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # clips (gradient_clipping), steps, zeroes the gradients
            return torch.as_tensor(self.engine.get_global_grad_norm() or 0.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.grad_clip)
        self.opt.step()
        return norm

    # ----------------------------------------------------------------------------- checkpoints
    @property
    def native_checkpoint(self) -> bool:
        """True when model and optimizer state go to the engine's own (per-rank) checkpoint."""
        return self.engine is not None

    def full_state(self) -> tuple[dict, dict]:
        return full_state(self.model, self.opt)

    def load_full_state(self, model_sd: dict, opt_sd: dict) -> None:
        load_full_state(self.model, model_sd, self.opt, opt_sd)

    def save_native(self, folder: Path, tag: str) -> None:
        """DeepSpeed's checkpoint of model + partitioned optimizer state (a collective)."""
        self.engine.save_checkpoint(str(folder), tag=tag)

    def load_native(self, folder: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{folder}/{tag}: DeepSpeed found no checkpoint to resume")


def _zero3_units(ds, model: torch.nn.Module) -> None:
    """Gather ZeRO-3 parameters by the units FSDP2 shards: each DiT block, then the rest of the DiT.

    ZeRO-3 gathers a module's own parameters when that module's forward runs. The DiT reads some
    weights without calling their module (patch_embed as one matmul, the fp32 LayerNorms through
    ``layer_norm``, attention through methods other than ``forward``); declaring every parameter
    of a block external to the block makes the block's forward gather all of them, as an FSDP2
    unit does."""
    dit = model.dit
    in_blocks = set()
    for block in dit.blocks:
        for p in block.parameters():
            ds.zero.register_external_parameter(block, p)
            in_blocks.add(p)
    for p in dit.parameters():
        if p not in in_blocks:
            ds.zero.register_external_parameter(dit, p)


def gathered(model: torch.nn.Module):
    """A context in which every parameter of ``model`` is whole: ZeRO-3 partitions parameters
    between forwards, so elementwise work across models (the EMA update) gathers them first.
    A no-op for any other model."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
