"""Image codecs of the streaming protocol, through PyAV (FFmpeg) -- the library ``streamkd.media``
already uses for mp4, so serving needs no second imaging stack.

* JPEG (default): every frame is a standalone baseline JPEG that browsers decode natively
  (``createImageBitmap``), so dropping any frame is harmless.
* H.264 (``libx264``, zero-latency tune, no B-frames, one packet per frame): fewer bytes per
  frame, but frames depend on earlier ones; the server therefore drops frames *before* they
  reach the encoder, and every session has its own encoder.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


class FrameEncoder:
    """Encodes one session's frames, in order. Not thread-safe; one per session."""

    def __init__(self, codec: str, height: int, width: int, fps: float, jpeg_quality: int = 3) -> None:
        """``jpeg_quality``: FFmpeg's MJPEG quantiser (2 = best, 31 = worst)."""
        self.codec = codec
        if codec == "jpeg":
            ctx = av.CodecContext.create("mjpeg", "w")
            ctx.pix_fmt = "yuvj420p"
            ctx.qmin = ctx.qmax = jpeg_quality
        elif codec == "h264":
            ctx = av.CodecContext.create("libx264", "w")
            ctx.pix_fmt = "yuv420p"
            ctx.options = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0", "g": "120"}
        else:
            raise ValueError(f"unknown codec {codec!r}; use jpeg or h264")
        ctx.width, ctx.height = width, height
        ctx.time_base = Fraction(1, 1000)
        ctx.framerate = Fraction(fps).limit_denominator(1000)
        ctx.open()
        self._ctx = ctx
        self._count = 0

    def encode(self, frame_HWC: np.ndarray) -> tuple[bytes, bool]:
        """(payload, keyframe) for one uint8 RGB frame."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC), format="rgb24").reformat(format=self._ctx.pix_fmt)
        frame.pts = self._count
        self._count += 1
        packets = self._ctx.encode(frame)
        assert len(packets) == 1, "encoder buffered frames; it must be configured for zero latency"
        return bytes(packets[0]), self.codec == "jpeg" or packets[0].is_keyframe


class FrameDecoder:
    """Decodes one stream's payloads back to uint8 RGB (Python client, tests)."""

    def __init__(self, codec: str) -> None:
        self._ctx = av.CodecContext.create({"jpeg": "mjpeg", "h264": "h264"}[codec], "r")

    def decode(self, payload: bytes) -> np.ndarray:
        frames = self._ctx.decode(av.Packet(payload))
        if len(frames) != 1:
            raise ValueError(f"payload decoded to {len(frames)} frames, expected 1")
        return frames[0].to_ndarray(format="rgb24")


def decode_image(fmt: str, data: bytes, height: int, width: int) -> np.ndarray:
    """A client-supplied first frame as uint8 ``(height, width, 3)``; ValueError when it is not one."""
    if fmt == "rgb24":
        if len(data) != height * width * 3:
            raise ValueError(f"rgb24 first frame must be {height}x{width}x3 = {height * width * 3} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    try:
        ctx = av.CodecContext.create({"jpeg": "mjpeg", "png": "png"}[fmt], "r")
        frames = ctx.decode(av.Packet(data))
    except (av.error.FFmpegError, ValueError):
        raise ValueError(f"first frame is not a decodable {fmt} image") from None
    if len(frames) != 1:
        raise ValueError(f"first frame is not a decodable {fmt} image")
    image = frames[0].to_ndarray(format="rgb24")
    if image.shape != (height, width, 3):
        raise ValueError(f"first frame is {image.shape[0]}x{image.shape[1]}, this model needs {height}x{width}")
    return image


def upscale(frame_HWC: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling (tiny toy frames look right in any player)."""
    if factor == 1:
        return frame_HWC
    return frame_HWC.repeat(factor, axis=0).repeat(factor, axis=1)
