"""The websocket server: plain HTTP (``GET /`` browser client, ``GET /healthz``) and the
protocol v1 websocket (``/ws``) on one port, a thin layer over ``Engine`` sessions.

Per connection: the handshake checks Host and Origin; the first message must be a valid hello
(token, codecs, credit) within ``hello_timeout_s``; then three tasks run until one of them asks
for a close: a receiver that validates every control message (rate-limited, idle timeout), a
sender that is the only writer of messages (events and, while the client has credit, frames
from the session's bounded outbox, encoded off the event loop) and a keepalive (ping / pong).

What a hostile client cannot do (``docs/protocol.md`` lists the close codes):
* hold the server: every wait on the socket (send, ping, close, the closing handshake) has a
  deadline (``send_timeout_s``) after which the transport is aborted, and a client that keeps
  the server's unsent bytes over ``max_write_buffer_bytes`` (pongs it never reads included) is
  cut off at once; shutdown aborts whatever did not close within ``shutdown_timeout_s``;
* flood it: every incoming websocket frame -- pings, pongs and fragments included -- and every
  byte is charged to a per-connection budget before the library processes it; messages have a
  rate (``control_rate``), and start/reset/prompt, which cost model work, a stricter one;
* make it decode a bomb: an uploaded image's size is read from its PNG/JPEG header and refused
  unless it is the model's size, and decoding runs off the event loop;
* reach another session: generation state belongs to the engine's worker (``engine.py``).
Nothing a client sends reaches a traceback: malformed messages get an ``error`` reply, policy
violations a documented close code, server faults a generic message with details in the log.
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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from importlib import resources

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.protocol import State

from streamkd.serve.backends import StreamSpec
from streamkd.serve.engine import Engine, EngineConfig, EngineFull, SessionHandle
from streamkd.serve.media import FrameEncoder, decode_image, image_size, upscale
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
    """Sustained client messages per second (token bucket); messages over it are dropped."""
    control_burst: int = 80
    """Bucket size: messages accepted at once before rate limiting starts."""
    heavy_rate: float = 2.0
    """Sustained start / reset / prompt messages per second (each costs model work); over it they
    are refused with ``rate_limited``."""
    heavy_burst: int = 6
    """Bucket size of ``heavy_rate``."""
    flood_window_s: float = 5.0
    """Close 4008 when, over this window, more than half of a client's messages were dropped by
    the rate limit (and at least ``control_burst`` of them)."""
    frame_rate: float = 200.0
    """Sustained incoming websocket frames per second of any kind (pings, pongs, fragments,
    messages); over it the connection is closed with 4008 before the frames are processed."""
    frame_burst: int = 400
    """Bucket size of ``frame_rate``."""
    byte_rate: float = 256 * 1024
    """Sustained incoming bytes per second (any frame); over it: close 4008."""
    byte_burst: int = 1024 * 1024
    """Bucket size of ``byte_rate``; at least two ``max_message_bytes``."""
    max_write_buffer_bytes: int = 4 * 1024 * 1024
    """Unsent bytes the server keeps for one client; a client that pushes it over this (e.g. by
    pinging and never reading the pongs) is cut off at once (4009)."""
    send_timeout_s: float = 10.0
    """Deadline of every wait on the socket (a send or ping that waits for the client to read, a
    close); when it expires the connection is aborted (4009)."""
    ping_interval_s: float = 20.0
    """Keepalive ping period."""
    ping_timeout_s: float = 20.0
    """A pong must come back within this; otherwise the connection is aborted (4009)."""
    idle_timeout_s: float = 120.0
    """Close (4003) a connection that sent nothing for this long."""
    hello_timeout_s: float = 10.0
    """Close (4000) a connection whose first message is not a hello within this time."""
    shutdown_timeout_s: float = 5.0
    """On SIGTERM, connections that did not finish their closing handshake in this time are
    aborted; a second SIGTERM aborts them at once."""
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
        if self.heavy_rate <= 0 or self.heavy_burst < 1 or self.flood_window_s <= 0:
            raise ValueError("heavy_rate > 0, heavy_burst >= 1 and flood_window_s > 0 are required")
        if self.frame_rate < self.control_rate or self.frame_burst < self.control_burst:
            raise ValueError("frame_rate/frame_burst count every incoming frame, messages included: they must be "
                             f">= control_rate/control_burst ({self.control_rate:g}/{self.control_burst})")
        if self.byte_rate <= 0 or self.byte_burst < 2 * self.max_message_bytes:
            raise ValueError(f"byte_rate > 0 and byte_burst >= 2 * max_message_bytes ({2 * self.max_message_bytes}) are required")
        if self.max_write_buffer_bytes < 64 * 1024:
            raise ValueError("max_write_buffer_bytes must be >= 65536 (one frame message must fit)")
        for name in ("send_timeout_s", "ping_interval_s", "ping_timeout_s", "hello_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, amount: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class FloodWindow:
    """Accepted and dropped messages over the last ``seconds``: the flood policy closes a client
    when more than half of its recent messages were dropped and at least ``min_dropped``."""

    def __init__(self, seconds: float, min_dropped: int) -> None:
        self.seconds, self.min_dropped = seconds, min_dropped
        self._events: deque[tuple[float, bool]] = deque()
        self.dropped = 0

    def record(self, dropped: bool) -> bool:
        """Count one message; True when the policy says close."""
        now = time.monotonic()
        self._events.append((now, dropped))
        self.dropped += dropped
        while self._events[0][0] < now - self.seconds:
            self.dropped -= self._events.popleft()[1]
        return self.dropped >= self.min_dropped and 2 * self.dropped > len(self._events)


class GuardedConnection(ServerConnection):
    """A ``ServerConnection`` that charges every incoming frame and byte to a budget *before* the
    library handles it (the library answers pings by itself, so they never reach the handler),
    and that cuts off a client whose unsent bytes grow past ``max_write_buffer_bytes``."""

    def __init__(self, *args, limits: ServerConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.frame_budget = TokenBucket(limits.frame_rate, limits.frame_burst)
        self.byte_budget = TokenBucket(limits.byte_rate, limits.byte_burst)
        self.violation: tuple[int, str] | None = None

    def data_received(self, data: bytes) -> None:
        if self.violation is not None:
            return  # being cut off: nothing more is processed
        if not self.byte_budget.take(len(data)):
            self.cut_off(CloseCode.RATE_LIMIT, f"sent more than {self.limits.byte_rate:g} bytes/s")
            return
        super().data_received(data)
        if self.violation is None and self.transport.get_write_buffer_size() > self.limits.max_write_buffer_bytes:
            self.cut_off(CloseCode.SLOW_CLIENT, "does not read: unsent data over the limit")

    def process_event(self, event) -> None:
        if self.violation is not None:
            return
        if isinstance(event, Frame) and not self.frame_budget.take():
            self.cut_off(CloseCode.RATE_LIMIT, f"sent more than {self.limits.frame_rate:g} websocket frames/s")
            return
        super().process_event(event)

    def cut_off(self, code: int, reason: str, grace_s: float = 1.0) -> None:
        """Stop reading, queue a close frame and abort the transport after ``grace_s`` (at once
        when the client is not reading: the frame could not reach it)."""
        if self.violation is not None:
            return
        self.violation = (code, reason)
        log.warning("connection %s cut off (%d): %s", self.id, code, reason)
        self.transport.pause_reading()
        reading = self.transport.get_write_buffer_size() <= self.limits.max_write_buffer_bytes // 2
        if reading and self.protocol.state is State.OPEN:
            self.protocol.fail(code, reason)
            with contextlib.suppress(Exception):
                self.send_data()
            self.loop.call_later(grace_s, self.transport.abort)
        else:
            self.transport.abort()


class _Stalled(Exception):
    """A socket wait passed its deadline: the client is not reading."""


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
        self._connections: set[ServerConnection] = set()
        self.port = cfg.port

    # ------------------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> "StreamServer":
        self.engine = Engine(self.backend, self.cfg.engine)
        self._encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="streamkd-encode")
        self._server = await serve(
            self._handle, self.cfg.host, self.cfg.port, process_request=self._http,
            create_connection=partial(GuardedConnection, limits=self.cfg),
            max_size=self.cfg.max_message_bytes, max_queue=16, ping_interval=None, ping_timeout=None,
            close_timeout=min(2.0, self.cfg.send_timeout_s), open_timeout=self.cfg.hello_timeout_s, server_header=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self, force: asyncio.Event | None = None) -> None:
        """Close every connection with 1001 (going away), abort those that do not finish within
        ``shutdown_timeout_s`` (or as soon as ``force`` is set), then stop the worker."""
        if self._server is not None:
            self._server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="server shutting down")
            closed = asyncio.ensure_future(self._server.wait_closed())
            waits = [closed] + ([asyncio.ensure_future(force.wait())] if force is not None else [])
            await asyncio.wait(waits, timeout=self.cfg.shutdown_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not closed.done():
                log.warning("aborting %d connection(s) that did not close in time", len(self._connections))
                for ws in list(self._connections):
                    ws.transport.abort()
                await asyncio.wait([closed], timeout=self.cfg.shutdown_timeout_s)
            for w in waits:
                w.cancel()
            self._server = None
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, self.cfg.shutdown_timeout_s)
            self.engine = None
        if self._encode_pool is not None:
            self._encode_pool.shutdown(wait=False, cancel_futures=True)
            self._encode_pool = None

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"ws://{host}:{self.port}/ws"

    async def serve_forever(self, ready: bool = True) -> None:
        """Serve until SIGTERM or SIGINT, then shut down within ``shutdown_timeout_s`` (a second
        signal aborts the remaining connections at once)."""
        stop, force = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            (force if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await self.__aenter__()
        try:
            if ready:
                print(f"serving http://{self.url[5:-3]}/  (websocket {self.url}); Ctrl-C or SIGTERM stops", flush=True)
            await stop.wait()
            log.info("shutting down: closing %d session(s)", self.engine.num_sessions)
        finally:
            await self.close(force)

    # ------------------------------------------------------------------------------ plain HTTP
    def _allowed_hosts(self) -> set[str]:
        names = set(LOOPBACK_NAMES) | {self.cfg.host}
        return {f"{h}:{self.port}" for h in names} | (names if self.port == 80 else set())

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        hosts, origins = request.headers.get_all("Host"), request.headers.get_all("Origin")
        if len(hosts) != 1 or len(origins) > 1:
            return _text(HTTPStatus.BAD_REQUEST, "a request has exactly one Host header and at most one Origin header")
        host = hosts[0]
        # DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 reaches a loopback
        # server with a foreign Host; a loopback server only answers to its own names.
        if is_loopback(self.cfg.host) and host not in self._allowed_hosts():
            return _text(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host; use http://127.0.0.1:PORT/")
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            origin = origins[0] if origins else None
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
        self._connections.add(ws)
        try:
            await _Connection(self, ws).run()
        finally:
            self._connections.discard(ws)


HEAVY = (Start, Reset, PromptSwitch)
"""Messages that cost model work (a stream start, a KV re-cache): rate-limited more strictly."""


class _Connection:
    def __init__(self, server: StreamServer, ws: ServerConnection) -> None:
        self.server, self.cfg, self.ws = server, server.cfg, ws
        self.engine: Engine = server.engine
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.session: SessionHandle | None = None
        self.codec = "jpeg"
        self.credits = 0
        self.bucket = TokenBucket(self.cfg.control_rate, self.cfg.control_burst)
        self.heavy = TokenBucket(self.cfg.heavy_rate, self.cfg.heavy_burst)
        self.flood = FloodWindow(self.cfg.flood_window_s, self.cfg.control_burst)
        self.spec: StreamSpec | None = None
        self.fps = 16.0
        self.scale = 1
        self.encoder: FrameEncoder | None = None
        self.encoder_epoch = -1
        self.frames_sent = 0
        self.bytes_sent = 0

    async def _bounded(self, awaitable, what: str):
        """Await one socket operation under ``send_timeout_s``; past it the client counts as not
        reading (``_Stalled``)."""
        try:
            async with asyncio.timeout(self.cfg.send_timeout_s):
                return await awaitable
        except TimeoutError:
            raise _Stalled(what) from None

    async def _close(self, code: int, reason: str) -> None:
        """Closing handshake under a deadline; abort the transport when it does not complete."""
        if self.ws.state is State.CLOSED:
            return
        try:
            await self._bounded(self.ws.close(code, reason), "close")
        except _Stalled:
            self.ws.transport.abort()

    def _abort(self, code: int, reason: str) -> None:
        log.warning("connection %s aborted (%d): %s", self.ws.id, code, reason)
        self.ws.transport.abort()

    async def run(self) -> None:
        tasks: list[asyncio.Task] = []
        try:
            if not await self._hello():
                return
            try:
                self.session = self.engine.open_session(lambda: self.loop.call_soon_threadsafe(self.wake.set))
            except EngineFull as e:
                await self._close(CloseCode.TRY_AGAIN_LATER, str(e))
                return
            await self._bounded(self.ws.send(json.dumps(self._welcome())), "welcome")
            sender = asyncio.create_task(self._send_loop())
            receiver = asyncio.create_task(self._receive_loop())
            keepalive = asyncio.create_task(self._keepalive())
            tasks = [sender, receiver, keepalive]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            close = None
            for task in (receiver, keepalive):
                if task in done and task.exception() is None:
                    close = close or task.result()
            if close is not None and receiver in done:
                # the receiver asked for a close: the sender sends the replies queued before it, then closes
                self.session.outbox.put_event({"close": close})
                await asyncio.wait([sender], timeout=self.cfg.send_timeout_s)
            for task in tasks:
                task.cancel()
            stalled = False
            for task in tasks:
                try:
                    await task
                except _Stalled as e:
                    stalled = True
                    self._abort(CloseCode.SLOW_CLIENT, f"{e} did not complete in {self.cfg.send_timeout_s:g} s")
                except (asyncio.CancelledError, ConnectionClosed):
                    pass
            if not stalled and close is not None:
                await self._close(*close)
        except ConnectionClosed:
            pass
        except _Stalled as e:
            self._abort(CloseCode.SLOW_CLIENT, f"{e} did not complete in {self.cfg.send_timeout_s:g} s")
        finally:
            for task in tasks:
                task.cancel()
            if self.session is not None:
                self.engine.close_session(self.session)

    # -------------------------------------------------------------------------------- hello
    async def _hello(self) -> bool:
        try:
            async with asyncio.timeout(self.cfg.hello_timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            await self._close(CloseCode.PROTOCOL_ERROR, "no hello received in time")
            return False
        try:
            hello = parse_client_message(raw)
        except ProtocolError as e:
            await self._close(CloseCode.PROTOCOL_ERROR, f"first message must be a valid hello: {e}"[:120])
            return False
        if not isinstance(hello, Hello):
            await self._close(CloseCode.PROTOCOL_ERROR, 'first message must be {"type": "hello", ...}')
            return False
        if hello.version != VERSION:
            await self._close(CloseCode.UNSUPPORTED_VERSION, f"this server speaks protocol version {VERSION}")
            return False
        if self.cfg.token is not None and not hmac.compare_digest((hello.token or "").encode(), self.cfg.token.encode()):
            await self._close(CloseCode.UNAUTHORIZED, "missing or wrong token")
            return False
        codec = next((c for c in hello.codecs if c in CODECS), None)
        if codec is None:
            await self._close(CloseCode.PROTOCOL_ERROR, f"no supported codec offered; this server has {', '.join(CODECS)}")
            return False
        self.codec, self.credits = codec, hello.credits
        return True

    def _welcome(self) -> dict:
        size_hw = list(self.server.backend.frame_hw)
        cfg = self.cfg
        return {
            "type": "welcome", "version": VERSION, "session": self.session.id, "codec": self.codec,
            "credits": self.credits,
            "model": {"frame_size": size_hw, "chunk_frames": self.engine.chunk_frames, "actions": self.server.backend.actions,
                      "image_to_video": self.server.backend.image_to_video},
            "limits": {"max_message_bytes": cfg.max_message_bytes, "control_rate": cfg.control_rate,
                       "control_burst": cfg.control_burst, "heavy_rate": cfg.heavy_rate, "heavy_burst": cfg.heavy_burst,
                       "frame_rate": cfg.frame_rate, "idle_timeout_s": cfg.idle_timeout_s,
                       "max_credits": MAX_CREDITS, "max_scale": 8},
        }

    # ------------------------------------------------------------------------------ receiving
    async def _receive_loop(self) -> tuple[int, str]:
        """Returns the close a client's behaviour calls for."""
        warned = False
        while True:
            try:
                async with asyncio.timeout(self.cfg.idle_timeout_s):
                    raw = await self.ws.recv()
            except TimeoutError:
                return CloseCode.IDLE_TIMEOUT, f"no message for {self.cfg.idle_timeout_s:g} s"
            accepted = self.bucket.take()
            if self.flood.record(dropped=not accepted):
                return CloseCode.RATE_LIMIT, "kept sending while rate-limited"
            if not accepted:
                if not warned:
                    self._event_error(ErrorCode.RATE_LIMITED, f"more than {self.cfg.control_rate:g} messages/s; "
                                      "messages are dropped until the rate falls", True)
                    warned = True
                continue
            warned = False
            try:
                msg = parse_client_message(raw, self.server.backend.actions)
                if isinstance(msg, HEAVY) and not self.heavy.take():
                    raise ProtocolError(ErrorCode.RATE_LIMITED, f"start, reset and prompt are limited to {self.cfg.heavy_rate:g}/s "
                                        f"(bursts of {self.cfg.heavy_burst}); this one was dropped", retry=True)
                await self._dispatch(msg)
            except ProtocolError as e:
                self._event_error(e.code, str(e), e.retry)

    def _event_error(self, code: str, message: str, retry: bool) -> None:
        self.session.outbox.put_event({"type": "error", "code": code, "message": message, "retry": retry, "ref": None})

    def _need_started(self, what: str) -> None:
        if self.spec is None:
            raise ProtocolError(ErrorCode.NOT_STARTED, f"{what} needs a running stream; send start first")

    async def _dispatch(self, msg) -> None:
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
            await self._start(self._check_prompt(msg.prompt), msg.seed, msg.first_frame, msg.size, msg.fps)
        elif isinstance(msg, Reset):
            self._need_started("reset")
            c = msg.changes
            prompt = self._check_prompt(c["prompt"]) if "prompt" in c else self.spec.prompt
            await self._start(prompt, c.get("seed", self.spec.seed),
                              c.get("first_frame", self.spec.first_frame), c.get("size", self._size()), c.get("fps", self.fps))
        elif isinstance(msg, PromptSwitch):
            self._need_started("prompt")
            prompt = self._check_prompt(msg.prompt)
            engine.set_prompt(s, prompt)
            self.spec = StreamSpec(prompt, self.spec.seed, self.spec.first_frame)
        elif isinstance(msg, Control):
            if msg.kind == "stats":
                engine.request_stats(s)
                return
            self._need_started(msg.kind)
            if msg.kind == "stop":
                engine.stop(s)
                self.spec = None
                s.outbox.put_event({"type": "stopped"})
            else:
                engine.set_paused(s, msg.kind == "pause")
                s.outbox.put_event({"type": "paused" if msg.kind == "pause" else "resumed"})

    def _check_prompt(self, prompt: str) -> str:
        """The prompt as the model takes it (the toy world's grammar, a text encoder's limit)."""
        try:
            return self.server.backend.check_prompt(prompt)
        except ValueError as e:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(e)) from None

    def _size(self) -> tuple[int, int]:
        h, w = self.server.backend.frame_hw
        return h * self.scale, w * self.scale

    async def _start(self, prompt: str, seed: int, first_frame, size, fps: float) -> None:
        nh, nw = self.server.backend.frame_hw
        scale = 1
        if size is not None:
            scale = size[0] // nh
            if size[0] % nh or size[1] != nw * scale or not 1 <= scale <= 8:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"size must be [{nh}, {nw}] or an integer multiple up to 8x, got {list(size)}")
        if isinstance(first_frame, FirstFrame):
            try:
                if first_frame.format != "rgb24":  # dimensions from the header, before any pixel is decoded
                    h, w = image_size(first_frame.format, first_frame.data)
                    if (h, w) != (nh, nw):
                        raise ValueError(f"first frame is {h}x{w}, this model needs {nh}x{nw}")
                first_frame = await self.loop.run_in_executor(
                    self.server._encode_pool, decode_image, first_frame.format, first_frame.data, nh, nw)
            except ValueError as e:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start.first_frame: {e}") from None
        elif self.server.backend.image_to_video:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this model is image-to-video (welcome.model.image_to_video): "
                                'start.first_frame must be an image, {"format": "jpeg"|"png"|"rgb24", "data": base64}')
        self.spec = StreamSpec(prompt, seed, first_frame)
        self.fps, self.scale = fps, scale
        self.engine.start(self.session, self.spec, fps)

    # -------------------------------------------------------------------------------- sending
    async def _keepalive(self) -> tuple[int, str]:
        """Ping every ``ping_interval_s``; returns the close for a client that does not answer."""
        while True:
            await asyncio.sleep(self.cfg.ping_interval_s)
            pong = await self._bounded(self.ws.ping(), "ping")
            try:
                async with asyncio.timeout(self.cfg.ping_timeout_s):
                    await pong
            except TimeoutError:
                return CloseCode.SLOW_CLIENT, f"no pong within {self.cfg.ping_timeout_s:g} s"

    async def _send_loop(self) -> None:
        outbox = self.session.outbox
        while True:
            await self.wake.wait()
            self.wake.clear()
            while True:
                event = outbox.pop_event()
                if event is not None:
                    close = event.pop("close", None)
                    if event.get("type") == "stats":  # the worker's half; the connection adds its own
                        event.update(frames_sent=self.frames_sent, bytes_sent=self.bytes_sent, credits=self.credits,
                                     codec=self.codec)
                    if "type" in event:
                        await self._bounded(self.ws.send(json.dumps(event)), "send")
                    if close is not None:
                        await self._close(*close)
                        return
                    continue
                if self.credits <= 0:
                    break
                frame = outbox.pop_frame()
                if frame is None:
                    break
                await self._send_frame(frame)

    async def _send_frame(self, frame) -> None:
        if self.encoder is None or self.encoder_epoch != frame.epoch:
            size = self._size()
            self.encoder = FrameEncoder(self.codec, size[0], size[1], self.fps, self.cfg.jpeg_quality)
            self.encoder_epoch = frame.epoch
        image = upscale(frame.image, self.scale)
        payload, key = await self.loop.run_in_executor(self.server._encode_pool, self.encoder.encode, image)
        if frame.epoch != self.session.epoch:
            return  # stopped or restarted while encoding
        flags = frame.flags | (FrameFlags.KEYFRAME if key else 0) | (FrameFlags.DROPPED if frame.dropped else 0)
        header = FrameHeader(frame.epoch, frame.frame_seq, frame.chunk_seq, frame.action_seq, frame.pts_us,
                             flags, self.codec, frame.dropped)
        message = encode_frame_message(header, payload)
        self.credits -= 1
        await self._bounded(self.ws.send(message), "send")
        self.frames_sent += 1
        self.bytes_sent += len(message)


