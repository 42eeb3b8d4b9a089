"""What the server reads from untrusted bytes before any generation: image headers of uploaded
first frames, client JSON messages, and the client's handshake failures. Plain unit tests, apart
from the two handshake tests that need a server to answer on the wrong path; those import the
server themselves, so that the parsers are tested on their own."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkd.cli import main
from streamkd.data.toyworld import ToyWorldConfig
from streamkd.serve.client import ServerError, StreamClient
from streamkd.serve.media import FrameEncoder, decode_image, image_size
from streamkd.serve.protocol import MAX_SEED, ErrorCode, ProtocolError, parse_client_message

PROMPT = "forest with red squares"
SIZES = [(32, 32), (24, 40), (40, 24), (17, 9)]  # (height, width), odd sizes included


def image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(image_HWC: np.ndarray) -> bytes:
    ctx = av.CodecContext.create("png", "w")
    ctx.pix_fmt = "rgb24"
    ctx.height, ctx.width = image_HWC.shape[:2]
    ctx.time_base = Fraction(1, 1000)
    ctx.open()
    packets = ctx.encode(av.VideoFrame.from_ndarray(image_HWC, format="rgb24")) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def jpeg_bytes(image_HWC: np.ndarray) -> bytes:
    return FrameEncoder("jpeg", *image_HWC.shape[:2], fps=16.0).encode(image_HWC)[0]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def segment(marker: int, body: bytes) -> bytes:
    """A JPEG marker segment; its length counts itself."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def sof(marker: int, height: int, width: int) -> bytes:
    return segment(marker, struct.pack(">BHHB", 8, height, width, 3) + bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]))


SOI, EOI = b"\xff\xd8", b"\xff\xd9"


# -------------------------------------------------------------------------------- image headers
@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_image_size_reads_the_true_size(fmt: str, height: int, width: int) -> None:
    picture = image(height, width)
    data = png_bytes(picture) if fmt == "png" else jpeg_bytes(picture)
    assert image_size(fmt, data) == (height, width)
    decoded = decode_image(fmt, data, height, width)
    assert decoded.shape == (height, width, 3)
    if fmt == "png":
        np.testing.assert_array_equal(decoded, picture)
    with pytest.raises(ValueError, match=f"first frame is {height}x{width}, this model needs {height + 1}x{width}"):
        decode_image(fmt, data, height + 1, width)


def test_huge_declared_png_is_refused_before_decoding() -> None:
    # a valid 16000x16000 RGB header and a tiny IDAT: 768 MB of pixels if it reached the decoder
    ihdr = struct.pack(">IIBBBBB", 16000, 16000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))
    assert image_size("png", data) == (16000, 16000)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="first frame is 16000x16000, this model needs 32x32"):
        decode_image("png", data, 32, 32)
    assert time.perf_counter() - t0 < 0.05


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_every_truncation_is_a_value_error(fmt: str) -> None:
    picture = image(24, 40)
    data = png_bytes(picture) if fmt == "png" else jpeg_bytes(picture)
    for n in range(len(data)):
        prefix = data[:n]
        try:
            assert image_size(fmt, prefix) == (24, 40)  # the header may be whole
        except ValueError as e:
            assert f"not a valid {fmt}" in str(e)
        # FFmpeg would turn most of these into a frame with grey or missing rows
        with pytest.raises(ValueError, match=f"first frame is not a (valid|decodable) {fmt}"):
            decode_image(fmt, prefix, 24, 40)


def test_jpeg_segments_before_sof_are_skipped() -> None:
    data = jpeg_bytes(image(24, 40))
    # an APP1 whose payload looks like markers (EOI, SOF0 with a wrong size), a COM, fill bytes
    extra = segment(0xE1, b"Exif\x00\x00" + EOI + sof(0xC0, 999, 999)) + segment(0xFE, b"made by a test") + b"\xff\xff"
    data = data[:2] + extra + data[2:]
    assert image_size("jpeg", data) == (24, 40)
    assert decode_image("jpeg", data, 24, 40).shape == (24, 40, 3)


