"""The seam between models and everything that runs them: a model bundle of small contracts.

Trainers, eval, generate, bench and the server receive a *bundle* and use only what this module
names; they never import the toy world or diffusers. Two bundles implement it:

* ``streamkd.models.world.WorldModel``: the toy world's DiT, word prompt encoder and patch-PCA
  codec, in one streamkd checkpoint folder.
* ``streamkd.models.wan_model.WanModel``: a diffusers Wan2.1 pipeline folder (``model_index.json``:
  ``WanTransformer3DModel`` + UMT5 + ``AutoencoderKLWan``), or a streamkd student distilled from one
  (its DiT weights, and the pipeline folder its frozen VAE and text encoder are read from).

What a bundle offers (``ModelBundle``):

    dit                 the denoiser (``streamkd.models.dit.DiT``): teacher, critic or student
    text_encoder        ``TextEncoder``: prompts -> context tokens; ``null_prompt`` is CFG's
                        unconditional prompt (the toy world's empty prompt, Wan's negative prompt)
    codec               ``Codec``: uint8 frames <-> normalised latents, streaming decoder/encoder
    cfg.causal          ``CausalConfig`` of a streaming checkpoint, None for a bidirectional one
    cfg.sampling        ``SamplingConfig``: the checkpoint's default sampler
    latent_hw           latent grid (h, w) the model generates; frame_hw = latent_hw * codec stride
    horizon_frames      latent frames of one training clip (the teacher's horizon)
    num_actions         actions the DiT takes (0: none)
    like(cfg)           a bundle of the same kind with a fresh DiT for ``cfg`` (students, critics),
                        sharing the frozen components where the kind has any
    save(folder)        an inference checkpoint that ``load_model`` reads back

Conditioning is optional per bundle: prompts always; a first frame (image-to-video: frame 0 held
clean) whenever the codec encodes a single frame; actions when ``num_actions > 0``.

``load_model(path)`` turns any checkpoint a user may hold into a bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from streamkd.cache.memory import MemoryConfig
from streamkd.checkpoint import CheckpointError
from streamkd.sampling.schedule import make_sampler

__all__ = [
    "CausalConfig", "SamplingConfig", "TextEncoder", "StreamDecoder", "Codec", "ModelBundle",
    "load_model", "checkpoint_kind", "SHIPPED", "resolve_checkpoint",
]


@dataclass
class CausalConfig:
    """How a causal checkpoint streams: chunking, attention sinks and window (in latent frames)."""

    chunk_frames: int = 3
    """Latent frames generated per chunk (F)."""
    sink_frames: int = 3
    """First frames kept in the KV cache forever."""
    window_frames: int = 6
    """Most recent frames kept in the KV cache ring."""
    memory: MemoryConfig | None = None
    """Memory beyond the window (compressed tier, memory bank; ``streamkd.cache.memory``); None:
    sinks + window only, in the contiguous cache."""

    def __post_init__(self) -> None:
        if self.chunk_frames < 1 or self.sink_frames < 0 or self.window_frames < self.chunk_frames:
            raise ValueError(
                "need chunk_frames >= 1, sink_frames >= 0 and window_frames >= chunk_frames; got "
                f"{self.chunk_frames}, {self.sink_frames}, {self.window_frames}"
            )


@dataclass
class SamplingConfig:
    """How this checkpoint samples by default (the CLI can override each field)."""

    kind: Literal["euler", "few_step"] = "euler"
    """euler: many-step ODE (teachers); few_step: predict x0 and re-noise (distilled students)."""
    num_steps: int = 24
    """Denoising steps per frame (per chunk when streaming)."""
    shift: float = 1.0
    """Timestep shift s' = shift s / (1 + (shift - 1) s)."""
    guidance_scale: float = 1.0
    """CFG scale s in uncond + s (cond - uncond); 1 disables guidance (one model pass)."""
    sigmas: list[float] | None = None
    """Explicit few-step noise levels (decreasing, in (0, 1]); overrides num_steps/shift."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    def make(self):
        return make_sampler(self.kind, self.num_steps, self.shift, self.sigmas)


class TextEncoder(Protocol):
    null_prompt: str
    """The prompt of CFG's unconditional branch (uncond + s (cond - uncond))."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, L, D)`` context tokens for the DiT's cross-attention."""


class StreamDecoder(Protocol):
    def push(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(B, n, H, W, 3)`` of the next latent chunk (``n`` = F, or for a codec
        4x in time 1 + 4(F-1) on the first push and 4F after)."""


class Codec(Protocol):
    temporal_factor: int
    """Frames per latent frame after the first (1: frame-wise; Wan: 4, the first latent frame is one frame)."""
    spatial_factor: int
    latent_channels: int

    def encode(self, frames_BFHWC: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents_BCFhw: torch.Tensor) -> torch.Tensor: ...

    def stream_decoder(self) -> StreamDecoder: ...


class ModelBundle(Protocol):
    dit: torch.nn.Module
    codec: Codec
    cfg: object

    @property
    def text_encoder(self) -> TextEncoder: ...

    @property
    def latent_hw(self) -> tuple[int, int]: ...

    @property
    def frame_hw(self) -> tuple[int, int]: ...

    @property
    def horizon_frames(self) -> int: ...

    @property
    def num_actions(self) -> int: ...

    @property
    def action_names(self) -> list[str]:
        """Names of the actions (index = id) for ``--actions`` and the protocol."""
        ...

    @property
    def is_causal(self) -> bool: ...

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor: ...

    def like(self, cfg) -> "ModelBundle": ...

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None: ...


