"""Hostile clients of protocol v1, for tests and ``python -m streamkd.serve.bench_hostile``.

Each client misbehaves in one way a public server has to survive, and returns what it did and
how the server answered. All are coroutines; the url is the websocket endpoint
(``ws://127.0.0.1:PORT/ws``).

ping_flood          holds a session, then floods 125-byte pings and never reads the pongs
non_reader          full credit, 8x frames at 240 fps, then never reads or sends again
prompt_stop_racer   prompt then stop 2 ms apart; checks nothing of a stopped epoch arrives after ``stopped``
churn               seeded random start/reset/prompt/stop/pause/resume/action bursts under the rate limit
decompression_bomb  ``start`` whose png first frame declares 16000x16000 in a few KB
message_flood       valid actions as fast as the socket takes them (rate limit, then close 4008)
parse_garbage       JSON a strict parser chokes on (5000-digit integer, 1e400, deep nesting, ...)
dup_headers         plain HTTP with duplicated Host / Origin headers (answers: status lines)

Every websocket client returns a dict with at least

client          its name
messages        websocket messages it sent (control frames included for the raw clients)
bytes           bytes it sent: message payloads, or wire bytes for the raw clients
seconds         how long it ran
closed          how its connection ended: "open" (still open when it stopped), "close CODE"
                (a close frame, or 1006 without one), "reset" / "broken pipe" (a write failed),
                "eof" / "reset (tcp)" (the kernel saw the peer's FIN / RST)
close_code      the close code when one was received, else None
closed_after_s  seconds from the client's start to the close, else None
errors          ``error`` replies by code

``ping_flood`` and ``non_reader`` speak websocket over a bare non-blocking socket (a hand-written
upgrade request, hand-masked frames, a small receive buffer) because a websocket library reads
the socket in the background, and not reading is the attack. They watch for the server's close
without reading: a failed write, or the socket's TCP state (``TCP_INFO``, Linux). Only after the
run they read what the server had queued, to find its close frame.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import os
import random
import socket
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from streamkd.data.toyworld import ACTIONS, all_prompts
from streamkd.serve.client import ServerError, StreamClient
from streamkd.serve.protocol import decode_frame_message

PROMPT = "forest with red squares"
PROMPTS = tuple(all_prompts())


# ------------------------------------------------------------------------------------ tally
@dataclass
class _Tally:
    """What a client did and saw so far; ``report`` makes the returned dict."""

    name: str
    t0: float = field(default_factory=time.monotonic)
    messages: int = 0
    bytes: int = 0
    errors: Counter = field(default_factory=Counter)
    how: str = "open"
    close_code: int | None = None
    closed_after_s: float | None = None

    def sent(self, nbytes: int, messages: int = 1) -> None:
        self.messages += messages
        self.bytes += nbytes

    def closed(self, how: str, code: int | None = None) -> None:
        """The first close wins (a reset after a close frame is the same close)."""
        if self.closed_after_s is None:
            self.how, self.close_code = how, code
            self.closed_after_s = round(time.monotonic() - self.t0, 3)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def report(self, **extra: Any) -> dict[str, Any]:
        return {"client": self.name, "messages": self.messages, "bytes": self.bytes, "seconds": round(self.elapsed, 2),
                "closed": self.how, "close_code": self.close_code, "closed_after_s": self.closed_after_s,
                "errors": dict(self.errors), **extra}


def _split(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


async def _hello(ws: ClientConnection, tally: _Tally, credits: int = 8) -> dict[str, Any]:
    """Send hello, return the welcome."""
    await _send(ws, tally, {"type": "hello", "version": 1, "codecs": ["jpeg"], "credits": credits})
    while True:
        message = await ws.recv()
        if isinstance(message, str):
            welcome = json.loads(message)
            if welcome.get("type") != "welcome":
                raise ServerError(f"expected welcome, got {welcome}")
            return welcome


async def _send(ws: ClientConnection, tally: _Tally, message: dict[str, Any] | str) -> None:
    text = message if isinstance(message, str) else json.dumps(message)
    await ws.send(text)
    tally.sent(len(text.encode()))


def _close_seen(ws: ClientConnection) -> int | None:
    """The server's close code as soon as its close frame has arrived (1006 when the connection
    dropped without one), else None. Not ``ws.close_code``: that waits for the closing handshake
    and the TCP close, which a server may take seconds over."""
    if ws.protocol.close_rcvd is not None:
        return ws.protocol.close_rcvd.code
    return ws.close_code if ws.state is State.CLOSED else None


async def _watch_close(ws: ClientConnection, tally: _Tally) -> None:
    """Note the server's close when it comes; cancel before closing from this side."""
    while (code := _close_seen(ws)) is None:
        await asyncio.sleep(0.01)
    tally.closed(f"close {code}", code)


