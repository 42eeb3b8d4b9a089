"""Devices and precision (``streamkd.runtime``): the device guard, bf16, checkpointing, compile.

The device guard runs the hot paths on the ``meta`` device. A meta tensor has a shape and no
data, and an op that mixes it with a CPU tensor fails ("Tensor on device cpu is not on the
expected device meta"), so every tensor the code makes on the default device instead of the
model's is caught -- the bug that only shows on a GPU, found without one. Meta tensors also
refuse ``.item()`` / ``.tolist()``: a host sync hidden in a per-chunk path fails here too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamkd.bundle import CausalConfig, load_model
from streamkd.data.toyworld import collate_clips
from streamkd.distill.losses import critic_loss, dmd_loss
from streamkd.distill.ode_pairs import ODEPairsConfig, generate_ode_pairs
from streamkd.runtime import RuntimeConfig
from streamkd.sampling.schedule import FewStepSampler
from streamkd.sampling.stream import StreamGenerator
from streamkd.train.distill import DistillConfig, DistillTrainer

META = RuntimeConfig(device="meta")


def _distill_cfg(teacher_dir: Path, out: Path, **changes) -> DistillConfig:
    cfg = DistillConfig(
        teacher=str(teacher_dir), out_dir=str(out), causal=CausalConfig(2, 2, 2), sigmas=[1.0, 0.5], max_steps=2,
        batch_size=2, critic_ratio=1, ckpt_every=100, log_every=1, tensorboard=False, teacher_guidance=2.0,
    )
    return replace(cfg, **changes)


@pytest.mark.parametrize("name, render", [("toy-student", False), ("toy-student-memory6", False),
                                          ("toy-student-memory6", True)])
def test_streaming_makes_every_tensor_on_the_model_device(name: str, render: bool) -> None:
    """Chunks of two batched streams with actions and CFG (memory tiers and camera retrieval for
    the memory student, with and without its bank rendered), all on the meta device."""
    model = load_model(name).to("meta")
    causal = model.cfg.causal
    if causal.memory is not None:
        causal = replace(causal, memory=replace(causal.memory, render=render))
    stream = StreamGenerator(model, FewStepSampler(model.cfg.sampling.sigmas), causal=causal, batch_size=2, guidance_scale=2.0)
    stream.reset(["forest with red squares", "desert with blue circles"], None, torch.Generator().manual_seed(0))
    chunks = causal.sink_frames // causal.chunk_frames + causal.window_frames // causal.chunk_frames + 3  # past eviction
    for c in range(chunks):
        x0 = stream.next_chunk(torch.full((2, causal.chunk_frames), c % 5, dtype=torch.long))
        assert x0.device.type == "meta"


def test_distill_steps_make_every_tensor_on_the_model_device(teacher_dir: Path, tmp_path: Path) -> None:
    """The ODE-regression loss, a self-forcing rollout, the DMD and critic losses and their
    backward passes, with the trainer placing everything on the meta device."""
    generate_ode_pairs(ODEPairsConfig(teacher=str(teacher_dir), out_dir=str(tmp_path / "pairs"), num_clips=2, shard_clips=2,
                                      num_steps=4, keep_sigmas=[1.0, 0.5]), progress=False)
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "run", runtime=META, ode_weight=1.0,
                                          ode_pairs=str(tmp_path / "pairs")))
    assert next(trainer.student.parameters()).device.type == "meta"
    trainer._ode_loss().backward()
    batch = collate_clips([trainer.data[i] for i in range(2)])
    x0 = trainer.rollout(batch, with_grad=True)
    s_BF, noise = trainer._levels_and_noise(x0.shape, x0.shape[2], True)
    ctx = trainer.teacher.encode_prompts(batch["prompt"] + [""] * 2)
    acts = torch.cat([batch["actions"], torch.full_like(batch["actions"], trainer.teacher.dit.null_action)])
    loss, _ = dmd_loss(x0, trainer.teacher, trainer.critic, ctx, acts, s_BF, noise, 2.0)
    loss.backward()
    critic_loss(trainer.critic, x0, ctx[:2], batch["actions"], s_BF, noise).backward()
    grads = [p.grad for p in trainer.student.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "meta" for g in grads)


def test_device_guard_catches_a_tensor_made_on_the_cpu() -> None:
    """The guard itself: a DiT handed a CPU timestep tensor while its weights are on meta fails."""
    model = load_model("toy-student").to("meta")
    x = torch.zeros(1, model.codec.latent_channels, 3, *model.latent_hw, device="meta")
    ctx = model.encode_prompts(["forest with red squares"])
    with pytest.raises(RuntimeError, match="device"):
        model.dit(x, torch.zeros(1, 3), ctx)  # timesteps made without device=


def test_runtime_config_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="precision must be"):
        RuntimeConfig(precision="fp16")
    with pytest.raises(ValueError, match="not a torch device"):
        RuntimeConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            RuntimeConfig(device="cuda").torch_device()
    assert RuntimeConfig().torch_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_distill_steps_keep_fp32_master_weights(teacher_dir: Path, tmp_path: Path) -> None:
    """bf16 on the CPU: two DMD steps (student and critic updates) with activation checkpointing;
    losses finite and near the fp32 run's, trainable weights fp32, the frozen teacher bf16."""
    fp32 = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "fp32")).train(progress=False)
    runtime = RuntimeConfig(device="cpu", precision="bf16", activation_checkpointing=True)
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "bf16", runtime=runtime))
    bf16 = trainer.train(progress=False)
    assert trainer.teacher.dit.proj_out.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.critic.parameters())
    for a, b in zip(bf16, fp32):
        for key in ("dmd_loss", "critic_loss"):
            assert torch.isfinite(torch.tensor(a[key]))
            # bf16 keeps ~3 significant digits; a wrong cast (fp32 losses lost, or a bf16 master
            # copy) shows as a far larger gap within two steps
            assert abs(a[key] - b[key]) <= 0.05 * abs(b[key]), (key, a[key], b[key])


