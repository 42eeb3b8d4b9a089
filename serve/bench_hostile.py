"""One good session beside hostile clients:
``python -m streamkd.serve.bench_hostile --checkpoint toy-student-fast --json docs/bench_serve_hostile.json``.

Each row starts a fresh ``streamkd serve`` subprocess (``bench.ServerProcess``), so no row
inherits another's damage, and streams one well-behaved session through it: paced at --fps,
one action per chunk, consuming frames and returning credit as ``StreamClient`` does. The first
row has the good session alone (the baseline); then each class of ``serve/hostile.py`` runs
beside it in turn; then the soak, several classes at once; the last row is the good session
alone again (if it differs much from the first, something else was loading the machine).

Every hostile client runs in its own process (multiprocessing, spawn), not in the good
session's event loop: a flood that keeps its loop busy would otherwise delay the good client's
reads and show up as server slowness. The processes still share this machine's cores with the
server, as a hostile client on the same host would; ``cpu_s`` in each report says how much
they used.

Figures and what each counts (per row):

* good fps: frames the good session received per second over the window (--seconds, after
  --warmup seconds); the stream is paced, so alone it is about --fps;
* ratio: good fps / the alone row's;
* action p50 / p99: ``action`` sent -> first frame whose header carries its seq, over the
  actions answered in the window (actions are read at chunk boundaries: up to ~2 chunks);
* longest gap: the longest wait between two good frames in the window (a stall);
* server RSS: resident memory of the server process, before the hostile clients start, then
  every 0.5 s through warm-up and window (min / max / last), and once more after the hostile
  clients have finished;
* server CPU: the server process's CPU time over the window, in % of one core;
* hostile: how each hostile client's connection ended (closed with a code after so many
  seconds, or still open), from its own report (keys in ``serve/hostile.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import cycle
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streamkd.serve import hostile
from streamkd.serve.bench import PROMPT, ServerProcess, _pct
from streamkd.serve.client import ServerError, StreamClient
from streamkd.serve.protocol import FrameFlags

_COUNT = 10**9  # count-based clients run until their ``seconds`` are up
HOSTILE: dict[str, Callable[[str, float], Awaitable[dict[str, Any]]]] = {
    "ping_flood": hostile.ping_flood,
    "non_reader": hostile.non_reader,
    "prompt_stop_racer": lambda url, s: hostile.prompt_stop_racer(url, _COUNT, seconds=s),
    "churn": lambda url, s: hostile.churn(url, _COUNT, seconds=s),
    "decompression_bomb": lambda url, s: hostile.decompression_bomb(url, _COUNT, seconds=s),
    "message_flood": lambda url, s: hostile.message_flood(url, s, reconnect=True),
    "parse_garbage": lambda url, s: hostile.parse_garbage(url, seconds=s),
    "dup_headers": lambda url, s: hostile.dup_headers(urlsplit(url).hostname, urlsplit(url).port),
}
"""How the benchmark runs each class for ``s`` seconds: count-based ones until time is up,
``message_flood`` reconnecting after each close (a sustained flood), ``dup_headers`` once."""


# ------------------------------------------------------------------------------- hostile side
def _hostile_main(name: str, url: str, seconds: float, ready, go, out) -> None:
    """Body of a hostile process: signal ready (imports done), wait for go, run, report."""
    ready.set()
    go.wait()
    cpu = time.process_time()
    try:
        result = asyncio.run(asyncio.wait_for(HOSTILE[name](url, seconds), seconds + 60))
    except Exception as e:  # the report says so; the row goes on
        result = {"client": name, "failed": f"{type(e).__name__}: {e}"}
    result["cpu_s"] = round(time.process_time() - cpu, 2)
    out.put(result)


class HostileProcess:
    def __init__(self, name: str, url: str, seconds: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name, self.seconds = name, seconds
        self.ready, self.go, self.out = ctx.Event(), ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_hostile_main, args=(name, url, seconds, self.ready, self.go, self.out), daemon=True)
        self.proc.start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"hostile process {self.name} did not start")

    def result(self) -> dict[str, Any]:
        try:
            return self.out.get(timeout=self.seconds + 90)
        except queue.Empty:
            self.proc.terminate()
            return {"client": self.name, "failed": "did not finish"}
        finally:
            self.proc.join(10)


# ---------------------------------------------------------------------------------- good side
async def good_session(url: str, warmup_s: float, window_s: float, fps: float) -> dict[str, Any]:
    """One paced session with an action per chunk; figures over the window after the warm-up."""
    out: dict[str, Any] = {"fps": 0.0, "action_latency_ms": None, "longest_gap_s": None, "dropped": 0, "error": None}
    try:
        client = await StreamClient.connect(url, credits=8)
    except (ServerError, OSError, TimeoutError) as e:
        out["error"] = f"connect: {e or type(e).__name__}"
        return out
    t0 = time.monotonic()
    w0, w1 = t0 + warmup_s, t0 + warmup_s + window_s
    marks: dict[str, int] = {}

    async def mark(name: str, at: float) -> None:  # which latencies were measured in the window
        await asyncio.sleep(at - time.monotonic())
        marks[name] = len(client.stats.action_latencies_s)

    markers = [asyncio.create_task(mark("from", w0)), asyncio.create_task(mark("to", w1))]
    times: list[float] = []
    actions = cycle(["up", "left", "down", "right"])
    try:
        await client.start(PROMPT, fps=fps)
        while (left := w1 - time.monotonic()) > 0:
            try:
                frame = await client.next_frame(timeout=left)
            except TimeoutError:
                break
            if frame.received_at >= w0:
                times.append(frame.received_at)
                out["dropped"] += frame.header.dropped
            if frame.header.flags & FrameFlags.CHUNK_START:
                await client.action(next(actions))
    except (ServerError, TimeoutError) as e:  # closed, or no ``started`` within 30 s
        out["error"] = str(e) or type(e).__name__
    finally:
        await asyncio.wait(markers, timeout=max(0.0, w1 - time.monotonic()) + 0.1)
        for task in markers:
            task.cancel()
        await client.close()
    window = [t for t in times if t < w1]
    out["fps"] = round(len(window) / window_s, 2)
    edges = [w0, *window, w1]
    out["longest_gap_s"] = round(max(b - a for a, b in zip(edges, edges[1:])), 3)
    lat = [1e3 * x for x in client.stats.action_latencies_s[marks.get("from", 0):marks.get("to")]]
    if lat:
        out["action_latency_ms"] = {"p50": round(_pct(lat, 0.5), 1), "p99": round(_pct(lat, 0.99), 1), "count": len(lat)}
    return out


# -------------------------------------------------------------------------------- server side
class ServerLog:
    """Reads the server's output in a thread (an unread pipe would block its logging once
    full); keeps its last 5000 lines and every ERROR line."""

    def __init__(self, server: ServerProcess) -> None:
        self.errors: list[str] = []
        self.lines: deque[str] = deque(maxlen=5000)
        self._thread = threading.Thread(target=self._read, args=(server.proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                self.lines.append(line.rstrip())
                if " ERROR " in line:
                    self.errors.append(line.strip())
        except (ValueError, OSError):  # ServerProcess.stop closed the pipe
            pass


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _healthz(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return f"{r.status} {json.loads(r.read())['status']}"
    except urllib.error.HTTPError as e:
        return f"{e.code}"
    except (OSError, ValueError) as e:
        return f"no answer ({type(e).__name__})"


def _stop(server: ServerProcess) -> None:
    try:
        server.stop()
    except subprocess.TimeoutExpired:  # wedged: SIGTERM did not end it in 30 s
        server.proc.kill()
        server.proc.wait()


async def _measure(server: ServerProcess, procs: list[HostileProcess], args) -> tuple[dict, dict]:
    """Start the hostile processes and the good session together; the good session's figures
    and the server's (RSS samples, CPU over the window)."""
    samples: list[float] = []

    async def sample_rss() -> None:
        while True:
            try:
                samples.append(server.rss_mb())
            except (OSError, RuntimeError):  # the server died
                return
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.sleep(0)
    for p in procs:
        p.go.set()
    cpu = {}

    async def cpu_at(name: str, at: float) -> None:
        await asyncio.sleep(at - time.monotonic())
        cpu[name] = _cpu_s(server.proc.pid)

    t0 = time.monotonic()
    cpu_marks = [asyncio.create_task(cpu_at(k, t0 + d)) for k, d in (("from", args.warmup), ("to", args.warmup + args.seconds))]
    good = await good_session(server.url, args.warmup, args.seconds, args.fps)
    await asyncio.gather(*cpu_marks, return_exceptions=True)
    sampler.cancel()
    if not samples:
        raise RuntimeError("the server exited before the row began")
    rss = {"start": round(samples[0], 1), "min": round(min(samples), 1), "max": round(max(samples), 1),
           "last": round(samples[-1], 1), "samples": len(samples)}
    cpu_pct = round(100 * (cpu["to"] - cpu["from"]) / args.seconds) if len(cpu) == 2 else None
    return good, {"rss_mb": rss, "cpu_pct": cpu_pct}


