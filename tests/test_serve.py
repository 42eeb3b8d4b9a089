"""The websocket server end to end, on loopback with a tiny random-weight causal model:
protocol round trips, isolation, flow control, security limits, faults, graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamkd.cli import main
from streamkd.data.toyworld import ToyWorldConfig, render
from streamkd.bundle import CausalConfig
from streamkd.serve.backends import ModelBackend, StreamSpec, WorldOracleBackend
from streamkd.serve.client import ServerError, StreamClient
from streamkd.serve.engine import EngineConfig
from streamkd.serve.protocol import (
    HEADER_SIZE, CloseCode, ErrorCode, FrameFlags, FrameHeader, HeaderError, ProtocolError, decode_frame_message,
    encode_frame_message, parse_client_message,
)
from streamkd.serve.server import ServerConfig, StreamServer
from tests.test_serve_batching import tiny_causal_model

PROMPT = "forest with red squares"
WORLD = ToyWorldConfig(frame_size=32, map_size=128)


@pytest.fixture(scope="module")
def backend() -> ModelBackend:
    return ModelBackend(tiny_causal_model(CausalConfig(2, 1, 4), guidance=1.0))


def run(coro, timeout: float = 30.0):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def roundtrip(backend: ModelBackend, image: np.ndarray) -> np.ndarray:
    """What the model's codec makes of an image (frame 0 of an image-to-video stream)."""
    codec = backend.model.codec
    return codec.decode(codec.encode(torch.from_numpy(image)[None, None]))[0, 0].numpy()


def config(**changes) -> ServerConfig:
    return ServerConfig(port=0, **changes)


async def hello(ws, **fields) -> dict:
    await ws.send(json.dumps({"type": "hello", "version": 1, **fields}))
    return json.loads(await ws.recv())


