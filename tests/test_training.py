"""Teacher training: exact resume, crash safety of checkpoints, refusal of a changed config, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamkd.checkpoint import CheckpointError, latest_checkpoint, load_training_checkpoint
from streamkd.config import dump_yaml
from streamkd.data.toyworld import ToyWorldConfig
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiTConfig
from streamkd.models.world import WorldModel, WorldModelConfig
from streamkd.train.teacher import NonFiniteLossError, TeacherTrainConfig, TeacherTrainer


def tiny_config(out_dir: Path, **changes) -> TeacherTrainConfig:
    model = WorldModelConfig(
        dit=DiTConfig(in_channels=8, out_channels=8, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16, num_actions=5),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128),
        horizon_frames=4,
    )
    cfg = TeacherTrainConfig(
        model=model, out_dir=str(out_dir), max_steps=6, batch_size=2, warmup_steps=2, ckpt_every=3,
        codec_fit_clips=8, log_every=1, tensorboard=False,
    )
    return replace(cfg, **changes)


def test_resume_reproduces_uninterrupted_losses(tmp_path: Path) -> None:
    full = TeacherTrainer(tiny_config(tmp_path / "full")).train(progress=False)
    first = TeacherTrainer(tiny_config(tmp_path / "split")).train(stop_after=3, progress=False)
    rest = TeacherTrainer(tiny_config(tmp_path / "split")).train(progress=False)  # fresh process state: resumes
    assert len(full) == 6 and len(first) == 3 and len(rest) == 3
    assert first + rest == full  # exact, not approximate
    a = WorldModel.load(tmp_path / "full" / "final")
    b = WorldModel.load(tmp_path / "split" / "final")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_resume_refuses_changed_config(tmp_path: Path) -> None:
    TeacherTrainer(tiny_config(tmp_path, max_steps=3)).train(progress=False)
    with pytest.raises(CheckpointError, match=r"config changed \(lr: 0.0004 -> 0.001\)"):
        TeacherTrainer(tiny_config(tmp_path, max_steps=6, lr=1e-3)).train(progress=False)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path: Path) -> None:
    trainer = TeacherTrainer(tiny_config(tmp_path))
    trainer.train(stop_after=3, progress=False)
    good = latest_checkpoint(tmp_path)
    with torch.no_grad():
        trainer.model.dit.proj_out.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3: flow-matching loss is nan"):
        trainer.train(progress=False)
    assert latest_checkpoint(tmp_path) == good


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    TeacherTrainer(tiny_config(tmp_path, max_steps=3)).train(progress=False)
    folder = latest_checkpoint(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_training_checkpoint(folder, ["model"])
    final = tmp_path / "final" / "model.safetensors"
    final.write_bytes(final.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        WorldModel.load(tmp_path / "final")
    with pytest.raises(CheckpointError, match="does not exist"):
        WorldModel.load(tmp_path / "nowhere")


@pytest.mark.slow
def test_sigkill_during_training_leaves_a_loadable_latest(tmp_path: Path) -> None:
    """Kill -9 a real training process repeatedly; ``latest`` must always load and resume."""
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_yaml(tiny_config(tmp_path / "run", max_steps=40, ckpt_every=1)))
    cmd = [sys.executable, "-m", "streamkd.cli", "train", "teacher", "--config", str(cfg_path), "--no-progress"]
    for kill_after in (3.5, 2.0):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while latest_checkpoint(tmp_path / "run") is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        folder = latest_checkpoint(tmp_path / "run")
        files, state = load_training_checkpoint(folder, ["model", "ema", "optim", "rng"])
        assert state["step"] >= 1 and "dit.proj_out.weight" in files["model"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert steps[-1] == 40


def test_init_warm_starts_from_an_inference_checkpoint(tmp_path: Path) -> None:
    TeacherTrainer(tiny_config(tmp_path / "a", max_steps=2)).train(progress=False)
    start = WorldModel.load(tmp_path / "a" / "final")
    trainer = TeacherTrainer(tiny_config(tmp_path / "b", init=str(tmp_path / "a" / "final")))
    for (name, x), y in zip(start.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(x, y), name
    other = replace(tiny_config(tmp_path / "c"), init=str(tmp_path / "a" / "final"))
    other.model.dit.num_layers = 3
    with pytest.raises(ValueError, match="another model.dit/model.codec shape"):
        TeacherTrainer(other)


def test_qk_norm_gains_train_at_their_own_rate(tmp_path: Path) -> None:
    """qk_norm_lr_mult scales exactly the q/k RMSNorm gains' learning rate, warm-up and decay included."""
    trainer = TeacherTrainer(tiny_config(tmp_path, qk_norm_lr_mult=10.0, max_steps=2))
    groups = trainer.opt.param_groups
    qk = {id(p) for n, p in trainer.model.named_parameters() if n.endswith(("norm_q.weight", "norm_k.weight"))}
    assert {id(p) for p in groups[1]["params"]} == qk and len(qk) == 2 * 2 * 2  # 2 blocks x (self, cross) x (q, k)
    trainer.train(progress=False)
    assert groups[1]["lr"] == pytest.approx(10.0 * groups[0]["lr"]) and groups[0]["lr"] == pytest.approx(trainer._lr(1))


def test_joint_image_training_adds_a_text_to_image_term(tmp_path: Path) -> None:
    """image_batch: each step also fits single frames of other places, made from the prompt alone.
    The step's loss is the clips' plus image_weight times the images' (logged beside it), the same
    random draws serve the clips either way, and resuming stays exact."""
    with_images = TeacherTrainer(tiny_config(tmp_path / "images", image_batch=3, max_steps=4))
    batch = next(with_images._batches(0, 1))
    images, clips = batch["images"], batch
    assert images["frames"].shape[:2] == (3, 1) and not set(images["seed"]) & set(clips["seed"])
    from streamkd.data.toyworld import render
    for seed, prompt, frame in zip(images["seed"], images["prompt"], images["frames"]):
        assert torch.equal(frame[0], torch.from_numpy(render(seed, prompt, [0], 1, with_images.cfg.model.world)[0]))
    losses = with_images.train(progress=False)
    logged = [json.loads(line) for line in (tmp_path / "images" / "losses.jsonl").read_text().splitlines()]
    off = TeacherTrainer(tiny_config(tmp_path / "off", image_batch=3, image_weight=0.0, max_steps=1)).train(progress=False)
    assert logged[0]["image_loss"] > 0
    assert losses[0] == pytest.approx(off[0] + logged[0]["image_loss"], rel=1e-5)  # same clip draws, + the image term
    first = TeacherTrainer(tiny_config(tmp_path / "split", image_batch=3, max_steps=4)).train(stop_after=2, progress=False)
    rest = TeacherTrainer(tiny_config(tmp_path / "split", image_batch=3, max_steps=4)).train(progress=False)
    assert first + rest == losses
    with pytest.raises(ValueError, match="image_batch renders toy-world frames; with data"):
        tiny_config(tmp_path / "bad", image_batch=2, data=str(tmp_path))
