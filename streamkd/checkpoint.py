"""Checkpoints: safetensors + JSON, written atomically, complete enough to resume exactly.

A training run's folder looks like::

    run/
      checkpoints/step_000200/   model.safetensors  ema.safetensors  optim.safetensors  state.json
      checkpoints/latest         text file naming the newest complete step folder

A step folder is written as ``step_000200.tmp-<pid>`` and renamed into place only once every file
in it is flushed; ``latest`` is then replaced by rename. A run killed at any moment therefore
leaves ``latest`` pointing at a complete checkpoint (a stray ``.tmp-*`` folder at worst).

Optimizer state is flattened into tensors (``state/<param>/<name>``) plus JSON for the param-group
hyper-parameters, so nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or does not fit the model/config."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; pass a checkpoint folder written by streamkd")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); use an earlier checkpoint") from None


def optimizer_to_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state dict (``state`` keyed by parameter id or name) into tensors + JSON."""
    tensors: dict[str, torch.Tensor] = {}
    for key, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"state/{key}/{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    keys_are_ints = all(isinstance(k, int) for k in sd["state"])
    return tensors, {"param_groups": sd["param_groups"], "int_keys": keys_are_ints}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, param, name = key.split("/")
        state.setdefault(int(param) if meta["int_keys"] else param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_staging(run_dir: str | Path, step: int) -> Path:
    """The folder checkpoint ``step`` is assembled in before it is renamed into place, for files
    that every rank writes (a DeepSpeed engine's partitions): the same path on every rank."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.tmp-staged"


def save_training_checkpoint(
    run_dir: str | Path, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict[str, Any], keep: int = 3,
    staged: bool = False,
) -> Path:
    """Write ``files`` (name -> tensors) and ``state`` (JSON) as checkpoint ``step``; keep the newest ``keep``.
    ``staged``: other files were already written to ``checkpoint_staging(run_dir, step)``; they are
    published with these, in the same rename."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    if staged:
        tmp = checkpoint_staging(run_dir, step)
    else:
        tmp = ckpt_root / f"{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    for name, tensors in files.items():
        atomic_save_safetensors(tensors, tmp / f"{name}.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = ckpt_root / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    latest_tmp.replace(ckpt_root / "latest")
    _fsync_dir(ckpt_root)
    steps = sorted(p for p in ckpt_root.glob("step_*") if ".tmp-" not in p.name)
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_inference_weights(model: torch.nn.Module, folder: Path) -> None:
    """``folder/model.safetensors`` into ``model`` (cast to its dtypes), after checking that the
    names and shapes are exactly the model's: a checkpoint whose weights disagree with its
    config.json is refused, naming the tensors."""
    tensors = load_safetensors(folder / "model.safetensors")
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise CheckpointError(f"{folder}: weights do not match config.json (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, value in tensors.items():
        if value.shape != own[name].shape:
            raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(value.shape)}, config expects {tuple(own[name].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    folder = ckpt_root / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which does not exist; delete {pointer} to start over")
    return folder


def load_training_checkpoint(folder: str | Path, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    folder = Path(folder)
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_path} is missing; {folder} is not a complete training checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path} is corrupt ({e})") from None
    return {name: load_safetensors(folder / f"{name}.safetensors") for name in names}, state
