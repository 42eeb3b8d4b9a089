"""The Wan2.1 bundle: a diffusers Wan pipeline folder as a streamkd checkpoint.

Two ways in (``streamkd.bundle.load_model`` picks by the folder's files):

* a diffusers ``WanPipeline`` folder (``model_index.json``): its ``transformer/`` becomes the
  bidirectional teacher (``streamkd.models.wan.load_wan_dit``), ``vae/`` the codec
  (``streamkd.models.wan_vae``), ``tokenizer/`` + ``text_encoder/`` the UMT5 text encoder
  (``streamkd.models.text``); a Wan2.1 ``WanImageToVideoPipeline`` folder adds ``image_encoder/``
  + ``image_processor/``, the CLIP image encoder (``streamkd.models.image_encoder``), and its
  transformer reads the first frame twice: as CLIP tokens (``image_context``) and as 20 channels
  concatenated to the latents (``image_condition``);
* a student (or any DiT) saved by streamkd from one: ``config.json`` (``WanModelConfig``, with
  ``"kind": "wan"``) + ``model.safetensors`` holding the DiT alone. The frozen VAE and text encoder
  are not copied (gigabytes for Wan2.1: UMT5-XXL is 11 GB in bf16): the config names the pipeline
  folder they are read from, and ``--pipeline`` / ``pipeline=`` points a moved student at another
  copy.

What a pipeline folder does not record is set here: the video size (``height`` x ``width``
pixels), the training horizon in latent frames (Wan2.1: 81 frames = 21 latent frames at
480x832), the text length (512 tokens, Wan's) and the negative prompt of CFG
(``uncond + s (cond - uncond)`` with the negative prompt as ``uncond``; Wan's default ``s`` is 5).

Frozen components live outside the module tree (``WanModel.frozen``): ``parameters()`` and
``state_dict()`` are the DiT's alone, so trainers optimise and checkpoint only the denoiser, and a
student, its teacher and its critic share one VAE and one text encoder in memory (``like``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from streamkd.bundle import CausalConfig, SamplingConfig
from streamkd.cache.memory import MemoryConfig
from streamkd.checkpoint import CheckpointError, atomic_save_safetensors, load_inference_weights
from streamkd.config import from_dict, to_dict
from streamkd.data.actions import check_action_names, default_action_names
from streamkd.models.dit import DiT, DiTConfig

PIPELINE_COMPONENTS = {
    "transformer": "WanTransformer3DModel",
    "vae": "AutoencoderKLWan",
    "text_encoder": "UMT5EncoderModel",
    "tokenizer": None,  # any T5 tokenizer class
}
"""What a Wan text-to-video pipeline folder must hold (subfolder -> the class it must name)."""

I2V_COMPONENTS = {"image_encoder": "CLIPVisionModel", "image_processor": None}
"""What a Wan2.1 image-to-video folder holds besides (Wan2.2 I2V folders have no image encoder)."""

SUPPORTED_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")


@dataclass
class WanOptions:
    """What a diffusers Wan pipeline folder does not record, set where a folder is loaded (the
    ``wan:`` section of ode-pairs / distill configs, ``--height`` etc. on the command line). None
    keeps the checkpoint's value (a pipeline folder's: ``WanModelConfig``'s defaults)."""

    height: int | None = None
    """Video height in pixels."""
    width: int | None = None
    """Video width in pixels."""
    horizon_frames: int | None = None
    """Latent frames of one clip (the teacher's horizon)."""
    max_text_length: int | None = None
    """Prompt tokens."""
    negative_prompt: str | None = None
    """CFG's unconditional prompt."""

    def given(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class WanModelConfig:
    kind: str = "wan"
    """Marks a streamkd checkpoint of a Wan bundle (the toy world's config has no kind)."""
    pipeline: str = ""
    """The diffusers Wan pipeline folder the VAE, tokenizer and text encoder are read from."""
    dit: DiTConfig = field(default_factory=DiTConfig)
    """Transformer shape (from the pipeline's transformer/config.json)."""
    height: int = 480
    """Video height in pixels (a multiple of the VAE stride x the patch size)."""
    width: int = 832
    """Video width in pixels."""
    horizon_frames: int = 21
    """Latent frames of one training clip (Wan2.1: 81 frames = 1 + 4 x 20)."""
    max_text_length: int = 512
    """Prompt tokens (UMT5); longer prompts are truncated with a warning (streamkd.models.text)."""
    negative_prompt: str = ""
    """CFG's unconditional prompt (diffusers' WanPipeline default: empty)."""
    action_names: list[str] = field(default_factory=list)
    """Names of the actions a world model takes (index = id), typed in ``--actions`` and sent by
    clients; empty: ``default_action_names`` (the toy camera's five for a 5-action model)."""
    causal: CausalConfig | None = None
    """Set for causal (streaming) checkpoints; None for bidirectional teachers."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(kind="euler", num_steps=50, shift=3.0, guidance_scale=5.0)
    )
    """Default sampler: Wan2.1's 50 flow-matching steps, shift 3 (its 480p setting), CFG 5."""

    def __post_init__(self) -> None:
        if self.kind != "wan":
            raise ValueError(f"kind must be 'wan', got {self.kind!r}")
        if self.horizon_frames < 1 or self.max_text_length < 1:
            raise ValueError(f"horizon_frames and max_text_length must be >= 1, got {self.horizon_frames}, {self.max_text_length}")
        if self.action_names:
            check_action_names(self.action_names, self.dit.num_actions, "action_names")

    def memory_for_stream(self, memory: MemoryConfig | None) -> MemoryConfig | None:
        return memory  # no torus: a real camera does not wrap around


class _Frozen:
    """The components a Wan bundle reads but never trains, shared by teacher, student and critic."""

    def __init__(self, codec: nn.Module, text_encoder: nn.Module, image_encoder: nn.Module | None = None) -> None:
        self.codec = codec
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder  # CLIP, image-to-video folders only
        self.prompt_cache = None  # a PromptEmbeddingCache in front of the text encoder (training runs)

    def __deepcopy__(self, memo: dict) -> "_Frozen":
        return self  # a deep-copied bundle (the critic, the EMA) shares the frozen components


def check_pipeline_folder(folder: Path) -> dict:
    """``model_index.json`` of a Wan pipeline folder, after checking every component is there."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path} is not valid JSON ({e})") from None
    name = index.get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        raise CheckpointError(
            f"{index_path} names {name!r}; streamkd reads {', '.join(SUPPORTED_PIPELINES)} folders (Wan2.1 text-to-video: "
            "transformer + UMT5 + AutoencoderKLWan; Wan2.1 image-to-video adds a CLIP image encoder)"
        )
    components = dict(PIPELINE_COMPONENTS)
    if name == "WanImageToVideoPipeline":
        if (index.get("image_encoder") or [None])[0] is None or index.get("expand_timesteps"):
            raise CheckpointError(
                f"{index_path} names {name} without a CLIP image encoder (Wan2.2 I2V: the first frame enters through "
                "the latents alone); streamkd reads Wan2.1 I2V folders, which hold image_encoder/"
            )
        components.update(I2V_COMPONENTS)
    for sub, cls in components.items():
        path = folder / sub
        if sub not in index or not path.is_dir():
            raise CheckpointError(f"{folder} has no {sub}/ component (model_index.json or folder missing); a Wan pipeline "
                                  f"folder needs {', '.join(components)}: re-save it with {name}.save_pretrained")
        entry = index[sub]
        if cls is not None and isinstance(entry, list) and len(entry) == 2 and entry[1] != cls:
            raise CheckpointError(f"{folder}/model_index.json: {sub} is a {entry[1]}, expected {cls}")
    return index


class WanModel(nn.Module):
    def __init__(self, cfg: WanModelConfig, frozen: _Frozen | None = None, device: str | torch.device = "cpu",
                 dit: DiT | None = None) -> None:
        """A bundle for ``cfg``: ``frozen`` components shared with another bundle (else read from
        ``cfg.pipeline``), and ``dit`` when its weights are already loaded (else a fresh DiT)."""
        super().__init__()
        self.cfg = cfg
        self.frozen = frozen if frozen is not None else self._load_frozen(cfg, device)
        self.dit = dit if dit is not None else DiT(cfg.dit)
        self._check_geometry()

    @staticmethod
    def _load_frozen(cfg: WanModelConfig, device: str | torch.device) -> _Frozen:
        from streamkd.models.text import UMT5TextEncoder
        from streamkd.models.wan_vae import WanVAECodec

        folder = Path(cfg.pipeline)
        if not (folder / "model_index.json").is_file():
            raise CheckpointError(
                f"the Wan pipeline folder {folder} (config field 'pipeline') is missing; this checkpoint reads its VAE and "
                "text encoder from there: pass the folder's new place (--pipeline / pipeline=)"
            )
        check_pipeline_folder(folder)
        codec = WanVAECodec.from_pretrained(folder).to(device)
        text = UMT5TextEncoder.from_pretrained(folder, max_length=cfg.max_text_length,
                                               negative_prompt=cfg.negative_prompt).to(device)
        image = None
        if cfg.dit.image_dim is not None:
            from streamkd.models.image_encoder import CLIPImageEncoder

            image = CLIPImageEncoder.from_pretrained(folder).to(device)
        return _Frozen(codec, text, image)

    def _check_geometry(self) -> None:
        cfg, codec = self.cfg, self.frozen.codec
        C = codec.latent_channels
        # image-to-video reads the latents, the first-frame mask (one channel per frame of the VAE's
        # temporal stride) and the first frame's latents: 16 + 4 + 16 = 36 for Wan2.1 I2V
        want_in = C if cfg.dit.image_dim is None else 2 * C + codec.temporal_factor
        if cfg.dit.in_channels != want_in or cfg.dit.out_channels != C:
            raise CheckpointError(
                f"transformer in/out channels ({cfg.dit.in_channels}/{cfg.dit.out_channels}) do not match the VAE's "
                f"{C} latent channels (vae/config.json z_dim; {want_in}/{C} expected"
                f"{'' if cfg.dit.image_dim is None else ' for image-to-video'}); the transformer and VAE come from different models"
            )
        image = self.frozen.image_encoder
        if (cfg.dit.image_dim is None) != (image is None) or (image is not None and image.dim != cfg.dit.image_dim):
            raise CheckpointError(
                f"the transformer's image_dim ({cfg.dit.image_dim}) does not match the CLIP image encoder "
                f"({'none' if image is None else f'width {image.dim}'}); the transformer and image encoder come from different models"
            )
        _, ph, pw = cfg.dit.patch_size
        stride_h, stride_w = codec.spatial_factor * ph, codec.spatial_factor * pw
        if cfg.height % stride_h or cfg.width % stride_w or cfg.height < stride_h or cfg.width < stride_w:
            raise ValueError(
                f"video size {cfg.height}x{cfg.width} is not a multiple of the VAE stride {codec.spatial_factor} x patch "
                f"{ph}x{pw} = {stride_h}x{stride_w}; use e.g. {max(stride_h, cfg.height // stride_h * stride_h)}x"
                f"{max(stride_w, cfg.width // stride_w * stride_w)}"
            )

    # -------------------------------------------------------------------------- construction
    @classmethod
    def from_pipeline(cls, folder: str | Path, device: str | torch.device = "cpu", options: WanOptions | None = None) -> "WanModel":
        """The bidirectional teacher of a diffusers Wan pipeline folder (``options``: what the
        folder does not record)."""
        from streamkd.models.wan import load_wan_dit

        folder = Path(folder).resolve()
        check_pipeline_folder(folder)
        dit = load_wan_dit(folder, device=device)
        cfg = WanModelConfig(pipeline=str(folder), dit=dit.cfg, **(options.given() if options else {}))
        return cls(cfg, device=device, dit=dit).eval()

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options: WanOptions | None = None,
             pipeline: str | None = None) -> "WanModel":
        """A Wan bundle saved by ``save`` (a distilled student); ``pipeline`` overrides where its
        frozen components are read from, ``options`` the size / text fields of its config."""
        folder = Path(folder)
        cfg_path = folder / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{cfg_path} is missing; is {folder} a streamkd checkpoint?") from None
        if pipeline is not None:
            raw["pipeline"] = str(Path(pipeline).resolve())
        raw.update(options.given() if options else {})
        cfg = from_dict(WanModelConfig, raw)
        model = cls(cfg, device=device)
        load_inference_weights(model, folder)
        return model.to(device).eval()

    def like(self, cfg: WanModelConfig) -> "WanModel":
        """A bundle with a fresh DiT for ``cfg`` sharing this one's VAE and text encoder."""
        if (cfg.pipeline, cfg.max_text_length, cfg.negative_prompt) != (self.cfg.pipeline, self.cfg.max_text_length, self.cfg.negative_prompt):
            return WanModel(cfg, device=self.dit.proj_out.weight.device)
        return WanModel(cfg, frozen=self.frozen)

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """config.json (naming the pipeline folder) + model.safetensors (the DiT), each atomic."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in self.state_dict().items()}
        atomic_save_safetensors(tensors, folder / "model.safetensors")
        tmp = folder / ".config.json.tmp"
        tmp.write_text(json.dumps(to_dict(self.cfg), indent=2))
        tmp.replace(folder / "config.json")

    def _apply(self, fn, recurse=True):  # .to(device) / .half() reach the frozen components too
        super()._apply(fn, recurse)
        self.frozen.codec._apply(fn, recurse)
        self.frozen.text_encoder._apply(fn, recurse)
        if self.frozen.image_encoder is not None:
            self.frozen.image_encoder._apply(fn, recurse)
        return self

    # ---------------------------------------------------------------- the bundle (streamkd.bundle)
    @property
    def codec(self):
        return self.frozen.codec

    @property
    def text_encoder(self):
        return self.frozen.text_encoder

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        encoder = self.frozen.prompt_cache or self.frozen.text_encoder
        return encoder.encode(list(prompts))

    def use_prompt_cache(self, folder: str | Path, prompts: list[str] = ()) -> None:
        """Read prompt embeddings from (and write new ones to) ``folder``, for this bundle and
        every bundle sharing its frozen components; ``prompts`` are encoded now (the training
        set, once, before the first step)."""
        from streamkd.models.text import PromptEmbeddingCache

        self.frozen.prompt_cache = PromptEmbeddingCache(folder, self.frozen.text_encoder)
        if prompts:
            self.frozen.prompt_cache.prefill(list(prompts))

    @property
    def null_prompt(self) -> str:
        return self.frozen.text_encoder.null_prompt

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.frozen.codec.spatial_factor
        return self.cfg.height // s, self.cfg.width // s

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.cfg.height, self.cfg.width

    @property
    def horizon_frames(self) -> int:
        return self.cfg.horizon_frames

    @property
    def num_actions(self) -> int:
        return self.cfg.dit.num_actions

    @property
    def action_names(self) -> list[str]:
        return self.cfg.action_names or default_action_names(self.num_actions)

    @property
    def is_causal(self) -> bool:
        return self.cfg.causal is not None

    def conditions(self, num_frames: int, base_seed: int) -> None:
        """None: Wan distils on a prompt file (``prompts=``) or on clips (``data=``); it has no built-in conditions."""
        return None

    def check_prompt(self, prompt: str) -> str:
        """Free text, refused (not truncated) past the text encoder's token limit: a live client
        gets told rather than silently served a shorter prompt."""
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("the prompt is empty; describe the video")
        count = self.frozen.text_encoder.token_counts([prompt])[0]
        if count > self.cfg.max_text_length:
            raise ValueError(f"the prompt is {count} tokens, this model reads at most {self.cfg.max_text_length}; shorten it")
        return prompt

    @property
    def is_image_to_video(self) -> bool:
        """The transformer reads the first frame as CLIP tokens and as concatenated channels
        (Wan2.1 I2V): every call needs ``image_inputs``."""
        return self.cfg.dit.image_dim is not None

    @torch.no_grad()
    def image_inputs(self, first_frames_BHWC: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(condition_BCFhw, image_context_BLiD)`` for an image-to-video clip of ``num_frames`` latent
        frames starting at the uint8 frames ``first_frames_BHWC``, as ``WanImageToVideoPipeline`` builds them.

        ``condition``: ``temporal_factor`` mask channels (1 at the first latent frame -- it covers
        the first pixel frame, which is the image -- 0 after) then the normalised posterior-mean
        latents of the pixel video ``[image, 0, 0, ...]`` (its ``1 + 4 (F - 1)`` frames); the DiT
        reads ``cat([latents, condition], channels)``. ``image_context``: the CLIP tokens of the
        image. Both are the same for every denoising step and for both CFG rows."""
        stream = self.image_stream(first_frames_BHWC)
        return stream.next(num_frames), stream.context_BLiD

    def image_stream(self, first_frames_BHWC: torch.Tensor) -> ImageStream:
        """The image inputs of an unbounded image-to-video stream, chunk by chunk (``ImageStream``)."""
        if not self.is_image_to_video:
            raise ValueError("this Wan model is text-to-video (no image_dim): it takes no image inputs")
        return ImageStream(self, first_frames_BHWC)

    def first_frame(self, seed: int, prompt: str) -> None:
        """No default first frame: a Wan stream is text-to-video unless an image is given."""
        return None


class ImageStream:
    """``WanModel.image_inputs`` for a stream of unknown length, chunk by chunk.

    Wan2.1 I2V conditions a clip on the VAE latents of the video ``[image, 0, 0, ...]`` and a
    mask that marks the image's latent frame. A stream continues that video with zero frames
    forever: the condition of each chunk comes from the VAE's streaming encoder (its causal feature
    cache carries the image into later latents), so the chunks, concatenated, are exactly
    ``image_inputs`` of the whole length; the CLIP tokens are computed once."""

    def __init__(self, model: WanModel, first_frames_BHWC: torch.Tensor) -> None:
        dit = model.dit.proj_out.weight
        self.device, self.dtype = dit.device, dit.dtype
        self.temporal_factor = model.frozen.codec.temporal_factor
        self.encoder = model.frozen.codec.stream_encoder()
        self.image_BFHWC = first_frames_BHWC[:, None].to(torch.float32).div(127.5).sub(1.0)
        self.context_BLiD = model.frozen.image_encoder.encode(first_frames_BHWC).to(self.device, self.dtype)
        self.frames = 0  # latent frames handed out so far

    @torch.no_grad()
    def next(self, num_frames: int) -> torch.Tensor:
        """``(B, 4 + C, num_frames, h, w)``: the condition channels of the next ``num_frames`` latent frames."""
        B, _, H, W, _ = self.image_BFHWC.shape
        zeros = self.temporal_factor * (num_frames - 1 if self.frames == 0 else num_frames)
        video = self.image_BFHWC.new_zeros(B, zeros, H, W, 3)
        if self.frames == 0:
            video = torch.cat([self.image_BFHWC, video], 1)
        latents_BCFhw = self.encoder.push_float(video).to(self.device, self.dtype)
        mask_BTFhw = torch.zeros(B, self.temporal_factor, *latents_BCFhw.shape[2:], device=self.device, dtype=self.dtype)
        if self.frames == 0:
            mask_BTFhw[:, :, 0] = 1
        self.frames += num_frames
        return torch.cat([mask_BTFhw, latents_BCFhw], 1)
