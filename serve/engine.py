"""The generation worker: one thread owns the model and steps every session's stream, batching
sessions into one forward where their caches allow; connections only exchange small control
records and bounded frame queues with it, so generation never waits on the network.

Threading contract:
* connection code (asyncio thread) calls ``Engine`` methods; each takes the engine lock for a
  few field writes and wakes the worker -- no model work on that side;
* the worker applies starts, prompt switches (with the KV re-cache) and the latest action at
  chunk boundaries, runs the model outside the lock, and pushes frames into each session's
  ``Outbox``; a full outbox drops its *oldest* frames (a live stream keeps the newest) and counts
  them for the DROPPED flag, so memory per session is bounded whatever the client does.

Pacing: chunk k of an epoch may start ``lead_chunks`` chunks before its first frame's pts
(``t0 + k F / fps``); a stream that fell behind by more than a chunk is re-anchored rather than
rushed. Sessions due at the same time (within ``batch_slack`` of a chunk) share a forward.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
    """Bounded hand-off from the worker to one connection's sender; thread-safe."""

    MAX_EVENTS = 64

    def __init__(self, capacity: int, notify: Callable[[], None]) -> None:
        self.capacity = capacity
        self._notify = notify
        self._lock = threading.Lock()
        self._frames: deque[OutFrame] = deque()
        self._events: deque[dict[str, Any]] = deque(maxlen=self.MAX_EVENTS)
        self._pending_drops = 0
        self.dropped_total = 0

    def put_frames(self, frames: list[OutFrame]) -> None:
        with self._lock:
            for f in frames:
                self._frames.append(f)
                if len(self._frames) > self.capacity:
                    old = self._frames.popleft()
                    if old.epoch == f.epoch:
                        self._pending_drops += 1
                        self.dropped_total += 1
        self._notify()

    def put_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)
        self._notify()

    def new_epoch(self) -> None:
        """Frames of the old epoch are stale: discard them (not counted as drops)."""
        with self._lock:
            self._frames.clear()
            self._pending_drops = 0

    def pop_event(self) -> dict[str, Any] | None:
        with self._lock:
            return self._events.popleft() if self._events else None

    def pop_frame(self) -> OutFrame | None:
        with self._lock:
            if not self._frames:
                return None
            f = self._frames.popleft()
            f.dropped, self._pending_drops = self._pending_drops, 0
            return f

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)


@dataclass
class Session:
    """Engine-side state of one connection. Fields above the line are written by the connection
    (under the engine lock), the rest only by the worker."""

    id: str
    outbox: Outbox
    pending_start: tuple[StreamSpec, float] | None = None
    pending_prompt: str | None = None
    action: int = 0
    action_seq: int = 0
    paused: bool = False
    closed: bool = False
    epoch: int = 0
    # ---- worker-owned
    stream: Any = None
    spec: StreamSpec | None = None
    fps: float = 16.0
    t0: float = 0.0
    chunk_seq: int = 0
    prompt_changed: bool = False
    failed: bool = False
    frames_generated: int = 0
    last_chunk_ms: float = 0.0
    last_batch: int = 0
    applied_action_seq: int = 0

    def due(self, chunk_frames: int, lead_chunks: float) -> float:
        chunk_s = chunk_frames / self.fps
        return self.t0 + (self.chunk_seq - lead_chunks) * chunk_s

    @property
    def active(self) -> bool:
        return self.stream is not None and not self.paused and not self.failed and not self.closed