def trains_text_encoder(model) -> bool:
    """True when a bundle's text encoder is in its module tree (the toy world's, trained with the
    DiT: sharded, optimized and saved with it); False for a frozen one kept outside it (Wan's
    UMT5, shared by every bundle of a run: replicated, and its embeddings may be pre-encoded)."""
    return any(module is model.text_encoder for module in model.children())


def pixel_frames(latent_frames: int, temporal_factor: int) -> int:
    """Frames a latent video of ``latent_frames`` decodes to (Wan: 1 + 4 (F - 1))."""
    return 1 + temporal_factor * (latent_frames - 1) if latent_frames else 0


def latent_frames(frames: int, temporal_factor: int) -> int:
    """The latent frames that decode to at least ``frames`` frames."""
    return 1 + -(-(frames - 1) // temporal_factor) if frames else 0


def latent_actions(actions_BT: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """Per-frame actions of pixel clips ``(B, 1 + k (F - 1))`` as the model reads them, one per
    latent frame ``(B, F)``: latent frame 0 is pixel frame 0, latent frame ``j`` covers pixel frames
    ``1 + k (j - 1) .. k j`` and takes the action held longest among them (the earliest on a tie)
    -- what the camera mostly did while the frame's content was made. Identity for ``k = 1``."""
    if temporal_factor == 1:
        return actions_BT
    B, T = actions_BT.shape
    F = latent_frames(T, temporal_factor)
    if pixel_frames(F, temporal_factor) != T:
        raise ValueError(f"{T} frames of actions are not 1 + {temporal_factor} k: one per frame of a clip the codec encodes")
    groups_BFk = actions_BT[:, 1:].reshape(B, F - 1, temporal_factor)
    # the mode of each group, earliest first on a tie: count each value's occurrences, keep the
    # first position holding the largest count
    counts_BFkk = (groups_BFk[..., :, None] == groups_BFk[..., None, :]).sum(-1)
    first_max = counts_BFkk.argmax(-1, keepdim=True)
    return torch.cat([actions_BT[:, :1], groups_BFk.gather(-1, first_max)[..., 0]], 1)


SHIPPED = Path(__file__).resolve().parent / "assets"
"""Checkpoints that ship inside the package (a few MB each), loadable by folder name."""


def resolve_checkpoint(name: str | Path) -> Path:
    path = Path(name)
    if not path.exists() and (SHIPPED / str(name)).is_dir():
        return SHIPPED / str(name)
    return path


def checkpoint_kind(path: str | Path) -> Literal["toy", "wan-pipeline", "wan-transformer", "wan-student"]:
    """What a checkpoint folder holds, from its index files alone (no weights read)."""
    folder = resolve_checkpoint(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; pass a streamkd checkpoint folder, a shipped name "
            f"({', '.join(sorted(p.name for p in SHIPPED.iterdir() if p.is_dir()))}) or a diffusers Wan pipeline folder"
        )
    if (folder / "model_index.json").is_file():
        return "wan-pipeline"
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config} is missing; is {folder} a streamkd checkpoint (config.json) or a diffusers "
                              "pipeline folder (model_index.json)?")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} holds {type(data).__name__}, not a config object; the checkpoint is corrupt")
    if "_class_name" in data:
        if data["_class_name"] == "WanTransformer3DModel":
            return "wan-transformer"
        raise CheckpointError(f"{config} is a diffusers {data['_class_name']!r}; streamkd reads WanTransformer3DModel "
                              "transformers and Wan pipeline folders (model_index.json)")
    return "wan-student" if data.get("kind") == "wan" else "toy"


def load_model(path: str | Path, device: str | torch.device = "cpu", wan=None, pipeline: str | None = None) -> ModelBundle:
    """The bundle a checkpoint holds: a streamkd toy checkpoint (or shipped name), a diffusers Wan
    pipeline folder (its transformer is the bidirectional teacher), or a Wan student saved by
    streamkd. ``wan`` (``streamkd.models.wan_model.WanOptions``: size, horizon, text length,
    negative prompt) sets what a pipeline folder does not record; ``pipeline`` points a Wan student
    at its moved pipeline folder. A toy checkpoint refuses both."""
    kind = checkpoint_kind(path)
    if kind == "toy":
        given = sorted((wan.given() if wan is not None else {}).keys()) + (["pipeline"] if pipeline else [])
        if given:
            raise ValueError(f"{given} apply to Wan models; the toy checkpoint {path} fixes its own size and text encoder")
        from streamkd.models.world import WorldModel

        return WorldModel.load(path, device)
    if kind == "wan-transformer":
        raise CheckpointError(
            f"{path} is a bare WanTransformer3DModel folder; pass the pipeline folder above it (model_index.json, with "
            "vae/, text_encoder/ and tokenizer/), which supplies the codec and text encoder"
        )
    from streamkd.models.wan_model import WanModel

    if kind == "wan-pipeline":
        if pipeline is not None:
            raise ValueError(f"{path} is a pipeline folder: --pipeline points a moved *student* at its pipeline; drop it")
        return WanModel.from_pipeline(resolve_checkpoint(path), device=device, options=wan)
    return WanModel.load(resolve_checkpoint(path), device=device, options=wan, pipeline=pipeline)
