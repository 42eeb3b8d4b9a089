"""Protocol v1 of the streaming server: message schemas, the binary frame header, error and
close codes. Pure functions and dataclasses, no I/O -- server, Python client and tests share it;
``docs/protocol.md`` is the prose version and the browser client (``static/app.js``) mirrors it.

Client -> server: JSON text messages only (``parse_client_message``). Server -> client: JSON
text (welcome, started, errors, stats, ...) and binary frame messages, a fixed 36-byte
little-endian header (``FrameHeader``) followed by one encoded image.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

from streamkd.data.toyworld import ACTIONS

VERSION = 1
MAGIC = b"SKDF"
CODECS = ("jpeg", "h264")
"""Codec names, in the server's order of preference; the id in the header is index + 1."""


# ------------------------------------------------------------------------------- frame header
class FrameFlags(IntFlag):
    KEYFRAME = 1
    """The payload decodes on its own (every JPEG; the first H.264 frame and each IDR)."""
    DROPPED = 2
    """Frames of this epoch were dropped since the previous frame message (``dropped`` says how
    many): the client had no credit, or read too slowly, and the server kept the newest frames."""
    CHUNK_START = 4
    """First frame of a generated chunk (actions and prompts change only here)."""
    EPOCH_START = 8
    """First frame after start/reset: frames of older epochs must be discarded."""
    PROMPT_CHANGED = 16
    """First frame generated under a prompt from a ``prompt`` message."""


_HEADER = struct.Struct("<4sBBBBIIIIQI")
HEADER_SIZE = _HEADER.size  # 36


class HeaderError(ValueError):
    """A binary message is not a v1 frame message."""


@dataclass(frozen=True)
class FrameHeader:
    """The fixed header of a binary frame message (all integers little-endian).

    offset size field
    0      4    magic ``b"SKDF"``
    4      1    version (1)
    5      1    flags (``FrameFlags``)
    6      1    codec id (1 jpeg, 2 h264)
    7      1    header length in bytes (36); a later version may append fields, a v1 reader skips them
    8      4    epoch: +1 on every start/reset of the session
    12     4    frame_seq: frame index within the epoch (gaps = dropped frames)
    16     4    chunk_seq: chunk index within the epoch
    20     4    action_seq: ``seq`` of the last action message applied to this frame (0: none yet)
    24     8    pts_us: presentation time in microseconds, frame_seq / fps on the epoch's timeline
    32     4    dropped: frames dropped right before this one
    """

    epoch: int
    frame_seq: int
    chunk_seq: int
    action_seq: int
    pts_us: int
    flags: FrameFlags = FrameFlags(0)
    codec: str = "jpeg"
    dropped: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, int(self.flags), CODECS.index(self.codec) + 1, HEADER_SIZE, self.epoch,
                            self.frame_seq, self.chunk_seq, self.action_seq, self.pts_us, self.dropped)


def encode_frame_message(header: FrameHeader, payload: bytes) -> bytes:
    return header.pack() + payload


