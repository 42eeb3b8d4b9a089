"""Python client of protocol v1 (scripts, tests, benchmarks) and ``streamkd client``.

``StreamClient`` reads the socket in a background task, decodes frames, and returns credit as
the caller consumes frames (``next_frame``), so a caller that stops consuming stops receiving --
the server then drops frames for it instead of buffering them. It also measures what the
protocol lets a client see: first-frame latency (start sent -> first frame of the epoch) and
action-to-frame latency (action sent -> first frame whose header carries that action seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from streamkd.serve.media import FrameDecoder
from streamkd.serve.protocol import FrameFlags, FrameHeader, decode_frame_message


@dataclass
class Frame:
    header: FrameHeader
    image: np.ndarray  # uint8 HWC
    received_at: float  # time.monotonic()
    nbytes: int  # size of the whole message


class ServerError(RuntimeError):
    """An error message from the server (``code``, ``retry``) or a close while waiting."""

    def __init__(self, message: str, code: str | int | None = None, retry: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retry = retry


@dataclass
class ClientStats:
    frames: int = 0
    bytes: int = 0
    dropped: int = 0
    first_frame_latency_s: float | None = None
    action_latencies_s: list[float] = field(default_factory=list)


async def _open(url: str, origin: str | None, timeout: float) -> ClientConnection:
    """The websocket handshake, its failures as one-line ``ServerError``s that say the fix."""
    try:
        return await connect(url, origin=origin, max_size=8 * 2**20, open_timeout=timeout, close_timeout=2)
    except InvalidURI:
        raise ServerError(f"{url!r} is not a websocket URL; the protocol endpoint is ws://HOST:PORT/ws") from None
    except InvalidStatus as e:
        # the server's plain HTTP routes (/ is the browser client, anything else 404) answer
        # a handshake that was sent to the wrong path
        status = e.response.status_code
        raise ServerError(f"{url} answered HTTP {status}, not a websocket handshake: the protocol endpoint is ws://HOST:PORT/ws",
                          status) from None
    except InvalidHandshake as e:
        raise ServerError(f"{url} did not complete a websocket handshake ({e}); is a streamkd server listening there?") from None
    except TimeoutError:
        raise ServerError(f"{url} did not complete a websocket handshake within {timeout:g} s") from None
    except OSError as e:
        raise ServerError(f"cannot connect to {url} ({e.strerror or e}); is streamkd serve running there?") from None


class StreamClient:
    def __init__(self, ws: ClientConnection, welcome: dict[str, Any], credits: int) -> None:
        self.ws = ws
        self.welcome = welcome
        self.codec: str = welcome["codec"]
        self.chunk_frames: int = welcome["model"]["chunk_frames"]
        self.window = credits
        self.stats = ClientStats()
        self.errors: list[dict[str, Any]] = []
        self.epoch = 0
        self._frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._decoder: FrameDecoder | None = None
        self._decoder_epoch = -1
        self._unreturned = 0
        self._seq = 0
        self._action_sent: dict[int, float] = {}
        self._start_sent = 0.0
        self._reader = asyncio.create_task(self._read())

    # ---------------------------------------------------------------------------- connecting
    @classmethod
    async def connect(cls, url: str, *, token: str | None = None, codecs: tuple[str, ...] = ("jpeg",), credits: int = 8,
                      origin: str | None = None, timeout: float = 10.0) -> "StreamClient":
        ws = await _open(url, origin, timeout)
        hello = {"type": "hello", "version": 1, "codecs": list(codecs), "credits": credits}
        if token is not None:
            hello["token"] = token
        await ws.send(json.dumps(hello))
        try:
            async with asyncio.timeout(timeout):
                welcome = json.loads(await ws.recv())
        except ConnectionClosed as e:
            raise ServerError(f"server closed the connection: {e.rcvd.code if e.rcvd else 1006} {e.rcvd.reason if e.rcvd else ''}",
                              e.rcvd.code if e.rcvd else 1006) from None
        if welcome.get("type") != "welcome":
            await ws.close()
            raise ServerError(f"expected welcome, got {welcome}")
        return cls(ws, welcome, credits)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass

    async def __aenter__(self) -> "StreamClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    # ------------------------------------------------------------------------------ requests
    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def start(self, prompt: str, *, seed: int = 0, first_frame: str | np.ndarray | None = "world",
                    size: tuple[int, int] | None = None, fps: float = 16.0, timeout: float = 30.0) -> dict[str, Any]:
        """Start the stream; returns the ``started`` event. ``first_frame``: "world", None or uint8 HWC."""
        msg: dict[str, Any] = {"type": "start", "prompt": prompt, "seed": seed, "fps": fps, "first_frame": first_frame}
        if isinstance(first_frame, np.ndarray):
            msg["first_frame"] = {"format": "rgb24", "data": base64.b64encode(np.ascontiguousarray(first_frame).tobytes()).decode()}
        if size is not None:
            msg["size"] = list(size)
        self._start_sent = time.monotonic()
        self.stats.first_frame_latency_s = None
        await self.send(msg)
        started = await self.next_event("started", timeout)
        self.epoch = started["epoch"]
        return started

    async def reset(self, timeout: float = 30.0, **changes: Any) -> dict[str, Any]:
        self._start_sent = time.monotonic()
        self.stats.first_frame_latency_s = None
        await self.send({"type": "reset", **changes})
        started = await self.next_event("started", timeout)
        self.epoch = started["epoch"]
        return started

    async def action(self, name: str) -> int:
        """Hold ``name`` from the next chunk boundary on; returns its seq."""
        self._seq += 1
        self._action_sent[self._seq] = time.monotonic()
        await self.send({"type": "action", "seq": self._seq, "action": name})
        return self._seq

    async def prompt(self, text: str) -> None:
        await self.send({"type": "prompt", "prompt": text})

    async def stats_request(self, timeout: float = 10.0) -> dict[str, Any]:
        await self.send({"type": "stats"})
        return await self.next_event("stats", timeout)

    # ------------------------------------------------------------------------------ receiving
    async def next_frame(self, timeout: float | None = 30.0) -> Frame:
        """The next frame of the current epoch; returns one credit to the server per frame consumed
        (in batches of half the window, to keep control traffic low)."""
        async with asyncio.timeout(timeout):
            frame = await self._frames.get()
            while frame is not None and frame.header.epoch < self.epoch:  # queued before a reset
                await self._consumed()
                frame = await self._frames.get()
        if frame is None:
            self._frames.put_nowait(None)  # every later call fails the same way
            raise ServerError(f"connection closed ({self.close_code})", self.close_code)
        await self._consumed()
        return frame

    async def _consumed(self) -> None:
        """One frame used up or discarded: its credit goes back to the server (in batches). A frame
        of an old epoch cost the server a credit too; not returning it would starve the stream
        after enough resets and stops."""
        self._unreturned += 1
        if self._unreturned >= max(1, self.window // 2):
            unreturned, self._unreturned = self._unreturned, 0
            with contextlib.suppress(ConnectionClosed):
                await self.send({"type": "credit", "frames": unreturned})

    async def next_event(self, kind: str | None = None, timeout: float | None = 30.0) -> dict[str, Any]:
        """The next JSON message (of type ``kind``; others are skipped, errors raise ``ServerError``)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._events.get()
                if event is None:
                    self._events.put_nowait(None)
                    raise ServerError(f"connection closed ({self.close_code})", self.close_code)
                if event["type"] == "error" and kind != "error":
                    raise ServerError(f"{event['code']}: {event['message']}", event["code"], event["retry"])
                if kind is None or event["type"] == kind:
                    return event

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, str):
                    event = json.loads(message)
                    if event.get("type") == "error":
                        self.errors.append(event)
                    await self._events.put(event)
                    continue
                if not self._on_frame(message):
                    await self._consumed()
        except ConnectionClosed:
            pass
        finally:
            await self._frames.put(None)
            await self._events.put(None)

    def _on_frame(self, message: bytes) -> bool:
        """Queue a frame of the current epoch; False for a stale one (dropped here)."""
        now = time.monotonic()
        header, payload = decode_frame_message(message)
        if header.epoch < self.epoch:
            return False
        if self._decoder is None or self._decoder_epoch != header.epoch:
            self._decoder, self._decoder_epoch = FrameDecoder(header.codec), header.epoch
        image = self._decoder.decode(payload)
        st = self.stats
        st.frames += 1
        st.bytes += len(message)
        st.dropped += header.dropped
        if st.first_frame_latency_s is None:
            st.first_frame_latency_s = now - self._start_sent
        for seq in [s for s in self._action_sent if s <= header.action_seq]:
            sent = self._action_sent.pop(seq)
            if seq == header.action_seq:  # older seqs were superseded before any frame showed them
                st.action_latencies_s.append(now - sent)
        self._frames.put_nowait(Frame(header, image, now, len(message)))
        return True


