"""Teacher pretraining on the toy world: bidirectional flow matching with CFG dropout.

Launch: ``streamkd train teacher --config configs/toyworld/teacher.yaml [key.sub=value ...]``.

Objective (rectified flow, Lipman et al. 2023 / SD3 eq. 1): for clean latents ``x0``, noise ``e``
and a per-clip level ``s`` (uniform, then shifted towards 1 as in Wan / SD3 eq. 23), the model at ``x_s = (1-s) x0 + s e`` is
regressed onto ``v = e - x0`` with a mean-squared error. Image-to-video: with probability
``i2v_prob`` frame 0 is kept clean (t = 0) and left out of the loss, so the teacher learns to
continue a given first frame. With probability ``diffusion_forcing_prob`` a clip gets one level per
frame instead (Diffusion Forcing). Classifier-free guidance: the prompt is replaced by the empty
prompt with probability ``prompt_dropout``, the actions by the null action with probability
``action_dropout`` (independently).

Exact resume: the data position is the step (sample ``i`` of the clip dataset is a pure function
of ``i``), and the noise/timestep/dropout generator state is checkpointed with the weights, the
EMA and the optimizer, so a resumed run reproduces the losses of an uninterrupted one.

Data (``data``): toy-world episodes rendered on the fly, or videos, or shards of latents
pre-encoded by ``streamkd data encode``; batches come through a DataLoader (``num_workers``,
``prefetch_factor``) whose order is the step's alone (``streamkd.data.loader``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from streamkd import distributed
from streamkd.bundle import checkpoint_kind, latent_actions, load_model, pixel_frames, trains_text_encoder
from streamkd.checkpoint import latest_checkpoint, load_training_checkpoint
from streamkd.config import from_dict, to_dict
from streamkd.data.actions import check_action_names
from streamkd.data.loader import open_training_data, step_batches
from streamkd.data.toyworld import ToyClipDataset
from streamkd.models.wan_model import WanOptions
from streamkd.models.world import WorldModel, WorldModelConfig
from streamkd.sampling.schedule import shift_sigmas
from streamkd.distributed import DeepSpeedOptions
from streamkd.runtime import RuntimeConfig, place, prepare
from streamkd.train.common import RunLog, check_resume_config, load_checkpoint, save_checkpoint, update_ema


@dataclass
class TeacherTrainConfig:
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    """Model, codec and toy-world shape."""
    init: str | None = None
    """Warm start: an inference checkpoint (folder or shipped name) whose weights and codec replace
    the random init and the codec fit -- to continue training a shipped teacher. A diffusers Wan
    pipeline folder (or a Wan checkpoint saved by streamkd) fine-tunes that model instead: its DiT
    trains, its VAE and UMT5 stay frozen, ``model`` is not used and ``data`` must name videos or
    shards (e.g. Wan2.1 fine-tuned on videos with per-frame actions: ``add_actions``)."""
    wan: WanOptions = field(default_factory=WanOptions)
    """Wan init: size, horizon, text length and negative prompt a pipeline folder does not record."""
    add_actions: int = 0
    """Wan init: give a DiT without action conditioning an embedding of this many actions (one
    more row for the null action, CFG's unconditional input), zero-initialised so the fine-tune
    starts exactly at the pretrained model -- how a text-to-video teacher becomes a world model
    that follows per-frame actions (the videos' action sidecars). 0 keeps the init's."""
    action_names: list[str] | None = None
    """Wan init with ``add_actions``: the actions' names, index = the sidecars' id (e.g.
    ``[idle, forward, back, left, right, jump]``), saved in the checkpoint; typed in ``--actions``
    and sent by clients. None: ``default_action_names`` (the toy camera's five for 5 actions)."""
    out_dir: str = "runs/teacher"
    """Run folder: checkpoints/, tensorboard/, losses.jsonl, final/ (inference checkpoint)."""
    seed: int = 0
    """Seeds model init, data order and the noise generator."""
    max_steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 6
    """Clips per step."""
    lr: float = 4e-4
    """AdamW peak learning rate (linear warm-up, constant, optional linear decay from decay_start)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    decay_start: int = 0
    """Step from which the learning rate decays linearly to 0 at max_steps (0: no decay). May be
    set when resuming, to anneal a run that trained at constant rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    qk_norm_lr_mult: float = 1.0
    """Learning-rate multiplier of the q/k RMSNorm gains. With normalised q and k these gains are
    the only way to sharpen attention, and Adam moves a weight by about ``lr`` per step: at 5e-4 a
    gain needs thousands of steps to reach the ~4x that a sharp "same place, earlier frame"
    attention needs. A larger rate for these few weights gets there in hundreds."""
    ema_decay: float = 0.995
    """EMA of the weights kept for sampling."""
    prompt_dropout: float = 0.1
    """Probability of training on the empty prompt (CFG)."""
    action_dropout: float = 0.1
    """Probability of training on null actions (CFG)."""
    i2v_prob: float = 0.9
    """Probability that frame 0 is given clean (image-to-video) rather than generated."""
    diffusion_forcing_prob: float = 0.5
    """Probability that a clip gets an independent noise level per frame (Diffusion Forcing,
    Chen et al. 2024) instead of one level for all frames. Nearly clean neighbours then teach the
    local transition -- shift the previous frame as the action says -- which a clip-wide level
    only reveals through the whole chain back to frame 0."""
    image_batch: int = 0
    """Joint image-video training: this many single frames per step beside the clips, each made
    from its prompt alone (text-to-image, the same flow-matching loss on a one-frame clip), from
    as many independent places. A clip's frames show one place; the spatial prior -- the biome's
    palette and texture, the landmarks' colour, shape and density -- is what unseen regions are
    painted from, and one-frame samples teach it from ~``image_batch`` places per step at a
    fraction of a clip's cost (how video foundation models train on images beside videos).
    Toy-world data only (``data: null``); 0: off."""
    image_weight: float = 1.0
    """Weight of the image loss beside the clips' (each is its own batch's mean)."""
    timestep_shift: float = 3.0
    """Training noise levels are shift(u), u ~ U(0, 1): shift > 1 trains high noise more often, where
    the model must carry content over from the first frame instead of denoising locally."""
    codec_fit_clips: int = 256
    """Training clips (4 frames each) the PCA codec is fitted on before step 0."""
    log_every: int = 10
    """Steps between TensorBoard/JSONL log lines."""
    ckpt_every: int = 100
    """Steps between checkpoints."""
    tensorboard: bool = True
    """Write TensorBoard scalars (needs the `logging` extra)."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
    parallel: Literal["fsdp2", "deepspeed"] = "fsdp2"
    """Engine: fsdp2 (under torchrun; one process runs unsharded) or deepspeed (ZeRO-2/3, launched by
    ``deepspeed`` or ``torchrun``, or in one process)."""
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    """ZeRO stage and an optional DeepSpeed JSON config (``parallel: deepspeed``)."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, precision (bf16 with fp32 master weights), activation checkpointing, compile
    (``streamkd.runtime``)."""
    data: str | None = None
    """Training clips: None renders toy-world episodes; else a folder / .csv / .jsonl manifest of
    videos (``streamkd.data.video``, decoded at the model's frame size and horizon), or a shard
    folder of pre-encoded latents made by ``streamkd data encode`` with this model's codec."""
    num_workers: int = 0
    """DataLoader worker processes that load batches ahead of the step (0: in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker keeps ready ahead (only with num_workers > 0)."""

    def __post_init__(self) -> None:
        for name in ("prompt_dropout", "action_dropout", "i2v_prob", "diffusion_forcing_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ValueError("batch_size and max_steps must be >= 1")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.action_names is not None:
            if not self.add_actions:
                raise ValueError("action_names names the actions add_actions creates; set add_actions too (or drop action_names)")
            check_action_names(self.action_names, self.add_actions, "action_names")
        if self.image_batch < 0 or self.image_weight < 0:
            raise ValueError(f"image_batch and image_weight must be >= 0, got {self.image_batch}, {self.image_weight}")
        if self.image_batch and self.data is not None:
            raise ValueError("image_batch renders toy-world frames; with data (videos or shards) set image_batch: 0 "
                             "(joint image training from video frames is not wired)")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch_factor >= 1, got {self.num_workers}, "
                             f"{self.prefetch_factor}; use num_workers=0 to load in the training process")


RESUMABLE_CHANGES = (
    "max_steps", "decay_start", "log_every", "ckpt_every", "tensorboard", "threads", "model.sampling", "parallel",
    "num_workers", "prefetch_factor", "runtime",
)
"""Config fields a resumed run may change: bookkeeping, the length and annealing of the schedule, and
how fast batches load (the order is the step's, see ``streamkd.data.loader``)."""


def param_groups(model: torch.nn.Module, qk_norm_lr_mult: float) -> list[dict]:
    """AdamW groups: the q/k RMSNorm gains at ``lr * qk_norm_lr_mult``, everything else at ``lr``
    (the trainer sets each group's rate from its ``lr_mult`` every step)."""
    qk, rest = [], []
    for name, p in model.named_parameters():
        (qk if name.endswith(("norm_q.weight", "norm_k.weight")) else rest).append(p)
    return [{"params": rest, "lr_mult": 1.0}, {"params": qk, "lr_mult": qk_norm_lr_mult}]


class NonFiniteLossError(ArithmeticError):
    """A loss became NaN/inf: training stops, the last checkpoint stays the last good one."""


def flow_matching_loss(
    model: WorldModel, batch: dict, cfg: TeacherTrainConfig, gen: torch.Generator, rows: slice = slice(None),
    null_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """One teacher loss on this rank's ``rows`` of the global batch (``batch`` holds those rows
    only); all randomness drawn from ``gen`` in a fixed order.

    Randomness is drawn for the whole (global) batch of ``cfg.batch_size`` clips and sliced to
    ``rows``, so data-parallel ranks, each with its slice, reproduce the single-process step. It is
    drawn on the host generator (every rank consumes it alike) and moved to the model's device.
    """
    dev = model.dit.proj_out.weight.device
    if "latents" in batch:  # pre-encoded shards (streamkd.data.shards): the codec ran offline
        x0 = batch["latents"].to(dev)
    else:
        with torch.no_grad():
            x0 = model.codec.encode(batch["frames"])  # (b, F, H, W, 3) uint8 -> (b, C, F, h, w), on the codec's device
    B, num_f = cfg.batch_size, x0.shape[2]
    noise = torch.randn((B, *x0.shape[1:]), generator=gen)[rows].to(dev)
    s = shift_sigmas(torch.rand(B, generator=gen), cfg.timestep_shift)
    i2v = torch.rand(B, generator=gen) < cfg.i2v_prob
    drop_prompt = torch.rand(B, generator=gen) < cfg.prompt_dropout
    drop_actions = torch.rand(B, generator=gen) < cfg.action_dropout
    per_frame = torch.rand(B, generator=gen) < cfg.diffusion_forcing_prob
    s_per_frame = shift_sigmas(torch.rand(B, num_f, generator=gen), cfg.timestep_shift)

    s_BF = torch.where(per_frame[:, None], s_per_frame, s[:, None].expand(B, num_f))
    s_BF[i2v, 0] = 0.0
    s_bF = s_BF[rows].to(dev)
    s_b = s_bF[:, None, :, None, None]
    x_t = (1 - s_b) * x0 + s_b * noise
    target = noise - x0
    # CFG's unconditional prompt: the one sampling uses (toy: empty; Wan: the negative prompt)
    drop_b = drop_prompt[rows].tolist()
    prompts = [model.null_prompt if d else p for p, d in zip(batch["prompt"], drop_b)]
    actions = None
    if model.num_actions:  # host data, as the DiT expects; a model without actions ignores the clips'
        actions = latent_actions(batch["actions"], model.codec.temporal_factor).clone()  # one per latent frame
        actions[drop_actions[rows]] = model.dit.null_action
    v = model.dit(x_t, 1000.0 * s_bF, _context(model, batch, prompts, drop_b, null_context), actions)
    weight_BF = torch.ones(B, num_f)
    weight_BF[i2v, 0] = 0.0
    err_BF = (v.float() - target.float()).pow(2).mean(dim=(1, 3, 4))
    # normalised by the *global* weight, scaled by the share of rows: the mean over ranks (what
    # FSDP's gradient averaging computes) is then exactly the global-batch loss
    share = B / err_BF.shape[0]
    return (err_BF * weight_BF[rows].to(dev)).sum() * share / weight_BF.sum().to(dev)


def _context(model, batch: dict, prompts: list[str], dropped: list[bool], null_context: torch.Tensor | None) -> torch.Tensor:
    """The prompts' context: pre-encoded in the shards (``batch["context"]``) when the text
    encoder is frozen -- the step then never runs it, what pre-encoding is for -- with
    ``null_context`` (the unconditional prompt's, encoded once by the trainer) for the dropped
    rows; else the encoder's own (the toy teacher trains its prompt encoder, so shards'
    embeddings would be stale)."""
    if "context" not in batch or trains_text_encoder(model):
        return model.encode_prompts(prompts)
    ctx = batch["context"].to(model.dit.proj_out.weight.device)
    if any(dropped):
        assert null_context is not None, "a frozen text encoder's trainer encodes the unconditional prompt once"
        ctx = torch.where(torch.tensor(dropped, device=ctx.device)[:, None, None], null_context.to(ctx), ctx)
    return ctx


class TeacherTrainer:
    def __init__(self, cfg: TeacherTrainConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = cfg.runtime.torch_device()
        self.dist = distributed.init(self.device, cfg.parallel)
        torch.manual_seed(cfg.seed)
        if cfg.init and checkpoint_kind(cfg.init) != "toy":
            self.model = self._wan_init()
            self.ema = copy.deepcopy(self.model).requires_grad_(False)
        else:
            self._toy_init()
        # device, checkpointing, compile, then FSDP2 (the EMA stays fp32 and whole-model), then the optimizer
        prepare(self.model, cfg.runtime, trainable=True)
        place(self.ema, self.device)
        if self.dist.enabled:
            distributed.parallelize(self.model, cfg.parallel, cfg.runtime.dtype)
            distributed.parallelize(self.ema, cfg.parallel)
        self.opt = distributed.Optimized(
            self.model, param_groups(self.model, cfg.qk_norm_lr_mult), lr=cfg.lr, weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip, parallel=cfg.parallel, micro_batch=self.dist.per_rank(cfg.batch_size),
            deepspeed=cfg.deepspeed,
        )
        self.images = None
        if cfg.data is None:
            self.data = ToyClipDataset(cfg.model.world, cfg.model.horizon_frames, base_seed=cfg.seed)
            if cfg.image_batch:  # other training places than the clips' (seeds hashed from another base)
                self.images = ToyClipDataset(cfg.model.world, 1, base_seed=cfg.seed + 1)
        else:  # shards' prompt embeddings serve a frozen text encoder (Wan's UMT5), not one that trains (the toy's)
            parts = ("codec",) if trains_text_encoder(self.model) else ("codec", "text")
            self.data = open_training_data(cfg.data, self.model, check=parts)
        # a frozen text encoder's unconditional context, once: dropped rows of pre-encoded batches read it
        self.null_context = None
        if not trains_text_encoder(self.model):
            with torch.no_grad():
                self.null_context = self.model.encode_prompts([self.model.null_prompt])
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.out = Path(cfg.out_dir)

    # --------------------------------------------------------------------------------- state
    def _toy_init(self) -> None:
        """The toy world's teacher: fresh (codec fitted first) or warm-started from ``init``."""
        cfg = self.cfg
        self.model = WorldModel(cfg.model)
        self.ema = WorldModel(cfg.model).requires_grad_(False)
        if cfg.init:
            start = WorldModel.load(cfg.init)
            # action_shifts and rope_theta say how positions are computed, not what weights exist:
            # a checkpoint may be continued with other positions (it has to re-learn to use them)
            # anchor_warp adds input channels: they start at zero, so the warm start is exact
            dit = cfg.model.dit
            positions = {"action_shifts": dit.action_shifts, "rope_theta": dit.rope_theta, "anchor_warp": dit.anchor_warp}
            same_dit = dataclasses.replace(start.cfg.dit, **positions) == dit
            if not same_dit or start.cfg.codec != cfg.model.codec or (start.cfg.dit.anchor_warp and not dit.anchor_warp):
                raise ValueError(f"init checkpoint {cfg.init} has another model.dit/model.codec shape than this config")
            weights = start.state_dict()
            w = weights["dit.patch_embed.weight"]
            if w.shape[1] < dit.embed_channels:
                weights["dit.patch_embed.weight"] = torch.cat([w, w.new_zeros(w.shape[0], dit.embed_channels - w.shape[1], *w.shape[2:])], 1)
            self.model.load_state_dict(weights)
        else:
            self._fit_codec()  # deterministic, so every rank fits the same codec
        self.ema.load_state_dict(self.model.state_dict())

    def _wan_init(self):
        """A Wan bundle to fine-tune (``init``), with ``add_actions`` actions when asked."""
        cfg = self.cfg
        if cfg.data is None:
            raise ValueError(f"init {cfg.init} is a Wan model: fine-tuning it needs videos or shards (data=); the toy "
                             "world renders only for toy teachers")
        base = load_model(cfg.init, wan=cfg.wan if cfg.wan.given() else None)
        if not cfg.add_actions:
            return base.train()
        if base.num_actions:
            raise ValueError(f"add_actions={cfg.add_actions}: {cfg.init} already takes {base.num_actions} actions; set add_actions: 0")
        model = base.like(dataclasses.replace(base.cfg, dit=dataclasses.replace(base.cfg.dit, num_actions=cfg.add_actions),
                                              action_names=list(cfg.action_names or [])))
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and missing == ["dit.action_embed.weight"], (missing, unexpected)
        return model.train()  # the new embedding is zero-initialised (DiT): step 0 is the pretrained model

    def _fit_codec(self) -> None:
        fit_data = ToyClipDataset(self.cfg.model.world, 4, base_seed=self.cfg.seed + 1)
        frames = torch.stack([fit_data[i]["frames"] for i in range(self.cfg.codec_fit_clips)])
        self.model.codec.fit(frames)

    def save(self) -> Path | None:
        """Checkpoint (a collective: every rank calls it, rank 0 publishes; ``train.common.save_checkpoint``)."""
        state = {"step": self.step, "data_position": self.step * self.cfg.batch_size, "config": to_dict(self.cfg)}
        return save_checkpoint(self.out, self.step, self.dist, {"model": self.opt}, {"ema": self.ema}, self.gen, state)

    def resume(self, folder: Path) -> None:
        _, state = load_training_checkpoint(folder, [])
        check_resume_config(from_dict(TeacherTrainConfig, state["config"]), self.cfg, RESUMABLE_CHANGES, folder)
        load_checkpoint(folder, self.dist, {"model": self.opt}, {"ema": self.ema}, self.gen)
        self.step = state["step"]

    # ---------------------------------------------------------------------------------- loop
    @functools.cached_property
    def _image_cfg(self) -> TeacherTrainConfig:
        """The image loss's settings: its own batch, every frame made from the prompt."""
        return dataclasses.replace(self.cfg, batch_size=self.cfg.image_batch, i2v_prob=0.0, diffusion_forcing_prob=0.0)

    def _batches(self, start: int, end: int):
        """Batches of steps start .. end - 1 (item k of step s: sample s * batch_size + k), with
        the step's single frames under ``"images"`` when training on images too."""
        cfg = self.cfg
        num_frames = pixel_frames(self.model.horizon_frames, self.model.codec.temporal_factor)
        clips = step_batches(self.data, cfg.batch_size, start, end, num_frames, self.model.num_actions,
                             cfg.num_workers, cfg.prefetch_factor, rows=self.dist.rows(cfg.batch_size))
        if self.images is None:
            return clips
        images = step_batches(self.images, cfg.image_batch, start, end, 1, self.model.num_actions,
                              cfg.num_workers, cfg.prefetch_factor, rows=self.dist.rows(cfg.image_batch))
        return ({**batch, "images": im} for batch, im in zip(clips, images))

    def _lr(self, step: int) -> float:
        cfg = self.cfg
        scale = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if 0 < cfg.decay_start <= step:
            scale *= max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.decay_start))
        return cfg.lr * scale

    def train(self, stop_after: int | None = None, progress: bool = True) -> list[float]:
        """Run to ``max_steps`` (or ``stop_after`` more steps); returns the losses of the steps run."""
        cfg = self.cfg
        if self.step == 0 and (ckpt := latest_checkpoint(self.out)) is not None:
            self.resume(ckpt)  # a fresh trainer continues its run
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        losses: list[float] = []
        data_time = step_time = 0.0
        batches = self._batches(self.step, end)
        with RunLog(self.out, total=end, initial=self.step, desc="teacher", tensorboard=cfg.tensorboard, progress=progress,
                    main=self.dist.is_main) as log:
            while self.step < end:
                t0 = time.perf_counter()
                batch = next(batches)  # data_share counts only this wait: workers load while the step runs
                t1 = time.perf_counter()
                for group in self.opt.param_groups:
                    group["lr"] = self._lr(self.step) * group["lr_mult"]
                with cfg.runtime.autocast():
                    loss = flow_matching_loss(self.model, batch, cfg, self.gen, self.dist.rows(cfg.batch_size), self.null_context)
                    image_value = None
                    if "images" in batch:
                        image_loss = flow_matching_loss(self.model, batch["images"], self._image_cfg, self.gen,
                                                        self.dist.rows(cfg.image_batch), self.null_context)
                        image_value = self.dist.mean(image_loss)
                        loss = loss + cfg.image_weight * image_loss
                loss_value = self.dist.mean(loss)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"step {self.step}: flow-matching loss is {loss_value}; the last good checkpoint is "
                        f"{latest_checkpoint(self.out)}; lower lr or raise grad_clip"
                    )
                grad_norm = self.opt.step(loss)
                update_ema(self.ema, self.model, cfg.ema_decay)
                self.step += 1
                data_time += t1 - t0
                step_time += time.perf_counter() - t0
                losses.append(loss_value)
                log.tick(loss=loss_value)
                if self.step % cfg.log_every == 0 or self.step == end:
                    log.record(self.step, {
                        "loss": loss_value, "grad_norm": float(grad_norm), "lr": self._lr(self.step - 1),
                        "samples_per_s": cfg.batch_size * len(losses) / step_time, "data_share": data_time / step_time,
                        **({} if image_value is None else {"image_loss": image_value}),
                    })
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.save()
        if self.step >= cfg.max_steps:
            ema_sd, _ = distributed.full_state(self.ema)
            if self.dist.is_main:
                final = self.model.like(self.model.cfg)
                final.load_state_dict(ema_sd)
                final.eval().save(self.out / "final")
        return losses
