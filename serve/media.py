"""Image codecs of the streaming protocol, through PyAV (FFmpeg) -- the library ``streamkd.media``
already uses for mp4, so serving needs no second imaging stack.

* JPEG (default): every frame is a standalone baseline JPEG that browsers decode natively
  (``createImageBitmap``), so dropping any frame is harmless.
* H.264 (``libx264``, zero-latency tune, no B-frames, one packet per frame): fewer bytes per
  frame, but frames depend on earlier ones; the server therefore drops frames *before* they
  reach the encoder, and every session has its own encoder.
"""

from __future__ import annotations

import struct
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk: length 0, type, CRC
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG (reserved), DAC
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RST0-7 and TEM carry no length


def image_size(fmt: str, data: bytes) -> tuple[int, int]:
    """(height, width) of a png or jpeg image, read from its header alone: no pixel is decoded, so
    a small upload that declares a huge image costs nothing to refuse. ValueError when the header
    is malformed or truncated."""
    if fmt == "png":
        return _png_size(data)
    if fmt == "jpeg":
        return _jpeg_size(data)
    if fmt == "rgb24":
        raise ValueError("rgb24 has no header to read a size from; its size follows from the byte count (height * width * 3)")
    raise ValueError(f"unknown image format {fmt!r}; use png, jpeg or rgb24")


def _png_size(data: bytes) -> tuple[int, int]:
    # signature (8) | IHDR chunk: length (4, = 13) | "IHDR" (4) | width (4) | height (4) | ...
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a valid png: missing the 8-byte png signature")
    if len(data) < 24:
        raise ValueError(f"not a valid png: {len(data)} bytes end inside the IHDR chunk")
    length, kind, width, height = struct.unpack_from(">I4sII", data, 8)
    if kind != b"IHDR" or length != 13:
        raise ValueError(f"not a valid png: the first chunk is {kind!r} of {length} bytes, not IHDR of 13")
    if width == 0 or height == 0:
        raise ValueError(f"not a valid png: IHDR declares a {height}x{width} image")
    return height, width


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # SOI, then marker segments: 0xFF (fill 0xFF bytes allowed), marker byte, and unless the marker
    # stands alone, a big-endian u16 length that counts itself. The first SOF segment holds
    # precision (1), height (2), width (2) after its length.
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a valid jpeg: missing the SOI marker (FF D8)")
    pos = 2
    while True:
        if pos >= len(data):
            raise ValueError(f"not a valid jpeg: truncated at byte {pos}, before any SOF segment")
        if data[pos] != 0xFF:
            raise ValueError(f"not a valid jpeg: expected a marker at byte {pos}, found 0x{data[pos]:02X}")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            raise ValueError(f"not a valid jpeg: truncated at byte {pos}, before any SOF segment")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xDA, 0xD9):
            name = "SOS" if marker == 0xDA else "EOI"
            raise ValueError(f"not a valid jpeg: {name} at byte {pos - 2} comes before any SOF segment")
        if marker in (0x00, 0xD8):
            raise ValueError(f"not a valid jpeg: unexpected marker 0x{marker:02X} at byte {pos - 2}")
        if pos + 2 > len(data):
            raise ValueError(f"not a valid jpeg: truncated in the length of segment 0x{marker:02X} at byte {pos - 2}")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise ValueError(f"not a valid jpeg: segment 0x{marker:02X} at byte {pos - 2} has length {length}")
        if marker in _JPEG_SOF:
            if length < 7 or pos + 7 > len(data):
                raise ValueError(f"not a valid jpeg: SOF segment at byte {pos - 2} is truncated")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            if height == 0 or width == 0:  # height 0 defers it to a DNL segment after the first scan
                raise ValueError(f"not a valid jpeg: SOF declares a {height}x{width} image")
            return height, width
        pos += length


def decode_image(fmt: str, data: bytes, height: int, width: int) -> np.ndarray:
    """A client-supplied first frame as uint8 ``(height, width, 3)``; ValueError when it is not one.

    A png or jpeg is checked before it reaches the decoder: the size in its header (a 100-byte
    upload can declare 16000x16000, gigabytes once decoded), and its last bytes, because FFmpeg
    decodes a truncated image into a frame of grey or missing rows instead of failing."""
    if fmt == "rgb24":
        if len(data) != height * width * 3:
            raise ValueError(f"rgb24 first frame must be {height}x{width}x3 = {height * width * 3} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"unknown first frame format {fmt!r}; use png, jpeg or rgb24")
    try:
        size = image_size(fmt, data)
    except ValueError as e:
        raise ValueError(f"first frame is {e}") from None
    if size != (height, width):
        raise ValueError(f"first frame is {size[0]}x{size[1]}, this model needs {height}x{width}")
    if fmt == "png" and not data.endswith(_PNG_IEND):
        raise ValueError("first frame is not a valid png: truncated, it does not end with the IEND chunk")
    if fmt == "jpeg" and not data.endswith(b"\xff\xd9"):
        raise ValueError("first frame is not a valid jpeg: truncated, it does not end with the EOI marker (FF D9)")
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