async def closed_with(ws) -> int:
    """Read until the server closes; its close code."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    return info.value.rcvd.code


@contextmanager
def server_thread(cfg: ServerConfig, backend):
    """A server on its own event loop in a thread (for sync clients: hypothesis, CLI, browser)."""
    ready, stop = threading.Event(), None
    box: dict = {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        async with StreamServer(cfg, backend) as srv:
            box["server"] = srv
            ready.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "server did not start"
    try:
        yield box["server"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


# ------------------------------------------------------------------------------------ protocol
@given(
    epoch=st.integers(0, 2**32 - 1), frame_seq=st.integers(0, 2**32 - 1), chunk_seq=st.integers(0, 2**32 - 1),
    action_seq=st.integers(0, 2**32 - 1), pts=st.integers(0, 2**64 - 1), flags=st.integers(0, 31),
    codec=st.sampled_from(["jpeg", "h264"]), dropped=st.integers(0, 2**32 - 1), payload=st.binary(max_size=64),
)
def test_header_round_trip(epoch, frame_seq, chunk_seq, action_seq, pts, flags, codec, dropped, payload) -> None:
    header = FrameHeader(epoch, frame_seq, chunk_seq, action_seq, pts, FrameFlags(flags), codec, dropped)
    message = encode_frame_message(header, payload)
    assert len(message) == HEADER_SIZE + len(payload)
    assert decode_frame_message(message) == (header, payload)


def test_header_layout_is_fixed_little_endian() -> None:
    message = FrameHeader(1, 2, 3, 4, 5, FrameFlags.KEYFRAME | FrameFlags.DROPPED, "h264", 6).pack()
    assert message == (b"SKDF" + bytes([1, 3, 2, 36]) + (1).to_bytes(4, "little") + (2).to_bytes(4, "little")
                       + (3).to_bytes(4, "little") + (4).to_bytes(4, "little") + (5).to_bytes(8, "little")
                       + (6).to_bytes(4, "little"))
    for bad in (message[:10], b"XXXX" + message[4:], message[:4] + b"\x02" + message[5:]):
        with pytest.raises(HeaderError):
            decode_frame_message(bad)


@pytest.mark.parametrize("message", [
    {"type": "hello", "version": 1, "token": "secret-token", "codecs": ["h264", "jpeg"], "credits": 4},
    {"type": "start", "prompt": PROMPT, "seed": 3, "first_frame": None, "size": [64, 64], "fps": 30},
    {"type": "start", "prompt": PROMPT, "first_frame": {"format": "rgb24", "data": base64.b64encode(b"abc").decode()}},
    {"type": "action", "seq": 7, "action": "left"},
    {"type": "prompt", "prompt": "snow with blue circles"},
    {"type": "credit", "frames": 3},
    {"type": "reset", "seed": 5},
    {"type": "pause"}, {"type": "resume"}, {"type": "stop"}, {"type": "stats"},
])
def test_valid_messages_parse(message: dict) -> None:
    parsed = parse_client_message(json.dumps(message))
    assert type(parsed).__name__.lower() in (message["type"], "control", "promptswitch")


@pytest.mark.parametrize("raw, code", [
    ("{", ErrorCode.BAD_JSON), ("[]", ErrorCode.BAD_MESSAGE), ('{"type": 3}', ErrorCode.BAD_MESSAGE),
    ('{"type": "fly"}', ErrorCode.UNKNOWN_TYPE), (b"\x00\x01", ErrorCode.UNEXPECTED_BINARY),
    ('{"type": "action", "seq": 0, "action": "left"}', ErrorCode.BAD_MESSAGE),
    ('{"type": "action", "seq": 1, "action": "jump"}', ErrorCode.BAD_MESSAGE),
    ('{"type": "action", "seq": true, "action": "up"}', ErrorCode.BAD_MESSAGE),
    ('{"type": "start", "prompt": "   "}', ErrorCode.BAD_MESSAGE),
    ('{"type": "start"}', ErrorCode.BAD_MESSAGE),
    ('{"type": "start", "prompt": "forest with red squares", "fps": 1e309}', ErrorCode.BAD_JSON),
    ('{"type": "start", "prompt": "forest with red squares", "fps": 0}', ErrorCode.BAD_MESSAGE),
    ('{"type": "start", "prompt": "forest with red squares", "first_frame": {"format": "rgb24", "data": "!!"}}', ErrorCode.BAD_MESSAGE),
    ('{"type": "credit", "frames": 1000}', ErrorCode.BAD_MESSAGE),
    ('{"type": "stats", "extra": 1}', ErrorCode.BAD_MESSAGE),
    ("[" * 100000 + "]" * 100000, ErrorCode.BAD_JSON),
])
def test_bad_messages_name_the_problem(raw, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(raw)
    if code == ErrorCode.BAD_JSON and "1e309" in raw:  # json accepts Infinity literals: caught as a range error
        assert info.value.code == ErrorCode.BAD_MESSAGE
    else:
        assert info.value.code == code
    assert str(info.value)


# ------------------------------------------------------------------------------- streaming
def test_http_routes_and_stream(backend) -> None:
    async def scenario():
        async with StreamServer(config(), backend) as srv:
            base = f"http://127.0.0.1:{srv.port}"
            page = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/", timeout=5))
            assert page.status == 200 and b"<canvas" in page.read()
            assert "connect-src" in page.headers["Content-Security-Policy"]
            js = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/app.js", timeout=5).read())
            assert b"parseHeader" in js
            health = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/healthz", timeout=5).read()))
            assert health["status"] == "ok" and health["sessions"] == 0
            for path, status in (("/nope", 404), ("/../../etc/passwd", 404)):
                with pytest.raises(urllib.error.HTTPError) as info:
                    await asyncio.to_thread(urllib.request.urlopen, base + path, timeout=5)
                assert info.value.code == status
            # DNS rebinding: a foreign Host is refused on a loopback bind
            req = urllib.request.Request(base + "/healthz", headers={"Host": f"evil.example:{srv.port}"})
            with pytest.raises(urllib.error.HTTPError) as info:
                await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=5))
            assert info.value.code == 421

            async with await StreamClient.connect(srv.url) as client:
                started = await client.start(PROMPT, seed=4, fps=40)
                assert started["epoch"] == 1 and started["chunk_frames"] == 2
                frames = [await client.next_frame() for _ in range(8)]
                stats = await client.stats_request()
            assert [f.header.frame_seq for f in frames] == list(range(8))
            assert frames[0].header.flags & FrameFlags.EPOCH_START and frames[0].header.flags & FrameFlags.CHUNK_START
            assert all(f.header.flags & FrameFlags.KEYFRAME for f in frames)
            assert [f.header.pts_us for f in frames[:3]] == [0, 25000, 50000]
            assert frames[0].image.shape == (32, 32, 3)
            # frame 0 is the toy world's first frame (held clean), through codec and JPEG
            truth = render(4, PROMPT, [0], 1, WORLD)[0]
            expected = roundtrip(backend, truth)
            assert np.abs(frames[0].image.astype(int) - expected.astype(int)).mean() < 8
            assert stats["frames_sent"] >= 8 and stats["codec"] == "jpeg"

    run(scenario())


def test_two_sessions_never_see_each_others_frames(backend) -> None:
    async def scenario():
        async with StreamServer(config(), backend) as srv:
            a = await StreamClient.connect(srv.url)
            b = await StreamClient.connect(srv.url)
            await a.start(PROMPT, seed=1, fps=50)
            await b.start("snow with blue circles", seed=2, fps=50)
            await b.reset(seed=2)  # b is on epoch 2, a on epoch 1

            async def frames(c):  # both read at once: neither falls behind and gets frames dropped
                return [await c.next_frame() for _ in range(12)]

            fa, fb = await asyncio.gather(frames(a), frames(b))
            health = srv.engine.health()
            forwards, chunks = health["forwards"], health["chunks"]
            await a.close()
            await b.close()
        return fa, fb, forwards, chunks

    fa, fb, forwards, chunks = run(scenario())
    assert {f.header.epoch for f in fa} == {1} and {f.header.epoch for f in fb} == {2}
    assert [f.header.frame_seq for f in fa] == list(range(12)) == [f.header.frame_seq for f in fb]
    truth_a = render(1, PROMPT, [0], 1, WORLD)[0].astype(int)
    truth_b = render(2, "snow with blue circles", [0], 1, WORLD)[0].astype(int)
    err = lambda img, truth: np.abs(img.astype(int) - truth).mean()  # noqa: E731
    assert err(fa[0].image, truth_a) < err(fa[0].image, truth_b)
    assert err(fb[0].image, truth_b) < err(fb[0].image, truth_a)
    assert forwards < chunks, "concurrent sessions should have been batched into shared forwards"


def test_controls_actions_prompt_pause_reset_stop(backend) -> None:
    async def scenario():
        async with StreamServer(config(), backend) as srv:
            async with await StreamClient.connect(srv.url, codecs=("h264", "jpeg")) as c:
                assert c.codec == "h264"
                with pytest.raises(ServerError, match="not_started"):
                    await c.prompt("snow with blue circles")
                    await c.next_event("stopped", timeout=5)
                await c.start(PROMPT, seed=0, fps=100)
                first = await c.next_frame()
                assert first.header.flags & FrameFlags.KEYFRAME  # h264 starts with an IDR frame
                seq = await c.action("right")
                await c.send({"type": "action", "seq": seq - 1 if seq > 1 else seq, "action": "left"})  # stale: ignored
                while (f := await c.next_frame()).header.action_seq < seq:
                    pass
                assert f.header.flags & FrameFlags.CHUNK_START  # actions apply at chunk boundaries
                await c.send({"type": "start", "prompt": PROMPT})
                err = await c.next_event("error")
                assert err["code"] == ErrorCode.ALREADY_STARTED and err["retry"] is False
                await c.prompt("snow with blue circles")
                applied = await c.next_event("prompt_applied")
                while (f := await c.next_frame()).header.frame_seq < applied["frame_seq"]:
                    pass
                assert f.header.frame_seq == applied["frame_seq"] and f.header.flags & FrameFlags.PROMPT_CHANGED
                await c.send({"type": "pause"})
                await c.next_event("paused")
                await asyncio.sleep(0.2)
                generated = (await c.stats_request())["frames_generated"]
                await asyncio.sleep(0.3)
                assert (await c.stats_request())["frames_generated"] == generated
                await c.send({"type": "resume"})
                await c.next_event("resumed")
                await c.reset(seed=9, fps=50)
                f = await c.next_frame()
                assert f.header.epoch == 2 and f.header.frame_seq == 0 and f.header.flags & FrameFlags.EPOCH_START
                assert f.header.pts_us == 0
                await c.send({"type": "stop"})
                await c.next_event("stopped")
                await c.ws.send(b"\x00binary")
                assert (await c.next_event("error"))["code"] == ErrorCode.UNEXPECTED_BINARY
                assert (await c.stats_request())["type"] == "stats"  # still connected

    run(scenario())


def test_first_frame_upload_and_size(backend) -> None:
    async def scenario():
        async with StreamServer(config(), backend) as srv:
            async with await StreamClient.connect(srv.url) as c:
                image = render(7, PROMPT, [0], 1, WORLD)[0]
                await c.send({"type": "start", "prompt": PROMPT, "first_frame": {"format": "rgb24", "data": "AAAA"}})
                assert "bytes" in (await c.next_event("error"))["message"]
                await c.send({"type": "start", "prompt": PROMPT, "size": [33, 33]})
                assert (await c.next_event("error"))["code"] == ErrorCode.BAD_MESSAGE
                # what the model reads is the backend's to check: the toy world's grammar here
                await c.send({"type": "start", "prompt": "forest with purple squares"})
                err = await c.next_event("error")
                assert err["code"] == ErrorCode.BAD_MESSAGE and "unknown colour 'purple'" in err["message"]
                await c.start(PROMPT, first_frame=image, size=(64, 64), fps=100)
                f = await c.next_frame()
                assert f.image.shape == (64, 64, 3)  # 2x nearest-neighbour
                expected = roundtrip(backend, image)
                assert np.abs(f.image[::2, ::2].astype(int) - expected.astype(int)).mean() < 8

    run(scenario())


# ------------------------------------------------------------------------------ flow control
def test_slow_client_gets_dropped_flags_and_bounded_queue(backend) -> None:
    async def scenario():
        async with StreamServer(config(), backend) as srv:
            async with connect(srv.url) as ws:
                await hello(ws, credits=1)
                await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": 200}))
                assert json.loads(await ws.recv())["type"] == "started"
                header, _ = decode_frame_message(await ws.recv())  # the one credit
                assert header.frame_seq == 0
                await asyncio.sleep(1.0)  # no credit: the server keeps generating and dropping
                session = next(iter(srv.engine._sessions.values()))
                capacity = session.outbox.capacity
                await ws.send(json.dumps({"type": "stats"}))
                stats = json.loads(await ws.recv())
                assert stats["frames_generated"] > 3 * capacity
                assert stats["queued_frames"] <= capacity and stats["frames_dropped"] > 0
                await ws.send(json.dumps({"type": "credit", "frames": 2}))
                header, _ = decode_frame_message(await ws.recv())
                assert header.flags & FrameFlags.DROPPED and header.dropped > 0
                assert header.frame_seq > 1

            # a client that reads nothing at all: server-side queues stay bounded
            async with connect(srv.url, max_queue=1) as ws:
                await hello(ws, credits=64)
                await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": 200}))
                await asyncio.sleep(1.0)
                session = next(iter(srv.engine._sessions.values()))
                assert len(session.outbox) <= session.outbox.capacity
                assert session.frames_generated > 2 * session.outbox.capacity

    run(scenario())


def test_client_killed_mid_stream_frees_session(backend) -> None:
    async def scenario():
        async with StreamServer(config(), backend) as srv:
            witness = await StreamClient.connect(srv.url)
            await witness.start(PROMPT, seed=1, fps=100)
            victim = await StreamClient.connect(srv.url)
            await victim.start(PROMPT, seed=2, fps=100)
            await victim.next_frame()
            session = next(s for s in srv.engine._sessions.values() if s.id == victim.welcome["session"])
            cache_ref = weakref.ref(session.stream.gen.cache.k_NBSHD)
            del session
            victim.ws.transport.abort()  # no close frame: a killed process
            for _ in range(100):
                if srv.engine.num_sessions == 1:
                    break
                await asyncio.sleep(0.05)
            assert srv.engine.num_sessions == 1
            seq = (await witness.next_frame()).header.frame_seq
            assert (await witness.next_frame()).header.frame_seq > seq  # the other session streams on
            for _ in range(40):
                gc.collect()
                if cache_ref() is None:
                    break
                await asyncio.sleep(0.05)
            assert cache_ref() is None, "the killed session's KV cache is still referenced"
            await witness.close()
            await victim.close()

    run(scenario())


# ---------------------------------------------------------------------------------- security
def test_token_auth(backend) -> None:
    async def scenario():
        async with StreamServer(config(token="correct-horse"), backend) as srv:
            async with await StreamClient.connect(srv.url, token="correct-horse") as c:
                assert c.welcome["type"] == "welcome"
            for token in ("wrong-token", None):
                with pytest.raises(ServerError) as info:
                    await StreamClient.connect(srv.url, token=token)
                assert info.value.code == CloseCode.UNAUTHORIZED

    run(scenario())


def test_non_loopback_bind_needs_token(capsys) -> None:
    with pytest.raises(ValueError, match="--token"):
        ServerConfig(host="0.0.0.0")
    ServerConfig(host="0.0.0.0", token="long-enough-token")
    assert main(["serve", "--host", "0.0.0.0", "--checkpoint", "/does/not/matter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to bind 0.0.0.0") and "Traceback" not in err


def test_non_causal_checkpoint_refused_by_serve(tmp_path, capsys) -> None:
    model = tiny_causal_model(CausalConfig())
    model.cfg.causal = None
    model.save(tmp_path / "teacher")
    assert main(["serve", "--checkpoint", str(tmp_path / "teacher"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "bidirectional" in err and "causal" in err and "Traceback" not in err


def test_origin_allowlist(backend) -> None:
    async def scenario():
        async with StreamServer(config(origins=("http://tools.example:9000",)), backend) as srv:
            with pytest.raises(InvalidStatus) as info:
                await connect(srv.url, origin="http://evil.example")
            assert info.value.response.status_code == 403
            for origin in (f"http://127.0.0.1:{srv.port}", "http://tools.example:9000"):
                async with connect(srv.url, origin=origin) as ws:
                    assert (await hello(ws))["type"] == "welcome"

    run(scenario())


def test_limits_close_with_documented_codes(backend) -> None:
    async def scenario():
        cfg = config(max_message_bytes=4096, control_rate=5, control_burst=5, idle_timeout_s=0.5, hello_timeout_s=0.5)
        async with StreamServer(cfg, backend) as srv:
            async with connect(srv.url) as ws:  # oversized message
                await hello(ws)
                await ws.send(json.dumps({"type": "stats", "pad": "x" * 10000}))
                assert await closed_with(ws) == CloseCode.MESSAGE_TOO_BIG
            async with connect(srv.url) as ws:  # flooding
                await hello(ws)
                for _ in range(20):
                    await ws.send(json.dumps({"type": "stats"}))
                replies = []
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        replies.append(json.loads(await ws.recv()))
                assert any(r.get("code") == ErrorCode.RATE_LIMITED and r["retry"] for r in replies)
                assert info.value.rcvd.code == CloseCode.RATE_LIMIT
            async with connect(srv.url) as ws:  # idle
                await hello(ws)
                assert await closed_with(ws) == CloseCode.IDLE_TIMEOUT
            for first, code in (
                ('{"type": "stats"}', CloseCode.PROTOCOL_ERROR), ("nonsense", CloseCode.PROTOCOL_ERROR),
                ('{"type": "hello", "version": 2}', CloseCode.UNSUPPORTED_VERSION),
                ('{"type": "hello", "codecs": ["vp9"]}', CloseCode.PROTOCOL_ERROR), (None, CloseCode.PROTOCOL_ERROR),
            ):
                async with connect(srv.url) as ws:
                    if first is not None:
                        await ws.send(first)
                    assert await closed_with(ws) == code
            assert srv.engine.num_sessions == 0

    run(scenario())


def test_server_full_closes_with_try_again_later(backend) -> None:
    async def scenario():
        async with StreamServer(config(engine=EngineConfig(max_sessions=1)), backend) as srv:
            async with await StreamClient.connect(srv.url):
                with pytest.raises(ServerError) as info:
                    await StreamClient.connect(srv.url)
                assert info.value.code == CloseCode.TRY_AGAIN_LATER

    run(scenario())


def test_server_fault_is_generic_for_the_client(backend, caplog) -> None:
    """A generator failure ends that session with 1011 and a message without internals."""

    class Exploding(WorldOracleBackend):
        def step(self, streams, actions):
            raise RuntimeError("secret /internal/path exploded")

    async def scenario():
        async with StreamServer(config(), Exploding(WORLD, 2)) as srv:
            async with await StreamClient.connect(srv.url) as c:
                await c.start(PROMPT)
                with pytest.raises(ServerError) as info:
                    await c.next_event("never")
                assert info.value.code == ErrorCode.INTERNAL and "/internal" not in str(info.value)
                with pytest.raises(ServerError, match="connection closed"):
                    await c.next_event("never")
                assert c.close_code == CloseCode.INTERNAL_ERROR
            assert (await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{srv.port}/healthz", timeout=5).read())))["status"] == "ok"

    run(scenario())
    assert "secret /internal/path exploded" in caplog.text  # the details go to the server log


# ------------------------------------------------------------------------- process level
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("student")
    tiny_causal_model(CausalConfig(2, 1, 4), guidance=1.0).save(folder)
    return folder


def test_cli_client_records_mp4(backend, tmp_path) -> None:
    from streamkd.media.video import read_video

    out = tmp_path / "live.mp4"
    with server_thread(config(), backend) as srv:
        code = main(["client", "--url", srv.url, "--actions", "right:4,down:4", "--frames", "10", "--out", str(out), "--fps", "100"])
    assert code == 0
    assert read_video(out).shape == (10, 32, 32, 3)
    assert main(["client", "--url", "ws://127.0.0.1:1/ws", "--frames", "2", "--out", str(tmp_path / "x.mp4")]) == 2


def test_sigterm_closes_every_client_with_going_away(causal_dir) -> None:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "streamkd.cli", "serve", "--checkpoint", str(causal_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(1)]
        while "serving" not in lines[-1] and lines[-1] and len(lines) < 20:  # log lines come first
            lines.append(proc.stdout.readline())
        assert "serving" in lines[-1], "".join(lines)

        async def scenario():
            clients = [await StreamClient.connect(f"ws://127.0.0.1:{port}/ws") for _ in range(2)]
            for c in clients:
                await c.start(PROMPT, fps=50)
                await c.next_frame()
            proc.send_signal(signal.SIGTERM)
            codes = []
            for c in clients:
                with pytest.raises(ServerError, match="connection closed"):
                    while True:
                        await c.next_frame(timeout=10)
                codes.append(c.close_code)
            return codes

        assert run(scenario()) == [CloseCode.GOING_AWAY] * 2
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_world_oracle_moves_with_actions() -> None:
    """The oracle backend (client development) shifts content by speed_px per frame of a move."""
    backend = WorldOracleBackend(WORLD, chunk_frames=2)
    stream = backend.start(StreamSpec(PROMPT, 3, "world"))
    first = backend.step([stream], [4])[0]
    second = backend.step([stream], [4])[0]
    frames = np.concatenate([first, second])
    s = WORLD.speed_px
    for a, b in zip(frames[:-1], frames[1:]):
        np.testing.assert_array_equal(b[:, :-s], a[:, s:])  # camera right: content moves left
    np.testing.assert_array_equal(first[0], backend.world_first_frame(3, PROMPT))



def test_engine_worker_sets_its_own_thread_count() -> None:
    """OpenMP thread counts are per calling thread: the worker sets the configured count for
    itself (``streamkd serve`` keeps the main thread at one so no second OpenMP team throttles the
    worker's; see cmd_serve), and 0 takes the creating thread's count."""
    from streamkd.serve.engine import Engine

    class Recording(WorldOracleBackend):
        seen: list[int] = []

        def step(self, streams, actions):
            self.seen.append(torch.get_num_threads())
            return super().step(streams, actions)

    for threads, expected in ((1, 1), (0, torch.get_num_threads())):
        backend = Recording(WORLD, chunk_frames=2)
        backend.seen = []
        engine = Engine(backend, EngineConfig(threads=threads))
        try:
            session = engine.open_session(lambda: None)
            engine.start(session, StreamSpec(PROMPT, 3, "world"), fps=240.0)
            for _ in range(200):
                if backend.seen:
                    break
                threading.Event().wait(0.01)
            assert backend.seen and set(backend.seen) == {expected}, (threads, backend.seen)
        finally:
            engine.shutdown()
    with pytest.raises(ValueError, match="threads must be >= 0"):
        EngineConfig(threads=-1)
