"""Tests for streamkd.media.video: streaming MP4 writing, reading and path checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamkd.media.video import (
    OutputPathError,
    VideoReadError,
    VideoWriter,
    check_output_path,
    read_video,
    video_info,
)


def smooth_clip(frames: int, height: int, width: int) -> np.ndarray:
    """Low-frequency moving colour gradients: easy to compress, so PSNR is meaningful."""
    t = np.arange(frames, dtype=np.float64)[:, None, None, None]
    y = np.arange(height, dtype=np.float64)[None, :, None, None] / height
    x = np.arange(width, dtype=np.float64)[None, None, :, None] / width
    phase = np.array([0.0, 2.0, 4.0])  # a different pattern per channel
    clip = 127.5 + 100.0 * np.sin(2 * np.pi * (x + 0.5 * y) + phase + 0.2 * t)
    return clip.round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_chunked_write_is_decodable_with_right_count_and_size(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    clip = smooth_clip(20, 48, 80)
    with VideoWriter(out, fps=16) as writer:
        writer.write(clip[:7])
        writer.write(torch.from_numpy(clip[7:15]))  # torch tensors are accepted too
        writer.write(clip[15:])
    assert writer.frames_written == 20
    assert leftovers(tmp_path) == ["clip.mp4"]  # temp file renamed away
    info = video_info(out)
    assert info == {"frames": 20, "width": 80, "height": 48, "fps": 16.0, "codec": "h264"}
    assert read_video(out).shape == (20, 48, 80, 3)


def test_streams_long_video_in_chunks(tmp_path: Path) -> None:
    out = tmp_path / "long.mp4"
    chunk = smooth_clip(30, 64, 64)
    with VideoWriter(out) as writer:
        for _ in range(10):
            writer.write(chunk)
    assert video_info(out)["frames"] == 300
    assert read_video(out).shape == (300, 64, 64, 3)


def test_roundtrip_psnr_h264_crf18(tmp_path: Path) -> None:
    out = tmp_path / "q.mp4"
    clip = smooth_clip(16, 64, 96)
    with VideoWriter(out, crf=18) as writer:
        writer.write(clip)
    assert psnr(read_video(out), clip) > 30.0


def test_mpeg4_codec_alternative(tmp_path: Path) -> None:
    out = tmp_path / "m.mp4"
    clip = smooth_clip(8, 64, 96)
    with VideoWriter(out, codec="mpeg4") as writer:
        writer.write(clip)
    assert video_info(out)["codec"] == "mpeg4"
    assert psnr(read_video(out), clip) > 30.0


def test_exception_in_block_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out) as writer:
            # Enough frames to get past the encoder's lookahead, so packets
            # have really been muxed into the temp file.
            writer.write(smooth_clip(100, 32, 32))
            assert (tmp_path / ".clip.partial.mp4").stat().st_size > 0
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out) as writer:
            writer.write(smooth_clip(4, 32, 32))
            raise KeyboardInterrupt
    assert leftovers(tmp_path) == []


def test_failed_run_does_not_clobber_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with VideoWriter(out) as writer:
            writer.write(smooth_clip(2, 32, 32))
            raise RuntimeError("fail")
    assert out.read_bytes() == b"previous result"
    assert leftovers(tmp_path) == ["clip.mp4"]


def test_no_frames_written_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4"):
            pass
    assert leftovers(tmp_path) == []


def test_odd_size_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"33x32 .*even"):
        with VideoWriter(tmp_path / "odd.mp4") as writer:
            writer.write(np.zeros((2, 32, 33, 3), np.uint8))
    assert leftovers(tmp_path) == []


def test_size_change_names_both_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"from 32x32 to 64x32"):
        with VideoWriter(tmp_path / "v.mp4") as writer:
            writer.write(np.zeros((2, 32, 32, 3), np.uint8))
            writer.write(np.zeros((2, 32, 64, 3), np.uint8))


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 32, 32, 3), np.float32), "uint8, got numpy float32"),
        (torch.zeros(2, 32, 32, 3), "uint8, got torch torch.float32"),
        (np.zeros((32, 32, 3), np.uint8), r"\[T, H, W, 3\].*frames\[None\]"),
        (np.zeros((2, 3, 32, 32), np.uint8), r"\[T, H, W, 3\]"),
    ],
)
def test_bad_frames_rejected(tmp_path: Path, frames: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        with VideoWriter(tmp_path / "v.mp4") as writer:
            writer.write(frames)  # type: ignore[arg-type]
    assert leftovers(tmp_path) == []


def test_write_outside_with_block(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="with"):
        VideoWriter(tmp_path / "v.mp4").write(np.zeros((1, 32, 32, 3), np.uint8))


def test_bad_codec_and_fps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported codec 'vp9'"):
        VideoWriter(tmp_path / "v.mp4", codec="vp9")
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "v.mp4", fps=0)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoReadError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoReadError, match="does not exist"):
        video_info(tmp_path / "nope.mp4")


def test_read_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError, match="bad.mp4"):
        read_video(bad)


def test_check_output_path_accepts_good_path(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "ok.mp4") == tmp_path / "ok.mp4"
    assert leftovers(tmp_path) == []  # the writability probe cleans up


def test_check_output_path_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match=r"does not exist.*mkdir -p"):
        check_output_path(tmp_path / "missing" / "out.mp4")


def test_check_output_path_parent_is_file(tmp_path: Path) -> None:
    # chmod cannot block root (tests may run as root), but a regular file as
    # parent makes the directory unusable for everyone.
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="not a directory"):
        check_output_path(tmp_path / "afile" / "out.mp4")


def test_check_output_path_is_directory(tmp_path: Path) -> None:
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_path(tmp_path / "d.mp4")


def test_check_output_path_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match=r"must end in \.mp4.*out\.mp4"):
        check_output_path(tmp_path / "out.avi")


def test_writer_checks_path_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError):
        VideoWriter(tmp_path / "missing" / "out.mp4")


def test_output_path_error_is_value_error() -> None:
    assert issubclass(OutputPathError, ValueError)
    assert issubclass(VideoReadError, ValueError)
