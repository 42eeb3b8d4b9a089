"""Real-time websocket streaming, installed as ``streamkd.serve`` (see docs/protocol.md).

protocol.py   message schemas, the binary frame header, error and close codes (no I/O)
backends.py   what the worker drives: a causal model, sessions batched into one forward,
              KV re-cache on prompt switches; or the toy world's exact renderer
engine.py     the generation worker thread, session state, pacing, bounded outboxes
server.py     HTTP (/, /healthz) + websocket on one port, auth, limits, per-connection tasks
media.py      JPEG / H.264 through PyAV
client.py     Python client library and ``streamkd client``
bench.py      loopback serving benchmarks (``python -m streamkd.serve.bench``)
hostile.py    hostile clients (floods, non-readers, races, malformed input) for tests and benchmarks
bench_hostile.py  a good session beside each hostile client (``python -m streamkd.serve.bench_hostile``)
static/       the browser client

Nothing here loads a model at import time.
"""
