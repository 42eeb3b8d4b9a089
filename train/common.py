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
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
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