def decode_frame_message(data: bytes) -> tuple[FrameHeader, bytes]:
    """Split a binary frame message into its header and the encoded image."""
    if len(data) < HEADER_SIZE:
        raise HeaderError(f"frame message of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, codec, size, epoch, frame_seq, chunk_seq, action_seq, pts, dropped = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HeaderError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise HeaderError(f"frame header version {version}, this reader understands {VERSION}")
    if not 1 <= codec <= len(CODECS) or not HEADER_SIZE <= size <= len(data):
        raise HeaderError(f"bad codec id {codec} or header length {size}")
    header = FrameHeader(epoch, frame_seq, chunk_seq, action_seq, pts, FrameFlags(flags), CODECS[codec - 1], dropped)
    return header, data[size:]


# ---------------------------------------------------------------------------------- codes
class ErrorCode:
    """``code`` of an error message. ``retry`` in the message says whether sending again (later,
    or corrected) can succeed."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    UNEXPECTED_BINARY = "unexpected_binary"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """Close codes the server uses (1xxx: RFC 6455; 4xxx: this protocol)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server shuts down (SIGTERM); reconnecting later can work
    MESSAGE_TOO_BIG = 1009  # a message over the size limit (the limit is in ``welcome``)
    INTERNAL_ERROR = 1011  # the generator failed for this session; details are in the server log only
    TRY_AGAIN_LATER = 1013  # all session slots are taken
    PROTOCOL_ERROR = 4000  # the first message was not a valid hello, or it did not come in time
    UNAUTHORIZED = 4001  # missing or wrong token
    UNSUPPORTED_VERSION = 4002  # hello asked for a protocol version this server does not speak
    IDLE_TIMEOUT = 4003  # no message from the client for ``idle_timeout_s``
    RATE_LIMIT = 4008  # kept sending while rate-limited, or over the incoming frame/byte budget
    SLOW_CLIENT = 4009  # did not read: a send, ping or close waited past its deadline, or unsent data over the limit


class ProtocolError(ValueError):
    """A client message that cannot be accepted; becomes an ``error`` reply."""

    def __init__(self, code: str, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retry = retry


# ------------------------------------------------------------------------- client messages
@dataclass(frozen=True)
class Hello:
    version: int = VERSION
    token: str | None = None
    codecs: tuple[str, ...] = ("jpeg",)
    """Accepted codecs, preferred first; the server picks the first it supports."""
    credits: int = 8
    """Initial credit: frames the server may send before the client grants more."""


@dataclass(frozen=True)
class FirstFrame:
    """An image-to-video condition sent by the client (decoded by the server)."""

    format: str  # "jpeg" | "png" | "rgb24"
    data: bytes


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int = 0
    first_frame: FirstFrame | str | None = "world"
    """"world": the toy world's frame 0 for (seed, prompt); None: text-to-video; or an image."""
    size: tuple[int, int] | None = None
    """Output (height, width): the model's size or an integer multiple (nearest-neighbour)."""
    fps: float = 16.0


@dataclass(frozen=True)
class Action:
    seq: int
    action: int  # id into the model's action names (``welcome.model.actions``)


@dataclass(frozen=True)
class PromptSwitch:
    prompt: str


@dataclass(frozen=True)
class Credit:
    frames: int


@dataclass(frozen=True)
class Control:
    """pause / resume / stop / stats: no fields."""

    kind: str


@dataclass(frozen=True)
class Reset:
    """Restart the stream (new epoch); each field left out keeps the current one."""

    changes: dict[str, Any] = field(default_factory=dict)


ClientMessage = Hello | Start | Action | PromptSwitch | Credit | Control | Reset

MAX_CREDITS = 64
MAX_FPS = 240.0
MAX_SEED = 2**63 - 1
MAX_SEQ = 2**32 - 1


def _fields(msg: dict, allowed: set[str], kind: str) -> None:
    extra = set(msg) - allowed - {"type"}
    if extra:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: unknown field(s) {sorted(extra)[:5]}; allowed: {sorted(allowed)}")


def _int(msg: dict, key: str, kind: str, lo: int, hi: int, default: int | None = None) -> int:
    value = msg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}.{key} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


MAX_PROMPT_CHARS = 2000
"""Longest prompt a message may carry; what the model accepts within it (the toy world's
grammar, a text encoder's token limit) the server checks with its backend (``check_prompt``)."""


def _prompt(value: Any, kind: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PROMPT_CHARS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}.prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): no text encoder can read it
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}.prompt is not valid Unicode text (lone surrogate)") from None
    return value.strip()


def _first_frame(value: Any) -> FirstFrame | str | None:
    if value is None or value == "world":
        return value
    if not isinstance(value, dict) or set(value) != {"format", "data"}:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, 'start.first_frame must be "world", null or {"format": "jpeg"|"png"|"rgb24", "data": base64}')
    if value["format"] not in ("jpeg", "png", "rgb24") or not isinstance(value["data"], str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, 'start.first_frame.format must be "jpeg", "png" or "rgb24" and data a base64 string')
    try:
        data = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.first_frame.data is not valid base64") from None
    return FirstFrame(value["format"], data)


