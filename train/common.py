"""Pieces every trainer shares: run logging, EMA, RNG state, the resume-config check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from streamkd import distributed
from streamkd.checkpoint import CheckpointError
from streamkd.config import config_diff


class RunLog:
    """``losses.jsonl`` + optional TensorBoard scalars + a progress bar, for one ``train()`` call.

    Only the main process logs (``main=False`` makes every method a no-op)."""

    def __init__(self, out: Path, *, total: int, initial: int, desc: str, tensorboard: bool, progress: bool, main: bool = True) -> None:
        self.main = main
        self.writer = None
        self.prefix = desc.split()[0]
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard is not installed: pip install 'streamkd[logging]' or set tensorboard=false") from None
            self.writer = SummaryWriter(str(out / "tensorboard"))
        self.file = open(out / "losses.jsonl", "a")
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not progress, dynamic_ncols=True)

    def tick(self, **postfix: float) -> None:
        if not self.main:
            return
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()})

    def record(self, step: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{self.prefix}/{k}", v, step)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.main:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` on parameters; buffers (codec) are copied."""
    distributed.reshard(model)
    with distributed.gathered(model):  # ZeRO-3 keeps only a partition of each parameter between forwards
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def rng_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"noise": gen.get_state(), "torch": torch.get_rng_state()}


def restore_rng(tensors: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    gen.set_state(tensors["noise"])
    torch.set_rng_state(tensors["torch"])


def check_resume_config(saved: Any, current: Any, allowed: tuple[str, ...], folder: Path) -> None:
    """Refuse to resume when a field that shapes the optimisation changed; list every change."""
    diff = [d for d in config_diff(saved, current) if not d.startswith(allowed)]
    if diff:
        raise CheckpointError(
            f"cannot resume {folder}: the config changed ({'; '.join(diff)}); restore those values or use a new out_dir"
        )


def _optim_names(name: str) -> tuple[str, str]:
    """(file, state key) of the optimizer of trainable ``name`` ("model": optim / optimizer)."""
    return ("optim", "optimizer") if name == "model" else (f"{name}_optim", f"{name}_optimizer")


def _engine_of(trainables: dict[str, distributed.Optimized]) -> str:
    return "deepspeed" if any(t.native_checkpoint for t in trainables.values()) else "torch"


def save_checkpoint(out: Path, step: int, info: distributed.DistInfo, trainables: dict[str, distributed.Optimized],
                    frozen: dict[str, torch.nn.Module], gen: torch.Generator, state: dict[str, Any]) -> Path | None:
    """Checkpoint ``step`` of a run (a collective: every rank calls it, rank 0 publishes).

    ``trainables`` (name -> model + optimizer) are saved as full, unsharded state dicts --
    readable by any number of processes -- except under DeepSpeed, whose engines write their own
    per-rank partitions into ``deepspeed/<name>/`` of the same folder (resumable by the same number
    of processes). ``frozen`` models (the EMA) are always saved whole, and ``state`` gains the
    engine, the world size and the optimizers' metadata."""
    from streamkd.checkpoint import checkpoint_staging, optimizer_to_tensors, save_training_checkpoint

    engine = _engine_of(trainables)
    files: dict[str, dict[str, torch.Tensor]] = {}
    optimizers: dict[str, Any] = {}
    if engine == "deepspeed":
        staging = checkpoint_staging(out, step)
        if info.is_main:
            staging.mkdir(parents=True, exist_ok=True)
        distributed.barrier(info)
        for name, trainable in trainables.items():
            trainable.save_native(staging / "deepspeed", name)
    else:
        for name, trainable in trainables.items():
            model_sd, opt_sd = trainable.full_state()
            file, key = _optim_names(name)
            files[name] = model_sd
            if info.is_main:
                files[file], optimizers[key] = optimizer_to_tensors(opt_sd)
    for name, model in frozen.items():
        files[name], _ = distributed.full_state(model)
    folder = None
    if info.is_main:
        files["rng"] = rng_tensors(gen)
        state = {**state, **optimizers, "engine": engine, "world_size": info.world}
        folder = save_training_checkpoint(out, step, files, state, staged=engine == "deepspeed")
    distributed.barrier(info)
    return folder


def load_checkpoint(folder: Path, info: distributed.DistInfo, trainables: dict[str, distributed.Optimized],
                    frozen: dict[str, torch.nn.Module], gen: torch.Generator) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into the run's models, optimizers and generator;
    returns the checkpoint's JSON state (its config is checked by the caller)."""
    from streamkd.checkpoint import load_training_checkpoint, optimizer_from_tensors

    _, state = load_training_checkpoint(folder, [])
    engine, saved_engine = _engine_of(trainables), state.get("engine", "torch")
    if engine != saved_engine:
        which = {"deepspeed": "parallel: deepspeed", "torch": "parallel: fsdp2 (or one process)"}
        raise CheckpointError(f"{folder} was written by a {which[saved_engine]} run and this run uses {which[engine]}: "
                              f"resume with {which[saved_engine]}, or start a new out_dir from its exported weights (init:)")
    if engine == "deepspeed" and state.get("world_size", 1) != info.world:
        raise CheckpointError(
            f"{folder} holds DeepSpeed partitions of {state['world_size']} processes and this run has {info.world}: "
            f"resume with {state['world_size']} processes, or convert it with DeepSpeed's ds_to_universal.py first"
        )
    names = list(frozen) + ["rng"] + ([] if engine == "deepspeed" else [n for name in trainables for n in (name, _optim_names(name)[0])])
    files, _ = load_training_checkpoint(folder, names)
    for name, trainable in trainables.items():
        if engine == "deepspeed":
            trainable.load_native(folder / "deepspeed", name)
        else:
            file, key = _optim_names(name)
            trainable.load_full_state(files[name], optimizer_from_tensors(files[file], state[key]))
    for name, model in frozen.items():
        distributed.load_full_state(model, files[name])
    restore_rng(files["rng"], gen)
    return state
