"""One session can never hurt another (issue 11): a real server on a loopback port, real
``websockets`` clients and hostile raw-socket clients (``serve/hostile.py``), a well-behaved
session watching. Each test is written so that it failed on the server before the engine got a
single owner of its state and every socket wait got a deadline."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import random
import signal
import socket
import time
import urllib.request
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.protocol import State

from streamkd.bundle import CausalConfig
from streamkd.serve import hostile
from streamkd.serve.backends import ModelBackend
from streamkd.serve.bench import ServerProcess
from streamkd.serve.bench_hostile import ServerLog
from streamkd.serve.client import ServerError, StreamClient
from streamkd.serve.engine import EngineConfig
from streamkd.serve.protocol import CloseCode, ErrorCode
from streamkd.serve.server import ServerConfig, StreamServer
from tests.test_serve import PROMPT, run
from tests.test_serve_batching import tiny_causal_model

OTHER = "snow with blue circles"


@pytest.fixture(scope="module")
def backend() -> ModelBackend:
    return ModelBackend(tiny_causal_model(CausalConfig(2, 1, 4), guidance=1.0))


def lenient(**changes) -> ServerConfig:
    """Rate limits out of the way: these tests drive the engine, not the limiter."""
    return ServerConfig(port=0, control_rate=1000.0, control_burst=1000, heavy_rate=1000.0, heavy_burst=1000,
                        frame_rate=4000.0, frame_burst=4000, **changes)


class Watcher:
    """A well-behaved session streaming at ``fps`` in the background: counts frames, keeps
    returning credit, and records how it ended."""

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.times: list[float] = []
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, url: str, fps: float, seed: int = 1) -> "Watcher":
        client = await StreamClient.connect(url, credits=32)
        await client.start(PROMPT, seed=seed, fps=fps)
        return cls(client)

    async def _read(self) -> None:
        try:
            while True:
                await self.client.next_frame(timeout=None)
                self.times.append(time.monotonic())
        except ServerError as e:
            self.error = e

    def rate(self, since: float, until: float) -> float:
        return sum(since <= t < until for t in self.times) / (until - since)

    async def close(self) -> None:
        self._task.cancel()
        await self.client.close()


# ------------------------------------------------------------------------------ engine isolation
class PoisonedBackend(ModelBackend):
    """The real model backend, except that any forward containing a stream started with seed 666
    raises once that stream is past its warm-up -- when its cache layout lets it batch with
    others -- as a NaN check or an out-of-memory error caused by one session would."""

    POISON = 666

    def __init__(self, model) -> None:
        super().__init__(model)
        self.poisoned: set[int] = set()
        self.batched_failures = 0

    def start(self, spec):
        stream = super().start(spec)
        if spec.seed == self.POISON:
            self.poisoned.add(id(stream))
        return stream

    def step(self, streams, actions):
        if any(id(s) in self.poisoned and s.frames_done >= 12 for s in streams):
            self.batched_failures += len(streams) > 1
            raise RuntimeError("poisoned stream in this forward")
        return super().step(streams, actions)


def test_failing_session_is_ended_alone_and_its_batch_mates_stream_on(backend) -> None:
    poisoned = PoisonedBackend(backend.model)

    async def scenario():
        async with StreamServer(lenient(), poisoned) as srv:
            watcher = await Watcher.start(srv.url, fps=40)
            victim = await StreamClient.connect(srv.url)
            await victim.send({"type": "start", "prompt": PROMPT, "seed": PoisonedBackend.POISON, "fps": 40})
            with pytest.raises(ServerError):
                while True:
                    await victim.next_frame(timeout=10)
            assert victim.close_code == CloseCode.INTERNAL_ERROR
            assert [e["code"] for e in victim.errors] == [ErrorCode.INTERNAL]
            seen = len(watcher.times)
            await asyncio.sleep(1.0)
            assert watcher.error is None and len(watcher.times) >= seen + 10, "the batch mate stopped streaming"
            await watcher.close()
            await victim.close()

    run(scenario())
    assert poisoned.batched_failures >= 1, "the two sessions were never batched: the retry path was not exercised"


class SlowRecache(ModelBackend):
    """The real backend with the KV re-cache of a prompt switch taking 30 ms, as it does for a
    bigger model: the window in which the race of issue 11 struck is then wide enough to hit."""

    def switch_prompt(self, stream, prompt):
        time.sleep(0.03)
        super().switch_prompt(stream, prompt)


def test_prompt_then_stop_never_kills_other_sessions(backend) -> None:
    """The race of issue 11: ``prompt`` then ``stop`` a few ms later, while batched with others.
    The watcher keeps streaming at its pace, and no event or frame of a stopped epoch arrives."""

    async def scenario():
        async with StreamServer(lenient(), SlowRecache(backend.model)) as srv:
            watcher = await Watcher.start(srv.url, fps=16)
            racers = [await StreamClient.connect(srv.url, credits=4) for _ in range(2)]
            violations: list[str] = []
            t0 = time.monotonic()

            async def race(c: StreamClient, seed: int) -> int:
                rounds = 0
                while time.monotonic() - t0 < 6.0:
                    # unpaced and past the warm-up: due at every step, batched with the others
                    started = await c.start(PROMPT, seed=seed, fps=240)
                    for _ in range(8):
                        await c.next_frame(timeout=10)
                    await c.send({"type": "prompt", "prompt": OTHER})
                    await asyncio.sleep(random.uniform(0.0, 0.004))
                    await c.send({"type": "stop"})
                    stopped_epoch = started["epoch"]
                    await c.next_event("stopped", timeout=10)
                    stopped_at = time.monotonic()
                    # from here on, anything of the stopped epoch is a late delivery
                    try:
                        event = await c.next_event("prompt_applied", timeout=0.05)
                        if event["epoch"] <= stopped_epoch:
                            violations.append(f"prompt_applied of epoch {event['epoch']} after stop")
                    except TimeoutError:
                        pass
                    drained = 0
                    while not c._frames.empty():
                        frame = c._frames.get_nowait()
                        drained += 1
                        if frame is not None and frame.received_at > stopped_at:
                            violations.append(f"frame of epoch {frame.header.epoch} after stop")
                    if drained:
                        await c.send({"type": "credit", "frames": drained})
                    rounds += 1
                return rounds

            rounds = await asyncio.gather(*(race(c, 2 + i) for i, c in enumerate(racers)))
            t1 = time.monotonic()
            assert watcher.error is None, f"the watching session was closed: {watcher.error}"
            assert all(c.close_code is None for c in racers), [c.close_code for c in racers]
            assert min(rounds) >= 5, rounds
            assert violations == []
            assert watcher.rate(t0 + 1.0, t1) >= 0.8 * 16, f"watcher fell to {watcher.rate(t0 + 1.0, t1):.1f} frames/s"
            await watcher.close()
            for c in racers:
                await c.close()

    run(scenario(), timeout=60)


def test_random_control_sequences_close_no_session(backend) -> None:
    """start/reset/prompt/stop/pause/resume in random order with tiny gaps on three sessions: none
    is closed, and each still streams afterwards."""

    async def scenario():
        async with StreamServer(lenient(), SlowRecache(backend.model)) as srv:
            clients = [await StreamClient.connect(srv.url, credits=64) for _ in range(3)]
            rng = random.Random(11)
            for step in range(150):
                c = rng.choice(clients)
                kind = rng.choice(["start", "reset", "prompt", "stop", "pause", "resume", "action"])
                message = {"type": kind}
                if kind in ("start", "reset"):
                    message.update(prompt=rng.choice([PROMPT, OTHER]), seed=rng.randrange(5), fps=40)
                elif kind == "prompt":
                    message["prompt"] = rng.choice([PROMPT, OTHER])
                elif kind == "action":
                    message.update(seq=step + 1, action=rng.choice(["none", "left", "up"]))
                await c.send(message)
                await asyncio.sleep(rng.uniform(0, 0.01))
            for c in clients:
                await c.send({"type": "stop"})
                await c.send({"type": "stats"})
                while (await asyncio.wait_for(c._events.get(), 10))["type"] != "stats":  # all replies so far
                    pass
                await c.start(PROMPT, fps=40)
                await c.next_frame(timeout=10)
            assert all(c.close_code is None for c in clients)
            # the errors the sequence earned are the protocol's own (not started / already started)
            codes = {e["code"] for c in clients for e in c.errors}
            assert codes <= {ErrorCode.NOT_STARTED, ErrorCode.ALREADY_STARTED}, codes
            for c in clients:
                await c.close()

    run(scenario(), timeout=60)


def test_one_scratch_batch_whatever_the_churn(backend) -> None:
    """Batches of every size come and go; the backend keeps one scratch generator alive (it kept
    one per batch size forever: RSS grew with churn)."""
    made: weakref.WeakSet = weakref.WeakSet()

    class Counting(ModelBackend):
        def _generator(self, batch_size):
            gen = super()._generator(batch_size)
            made.add(gen)
            return gen

    counting = Counting(backend.model, max_batch=4)

    async def scenario():
        async with StreamServer(lenient(engine=EngineConfig(max_batch=4)), counting) as srv:
            clients = []
            for n in range(1, 5):
                clients.append(await StreamClient.connect(srv.url, credits=64))
                await clients[-1].start(PROMPT, seed=n, fps=60)
                for c in clients:
                    await c.next_frame(timeout=10)
                await asyncio.sleep(0.3)
            for c in clients[1:]:
                await c.close()
            await asyncio.sleep(0.3)
            gc.collect()
            return sorted(g.batch_size for g in made if g.batch_size > 1)

    scratch = run(scenario(), timeout=60)
    assert len(scratch) == 1, f"scratch generators alive for batch sizes {scratch}"


# ------------------------------------------------------------------- process level (RSS, signals)
@contextmanager
def served(checkpoint: Path, *extra_args: str):
    """``streamkd serve`` as its own process (as deployed: its RSS is its own), log drained."""
    server = ServerProcess(str(checkpoint), max_batch=8, threads=1, extra_args=extra_args)
    log = ServerLog(server)
    try:
        yield server, log
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.proc.stdout.close()


def healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return json.loads(r.read())


async def wait_sessions(port: int, n: int, timeout: float) -> float:
    """Seconds until /healthz reports ``n`` sessions (raises after ``timeout``)."""
    t0 = time.monotonic()
    while (await asyncio.to_thread(healthz, port))["sessions"] != n:
        assert time.monotonic() - t0 < timeout, f"still {(await asyncio.to_thread(healthz, port))['sessions']} sessions"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("student")
    tiny_causal_model(CausalConfig(2, 1, 4), guidance=1.0).save(folder)
    return folder


def test_ping_flood_of_a_non_reader_is_cut_off_with_memory_bounded(causal_dir) -> None:
    """Pings bypassed every budget and each queued a pong the client never read: +16 MB/s of
    server RSS and the other sessions below 1 frame/s. Now they count against the connection's
    frame budget and the flooder is cut off; RSS stays flat and the watcher streams on."""
    with served(causal_dir) as (server, log):
        async def scenario():
            watcher = await Watcher.start(server.url, fps=16)
            rss0 = server.rss_mb()
            t0 = time.monotonic()
            flood = await hostile.ping_flood(server.url, seconds=4.0, drain_s=0.5)
            t1 = time.monotonic()
            rss1 = server.rss_mb()
            await asyncio.sleep(0.5)
            assert watcher.error is None
            rate = watcher.rate(t0, t1)
            await watcher.close()
            return flood, rss1 - rss0, rate

        flood, grown_mb, rate = run(scenario(), timeout=60)
    assert flood["closed"] != "open", flood
    assert flood["closed_after_s"] is not None and flood["closed_after_s"] < 3.0, flood
    assert grown_mb < 30, f"server RSS grew {grown_mb:.0f} MB during the flood"
    assert rate >= 0.8 * 16, f"the watcher got {rate:.1f} frames/s during the flood"
    assert any("cut off (4008)" in line for line in log.lines), "the server did not log the cut-off with its code"


async def stuck_client(srv: StreamServer):
    """A client whose socket is full: the server side's kernel send buffer is shrunk to 4 KB (on
    loopback it would otherwise absorb megabytes), the client's receive buffer is 4 KB and it
    never reads; it asks for 8x frames at 240 fps, grants credit once, then falls silent. Every
    write of the server to it then waits on the library's drain. Returns the client socket and
    the server side of the connection."""
    ws = await hostile.RawWebSocket.open(srv.url, rcvbuf=4096)
    await ws.send_json({"type": "hello", "version": 1, "codecs": ["jpeg"], "credits": 64})
    await ws.recv_json()
    port = ws.sock.getsockname()[1]
    conn = next(c for c in srv._server.connections if c.remote_address[1] == port)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await ws.send_json({"type": "start", "prompt": PROMPT, "fps": 240, "size": [256, 256]})
    return ws, conn


def test_stuck_client_is_released_after_the_idle_timeout(backend) -> None:
    """The idle timeout fired, but closing waited on the full socket before any timeout applied:
    the socket and its handler leaked. Now the close has a deadline and the transport is aborted."""

    async def scenario():
        cfg = ServerConfig(port=0, idle_timeout_s=1.0, send_timeout_s=1.0)
        async with StreamServer(cfg, backend) as srv:
            ws, conn = await stuck_client(srv)
            await asyncio.sleep(0.3)
            assert srv.engine.num_sessions == 1
            t0 = time.monotonic()
            while srv.engine.num_sessions or conn.state is not State.CLOSED:
                assert time.monotonic() - t0 < 10, f"not released: {srv.engine.num_sessions} session(s), socket {conn.state.name}"
                await asyncio.sleep(0.05)
            ws.close()
            return time.monotonic() - t0

    released_after = run(scenario())
    assert released_after < 4, released_after  # idle 1 s (from the start) + send deadline 1 s + close 1 s


def test_shutdown_is_bounded_with_a_stuck_client(backend) -> None:
    """What SIGTERM runs: closing the server with a stuck client connected waited forever."""

    async def scenario():
        cfg = ServerConfig(port=0, shutdown_timeout_s=1.0, send_timeout_s=1.0)
        srv = StreamServer(cfg, backend)
        await srv.__aenter__()
        ws, _ = await stuck_client(srv)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await srv.close()
        ws.close()
        return time.monotonic() - t0

    assert run(scenario()) < 4


def test_sigterm_exits_in_time_with_a_non_reading_client(causal_dir) -> None:
    """``streamkd serve`` with a client that fills its buffers and reads nothing: SIGTERM ends
    the process within its shutdown timeout."""
    with served(causal_dir, "--send-timeout", "2", "--shutdown-timeout", "2") as (server, log):
        async def scenario():
            stuck = asyncio.create_task(hostile.non_reader(server.url, seconds=30.0, probe_s=None, credit_s=3.0, drain_s=0.1))
            await wait_sessions(server.port, 1, timeout=10)
            await asyncio.sleep(3.0)
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.proc.wait, 20)
            exited_after = time.monotonic() - t0
            stuck.cancel()
            return code, exited_after

        code, exited_after = run(scenario(), timeout=60)
    assert code == 0 and exited_after < 8, (code, exited_after)


def test_decompression_bomb_is_refused_from_its_header(backend) -> None:
    """A 40 KB PNG declaring 16000x16000 was decoded on the event loop (2 s blocked, +775 MB per
    message); now its header is read and it is refused before any pixel is decoded."""

    async def scenario():
        async with StreamServer(ServerConfig(port=0), backend) as srv:
            watcher = await Watcher.start(srv.url, fps=16)
            png = hostile.bomb_png()
            async with await StreamClient.connect(srv.url) as c:
                message = {"type": "start", "prompt": PROMPT,
                           "first_frame": {"format": "png", "data": base64.b64encode(png).decode()}}
                t0 = time.monotonic()
                await c.send(message)
                error = await c.next_event("error", timeout=10)
                took = time.monotonic() - t0
                await c.stats_request()  # still connected
            await watcher.close()
            return error, took

    error, took = run(scenario())
    assert error["code"] == ErrorCode.BAD_MESSAGE and "16000x16000" in error["message"], error
    assert took < 0.25, f"refusing the bomb took {took:.2f} s: it was decoded"


def test_parse_errors_and_duplicated_headers_get_their_documented_answers(backend) -> None:
    """A 5000-digit integer and fps 1e400 / 10**400 ended in a traceback and 1011; duplicated
    Host / Origin headers in a 500 with a traceback."""

    async def scenario():
        async with StreamServer(lenient(), backend) as srv:
            garbage = await hostile.parse_garbage(srv.url)
            headers = await hostile.dup_headers("127.0.0.1", srv.port)
            return garbage, headers

    garbage, headers = run(scenario())
    assert garbage["ok"], garbage["cases"]
    assert headers["ok"] and all(" 400 " in line for line in headers["status"].values()), headers["status"]


def test_soak_several_hostile_clients_while_a_good_session_keeps_its_rate(causal_dir) -> None:
    """Every hostile class at once for 10 s; the good session keeps >= 80% of its solo rate, the
    server's memory stays bounded, and it is healthy afterwards with only the good session left."""
    with served(causal_dir) as (server, log):
        async def scenario():
            watcher = await Watcher.start(server.url, fps=16)
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            await asyncio.sleep(4.0)
            solo = watcher.rate(t0, time.monotonic())
            rss0 = server.rss_mb()
            t1 = time.monotonic()
            url = server.url
            reports = await asyncio.gather(
                hostile.ping_flood(url, 10.0, drain_s=0.2), hostile.non_reader(url, 10.0, drain_s=0.2),
                hostile.message_flood(url, 10.0), hostile.decompression_bomb(url, 1000, seconds=10.0),
                hostile.churn(url, 100_000, seconds=10.0), hostile.prompt_stop_racer(url, 1000, seconds=10.0),
                hostile.parse_garbage(url, seconds=10.0),
            )
            t2 = time.monotonic()
            rss1 = server.rss_mb()
            soak = watcher.rate(t1 + 1.0, t2)
            assert watcher.error is None, watcher.error
            await watcher.close()
            health = await asyncio.to_thread(healthz, server.port)
            return solo, soak, rss1 - rss0, reports, health

        solo, soak, grown_mb, reports, health = run(scenario(), timeout=90)
    by_name = {r["client"]: r for r in reports}
    assert soak >= 0.8 * solo, f"good session {soak:.1f} frames/s beside the hostile clients, {solo:.1f} alone"
    assert grown_mb < 60, f"server RSS grew {grown_mb:.0f} MB"
    assert health["status"] == "ok"
    assert by_name["prompt_stop_racer"]["violations"] == 0, by_name["prompt_stop_racer"]
    assert by_name["ping_flood"]["closed"] != "open", by_name["ping_flood"]
    assert by_name["message_flood"]["closes"].get(str(int(CloseCode.RATE_LIMIT))), by_name["message_flood"]
    assert not [line for line in log.errors if "generation failed" in line], log.errors
