"""The world model bundle: DiT + prompt encoder + codec, and how it is saved for inference.

One checkpoint folder holds everything needed to generate: ``config.json`` (this module's
``WorldModelConfig``) and ``model.safetensors`` (all weights, codec buffers included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from streamkd.checkpoint import CheckpointError, atomic_save_safetensors, load_safetensors
from streamkd.config import from_dict, to_dict
from streamkd.data.toyworld import ACTION_DELTAS, ACTIONS, STYLE_VOCAB, ToyWorldConfig
from streamkd.cache.memory import MemoryConfig
from streamkd.models.codec import CodecConfig, PatchPCACodec
from streamkd.models.conditioning import WordPromptEncoder
from streamkd.models.dit import DiT, DiTConfig
from streamkd.sampling.schedule import make_sampler


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


@dataclass
class WorldModelConfig:
    dit: DiTConfig = field(default_factory=lambda: DiTConfig(num_actions=len(ACTIONS)))
    """Transformer shape."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """Toy codec shape."""
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """The toy world this model renders (frame size, camera speed)."""
    prompt_tokens: int = 4
    """Prompt length in words."""
    horizon_frames: int = 12
    """Latent frames per training clip (the teacher's horizon)."""
    causal: CausalConfig | None = None
    """Set for causal (streaming) checkpoints; None for bidirectional teachers."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Default sampler of this checkpoint."""

    def __post_init__(self) -> None:
        if self.dit.in_channels != self.codec.latent_channels or self.dit.out_channels != self.codec.latent_channels:
            raise ValueError(
                f"dit.in_channels/out_channels ({self.dit.in_channels}/{self.dit.out_channels}) must equal "
                f"codec.latent_channels ({self.codec.latent_channels})"
            )
        latent = self.world.frame_size // self.codec.patch
        _, ph, pw = self.dit.patch_size
        if self.world.frame_size % self.codec.patch or latent % ph or latent % pw:
            raise ValueError(
                f"world.frame_size {self.world.frame_size} must divide into codec.patch {self.codec.patch} "
                f"x dit.patch_size {self.dit.patch_size}"
            )
        if self.dit.action_shifts is not None and self.dit.action_shifts != self.toy_action_shifts():
            raise ValueError(
                f"dit.action_shifts {self.dit.action_shifts} do not match the toy world's camera: each action "
                f"moves the view by world.speed_px={self.world.speed_px} px = {self.toy_action_shifts()} tokens; "
                "use those, or null"
            )

    def toy_action_shifts(self) -> tuple[tuple[int, int], ...] | None:
        """The camera translation per action in DiT tokens, or None if a move is not whole tokens."""
        token_px = self.codec.patch * self.dit.patch_size[1]
        if self.world.speed_px % token_px or self.codec.patch * self.dit.patch_size[2] != token_px:
            return None
        return tuple((int(dy), int(dx)) for dy, dx in ACTION_DELTAS * (self.world.speed_px // token_px))

    @property
    def latent_size(self) -> int:
        return self.world.frame_size // self.codec.patch

    def memory_for_stream(self, memory: MemoryConfig | None) -> MemoryConfig | None:
        """``memory`` with the toy world's torus period filled in (map size in DiT tokens) when
        the model moves its camera in whole tokens and the config leaves it open."""
        if memory is None or memory.wrap_tokens or self.toy_action_shifts() is None or self.dit.action_shifts is None:
            return memory
        token_px = self.codec.patch * self.dit.patch_size[1]
        from dataclasses import replace

        return replace(memory, wrap_tokens=self.world.map_size // token_px)


SHIPPED = Path(__file__).resolve().parent.parent / "assets"
"""Checkpoints that ship inside the package (a few MB each), loadable by folder name."""


def resolve_checkpoint(name: str | Path) -> Path:
    path = Path(name)
    if not path.exists() and (SHIPPED / str(name)).is_dir():
        return SHIPPED / str(name)
    return path


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dit = DiT(cfg.dit)
        self.prompt_encoder = WordPromptEncoder(STYLE_VOCAB, cfg.prompt_tokens, cfg.dit.text_dim)
        self.codec = PatchPCACodec(cfg.codec)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.prompt_encoder(prompts)

    @property
    def is_causal(self) -> bool:
        return self.cfg.causal is not None

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Inference checkpoint: config.json + model.safetensors, each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in self.state_dict().items()}
        atomic_save_safetensors(tensors, folder / "model.safetensors")
        tmp = folder / ".config.json.tmp"
        tmp.write_text(json.dumps(to_dict(self.cfg), indent=2))
        tmp.replace(folder / "config.json")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "WorldModel":
        """Load an inference checkpoint folder, or a shipped one by name (``toy-teacher``)."""
        folder = resolve_checkpoint(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist; pass a folder holding config.json and model.safetensors")
        cfg_path = folder / "config.json"
        try:
            cfg = from_dict(WorldModelConfig, json.loads(cfg_path.read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"{cfg_path} is missing; is {folder} a streamkd checkpoint?") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupt") from None
        model = cls(cfg)
        tensors = load_safetensors(folder / "model.safetensors")
        own = model.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise CheckpointError(f"{folder}: weights do not match config.json (missing {missing[:5]}, unexpected {extra[:5]})")
        for name, value in tensors.items():
            if value.shape != own[name].shape:
                raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(value.shape)}, config expects {tuple(own[name].shape)}")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
        return model.to(device).eval()
