"""Distillation: ODE pairs are the teacher's real trajectories, ODE init and self-forcing DMD
train, and both resume exactly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamkd.bundle import CausalConfig
from streamkd.data.toyworld import ToyClipDataset, collate_clips
from streamkd.distill.ode_pairs import ODEPairsConfig, ODEPairStore, generate_ode_pairs
from streamkd.models.world import WorldModel
from streamkd.sampling.bidirectional import sample_clip
from streamkd.sampling.schedule import EulerSampler, FewStepSampler
from streamkd.sampling.stream import StreamGenerator
from streamkd.train.distill import DistillConfig, DistillTrainer


def _pairs_cfg(teacher_dir: Path, out: Path) -> ODEPairsConfig:
    return ODEPairsConfig(teacher=str(teacher_dir), out_dir=str(out), num_clips=4, shard_clips=2, num_steps=4, keep_sigmas=[1.0, 0.5])


def test_ode_pairs_are_teacher_trajectories_and_resume(teacher_dir: Path, tmp_path: Path) -> None:
    cfg = _pairs_cfg(teacher_dir, tmp_path / "pairs")
    generate_ode_pairs(cfg, progress=False)
    store = ODEPairStore(tmp_path / "pairs")
    assert store.latents.shape == (4, 3, 8, 4, 8, 8) and store.keep_sigmas == [1.0, 0.5]
    # the stored end point is the teacher's own sample from the stored start noise
    teacher = WorldModel.load(teacher_dir)
    data = ToyClipDataset(teacher.cfg.world, 4, base_seed=cfg.base_seed)
    batch = collate_clips([data[0], data[1]])
    gen = torch.Generator().manual_seed(cfg.base_seed * 1_000_003)
    ref = sample_clip(teacher, EulerSampler(4), batch["prompt"], batch["frames"][:, 0], batch["actions"], 4, gen)
    torch.testing.assert_close(store.latents[:2, -1].float(), ref, atol=2e-3, rtol=2e-3)  # stored as fp16
    # resume: a deleted shard is rebuilt identically, existing ones are kept
    second = tmp_path / "pairs" / "shard_00001.safetensors"
    before = load_file(second)
    second.unlink()
    generate_ode_pairs(cfg, progress=False)
    after = load_file(second)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_pairs_from_the_teachers_x0_sampler(teacher_dir: Path, tmp_path: Path) -> None:
    """``sampler: few_step``: the stored end point is the teacher's x0-sampler sample (fresh noise
    at every re-noising, drawn in the same order as ``sample_clip``) from the stored start noise."""
    cfg = replace(_pairs_cfg(teacher_dir, tmp_path / "pairs"), sampler="few_step", num_steps=2, shift=1.0, keep_sigmas=[1.0])
    generate_ode_pairs(cfg, progress=False)
    store = ODEPairStore(tmp_path / "pairs")
    assert store.latents.shape[1] == 2 and store.keep_sigmas == [1.0]
    teacher = WorldModel.load(teacher_dir)
    data = ToyClipDataset(teacher.cfg.world, 4, base_seed=cfg.base_seed)
    batch = collate_clips([data[0], data[1]])
    gen = torch.Generator().manual_seed(cfg.base_seed * 1_000_003)
    ref = sample_clip(teacher, FewStepSampler([1.0, 0.5]), batch["prompt"], batch["frames"][:, 0], batch["actions"], 4, gen)
    torch.testing.assert_close(store.latents[:2, -1].float(), ref, atol=2e-3, rtol=2e-3)  # stored as fp16
    with pytest.raises(ValueError, match=r"not on the teacher's few-step levels \(2 steps"):
        replace(cfg, keep_sigmas=[0.75])


def test_ode_config_rejects_levels_off_the_grid() -> None:
    with pytest.raises(ValueError, match="not on the teacher's Euler grid"):
        ODEPairsConfig(num_steps=10, keep_sigmas=[1.0, 0.75])


def _distill_cfg(teacher_dir: Path, out: Path, **changes) -> DistillConfig:
    cfg = DistillConfig(
        teacher=str(teacher_dir), out_dir=str(out), causal=CausalConfig(2, 2, 2), sigmas=[1.0, 0.5], max_steps=4,
        batch_size=2, critic_ratio=2, ckpt_every=2, log_every=1, tensorboard=False,
    )
    return replace(cfg, **changes)


def test_ode_init_resumes_exactly(teacher_dir: Path, tmp_path: Path) -> None:
    generate_ode_pairs(_pairs_cfg(teacher_dir, tmp_path / "pairs"), progress=False)
    kw = dict(method="ode", ode_pairs=str(tmp_path / "pairs"))
    full = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "a", **kw)).train(progress=False)
    DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "b", **kw)).train(stop_after=2, progress=False)
    rest = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "b", **kw)).train(progress=False)
    assert [h["ode_loss"] for h in full[2:]] == [h["ode_loss"] for h in rest]
    student = WorldModel.load(tmp_path / "a" / "final")
    assert student.is_causal and student.cfg.sampling.kind == "few_step"


def test_self_forcing_rollout_keeps_graph_only_at_exit_steps(teacher_dir: Path, tmp_path: Path) -> None:
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path))
    batch = collate_clips([trainer.data[i] for i in range(2)])
    x0 = trainer.rollout(batch, with_grad=True)
    assert x0.shape == (2, 8, 4, 8, 8) and x0.requires_grad
    x0[:, :, 1:].sum().backward()
    grads = [p.grad for p in trainer.student.dit.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert trainer.rollout(batch, with_grad=False).requires_grad is False


def test_dmd_resumes_exactly(teacher_dir: Path, tmp_path: Path) -> None:
    full = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "a")).train(progress=False)
    DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "b")).train(stop_after=2, progress=False)
    rest = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "b")).train(progress=False)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "step_s"} for h in hs]  # noqa: E731
    assert strip(full[2:]) == strip(rest)
    assert "dmd_loss" in full[0] and "dmd_loss" not in full[1] and "critic_loss" in full[1]


def test_mismatched_teacher_and_student(teacher_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_frames=3 must divide the teacher's horizon of 4"):
        DistillTrainer(_distill_cfg(teacher_dir, tmp_path, causal=CausalConfig(3, 3, 3)))


def test_long_rollout_scores_the_last_horizon_window(teacher_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """rollout_frames = 2 x horizon: the clip is the rollout's length, the returned window is the
    last horizon, and only window chunks carry a graph (early chunks ran without one)."""
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path, rollout_frames=8))
    batch = collate_clips([trainer.data[i] for i in range(2)])
    assert batch["actions"].shape == (2, 8)
    graphs: list[bool] = []
    stream_next = StreamGenerator.next_chunk

    def spy(self, *args, **kwargs):
        graphs.append(torch.is_grad_enabled())
        return stream_next(self, *args, **kwargs)

    monkeypatch.setattr(StreamGenerator, "next_chunk", spy)
    x0 = trainer.rollout(batch, with_grad=True)
    monkeypatch.undo()
    assert x0.shape == (2, 8, 4, 8, 8) and x0.requires_grad
    assert graphs == [False, False, True, True]
    history = trainer.train(stop_after=1, progress=False)
    assert "dmd_loss" in history[0]


def test_long_rollout_teacher_sees_the_streams_first_frame(anchor_teacher_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """window_anchor = stream: the teacher and critic score the last window of a long, tethered
    rollout with the stream's first frame as anchor -- the condition those frames have in the
    whole stream -- and the rollouts' camera stays within half a frame of its start."""
    import sys

    distill_module = sys.modules[DistillTrainer.__module__]
    trainer = DistillTrainer(_distill_cfg(anchor_teacher_dir, tmp_path, rollout_frames=8, rollout_actions="tethered"))
    seen: list = []
    for name in ("dmd_loss", "critic_loss"):
        real = getattr(distill_module, name)
        monkeypatch.setattr(distill_module, name, lambda *a, _real=real, **k: seen.append(a[-1]) or _real(*a, **k))
    trainer.train(stop_after=1, progress=False)
    batch = collate_clips([trainer.data[i] for i in range(2)])
    dit = trainer.teacher.dit
    shifts = dit.action_shifts[trainer._dmd_batch_actions(batch)]
    offsets = shifts.cumsum(1) * 8  # tokens of 8 px in the tiny 32 px world
    assert offsets.abs().max() <= 16 and offsets.abs().max() > 0
    anchor = trainer._stream_anchor({**batch, "actions": trainer._dmd_batch_actions(batch)}, 4)
    assert len(seen) == 2 and all(torch.equal(s[1], anchor[1]) and torch.equal(s[0], anchor[0]) for s in seen)
    a = trainer._dmd_batch_actions(batch)
    z = trainer.teacher.codec.encode(batch["frames"])
    t = torch.full(a.shape, 500.0)
    t[:, 0] = 0
    full = dit._anchor_condition(z, t, a, dit.camera_offsets(a, 2, 8), None, False)
    window = dit._anchor_condition(z[:, :, 4:], t[:, 4:], a[:, 4:], dit.camera_offsets(a[:, 4:], 2, 4), None, False,
                                   anchor)
    torch.testing.assert_close(window, full[:, :, 4:], atol=1e-6, rtol=0)
    # window_anchor = window, or a rollout of one horizon: the teacher keeps its own frame 0
    assert trainer._stream_anchor(batch, 0) is None
    assert DistillTrainer(_distill_cfg(anchor_teacher_dir, tmp_path / "w", rollout_frames=8,
                                       window_anchor="window"))._stream_anchor(batch, 4) is None


