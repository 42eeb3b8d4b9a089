"""VideoClipDataset: sources, frame selection, resize/crop, decoder parity and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamkd.data import video as video_mod
from streamkd.data.video import VideoClipDataset
from streamkd.media.video import VideoWriter, read_video

DECODERS = ["av"] + (["decord"] if video_mod._HAVE_DECORD else [])


def moving_gradient(num_frames: int = 20, height: int = 48, width: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8; each frame differs, so a wrong frame index is visible."""
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    shape = (num_frames, height, width)
    return np.stack(
        [np.broadcast_to((x * 4 + t * 12) % 256, shape), np.broadcast_to((y * 5 + t * 3) % 256, shape),
         np.broadcast_to((x + y) * 2 % 256, shape)], axis=-1,
    ).astype(np.uint8)


def write_video(path: Path, num_frames: int = 20, fps: int = 24, caption: str | None = "a gradient") -> Path:
    with VideoWriter(path, fps=fps) as w:
        w.write(moving_gradient(num_frames))
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The only video in its folder, so the folder is a one-item source."""
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4")


def test_folder_with_captions(tmp_path: Path) -> None:
    write_video(tmp_path / "b.mp4", caption="second")
    write_video(tmp_path / "a.mp4", caption="first")
    ds = VideoClipDataset(tmp_path, num_frames=4, height=48, width=64, decoder="av")
    assert len(ds) == 2 and ds.skipped == {}
    items = [ds[0], ds[1]]
    assert [it["prompt"] for it in items] == ["first", "second"]  # sorted by name, caption stripped
    assert [it["seed"] for it in items] == [0, 1]
    assert items[0]["path"] == str(tmp_path / "a.mp4")
    assert items[0]["frames"].dtype == torch.uint8 and items[0]["frames"].shape == (4, 48, 64, 3)
    # Pure function of i: same index, same frames.
    assert torch.equal(ds[0]["frames"], items[0]["frames"])


def test_csv_and_jsonl_manifests(tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "x.mp4", caption=None)
    (tmp_path / "m.csv").write_text('path,caption\nvideos/x.mp4,"a cat, running"\n')
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "videos/x.mp4", "caption": "a dog"}) + "\n\n")
    csv_item = VideoClipDataset(tmp_path / "m.csv", 3, 32, 32, decoder="av")[0]
    jsonl_item = VideoClipDataset(tmp_path / "m.jsonl", 3, 32, 32, decoder="av")[0]
    assert csv_item["prompt"] == "a cat, running" and jsonl_item["prompt"] == "a dog"
    assert csv_item["path"] == jsonl_item["path"] == str(tmp_path / "videos" / "x.mp4")
    assert torch.equal(csv_item["frames"], jsonl_item["frames"])


def test_resize_and_center_crop(clip_file: Path) -> None:
    full = torch.from_numpy(read_video(clip_file)[:2])  # (2, 48, 64, 3)
    # 48x64 -> 24x24: the shorter side (48) scales to 24, width to 32, then 4 columns off each side.
    item = VideoClipDataset(clip_file.parent, 2, 24, 24, decoder="av")[0]
    small = F.interpolate(full.permute(0, 3, 1, 2).float(), size=(24, 32), mode="bilinear",
                          align_corners=False, antialias=True)
    expected = small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)[:, :, 4:28]
    assert item["frames"].shape == (2, 24, 24, 3)
    assert torch.equal(item["frames"], expected)
    # Shorter side already fits: no resampling, only the center 48 columns are kept.
    assert torch.equal(VideoClipDataset(clip_file.parent, 2, 48, 64, decoder="av")[0]["frames"], full)
    assert torch.equal(VideoClipDataset(clip_file.parent, 2, 48, 48, decoder="av")[0]["frames"], full[:, :, 8:56])
    # Portrait target: height 48 -> 64 sets the scale, width 64 -> 85, center 32 columns kept.
    tall = VideoClipDataset(clip_file.parent, 2, 64, 32, decoder="av")[0]["frames"]
    assert tall.shape == (2, 64, 32, 3)


def test_fps_resampling_and_stride(clip_file: Path) -> None:
    full = torch.from_numpy(read_video(clip_file))  # 20 frames at 24 fps
    half = VideoClipDataset(clip_file.parent, 5, 48, 64, fps=12, decoder="av")[0]["frames"]
    assert torch.equal(half, full[[0, 2, 4, 6, 8]])
    strided = VideoClipDataset(clip_file.parent, 4, 48, 64, stride=3, decoder="av")[0]["frames"]
    assert torch.equal(strided, full[[0, 3, 6, 9]])
    # 24 -> 16 fps: targets at 0, 1.5, 3, 4.5 source frames; ties take the later frame.
    resampled = VideoClipDataset(clip_file.parent, 4, 48, 64, fps=16, decoder="av")[0]["frames"]
    assert torch.equal(resampled, full[[0, 2, 3, 5]])
    # Upsampling repeats frames rather than inventing them.
    up = VideoClipDataset(clip_file.parent, 4, 48, 64, fps=48, decoder="av")[0]["frames"]
    assert torch.equal(up, full[[0, 1, 1, 2]])


@pytest.mark.skipif(not video_mod._HAVE_DECORD, reason="decord not installed")
def test_decord_matches_pyav(clip_file: Path) -> None:
    kwargs = dict(num_frames=6, height=32, width=40, fps=12, stride=1)
    from_av = VideoClipDataset(clip_file.parent, decoder="av", **kwargs)[0]["frames"]
    from_decord = VideoClipDataset(clip_file.parent, decoder="decord", **kwargs)[0]["frames"]
    # Both wrap FFmpeg's H.264 decoder and RGB conversion; on this build they agree bit for bit.
    # If another build differs by rounding, the bound is max |diff| <= 2.
    assert torch.equal(from_av, from_decord)


@pytest.mark.skipif(not video_mod._HAVE_DECORD, reason="decord not installed")
def test_decord_refusing_padded_rows_reads_the_file_with_pyav(tmp_path: Path, caplog) -> None:
    """At widths whose RGB rows FFmpeg pads (48 px), decord refuses a valid file ("must exactly
    match"); the dataset reads that file with PyAV, which gives the same frames, and says so."""
    import dataclasses

    from streamkd.data.toyworld import ToyWorldConfig
    from streamkd.data.video import write_toy_videos

    write_toy_videos(tmp_path, 1, num_frames=5, world=dataclasses.replace(ToyWorldConfig(), frame_size=48))
    kwargs = dict(num_frames=5, height=48, width=48)
    with caplog.at_level("WARNING"):
        from_decord = VideoClipDataset(tmp_path, decoder="decord", **kwargs)[0]["frames"]
    assert "reading it with PyAV" in caplog.text
    assert torch.equal(from_decord, VideoClipDataset(tmp_path, decoder="av", **kwargs)[0]["frames"])


@pytest.mark.parametrize("decoder", DECODERS)
def test_truncated_file_is_rejected(tmp_path: Path, decoder: str) -> None:
    path = write_video(tmp_path / "broken.mp4")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"broken\.mp4.*corrupt or truncated"):
        VideoClipDataset(tmp_path, 4, 32, 32, decoder=decoder)