def test_activation_checkpointing_and_compile_keep_the_losses(teacher_dir: Path, tmp_path: Path) -> None:
    """Recomputing blocks in backward changes no number; a compiled block (``aot_eager``: traced by
    dynamo and AOT autograd, no code generation) gives the same losses to float tolerance."""
    plain = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "plain")).train(progress=False)
    ac = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "ac", runtime=RuntimeConfig(activation_checkpointing=True)))
    losses = lambda history: [{k: h[k] for k in ("dmd_loss", "critic_loss") if k in h} for h in history]  # noqa: E731
    assert losses(ac.train(progress=False)) == losses(plain)
    compiled = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "compiled",
                                           runtime=RuntimeConfig(compile=True, compile_backend="aot_eager")))
    for a, b in zip(compiled.train(progress=False), plain):
        for key in ("dmd_loss", "critic_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_activation_checkpointing_recomputes_cache_reading_passes_exactly(teacher_dir: Path, tmp_path: Path) -> None:
    """Rollout passes that read a paged cache with memory tiers (and the memory term's observed
    revisits) are checkpointed too; their recomputation reads the history the forward read, not
    the cache the chunk's writing pass moved on: the same losses as without checkpointing."""
    from streamkd.cache.memory import MemoryConfig

    causal = CausalConfig(2, 2, 2, memory=MemoryConfig(compressed_frames=2, fine_frames=1, bank_frames=2, retrieve_frames=1))
    kw = dict(causal=causal, memory_weight=1.0, memory_rows=1, revisit_share=0.5, rollout_frames=8)
    plain = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "plain", **kw)).train(progress=False)
    ac = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "ac", runtime=RuntimeConfig(activation_checkpointing=True), **kw))
    keys = ("dmd_loss", "critic_loss", "memory_loss")
    assert [{k: h[k] for k in keys} for h in ac.train(progress=False)] == [{k: h[k] for k in keys} for h in plain]