@pytest.mark.parametrize("change", [{"rollout_actions": "circle"}, {"window_anchor": "last"}])
def test_bad_rollout_options(teacher_dir: Path, tmp_path: Path, change: dict) -> None:
    with pytest.raises(ValueError, match="rollout_actions must be 'random' or 'tethered'.*window_anchor"):
        _distill_cfg(teacher_dir, tmp_path, **change)


@pytest.mark.parametrize("frames, match", [(3, "multiple of causal.chunk_frames"), (2, "shorter than the teacher's horizon")])
def test_bad_rollout_frames(teacher_dir: Path, tmp_path: Path, frames: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillTrainer(_distill_cfg(teacher_dir, tmp_path, rollout_frames=frames))


def test_depth_pruned_one_step_student_from_a_subset_of_the_ode_levels(teacher_dir: Path, tmp_path: Path) -> None:
    """``student_layers`` keeps the named teacher blocks (renumbered, every other weight whole) and
    the ODE init may train on a subset of the stored levels -- here one step, noise -> x0."""
    generate_ode_pairs(_pairs_cfg(teacher_dir, tmp_path / "pairs"), progress=False)
    teacher = WorldModel.load(teacher_dir)
    assert teacher.cfg.dit.num_layers >= 2
    keep = [teacher.cfg.dit.num_layers - 1, 0]
    cfg = _distill_cfg(teacher_dir, tmp_path / "run", method="ode", ode_pairs=str(tmp_path / "pairs"), sigmas=[1.0],
                       student_layers=keep)
    trainer = DistillTrainer(cfg)
    assert trainer.pair_levels == [0, 2]  # sigma 1.0 among [1.0, 0.5], then the end point
    assert trainer.student.cfg.dit.num_layers == 2
    t_sd, s_sd = teacher.state_dict(), trainer.student.state_dict()
    for new, old in enumerate(keep):
        for name in ("self_attn.to_q.weight", "ffn.fc2.bias", "modulation"):
            assert torch.equal(s_sd[f"dit.blocks.{new}.{name}"], t_sd[f"dit.blocks.{old}.{name}"])
    assert torch.equal(s_sd["dit.proj_out.weight"], t_sd["dit.proj_out.weight"])
    trainer.train(progress=False)
    student = WorldModel.load(tmp_path / "run" / "final")
    assert student.cfg.dit.num_layers == 2 and student.cfg.sampling.sigmas == [1.0]
    with pytest.raises(ValueError, match="names a block beyond"):
        DistillTrainer(replace(cfg, out_dir=str(tmp_path / "bad"), student_layers=[0, 9]))
    with pytest.raises(ValueError, match=r"config sigmas \[0.75\] are not among them"):
        DistillTrainer(replace(cfg, out_dir=str(tmp_path / "bad"), sigmas=[1.0, 0.75]))
    with pytest.raises(ValueError, match="distinct block indices"):
        replace(cfg, student_layers=[1, 1])


def test_dmd_with_an_ode_regression_term(teacher_dir: Path, tmp_path: Path) -> None:
    """``ode_weight``: the student's objective is the DMD loss plus the weighted regression loss on
    the ODE pairs (DMD eq. 9), and both parts are logged."""
    generate_ode_pairs(_pairs_cfg(teacher_dir, tmp_path / "pairs"), progress=False)
    cfg = _distill_cfg(teacher_dir, tmp_path / "run", ode_weight=0.5, ode_pairs=str(tmp_path / "pairs"), max_steps=1)
    first = DistillTrainer(cfg).train(progress=False)[0]
    assert first["dmd_loss"] == pytest.approx(first["dmd_term"] + 0.5 * first["ode_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="ode_weight must be >= 0"):
        replace(cfg, ode_weight=-1.0)


MEMORY = dict(compressed_frames=2, fine_frames=1, bank_frames=2, retrieve_frames=1)


def test_memory_training_observes_revisits_and_regresses_the_way_back(teacher_dir: Path, tmp_path: Path) -> None:
    """memory_weight: the way out of a revisit trajectory is observed (every tier written), the
    way back generated with a graph at each chunk and regressed onto the rendered truth; rollouts
    follow revisit trajectories for revisit_share of the batch; the student sees no other change."""
    from streamkd.cache.memory import MemoryConfig

    causal = CausalConfig(2, 2, 2, memory=MemoryConfig(**MEMORY))
    cfg = _distill_cfg(teacher_dir, tmp_path, causal=causal, memory_weight=1.0, memory_rows=1, history_drop=0.5,
                       revisit_share=0.5, max_steps=2, critic_ratio=1)
    trainer = DistillTrainer(cfg)
    loss = trainer._memory_loss()
    assert loss.requires_grad and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.student.dit.parameters())
    batch = collate_clips([trainer.data[i] for i in range(2)])
    actions = trainer._dmd_batch_actions(batch)
    assert torch.equal(actions[1], batch["actions"][1]) and not torch.equal(actions[0], batch["actions"][0])
    history = trainer.train(progress=False)
    assert all("memory_loss" in h for h in history)
    student = WorldModel.load(tmp_path / "final")
    assert student.cfg.causal.memory == MemoryConfig(**MEMORY)  # the memory layout ships with the student


@pytest.mark.parametrize("change, match", [
    ({"memory_weight": 1.0}, "memory_weight > 0 trains the student to read memory: set causal.memory"),
    ({"revisit_share": 1.5}, "revisit_share and history_drop must be in"),
    ({"memory_weight": -1.0}, "memory_weight must be >= 0"),
])
def test_bad_memory_training_options(teacher_dir: Path, tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _distill_cfg(teacher_dir, tmp_path, **change)


def test_gan_term_real_clips_are_the_rollouts_ground_truth(teacher_dir: Path, tmp_path: Path) -> None:
    """The GAN term's real clips are the toy world's ground truth of the rollouts' own seeds,
    prompts and actions: for the clips' own actions, exactly the clips."""
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path, gan_weight=0.1))
    batch = collate_clips([trainer.data[i] for i in range(2)])
    real = trainer._real_window(batch, 3)
    want = trainer.teacher.codec.encode(batch["frames"][:, -3:]).float()
    torch.testing.assert_close(real, want, atol=0, rtol=0)


def test_gan_term_trains_the_head_and_moves_the_student(teacher_dir: Path, tmp_path: Path) -> None:
    """DMD2's adversarial term: the discriminator head trains with the critic (and is in its
    checkpoint: exact resume), the student's update gets the generator loss (its gradient
    reaches the student through the critic), and the run with it differs from the run without."""
    from streamkd.distill.gan import discriminate, generator_loss

    kw = dict(gan_weight=0.5)
    full = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "a", **kw)).train(progress=False)
    assert {"gan_g_loss"} <= set(full[0]) and "gan_d_loss" in full[1]
    DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "b", **kw)).train(stop_after=2, progress=False)
    rest = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "b", **kw)).train(progress=False)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "step_s"} for h in hs]  # noqa: E731
    assert strip(full[2:]) == strip(rest)
    plain = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "c")).train(progress=False)
    # step 0 is the same rollout: the student's objective is DMD plus the weighted generator loss
    assert full[0]["dmd_loss"] == pytest.approx(plain[0]["dmd_loss"] + 0.5 * full[0]["gan_g_loss"], rel=1e-5)
    assert plain[2]["dmd_loss"] != full[2]["dmd_loss"]
    # the generator loss's gradient reaches the student's clip through the critic and its head
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "d", **kw))
    batch = collate_clips([trainer.data[i] for i in range(2)])
    x0 = trainer.rollout(batch, with_grad=True)
    s_BF = torch.full((2, x0.shape[2]), 0.5)
    s_BF[:, 0] = 0.0
    ctx = trainer.critic.encode_prompts(batch["prompt"])
    logits = discriminate(trainer.critic, trainer.critic.gan_head, trainer.gan_layer, x0, s_BF, torch.randn_like(x0),
                          ctx, batch["actions"][:, -x0.shape[2]:])
    assert logits.shape == (2, x0.shape[2])
    generator_loss(logits, s_BF).backward()
    grads = [p.grad for p in trainer.student.dit.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert "gan_head.fc2.weight" in trainer.critic.state_dict()
    head_group = trainer.critic_opt.param_groups[1]  # the new head learns at its own rate
    assert head_group["lr"] == trainer.cfg.gan_head_lr and len(head_group["params"]) == 6
    with pytest.raises(ValueError, match="gan_layer=9: the critic has blocks 0-"):
        DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "e", gan_weight=0.1, gan_layer=9))
