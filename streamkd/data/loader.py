"""Training batches through a ``torch.utils.data.DataLoader``, in an order fixed by the step.

Exact resume needs the items of step ``s`` to be a pure function of ``s``: item ``k`` of the
batch is sample ``(s * batch_size + k) mod len(dataset)``. :class:`StepSampler` yields exactly
those indices for a range of steps, and the DataLoader (with ``in_order``, its default) returns
batches in sampler order whatever ``num_workers`` and ``prefetch_factor`` are, so workers and
prefetch change how fast batches arrive, never which ones.

:func:`open_training_data` turns a trainer's ``data`` field into a dataset: a shard folder made by
``streamkd data encode`` (``index.json``: pre-encoded latents, see ``streamkd.data.shards``), or a
folder / manifest of videos (``streamkd.data.video``), decoded at the model's frame size.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from streamkd.bundle import pixel_frames
from streamkd.data.shards import INDEX, LatentShardDataset
from streamkd.data.video import VideoClipDataset

__all__ = ["StepSampler", "collate_training", "open_training_data", "step_batches"]


class StepSampler(Sampler[int]):
    """Dataset indices of steps ``start .. end - 1``: ``(step * batch_size + k) % length`` for the
    positions ``k`` in ``rows`` (a data-parallel rank loads only its own rows of each global batch)."""

    def __init__(self, length: int, batch_size: int, start: int, end: int, rows: slice = slice(None)) -> None:
        self.length, self.batch_size, self.start, self.end = length, batch_size, start, end
        self.positions = range(batch_size)[rows]

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.end):
            for k in self.positions:
                yield (step * self.batch_size + k) % self.length

    def __len__(self) -> int:
        return (self.end - self.start) * len(self.positions)


def collate_training(items: list[dict[str, Any]], num_frames: int, num_actions: int) -> dict[str, Any]:
    """Stack clips: ``frames`` uint8 (B, T, H, W, 3), or pre-encoded ``latents`` (B, C, F, h, w)
    with ``first_frame`` (B, H, W, 3) and the prompts' ``context`` (B, L, D) (a trainer with a
    frozen text encoder reads it instead of running the encoder; one that trains its prompt
    encoder, the toy teacher, encodes ``prompt`` itself); ``actions`` int64 (B, T), the null
    action (``num_actions``, as ``DiT.null_action``) for clips that have none; ``prompt`` and
    ``seed`` as lists."""
    batch: dict[str, Any] = {"prompt": [item["prompt"] for item in items], "seed": [item["seed"] for item in items]}
    if "latents" in items[0]:
        batch["latents"] = torch.stack([item["latents"] for item in items])
        batch["first_frame"] = torch.stack([item["first_frame"] for item in items])
        batch["context"] = torch.stack([item["context"] for item in items])
    else:
        batch["frames"] = torch.stack([item["frames"] for item in items])
    actions = []
    for item in items:
        if "actions" not in item:
            actions.append(torch.full((num_frames,), num_actions, dtype=torch.int64))
            continue
        a = item["actions"]
        where = item.get("path") or f"seed {item['seed']}"
        if a.shape != (num_frames,):
            raise ValueError(f"clip {where} has actions of shape {tuple(a.shape)}; the model trains on {num_frames} frames, "
                             "one action each")
        if num_actions == 0 or int(a.max()) >= num_actions:
            raise ValueError(f"clip {where} has action {int(a.max())}; the model takes action ids 0..{num_actions - 1}: "
                             "fix the actions, or train a model with more num_actions")
        actions.append(a)
    batch["actions"] = torch.stack(actions)
    return batch


def open_training_data(source: str | Path, model, check: Sequence[str] = ("codec", "text")) -> Dataset:
    """The dataset of a trainer's ``data`` field for ``model``: a shard folder (refused unless
    ``model``'s codec -- and text encoder, when in ``check`` -- made it and its latents have the
    model's horizon and size), or videos decoded as clips of the model's horizon and frame size."""
    source = Path(source)
    F, (h, w) = model.horizon_frames, model.latent_hw
    if (source / INDEX).is_file():
        data = LatentShardDataset(source, model, parts=check)
        expected = [model.codec.latent_channels, F, h, w]
        if data.index["latent_shape"] != expected:
            raise ValueError(
                f"the shards in {source} hold latents of shape (C, F, h, w) = {tuple(data.index['latent_shape'])}; this "
                f"model trains on {tuple(expected)} (horizon_frames={F}): re-encode with streamkd data encode "
                f"--frames {pixel_frames(F, model.codec.temporal_factor)}"
            )
        return data
    H, W = model.frame_hw
    return VideoClipDataset(source, pixel_frames(F, model.codec.temporal_factor), H, W)


def step_batches(data: Dataset, batch_size: int, start: int, end: int, num_frames: int, num_actions: int,
                 num_workers: int = 0, prefetch_factor: int = 2, rows: slice = slice(None)) -> Iterator[dict[str, Any]]:
    """This rank's ``rows`` of the global batches of steps ``start .. end - 1``, loaded by
    ``num_workers`` processes (0: in this one) that keep up to ``prefetch_factor`` batches each
    ready ahead of the step."""
    sampler = StepSampler(len(data), batch_size, start, end, rows)
    loader = DataLoader(
        data, batch_size=len(sampler.positions), sampler=sampler,
        collate_fn=functools.partial(collate_training, num_frames=num_frames, num_actions=num_actions),
        num_workers=num_workers, prefetch_factor=prefetch_factor if num_workers else None,
    )
    return iter(loader)
