"""ODE pairs: points of the teacher's sampling trajectories, the data of ODE-regression init.

For each training condition (prompt, and when the source gives them a first frame and actions:
the toy world's train split, or real clips -- ``data``: videos or shards, image-to-video -- or a
prompt file for text-to-video, ``streamkd.data.prompts``) the
teacher integrates its flow ODE from pure noise with many Euler steps (CFG as configured), and we
keep the latents at the student's noise levels plus the end point:

    latents[k] = x at sigma = keep_sigmas[k]  (k < K),   latents[K] = the teacher's x0

The student then learns ``x_{sigma_k} -> x0`` (CausVid / Self-Forcing's ODE initialisation).

``sampler: few_step`` keeps the same kind of pairs from the teacher's x0 sampler instead (predict
x0 at each level, re-noise with fresh noise to the next): its points are not on one ODE path, so
a student regressing ``noise -> x0`` on them learns the mean of what the teacher's few-step
sampler makes from that noise. On the toy world that sampler is the teacher at its best (README:
24.79 dB, 0.04 px against Euler 24's 23.77 dB, 1.49 px).

Shards (``shard_00000.safetensors``: ``latents`` ``(N, K+1, C, F, h, w)`` fp16, ``actions``
``(N, F)`` (zeros without actions), ``clip_index`` ``(N,)``; prompts in the safetensors metadata) are written atomically
one by one; a rerun skips the shards that exist, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from streamkd.checkpoint import atomic_save_safetensors, load_safetensors
from streamkd.config import to_dict
from streamkd.runtime import RuntimeConfig, prepare
from streamkd.bundle import ModelBundle, load_model
from streamkd.models.wan_model import WanOptions
from streamkd.data.prompts import collate, condition_source
from streamkd.sampling.schedule import make_sampler
from streamkd.sampling.stream import ImageInputs, guided, with_image


@dataclass
class ODEPairsConfig:
    teacher: str = "toy-teacher"
    """Teacher checkpoint (folder or shipped name, or a diffusers Wan pipeline folder)."""
    prompts: str | None = None
    """Prompt file (.txt, one per line, or .jsonl) to sample on; None: ``data``'s clips, or the
    teacher's own conditions (the toy world's train clips). Text-to-video teachers (Wan) need one
    of the two."""
    data: str | None = None
    """Clips to sample on instead of a prompt file (image-to-video): a folder or .csv/.jsonl
    manifest of captioned videos, or a shard folder made by ``streamkd data encode``. Each
    trajectory's frame 0 is held at its clip's encoded first frame; its caption is the prompt, its
    actions (per source frame) drive a teacher that takes actions (``ClipConditions`` in
    ``streamkd.data.prompts``; docs/data.md). Clips are cycled when ``num_clips`` exceeds them."""
    prompt_cache: str | None = None
    """Folder of cached prompt embeddings (Wan teachers): every prompt of ``prompts`` goes through
    UMT5 once, before the first step, and is read from disk after (``streamkd.models.text``)."""
    wan: WanOptions = field(default_factory=WanOptions)
    """Wan teachers: size, horizon, text length and negative prompt a pipeline folder does not record."""
    out_dir: str = "runs/ode_pairs"
    """Where the shards go."""
    num_clips: int = 256
    """Trajectories to sample."""
    shard_clips: int = 16
    """Trajectories per shard (and per teacher batch)."""
    base_seed: int = 7
    """Train-split seed base for the episodes (and the noise)."""
    sampler: Literal["euler", "few_step"] = "euler"
    """The teacher's sampler: euler (its flow ODE) or few_step (x0 prediction, re-noised)."""
    num_steps: int = 24
    """Teacher sampler steps."""
    shift: float = 1.0
    """Teacher timestep shift."""
    guidance_scale: float = 1.0
    """Teacher CFG scale (uncond + s (cond - uncond))."""
    keep_sigmas: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    """Noise levels to keep (the student's few-step levels); each must lie on the Euler grid."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device and precision of the teacher (``streamkd.runtime``; bf16 stores its weights in bf16)."""

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.shard_clips < 1:
            raise ValueError("num_clips and shard_clips must be >= 1")
        if self.prompts is not None and self.data is not None:
            raise ValueError("prompts and data are both set; choose one: prompts (text-to-video) or data (image-to-video "
                             "from the clips' first frames; their captions are the prompts), and set the other to null")
        if self.sampler not in ("euler", "few_step"):
            raise ValueError(f"sampler must be 'euler' or 'few_step', got {self.sampler!r}")
        grid = self.make_sampler().sigmas
        for s in self.keep_sigmas:
            if min(abs(s - g) for g in grid) > 1e-6:
                name = "Euler grid" if self.sampler == "euler" else "few-step levels"
                raise ValueError(
                    f"keep_sigmas value {s} is not on the teacher's {name} ({self.num_steps} steps, shift "
                    f"{self.shift}: {[round(g, 4) for g in grid[:-1]]}); pick num_steps so that every kept level is one of them"
                )

    def make_sampler(self):
        return make_sampler(self.sampler, self.num_steps, self.shift)


def keep_indices(cfg: ODEPairsConfig) -> list[int]:
    grid = cfg.make_sampler().sigmas
    return [min(range(len(grid)), key=lambda i: abs(grid[i] - s)) for s in cfg.keep_sigmas]


