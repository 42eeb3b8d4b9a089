"""Distillation conditioned on real clips (``data=``): ODE pairs and self-forcing DMD take their
first frames, captions and actions from a video folder or a shard folder -- on the toy teacher and
on a tiny Wan pipeline -- and the mistakes a user can make are refused with the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streamkd.config import load_config
from streamkd.data.prompts import collate, condition_source
from streamkd.data.shards import encode_shards
from streamkd.data.toyworld import ToyWorldConfig
from streamkd.data.video import VideoClipDataset, write_toy_videos
from streamkd.distill.ode_pairs import ODEPairsConfig, ODEPairStore, generate_ode_pairs
from streamkd.models.world import WorldModel
from streamkd.train.distill import DistillConfig, DistillTrainer
from tests.test_distill import _distill_cfg

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def videos(tmp_path_factory, teacher_dir: Path) -> Path:
    """3 toy-world episodes of 6 frames at the tiny teacher's 32x32, with captions and actions."""
    out = tmp_path_factory.mktemp("videos")
    write_toy_videos(out, clips=3, num_frames=6, world=WorldModel.load(teacher_dir).cfg.world, base_seed=3)
    return out


def _pairs(teacher: Path | str, data: Path, out: Path) -> Path:
    cfg = ODEPairsConfig(teacher=str(teacher), data=str(data), out_dir=str(out), num_clips=4, shard_clips=2, num_steps=4,
                         keep_sigmas=[1.0, 0.5])
    return generate_ode_pairs(cfg, progress=False)


def _clips(videos: Path, frames: int = 4) -> VideoClipDataset:
    """Whole clips of the teacher's horizon: the reference, decoded independently of the first-frame path."""
    return VideoClipDataset(videos, frames, 32, 32)


# ------------------------------------------------------------------------------------ toy teacher
def test_ode_pairs_hold_each_videos_first_frame_and_actions(teacher_dir: Path, videos: Path, tmp_path: Path) -> None:
    store = ODEPairStore(_pairs(teacher_dir, videos, tmp_path / "pairs"))
    clips = _clips(videos)
    order = [0, 1, 2, 0]  # 4 trajectories cycle the 3 videos
    with torch.no_grad():
        first = WorldModel.load(teacher_dir).codec.encode(torch.stack([clips[i]["frames"][:1] for i in order]))
    assert store.first_given and store.prompts == [clips[i]["prompt"] for i in order]
    for k in range(store.latents.shape[1]):  # every kept point and the end point hold frame 0 clean
        torch.testing.assert_close(store.latents[:, k, :, 0].float(), first[:, :, 0], atol=2e-3, rtol=2e-3)  # fp16 store
    assert torch.equal(store.actions, torch.stack([clips[i]["actions"] for i in order]))


def test_dmd_rollouts_start_from_the_videos_first_frames(teacher_dir: Path, videos: Path, tmp_path: Path) -> None:
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path, data=str(videos), max_steps=2))
    history = trainer.train(progress=False)
    assert "dmd_loss" in history[0] and all(np.isfinite(v) for h in history for v in h.values())
    clips = _clips(videos)
    batch = collate([trainer.data[i] for i in range(2)])  # step 0's rows
    assert batch["frames"].shape == (2, 1, 32, 32, 3)  # frame 0 alone: nothing reads more
    assert torch.equal(batch["frames"][:, 0], torch.stack([clips[i]["frames"][0] for i in range(2)]))
    assert torch.equal(batch["actions"], torch.stack([clips[i]["actions"] for i in range(2)]))
    assert batch["prompt"] == [clips[i]["prompt"] for i in range(2)]
    with torch.no_grad():
        x0 = trainer.rollout(batch, with_grad=False)
        first = trainer.student.codec.encode(batch["frames"])
    torch.testing.assert_close(x0[:, :, :1], first.to(x0.dtype))


def test_shards_condition_like_their_videos(teacher_dir: Path, videos: Path, tmp_path: Path) -> None:
    """A shard folder of the same clips gives the same first frames, captions and actions: the
    same ODE pairs, bit for bit, and a DMD run on it trains."""
    encode_shards(_clips(videos), WorldModel.load(teacher_dir), tmp_path / "shards", clips_per_shard=2)
    from_videos = ODEPairStore(_pairs(teacher_dir, videos, tmp_path / "a"))
    from_shards = ODEPairStore(_pairs(teacher_dir, tmp_path / "shards", tmp_path / "b"))
    assert torch.equal(from_shards.latents, from_videos.latents) and torch.equal(from_shards.actions, from_videos.actions)
    assert from_shards.prompts == from_videos.prompts and from_shards.first_given
    trainer = DistillTrainer(_distill_cfg(teacher_dir, tmp_path / "dmd", data=str(tmp_path / "shards"), max_steps=1))
    assert trainer.data.prompts == _clips(videos).captions
    assert "dmd_loss" in trainer.train(progress=False)[0]