async def record(url: str, *, prompt: str, seed: int, actions: list[int], num_frames: int, out: str | Path,
                 token: str | None = None, codec: str = "jpeg", fps: float = 16.0) -> dict[str, Any]:
    """``streamkd client``: stream ``num_frames`` frames into an mp4 while sending ``actions``.

    Actions are live, not scheduled: the action for a chunk is sent when the previous chunk
    starts arriving, and the server applies the latest one at its next chunk boundary. Each
    frame's header says which action it got.
    """
    from streamkd.data.toyworld import ACTIONS
    from streamkd.media.video import VideoWriter

    client = await StreamClient.connect(url, token=token, codecs=(codec,))
    F = client.chunk_frames
    written, last_sent = 0, None
    async with client:
        with VideoWriter(out, fps=fps) as writer:
            last_sent = actions[min(1, num_frames - 1)]
            await client.action(ACTIONS[last_sent])
            await client.start(prompt, seed=seed, fps=fps)
            while written < num_frames:
                frame = await client.next_frame()
                writer.write(frame.image[None])
                written += 1
                if frame.header.flags & FrameFlags.CHUNK_START:
                    wanted = actions[min((frame.header.chunk_seq + 1) * F, num_frames - 1)]
                    if wanted != last_sent:
                        await client.action(ACTIONS[wanted])
                        last_sent = wanted
    st = client.stats
    lat = sorted(st.action_latencies_s)
    return {
        "frames": written, "dropped": st.dropped, "bytes_per_frame": round(st.bytes / max(1, st.frames)),
        "first_frame_latency_ms": round(1e3 * (st.first_frame_latency_s or 0.0), 1),
        "action_latency_p50_ms": round(1e3 * lat[len(lat) // 2], 1) if lat else None,
    }
