"""Conditions for data-free distillation: what the teacher is sampled on when there is no video.

ODE pairs and self-forcing DMD need no video, only conditions (Self-Forcing trains Wan2.1 on a
text file of prompts). A *condition source* is a map-style dataset whose item ``i`` is a pure
function of ``i`` (resuming a data position needs only the index) with the keys

    prompt   str
    seed     int     (the item's own seed, e.g. for a ground-truth render)
    frames   uint8 (T, H, W, 3) or absent   (ground-truth video: its frame 0 is the image condition)
    actions  int64 (T,) or absent            (per latent frame)

``collate`` stacks items, keeping absent keys absent (None). The toy world's ``ToyClipDataset`` is
one such source (frames, actions); ``PromptDataset`` below is the text-to-video one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class PromptDataset:
    """Prompts from a file, cycled: a ``.txt`` with one prompt per line (blank lines skipped) or a
    ``.jsonl`` with a ``"prompt"`` field per line. Item ``i`` is prompt ``i mod n`` with seed
    ``base_seed + i``."""

    def __init__(self, path: str | Path, base_seed: int = 0) -> None:
        self.path = Path(path)
        self.base_seed = base_seed
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt file {self.path} does not exist; give a .txt (one prompt per line) or .jsonl") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {self.path} is not UTF-8 text ({e})") from None
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if self.path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                    prompt = row["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{self.path}:{number}: not a JSON object with a \"prompt\" field") from None
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError(f"{self.path}:{number}: \"prompt\" must be a non-empty string")
                prompts.append(prompt.strip())
            else:
                prompts.append(line.strip())
        if not prompts:
            raise ValueError(f"prompt file {self.path} holds no prompt")
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            raise IndexError(f"index {index} is negative")
        return {"prompt": self.prompts[index % len(self.prompts)], "seed": self.base_seed + index}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of a condition source; ``frames`` / ``actions`` are None when items lack them."""
    out: dict[str, Any] = {"prompt": [item["prompt"] for item in batch], "seed": [item["seed"] for item in batch]}
    for key in ("frames", "actions"):
        present = [key in item and item[key] is not None for item in batch]
        if any(present) and not all(present):
            raise ValueError(f"a batch mixes items with and without {key!r}; a condition source gives it always or never")
        out[key] = torch.stack([item[key] for item in batch]) if all(present) else None
    return out


def condition_source(model, prompts: str | None, num_frames: int, base_seed: int):
    """The conditions to sample ``model`` on: the prompt file when given, else the model's own
    (the toy world's clips); a model with neither is refused with the fix."""
    if prompts is not None:
        return PromptDataset(prompts, base_seed)
    source = model.conditions(num_frames, base_seed)
    if source is None:
        raise ValueError("this model has no built-in conditions (a Wan pipeline samples on prompts): set prompts= to a "
                         ".txt file with one prompt per line (or .jsonl with a \"prompt\" field)")
    return source
