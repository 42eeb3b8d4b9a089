"""Offline pre-encoding: training clips -> latent and prompt-embedding shards (DESIGN.md section 8).

Decoding video and running the VAE and text encoder every step would keep a GPU waiting on
work whose result never changes for a frozen codec and text encoder; real pipelines do it once.
:func:`encode_shards` runs a model bundle's ``codec.encode`` and ``encode_prompts`` over a clip
dataset (``VideoClipDataset`` or any map-style dataset of its items) and writes::

    out/index.json                what made the shards (model identity, clip settings), counts,
                                  the files the dataset skipped; "complete" once every shard is there
    out/shard-00000.safetensors   clips [0, N), N = clips_per_shard
    out/shard-00001.safetensors   clips [N, 2N), ...

Each shard holds, for its ``n`` clips (legend: C latent channels, F latent frames, h/w latent
rows/columns, L prompt tokens, D text width, T clip frames, H/W pixels):

    latents      (n, C, F, h, w)  model.codec.encode(frames), in the dtype the codec returns
                                  (the bundle's dtype: exact, and half the bytes for a bf16 VAE)
    context      (n, L, D)        model.encode_prompts([prompt]), in the text encoder's dtype
    first_frame  (n, H, W, 3)     uint8 clip frame 0 (image-to-video conditioning)
    seed         (n,)             int64, the clip's index in the dataset
    actions      (n, T)           int64 per-frame actions; rows whose has_actions is False are 0
    has_actions  (n,)             bool
    metadata     "prompts", "paths": JSON lists of the clips' prompts and source files

Each clip is encoded alone (batch of one), so a stored latent is exactly what encoding that clip
directly gives. Shard ``k`` always holds the same clips, so an interrupted encode resumes at the
first shard file that is not there: shards and ``index.json`` are written to a temp file and
renamed, and a file that exists is complete.

:class:`LatentShardDataset` reads the shards back as map-style items
``{"latents", "context", "prompt", "first_frame", "seed", "actions"?}``. Given the model that
will consume them, it refuses shards whose ``index.json`` names another codec or text encoder
(weights digest, shapes), naming the field and the fix: latents of another VAE train nonsense
without any error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from streamkd.checkpoint import atomic_save_safetensors
from streamkd.config import to_dict

__all__ = ["INDEX", "ShardMismatchError", "encode_shards", "model_identity", "check_model", "read_index", "LatentShardDataset"]

INDEX = "index.json"
FORMAT = 1
"""Bumped when the shard layout changes; readers refuse other versions."""


class ShardMismatchError(ValueError):
    """Shards were made by another model or with other settings than the caller's."""


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (any dtype, any device)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so stored and fresh compare equal."""
    return json.loads(json.dumps(value))


def model_identity(model) -> dict:
    """What a shard's tensors depend on: the codec (class, config, strides, weights digest) and
    the text encoder (class, weights, context shape). Compared field by field by :func:`check_model`."""
    codec, text = model.codec, model.text_encoder
    # the toy codec is configured by a dataclass, the Wan VAE by diffusers' vae/config.json
    config = to_dict(codec.cfg) if hasattr(codec, "cfg") else {k: v for k, v in codec.vae.config.items() if not k.startswith("_")}
    with torch.no_grad():
        context_shape = list(model.encode_prompts([""]).shape[1:])
    # a UMT5 encoder loaded from a folder carries a fingerprint of its files: hashing UMT5-XXL's
    # 11 GB of weights on every run would cost more than the encode of a small dataset
    text_weights = getattr(text, "identity", None) or _digest(text.state_dict())
    return _json({
        "bundle": type(model).__name__,
        "codec": {
            "class": type(codec).__name__, "config": config, "latent_channels": codec.latent_channels,
            "spatial_factor": codec.spatial_factor, "temporal_factor": codec.temporal_factor,
            "digest": _digest(codec.state_dict()),
        },
        "text": {"class": type(text).__name__, "context_shape": context_shape, "weights": text_weights},
    })


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_model(index: dict, model, folder: str | Path, parts: Sequence[str] = ("codec", "text")) -> None:
    """ShardMismatchError naming the first ``index.json`` field under ``model.<part>`` that differs
    from ``model``'s (a trainer that trains its own text encoder checks the codec alone)."""
    _compare(index, model_identity(model), folder, parts)