# ---------------------------------------------------------------------------------- tiny Wan
@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from streamkd.models.tiny_wan import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def test_wan_distils_image_to_video_from_videos(wan_folder: Path, tmp_path: Path) -> None:
    """A text-to-video Wan teacher on videos: frame 0 is given and held clean (CausVid's image
    condition); the videos' actions are ignored (the teacher takes none), so 2 frames suffice for
    a horizon of 6 latent frames; square 64 px frames are scaled and center-cropped to Wan's 32x48."""
    videos = tmp_path / "videos"
    write_toy_videos(videos, clips=2, num_frames=2, world=ToyWorldConfig(frame_size=64))
    common = [f"teacher={wan_folder}", "prompts=null", f"data={videos}"]
    pairs = generate_ode_pairs(load_config(ODEPairsConfig, CONFIGS / "tiny-wan" / "ode_pairs.yaml", common + [
        "num_clips=2", "shard_clips=2", "num_steps=4", "keep_sigmas=[1.0,0.9375]", f"out_dir={tmp_path / 'pairs'}"]),
        progress=False)
    trainer = DistillTrainer(load_config(DistillConfig, CONFIGS / "tiny-wan" / "distill_dmd.yaml", common + [
        "init=null", "max_steps=1", f"out_dir={tmp_path / 'dmd'}"]))
    item = trainer.data[0]
    assert sorted(item) == ["frames", "prompt", "seed"] and item["frames"].shape == (1, 32, 48, 3)
    batch = collate([trainer.data[i] for i in range(2)])
    with torch.no_grad():
        first = trainer.teacher.codec.encode(batch["frames"])
    store = ODEPairStore(pairs)
    assert store.first_given
    torch.testing.assert_close(store.latents[:, -1, :, :1].float(), first, atol=2e-3, rtol=2e-3)  # fp16 store
    stats = trainer.train(progress=False)
    assert {"dmd_loss", "critic_loss"} <= set(stats[0]) and all(np.isfinite(v) for v in stats[0].values())
    with torch.no_grad():
        x0 = trainer.rollout(collate([trainer.data[0]]), with_grad=False)
    torch.testing.assert_close(x0[:, :, :1], first[:1].to(x0.dtype))


# --------------------------------------------------------------------------------- bad input
def test_prompts_and_data_together_are_refused(teacher_dir: Path, videos: Path) -> None:
    for make in (lambda: ODEPairsConfig(prompts="prompts.txt", data=str(videos)),
                 lambda: DistillConfig(prompts="prompts.txt", data=str(videos)),
                 lambda: condition_source(WorldModel.load(teacher_dir), "prompts.txt", 4, 0, data=str(videos))):
        with pytest.raises(ValueError, match="prompts and data are both set; choose one"):
            make()


@pytest.mark.parametrize("change, match", [
    ({"method": "ode"}, "method ode trains on ode_pairs"),
    ({"rollout_actions": "tethered"}, "set rollout_actions: random and revisit_share: 0"),
    ({"revisit_share": 0.5}, "set rollout_actions: random and revisit_share: 0"),
])
def test_data_refuses_options_that_replace_or_ignore_it(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillConfig(data="videos", **change)


def test_clips_shorter_than_the_rollout_are_named(teacher_dir: Path, videos: Path, tmp_path: Path) -> None:
    """The toy teacher takes actions, so a clip must cover the rollout: a short video is named, short
    shards get the frame count to re-encode with."""
    write_toy_videos(tmp_path / "short", clips=1, num_frames=3, world=WorldModel.load(teacher_dir).cfg.world)
    with pytest.raises(ValueError, match=r"clip-00000\.mp4' has 3 frames but 4 frames"):
        _pairs(teacher_dir, tmp_path / "short", tmp_path / "pairs")
    with pytest.raises(ValueError, match=r"clip-00000\.mp4' has 6 frames but 8 frames"):  # a long rollout
        condition_source(WorldModel.load(teacher_dir), None, 8, 0, data=str(videos))
    encode_shards(_clips(videos, frames=2), WorldModel.load(teacher_dir), tmp_path / "shards")
    with pytest.raises(ValueError, match="hold clips of 2 frames; .* re-encode with streamkd data encode --frames 4"):
        condition_source(WorldModel.load(teacher_dir), None, 4, 0, data=str(tmp_path / "shards"))


def test_clip_actions_the_teacher_cannot_take(teacher_dir: Path, videos: Path, tmp_path: Path) -> None:
    """Clips without actions roll out on the null action (what action dropout trained the teacher
    on); an action id beyond the teacher's is refused naming the clip."""
    teacher = WorldModel.load(teacher_dir)
    bare = shutil.copytree(videos, tmp_path / "bare")
    for sidecar in bare.glob("*.actions.json"):
        sidecar.unlink()
    source = condition_source(teacher, None, 4, 0, data=str(bare))
    assert torch.equal(collate([source[i] for i in range(3)])["actions"], torch.full((3, 4), teacher.dit.null_action))
    (bare / "clip-00001.actions.json").write_text(json.dumps([0, 0, 0, 7, 0, 0]))
    source = condition_source(teacher, None, 4, 0, data=str(bare))
    with pytest.raises(ValueError, match=r"clip-00001\.mp4 has action 7; the teacher takes action ids 0..4"):
        source[1]
