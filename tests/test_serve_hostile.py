"""One session can never hurt another (issue 11): a real server on a loopback port, real
``websockets`` clients and hostile raw-socket clients (``serve/hostile.py``), a well-behaved
session watching. Each test is written so that it failed on the server before the engine got a
single owner of its state and every socket wait got a deadline."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import subprocess
import sys
import time
import weakref

import pytest

from streamkd.models.world import CausalConfig
from streamkd.serve.backends import ModelBackend
from streamkd.serve.client import ServerError, StreamClient
from streamkd.serve.engine import EngineConfig
from streamkd.serve.protocol import CloseCode, ErrorCode
from streamkd.serve.server import ServerConfig, StreamServer
from tests.test_serve import PROMPT, _free_port, run
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
