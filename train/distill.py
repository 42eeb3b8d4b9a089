"""Distil the toy teacher into a causal few-step student: ODE-regression init, then self-forcing DMD.

    streamkd distill ode-pairs --config configs/toyworld/ode_pairs.yaml
    streamkd distill train --config configs/toyworld/distill_ode.yaml     # method: ode
    streamkd distill train --config configs/toyworld/distill_dmd.yaml     # method: dmd

* ``ode``: the student (block-causal, chunks of F frames) regresses the teacher's ODE end points
  from the points of its trajectories at the student's noise levels (``streamkd.distill.losses``).
* ``dmd`` (Self-Forcing, Huang et al. 2025): every step the student *rolls out* a clip chunk by chunk
  with its own KV cache through ``StreamGenerator`` -- the loop the server uses. Each chunk exits at
  a random sampler step (the same on every rank: drawn from a generator seeded by the step), and
  only that step's pass keeps a graph; the cache holds detached clean history, so memory stays
  flat in the rollout length. The DMD gradient (teacher with CFG vs. critic) trains the student
  every ``critic_ratio``-th step; the critic trains every step with flow matching on the rollouts.

Exact resume: step, both models, critic, EMA, optimizers and the RNG state are checkpointed; data
position is a pure function of the step.

Data parallel (``torchrun``, ``streamkd.distributed``): student, EMA, critic and teacher are
sharded with FSDP2 from outside; every rank draws the randomness of the *global* batch (exit
steps, rollout noise, DMD levels) from the same generator and works on its own slice of rows, so
N processes reproduce the single-process losses (tests/test_distributed.py).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from streamkd import distributed
from streamkd.attention.layout import CausalLayout
from streamkd.attention.sparse import BlockSparseConfig
from streamkd.checkpoint import latest_checkpoint, load_training_checkpoint
from streamkd.config import from_dict, to_dict
from streamkd.bundle import ModelBundle, load_model
from streamkd.runtime import RuntimeConfig, place, prepare
from streamkd.models.wan_model import WanOptions
from streamkd.data.prompts import collate, condition_source
from streamkd.distill import gan
from streamkd.distill.gan import GANHead, discriminate
from streamkd.distill.losses import critic_loss, dmd_loss, ode_regression_loss, sample_levels
from streamkd.distill.ode_pairs import ODEPairStore
from streamkd.bundle import CausalConfig, SamplingConfig
from streamkd.sampling.schedule import FewStepSampler
from streamkd.sampling.stream import ImageInputs, StreamGenerator
from streamkd.distributed import DeepSpeedOptions
from streamkd.train.common import RunLog, check_resume_config, load_checkpoint, save_checkpoint, update_ema
from streamkd.train.teacher import NonFiniteLossError


@dataclass
class DistillConfig:
    method: Literal["ode", "dmd"] = "dmd"
    """ode: ODE-regression init; dmd: self-forcing DMD."""
    teacher: str = "toy-teacher"
    """Teacher checkpoint (folder or shipped name, or a diffusers Wan pipeline folder); also the
    default student/critic init."""
    prompts: str | None = None
    """dmd: prompt file (.txt, one per line, or .jsonl) the rollouts are conditioned on; None:
    ``data``'s clips, or the teacher's own conditions (the toy world's clips). Text-to-video
    teachers (Wan) need one of the two."""
    data: str | None = None
    """dmd: clips the rollouts are conditioned on instead of a prompt file (image-to-video): a
    folder or .csv/.jsonl manifest of captioned videos, or a shard folder made by ``streamkd data
    encode``. Each rollout starts from its clip's first frame (given, held clean), under its
    caption and, for a teacher that takes actions, its actions (per source frame; clips must then
    cover ``rollout_frames``) -- ``ClipConditions`` in ``streamkd.data.prompts``, docs/data.md.
    Method ode reads ``ode_pairs`` (sample those with ``data`` instead)."""
    prompt_cache: str | None = None
    """Folder of cached prompt embeddings (Wan teachers): every prompt of ``prompts`` goes through
    UMT5 once, before the first step, and is read from disk after (``streamkd.models.text``)."""
    wan: WanOptions = field(default_factory=WanOptions)
    """Wan teachers: size, horizon, text length and negative prompt a pipeline folder does not record."""
    init: str | None = None
    """Student init checkpoint (the ODE-init student for dmd); None = the teacher's weights."""
    ode_pairs: str = "runs/ode_pairs"
    """ODE-pair folder (method ode; method dmd with ``ode_weight`` > 0)."""
    ode_weight: float = 0.0
    """dmd: weight of an ODE-regression term added to every student update (DMD, Yin et al. 2024,
    eq. 9: the distribution-matching loss plus a regression loss on the teacher's own noise ->
    sample pairs). It keeps a small or one-step student on the teacher's deterministic map while
    DMD sharpens it; 0 is pure DMD."""
    out_dir: str = "runs/distill"
    """Run folder."""
    causal: CausalConfig = field(default_factory=CausalConfig)
    """Student chunking and KV cache."""
    sigmas: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    """Student few-step noise levels (decreasing)."""
    student_layers: list[int] | None = None
    """Depth pruning: the student keeps these transformer blocks of the init checkpoint, in this
    order (e.g. ``[0, 5]``: a 2-block student from a 6-block teacher, its first and last block; patch
    embedding, conditioning and output head are kept whole). A cheaper pass is how a student gets
    far more than steps-ratio faster than its teacher. None keeps every block."""
    student_sparse: BlockSparseConfig | None = None
    """Sparsity-aware distillation: the student's self-attention is block-sparse with this config
    (``streamkd.attention.sparse``) in its rollouts and its exported checkpoint; teacher and critic
    stay dense. None keeps the init checkpoint's attention."""
    rollout_frames: int = 0
    """dmd: frames the student rolls out per clip (0 = the teacher's horizon). Longer rollouts
    (long-horizon tuning, as in Self-Forcing++ / LongLive) run the early chunks without a graph and
    apply DMD to the last horizon-long window, whose first frame conditions the teacher as a given
    frame (its anchor: ``window_anchor``): the student learns from the states its own long rollouts
    reach, at flat memory."""
    rollout_actions: Literal["random", "tethered"] = "random"
    """dmd: the rollouts' camera moves. random: the clips' own (the toy world's piecewise-constant
    moves: the camera wanders off; ``data``'s recorded actions); tethered: the toy world's moves
    turned back half a frame from the start, so the camera keeps returning to what frame 0 showed
    (the long-horizon case where the start matters)."""
    window_anchor: Literal["stream", "window"] = "stream"
    """dmd, anchor_warp teachers, rollouts longer than the horizon: what the teacher and critic see
    as the anchor of the scored window. stream: the stream's true first frame at its camera offset
    (the student's anchor too), so the score pulls late frames back towards the start;
    window: the window's own first (generated) frame, which forgives drift."""
    revisit_share: float = 0.0
    """dmd: share of each batch's rollouts whose camera leaves a place and comes back (the
    revisit trajectories of ``streamkd.eval.revisit``: out-and-back, loop, offset, idle; gaps of
    1-3 x (sinks + window) frames, drawn from the clip's seed), so rollouts exercise memory."""
    memory_weight: float = 0.0
    """dmd with ``causal.memory``: weight of a ground-truth term on *observed revisits*, added to
    every student update: the student is shown the way out of a revisit trajectory (ground-truth
    frames through ``StreamGenerator.observe``, which writes every memory tier), generates the
    way back chunk by chunk with its own cache, and each returning chunk's x0 is regressed onto the
    ground truth (the toy world renders it exactly; on real data the video is the ground truth).
    What the way back shows left the window long ago: the only place to find it is memory."""
    gan_weight: float = 0.0
    """dmd: weight of an adversarial term on the student (DMD2, ``streamkd.distill.gan``): a head on
    the critic's features tells noised real clips from noised student clips, and the student is
    pushed toward what real clips look like -- detail the teacher's score cannot give where the
    teacher paints mush. Real clips: the toy world's ground truth of the rollouts' own seeds,
    prompts and actions (other teachers: not yet). 0: off."""
    gan_disc_weight: float = 1.0
    """dmd with ``gan_weight``: weight of the discriminator loss, added to the critic's flow matching."""
    gan_layer: int = -1
    """dmd with ``gan_weight``: the critic block whose output the head reads (-1: the middle one)."""
    gan_head_lr: float = 1e-3
    """dmd with ``gan_weight``: learning rate of the discriminator head (new weights: at the
    critic's rate it stayed at chance for 40 steps of the toy run)."""
    gan_s_max: float = 0.5
    """dmd with ``gan_weight``: the clips are judged noised to a level drawn uniformly in
    ``[dmd_s_min, gan_s_max]`` (one per clip). DMD's levels lean high (``dmd_shift``), where a real
    and a student clip look alike under the noise and the discriminator can only guess."""
    memory_rows: int = 2
    """Revisit trajectories per student update for ``memory_weight`` (each streamed on its own)."""
    history_drop: float = 0.0
    """Memory term: probability that a returning chunk does not read the older half of the window
    (history-drop augmentation), so the student learns to read memory, not the window alone."""
    seed: int = 0
    """Seeds data order and every random draw."""
    max_steps: int = 400
    """Optimizer steps (critic steps for dmd)."""
    batch_size: int = 4
    """Clips per step."""
    lr: float = 1e-4
    """Student AdamW learning rate."""
    critic_lr: float = 1e-4
    """Critic AdamW learning rate."""
    critic_ratio: int = 5
    """dmd: critic updates per student update."""
    teacher_guidance: float = 1.0
    """dmd: teacher CFG scale g in uncond + g (cond - uncond)."""
    dmd_shift: float = 3.0
    """dmd: noise levels shift(U[0,1]) ..."""
    dmd_s_min: float = 0.02
    """... clamped below ..."""
    dmd_s_max: float = 0.98
    """... and above."""
    ema_decay: float = 0.99
    """EMA of the student (the exported weights)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (student and critic)."""
    log_every: int = 5
    """Steps between log lines."""
    ckpt_every: int = 50
    """Steps between checkpoints."""
    tensorboard: bool = True
    """TensorBoard scalars."""
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

    def __post_init__(self) -> None:
        FewStepSampler(self.sigmas)  # validates
        if self.critic_ratio < 1 or self.batch_size < 1 or self.max_steps < 1:
            raise ValueError("critic_ratio, batch_size and max_steps must be >= 1")
        if self.rollout_frames < 0 or self.rollout_frames % self.causal.chunk_frames:
            raise ValueError(
                f"rollout_frames ({self.rollout_frames}) must be 0 (the teacher's horizon) or a positive "
                f"multiple of causal.chunk_frames ({self.causal.chunk_frames})"
            )
        if self.rollout_actions not in ("random", "tethered") or self.window_anchor not in ("stream", "window"):
            raise ValueError(
                f"rollout_actions must be 'random' or 'tethered' (got {self.rollout_actions!r}) and window_anchor "
                f"'stream' or 'window' (got {self.window_anchor!r})"
            )
        if self.data is not None and self.prompts is not None:
            raise ValueError("prompts and data are both set; choose one: prompts (text-to-video) or data (image-to-video "
                             "from the clips' first frames; their captions are the prompts), and set the other to null")
        if self.data is not None and self.method != "dmd":
            raise ValueError("data conditions dmd rollouts; method ode trains on ode_pairs: set data: null here and sample "
                             "the pairs from the clips instead (streamkd distill ode-pairs ... data=<clips>)")
        if self.data is not None and (self.rollout_actions != "random" or self.revisit_share > 0):
            raise ValueError("rollout_actions: tethered and revisit_share > 0 replace the clips' actions with toy-world "
                             "camera moves; with data the rollouts follow the clips' recorded actions: set "
                             "rollout_actions: random and revisit_share: 0")
        if self.student_layers is not None and (
            not self.student_layers or min(self.student_layers) < 0 or len(set(self.student_layers)) != len(self.student_layers)
        ):
            raise ValueError(f"student_layers must be distinct block indices >= 0, got {self.student_layers}; null keeps every block")
        if self.ode_weight < 0:
            raise ValueError(f"ode_weight must be >= 0 (0 disables the regression term), got {self.ode_weight}")
        if not 0.0 <= self.revisit_share <= 1.0 or not 0.0 <= self.history_drop <= 1.0:
            raise ValueError(f"revisit_share and history_drop must be in [0, 1], got {self.revisit_share}, {self.history_drop}")
        if self.memory_weight < 0 or self.memory_rows < 1:
            raise ValueError(f"memory_weight must be >= 0 and memory_rows >= 1, got {self.memory_weight}, {self.memory_rows}")
        if self.memory_weight > 0 and (self.causal.memory is None or not self.causal.memory.enabled):
            raise ValueError("memory_weight > 0 trains the student to read memory: set causal.memory "
                             "(compressed_frames and/or bank_frames); see streamkd/cache/memory.py")
        if not 0 < self.dmd_s_min < self.dmd_s_max <= 1:
            raise ValueError(f"need 0 < dmd_s_min < dmd_s_max <= 1, got {self.dmd_s_min}, {self.dmd_s_max}")
        if self.gan_weight < 0 or not self.dmd_s_min < self.gan_s_max <= 1:
            raise ValueError(f"need gan_weight >= 0 and dmd_s_min < gan_s_max <= 1, got {self.gan_weight}, {self.gan_s_max}")


def _check_fit(teacher: ModelBundle, student: ModelBundle, cfg: DistillConfig) -> None:
    """Teacher and student must share everything but the denoiser and how it streams and samples
    (codec, world or pipeline, size, horizon: a student of another world is useless)."""
    if type(teacher) is not type(student):
        raise ValueError(f"the student init is a {type(student).__name__}, the teacher a {type(teacher).__name__}; "
                         "distil a student from a checkpoint of the teacher's kind")
    image_dims = (teacher.dit.cfg.image_dim, student.dit.cfg.image_dim)
    if (image_dims[0] is None) != (image_dims[1] is None):
        raise ValueError(f"the teacher's image_dim is {image_dims[0]}, the student's {image_dims[1]}: an image-to-video "
                         "(Wan2.1 I2V) teacher distils into a student of the same kind; init it from the teacher's folder")
    own = {k: v for k, v in to_dict(teacher.cfg).items() if k not in ("dit", "causal", "sampling")}
    for name, value in own.items():
        if to_dict(student.cfg)[name] != value:
            raise ValueError(f"student {name} ({to_dict(student.cfg)[name]}) does not match the teacher's ({value})")
    if teacher.horizon_frames % cfg.causal.chunk_frames:
        raise ValueError(
            f"causal.chunk_frames={cfg.causal.chunk_frames} must divide the teacher's horizon of "
            f"{teacher.horizon_frames} latent frames"
        )
    if 0 < cfg.rollout_frames < teacher.horizon_frames:
        raise ValueError(
            f"rollout_frames={cfg.rollout_frames} is shorter than the teacher's horizon "
            f"({teacher.horizon_frames}): use 0 or at least the horizon"
        )


def prune_blocks(state: dict[str, torch.Tensor], keep: list[int], num_layers: int) -> dict[str, torch.Tensor]:
    """The state dict of a model that keeps blocks ``keep`` (renumbered ``0..len(keep)-1``) of a
    ``num_layers``-block DiT; every other weight unchanged."""
    if max(keep) >= num_layers:
        raise ValueError(f"student_layers {keep} names a block beyond the init checkpoint's {num_layers} (0..{num_layers - 1})")
    prefix = "dit.blocks."
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for new, old in enumerate(keep):
        src = f"{prefix}{old}."
        out.update({f"{prefix}{new}.{k[len(src):]}": v for k, v in state.items() if k.startswith(src)})
    return out


RESUMABLE_CHANGES = ("max_steps", "log_every", "ckpt_every", "tensorboard", "threads", "parallel", "runtime")
"""Config fields a resumed run may change."""


class DistillTrainer:
    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = cfg.runtime.torch_device()
        self.dist = distributed.init(self.device, cfg.parallel)
        self.rows = self.dist.rows(cfg.batch_size)
        torch.manual_seed(cfg.seed)
        self.teacher = load_model(cfg.teacher, wan=cfg.wan if cfg.wan.given() else None).requires_grad_(False)
        init = load_model(cfg.init) if cfg.init else self.teacher
        student_cfg = replace(
            init.cfg, causal=cfg.causal, sampling=SamplingConfig(kind="few_step", num_steps=len(cfg.sigmas), sigmas=list(cfg.sigmas))
        )
        if cfg.student_sparse is not None:
            student_cfg = replace(student_cfg, dit=replace(student_cfg.dit, sparse=cfg.student_sparse))
        init_sd = init.state_dict()
        if cfg.student_layers is not None:
            init_sd = prune_blocks(init_sd, cfg.student_layers, init.cfg.dit.num_layers)
            student_cfg = replace(student_cfg, dit=replace(student_cfg.dit, num_layers=len(cfg.student_layers)))
        if type(init) is not type(self.teacher):
            raise ValueError(f"init {cfg.init} is a {type(init).__name__}, the teacher a {type(self.teacher).__name__}; "
                             "distil a student from a checkpoint of the teacher's kind")
        self.student = self.teacher.like(student_cfg)  # shares the teacher's frozen components, if any
        self.student.load_state_dict(init_sd)
        _check_fit(self.teacher, self.student, cfg)
        self.student.train()
        # the text encoder is the teacher's and stays frozen, as a real teacher's does
        self.student.text_encoder.requires_grad_(False)
        if cfg.method == "dmd":  # before the prompt cache, which encodes the source's prompts (or captions) up front
            self.rollout_frames = cfg.rollout_frames or self.teacher.horizon_frames
            self.data = condition_source(self.teacher, cfg.prompts, self.rollout_frames, cfg.seed + 100, cfg.data)
        if cfg.prompt_cache is not None:  # shared with the student and critic through the frozen components
            from streamkd.data.prompts import PromptDataset

            if cfg.method == "dmd":
                listed = getattr(self.data, "prompts", ())  # the prompt file's, or the clips' captions
            else:
                listed = PromptDataset(cfg.prompts).prompts if cfg.prompts else ()
            self.teacher.use_prompt_cache(cfg.prompt_cache, listed)
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        self.critic = copy.deepcopy(self.teacher).requires_grad_(True).train() if cfg.method == "dmd" else None
        self.gan_layer = None
        if cfg.gan_weight > 0:
            if cfg.method != "dmd" or self.teacher.conditions(1, 0) is None:
                raise ValueError("gan_weight > 0 needs method dmd and real clips of the rollouts (the toy world renders "
                                 "them); this run has none: set gan_weight: 0")
            blocks = len(self.critic.dit.blocks)
            self.gan_layer = blocks // 2 if cfg.gan_layer == -1 else cfg.gan_layer
            if not 0 <= self.gan_layer < blocks:
                raise ValueError(f"gan_layer={cfg.gan_layer}: the critic has blocks 0-{blocks - 1} (-1: the middle one)")
            self.critic.gan_head = GANHead(self.critic.dit.cfg.dim)  # trained with the critic, saved in its checkpoints
        # devices, precision, checkpointing, compile, then FSDP2 -- from outside the model code,
        # before the optimizers exist; the EMA stays fp32 (its small steps would vanish in bf16)
        prepare(self.teacher, cfg.runtime, trainable=False)
        prepare(self.student, cfg.runtime, trainable=True)
        place(self.ema, self.device)
        if self.critic is not None:
            prepare(self.critic, cfg.runtime, trainable=True)
        if self.dist.enabled:
            for model, trainable in ((self.student, True), (self.ema, False), (self.critic, True), (self.teacher, False)):
                if model is not None:
                    distributed.parallelize(model, cfg.parallel, cfg.runtime.dtype if trainable else None)
        optimized = dict(weight_decay=0.0, grad_clip=cfg.grad_clip, parallel=cfg.parallel,
                         micro_batch=self.dist.per_rank(cfg.batch_size), deepspeed=cfg.deepspeed)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = distributed.Optimized(self.student, [{"params": trainable}], lr=cfg.lr, **optimized)
        self.trainables = {"model": self.opt}
        if cfg.method == "dmd":
            head = set(self.critic.gan_head.parameters()) if self.gan_layer is not None else set()
            groups = [{"params": [p for p in self.critic.parameters() if p not in head]}]
            if head:
                groups.append({"params": list(self.critic.gan_head.parameters()), "lr": cfg.gan_head_lr})
            self.critic_opt = distributed.Optimized(self.critic, groups, lr=cfg.critic_lr, **optimized)
            self.trainables["critic"] = self.critic_opt
            if cfg.memory_weight > 0 and self.teacher.conditions(1, 0) is None:
                raise ValueError("memory_weight > 0 needs ground-truth revisits (the toy world renders them); this teacher "
                                 "has none: set memory_weight: 0")
        if cfg.method == "ode" or cfg.ode_weight > 0:
            self.pairs = ODEPairStore(cfg.ode_pairs)
            kept = [round(s, 6) for s in self.pairs.keep_sigmas]
            missing = [s for s in cfg.sigmas if round(s, 6) not in kept]
            if missing:
                raise ValueError(f"ODE pairs were sampled at {self.pairs.keep_sigmas}; config sigmas {missing} are not among "
                                 "them: use a subset of those levels or regenerate the pairs with keep_sigmas covering them")
            # the student's levels among the stored ones, then the trajectory's end point
            self.pair_levels = [kept.index(round(s, 6)) for s in cfg.sigmas] + [len(kept)]
        # the inference layout, memory included (a full-sequence forward replays what streaming reads)
        self.layout = CausalLayout(cfg.causal.chunk_frames, cfg.causal.sink_frames, cfg.causal.window_frames,
                                   memory=self.student.cfg.memory_for_stream(cfg.causal.memory))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.out = Path(cfg.out_dir)

    # ----------------------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """Checkpoint of student, critic, their optimizers, the EMA and the generator (a collective:
        every rank calls it, rank 0 publishes; ``train.common.save_checkpoint``)."""
        state = {"step": self.step, "config": to_dict(self.cfg), "student_config": to_dict(self.student.cfg)}
        return save_checkpoint(self.out, self.step, self.dist, self.trainables, {"ema": self.ema}, self.gen, state)

    def resume(self, folder: Path) -> None:
        _, state = load_training_checkpoint(folder, [])
        check_resume_config(from_dict(DistillConfig, state["config"]), self.cfg, RESUMABLE_CHANGES, folder)
        load_checkpoint(folder, self.dist, self.trainables, {"ema": self.ema}, self.gen)
        self.step = state["step"]

    # ---------------------------------------------------------------------------------- steps
    def _ode_loss(self) -> torch.Tensor:
        """ODE regression on this step's pairs (this rank's rows of the global batch)."""
        B = self.cfg.batch_size
        idx = [(self.step * B + i) % len(self.pairs) for i in range(B)][self.rows]
        x_levels = self.pairs.latents[idx][:, self.pair_levels].float()
        param = self.student.dit.proj_out.weight
        context = self.student.encode_prompts([self.pairs.prompts[i] for i in idx]).to(param.dtype)
        actions = self.pairs.actions[idx] if self.student.num_actions else None
        image = None
        if self.pairs.image is not None:
            image = tuple(t[idx].to(param.device, param.dtype) for t in self.pairs.image)
        return ode_regression_loss(self.student, self.layout, x_levels.to(param.device, param.dtype), self.cfg.sigmas,
                                   context, actions, self.gen, (B, self.rows), self.pairs.first_given, image)

    def _ode_step(self) -> dict[str, float]:
        with self.cfg.runtime.autocast():
            loss = self._ode_loss()
        value = self._apply(loss, self.opt, "ode")
        update_ema(self.ema, self.student, self.cfg.ema_decay)
        return {"ode_loss": value}

    def rollout(self, batch: dict, with_grad: bool) -> torch.Tensor:
        """Self-forcing rollout of ``rollout_frames``; returns the clean latents of the last
        horizon-long window, ``(B, C, H, h, w)``, with a graph at each window chunk's exit step.

        ``batch`` is this rank's rows of the global batch (all of it in one process). Chunks before
        the window run without a graph: memory does not grow with the rollout length."""
        return self._rollout(batch, with_grad)[0]

    def _rollout(self, batch: dict, with_grad: bool) -> tuple[torch.Tensor, ImageInputs | None]:
        """``rollout``, and for a Wan2.1 I2V student the image inputs its stream read for the
        window (condition channels of the window's frames, CLIP tokens): what the teacher and
        critic score the window with -- the student shares their frozen VAE and CLIP."""
        cfg = self.cfg
        if self.student.dit.cfg.image_dim is not None and batch["frames"] is None:
            raise ValueError("an image-to-video teacher (Wan2.1 I2V) scores rollouts from first frames: set data= "
                             "(videos or shards) so that every rollout starts from an image")
        stream = StreamGenerator(self.student, FewStepSampler(cfg.sigmas), causal=cfg.causal, batch_size=len(batch["prompt"]),
                                 global_batch=(cfg.batch_size, self.rows))
        stream.reset(batch["prompt"], None if batch["frames"] is None else batch["frames"][:, 0], self.gen)
        F = cfg.causal.chunk_frames
        window_start = self.rollout_frames - self.teacher.horizon_frames
        actions = batch["actions"]
        chunks, conditions = [], []
        for c in range(self.rollout_frames // F):
            exit_step = int(torch.randint(0, len(cfg.sigmas), (1,), generator=self.gen))
            with torch.set_grad_enabled(with_grad and c * F >= window_start):
                x0 = stream.next_chunk(None if actions is None else actions[:, c * F : (c + 1) * F], exit_step=exit_step)
            if c * F >= window_start:
                chunks.append(x0)
                conditions.append(stream.last_condition)
        image = None if stream.image is None else (torch.cat(conditions, 2), stream.image.context_BLiD)
        return torch.cat(chunks, 2), image

    def _dmd_step(self) -> dict[str, float]:
        cfg = self.cfg
        rows = self.rows
        batch = collate([self.data[self.step * cfg.batch_size + i] for i in range(cfg.batch_size)[rows]])
        if batch["actions"] is not None and self.teacher.num_actions:
            batch["actions"] = self._dmd_batch_actions(batch)
        else:
            batch["actions"] = None
        B = len(batch["prompt"])
        train_student = self.step % cfg.critic_ratio == 0
        with cfg.runtime.autocast():
            x0, image = self._rollout(batch, with_grad=train_student)
        # image-to-video: frame 0 given, held clean (Wan2.1 I2V instead denoises it, reading image inputs)
        first_given = batch["frames"] is not None and image is None
        num_f = x0.shape[2]
        window_actions = acts = None if batch["actions"] is None else batch["actions"][:, -num_f:]
        anchor = self._stream_anchor(batch, self.rollout_frames - num_f)
        ctx = self.teacher.encode_prompts(batch["prompt"] + [self.teacher.null_prompt] * B)
        if window_actions is not None:
            acts = torch.cat([window_actions, torch.full_like(window_actions, self.teacher.dit.null_action)])
        stats: dict[str, float] = {}
        if train_student:
            s_BF, noise = self._levels_and_noise(x0.shape, num_f, first_given)
            with cfg.runtime.autocast():
                loss_g, extra = dmd_loss(x0, self.teacher, self.critic, ctx, acts, s_BF, noise, cfg.teacher_guidance, anchor,
                                         image=image)
                if cfg.ode_weight > 0:  # then "dmd_loss" is the student's whole objective, "dmd_term" its DMD part
                    loss_ode = self._ode_loss()
                    extra["dmd_term"], extra["ode_loss"] = self.dist.mean(loss_g), self.dist.mean(loss_ode)
                    loss_g = loss_g + cfg.ode_weight * loss_ode
                if cfg.gan_weight > 0:
                    s_gan, noise_gan = self._gan_levels_and_noise(x0.shape, first_given)
                    fake = discriminate(self.critic, self.critic.gan_head, self.gan_layer, x0, s_gan, noise_gan,
                                        ctx[:B], window_actions, anchor, image)
                    loss_gan = gan.generator_loss(fake, s_gan)
                    extra["gan_g_loss"] = self.dist.mean(loss_gan)
                    loss_g = loss_g + cfg.gan_weight * loss_gan
                if cfg.memory_weight > 0:
                    loss_mem = self._memory_loss()
                    extra["memory_loss"] = self.dist.mean(loss_mem)
                    loss_g = loss_g + cfg.memory_weight * loss_mem
            stats["dmd_loss"] = self._apply(loss_g, self.opt, "dmd")
            update_ema(self.ema, self.student, self.cfg.ema_decay)
            stats.update({k: float(v) for k, v in extra.items()})
        s_BF, noise = self._levels_and_noise(x0.shape, num_f, first_given)
        with cfg.runtime.autocast():
            critic_ctx = self.critic.encode_prompts(batch["prompt"])
            loss_c = critic_loss(self.critic, x0.detach(), critic_ctx, window_actions, s_BF, noise, anchor, image=image)
            if cfg.gan_weight > 0:
                real = self._real_window(batch, num_f).to(x0)
                s_gan, noise_gan = self._gan_levels_and_noise(x0.shape, first_given)
                real_noise = self._noise(x0.shape).to(x0)
                args = (self.critic, self.critic.gan_head, self.gan_layer)
                loss_d = gan.discriminator_loss(
                    discriminate(*args, real, s_gan, real_noise, critic_ctx, window_actions, anchor, image),
                    discriminate(*args, x0.detach(), s_gan, noise_gan, critic_ctx, window_actions, anchor, image), s_gan)
                stats["gan_d_loss"] = self.dist.mean(loss_d)
                loss_c = loss_c + cfg.gan_disc_weight * loss_d
        stats["critic_loss"] = self._apply(loss_c, self.critic_opt, "critic")
        return stats

    def _dmd_batch_actions(self, batch: dict) -> torch.Tensor:
        """The rollouts' actions: the clips' own, or tethered moves drawn from each clip's seed
        (frame 0 does not depend on the actions, so the clip start is unchanged); the first
        ``revisit_share`` of the global batch's rows follow revisit trajectories instead."""
        T = batch["actions"].shape[1]
        if self.cfg.rollout_actions == "random":
            actions = batch["actions"].clone()
        else:  # toy-world camera moves (DistillConfig refuses tethered with data, whose clips are no toy world)
            from streamkd.data.toyworld import tethered_actions

            actions = torch.stack([torch.from_numpy(tethered_actions(np.random.default_rng(seed), T, self.teacher.cfg.world))
                                   for seed in batch["seed"]])
        revisits = round(self.cfg.revisit_share * self.cfg.batch_size)
        first_row = self.rows.start or 0
        for i, seed in enumerate(batch["seed"]):
            if first_row + i < revisits:
                actions[i] = torch.from_numpy(self._revisit(int(seed), T).actions[:T])
        return actions

    def _revisit(self, seed: int, min_frames: int = 0):
        """A revisit trajectory drawn from ``seed`` (kind, gap 1-3 and wander), padded with idle
        frames to at least ``min_frames``."""
        from streamkd.eval.revisit import KINDS, revisit_actions

        c = self.cfg.causal
        rng = np.random.default_rng(seed + 31)
        kind, gap = KINDS[int(rng.integers(len(KINDS)))], int(rng.integers(1, 4))
        traj = revisit_actions(kind, gap, c.sink_frames + c.window_frames, c.chunk_frames, self.teacher.cfg.world, rng)
        if len(traj.actions) < min_frames:
            traj.actions = np.concatenate([traj.actions, np.zeros(min_frames - len(traj.actions), dtype=np.int64)])
        return traj

    def _memory_loss(self) -> torch.Tensor:
        """Ground truth on observed revisits (``memory_weight``): per trajectory, observe the way
        out, generate the way back, regress each returning chunk's x0 onto the true latents."""
        from streamkd.data.toyworld import ToyWorld, episode_seed, prompt_for_seed

        cfg, world, F = self.cfg, self.teacher.cfg.world, self.cfg.causal.chunk_frames
        losses = []
        for j in range(cfg.memory_rows):
            seed = episode_seed("train", self.step * cfg.memory_rows + j, base_seed=cfg.seed + 700)
            prompt = prompt_for_seed(seed)
            traj = self._revisit(seed)
            T = len(traj.actions)
            truth = torch.from_numpy(ToyWorld(world, seed, prompt).render(traj.actions, T))
            actions = torch.from_numpy(traj.actions)[None]
            stream = StreamGenerator(self.student, FewStepSampler(cfg.sigmas), causal=cfg.causal, batch_size=1)
            stream.reset([prompt], None, self.gen)
            with torch.no_grad():
                stream.observe(truth[None, : traj.return_start], actions[:, : traj.return_start])
                target = self.student.codec.encode(truth[None, traj.return_start :]).float()
            end = traj.return_start + (T - traj.return_start) // F * F  # whole chunks of the way back
            for c, start in enumerate(range(traj.return_start, end, F)):
                exit_step = int(torch.randint(0, len(cfg.sigmas), (1,), generator=self.gen))
                drop = float(torch.rand((), generator=self.gen)) < cfg.history_drop
                stream.cache.hide_window = cfg.causal.window_frames // 2 if drop else 0
                x0 = stream.next_chunk(actions[:, start : start + F], exit_step=exit_step)
                losses.append(torch.nn.functional.mse_loss(x0.float(), target[:, :, c * F : (c + 1) * F]))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def _real_window(self, batch: dict, num_f: int) -> torch.Tensor:
        """Latents of the real clips the GAN term compares the rollouts with: the toy world's
        ground truth of each rollout's seed, prompt and actions, its last ``num_f`` frames (the
        scored window)."""
        from streamkd.data.toyworld import ToyWorld

        T, world = self.rollout_frames, self.teacher.cfg.world
        actions = batch["actions"] if batch["actions"] is not None else torch.zeros(len(batch["prompt"]), T, dtype=torch.long)
        frames = np.stack([ToyWorld(world, seed, prompt).render(a.numpy(), T)[T - num_f :]
                           for seed, prompt, a in zip(batch["seed"], batch["prompt"], actions)])
        return self.teacher.codec.encode(torch.from_numpy(frames)).float()

    def _stream_anchor(self, batch: dict, window_start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stream's first frame as the anchor of a window starting at ``window_start``
        (``window_anchor: stream``), in the window's camera coordinates; None when the window
        starts the stream or the teacher has no anchor warp."""
        if window_start == 0 or self.cfg.window_anchor != "stream" or not self.teacher.cfg.dit.anchor_warp:
            return None
        with torch.no_grad():
            latent_BC1hw = self.teacher.codec.encode(batch["frames"][:, :1])
        actions = batch["actions"]
        camera_BT2 = self.teacher.dit.camera_offsets(actions, actions.shape[0], actions.shape[1])
        # window frame j sits at camera[ws + j] - camera[ws - 1]; the first frame at camera[0] - camera[ws - 1]
        return latent_BC1hw[:, :, 0].float(), camera_BT2[:, 0] - camera_BT2[:, window_start - 1]

    def _levels_and_noise(self, shape: torch.Size, num_f: int, first_given: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """DMD / critic noise levels and noise, drawn for the global batch; this rank's rows."""
        s_BF = sample_levels(self.cfg.batch_size, num_f, self.gen, self.cfg.dmd_shift, self.cfg.dmd_s_min,
                             self.cfg.dmd_s_max, first_given)
        return s_BF[self.rows].to(self.device), self._noise(shape)

    def _noise(self, shape: torch.Size) -> torch.Tensor:
        """Noise of ``shape``'s clips drawn for the global batch on the host generator (every rank
        consumes it alike); this rank's rows, on the device."""
        return torch.randn((self.cfg.batch_size, *shape[1:]), generator=self.gen)[self.rows].to(self.device)

    def _gan_levels_and_noise(self, shape: torch.Size, first_given: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """GAN term noise levels (``gan_s_max``) and noise, drawn for the global batch; this rank's rows."""
        size, num_f = self.cfg.batch_size, shape[2]
        s = self.cfg.dmd_s_min + (self.cfg.gan_s_max - self.cfg.dmd_s_min) * torch.rand(size, generator=self.gen)
        s_BF = s[:, None].expand(size, num_f).clone()
        if first_given:
            s_BF[:, 0] = 0.0
        return s_BF[self.rows].to(self.device), self._noise(shape)

    def _apply(self, loss: torch.Tensor, opt: distributed.Optimized, term: str) -> float:
        """One optimizer step on ``loss`` (this rank's share); returns the global-batch loss."""
        value = self.dist.mean(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"step {self.step}: {term} loss is {value}; the last good checkpoint is {latest_checkpoint(self.out)}"
            )
        opt.step(loss)
        return value

    def train(self, stop_after: int | None = None, progress: bool = True) -> list[dict[str, float]]:
        cfg = self.cfg
        if self.step == 0 and (ckpt := latest_checkpoint(self.out)) is not None:
            self.resume(ckpt)
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        history = []
        latest: dict[str, float] = {}
        with RunLog(self.out, total=end, initial=self.step, desc=f"distill ({cfg.method})", tensorboard=cfg.tensorboard,
                    progress=progress, main=self.dist.is_main) as log:
            while self.step < end:
                t0 = time.perf_counter()
                stats = self._ode_step() if cfg.method == "ode" else self._dmd_step()
                self.step += 1
                stats["step_s"] = time.perf_counter() - t0
                history.append(stats)
                log.tick()
                # the latest value of every term: with critic_ratio == log_every the student's
                # steps would otherwise never be the logged ones
                latest.update(stats)
                if self.step % cfg.log_every == 0 or self.step == end:
                    log.record(self.step, latest)
                    latest = {}
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.save()
        if self.step >= cfg.max_steps and (history or not (self.out / "final").is_dir()):
            ema_sd, _ = distributed.full_state(self.ema)
            if self.dist.is_main:
                final = self.student.like(self.student.cfg)
                final.load_state_dict(ema_sd)
                final.eval().save(self.out / "final")
        return history