def _start_fields(msg: dict, kind: str, partial: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "prompt" in msg or not partial:
        if "prompt" not in msg:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, 'start needs a prompt, e.g. "forest with red squares"')
        out["prompt"] = _prompt(msg["prompt"], kind)
    if "seed" in msg:
        out["seed"] = _int(msg, "seed", kind, 0, MAX_SEED)
    if "first_frame" in msg:
        out["first_frame"] = _first_frame(msg["first_frame"])
    if msg.get("size") is not None:
        size = msg["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}.size must be [height, width] in pixels, got {_short(size)}")
        out["size"] = (size[0], size[1])
    if "fps" in msg:
        fps = msg["fps"]
        # the comparison refuses inf and nan (1e400 parses to inf) and is exact for ints of any
        # size, where math.isfinite(10**400) would raise OverflowError
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps <= MAX_FPS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}.fps must be a number in (0, {MAX_FPS:g}], got {_short(fps)}")
        out["fps"] = float(fps)
    return out


def parse_client_message(text: str | bytes, actions: Sequence[str] = ACTIONS) -> ClientMessage:
    """Validate one client message; raises ``ProtocolError`` naming the problem and the fix.
    ``actions``: the served model's action names (``welcome.model.actions``; index = id)."""
    if isinstance(text, bytes):
        raise ProtocolError(ErrorCode.UNEXPECTED_BINARY, "clients send JSON text messages only; binary messages are not part of protocol v1")
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"message is not valid JSON: {e}") from None
    except ValueError:  # json.loads refuses integer literals longer than the interpreter's digit limit
        limit = sys.get_int_max_str_digits()
        raise ProtocolError(ErrorCode.BAD_JSON, f"message is not valid JSON: integers may have at most {limit} digits") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "message is not valid JSON: nested too deeply") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, 'a message is a JSON object with a string "type", e.g. {"type": "stats"}')
    kind = msg["type"]
    if kind == "hello":
        _fields(msg, {"version", "token", "codecs", "credits"}, kind)
        token = msg.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > 256):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello.token must be a string of at most 256 characters")
        codecs = msg.get("codecs", ["jpeg"])
        if not isinstance(codecs, list) or not 1 <= len(codecs) <= 8 or not all(isinstance(c, str) for c in codecs):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f'hello.codecs must be a list of codec names from {list(CODECS)}, e.g. ["jpeg"]')
        return Hello(_int(msg, "version", kind, 0, 2**31, VERSION), token, tuple(codecs), _int(msg, "credits", kind, 1, MAX_CREDITS, 8))
    if kind == "start":
        _fields(msg, {"prompt", "seed", "first_frame", "size", "fps"}, kind)
        return Start(**_start_fields(msg, kind, partial=False))
    if kind == "reset":
        _fields(msg, {"prompt", "seed", "first_frame", "size", "fps"}, kind)
        return Reset(_start_fields(msg, kind, partial=True))
    if kind == "action":
        _fields(msg, {"seq", "action"}, kind)
        name = msg.get("action")
        if not actions:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this model takes no actions (welcome.model.actions is empty); "
                                "steer it with prompts")
        if name not in actions:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"action.action must be one of {list(actions)}, got {_short(name)}")
        return Action(_int(msg, "seq", kind, 1, MAX_SEQ), list(actions).index(name))
    if kind == "prompt":
        _fields(msg, {"prompt"}, kind)
        return PromptSwitch(_prompt(msg.get("prompt"), kind))
    if kind == "credit":
        _fields(msg, {"frames"}, kind)
        return Credit(_int(msg, "frames", kind, 1, MAX_CREDITS))
    if kind in ("pause", "resume", "stop", "stats"):
        _fields(msg, set(), kind)
        return Control(kind)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {_short(kind)}; known: hello start action prompt credit pause resume reset stop stats")