def _compare(index: dict, fresh: dict, folder: str | Path, parts: Sequence[str]) -> None:
    for part in parts:
        for key, value in fresh[part].items():
            stored = index["model"][part].get(key)
            if stored != value:
                raise ShardMismatchError(
                    f"the shards in {folder} were encoded by another model: {INDEX} field model.{part}.{key} is "
                    f"{_short(stored)}, this model's is {_short(value)}; re-encode the clips with this model "
                    f"(streamkd data encode --checkpoint <this model> --out <new folder>) or use the model the shards "
                    f"were made with ({index['model'].get('checkpoint') or 'see ' + INDEX})"
                )


def read_index(folder: str | Path) -> dict:
    """``index.json`` of a finished shard folder, or ValueError saying what is wrong and the fix."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise ValueError(f"{path} is missing; {folder} is not a shard folder (make one with streamkd data encode)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-encode into a new folder") from None
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} has shard format {index.get('format')!r}; this streamkd reads format {FORMAT}: re-encode")
    if not index.get("complete"):
        raise ValueError(f"the encode into {folder} was interrupted ({INDEX} says complete: false); rerun the same "
                         "streamkd data encode command to finish it (it continues at the next unwritten shard)")
    return index


def _write_index(out: Path, index: dict) -> None:
    tmp = out / f".{INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(out / INDEX)


def _check_clip(item: dict, model, i: int) -> None:
    frames = item["frames"]
    H, W = model.frame_hw
    tf = model.codec.temporal_factor
    if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != (H, W, 3):
        raise ValueError(f"clip {i} has frames of shape {tuple(frames.shape)} ({frames.dtype}); the model takes uint8 "
                         f"(T, {H}, {W}, 3): build the dataset at the model's frame size {H}x{W}")
    if (frames.shape[0] - 1) % tf:
        lo = 1 + (frames.shape[0] - 1) // tf * tf
        raise ValueError(f"clips have {frames.shape[0]} frames; this codec takes 1 + {tf}k frames: use {lo} or {lo + tf}")


@torch.no_grad()
def encode_shards(
    dataset: Sequence[dict],
    model,
    out: str | Path,
    clips_per_shard: int = 64,
    settings: dict | None = None,
    checkpoint: str = "",
    progress: bool = False,
) -> dict:
    """Encode every clip of ``dataset`` with ``model`` into shards under ``out``; returns the index.

    ``settings`` (JSON) records how the dataset was made (source, frames, fps, ...): a rerun into
    the same folder resumes only when they, the model and ``clips_per_shard`` are unchanged.
    ``checkpoint`` names the model in the index (for error messages). The dataset's ``skipped``
    files (``VideoClipDataset(on_error="skip")``) are recorded in the index.
    """
    if not (isinstance(clips_per_shard, int) and clips_per_shard >= 1):
        raise ValueError(f"clips_per_shard must be a positive int, got {clips_per_shard!r}")
    out = Path(out)
    num_clips = len(dataset)
    if num_clips == 0:
        raise ValueError("the dataset is empty; nothing to encode")
    identity = {**model_identity(model), "checkpoint": checkpoint}
    header = _json({
        "format": FORMAT, "model": identity, "settings": settings or {}, "clips": num_clips,
        "clips_per_shard": clips_per_shard, "skipped": dict(getattr(dataset, "skipped", {})),
    })
    num_shards = -(-num_clips // clips_per_shard)
    if (out / INDEX).is_file():
        previous = json.loads((out / INDEX).read_text())
        for key in ("format", "settings", "clips", "clips_per_shard", "model"):
            if key == "model":
                try:
                    _compare(previous, identity, out, ("codec", "text"))
                except ShardMismatchError as e:
                    raise ShardMismatchError(f"{e}; or pass a new --out") from None
            elif previous.get(key) != header[key]:
                raise ShardMismatchError(
                    f"{out} holds shards made with {INDEX} field {key} = {_short(previous.get(key))}, this encode has "
                    f"{_short(header[key])}; pass a new --out, or rerun with the settings it was started with"
                )
        # hidden temp files of a killed writer: their shards are re-encoded below
        for stale in out.glob(".shard-*.tmp-*"):
            stale.unlink()
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} exists, is not empty and holds no {INDEX}: it is not a shard folder; pass a new --out")
    out.mkdir(parents=True, exist_ok=True)
    index = {**header, "complete": False, "shards": [_shard_name(k) for k in range(num_shards)]}
    _write_index(out, index)

    model.eval()
    todo = [k for k in range(num_shards) if not (out / _shard_name(k)).is_file()]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="encode", unit="shard")
    shapes: dict[str, list[int]] = {}
    for k in todo:
        rows: dict[str, list] = {"latents": [], "context": [], "first_frame": [], "seed": [], "actions": [], "has_actions": []}
        prompts, paths = [], []
        for i in range(k * clips_per_shard, min(num_clips, (k + 1) * clips_per_shard)):
            item = dataset[i]
            _check_clip(item, model, i)
            frames = item["frames"]
            rows["latents"].append(model.codec.encode(frames[None])[0].cpu())
            rows["context"].append(model.encode_prompts([item["prompt"]])[0].cpu())
            rows["first_frame"].append(frames[0])
            rows["seed"].append(torch.tensor(item["seed"], dtype=torch.int64))
            has = "actions" in item
            rows["actions"].append(item["actions"].to(torch.int64) if has else torch.zeros(frames.shape[0], dtype=torch.int64))
            rows["has_actions"].append(torch.tensor(has))
            prompts.append(item["prompt"])
            paths.append(item.get("path", ""))
        tensors = {name: torch.stack(values) for name, values in rows.items()}
        atomic_save_safetensors(tensors, out / _shard_name(k), metadata={"prompts": json.dumps(prompts), "paths": json.dumps(paths)})
        shapes = {name: list(t.shape[1:]) for name, t in tensors.items()}
    if not shapes:  # resumed after the last shard: the shapes come from what is on disk
        with safe_open(str(out / _shard_name(0)), "pt") as f:
            shapes = {name: list(f.get_slice(name).get_shape()[1:]) for name in f.keys()}
    index.update(complete=True, latent_shape=shapes["latents"], context_shape=shapes["context"],
                 frame_shape=shapes["first_frame"], frames=shapes["actions"][0])
    _write_index(out, index)
    return index


class LatentShardDataset(Dataset):
    """Map-style items of a shard folder (:func:`encode_shards`)::

        {"latents": (C, F, h, w), "context": (L, D), "prompt": str, "first_frame": uint8 (H, W, 3),
         "seed": int, "actions"?: int64 (T,)}

    ``model``: refuse shards this model's codec and text encoder did not make (``parts`` narrows
    the check, e.g. ``("codec",)`` for a trainer whose text encoder is being trained). Items are
    read from the memory-mapped shard (one row, not the whole file), so DataLoader workers share
    the page cache instead of each holding shards.
    """

    def __init__(self, folder: str | Path, model=None, parts: Sequence[str] = ("codec", "text")) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        if model is not None:
            check_model(self.index, model, self.folder, parts)
        self.clips_per_shard: int = self.index["clips_per_shard"]
        self.skipped: dict[str, str] = self.index["skipped"]
        missing = [name for name in self.index["shards"] if not (self.folder / name).is_file()]
        if missing:
            raise ValueError(f"{self.folder} lacks {missing[0]} (of {len(missing)} missing shards) that {INDEX} lists; "
                             "copy the whole folder, or re-encode")
        self._prompts: dict[int, list[str]] = {}  # shard -> prompts, parsed on first use in each process

    def __len__(self) -> int:
        return self.index["clips"]

    def all_prompts(self) -> list[str]:
        """Every clip's prompt, in order, from the shards' headers (no tensor is read)."""
        for k, name in enumerate(self.index["shards"]):
            if k not in self._prompts:
                try:
                    with safe_open(str(self.folder / name), "pt") as f:
                        self._prompts[k] = json.loads(f.metadata()["prompts"])
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"cannot read shard {self.folder / name} ({e}); it is corrupt: delete it and rerun "
                                     "streamkd data encode into the same folder to rewrite it") from None
        return [prompt for k in range(len(self.index["shards"])) for prompt in self._prompts[k]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} clips")
        k, row = divmod(i, self.clips_per_shard)
        path = self.folder / self.index["shards"][k]
        try:
            with safe_open(str(path), "pt") as f:
                item = {name: f.get_slice(name)[row] for name in ("latents", "context", "first_frame", "seed", "has_actions")}
                if bool(item.pop("has_actions")):
                    item["actions"] = f.get_slice("actions")[row]
                if k not in self._prompts:
                    self._prompts[k] = json.loads(f.metadata()["prompts"])
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read shard {path} ({e}); it is corrupt: delete it and rerun streamkd data encode "
                             "into the same folder to rewrite it") from None
        item["seed"] = int(item["seed"])
        item["prompt"] = self._prompts[k][row]
        return item
