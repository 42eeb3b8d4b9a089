"""Pre-encoded latent shards, the step-ordered DataLoader and teacher training on video files.

Shards round-trip exactly (toy codec and a tiny Wan pipeline), an interrupted encode resumes at
the next unwritten shard, shards of another model are refused; workers change neither the order
nor the losses, training on an mp4 folder resumes exactly, and a truncated mp4 is named or skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamkd.cli import main
from streamkd.data.loader import collate_training
from streamkd.data.shards import LatentShardDataset, ShardMismatchError, encode_shards
from streamkd.data.video import VideoClipDataset
from streamkd.models.world import WorldModel
from streamkd.train.teacher import TeacherTrainConfig, TeacherTrainer
from tests.test_training import tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 cores shared with DataLoader workers: more intra-op threads only add contention
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy_videos(tmp_path_factory) -> Path:
    """4 toy-world episodes of 6 frames at 64x64 (the CLI's default world), with captions and actions."""
    out = tmp_path_factory.mktemp("videos")
    assert main(["data", "toy-videos", "--out", str(out), "--clips", "4", "--frames", "6"]) == 0
    return out


def _copy_videos(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_items_match(shards: LatentShardDataset, clips: VideoClipDataset, model) -> None:
    """Each shard item equals encoding its clip directly, bit for bit."""
    assert len(shards) == len(clips)
    for i in range(len(clips)):
        clip, item = clips[i], shards[i]
        with torch.no_grad():
            assert torch.equal(item["latents"], model.codec.encode(clip["frames"][None])[0])
            assert torch.equal(item["context"], model.encode_prompts([clip["prompt"]])[0])
        assert torch.equal(item["first_frame"], clip["frames"][0])
        assert item["prompt"] == clip["prompt"] and item["seed"] == i
        assert torch.equal(item["actions"], clip["actions"])


def test_toy_shards_round_trip(teacher_dir: Path, toy_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert main(["data", "encode", "--data", str(toy_videos), "--checkpoint", str(teacher_dir), "--out", str(out),
                 "--clips-per-shard", "3", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["clips"] == 4 and index["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert index["latent_shape"] == [8, 4, 8, 8] and index["frames"] == 4  # the teacher's horizon, at 32x32
    model = WorldModel.load(teacher_dir)
    _assert_items_match(LatentShardDataset(out, model), VideoClipDataset(toy_videos, 4, 32, 32), model)


def test_tiny_wan_shards_round_trip(toy_videos: Path, tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from streamkd.bundle import load_model
    from streamkd.models.tiny_wan import make_tiny_wan
    from streamkd.models.wan_model import WanOptions

    model = load_model(make_tiny_wan(tmp_path / "wan"), wan=WanOptions(height=16, width=16, horizon_frames=2))
    clips = VideoClipDataset(toy_videos, 5, 16, 16)  # 1 + 4 frames: two latent frames of Wan's VAE
    index = encode_shards(clips, model, tmp_path / "shards", clips_per_shard=2)
    assert index["latent_shape"] == [16, 2, 2, 2] and index["context_shape"][1] == 32
    _assert_items_match(LatentShardDataset(tmp_path / "shards", model), clips, model)


def test_interrupted_encode_resumes_at_next_shard(teacher_dir: Path, toy_videos: Path, tmp_path: Path) -> None:
    videos = _copy_videos(toy_videos, tmp_path / "videos")
    model = WorldModel.load(teacher_dir)
    clips = VideoClipDataset(videos, 4, 32, 32)
    out = tmp_path / "shards"
    # the third video disappears after the scan: the encode stops there, naming it
    victim = videos / "clip-00002.mp4"
    os.replace(victim, tmp_path / "aside.mp4")
    with pytest.raises(ValueError, match=r"clip-00002\.mp4"):
        encode_shards(clips, model, out, clips_per_shard=1)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(ValueError, match="interrupted.*rerun the same"):
        LatentShardDataset(out)
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    os.replace(tmp_path / "aside.mp4", victim)
    encode_shards(clips, model, out, clips_per_shard=1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[01]*")} == written  # not re-encoded
    _assert_items_match(LatentShardDataset(out, model), clips, model)


def test_shards_of_another_model_are_refused(teacher_dir: Path, toy_videos: Path, tmp_path: Path) -> None:
    model = WorldModel.load(teacher_dir)
    clips = VideoClipDataset(toy_videos, 4, 32, 32)
    out = tmp_path / "shards"
    encode_shards(clips, model, out, clips_per_shard=2)
    other = WorldModel.load(teacher_dir)
    other.codec.fit(torch.stack([clips[i]["frames"] for i in range(2)]))  # same shapes, another PCA basis
    fix = r"re-encode the clips with this model \(streamkd data encode --checkpoint"
    with pytest.raises(ShardMismatchError, match=rf"index\.json field model\.codec\.digest is .*{fix}"):
        LatentShardDataset(out, other)
    with pytest.raises(ShardMismatchError, match=r"model\.codec\.digest .*pass a new --out"):
        encode_shards(clips, other, out, clips_per_shard=2)
    with pytest.raises(ShardMismatchError, match=r"field clips_per_shard = 2, this encode has 3"):
        encode_shards(clips, model, out, clips_per_shard=3)
    # a trainer fits its own codec unless it starts from the model that made the shards
    cfg = TeacherTrainConfig(model=model.cfg, out_dir=str(tmp_path / "run"), data=str(out), codec_fit_clips=8)
    with pytest.raises(ShardMismatchError, match=r"model\.codec\.digest"):
        TeacherTrainer(cfg)


def test_teacher_trains_on_shards_as_on_videos(teacher_dir: Path, toy_videos: Path, tmp_path: Path) -> None:
    model = WorldModel.load(teacher_dir)
    encode_shards(VideoClipDataset(toy_videos, 4, 32, 32), model, tmp_path / "shards", clips_per_shard=3)
    base = TeacherTrainConfig(model=model.cfg, init=str(teacher_dir), max_steps=2, batch_size=2, log_every=1,
                              tensorboard=False, out_dir="")
    on_videos = TeacherTrainer(replace(base, data=str(toy_videos), out_dir=str(tmp_path / "v"))).train(progress=False)
    on_shards = TeacherTrainer(replace(base, data=str(tmp_path / "shards"), out_dir=str(tmp_path / "s"))).train(progress=False)
    # the codec ran on one clip at a time offline and on the batch in the trainer: equal up to matmul blocking
    assert on_shards == pytest.approx(on_videos, rel=1e-5)
    with pytest.raises(ValueError, match=r"\(C, F, h, w\) = \(8, 4, 8, 8\).*horizon_frames=2.*--frames 2"):
        TeacherTrainer(replace(base, model=replace(model.cfg, horizon_frames=2), data=str(tmp_path / "shards")))


def test_video_training_workers_and_resume(toy_videos: Path, tmp_path: Path) -> None:
    def run(name: str, num_workers: int, stop_after: int | None = None) -> list[float]:
        cfg = tiny_config(tmp_path / name, max_steps=3, data=str(toy_videos), num_workers=num_workers)
        return TeacherTrainer(cfg).train(stop_after=stop_after, progress=False)

    in_process = run("w0", 0)
    assert run("w2", 2) == in_process  # 6 samples over 4 videos: the order wraps around, identically
    first = run("split", 2, stop_after=2)
    rest = run("split", 2)  # a fresh trainer resumes at step 2
    assert first + rest == in_process
    record = json.loads((tmp_path / "w2" / "losses.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["data_share"] < 1.0


def test_clips_without_actions_get_the_null_action(toy_videos: Path) -> None:
    item = VideoClipDataset(toy_videos, 4, 32, 32)[0]
    bare = {k: v for k, v in item.items() if k != "actions"}
    batch = collate_training([item, bare], num_frames=4, num_actions=5)
    assert torch.equal(batch["actions"][0], item["actions"]) and batch["actions"][1].tolist() == [5] * 4
    with pytest.raises(ValueError, match=r"clip-00000\.mp4 has action .*action ids 0\.\.1"):
        collate_training([item], num_frames=4, num_actions=2)


def test_truncated_mp4_is_named_or_skipped(teacher_dir: Path, toy_videos: Path, tmp_path: Path, capsys) -> None:
    videos = _copy_videos(toy_videos, tmp_path / "videos")
    broken = videos / "clip-00001.mp4"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    args = ["data", "encode", "--data", str(videos), "--checkpoint", str(teacher_dir), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "clip-00001.mp4" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--on-error", "skip"]) == 0
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    assert index["clips"] == 3 and list(index["skipped"]) == [str(broken)]
    assert "corrupt or truncated" in index["skipped"][str(broken)]