@pytest.mark.parametrize("data, size", [
    (SOI + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00") + sof(0xC2, 480, 640), (480, 640)),  # progressive
    (SOI + b"\xff\xd0\xff\x01" + sof(0xC1, 7, 5), (7, 5)),  # standalone RST0 and TEM, extended sequential
    (SOI + segment(0xC4, b"\x00" + bytes(range(1, 17))) + segment(0xCC, b"\x00\x10") + sof(0xC0, 3, 4), (3, 4)),  # DHT, DAC
], ids=["progressive", "standalone-markers", "dht-dac-are-not-sof"])
def test_jpeg_sof_variants(data: bytes, size: tuple[int, int]) -> None:
    assert image_size("jpeg", data) == size


MALFORMED = [
    ("png", b"", "signature"),
    ("png", b"GIF89a" + bytes(30), "signature"),
    ("png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IDAT", bytes(13)), "IHDR"),
    ("png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)), "5x0"),
    ("jpeg", b"", "SOI"),
    ("jpeg", SOI + b"\x00", "marker"),
    ("jpeg", SOI + b"\xff\x00", "marker"),
    ("jpeg", SOI + segment(0xDA, b"\x00" * 8), "SOS"),
    ("jpeg", SOI + EOI, "EOI"),
    ("jpeg", SOI + b"\xff\xe0\x00\x01", "length 1"),
    ("jpeg", SOI + segment(0xE0, b"abc")[:-1], "truncated"),
    ("jpeg", SOI + sof(0xC0, 0, 16), "0x16"),
    ("jpeg", SOI + sof(0xC0, 16, 16)[:8], "SOF"),
]


@pytest.mark.parametrize("fmt, data, problem", MALFORMED, ids=[f"{fmt}-{i}" for i, (fmt, _, _) in enumerate(MALFORMED)])
def test_malformed_headers_say_what_is_wrong(fmt: str, data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=f"not a valid {fmt}: .*{problem}"):
        image_size(fmt, data)
    with pytest.raises(ValueError, match=f"first frame is not a valid {fmt}: .*{problem}"):
        decode_image(fmt, data, 16, 16)


def test_rgb24_has_no_header() -> None:
    with pytest.raises(ValueError, match="rgb24 has no header"):
        image_size("rgb24", bytes(32 * 32 * 3))
    assert decode_image("rgb24", bytes(2 * 3 * 3), 2, 3).shape == (2, 3, 3)


# ----------------------------------------------------------------------------- client messages
DIGITS = 5000  # over the interpreter's 4300-digit limit for int(str)


OUT_OF_RANGE = [
    ({"type": "start", "prompt": PROMPT, "fps": 10**400}, ErrorCode.BAD_MESSAGE, "fps"),
    ({"type": "start", "prompt": PROMPT, "fps": -10**400}, ErrorCode.BAD_MESSAGE, "fps"),
    ({"type": "reset", "fps": 10**400}, ErrorCode.BAD_MESSAGE, "fps"),
    ('{"type": "start", "prompt": "%s", "fps": 1e400}' % PROMPT, ErrorCode.BAD_MESSAGE, "fps"),
    ('{"type": "start", "prompt": "%s", "fps": -1e400}' % PROMPT, ErrorCode.BAD_MESSAGE, "fps"),
    ('{"type": "start", "prompt": "%s", "fps": NaN}' % PROMPT, ErrorCode.BAD_MESSAGE, "fps"),
    ('{"type": "start", "prompt": "%s", "fps": Infinity}' % PROMPT, ErrorCode.BAD_MESSAGE, "fps"),
    ('{"type": "start", "prompt": "%s", "fps": %s}' % (PROMPT, "9" * DIGITS), ErrorCode.BAD_JSON, "4300 digits"),
    ('{"type": "credit", "frames": -%s}' % ("1" * DIGITS), ErrorCode.BAD_JSON, "4300 digits"),
    ({"type": "start", "prompt": PROMPT, "seed": 10**400}, ErrorCode.BAD_MESSAGE, "seed"),
    ({"type": "start", "prompt": PROMPT, "seed": MAX_SEED + 1}, ErrorCode.BAD_MESSAGE, "seed"),
    ({"type": "start", "prompt": PROMPT, "seed": 1e400}, ErrorCode.BAD_MESSAGE, "seed"),
    ({"type": "start", "prompt": PROMPT, "size": [10**400, 32]}, ErrorCode.BAD_MESSAGE, "size"),
    ({"type": "start", "prompt": PROMPT, "size": [32, float("inf")]}, ErrorCode.BAD_MESSAGE, "size"),
    ({"type": "hello", "credits": 10**400}, ErrorCode.BAD_MESSAGE, "credits"),
    ({"type": "hello", "version": -10**400}, ErrorCode.BAD_MESSAGE, "version"),
    ({"type": "action", "seq": 10**400, "action": "up"}, ErrorCode.BAD_MESSAGE, "seq"),
    ({"type": "action", "seq": float("nan"), "action": "up"}, ErrorCode.BAD_MESSAGE, "seq"),
    ({"type": "credit", "frames": 10**400}, ErrorCode.BAD_MESSAGE, "frames"),
    ("[" * 100_000 + "]" * 100_000, ErrorCode.BAD_JSON, "nested"),
    ("{" * 100_000, ErrorCode.BAD_JSON, "not valid JSON"),
]


@pytest.mark.parametrize("message, code, field", OUT_OF_RANGE, ids=[f"{f.split()[0]}-{i}" for i, (_, _, f) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_numbers_are_protocol_errors(message: dict | str, code: str, field: str) -> None:
    with pytest.raises(ProtocolError, match=field) as info:
        parse_client_message(message if isinstance(message, str) else json.dumps(message))
    assert info.value.code == code


class Digits:
    """An integer literal of ``n`` digits, longer than ``json.dumps`` will write."""

    def __init__(self, n: int) -> None:
        self.n = n


def to_json(value) -> str:
    if isinstance(value, Digits):
        return "9" * value.n
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # floats inf and nan as Infinity and NaN, which json.loads accepts


TYPES = ["hello", "start", "reset", "action", "prompt", "credit", "pause", "resume", "stop", "stats", "fly"]
FIELDS = ["version", "token", "codecs", "credits", "prompt", "seed", "first_frame", "size", "fps", "seq", "action",
          "frames", "format", "data"]
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(-(10**1000), 10**1000) | st.builds(Digits, st.integers(4200, 4400))
    | st.floats() | st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, 0.5, 240.0])
    | st.text(max_size=20) | st.sampled_from([PROMPT, "jpeg", "png", "rgb24", "world", "up", "AAAA"])
)
keys = st.sampled_from(FIELDS) | st.text(max_size=5)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(TYPES), fields=st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))
def test_any_json_parses_or_is_a_protocol_error(kind: str, fields: dict) -> None:
    try:
        parse_client_message(to_json({"type": kind, **fields}))
    except ProtocolError as e:
        assert str(e)


