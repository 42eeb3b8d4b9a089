"""``streamkd gpu-check`` keeps working where CI has no GPU: the no-GPU exit, the deadline, and the
``--tiny`` run, which goes through every section's code path at toy sizes on CPU.

Each case runs the command in a fresh process, as a user does: the check sets process-wide state
(torch threads, ``TRITON_INTERPRET``, a SIGALRM handler) that must not leak into the test session.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

SECTIONS = ["a_kernel_tests", "b_kernel_bench", "c_stream", "d_distill_step"]


def _run(*args: str, hide_gpu: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if hide_gpu else None
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)


def _figures(data, path: str = "") -> list[tuple[str, dict]]:
    """Every figure (a dict with value, unit and counts) nested in ``data``, with its path."""
    if not isinstance(data, dict):
        return []
    if {"value", "unit", "counts"} <= data.keys():
        return [(path, data)]
    return [f for k, v in data.items() for f in _figures(v, f"{path}.{k}" if path else k)]


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path) -> None:
    out = tmp_path / "out"
    proc = _run("streamkd.cli", "gpu-check", "--out", str(out), hide_gpu=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--tiny" in lines[0]
    assert not out.exists()


def test_the_deadline_stops_the_running_section_and_skips_the_rest(tmp_path) -> None:
    # 1 s: the kernel tests' pytest process (torch, triton, collection) is still starting when the
    # alarm fires; it must be killed, its section recorded as stopped, the others as skipped
    proc = _run("streamkd.gpu_check", "--tiny", "--device", "cpu", "--budget-s", "1", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["sections"].values()] == ["failed"] + ["skipped"] * (len(SECTIONS) - 1)
    recs = [json.loads((tmp_path / f"{name}.json").read_text()) for name in SECTIONS]
    assert recs[0]["error"]["type"] == "Deadline" and recs[0]["seconds"] < 30
    assert all("deadline had passed" in rec["error"]["message"] for rec in recs[1:])


def test_tiny_run_on_cpu_writes_every_section_with_finite_figures(tmp_path) -> None:
    proc = _run("streamkd.gpu_check", "--tiny", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scale"] == "tiny" and list(summary["sections"]) == SECTIONS
    recs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in SECTIONS}
    for name, rec in recs.items():
        assert rec["status"] == "ok" and rec["error"] is None, (name, rec["error"])
        figs = _figures(rec["figures"])
        assert figs and rec["headline"], name
        for path, fig in figs:
            assert isinstance(fig["value"], (int, float)) and math.isfinite(fig["value"]), (name, path, fig)
            assert fig["counts"] and fig["unit"], (name, path)

    # a: the gpu-marked kernel tests ran and skipped cleanly without CUDA
    a = recs["a_kernel_tests"]["figures"]["gpu_marked"]
    assert a["skipped"]["value"] >= 1 and a["failed"]["value"] == a["errors"]["value"] == 0
    # b: the Triton kernel ran (interpreted) beside SDPA
    assert all(f["triton_ms"]["value"] > 0 and f["sdpa_ms"]["value"] > 0 for f in recs["b_kernel_bench"]["figures"].values())
    # c: both streams, model-only and end-to-end rates, first-frame latency, KV bytes per tier
    c = recs["c_stream"]["figures"]
    for label in ("window", "memory"):
        assert c[label]["denoise_fps"]["value"] > 0 and c[label]["end_to_end_fps"]["value"] > 0
        assert c[label]["first_frame_latency_s"]["value"] > 0 and c[label]["kv_cache_bytes"]["value"] > 0
    assert c["window"]["kv_bank_bytes"]["value"] == c["window"]["kv_compressed_bytes"]["value"] == 0
    assert c["memory"]["kv_bank_bytes"]["value"] > 0 and c["memory"]["kv_compressed_bytes"]["value"] > 0
    # d: one DMD step of the tiny Wan recipe, timed twice (first step, steady step)
    (attempt,) = recs["d_distill_step"]["figures"].values()
    assert attempt["step_s"]["value"] > 0 and attempt["first_step_s"]["value"] > 0
    assert recs["d_distill_step"]["setup"]["layers_2_checkpointing_off"]["config"] == "configs/tiny-wan/distill_dmd.yaml"