@pytest.mark.parametrize("decoder", DECODERS)
def test_too_short_says_frames_had_and_needed(clip_file: Path, decoder: str) -> None:
    with pytest.raises(ValueError, match=r"clip\.mp4' has 20 frames .* need 31"):
        VideoClipDataset(clip_file.parent, 16, 32, 32, stride=2, decoder=decoder)
    with pytest.raises(ValueError, match=r"has 20 frames .* at 12 fps need 23"):
        VideoClipDataset(clip_file.parent, 12, 32, 32, fps=12, decoder=decoder)


def test_missing_caption_names_expected_file(tmp_path: Path) -> None:
    write_video(tmp_path / "nocap.mp4", caption=None)
    with pytest.raises(ValueError, match=r"expected '.*nocap\.txt'"):
        VideoClipDataset(tmp_path, 4, 32, 32, decoder="av")
    write_video(tmp_path / "sub.mp4", caption=None)
    (tmp_path / "m.jsonl").write_text('{"path": "sub.mp4", "caption": "ok"}\n{"path": "nocap.mp4"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2 \('nocap\.mp4'\) has no caption"):
        VideoClipDataset(tmp_path / "m.jsonl", 4, 32, 32, decoder="av")


def test_missing_manifest_file(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,caption\ngone.mp4,hello\n")
    with pytest.raises(ValueError, match=r"gone\.mp4' does not exist; fix the path in the manifest"):
        VideoClipDataset(tmp_path / "m.csv", 4, 32, 32, decoder="av")


def test_skip_mode_counts_every_bad_file(tmp_path: Path) -> None:
    write_video(tmp_path / "good.mp4")
    write_video(tmp_path / "short.mp4", num_frames=3)
    write_video(tmp_path / "nocap.mp4", caption=None)
    broken = write_video(tmp_path / "broken.mp4")
    broken.write_bytes(broken.read_bytes()[:200])
    rows = ["good.mp4", "short.mp4", "nocap.mp4", "broken.mp4", "gone.mp4"]
    (tmp_path / "m.csv").write_text("path,caption\n" + "".join(
        f"{r},{'' if r == 'nocap.mp4' else 'cap'}\n" for r in rows))
    ds = VideoClipDataset(tmp_path / "m.csv", 8, 32, 32, decoder="av", on_error="skip")
    assert len(ds) == 1 and ds[0]["path"] == str(tmp_path / "good.mp4")
    assert sorted(Path(p).name for p in ds.skipped) == sorted(rows[1:])
    reasons = {Path(p).name: r for p, r in ds.skipped.items()}
    assert "has 3 frames" in reasons["short.mp4"] and "no caption" in reasons["nocap.mp4"]
    assert "corrupt" in reasons["broken.mp4"] and "does not exist" in reasons["gone.mp4"]
    with pytest.raises(IndexError):
        ds[1]


def test_sidecar_actions_follow_the_frame_indices(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4")  # 20 frames at 24 fps
    (tmp_path / "a.actions.json").write_text(json.dumps(list(range(20))))
    write_video(tmp_path / "b.mp4")
    np.save(tmp_path / "b.actions.npy", np.arange(20)[::-1].copy())
    write_video(tmp_path / "c.mp4")
    ds = VideoClipDataset(tmp_path, 4, 32, 32, fps=12, decoder="av")
    # 24 -> 12 fps takes source frames 0, 2, 4, 6: the actions of exactly those frames
    assert ds[0]["actions"].dtype == torch.int64 and ds[0]["actions"].tolist() == [0, 2, 4, 6]
    assert ds[1]["actions"].tolist() == [19, 17, 15, 13]
    assert "actions" not in ds[2]


def test_manifest_actions_and_their_errors(tmp_path: Path) -> None:
    write_video(tmp_path / "x.mp4", caption=None)
    (tmp_path / "m.csv").write_text(f'path,caption,actions\nx.mp4,cap,"{json.dumps(list(range(20)))}"\n')
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "x.mp4", "caption": "c", "actions": [3] * 20}) + "\n")
    assert VideoClipDataset(tmp_path / "m.csv", 3, 32, 32, stride=2, decoder="av")[0]["actions"].tolist() == [0, 2, 4]
    assert VideoClipDataset(tmp_path / "m.jsonl", 3, 32, 32, decoder="av")[0]["actions"].tolist() == [3, 3, 3]
    (tmp_path / "short.jsonl").write_text(json.dumps({"path": "x.mp4", "caption": "c", "actions": [1] * 19}) + "\n")
    with pytest.raises(ValueError, match=r"short\.jsonl:1 gives 19 actions but video '.*x\.mp4' has 20 frames"):
        VideoClipDataset(tmp_path / "short.jsonl", 3, 32, 32, decoder="av")
    (tmp_path / "neg.jsonl").write_text(json.dumps({"path": "x.mp4", "caption": "c", "actions": [-1] * 20}) + "\n")
    with pytest.raises(ValueError, match=r"neg\.jsonl:1: actions must be >= 0"):
        VideoClipDataset(tmp_path / "neg.jsonl", 3, 32, 32, decoder="av")


def test_sidecar_of_wrong_length_is_named_or_skipped(tmp_path: Path) -> None:
    write_video(tmp_path / "good.mp4")
    write_video(tmp_path / "bad.mp4")
    (tmp_path / "bad.actions.json").write_text(json.dumps([0] * 7))
    with pytest.raises(ValueError, match=r"bad\.actions\.json' gives 7 actions but video '.*bad\.mp4' has 20 frames"):
        VideoClipDataset(tmp_path, 4, 32, 32, decoder="av")
    ds = VideoClipDataset(tmp_path, 4, 32, 32, decoder="av", on_error="skip")
    assert len(ds) == 1 and list(ds.skipped) == [str(tmp_path / "bad.mp4")]