class Engine:
    """Sessions, the worker thread and its schedule; see the module docstring."""

    def __init__(self, backend, cfg: EngineConfig | None = None) -> None:
        self.backend = backend
        self.cfg = cfg or EngineConfig()
        self.chunk_frames = backend.chunk_frames
        self._cond = threading.Condition()
        self._sessions: dict[str, Session] = {}
        self._stopping = False
        self.forwards = 0
        self.chunks = 0
        self.threads = self.cfg.threads or torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="streamkd-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ connection side (asyncio)
    def open_session(self, notify: Callable[[], None]) -> Session:
        with self._cond:
            if len(self._sessions) >= self.cfg.max_sessions:
                raise EngineFull(f"all {self.cfg.max_sessions} session slots are taken")
            session = Session(secrets.token_hex(8), Outbox(self.cfg.outbox_chunks * self.chunk_frames, notify))
            self._sessions[session.id] = session
            return session

    def close_session(self, session: Session) -> None:
        """Forget the session; its cache is freed now, or when a forward it is part of returns."""
        with self._cond:
            session.closed = True
            session.stream = None  # drop the cache even if something still holds the Session object
            session.outbox.new_epoch()
            self._sessions.pop(session.id, None)
            self._cond.notify()

    def start(self, session: Session, spec: StreamSpec, fps: float) -> int:
        """Start or restart the stream; returns the new epoch (frames of older epochs are stale)."""
        with self._cond:
            session.epoch += 1
            session.pending_start = (spec, fps)
            session.pending_prompt = None
            session.paused = False
            session.outbox.new_epoch()
            self._cond.notify()
            return session.epoch

    def stop(self, session: Session) -> None:
        with self._cond:
            session.epoch += 1
            session.pending_start = None
            session.pending_prompt = None
            session.stream = None  # the worker holds no other reference between chunks
            session.outbox.new_epoch()

    def set_action(self, session: Session, seq: int, action: int) -> bool:
        """Latest-state semantics: a seq not above the last one is stale and ignored (False)."""
        with self._cond:
            if seq <= session.action_seq:
                return False
            session.action_seq, session.action = seq, action
            return True

    def set_prompt(self, session: Session, prompt: str) -> None:
        with self._cond:
            session.pending_prompt = prompt
            self._cond.notify()

    def set_paused(self, session: Session, paused: bool) -> None:
        with self._cond:
            if session.paused and not paused and session.stream is not None:
                session.t0 = time.monotonic() - (session.chunk_seq - self.cfg.lead_chunks) * self.chunk_frames / session.fps
            session.paused = paused
            self._cond.notify()

    def stats(self, session: Session) -> dict[str, Any]:
        with self._cond:
            return {
                "epoch": session.epoch, "frames_generated": session.frames_generated,
                "frames_dropped": session.outbox.dropped_total, "queued_frames": len(session.outbox),
                "chunk_ms": round(session.last_chunk_ms, 2), "batch_size": session.last_batch,
                "action_seq_applied": session.applied_action_seq, "paused": session.paused,
                "sessions": len(self._sessions),
            }

    def health(self) -> dict[str, Any]:
        with self._cond:
            alive = self._thread.is_alive()
            return {"status": "ok" if alive else "error", "sessions": len(self._sessions),
                    "max_sessions": self.cfg.max_sessions, "forwards": self.forwards, "chunks": self.chunks}

    @property
    def num_sessions(self) -> int:
        with self._cond:
            return len(self._sessions)

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._sessions.clear()
            self._cond.notify()
        self._thread.join()

    # ------------------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                if self._stopping:
                    return
                starts = [(s, s.pending_start, s.epoch) for s in self._sessions.values() if s.pending_start is not None]
                for s, _, _ in starts:
                    s.pending_start = None
                switches = [(s, s.pending_prompt) for s in self._sessions.values()
                            if s.pending_prompt is not None and s.stream is not None and not s.failed]
                for s, _ in switches:
                    s.pending_prompt = None
                batch, wait = self._pick_batch(time.monotonic()) if not starts else ([], 0.0)
                if not starts and not switches and not batch:
                    self._cond.wait(timeout=wait)
                    continue
                actions = [(s.action, s.action_seq) for s in batch]
            for s, (spec, fps), epoch in starts:
                self._guarded([s], partial(self._start, s, spec, fps, epoch))
            for s, prompt in switches:
                self._guarded([s], partial(self._switch, s, prompt))
            if batch:
                self._guarded(batch, partial(self._step, batch, actions))

    def _guarded(self, sessions: list[Session], work: Callable[[], None]) -> None:
        """Run model work; a failure ends the sessions involved (logged here, never shown to clients)."""
        try:
            work()
        except Exception:
            log.exception("generation failed for session(s) %s", [s.id for s in sessions])
            for s in sessions:
                s.failed, s.stream = True, None
                s.outbox.put_event({"type": "error", "code": ErrorCode.INTERNAL, "retry": False, "ref": None,
                                    "message": "generation failed on the server; the session is closed",
                                    "close": (CloseCode.INTERNAL_ERROR, "generation failed")})

    def _start(self, s: Session, spec: StreamSpec, fps: float, epoch: int) -> None:
        if isinstance(spec.first_frame, str):  # "world": the toy world's frame 0
            spec = StreamSpec(spec.prompt, spec.seed, self.backend.world_first_frame(spec.seed, spec.prompt))
        stream = self.backend.start(spec)
        with self._cond:
            if s.closed or s.epoch != epoch:  # stopped, closed or restarted meanwhile
                return
            s.stream, s.spec, s.fps, s.failed = stream, spec, fps, False
            s.chunk_seq, s.prompt_changed = 0, False
            s.t0 = time.monotonic() + self.cfg.lead_chunks * self.chunk_frames / fps
        s.outbox.put_event({"type": "started", "epoch": epoch, "prompt": spec.prompt, "seed": spec.seed,
                            "fps": fps, "chunk_frames": self.chunk_frames})

    def _switch(self, s: Session, prompt: str) -> None:
        stream = s.stream
        if stream is None:
            return
        self.backend.switch_prompt(stream, prompt)
        s.spec = StreamSpec(prompt, s.spec.seed, s.spec.first_frame)
        s.prompt_changed = True
        s.outbox.put_event({"type": "prompt_applied", "epoch": s.epoch, "prompt": prompt,
                            "frame_seq": s.chunk_seq * self.chunk_frames})

    def _pick_batch(self, now: float) -> tuple[list[Session], float | None]:
        """Sessions for the next forward (under the lock), or how long to wait for one."""
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

    def _step(self, batch: list[Session], actions: list[tuple[int, int]]) -> None:
        F = self.chunk_frames
        streams = [s.stream for s in batch]
        epochs = [s.epoch for s in batch]
        t_start = time.monotonic()
        frames = self.backend.step(streams, [a for a, _ in actions])
        done = time.monotonic()
        self.forwards += 1
        self.chunks += len(batch)
        with self._cond:
            for s, stream, epoch, chunk, (_, action_seq) in zip(batch, streams, epochs, frames, actions):
                if s.closed or s.epoch != epoch or s.stream is not stream:
                    continue  # stopped or restarted during the forward: the chunk is stale
                first = s.chunk_seq * F
                out = []
                for i, image in enumerate(chunk):
                    flags = FrameFlags(0)
                    if i == 0:
                        flags |= FrameFlags.CHUNK_START
                        if s.prompt_changed:
                            flags |= FrameFlags.PROMPT_CHANGED
                        if first == 0:
                            flags |= FrameFlags.EPOCH_START
                    out.append(OutFrame(image, epoch, first + i, s.chunk_seq, action_seq,
                                        round((first + i) * 1e6 / s.fps), flags, done))
                s.prompt_changed = False
                s.applied_action_seq = action_seq
                s.chunk_seq += 1
                s.frames_generated += len(chunk)
                s.last_chunk_ms, s.last_batch = (done - t_start) * 1e3, len(batch)
                behind = done - s.due(F, self.cfg.lead_chunks)
                if behind > F / s.fps:  # more than a chunk late: re-anchor instead of rushing
                    s.t0 += behind
                s.outbox.put_frames(out)
