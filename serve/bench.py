"""Serving benchmarks on loopback: ``python -m streamkd.serve.bench --checkpoint toy-student``.

The server runs as a real ``streamkd serve`` subprocess (its own interpreter, as deployed);
clients run here. Figures and what each counts:

* first_frame_latency_ms: ``start`` sent -> first frame received (median of fresh sessions);
* action_latency_ms p50/p99: ``action`` sent -> first frame whose header carries that action
  seq, one session paced at --fps (actions are read at chunk boundaries, so this includes up to
  one chunk of waiting plus the chunk's generation);
* fps_per_session: frames received per second per session over a steady window (warm-up
  excluded), N concurrent unpaced sessions, with batching (--max-batch 8) and without (1);
* rss_mb: server resident memory every few seconds while one client reads nothing for 60 s;
* bytes_per_frame: mean frame message size (header included), JPEG and H.264.

``--as-causal`` streams a bidirectional checkpoint (e.g. toy-teacher) through the causal path
with a 4-level few-step sampler: a stand-in of student size and cost until a student ships.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from streamkd.serve.client import StreamClient

PROMPT = "forest with red squares"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint: str, max_batch: int, threads: int, extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args``: more ``streamkd serve`` options (timeouts, --world-oracle ...)."""
        self.port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamkd.cli", "serve", "--checkpoint", checkpoint, "--port", str(self.port),
             "--max-batch", str(max_batch), "--max-sessions", "16", *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for _ in range(50):
            line = self.proc.stdout.readline()
            if "serving" in line:
                break
            if not line:
                raise RuntimeError("server did not start")
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def first_frame_latency(url: str, sessions: int = 5) -> float:
    out = []
    for i in range(sessions):
        async with await StreamClient.connect(url) as c:
            await c.start(PROMPT, seed=i, fps=16)
            await c.next_frame()
            out.append(c.stats.first_frame_latency_s * 1e3)
    return round(_pct(out, 0.5), 1)


async def action_latency(url: str, fps: float, actions: int) -> dict:
    async with await StreamClient.connect(url) as c:
        await c.start(PROMPT, fps=fps)
        rng = random.Random(0)

        async def drain():
            while True:
                await c.next_frame()

        reader = asyncio.create_task(drain())
        names = ["up", "down", "left", "right", "none"]
        for _ in range(actions):
            await asyncio.sleep(rng.uniform(0.3, 0.6))
            await c.action(rng.choice(names))
        await asyncio.sleep(1.0)
        reader.cancel()
        lat = [x * 1e3 for x in c.stats.action_latencies_s]
    return {"p50": round(_pct(lat, 0.5), 1), "p99": round(_pct(lat, 0.99), 1), "count": len(lat)}


async def throughput(url: str, sessions: int, warmup_s: float, window_s: float) -> float:
    clients = [await StreamClient.connect(url, credits=32) for _ in range(sessions)]
    counts = [0] * sessions
    measuring = False

    async def pump(i: int, c: StreamClient):
        nonlocal counts
        while True:
            await c.next_frame()
            if measuring:
                counts[i] += 1

    for i, c in enumerate(clients):
        await c.start(PROMPT, seed=i, fps=240)
    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(clients)]
    await asyncio.sleep(warmup_s)
    measuring = True
    await asyncio.sleep(window_s)
    measuring = False
    for t in tasks:
        t.cancel()
    for c in clients:
        await c.close()
    return round(sum(counts) / sessions / window_s, 2)


async def idle_reader_rss(server: ServerProcess, seconds: float) -> dict:
    samples = [server.rss_mb()]
    async with connect(server.url, max_queue=1) as ws:
        await ws.send(json.dumps({"type": "hello", "credits": 64}))
        await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": 16}))
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(5)
            samples.append(server.rss_mb())
    return {"start": round(samples[0], 1), "end": round(samples[-1], 1), "max": round(max(samples), 1),
            "samples": [round(x, 1) for x in samples]}


async def bytes_per_frame(url: str, codec: str, frames: int = 48) -> int:
    async with await StreamClient.connect(url, codecs=(codec,)) as c:
        await c.start(PROMPT, fps=16)
        await c.action("right")
        for _ in range(frames):
            await c.next_frame()
        return round(c.stats.bytes / c.stats.frames)


def stand_in(checkpoint: str, folder: Path) -> str:
    """A causal copy of a bidirectional checkpoint with a 4-level few-step sampler."""
    from streamkd.bundle import CausalConfig, SamplingConfig
    from streamkd.models.world import WorldModel

    model = WorldModel.load(checkpoint)
    model.cfg.causal = CausalConfig()
    model.cfg.sampling = SamplingConfig(kind="few_step", num_steps=4)
    model.save(folder)
    return str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="toy-student")
    p.add_argument("--as-causal", action="store_true", help="stream a bidirectional checkpoint causally (stand-in)")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--window", type=float, default=8.0, help="seconds measured per throughput point")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--json", help="write the result here as well")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = stand_in(args.checkpoint, Path(tmp)) if args.as_causal else args.checkpoint
        result: dict = {"checkpoint": args.checkpoint + (" (as causal, few_step 4)" if args.as_causal else "")}
        server = ServerProcess(checkpoint, 8, args.threads)
        try:
            result["first_frame_latency_ms"] = asyncio.run(first_frame_latency(server.url))
            result["action_latency_ms"] = asyncio.run(action_latency(server.url, 16.0, 40))
            result["bytes_per_frame"] = {c: asyncio.run(bytes_per_frame(server.url, c)) for c in ("jpeg", "h264")}
            result["rss_mb_idle_reader"] = asyncio.run(idle_reader_rss(server, args.idle_seconds))
            batched = {n: asyncio.run(throughput(server.url, n, 3.0, args.window)) for n in args.sessions}
        finally:
            server.stop()
        server = ServerProcess(checkpoint, 1, args.threads)
        try:
            unbatched = {n: asyncio.run(throughput(server.url, n, 3.0, args.window)) for n in args.sessions}
        finally:
            server.stop()
        result["fps_per_session"] = {
            str(n): {"batched": batched[n], "unbatched": unbatched[n], "gain": round(batched[n] / max(unbatched[n], 1e-9), 2)}
            for n in args.sessions
        }
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