@torch.no_grad()
def teacher_trajectories(
    teacher: ModelBundle, batch: dict, cfg: ODEPairsConfig, gen: torch.Generator
) -> tuple[torch.Tensor, ImageInputs | None]:
    """``(B, K+1, C, F, h, w)``: the kept trajectory points and the end point (F: the teacher's
    horizon), and the image inputs they were made with (Wan2.1 I2V teachers; else None). Frame 0
    is held clean at the first frame's latent when the batch has frames -- except for a Wan2.1
    I2V teacher, which denoises every frame and reads the first frame as its image inputs."""
    frames, actions, prompts = batch["frames"], batch["actions"], batch["prompt"]
    B, num_f = len(prompts), teacher.horizon_frames
    param = teacher.dit.proj_out.weight
    image = None
    if teacher.dit.cfg.image_dim is not None:
        if frames is None:
            raise ValueError("an image-to-video teacher (Wan2.1 I2V) makes pairs from first frames: set data= "
                             "(videos or shards) so that every clip has one")
        image = teacher.image_inputs(frames[:, 0], num_f)
        frames = None  # not held clean: the image inputs carry it
    first = None if frames is None else teacher.codec.encode(frames[:, :1]).to(param.device, param.dtype)
    if actions is not None and not teacher.num_actions:
        actions = None  # a teacher without an action embedding ignores the source's actions
    sampler = cfg.make_sampler()
    use_cfg = cfg.guidance_scale != 1.0
    rows = 2 if use_cfg else 1
    ctx = teacher.encode_prompts(list(prompts) + ([teacher.null_prompt] * B if use_cfg else [])).to(param.dtype)
    a = actions
    if actions is not None and use_cfg:
        a = torch.cat([actions, torch.full_like(actions, teacher.dit.null_action)])
    x = torch.randn((B, teacher.codec.latent_channels, num_f, *teacher.latent_hw), generator=gen).to(param.device, param.dtype)
    keep = keep_indices(cfg)
    kept = []
    t_BF = torch.empty(B * rows, num_f, device=param.device)
    for i in range(sampler.num_steps + 1):
        if first is not None:
            x[:, :, :1] = first
        if i in keep:
            kept.append(x.clone())
        if i == sampler.num_steps:
            break
        t_BF.fill_(1000.0 * sampler.sigmas[i])
        if first is not None:
            t_BF[:, 0] = 0.0
        x_in, image_kw = with_image(x.repeat(rows, 1, 1, 1, 1), image, rows)
        v = guided(teacher.dit(x_in, t_BF, ctx, a, **image_kw), B, cfg.guidance_scale)
        x = sampler.step(v, i, x, torch.randn(x.shape, generator=gen).to(x) if sampler.stochastic else None)
    kept.append(x)
    return torch.stack(kept, 1), image


def generate_ode_pairs(cfg: ODEPairsConfig, progress: bool = True) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    teacher = prepare(load_model(cfg.teacher, wan=cfg.wan if cfg.wan.given() else None), cfg.runtime, trainable=False)
    data = condition_source(teacher, cfg.prompts, teacher.horizon_frames, cfg.base_seed, cfg.data)
    if cfg.prompt_cache is not None:
        teacher.use_prompt_cache(cfg.prompt_cache, getattr(data, "prompts", ()))
    num_shards = -(-cfg.num_clips // cfg.shard_clips)
    for shard in tqdm(range(num_shards), desc="ode pairs (shards)", disable=not progress):
        path = out / f"shard_{shard:05d}.safetensors"
        if path.exists():
            continue  # resume: shards are written atomically, an existing one is complete
        first = shard * cfg.shard_clips
        index = list(range(first, min(first + cfg.shard_clips, cfg.num_clips)))
        batch = collate([data[i] for i in index])
        gen = torch.Generator().manual_seed(cfg.base_seed * 1_000_003 + shard)  # per shard: resumable
        latents, image = teacher_trajectories(teacher, batch, cfg, gen)
        tensors = {"latents": latents.half().cpu(), "clip_index": torch.tensor(index),
                   "actions": batch["actions"] if batch["actions"] is not None else torch.zeros(len(index), latents.shape[3], dtype=torch.long)}
        if image is not None:  # the student regresses with the same image inputs
            tensors["image_condition"], tensors["image_context"] = image[0].half().cpu(), image[1].half().cpu()
        atomic_save_safetensors(
            tensors, path,
            metadata={"prompts": json.dumps(batch["prompt"]), "keep_sigmas": json.dumps(cfg.keep_sigmas),
                      "first_given": json.dumps(batch["frames"] is not None and image is None)},
        )
    return out


class ODEPairStore:
    """All shards of an ODE-pair folder, in memory (the toy set is a few hundred MB at most)."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        paths = sorted(folder.glob("shard_*.safetensors"))
        if not paths:
            raise FileNotFoundError(f"no ODE-pair shards in {folder}; run `streamkd distill ode-pairs` first")
        latents, actions, prompts, conditions, contexts = [], [], [], [], []
        for path in paths:
            tensors = load_safetensors(path)
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            latents.append(tensors["latents"])
            actions.append(tensors["actions"])
            if "image_condition" in tensors:
                conditions.append(tensors["image_condition"])
                contexts.append(tensors["image_context"])
            prompts += json.loads(meta["prompts"])
            self.keep_sigmas = json.loads(meta["keep_sigmas"])
            # frame 0 of each trajectory is a given first frame (image-to-video) unless the shard
            # says otherwise (text-to-video pairs; shards written before the key are all image-to-video)
            self.first_given = json.loads(meta.get("first_given", "true"))
        if conditions and len(conditions) != len(paths):
            raise ValueError(f"{folder} mixes image-to-video shards (with image inputs) and others; "
                             "make the pairs of one teacher into one folder")
        self.latents = torch.cat(latents)
        self.actions = torch.cat(actions)
        self.image: ImageInputs | None = (torch.cat(conditions), torch.cat(contexts)) if conditions else None
        """Wan2.1 I2V pairs: the image inputs of every clip (condition channels, CLIP tokens)."""
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)
