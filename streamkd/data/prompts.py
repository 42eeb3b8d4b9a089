"""Conditions for distillation: what the teacher is sampled on (ODE pairs, self-forcing DMD).

ODE pairs and self-forcing DMD need no ground-truth video, only conditions (Self-Forcing trains
Wan2.1 on a text file of prompts). A *condition source* is a map-style dataset whose item ``i`` is
a pure function of ``i`` (resuming a data position needs only the index) with the keys

    prompt   str
    seed     int     (the item's own seed, e.g. for a ground-truth render)
    frames   uint8 (T, H, W, 3) or absent   (a clip, or its frame 0 alone (T = 1): frame 0 is the
                                             image condition, the only frame the trainers read)
    actions  int64 (T,) or absent            (per latent frame)

``collate`` stacks items, keeping absent keys absent (None). Three kinds: ``PromptDataset`` below
(text-to-video), ``ClipConditions`` (real clips: image-to-video from their first frames, with
their actions) and a model's built-in ones (the toy world's ``ToyClipDataset``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from streamkd.bundle import latent_actions, pixel_frames


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


class ClipConditions:
    """Conditions from real clips: a folder or ``.csv`` / ``.jsonl`` manifest of captioned videos
    (``streamkd.data.video``), or a shard folder made by ``streamkd data encode``
    (``streamkd.data.shards``). Item ``i`` is clip ``i mod n`` (cycled, as a prompt file is) with
    seed ``base_seed + i``:

        prompt   the clip's caption
        frames   uint8 (1, H, W, 3): the clip's frame 0 alone -- the image condition, the only
                 frame the trainers read -- so a video decodes just that frame and a shard gives
                 its stored ``first_frame``
        actions  int64 (num_frames,), only when ``model`` takes actions: one per latent frame, the
                 action held longest among the pixel frames the codec folds into it
                 (``streamkd.bundle.latent_actions``, as the teacher trainer reads clips); the null action
                 (``DiT.null_action``, which a teacher trained with action dropout knows)
                 throughout for a clip without actions

    For a model that takes actions every clip must cover the ``num_frames`` latent frames
    (``1 + temporal_factor (num_frames - 1)`` pixel frames: its actions drive the whole rollout),
    and a shorter one is refused with its name. A model without actions reads frame 0 alone,
    whatever the clip's length, and ignores the clips' actions. Videos are resized and
    center-cropped to ``model.frame_hw``; shards must hold that size. The shards' latents and
    prompt embeddings are not read (first frames go through the trainer's codec, captions through
    its text encoder), so shards made by any codec serve.
    """

    def __init__(self, source: str | Path, model, num_frames: int, base_seed: int) -> None:
        # imported here: text-to-video distillation needs neither PyAV nor the shard reader
        from streamkd.data.shards import INDEX, LatentShardDataset
        from streamkd.data.video import VideoClipDataset

        self.source = Path(source)
        self.base_seed = base_seed
        self.num_frames = num_frames
        self.num_actions = model.num_actions
        self.temporal_factor = model.codec.temporal_factor
        # the pixel frames whose actions the rollout reads; frame 0 alone without actions
        self.clip_frames = pixel_frames(num_frames, self.temporal_factor) if self.num_actions else 1
        H, W = model.frame_hw
        self.shards = (self.source / INDEX).is_file()
        if self.shards:
            self.clips = LatentShardDataset(self.source)
            index = self.clips.index
            if index["frame_shape"] != [H, W, 3]:
                raise ValueError(f"data: the shards in {self.source} hold frames of {index['frame_shape'][0]}x"
                                 f"{index['frame_shape'][1]}; this teacher takes {H}x{W}: re-encode the videos at its "
                                 f"size (streamkd data encode --checkpoint <the teacher> [--height {H} --width {W}]), "
                                 "or give data= the video folder, which is resized")
            if index["frames"] < self.clip_frames:
                raise ValueError(f"data: the shards in {self.source} hold clips of {index['frames']} frames; this teacher "
                                 f"takes actions, and rollouts of {num_frames} latent frames read {self.clip_frames} frames "
                                 f"of them: re-encode with streamkd data encode --frames {self.clip_frames}")
        else:
            self.clips = VideoClipDataset(self.source, self.clip_frames, H, W, first_frame_only=True)

    @property
    def prompts(self) -> list[str]:
        """Every clip's caption (what a prompt cache encodes up front)."""
        return self.clips.all_prompts() if self.shards else self.clips.captions

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            raise IndexError(f"index {index} is negative")
        n = index % len(self.clips)
        clip = self.clips[n]
        frames = clip["frames"] if "frames" in clip else clip["first_frame"][None]
        item = {"prompt": clip["prompt"], "seed": self.base_seed + index, "frames": frames}
        if self.num_actions:
            item["actions"] = self._latent_actions(clip, clip.get("path") or f"{n} of the shards in {self.source}")
        return item

    def _latent_actions(self, clip: dict[str, Any], where: str) -> torch.Tensor:
        if "actions" not in clip:
            return torch.full((self.num_frames,), self.num_actions, dtype=torch.int64)
        actions = latent_actions(clip["actions"][None, : self.clip_frames], self.temporal_factor)[0]
        assert actions.shape == (self.num_frames,), (actions.shape, self.num_frames)
        if int(actions.max()) >= self.num_actions:
            raise ValueError(f"data: clip {where} has action {int(actions.max())}; the teacher takes action ids "
                             f"0..{self.num_actions - 1}: fix the clip's actions")
        return actions


def condition_source(model, prompts: str | None, num_frames: int, base_seed: int, data: str | None = None):
    """The conditions to sample ``model`` on for ``num_frames`` latent frames: the prompt file
    (text-to-video), or the clips of ``data`` (image-to-video: their first frames and actions,
    ``ClipConditions``), else the model's own (the toy world's clips); both files at once, or a
    model with no source, is refused with the fix."""
    if prompts is not None and data is not None:
        raise ValueError("prompts and data are both set; choose one: prompts (a prompt file: text-to-video) or data "
                         "(captioned videos or a shard folder: image-to-video, the captions are the prompts), and set the "
                         "other to null")
    if prompts is not None:
        return PromptDataset(prompts, base_seed)
    if data is not None:
        return ClipConditions(data, model, num_frames, base_seed)
    source = model.conditions(num_frames, base_seed)
    if source is None:
        raise ValueError("this model has no built-in conditions (a Wan pipeline samples on prompts): set prompts= to a "
                         ".txt file with one prompt per line (or .jsonl with a \"prompt\" field), or data= to a folder "
                         "of captioned videos or a shard folder (image-to-video from their first frames)")
    return source
