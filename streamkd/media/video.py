"""MP4 video writing and reading on top of PyAV.

Generated rollouts can be arbitrarily long (streaming world models), so
:class:`VideoWriter` encodes chunk by chunk and never holds more than the
chunk it is given.  Output is written to a hidden temp file next to the
target and renamed into place only after the encoder is flushed, so a crash
or Ctrl-C never leaves a truncated ``.mp4`` that looks like a finished result.

:func:`check_output_path` exists so that command-line entry points can reject
a bad ``--out`` before spending minutes on sampling.
"""

from __future__ import annotations

import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np
import torch

__all__ = [
    "OutputPathError",
    "VideoReadError",
    "VideoWriter",
    "check_output_path",
    "read_video",
    "video_info",
]

# Preference order for codec="h264".  libx264 gives CRF rate control; the
# bare "h264" name resolves to whatever H.264 encoder the bundled FFmpeg
# registered first; libopenh264 is the licence-friendly build's only option.
_H264_ENCODERS = ("libx264", "h264", "libopenh264")

# mpeg4 has no CRF mode; a fixed quantiser of 2 (scale 1-31, lower is better)
# keeps it close to visually lossless, which is what debugging output needs.
_MPEG4_QSCALE = 2

# libopenh264 ignores CRF and is bitrate-driven; this many bits per pixel per
# frame is comfortably above what smooth synthetic clips need.
_OPENH264_BITS_PER_PIXEL = 0.5

_FF_QP2LAMBDA = 118  # FFmpeg's qscale -> lambda factor (libavutil/avutil.h).


class OutputPathError(ValueError):
    """The requested output path cannot receive a video file."""