async def _unwatch(watcher: asyncio.Task) -> None:
    """Stop watching before closing from this side: that close is not the server's."""
    watcher.cancel()
    try:
        await watcher
    except asyncio.CancelledError:
        pass


async def _still_open(ws: ClientConnection, tally: _Tally, timeout: float = 5.0) -> bool:
    """Whether the connection still answers: a ``stats`` request gets its ``stats`` reply."""
    try:
        await _send(ws, tally, {"type": "stats"})
        async with asyncio.timeout(timeout):
            while True:
                message = await ws.recv()
                if isinstance(message, str) and json.loads(message).get("type") == "stats":
                    return True
    except (ConnectionClosed, TimeoutError):
        return False


# ------------------------------------------------------------------------------ raw websocket
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_TEXT, _OP_CLOSE, _OP_PING = 0x1, 0x8, 0x9
_TCP_ESTABLISHED, _TCP_CLOSE, _TCP_CLOSE_WAIT = 1, 7, 8


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (RFC 6455 section 5.2): client frames must be masked, with a fresh key."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 2**16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


class RawWebSocket:
    """A websocket client on a bare non-blocking socket that reads only when asked to."""

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self._buf = bytearray(leftover)
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, url: str, rcvbuf: int = 4096, timeout: float = 10.0) -> "RawWebSocket":
        host, port, path = _split(url)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # before connect: the TCP window scale is agreed in the handshake, so a small buffer set
        # later would not shrink the window the server sees
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
                key = base64.b64encode(os.urandom(16)).decode()
                request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                await loop.sock_sendall(sock, request.encode())
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        raise ConnectionError("the server closed the connection during the websocket handshake")
                    buf += chunk
        except BaseException:
            sock.close()
            raise
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
        if lines[0].split()[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            sock.close()
            raise ConnectionError(f"websocket handshake refused: {lines[0]}")
        return cls(sock, rest)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def send_json(self, message: dict[str, Any]) -> int:
        frame = masked_frame(_OP_TEXT, json.dumps(message).encode())
        await self.send(frame)
        return len(frame)

    async def recv_json(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text message (for the welcome; binary and control frames are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                for opcode, payload in self._frames():
                    if opcode == _OP_TEXT:
                        return json.loads(payload)
                chunk = await self._loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                self._buf += chunk

    def peer_state(self) -> str | None:
        """What the kernel knows of the peer without reading: "open", "eof" (FIN received),
        "reset (tcp)" (RST received), another TCP state, or None where TCP_INFO is missing."""
        if not hasattr(socket, "TCP_INFO"):
            return None
        state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        return {_TCP_ESTABLISHED: "open", _TCP_CLOSE_WAIT: "eof", _TCP_CLOSE: "reset (tcp)"}.get(state, f"tcp state {state}")

    async def drain(self, seconds: float = 2.0, max_bytes: int = 256 * 2**20) -> dict[str, Any]:
        """Read what the server had queued, for at most ``seconds``: bytes, frames by opcode, the
        close code if a close frame came, and how reading ended ("eof", "reset", or "open": the
        time ran out with the connection still up)."""
        total, opcodes, close_code, end = len(self._buf), Counter(), None, "open"
        try:
            async with asyncio.timeout(seconds):
                while total < max_bytes:
                    for opcode, payload in self._frames():
                        opcodes[opcode] += 1
                        if opcode == _OP_CLOSE and close_code is None:
                            close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    chunk = await self._loop.sock_recv(self.sock, 2**20)
                    if not chunk:
                        end = "eof"
                        break
                    total += len(chunk)
                    self._buf += chunk
        except TimeoutError:
            pass
        except OSError:
            end = "reset"
        for opcode, payload in self._frames():
            opcodes[opcode] += 1
            if opcode == _OP_CLOSE and close_code is None:
                close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        names = {0x1: "text", 0x2: "binary", 0x8: "close", 0x9: "ping", 0xA: "pong"}
        return {"drained_bytes": total, "drained_frames": {names.get(k, hex(k)): v for k, v in sorted(opcodes.items())},
                "drained_close_code": close_code, "drain_end": end}

    def _frames(self) -> list[tuple[int, bytes]]:
        """Complete server frames at the front of the buffer (server frames are unmasked)."""
        out, pos, buf = [], 0, self._buf
        while len(buf) - pos >= 2:
            opcode, n = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if len(buf) - pos < head + n:
                break
            out.append((opcode, bytes(buf[pos + head:pos + head + n])))
            pos += head + n
        del buf[:pos]
        return out

    def close(self) -> None:
        self.sock.close()


_WRITE_FAILED = {ConnectionResetError: "reset", BrokenPipeError: "broken pipe"}


def _after_drain(report: dict[str, Any], drained: dict[str, Any]) -> dict[str, Any]:
    """A raw client's report (``seconds``: the run, not the drain) with what the drain found: a
    close frame the server had sent while the run ignored the socket names the close code; a
    connection first seen closed in the drain has no ``closed_after_s`` (it closed at some time
    during the run)."""
    code = drained["drained_close_code"]
    if code is not None:
        report["close_code"] = report["close_code"] or code
        if report["closed"] == "open":
            report["closed"] = f"close {code} (seen after the run)"
    elif report["closed"] == "open" and drained["drain_end"] != "open":
        report["closed"] = f"{drained['drain_end']} (seen after the run)"
    return {**report, **drained}


async def ping_flood(url: str, seconds: float, *, rcvbuf: int = 4096, drain_s: float = 2.0) -> dict[str, Any]:
    """Hold a streaming session, then send 125-byte pings as fast as the socket takes them and
    never read: every ping owes a pong, so a server that does not bound what it queues for a
    client grows by about the flood's rate.

    Extra keys: ``pings``, ``pings_per_s``, ``longest_write_s`` (the longest single write: the
    server stopped reading for that long), and the post-run drain (``RawWebSocket.drain``).
    """
    tally = _Tally("ping_flood")
    ws = await RawWebSocket.open(url, rcvbuf)
    try:
        tally.sent(await ws.send_json({"type": "hello", "version": 1, "codecs": ["jpeg"], "credits": 8}))
        await ws.recv_json()
        tally.sent(await ws.send_json({"type": "start", "prompt": PROMPT, "fps": 16}))
        batch = 64
        # a fresh mask per frame, built once: masking per send would cap the flood at Python speed
        pings = b"".join(masked_frame(_OP_PING, b"p" * 125) for _ in range(batch))
        pings_sent, longest, next_state = 0, 0.0, 0.0
        while tally.elapsed < seconds:
            t = time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, seconds - tally.elapsed)):
                    await ws.send(pings)
            except TimeoutError:
                longest = max(longest, time.monotonic() - t)
                break
            except OSError as e:
                tally.closed(_WRITE_FAILED.get(type(e), f"write failed ({e.strerror or e})"))
                break
            longest = max(longest, time.monotonic() - t)
            pings_sent += batch
            tally.sent(len(pings), batch)
            if t >= next_state:  # the kernel may know of a close before a write fails
                state = ws.peer_state()
                if state not in ("open", None):
                    tally.closed(state)
                    break
                next_state = t + 0.1
            await asyncio.sleep(0)  # sock_sendall returns without yielding while the kernel takes data
        if tally.closed_after_s is None and ws.peer_state() not in ("open", None):
            tally.closed(ws.peer_state())
        report = tally.report(pings=pings_sent, pings_per_s=round(pings_sent / max(tally.elapsed, 1e-9)),
                              longest_write_s=round(longest, 3))
        return _after_drain(report, await ws.drain(drain_s))
    finally:
        ws.close()


async def non_reader(url: str, seconds: float, credits: int = 64, *, rcvbuf: int = 4096, probe_s: float | None = 1.0,
                     credit_s: float = 0.0, drain_s: float = 2.0) -> dict[str, Any]:
    """Take the largest stream the server allows (``credits``, 240 fps, ``max_scale`` x the model's
    frame size), then never read and never send another message. The server must bound what it
    queues for this client and eventually close it.

    ``credit_s``: for that many seconds first keep granting credit (still reading nothing), so
    that the server's frames overflow every buffer between it and this client and its sends
    block; then go silent.

    ``probe_s``: every that many seconds send an empty ping, only to learn when the server closed
    (a write to a closed socket fails); a ping is not a message, so it resets no idle timer and
    the pong queues behind everything else. None: watch the TCP state alone (no FIN arrives
    while the unread frames fill the window, so a graceful close shows only in the drain).

    Extra keys: ``size`` (the frame size it asked for), ``probes``, and the post-run drain
    (``drained_frames["binary"]``: frames the server had queued or sent into the socket).
    """
    tally = _Tally("non_reader")
    ws = await RawWebSocket.open(url, rcvbuf)
    try:
        tally.sent(await ws.send_json({"type": "hello", "version": 1, "codecs": ["jpeg"], "credits": credits}))
        welcome = await ws.recv_json()
        side = welcome["model"]["frame_size"][0] * welcome["limits"]["max_scale"]
        tally.sent(await ws.send_json({"type": "start", "prompt": PROMPT, "fps": 240, "size": [side, side]}))
        probe = masked_frame(_OP_PING, b"")
        probes, next_probe = 0, (tally.elapsed + probe_s) if probe_s else float("inf")
        while tally.elapsed < seconds:
            await asyncio.sleep(min(0.1, max(0.0, seconds - tally.elapsed)))
            if tally.elapsed < credit_s:
                try:
                    async with asyncio.timeout(1.0):
                        tally.sent(await ws.send_json({"type": "credit", "frames": credits}))
                except (TimeoutError, OSError):
                    pass
            state = ws.peer_state()
            if state not in ("open", None):
                tally.closed(state)
                break
            if tally.elapsed >= next_probe:
                next_probe += probe_s
                try:
                    async with asyncio.timeout(1.0):
                        await ws.send(probe)
                except TimeoutError:  # the server stopped reading; keep watching
                    continue
                except OSError as e:
                    tally.closed(_WRITE_FAILED.get(type(e), f"write failed ({e.strerror or e})"))
                    break
                probes += 1
                tally.sent(len(probe))
        return _after_drain(tally.report(size=[side, side], probes=probes), await ws.drain(drain_s))
    finally:
        ws.close()


# --------------------------------------------------------------------------- library clients
class _Tap(asyncio.Queue):
    """An asyncio.Queue that shows every item put into it to ``on_put``."""

    def __init__(self, on_put) -> None:
        super().__init__()
        self._on_put = on_put

    def put_nowait(self, item) -> None:
        if item is not None:
            self._on_put(item)
        super().put_nowait(item)


class _ArrivalOrder(StreamClient):
    """A ``StreamClient`` that also notes events and frames in the order they arrive: it queues
    them apart, and the stop guarantee is about their relative order. ``arrivals`` holds
    ``(type, epoch)`` per message, "frame" for frames; ``stopped`` carries no epoch (None)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[tuple[str, int | None]] = []
        # the reader task has not run yet: it finds the tapped queue on its first event
        self._events = _Tap(lambda event: self.arrivals.append((event["type"], event.get("epoch"))))

    def _on_frame(self, message: bytes) -> bool:
        self.arrivals.append(("frame", decode_frame_message(message)[0].epoch))
        return super()._on_frame(message)


class _Refused(Exception):
    """The server answered a request with an error instead of the event waited for."""


async def _next_of(client: StreamClient, kind: str, tally: _Tally, timeout: float, refusable: bool = False) -> dict[str, Any]:
    """The next event of ``kind``, counting error replies on the way; ``refusable``: an error
    is the answer to the request (``_Refused``). ``ServerError`` when the connection closes."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                event = await client.next_event(None, timeout=None)
            except ServerError as e:
                if not isinstance(e.code, str):
                    raise
                tally.errors[e.code] += 1
                if refusable:
                    raise _Refused(e.code) from None
                continue
            if event["type"] == kind:
                return event


async def _client_send(client: StreamClient, tally: _Tally, message: dict[str, Any]) -> None:
    await client.send(message)
    tally.sent(len(json.dumps(message).encode()))


def _period(limits: dict[str, Any], messages: int, heavy: int) -> float:
    """Seconds per round of ``messages`` control messages, ``heavy`` of them start/reset/prompt,
    that keep a client at half its ``control_rate`` and 80 % of its ``heavy_rate`` (a limit of
    the fixed server; an older welcome has none)."""
    period = messages / (0.5 * limits["control_rate"])
    if heavy and limits.get("heavy_rate"):
        period = max(period, heavy / (0.8 * limits["heavy_rate"]))
    return period


async def _pace(tally: _Tally, started: float, period: float, seconds: float | None) -> bool:
    """Wait for the next round (``period`` after the one that began at ``started``); False, without
    waiting, when that round would begin after ``seconds``."""
    pause = started + period - time.monotonic()
    if seconds is not None and tally.elapsed + pause >= seconds:
        return False
    await asyncio.sleep(max(0.0, pause))
    return True


def stop_violations(arrivals: list[tuple[str, int | None]]) -> tuple[int, list[str]]:
    """(prompt switches acknowledged, violations) in an arrival log of ``(type, epoch)``: a
    ``prompt_applied`` or a frame of an epoch whose ``stopped`` came before it. ``stopped``
    carries no epoch; it stops the epoch of the latest ``started``."""
    stopped: set[int | None] = set()
    current, applied, violations = None, 0, []
    for kind, epoch in arrivals:
        if kind == "started":
            current = epoch
        elif kind == "stopped":
            stopped.add(current)
        elif kind in ("frame", "prompt_applied") and epoch in stopped:
            violations.append(f"{kind} of epoch {epoch} after its stopped")
        elif kind == "prompt_applied":
            applied += 1
    return applied, violations


async def prompt_stop_racer(url: str, count: int, *, gap_s: float = 0.002, fps: float = 240.0,
                            seconds: float | None = None, grace_s: float = 0.5) -> dict[str, Any]:
    """``count`` rounds of: start, wait for the first frame, ``prompt``, ``stop`` ``gap_s`` later.

    At ``fps`` 240 a chunk boundary (where prompts are read) comes every few milliseconds, so the
    prompt switch and the stop race. The guarantee checked (``stop_violations``): once
    ``stopped`` has arrived, no ``prompt_applied`` and no frame of the stopped epoch arrives.
    Rounds are paced under the server's rate limits (``_period``), so the limiter does not decide
    the race. ``seconds``: also stop starting rounds after that long.

    Extra keys: ``rounds``, ``refused`` (rounds whose start or prompt got an error),
    ``prompts_applied`` (switches that won the race), ``violations``, a few
    ``violation_examples``, ``timeouts`` (a reply that did not come in 10 s ends the run).
    """
    tally = _Tally("prompt_stop_racer")
    client = await _ArrivalOrder.connect(url, credits=16)
    tally.sent(len(json.dumps({"type": "hello", "version": 1, "codecs": ["jpeg"], "credits": 16})))
    watcher = asyncio.create_task(_watch_close(client.ws, tally))
    rng = random.Random(0)
    period = _period(client.welcome["limits"], messages=4, heavy=2)  # start, prompt, stop, credit
    rounds = refused = timeouts = 0
    try:
        for i in range(count):
            t = time.monotonic()
            try:
                await _client_send(client, tally, {"type": "start", "prompt": rng.choice(PROMPTS), "seed": i, "fps": fps})
                client.epoch = (await _next_of(client, "started", tally, 10.0, refusable=True))["epoch"]
                await client.next_frame(timeout=10.0)
                await _client_send(client, tally, {"type": "prompt", "prompt": rng.choice(PROMPTS)})
                await asyncio.sleep(gap_s)
                await _client_send(client, tally, {"type": "stop"})
                await _next_of(client, "stopped", tally, 10.0)
                rounds += 1
            except _Refused:
                refused += 1
            except TimeoutError:
                timeouts += 1
                break
            except ServerError:  # closed
                break
            # the frames of the stopped epoch used credit that nobody consumes: give it back
            arrived = sum(1 for kind, epoch in client.arrivals if kind == "frame" and epoch == client.epoch)
            if arrived > 1:
                await _client_send(client, tally, {"type": "credit", "frames": min(64, arrived - 1)})
            if i + 1 == count or not await _pace(tally, t, period, seconds):
                break
        await asyncio.sleep(grace_s)  # time for anything late to arrive
    except ConnectionClosed:
        pass
    finally:
        await _unwatch(watcher)
        await client.close()
    applied, violations = stop_violations(client.arrivals)
    return tally.report(rounds=rounds, refused=refused, prompts_applied=applied, violations=len(violations),
                        violation_examples=violations[:5], timeouts=timeouts)


_CHURN = {"start": 3, "reset": 3, "prompt": 3, "stop": 1, "pause": 2, "resume": 2, "action": 3, "stats": 1}
_HEAVY = ("start", "reset", "prompt")


def _churn_message(rng: random.Random, native: int, seq: int, heavy: bool) -> dict[str, Any]:
    """One random control message with valid fields, in whatever order the dice say (so ``reset``
    before ``start``, ``resume`` without ``pause`` and the like are part of the mix). ``heavy``
    False: no start, reset or prompt (the client is out of its heavy-message budget)."""
    kinds = [k for k in _CHURN if heavy or k not in _HEAVY]
    kind = rng.choices(kinds, weights=[_CHURN[k] for k in kinds])[0]
    if kind in ("start", "reset"):
        fields = {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(1000), "fps": rng.choice([8, 16, 30]),
                  "first_frame": rng.choice(["world", None]), "size": [native * rng.choice([1, 2])] * 2}
        if kind == "reset":  # any subset: omitted fields keep their values
            fields = {k: v for k, v in fields.items() if rng.random() < 0.5}
        return {"type": kind, **fields}
    if kind == "prompt":
        return {"type": "prompt", "prompt": rng.choice(PROMPTS)}
    if kind == "action":
        return {"type": "action", "seq": seq, "action": rng.choice(ACTIONS)}
    return {"type": kind}


async def churn(url: str, count: int, *, seed: int = 0, seconds: float | None = None) -> dict[str, Any]:
    """``count`` random control messages (``_churn_message``, a seeded ``random.Random``) in bursts
    of 1-4 with gaps under 2 ms, paced to half the server's ``control_rate`` and, where the
    welcome has one, 80 % of its ``heavy_rate``; frames are consumed and credit returned as a
    normal client does. ``seconds``: also stop after that long.

    Extra keys: ``sent`` (messages by type), ``events`` (replies by type), ``frames``,
    ``alive_after`` (a ``stats`` request after the run was answered).
    """
    tally = _Tally("churn")
    rng = random.Random(seed)
    client = await StreamClient.connect(url, credits=32)
    tally.sent(len(json.dumps({"type": "hello", "version": 1, "codecs": ["jpeg"], "credits": 32})))
    watcher = asyncio.create_task(_watch_close(client.ws, tally))
    native = client.welcome["model"]["frame_size"][0]
    limits = client.welcome["limits"]
    rate = 0.5 * limits["control_rate"]
    heavy_rate, heavy_burst = 0.8 * limits.get("heavy_rate", float("inf")), limits.get("heavy_burst", 0)
    sent: Counter = Counter()
    events: Counter = Counter()
    frames = 0
    stats_seen = asyncio.Event()

    async def consume_frames() -> None:
        nonlocal frames
        while True:  # client.epoch stays 0: frames of every epoch count, and return credit
            await client.next_frame(timeout=None)
            frames += 1

    async def consume_events() -> None:
        while True:
            try:
                event = await client.next_event(None, timeout=None)
            except ServerError as e:
                if not isinstance(e.code, str):
                    return
                tally.errors[e.code] += 1
                continue
            events[event["type"]] += 1
            if event["type"] == "stats":
                stats_seen.set()

    readers = [asyncio.create_task(consume_frames()), asyncio.create_task(consume_events())]
    alive = False
    try:
        step = 0
        while step < count and (seconds is None or tally.elapsed < seconds):
            for _ in range(rng.randint(1, 4)):
                heavy_ok = sum(sent[k] for k in _HEAVY) < heavy_burst / 2 + tally.elapsed * heavy_rate
                message = _churn_message(rng, native, step + 1, heavy_ok)
                await _client_send(client, tally, message)
                sent[message["type"]] += 1
                step += 1
                await asyncio.sleep(rng.uniform(0.0, 0.002))
            await asyncio.sleep(max(0.0, tally.t0 + tally.messages / rate - time.monotonic()))
        await asyncio.sleep(0.5)
        stats_seen.clear()
        await _client_send(client, tally, {"type": "stats"})
        async with asyncio.timeout(5.0):
            await stats_seen.wait()
        alive = True
    except (ConnectionClosed, TimeoutError):
        pass
    finally:
        await _unwatch(watcher)
        for task in readers:
            task.cancel()
        await client.close()
    return tally.report(sent=dict(sent), events=dict(events), frames=frames, alive_after=alive)


@functools.cache
def bomb_png(width: int = 16000, height: int = 16000, budget: int = 40_000) -> bytes:
    """A png whose IHDR declares ``height`` x ``width`` RGB but whose file is about ``budget`` bytes:
    its IDAT is rows of zeros, deflated ~1000:1 (deflate's limit), so it holds the first rows
    only (40 KB: ~850 of 16000). A decoder that trusts the header allocates the full image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + 3 * width)  # filter byte 0 (none), then RGB
    deflate = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(height):
        idat += deflate.compress(row)
        if len(idat) >= budget:
            break
    idat += deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b"")


async def decompression_bomb(url: str, count: int, *, seconds: float | None = None) -> dict[str, Any]:
    """``count`` times: ``start`` with ``bomb_png()`` as the first frame (about 54 KB of JSON), then
    wait for the reply; the expected one is error ``bad_message``. A ``started`` (the server took
    it) is followed by ``stop``. Paced under the server's rate limits (``_period``): the point is
    the decoder, not the limiter. ``seconds``: also stop after that long.

    Extra keys: ``replies`` (by error code or event type; "none": no reply within 30 s),
    ``reply_ms`` (p50 and max: how long the server took to answer), ``png_bytes``,
    ``message_bytes``, ``alive_after``.
    """
    tally = _Tally("decompression_bomb")
    png = bomb_png()
    message = json.dumps({"type": "start", "prompt": PROMPT,
                          "first_frame": {"format": "png", "data": base64.b64encode(png).decode()}})
    replies: Counter = Counter()
    reply_ms: list[float] = []
    alive = False
    async with connect(url, max_size=8 * 2**20, close_timeout=2) as ws:
        watcher = asyncio.create_task(_watch_close(ws, tally))
        try:
            period = _period((await _hello(ws, tally))["limits"], messages=2, heavy=1)
            for i in range(count):
                t = time.monotonic()
                await _send(ws, tally, message)
                reply = {"type": "none"}
                try:
                    async with asyncio.timeout(30.0):
                        while reply["type"] not in ("error", "started"):
                            if isinstance(text := await ws.recv(), str):
                                reply = json.loads(text)
                    reply_ms.append(1e3 * (time.monotonic() - t))
                except TimeoutError:
                    pass
                replies[reply.get("code", reply["type"])] += 1
                if reply["type"] == "error":
                    tally.errors[reply["code"]] += 1
                elif reply["type"] == "started":
                    await _send(ws, tally, {"type": "stop"})
                if i + 1 == count or not await _pace(tally, t, period, seconds):
                    break
            alive = await _still_open(ws, tally)
        except ConnectionClosed:
            pass
        finally:
            await _unwatch(watcher)
    reply_ms.sort()
    return tally.report(replies=dict(replies), png_bytes=len(png), message_bytes=len(message),
                        reply_ms={"p50": round(reply_ms[len(reply_ms) // 2], 1), "max": round(reply_ms[-1], 1)} if reply_ms else None,
                        alive_after=alive)


async def _flood_once(url: str, seconds: float, tally: _Tally) -> dict[str, Any]:
    """One connection of ``message_flood``: until closed or ``seconds`` have passed."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"messages": 0, "close_code": None, "closed_after_s": None}
    async with connect(url, close_timeout=2) as ws:
        await _hello(ws, tally)
        await _send(ws, tally, {"type": "start", "prompt": PROMPT, "fps": 16})

        async def read() -> None:
            async for message in ws:  # frames stop once the initial credit is spent; errors count
                if isinstance(message, str) and (event := json.loads(message))["type"] == "error":
                    tally.errors[event["code"]] += 1

        reader = asyncio.create_task(read())
        seq = 0
        try:
            while time.monotonic() - t0 < seconds:
                seq += 1
                await _send(ws, tally, f'{{"type": "action", "seq": {seq}, "action": "{ACTIONS[seq % len(ACTIONS)]}"}}')
                if seq % 64 == 0:
                    await asyncio.sleep(0)  # let the reader run; send() only yields when the buffer is full
                    if (code := _close_seen(ws)) is not None:
                        # a send after the close frame would wait out the closing handshake
                        out.update(close_code=code, closed_after_s=round(time.monotonic() - t0, 3))
                        tally.closed(f"close {code}", code)
                        break
        except ConnectionClosed:
            if (code := _close_seen(ws)) is not None:
                out.update(close_code=code, closed_after_s=round(time.monotonic() - t0, 3))
                tally.closed(f"close {code}", code)
        out["messages"] = seq
        await asyncio.wait([reader], timeout=0.5)  # replies that came before the close
        reader.cancel()
        try:
            await reader
        except (asyncio.CancelledError, ConnectionClosed):
            pass
    return out


async def message_flood(url: str, seconds: float, *, reconnect: bool = False) -> dict[str, Any]:
    """Start a stream, then send valid ``action`` messages as fast as the socket takes them. The
    expected answer: one ``rate_limited`` error, then close 4008. ``reconnect``: open a new
    connection after each close until ``seconds`` have passed (a sustained flood); ``closed``
    and ``closed_after_s`` describe the first connection.

    Extra keys: ``connections`` (how many), ``closes`` (by close code, "open" for one that was
    still open at the end), ``first_connection`` (its messages, close code, seconds to close).
    """
    tally = _Tally("message_flood")
    connections: list[dict[str, Any]] = []
    while not connections or (reconnect and tally.elapsed < seconds):
        try:
            connections.append(await _flood_once(url, seconds - tally.elapsed, tally))
        except (ConnectionClosed, OSError) as e:  # closed or refused during hello
            connections.append({"messages": 0, "close_code": getattr(getattr(e, "rcvd", None), "code", None),
                                "closed_after_s": None, "failed": type(e).__name__})
            await asyncio.sleep(0.05)
    closes = Counter(str(c["close_code"] or "open") for c in connections)
    return tally.report(connections=len(connections), closes=dict(closes), first_connection=connections[0])


GARBAGE: tuple[tuple[str, str], ...] = (
    ("int_5000_digits", '{"type": "action", "seq": ' + "9" * 5000 + ', "action": "up"}'),
    ("fps_1e400", '{"type": "start", "prompt": "forest with red squares", "fps": 1e400}'),
    ("fps_int_400_digits", '{"type": "start", "prompt": "forest with red squares", "fps": 1' + "0" * 400 + "}"),
    ("seed_nan", '{"type": "start", "prompt": "forest with red squares", "seed": NaN}'),
    ("nested_20000", "[" * 20000 + "]" * 20000),
    ("lone_surrogate", '{"type": "prompt", "prompt": "\\ud800"}'),
)
"""(name, message text): each must be answered with error ``bad_json`` or ``bad_message``."""
GARBAGE_CODES = ("bad_json", "bad_message")


async def parse_garbage(url: str, *, seconds: float | None = None) -> dict[str, Any]:
    """Send each ``GARBAGE`` message and check the reply is error ``bad_json`` / ``bad_message``
    and that the connection still answers a ``stats`` request; a closed connection is reopened
    for the next message. Paced under the server's rate limits (``_period``; the three ``start``
    messages count as heavy). ``seconds``: repeat the list until that long has passed (once
    without).

    Extra keys: ``rounds``, ``cases`` (per message: replies by code, "none" for no reply within
    5 s; ``closed``: times the connection closed after it; ``silent``: times it stayed open but
    did not answer ``stats``), ``ok`` (every reply expected, the connection always answering).
    """
    tally = _Tally("parse_garbage")
    cases: dict[str, dict[str, Any]] = {name: {"replies": Counter(), "closed": 0, "silent": 0} for name, _ in GARBAGE}
    heavy = sum(text.startswith('{"type": "start"') for _, text in GARBAGE)
    rounds = 0
    ws: ClientConnection | None = None
    try:
        while True:
            rounds += 1
            t = time.monotonic()
            for name, text in GARBAGE:
                if ws is None or _close_seen(ws) is not None:
                    if ws is not None:
                        await ws.close()
                    ws = await connect(url, close_timeout=2)
                    period = _period((await _hello(ws, tally))["limits"], messages=2 * len(GARBAGE), heavy=heavy)
                await _send(ws, tally, text)
                code = "none"
                try:
                    async with asyncio.timeout(5.0):
                        while True:
                            reply = await ws.recv()
                            if isinstance(reply, str) and (event := json.loads(reply))["type"] == "error":
                                code = event["code"]
                                break
                except (TimeoutError, ConnectionClosed):
                    pass
                cases[name]["replies"][code] += 1
                if code != "none":
                    tally.errors[code] += 1
                if not await _still_open(ws, tally):
                    if (closed := _close_seen(ws)) is not None:
                        cases[name]["closed"] += 1
                        tally.closed(f"close {closed}", closed)
                    else:
                        cases[name]["silent"] += 1
            if seconds is None or not await _pace(tally, t, period, seconds):
                break
    finally:
        if ws is not None:
            await ws.close()
    ok = all(set(c["replies"]) <= set(GARBAGE_CODES) and not c["closed"] and not c["silent"] for c in cases.values())
    return tally.report(rounds=rounds, cases={k: {**v, "replies": dict(v["replies"])} for k, v in cases.items()}, ok=ok)


async def dup_headers(host: str, port: int, *, timeout: float = 5.0) -> dict[str, Any]:
    """Plain HTTP requests with a header given twice (the second copy a foreign value, where the
    copies differ): a server that reads one copy for its Host / Origin check and lets another
    part of the stack read the other can be fooled, so the answer must be 400.

    Returns ``client``, ``messages``, ``bytes``, ``status`` (the status line per request) and
    ``ok`` (all 400).
    """
    own, evil = f"{host}:{port}", f"evil.example:{port}"
    upgrade = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
               f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"]
    requests = {
        "healthz_host_twice": ("/healthz", [f"Host: {own}", f"Host: {own}"]),
        "healthz_host_conflict": ("/healthz", [f"Host: {own}", f"Host: {evil}"]),
        "ws_host_twice": ("/ws", [f"Host: {own}", f"Host: {evil}", *upgrade]),
        "ws_origin_twice": ("/ws", [f"Host: {own}", f"Origin: http://{own}", f"Origin: http://{evil}", *upgrade]),
        "ws_host_and_origin_twice": ("/ws", [f"Host: {own}", f"Host: {evil}", f"Origin: http://{own}",
                                             f"Origin: http://{evil}", *upgrade]),
    }
    tally = _Tally("dup_headers")
    status: dict[str, str] = {}
    for name, (path, headers) in requests.items():
        request = f"GET {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(request.encode())
                    tally.sent(len(request))
                    line = await reader.readline()
                finally:
                    writer.close()
            status[name] = line.decode("latin-1").strip() or "(closed without a reply)"
        except (TimeoutError, OSError) as e:
            status[name] = f"({type(e).__name__})"
    return {"client": "dup_headers", "messages": tally.messages, "bytes": tally.bytes, "status": status,
            "ok": all(line.split()[1:2] == ["400"] for line in status.values())}