_KEEP = object()


def build_backend(checkpoint: str, oracle: bool, max_batch: int, memory=_KEEP, pipeline: str | None = None, runtime=None):
    """The model backend for a checkpoint (refusing bidirectional ones), or the world oracle.
    ``memory``: a ``MemoryConfig`` (or None: sinks + window only) in place of the checkpoint's
    ``causal.memory``. ``runtime``: a ``RuntimeConfig`` (device, precision) for the model."""
    from streamkd.serve.backends import ModelBackend, WorldOracleBackend

    if oracle:
        from streamkd.data.toyworld import ToyWorldConfig

        return WorldOracleBackend(ToyWorldConfig())
    from streamkd.bundle import load_model

    model = load_model(checkpoint, pipeline=pipeline)
    if runtime is not None:
        from streamkd.runtime import place

        place(model, runtime.torch_device(), runtime.dtype)
    if memory is not _KEEP:
        if model.cfg.causal is None:
            raise ValueError(f"{checkpoint} is bidirectional: --memory needs a causal checkpoint")
        from dataclasses import replace

        model.cfg = replace(model.cfg, causal=replace(model.cfg.causal, memory=memory))
    return ModelBackend(model, max_batch=max_batch)


def run(cfg: ServerConfig, checkpoint: str, oracle: bool = False, memory=_KEEP, pipeline: str | None = None,
        runtime=None) -> None:
    """``streamkd serve``: load, listen, serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = build_backend(checkpoint, oracle, cfg.engine.max_batch, memory, pipeline, runtime)
    asyncio.run(StreamServer(cfg, backend).serve_forever())