class VideoReadError(ValueError):
    """A video file is missing or cannot be decoded."""


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Validate that ``path`` can receive an ``.mp4`` file; return it as a Path.

    Call this before any expensive work so a typo in the output path fails in
    milliseconds instead of after sampling.  The writability check creates and
    deletes a probe file rather than trusting ``os.access``, because access
    bits say nothing about read-only mounts and are ignored for root.
    """
    out = Path(path)
    if out.is_dir():
        raise OutputPathError(
            f"output path {str(out)!r} is a directory; pass a file path such as "
            f"{str(out / 'video.mp4')!r}"
        )
    if out.suffix.lower() != ".mp4":
        raise OutputPathError(
            f"output path {str(out)!r} must end in .mp4 (got suffix {out.suffix!r}); "
            f"use {str(out.with_suffix('.mp4'))!r}"
        )
    parent = out.parent
    if not parent.exists():
        raise OutputPathError(
            f"output directory {str(parent)!r} for {str(out)!r} does not exist; "
            f"create it first (mkdir -p {parent})"
        )
    if not parent.is_dir():
        raise OutputPathError(
            f"parent {str(parent)!r} of output path {str(out)!r} is not a directory; "
            "choose a path inside an existing directory"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".streamkd-write-probe-"):
            pass
    except OSError as err:
        raise OutputPathError(
            f"output directory {str(parent)!r} for {str(out)!r} is not writable "
            f"({err.strerror}); fix its permissions or choose another directory"
        ) from err
    return out


def _encoder_available(name: str) -> bool:
    # av.codecs_available mixes decoders and encoders ("h264" is always there
    # as a decoder), so confirm an encoder can actually be instantiated.
    if name not in av.codecs_available:
        return False
    try:
        av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


def _resolve_encoder(codec: str) -> str:
    """Map the user-facing codec name to a concrete FFmpeg encoder name."""
    if codec == "h264":
        for name in _H264_ENCODERS:
            if _encoder_available(name):
                # "h264" is an alias; report the real encoder so options
                # (CRF vs bitrate) are chosen for what will actually run.
                return av.codec.Codec(name, "w").name
        raise ValueError(
            "no H.264 encoder in PyAV's bundled FFmpeg (tried "
            f"{', '.join(_H264_ENCODERS)}); use codec='mpeg4' or install a PyAV "
            "wheel built with libx264"
        )
    if codec == "mpeg4":
        if not _encoder_available("mpeg4"):
            raise ValueError("PyAV's bundled FFmpeg has no mpeg4 encoder; use codec='h264'")
        return "mpeg4"
    raise ValueError(f"unsupported codec {codec!r}; choose 'h264' or 'mpeg4'")


def _to_uint8_thwc(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate a chunk of frames and return it as a numpy uint8 [T,H,W,3] array."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(
                f"frames must be uint8, got torch {frames.dtype}; convert with "
                "(x.clamp(0, 1) * 255).round().to(torch.uint8)"
            )
        frames = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8, got numpy {frames.dtype}; convert with "
                "(np.clip(x, 0, 1) * 255).round().astype(np.uint8)"
            )
    else:
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must have shape [T, H, W, 3] (RGB, channels last), got {list(frames.shape)}; "
            "for a single frame use frames[None], for [T, 3, H, W] use permute(0, 2, 3, 1)"
        )
    return frames


class VideoWriter:
    """Stream RGB uint8 frames into an MP4 file, chunk by chunk.

    Use as a context manager::

        with VideoWriter("out.mp4", fps=16) as w:
            for chunk in rollout:          # each [T, H, W, 3] uint8
                w.write(chunk)

    The file appears at ``path`` only when the block exits cleanly; on any
    exception (including KeyboardInterrupt) the partial file is deleted.

    Args:
        path: destination ``.mp4``; validated immediately by :func:`check_output_path`.
        fps: frame rate (int, float or Fraction).
        codec: ``"h264"`` (first available of libx264, h264, libopenh264) or
            ``"mpeg4"`` (FFmpeg's native encoder, for builds without H.264).
        crf: libx264 constant rate factor, 0-51, lower is better.  Ignored by
            mpeg4 (fixed near-lossless quantiser) and libopenh264 (bitrate-driven).
        pix_fmt: encoder pixel format; yuv420p plays everywhere.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: int | float | Fraction = 16,
        codec: str = "h264",
        crf: int = 18,
        pix_fmt: str = "yuv420p",
    ) -> None:
        # Everything that can be checked without frames is checked here, so a
        # bad argument fails before the caller starts generating.
        self.path = check_output_path(path)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number, got {fps!r}")
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        self.encoder = _resolve_encoder(codec)
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51] (lower is better quality), got {crf!r}")
        self.crf = crf
        try:
            av.VideoFormat(pix_fmt)
        except ValueError as err:
            raise ValueError(f"unknown pixel format {pix_fmt!r}; use 'yuv420p'") from err
        self.pix_fmt = pix_fmt
        self.tmp_path = self.path.with_name(f".{self.path.stem}.partial.mp4")
        self.frames_written = 0
        self._container: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] | None = None  # (height, width), fixed by first chunk

    def __enter__(self) -> VideoWriter:
        if self._container is not None:
            raise RuntimeError("VideoWriter is already open; it cannot be re-entered")
        self._container = av.open(str(self.tmp_path), mode="w", format="mp4")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to {str(self.path)!r}; nothing to save")
            for packet in self._stream.encode(None):  # drain delayed (B-)frames
                self._container.mux(packet)
            self._container.close()
            self._container = None
        except BaseException:
            self._abort()
            raise
        try:
            os.replace(self.tmp_path, self.path)
        except OSError:
            # e.g. a directory appeared at ``path`` meanwhile; keep the promise
            # that no partial file outlives a failed writer.
            self.tmp_path.unlink(missing_ok=True)
            raise

    def _abort(self) -> None:
        """Close the container without caring about its state and delete the temp file."""
        if self._container is not None:
            try:
                self._container.close()
            except (av.FFmpegError, OSError, ValueError):
                pass  # closing a half-initialised muxer may fail; the file is discarded anyway
            self._container = None
        self.tmp_path.unlink(missing_ok=True)

    def _open_stream(self, height: int, width: int) -> None:
        needs_even = self.encoder != "mpeg4" or self.pix_fmt == "yuv420p"
        if needs_even and (height % 2 or width % 2):
            raise ValueError(
                f"frame size {width}x{height} (WxH) has an odd side; {self.encoder} with "
                f"{self.pix_fmt} needs even width and height: crop or pad, e.g. "
                f"frames[:, :{height - height % 2}, :{width - width % 2}]"
            )
        options: dict[str, str] = {}
        if self.encoder == "libx264":
            options["crf"] = str(self.crf)
        elif self.encoder == "mpeg4":
            options["flags"] = "+qscale"
            options["global_quality"] = str(_MPEG4_QSCALE * _FF_QP2LAMBDA)
        stream = self._container.add_stream(self.encoder, rate=self.fps, options=options)
        stream.width = width
        stream.height = height
        stream.pix_fmt = self.pix_fmt
        if self.encoder not in ("libx264", "mpeg4"):
            stream.bit_rate = int(width * height * self.fps * _OPENH264_BITS_PER_PIXEL)
        self._stream = stream
        self._size = (height, width)

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode a chunk of frames, shape [T, H, W, 3], dtype uint8 (RGB)."""
        if self._container is None:
            raise RuntimeError("VideoWriter.write() called outside its `with` block")
        chunk = _to_uint8_thwc(frames)
        height, width = chunk.shape[1], chunk.shape[2]
        if self._size is None:
            if chunk.shape[0] == 0:
                return  # an empty first chunk carries a size but no frames; wait for real ones
            self._open_stream(height, width)
        elif (height, width) != self._size:
            h0, w0 = self._size
            raise ValueError(
                f"frame size changed from {w0}x{h0} to {width}x{height} (WxH); "
                "all chunks of one video must have the same size"
            )
        for frame in chunk:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            # PyAV converts rgb24 to the stream's pix_fmt inside encode().
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
        self.frames_written += chunk.shape[0]


def _open_for_reading(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise VideoReadError(f"video file {str(p)!r} does not exist (or is not a regular file)")
    try:
        container = av.open(str(p), mode="r")
    except av.FFmpegError as err:
        raise VideoReadError(f"cannot open {str(p)!r} as a video: {err}") from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{str(p)!r} contains no video stream")
    return container


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a whole video into a uint8 RGB array of shape [T, H, W, 3]."""
    container = _open_for_reading(path)
    try:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.FFmpegError as err:
        raise VideoReadError(f"failed to decode {str(path)!r}: {err}") from err
    finally:
        container.close()
    if not frames:
        raise VideoReadError(f"{str(path)!r} has a video stream but no decodable frames")
    return np.stack(frames)


def video_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return ``frames``, ``width``, ``height``, ``fps`` (float) and ``codec`` of a video."""
    container = _open_for_reading(path)
    try:
        stream = container.streams.video[0]
        frames = stream.frames
        if frames == 0:
            # Some containers omit the frame count; counting packets needs no decoding.
            frames = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
        rate = stream.average_rate or stream.guessed_rate
        return {
            "frames": int(frames),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(rate) if rate else 0.0,
            "codec": stream.codec_context.name,
        }
    except av.FFmpegError as err:
        raise VideoReadError(f"failed to read metadata of {str(path)!r}: {err}") from err
    finally:
        container.close()
