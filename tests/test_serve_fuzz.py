"""Hostile input: hypothesis-generated control messages, text and binary. The server answers every
message on an established connection (an error, or the reply the message asks for), never
crashes, leaks no session, and another session keeps streaming throughout."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamkd.bundle import CausalConfig
from streamkd.serve.backends import ModelBackend
from streamkd.serve.protocol import CloseCode, decode_frame_message
from streamkd.serve.server import ServerConfig
from tests.test_serve import PROMPT, server_thread
from tests.test_serve_batching import tiny_causal_model

TYPES = ["hello", "start", "action", "prompt", "credit", "pause", "resume", "reset", "stop", "stats", "fly", ""]
FIELDS = ["type", "seq", "action", "prompt", "frames", "seed", "first_frame", "size", "fps", "token", "codecs", "credits", "version"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
messages = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(TYPES)}, optional={k: json_values for k in FIELDS[1:]}),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
    json_values,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server():
    backend = ModelBackend(tiny_causal_model(CausalConfig(2, 1, 4), guidance=1.0))
    cfg = ServerConfig(port=0, control_rate=10_000, control_burst=10_000, heavy_rate=10_000, heavy_burst=10_000,
                       frame_rate=40_000, frame_burst=40_000, byte_rate=2**30, max_message_bytes=16 * 1024)
    with server_thread(cfg, backend) as srv:
        yield srv


@pytest.fixture(scope="module")
def witness(server):
    """A well-behaved session that must keep streaming while others send garbage."""
    with connect(server.url) as ws:
        ws.send(json.dumps({"type": "hello", "credits": 64}))
        json.loads(ws.recv())
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "fps": 20}))
        yield ws


def _witness_streams(ws) -> None:
    """Drain what the witness got so far, then see two more frames arrive in order."""
    ws.send(json.dumps({"type": "credit", "frames": 64}))
    seqs = []
    deadline = time.monotonic() + 10
    while len(seqs) < 2 and time.monotonic() < deadline:
        message = ws.recv(timeout=10)
        if isinstance(message, bytes):
            seqs.append(decode_frame_message(message)[0].frame_seq)
            if len(seqs) == 2 and seqs[1] <= seqs[0]:
                seqs = seqs[1:]
    assert len(seqs) == 2


@pytest.fixture(scope="module")
def fuzz_ws(server):
    with connect(server.url, max_size=2**22) as ws:
        ws.send(json.dumps({"type": "hello", "credits": 1}))
        assert json.loads(ws.recv())["type"] == "welcome"
        yield ws


def _answered(ws) -> None:
    """After a fuzz message, a stats request must be answered: the connection is alive and in order."""
    ws.send(json.dumps({"type": "stats"}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        message = ws.recv(timeout=10)
        if isinstance(message, str) and json.loads(message).get("type") == "stats":
            return
        if isinstance(message, str):
            reply = json.loads(message)
            assert reply["type"] != "error" or (reply["code"] and isinstance(reply["retry"], bool) and "Traceback" not in reply["message"])
    raise AssertionError("no stats reply")


def test_witness_streams(witness) -> None:
    _witness_streams(witness)


@SETTINGS
@given(message=messages)
def test_fuzz_control_messages(server, fuzz_ws, message) -> None:
    fuzz_ws.send(json.dumps(message, allow_nan=True))
    _answered(fuzz_ws)


@SETTINGS
@given(text=st.text(max_size=200), data=st.binary(max_size=300))
def test_fuzz_text_and_binary(server, fuzz_ws, text, data) -> None:
    fuzz_ws.send(text)
    _answered(fuzz_ws)
    fuzz_ws.send(data)
    _answered(fuzz_ws)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=messages | st.binary(max_size=64))
def test_fuzz_first_message(server, first) -> None:
    """Before hello, anything else ends in a documented close code, or a welcome if it was a hello."""
    with connect(server.url) as ws:
        ws.send(first if isinstance(first, bytes) else json.dumps(first, allow_nan=True))
        try:
            reply = json.loads(ws.recv(timeout=10))
            assert reply["type"] == "welcome"
        except ConnectionClosed as e:
            assert e.rcvd.code in (CloseCode.PROTOCOL_ERROR, CloseCode.UNSUPPORTED_VERSION)


def test_server_survived(server, witness) -> None:
    """Runs last in this module: the witness streamed through all of the above, no session leaked."""
    _witness_streams(witness)
    for _ in range(100):
        if server.engine.num_sessions <= 2:  # the witness and the fuzz connection
            break
        time.sleep(0.05)
    assert server.engine.num_sessions <= 2
    assert server.engine.health()["status"] == "ok"

