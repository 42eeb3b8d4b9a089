"""The generation worker: one thread owns the model and every session's generation state, and
steps the sessions' streams, batching them into one forward where their caches allow.

Ownership (no lock discipline to remember):
* the worker thread alone reads and writes generation state (``_WorkerSession``: stream, cache,
  prompt, pacing, action). Nothing else holds a reference to it;
* the connection side (the asyncio thread) only *sends commands* (``_Start``, ``_Stop``,
  ``_Prompt``, ``_Action``, ...) into one queue, and owns the ``SessionHandle`` it got from
  ``open_session`` (its id, its epoch counter, its outbox);
* results flow back through each session's ``Outbox``, a bounded thread-safe channel: frames and
  events in, the connection's sender takes them out.

Commands are applied in order, between units of model work (a start, a prompt re-cache, one
batched chunk), so a ``stop`` that arrives during a forward takes effect before the next one and
cannot race it. Epochs make stale results undeliverable: the connection bumps its epoch on every
start/reset/stop and tells the outbox, which discards frames and events of any other epoch.

Failures: a batched forward that raises is retried one session at a time, so only the session
whose step fails is ended (error ``internal``, close 1011); the others keep streaming. A backend's
``step`` therefore must not change any stream's state when it raises, and reports a failure that
concerns one stream only (e.g. its decoder) as that stream's entry in the result list.

Pacing: chunk k of an epoch may start ``lead_chunks`` chunks before its first frame's pts
(``t0 + k F / fps``); a stream that fell behind by more than a chunk is re-anchored rather than
rushed. Sessions due at the same time (within ``batch_slack`` of a chunk) share a forward.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamkd.serve.backends import StreamSpec
from streamkd.serve.protocol import CloseCode, ErrorCode, FrameFlags

log = logging.getLogger("streamkd.serve")


@dataclass
class EngineConfig:
    max_sessions: int = 8
    """Concurrent sessions; more are refused (close code 1013, try again later)."""
    max_batch: int = 8
    """Most sessions stepped in one forward."""
    outbox_chunks: int = 2
    """Frames a session may hold unsent, in chunks; beyond it the oldest are dropped."""
    lead_chunks: float = 1.0
    """How far ahead of its presentation time a chunk may be generated (bounds action latency)."""
    batch_slack: float = 0.5
    """Sessions due within this fraction of a chunk join the batch of the first due session."""
    threads: int = 0
    """torch intra-op threads of the worker (0: the creating thread's count). The worker sets its
    own: OpenMP thread counts are per calling thread."""

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_batch < 1 or self.outbox_chunks < 1:
            raise ValueError("max_sessions, max_batch and outbox_chunks must be >= 1")
        if self.lead_chunks < 0 or self.batch_slack < 0 or self.threads < 0:
            raise ValueError("lead_chunks, batch_slack and threads must be >= 0")


class EngineFull(RuntimeError):
    """Every session slot is taken."""


@dataclass
class OutFrame:
    image: np.ndarray  # uint8 HWC at the model's size
    epoch: int
    frame_seq: int
    chunk_seq: int
    action_seq: int
    pts_us: int
    flags: FrameFlags
    made_at: float  # time.monotonic() when the chunk finished (for latency figures)
    dropped: int = 0


class Outbox:
    """Bounded channel from the worker to one connection's sender; thread-safe, and the only
    object both threads touch. It knows the connection's current epoch and discards frames and
    epoch-tagged events of any other epoch, at put and when the epoch changes."""

    MAX_EVENTS = 64

    def __init__(self, capacity: int, notify: Callable[[], None]) -> None:
        self.capacity = capacity
        self._notify = notify
        self._lock = threading.Lock()
        self._epoch = 0
        self._frames: deque[OutFrame] = deque()
        self._events: deque[tuple[int | None, dict[str, Any]]] = deque(maxlen=self.MAX_EVENTS)
        self._pending_drops = 0
        self._dropped_total = 0

    def set_epoch(self, epoch: int) -> None:
        """The connection started, restarted or stopped its stream: older results are stale
        (discarded, not counted as drops)."""
        with self._lock:
            self._epoch = epoch
            self._frames.clear()
            self._pending_drops = 0
            self._events = deque(((e, ev) for e, ev in self._events if e is None or e == epoch), maxlen=self.MAX_EVENTS)

    def put_frames(self, frames: list[OutFrame]) -> None:
        with self._lock:
            for f in frames:
                if f.epoch != self._epoch:
                    continue
                self._frames.append(f)
                if len(self._frames) > self.capacity:
                    self._frames.popleft()
                    self._pending_drops += 1
                    self._dropped_total += 1
        self._notify()

    def put_event(self, event: dict[str, Any], epoch: int | None = None) -> None:
        """``epoch``: the stream epoch the event belongs to (None: the connection itself)."""
        with self._lock:
            if epoch is not None and epoch != self._epoch:
                return
            self._events.append((epoch, event))
        self._notify()

    def pop_event(self) -> dict[str, Any] | None:
        with self._lock:
            return self._events.popleft()[1] if self._events else None

    def pop_frame(self) -> OutFrame | None:
        with self._lock:
            if not self._frames:
                return None
            f = self._frames.popleft()
            f.dropped, self._pending_drops = self._pending_drops, 0
            return f

    @property
    def dropped_total(self) -> int:
        with self._lock:
            return self._dropped_total

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)


@dataclass
class SessionHandle:
    """The connection side of a session: owned by the connection (the asyncio thread)."""

    id: str
    outbox: Outbox
    epoch: int = 0


# ------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class _Open:
    id: str
    outbox: Outbox


@dataclass(frozen=True)
class _Close:
    id: str


@dataclass(frozen=True)
class _Start:
    id: str
    epoch: int
    spec: StreamSpec
    fps: float


@dataclass(frozen=True)
class _Stop:
    id: str
    epoch: int


@dataclass(frozen=True)
class _Prompt:
    id: str
    epoch: int
    prompt: str


@dataclass(frozen=True)
class _Action:
    id: str
    seq: int
    action: int


@dataclass(frozen=True)
class _Pause:
    id: str
    epoch: int
    paused: bool


@dataclass(frozen=True)
class _Stats:
    id: str


@dataclass(frozen=True)
class _Shutdown:
    pass


@dataclass(frozen=True)
class _Counters:
    """What the worker publishes for ``/healthz`` (replaced whole, never mutated)."""

    forwards: int = 0
    chunks: int = 0


@dataclass
class _WorkerSession:
    """Generation state of one session; only the worker thread ever touches it."""

    id: str
    outbox: Outbox
    epoch: int = 0
    pending_start: tuple[StreamSpec, float] | None = None
    pending_prompt: str | None = None
    action: int = 0
    action_seq: int = 0
    paused: bool = False
    stream: Any = None
    spec: StreamSpec | None = None
    fps: float = 16.0
    t0: float = 0.0
    chunk_seq: int = 0
    epoch_frames: int = 0  # frames emitted in this epoch: the next frame_seq (a temporal codec's first chunk is shorter)
    prompt_changed: bool = False
    frames_generated: int = 0
    last_chunk_ms: float = 0.0
    last_batch: int = 0
    applied_action_seq: int = 0

    def due(self, chunk_frames: int, lead_chunks: float) -> float:
        chunk_s = chunk_frames / self.fps
        return self.t0 + (self.chunk_seq - lead_chunks) * chunk_s

    @property
    def active(self) -> bool:
        return self.stream is not None and not self.paused


class Engine:
    """The worker thread and its command queue; see the module docstring. The connection-side
    methods (``open_session`` ... ``health``) are called from one thread, the event loop."""

    def __init__(self, backend, cfg: EngineConfig | None = None) -> None:
        self.backend = backend
        self.cfg = cfg or EngineConfig()
        self.chunk_frames = backend.chunk_frames
        self.threads = self.cfg.threads or torch.get_num_threads()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._open: set[str] = set()  # connection side: ids of open sessions (admission)
        self._sessions: dict[str, _WorkerSession] = {}  # worker side
        self._counters = _Counters()  # published by the worker
        self._forwards = self._chunks = 0
        self._thread = threading.Thread(target=self._run, name="streamkd-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ connection side (asyncio)
    def open_session(self, notify: Callable[[], None]) -> SessionHandle:
        if len(self._open) >= self.cfg.max_sessions:
            raise EngineFull(f"all {self.cfg.max_sessions} session slots are taken")
        handle = SessionHandle(secrets.token_hex(8), Outbox(self.cfg.outbox_chunks * self.chunk_frames, notify))
        self._open.add(handle.id)
        self._inbox.put(_Open(handle.id, handle.outbox))
        return handle

    def close_session(self, handle: SessionHandle) -> None:
        """Forget the session; the worker frees its cache before its next unit of work."""
        if handle.id in self._open:
            self._open.discard(handle.id)
            handle.epoch += 1
            handle.outbox.set_epoch(handle.epoch)
            self._inbox.put(_Close(handle.id))

    def start(self, handle: SessionHandle, spec: StreamSpec, fps: float) -> int:
        """Start or restart the stream; returns the new epoch (results of older epochs are stale)."""
        handle.epoch += 1
        handle.outbox.set_epoch(handle.epoch)
        self._inbox.put(_Start(handle.id, handle.epoch, spec, fps))
        return handle.epoch

    def stop(self, handle: SessionHandle) -> int:
        handle.epoch += 1
        handle.outbox.set_epoch(handle.epoch)
        self._inbox.put(_Stop(handle.id, handle.epoch))
        return handle.epoch

    def set_action(self, handle: SessionHandle, seq: int, action: int) -> None:
        """Latest-state semantics: a seq not above the last one applied is stale and ignored."""
        self._inbox.put(_Action(handle.id, seq, action))

    def set_prompt(self, handle: SessionHandle, prompt: str) -> None:
        self._inbox.put(_Prompt(handle.id, handle.epoch, prompt))

    def set_paused(self, handle: SessionHandle, paused: bool) -> None:
        self._inbox.put(_Pause(handle.id, handle.epoch, paused))

    def request_stats(self, handle: SessionHandle) -> None:
        """The worker answers with a ``stats`` event (its half of the figures) in the outbox."""
        self._inbox.put(_Stats(handle.id))

    def health(self) -> dict[str, Any]:
        counters = self._counters
        return {"status": "ok" if self._thread.is_alive() else "error", "sessions": len(self._open),
                "max_sessions": self.cfg.max_sessions, "forwards": counters.forwards, "chunks": counters.chunks}

    @property
    def num_sessions(self) -> int:
        return len(self._open)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the worker after its current unit of work; False if it did not end in ``timeout``
        (it is a daemon thread and dies with the process)."""
        self._open.clear()
        self._inbox.put(_Shutdown())
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        wait: float | None = None
        while True:
            try:
                command = self._inbox.get(timeout=wait)
                while True:
                    if isinstance(command, _Shutdown):
                        self._sessions.clear()
                        return
                    self._apply(command)
                    command = self._inbox.get_nowait()
            except queue.Empty:
                pass
            wait = self._work()

    def _apply(self, c) -> None:
        if isinstance(c, _Open):
            self._sessions[c.id] = _WorkerSession(c.id, c.outbox)
            return
        s = self._sessions.get(c.id)
        if s is None:
            return  # closed already
        if isinstance(c, _Close):
            del self._sessions[c.id]
        elif isinstance(c, _Start):
            s.epoch, s.pending_start, s.pending_prompt = c.epoch, (c.spec, c.fps), None
            s.stream, s.paused = None, False
        elif isinstance(c, _Stop):
            s.epoch, s.pending_start, s.pending_prompt, s.stream = c.epoch, None, None, None
        elif isinstance(c, _Prompt):
            if c.epoch == s.epoch:
                s.pending_prompt = c.prompt
        elif isinstance(c, _Action):
            if c.seq > s.action_seq:
                s.action_seq, s.action = c.seq, c.action
        elif isinstance(c, _Pause):
            if c.epoch == s.epoch:
                if s.paused and not c.paused and s.stream is not None:
                    s.t0 = time.monotonic() - (s.chunk_seq - self.cfg.lead_chunks) * self.chunk_frames / s.fps
                s.paused = c.paused
        elif isinstance(c, _Stats):
            event = {
                "type": "stats", "epoch": s.epoch, "frames_generated": s.frames_generated,
                "frames_dropped": s.outbox.dropped_total, "queued_frames": len(s.outbox),
                "chunk_ms": round(s.last_chunk_ms, 2), "batch_size": s.last_batch,
                "action_seq_applied": s.applied_action_seq, "paused": s.paused, "sessions": len(self._sessions),
            }
            memory_stats = getattr(self.backend, "memory_stats", None)
            if memory_stats is not None and s.stream is not None and (memory := memory_stats(s.stream)) is not None:
                event["memory"] = memory  # tier sizes and retrieval counts of a memory checkpoint
            s.outbox.put_event(event)
        else:
            raise AssertionError(f"unknown command {c!r}")

    def _work(self) -> float | None:
        """One unit of model work; returns how long the worker may sleep before the next one
        (0: go on after applying new commands; None: nothing to do until a command comes)."""
        for s in self._sessions.values():
            if s.pending_start is not None:
                self._start(s)
                return 0.0
        for s in self._sessions.values():
            if s.pending_prompt is not None and s.stream is not None:
                self._switch(s)
                return 0.0
        batch, wait = self._pick_batch(time.monotonic())
        if batch:
            self._step(batch)
            return 0.0
        return wait

    def _fail(self, s: _WorkerSession, what: str, exc: BaseException) -> None:
        """End one session's stream after a server-side failure: the traceback goes to the log,
        the client sees a generic message, then close 1011."""
        log.error("generation failed for session %s (%s)", s.id, what, exc_info=exc)
        s.stream = None
        s.outbox.put_event({"type": "error", "code": ErrorCode.INTERNAL, "retry": False, "ref": None,
                            "message": "generation failed on the server; the session is closed",
                            "close": (CloseCode.INTERNAL_ERROR, "generation failed")}, s.epoch)

    def _start(self, s: _WorkerSession) -> None:
        (spec, fps), s.pending_start = s.pending_start, None
        try:
            if isinstance(spec.first_frame, str):  # "world": the toy world's frame 0
                spec = StreamSpec(spec.prompt, spec.seed, self.backend.world_first_frame(spec.seed, spec.prompt))
            stream = self.backend.start(spec)
        except Exception as e:
            self._fail(s, "start", e)
            return
        s.stream, s.spec, s.fps = stream, spec, fps
        s.chunk_seq, s.epoch_frames, s.prompt_changed = 0, 0, False
        s.t0 = time.monotonic() + self.cfg.lead_chunks * self.chunk_frames / fps
        s.outbox.put_event({"type": "started", "epoch": s.epoch, "prompt": spec.prompt, "seed": spec.seed,
                            "fps": fps, "chunk_frames": self.chunk_frames}, s.epoch)

    def _switch(self, s: _WorkerSession) -> None:
        prompt, s.pending_prompt = s.pending_prompt, None
        try:
            self.backend.switch_prompt(s.stream, prompt)
        except Exception as e:
            self._fail(s, "prompt switch", e)
            return
        s.spec = StreamSpec(prompt, s.spec.seed, s.spec.first_frame)
        s.prompt_changed = True
        s.outbox.put_event({"type": "prompt_applied", "epoch": s.epoch, "prompt": prompt,
                            "frame_seq": s.epoch_frames}, s.epoch)

    def _pick_batch(self, now: float) -> tuple[list[_WorkerSession], float | None]:
        """Sessions for the next forward, or how long to wait for one."""
        F, cfg = self.chunk_frames, self.cfg
        active = [s for s in self._sessions.values() if s.active]
        if not active:
            return [], None
        active.sort(key=lambda s: s.due(F, cfg.lead_chunks))
        first = active[0]
        first_due = first.due(F, cfg.lead_chunks)
        if first_due > now:
            return [], first_due - now
        key = self.backend.group_key(first.stream)
        horizon = now + cfg.batch_slack * F / first.fps
        batch = [s for s in active if s.due(F, cfg.lead_chunks) <= horizon and self.backend.group_key(s.stream) == key]
        return batch[: min(cfg.max_batch, self.backend.max_batch)], None

    def _step(self, batch: list[_WorkerSession]) -> None:
        """One chunk for each session of the batch; a failed batch is retried session by session."""
        actions = [(s.action, s.action_seq) for s in batch]
        t_start = time.monotonic()
        try:
            results = self.backend.step([s.stream for s in batch], [a for a, _ in actions])
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0], "step", e)
                return
            log.warning("a batched step of %d sessions failed; retrying them one by one", len(batch), exc_info=True)
            for s in batch:
                self._step([s])
            return
        done = time.monotonic()
        self._forwards += 1
        self._chunks += len(batch)
        self._counters = _Counters(self._forwards, self._chunks)
        for s, chunk, (_, action_seq) in zip(batch, results, actions):
            if isinstance(chunk, Exception):  # a failure of this stream alone (e.g. its decoder)
                self._fail(s, "step", chunk)
                continue
            self._emit(s, chunk, action_seq, done, (done - t_start) * 1e3, len(batch))

    def _emit(self, s: _WorkerSession, chunk: np.ndarray, action_seq: int, done: float, ms: float, batch: int) -> None:
        F = self.chunk_frames
        first = s.epoch_frames
        out = []
        for i, image in enumerate(chunk):
            flags = FrameFlags(0)
            if i == 0:
                flags |= FrameFlags.CHUNK_START
                if s.prompt_changed:
                    flags |= FrameFlags.PROMPT_CHANGED
                if first == 0:
                    flags |= FrameFlags.EPOCH_START
            out.append(OutFrame(image, s.epoch, first + i, s.chunk_seq, action_seq,
                                round((first + i) * 1e6 / s.fps), flags, done))
        s.prompt_changed = False
        s.applied_action_seq = action_seq
        s.chunk_seq += 1
        s.frames_generated += len(chunk)
        s.epoch_frames += len(chunk)
        s.last_chunk_ms, s.last_batch = ms, batch
        behind = done - s.due(F, self.cfg.lead_chunks)
        if behind > F / s.fps:  # more than a chunk late: re-anchor instead of rushing
            s.t0 += behind
        s.outbox.put_frames(out)
