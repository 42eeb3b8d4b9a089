"""The websocket server: plain HTTP (``GET /`` browser client, ``GET /healthz``) and the
protocol v1 websocket (``/ws``) on one port, a thin layer over ``Engine`` sessions.

Per connection: the handshake checks Host and Origin; the first message must be a valid hello
(token, codecs, credit) within ``hello_timeout_s``; then a receive loop validates every control
message (rate-limited, idle timeout) and a sender task is the only writer to the socket: it
forwards events and, while the client has credit, frames from the session's bounded outbox,
encoded off the event loop. Nothing a client sends reaches a traceback: malformed messages get
an ``error`` reply, policy violations a documented close code (``protocol.CloseCode``), server
faults a generic message with details in the server log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamkd.data.toyworld import ACTIONS
from streamkd.serve.backends import StreamSpec
from streamkd.serve.engine import Engine, EngineConfig, EngineFull, Session
from streamkd.serve.media import FrameEncoder, decode_image, upscale
from streamkd.serve.protocol import (
    CODECS, MAX_CREDITS, VERSION, Action, CloseCode, Control, Credit, ErrorCode, FirstFrame, FrameFlags, FrameHeader, Hello,
    PromptSwitch, ProtocolError, Reset, Start, encode_frame_message, parse_client_message,
)

log = logging.getLogger("streamkd.serve")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """How ``streamkd serve`` listens and what it allows. Defaults are safe for a laptop."""

    host: str = "127.0.0.1"
    """Interface to bind. Anything but loopback needs ``token``."""
    port: int = 8765
    """TCP port (0: any free port, for tests)."""
    token: str | None = None
    """Shared secret clients send in hello; required when ``host`` is not loopback."""
    origins: tuple[str, ...] = ()
    """Extra browser origins allowed to open the websocket (the server's own origin always is)."""
    max_message_bytes: int = 64 * 1024
    """Largest client message; a bigger one closes the connection with 1009."""
    control_rate: float = 40.0
    """Sustained client messages per second (token bucket)."""
    control_burst: int = 80
    """Bucket size: messages accepted at once before rate limiting starts."""
    idle_timeout_s: float = 120.0
    """Close (4003) a connection that sent nothing for this long."""
    hello_timeout_s: float = 10.0
    """Close (4000) a connection whose first message is not a hello within this time."""
    jpeg_quality: int = 3
    """MJPEG quantiser, 2 (best) .. 31."""
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"refusing to bind {self.host}: that exposes the model to the network without authentication; "
                "pass --token T (clients send it in their hello) or bind 127.0.0.1"
            )
        if self.token is not None and len(self.token) < 8:
            raise ValueError("--token must be at least 8 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
        for origin in self.origins:
            if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise ValueError(f"origin {origin!r} must look like http://host:port (scheme, host, optional port, no path)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_message_bytes < 1024 or self.control_rate <= 0 or self.control_burst < 1 or self.idle_timeout_s <= 0:
            raise ValueError("max_message_bytes >= 1024, control_rate > 0, control_burst >= 1 and idle_timeout_s > 0 are required")


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _response(status: HTTPStatus, body: bytes, content_type: str, extra: list[tuple[str, str]] = ()) -> Response:
    headers = Headers([
        ("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"), *extra,
    ])
    return Response(status.value, status.phrase, headers, body)


def _text(status: HTTPStatus, text: str) -> Response:
    return _response(status, (text + "\n").encode(), "text/plain; charset=utf-8")


class StreamServer:
    """One process serving one backend. Use ``async with StreamServer(...) as server`` (tests,
    benchmarks) or ``serve_forever`` (the CLI, which adds SIGTERM handling)."""

    def __init__(self, cfg: ServerConfig, backend) -> None:
        self.cfg = cfg
        self.backend = backend
        self.engine: Engine | None = None
        self._server: Server | None = None
        self._encode_pool: ThreadPoolExecutor | None = None
        self.port = cfg.port

    # ------------------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> "StreamServer":
        self.engine = Engine(self.backend, self.cfg.engine)
        self._encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="streamkd-encode")
        self._server = await serve(
            self._handle, self.cfg.host, self.cfg.port, process_request=self._http,
            max_size=self.cfg.max_message_bytes, max_queue=16, ping_interval=20, ping_timeout=20,
            close_timeout=2, server_header=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection with 1001 (going away), then stop the worker."""
        if self._server is not None:
            self._server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="server shutting down")
            await self._server.wait_closed()
            self._server = None
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
            self.engine = None
        if self._encode_pool is not None:
            self._encode_pool.shutdown(wait=True)
            self._encode_pool = None

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"ws://{host}:{self.port}/ws"

    async def serve_forever(self, ready: bool = True) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with self:
            if ready:
                print(f"serving http://{self.url[5:-3]}/  (websocket {self.url}); Ctrl-C or SIGTERM stops", flush=True)
            await stop.wait()
            log.info("shutting down: closing %d session(s)", self.engine.num_sessions)

    # ------------------------------------------------------------------------------ plain HTTP
    def _allowed_hosts(self) -> set[str]:
        names = set(LOOPBACK_NAMES) | {self.cfg.host}
        return {f"{h}:{self.port}" for h in names} | (names if self.port == 80 else set())

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        host = request.headers.get("Host", "")
        # DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 reaches a loopback
        # server with a foreign Host; a loopback server only answers to its own names.
        if is_loopback(self.cfg.host) and host not in self._allowed_hosts():
            return _text(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host; use http://127.0.0.1:PORT/")
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            origin = request.headers.get("Origin")
            # non-browser clients send no Origin; browsers always do, and only our own page
            # (same origin) or an allow-listed one may drive a session
            if origin is not None and origin != f"http://{host}" and origin not in self.cfg.origins:
                return _text(HTTPStatus.FORBIDDEN, "origin not allowed; start the server with --origins ORIGIN to allow it")
            return None  # continue with the websocket handshake
        if path == "/healthz":
            health = self.engine.health()
            status = HTTPStatus.OK if health["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
            return _response(status, json.dumps(health).encode(), "application/json")
        if path in STATIC:
            name, content_type = STATIC[path]
            body = resources.files("streamkd.serve").joinpath("static", name).read_bytes()
            csp = f"default-src 'self'; connect-src 'self' ws://{host}; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'"
            return _response(HTTPStatus.OK, body, content_type, [("Content-Security-Policy", csp)])
        return _text(HTTPStatus.NOT_FOUND, "not found; the client is at / and the websocket at /ws")

    # ------------------------------------------------------------------------------ websocket
    async def _handle(self, ws: ServerConnection) -> None:
        await _Connection(self, ws).run()


class _Connection:
    def __init__(self, server: StreamServer, ws: ServerConnection) -> None:
        self.server, self.cfg, self.ws = server, server.cfg, ws
        self.engine: Engine = server.engine
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.session: Session | None = None
        self.codec = "jpeg"
        self.credits = 0
        self.bucket = TokenBucket(self.cfg.control_rate, self.cfg.control_burst)
        self.limited = 0
        self.spec: StreamSpec | None = None
        self.fps = 16.0
        self.scale = 1
        self.epoch = 0
        self.encoder: FrameEncoder | None = None
        self.encoder_epoch = -1
        self.frames_sent = 0
        self.bytes_sent = 0

    async def run(self) -> None:
        sender = None
        try:
            if not await self._hello():
                return
            try:
                self.session = self.engine.open_session(lambda: self.loop.call_soon_threadsafe(self.wake.set))
            except EngineFull as e:
                await self.ws.close(CloseCode.TRY_AGAIN_LATER, str(e))
                return
            await self.ws.send(json.dumps(self._welcome()))
            sender = asyncio.create_task(self._send_loop())
            receiver = asyncio.create_task(self._receive_loop())
            await asyncio.wait([sender, receiver], return_when=asyncio.FIRST_COMPLETED)
            if receiver.done() and not receiver.cancelled() and receiver.exception() is None:
                # the receiver asked for a close: the sender flushes pending replies, then closes
                await asyncio.wait([sender], timeout=2.0)
            for task in (sender, receiver):
                task.cancel()
            for task in (sender, receiver):
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
        except ConnectionClosed:
            pass
        finally:
            if self.session is not None:
                self.engine.close_session(self.session)

    # -------------------------------------------------------------------------------- hello
    async def _hello(self) -> bool:
        try:
            async with asyncio.timeout(self.cfg.hello_timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            await self.ws.close(CloseCode.PROTOCOL_ERROR, "no hello received in time")
            return False
        try:
            hello = parse_client_message(raw)
        except ProtocolError as e:
            await self.ws.close(CloseCode.PROTOCOL_ERROR, f"first message must be a valid hello: {e}"[:120])
            return False
        if not isinstance(hello, Hello):
            await self.ws.close(CloseCode.PROTOCOL_ERROR, 'first message must be {"type": "hello", ...}')
            return False
        if hello.version != VERSION:
            await self.ws.close(CloseCode.UNSUPPORTED_VERSION, f"this server speaks protocol version {VERSION}")
            return False
        if self.cfg.token is not None and not hmac.compare_digest((hello.token or "").encode(), self.cfg.token.encode()):
            await self.ws.close(CloseCode.UNAUTHORIZED, "missing or wrong token")
            return False
        codec = next((c for c in hello.codecs if c in CODECS), None)
        if codec is None:
            await self.ws.close(CloseCode.PROTOCOL_ERROR, f"no supported codec offered; this server has {', '.join(CODECS)}")
            return False
        self.codec, self.credits = codec, hello.credits
        return True

    def _welcome(self) -> dict:
        size = self.server.backend.frame_size
        return {
            "type": "welcome", "version": VERSION, "session": self.session.id, "codec": self.codec,
            "credits": self.credits,
            "model": {"frame_size": [size, size], "chunk_frames": self.engine.chunk_frames, "actions": list(ACTIONS)},
            "limits": {"max_message_bytes": self.cfg.max_message_bytes, "control_rate": self.cfg.control_rate,
                       "control_burst": self.cfg.control_burst, "idle_timeout_s": self.cfg.idle_timeout_s,
                       "max_credits": MAX_CREDITS, "max_scale": 8},
        }

    # ------------------------------------------------------------------------------ receiving
    async def _receive_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.cfg.idle_timeout_s):
                    raw = await self.ws.recv()
            except TimeoutError:
                self._close(CloseCode.IDLE_TIMEOUT, f"no message for {self.cfg.idle_timeout_s:g} s")
                return
            if not self.bucket.take():
                self.limited += 1
                if self.limited == 1:
                    self._event_error(ErrorCode.RATE_LIMITED, f"more than {self.cfg.control_rate:g} messages/s; "
                                      "messages are dropped until the rate falls", True)
                if self.limited > self.cfg.control_burst:
                    self._close(CloseCode.RATE_LIMIT, "kept sending while rate-limited")
                    return
                continue
            self.limited = 0
            try:
                self._dispatch(parse_client_message(raw))
            except ProtocolError as e:
                self._event_error(e.code, str(e), e.retry)

    def _close(self, code: CloseCode, reason: str) -> None:
        """Close after the replies already queued (the sender is the only writer)."""
        self.session.outbox.put_event({"close": (code, reason)})

    def _event_error(self, code: str, message: str, retry: bool) -> None:
        self.session.outbox.put_event({"type": "error", "code": code, "message": message, "retry": retry, "ref": None})

    def _need_started(self, what: str) -> None:
        if self.spec is None:
            raise ProtocolError(ErrorCode.NOT_STARTED, f"{what} needs a running stream; send start first")

    def _dispatch(self, msg) -> None:
        s, engine = self.session, self.engine
        if isinstance(msg, Hello):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already accepted on this connection")
        if isinstance(msg, Credit):
            self.credits = min(MAX_CREDITS, self.credits + msg.frames)
            self.wake.set()
        elif isinstance(msg, Action):
            engine.set_action(s, msg.seq, msg.action)
        elif isinstance(msg, Start):
            if self.spec is not None:
                raise ProtocolError(ErrorCode.ALREADY_STARTED, "a stream is running; send reset to restart it or stop first")
            self._start(msg.prompt, msg.seed, msg.first_frame, msg.size, msg.fps)
        elif isinstance(msg, Reset):
            self._need_started("reset")
            c = msg.changes
            self._start(c.get("prompt", self.spec.prompt), c.get("seed", self.spec.seed),
                        c.get("first_frame", self.spec.first_frame), c.get("size", self._size()), c.get("fps", self.fps))
        elif isinstance(msg, PromptSwitch):
            self._need_started("prompt")
            engine.set_prompt(s, msg.prompt)
            self.spec = StreamSpec(msg.prompt, self.spec.seed, self.spec.first_frame)
        elif isinstance(msg, Control):
            if msg.kind == "stats":
                self._stats()
                return
            self._need_started(msg.kind)
            if msg.kind == "stop":
                engine.stop(s)
                self.spec = None
                s.outbox.put_event({"type": "stopped"})
            else:
                engine.set_paused(s, msg.kind == "pause")
                s.outbox.put_event({"type": "paused" if msg.kind == "pause" else "resumed"})

    def _size(self) -> tuple[int, int]:
        size = self.server.backend.frame_size * self.scale
        return size, size

    def _start(self, prompt: str, seed: int, first_frame, size, fps: float) -> None:
        native = self.server.backend.frame_size
        scale = 1
        if size is not None:
            scale = size[0] // native
            if size[0] != size[1] or size[0] % native or not 1 <= scale <= 8:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"size must be [{native}, {native}] or an integer multiple up to 8x, got {list(size)}")
        if isinstance(first_frame, FirstFrame):
            try:
                first_frame = decode_image(first_frame.format, first_frame.data, native, native)
            except ValueError as e:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start.first_frame: {e}") from None
        self.spec = StreamSpec(prompt, seed, first_frame)
        self.fps, self.scale = fps, scale
        self.epoch = self.engine.start(self.session, self.spec, fps)

    def _stats(self) -> None:
        stats = self.engine.stats(self.session)
        stats.update(type="stats", frames_sent=self.frames_sent, bytes_sent=self.bytes_sent, credits=self.credits, codec=self.codec)
        self.session.outbox.put_event(stats)

    # -------------------------------------------------------------------------------- sending
    async def _send_loop(self) -> None:
        outbox = self.session.outbox
        while True:
            await self.wake.wait()
            self.wake.clear()
            while True:
                event = outbox.pop_event()
                if event is not None:
                    close = event.pop("close", None)
                    if "type" in event:
                        await self.ws.send(json.dumps(event))
                    if close is not None:
                        await self.ws.close(*close)
                        return
                    continue
                if self.credits <= 0:
                    break
                frame = outbox.pop_frame()
                if frame is None:
                    break
                if frame.epoch != self.epoch:
                    continue  # a frame of a stopped or restarted stream
                await self._send_frame(frame)

    async def _send_frame(self, frame) -> None:
        if self.encoder is None or self.encoder_epoch != frame.epoch:
            size = self._size()
            self.encoder = FrameEncoder(self.codec, size[0], size[1], self.fps, self.cfg.jpeg_quality)
            self.encoder_epoch = frame.epoch
        image = upscale(frame.image, self.scale)
        payload, key = await self.loop.run_in_executor(self.server._encode_pool, self.encoder.encode, image)
        flags = frame.flags | (FrameFlags.KEYFRAME if key else 0) | (FrameFlags.DROPPED if frame.dropped else 0)
        header = FrameHeader(frame.epoch, frame.frame_seq, frame.chunk_seq, frame.action_seq, frame.pts_us,
                             flags, self.codec, frame.dropped)
        message = encode_frame_message(header, payload)
        self.credits -= 1
        await self.ws.send(message)
        self.frames_sent += 1
        self.bytes_sent += len(message)


def build_backend(checkpoint: str, oracle: bool, max_batch: int):
    """The model backend for a checkpoint (refusing bidirectional ones), or the world oracle."""
    from streamkd.serve.backends import ModelBackend, WorldOracleBackend

    if oracle:
        from streamkd.data.toyworld import ToyWorldConfig

        return WorldOracleBackend(ToyWorldConfig())
    from streamkd.models.world import WorldModel

    return ModelBackend(WorldModel.load(checkpoint), max_batch=max_batch)


def run(cfg: ServerConfig, checkpoint: str, oracle: bool = False) -> None:
    """``streamkd serve``: load, listen, serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = build_backend(checkpoint, oracle, cfg.engine.max_batch)
    asyncio.run(StreamServer(cfg, backend).serve_forever())