# ------------------------------------------------------------------------------- handshakes
WORLD = ToyWorldConfig(frame_size=32, map_size=128)


def test_connect_to_the_wrong_path_says_where_the_endpoint_is() -> None:
    from streamkd.serve.backends import WorldOracleBackend
    from streamkd.serve.server import ServerConfig, StreamServer

    async def scenario():
        async with StreamServer(ServerConfig(port=0), WorldOracleBackend(WORLD, 2)) as srv:
            for path in ("", "/", "/nope"):
                url = f"ws://127.0.0.1:{srv.port}{path}"
                with pytest.raises(ServerError, match="answered HTTP (200|404), not a websocket handshake") as info:
                    await StreamClient.connect(url, timeout=5)
                assert url in str(info.value) and "ws://HOST:PORT/ws" in str(info.value)
            async with await StreamClient.connect(srv.url, timeout=5) as client:  # the right path still works
                assert client.codec == "jpeg"

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("url, problem", [("http://127.0.0.1:8765/ws", "not a websocket URL"), ("ws//x", "not a websocket URL")])
def test_connect_to_a_bad_url_is_a_server_error(url: str, problem: str) -> None:
    with pytest.raises(ServerError, match=problem):
        asyncio.run(StreamClient.connect(url, timeout=5))


def test_connect_refused_is_a_server_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerError, match=f"cannot connect to ws://127.0.0.1:{port}/ws"):
        asyncio.run(StreamClient.connect(f"ws://127.0.0.1:{port}/ws", timeout=5))


def test_cli_client_on_the_wrong_path_prints_one_line(tmp_path, capsys) -> None:
    from streamkd.serve.backends import WorldOracleBackend
    from streamkd.serve.server import ServerConfig
    from tests.test_serve import server_thread

    with server_thread(ServerConfig(port=0), WorldOracleBackend(WORLD, 2)) as srv:
        url = f"ws://127.0.0.1:{srv.port}"
        code = main(["client", "--url", url, "--frames", "2", "--out", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error:")
    assert f"{url} answered HTTP 200" in err and "/ws" in err
    assert not (tmp_path / "out.mp4").exists()
