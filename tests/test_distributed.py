"""torchrun + FSDP2 (gloo, CPU): two processes reproduce the single-process losses of teacher
training and of self-forcing DMD distillation.

The single-process losses of a tiny recipe are pinned in ``tests/golden/teacher_tiny.json``
(one intra-op thread: bitwise deterministic on a given torch build). Two processes, each with
half of every global batch and FSDP2-sharded parameters, must match them to 1e-5 relative:
only the order of floating-point reductions differs (gradient reduce-scatter, sharded norms).
Regenerate the golden file after an intended numerics change with
``STREAMKD_REGEN_GOLDEN=1 pytest tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamkd.config import dump_yaml
from streamkd.models.world import CausalConfig
from streamkd.train.distill import DistillConfig, DistillTrainer
from streamkd.train.teacher import TeacherTrainer

from .test_training import tiny_config

GOLDEN = Path(__file__).parent / "golden" / "teacher_tiny.json"
GOLDEN_DMD = Path(__file__).parent / "golden" / "distill_dmd_tiny.json"
STEPS = 4
DMD_KEYS = ("dmd_loss", "critic_loss")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]


def test_single_process_matches_golden(tmp_path: Path) -> None:
    losses = TeacherTrainer(tiny_config(tmp_path, max_steps=STEPS, threads=1)).train(progress=False)
    if os.environ.get("STREAMKD_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    assert losses == json.loads(GOLDEN.read_text())["losses"]


@pytest.mark.distributed
def test_two_processes_match_single_process(tmp_path: Path) -> None:
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_yaml(tiny_config(tmp_path / "run", max_steps=STEPS, threads=1)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "streamkd.cli", "train", "teacher", "--config", str(cfg_path), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    golden = json.loads(GOLDEN.read_text())["losses"]
    two = _losses(tmp_path / "run")
    assert len(two) == len(golden)
    for a, b in zip(two, golden):
        assert abs(a - b) <= 1e-5 * abs(b), (two, golden)
    # the 2-process run checkpointed full (unsharded) state: it resumes in one process
    more = TeacherTrainer(tiny_config(tmp_path / "run", max_steps=STEPS + 1, threads=1)).train(progress=False)
    assert len(more) == 1


def _dmd_cfg(teacher_dir: Path, out: Path, max_steps: int = STEPS) -> DistillConfig:
    """Tiny self-forcing DMD recipe: 2 chunks of 2 frames, student every 2nd step, batch 4."""
    return DistillConfig(
        method="dmd", teacher=str(teacher_dir), out_dir=str(out), causal=CausalConfig(2, 2, 2), sigmas=[1.0, 0.5],
        max_steps=max_steps, batch_size=4, critic_ratio=2, teacher_guidance=2.0, ckpt_every=2, log_every=1,
        tensorboard=False, threads=1,
    )


def _dmd_losses(history: list[dict]) -> list[dict[str, float]]:
    return [{k: h[k] for k in DMD_KEYS if k in h} for h in history]


def test_distill_single_process_matches_golden(teacher_dir: Path, tmp_path: Path) -> None:
    losses = _dmd_losses(DistillTrainer(_dmd_cfg(teacher_dir, tmp_path)).train(progress=False))
    if os.environ.get("STREAMKD_REGEN_GOLDEN"):
        GOLDEN_DMD.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    assert losses == json.loads(GOLDEN_DMD.read_text())["losses"]


@pytest.mark.distributed
def test_distill_two_processes_match_single_process(teacher_dir: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "dmd.yaml"
    cfg_path.write_text(dump_yaml(_dmd_cfg(teacher_dir, tmp_path / "run")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "-m", "streamkd.cli", "distill", "train", "--config", str(cfg_path), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    golden = json.loads(GOLDEN_DMD.read_text())["losses"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    two = [{k: r[k] for k in DMD_KEYS if k in r} for r in logged]
    assert [sorted(r) for r in two] == [sorted(r) for r in golden]
    for a, b in zip(two, golden):
        for k in b:
            assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]), (k, two, golden)
    # full (unsharded) checkpoints: one process resumes the 2-process run
    more = DistillTrainer(_dmd_cfg(teacher_dir, tmp_path / "run", max_steps=STEPS + 1)).train(progress=False)
    assert len(more) == 1