def run_row(label: str, classes: list[str], args) -> dict[str, Any]:
    server = ServerProcess(args.checkpoint, args.max_batch, args.threads)
    log = ServerLog(server)
    procs: list[HostileProcess] = []
    try:
        procs = [HostileProcess(name, server.url, args.warmup + args.seconds) for name in classes]
        for p in procs:
            p.wait_ready()
        good, figures = asyncio.run(_measure(server, procs, args))
        reports = [p.result() for p in procs]
        figures["rss_mb"]["after"] = round(server.rss_mb(), 1) if server.proc.poll() is None else None
        figures["healthz"] = _healthz(server.port)
        figures["exit_code"] = server.proc.poll()
    finally:
        for p in procs:
            if p.proc.is_alive():
                p.proc.terminate()
        _stop(server)
    figures["log_errors"] = len(log.errors)
    figures["first_log_errors"] = log.errors[:3]
    return {"hostile": label, "classes": classes, "good": good, "server": figures, "hostile_clients": reports}


# ------------------------------------------------------------------------------------- report
def outcome(report: dict[str, Any]) -> str:
    """One line of what happened to a hostile client."""
    name = report["client"]
    if "failed" in report:
        return f"{name}: failed ({report['failed']})"
    if name == "dup_headers":
        codes = sorted({line.split()[1] if len(line.split()) > 1 else line for line in report["status"].values()})
        return f"{name}: HTTP {'/'.join(codes)}"
    if name == "message_flood":
        first = report["first_connection"]
        closes = ", ".join(f"{code} x{n}" for code, n in report["closes"].items())
        return f"{name}: {report['connections']} connections ({closes}), the first closed after {first['closed_after_s']} s"
    if report["closed"] == "open":
        text = f"{name}: still open after {report['seconds']} s"
    elif report["closed_after_s"] is None:
        text = f"{name}: {report['closed']}"
    else:
        text = f"{name}: {report['closed']} after {report['closed_after_s']} s"
    if name == "prompt_stop_racer":
        text += f", {report['rounds']} rounds, {report['violations']} violations"
    elif name == "parse_garbage" and not report["ok"]:
        bad = [case for case, c in report["cases"].items()
               if c["closed"] or c["silent"] or set(c["replies"]) - set(hostile.GARBAGE_CODES)]
        text += f", unexpected answers to {', '.join(bad)}"
    elif name == "decompression_bomb" and report["reply_ms"]:
        text += f", replies {report['replies']} in {report['reply_ms']['p50']} ms (p50)"
    elif name == "ping_flood":
        text += f", {report['pings_per_s']} pings/s"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    alone = rows[0]["good"]["fps"] or 1e-9
    lines = [f"{'hostile':<20} {'good fps':>8} {'ratio':>6} {'action p50/p99 ms':>18} {'gap s':>6} "
             f"{'server RSS MB start->max':>25} {'CPU %':>6}  hostile client"]
    indent = " " * lines[0].index("hostile client")
    for row in rows:
        good, server = row["good"], row["server"]
        lat = good["action_latency_ms"]
        lat_text = f"{lat['p50']:.0f} / {lat['p99']:.0f}" if lat else "-"
        rss = server["rss_mb"]
        outcomes = [outcome(r) for r in row["hostile_clients"]] or ["-"]
        if good["error"]:
            outcomes.append(f"good session: {good['error']}")
        lines.append(f"{row['hostile']:<20} {good['fps']:>8.2f} {good['fps'] / alone:>6.2f} {lat_text:>18} "
                     f"{good['longest_gap_s'] if good['longest_gap_s'] is not None else '-':>6} "
                     f"{rss['start']:>11.0f} -> {rss['max']:<11.0f} {server['cpu_pct'] if server['cpu_pct'] is not None else '-':>6}  "
                     f"{outcomes[0]}")
        lines += [indent + text for text in outcomes[1:]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="toy-student-fast")
    p.add_argument("--classes", nargs="+", default=list(HOSTILE), choices=list(HOSTILE), metavar="CLASS",
                   help=f"hostile classes to run beside the good session, one row each (default: all of {', '.join(HOSTILE)})")
    p.add_argument("--soak", nargs="*", default=[c for c in HOSTILE if c != "dup_headers"], choices=list(HOSTILE),
                   metavar="CLASS", help="classes run all at once in the soak row (default: all but dup_headers; "
                                         "--soak alone: no soak row)")
    p.add_argument("--seconds", type=float, default=12.0, help="measured window per row")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the window (hostile clients already running)")
    p.add_argument("--fps", type=float, default=16.0, help="pace of the good session")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--json", help="write the result here as well")
    args = p.parse_args()

    plan = [("alone", []), *((name, [name]) for name in args.classes)] + ([("soak", args.soak)] if args.soak else [])
    plan.append(("alone again", []))  # the baseline once more: drift of the machine shows here
    rows = []
    for label, classes in plan:
        rows.append(run_row(label, classes, args))
        print(f"{label}: good {rows[-1]['good']['fps']} frames/s", flush=True)
    alone = rows[0]["good"]["fps"] or 1e-9
    for row in rows:
        row["good"]["ratio"] = round(row["good"]["fps"] / alone, 3)
    print(table(rows))
    if args.json:
        result = {
            "checkpoint": args.checkpoint, "cpus": os.cpu_count(), "server_threads": args.threads,
            "warmup_s": args.warmup, "window_s": args.seconds, "good_fps_target": args.fps,
            "isolation": "a fresh server per row; each hostile client in its own process (spawn), sharing the machine's cores",
            "figures": {
                "good.fps": "frames the good session received per second in the window",
                "good.ratio": "good.fps / the alone row's",
                "good.action_latency_ms": "action sent -> first frame carrying its seq, over the actions answered in the "
                                          "window (one per chunk)",
                "good.longest_gap_s": "longest wait between two good frames in the window",
                "good.dropped": "frames the server dropped for the good session in the window (DROPPED flags)",
                "good.error": "how the good session ended early, if it did",
                "server.rss_mb": "server RSS: start (before hostile clients), min/max/last of 0.5 s samples over warm-up "
                                 "and window, after (hostile clients finished)",
                "server.cpu_pct": "server CPU time over the window, % of one core",
                "server.healthz": "GET /healthz after the row",
                "server.log_errors": "ERROR lines the server logged in the row",
                "hostile_clients": "each hostile client's report (keys: serve/hostile.py), cpu_s its own CPU time",
            },
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
