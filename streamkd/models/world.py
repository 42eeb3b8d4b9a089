"""The world model bundle: DiT + prompt encoder + codec, and how it is saved for inference.

One checkpoint folder holds everything needed to generate: ``config.json`` (this module's
``WorldModelConfig``) and ``model.safetensors`` (all weights, codec buffers included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from streamkd.bundle import CausalConfig, SamplingConfig, resolve_checkpoint
from streamkd.checkpoint import CheckpointError, atomic_save_safetensors, load_inference_weights
from streamkd.config import from_dict, to_dict
from streamkd.data.actions import default_action_names
from streamkd.data.toyworld import ACTION_DELTAS, ACTIONS, STYLE_VOCAB, ToyClipDataset, ToyWorldConfig, parse_prompt, render
from streamkd.cache.memory import MemoryConfig
from streamkd.models.codec import CodecConfig, PatchPCACodec
from streamkd.models.conditioning import WordPromptEncoder
from streamkd.models.dit import DiT, DiTConfig


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


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dit = DiT(cfg.dit)
        self.prompt_encoder = WordPromptEncoder(STYLE_VOCAB, cfg.prompt_tokens, cfg.dit.text_dim)
        self.codec = PatchPCACodec(cfg.codec)

    # ------------------------------------------------------------- the bundle (streamkd.bundle)
    @property
    def text_encoder(self) -> WordPromptEncoder:
        return self.prompt_encoder

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.prompt_encoder(prompts)

    @property
    def null_prompt(self) -> str:
        return self.prompt_encoder.null_prompt

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.cfg.latent_size, self.cfg.latent_size

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.cfg.world.frame_size, self.cfg.world.frame_size

    @property
    def horizon_frames(self) -> int:
        return self.cfg.horizon_frames

    @property
    def num_actions(self) -> int:
        return self.cfg.dit.num_actions

    @property
    def action_names(self) -> list[str]:
        """The toy camera's moves (index = id), when the model takes them."""
        return default_action_names(self.num_actions)

    @property
    def is_causal(self) -> bool:
        return self.cfg.causal is not None

    def check_prompt(self, prompt: str) -> str:
        """The prompt in the toy world's grammar ('forest with red squares'); ValueError otherwise."""
        return parse_prompt(prompt).prompt

    def first_frame(self, seed: int, prompt: str):
        """The toy world's frame 0 for (seed, prompt), uint8 ``(H, W, 3)``: every toy stream is
        image-to-video from its episode's first frame."""
        return render(seed, prompt, [0], 1, self.cfg.world)[0]

    def conditions(self, num_frames: int, base_seed: int):
        """The toy world's training clips (``streamkd.data.prompts`` condition source)."""
        return ToyClipDataset(self.cfg.world, num_frames, base_seed=base_seed)

    def use_prompt_cache(self, folder, prompts=()) -> None:
        raise ValueError("prompt_cache caches a Wan model's UMT5 embeddings; the toy world's word encoder needs none: "
                         "set prompt_cache: null")

    def like(self, cfg: WorldModelConfig) -> "WorldModel":
        """A fresh toy bundle for ``cfg`` (the toy world trains every component, so nothing is shared)."""
        return WorldModel(cfg)

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
        load_inference_weights(model, folder)
        return model.to(device).eval()
