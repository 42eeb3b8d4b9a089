"""``parallel: deepspeed``: ZeRO-2 and ZeRO-3 on CPU (gloo) reproduce the single-process run.

The golden of tests/test_distributed.py (the tiny self-forcing DMD recipe, one process, no
engine) is the reference for every launch: one process under DeepSpeed, two processes under
``torchrun`` (ZeRO-3) and under the ``deepspeed`` launcher (ZeRO-2). Tolerance as for FSDP2,
``PARITY_RTOL`` = 1e-5 relative: only the order of float32 reductions differs (the gradient
all-reduce / reduce-scatter, the partitioned global norm); measured ~1e-7. Runs are launched as
subprocesses so that no process group outlives a test in the pytest process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from streamkd.checkpoint import CheckpointError
from streamkd.config import dump_yaml
from streamkd.distributed import DeepSpeedOptions, _deepspeed_config
from streamkd.train.distill import DistillTrainer

from .test_distributed import DMD_KEYS, GOLDEN, GOLDEN_DMD, PARITY_RTOL, STEPS, _close, _dmd_cfg, _dmd_close, _losses
from .test_training import tiny_config

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 600


def _golden() -> list[dict[str, float]]:
    return json.loads(GOLDEN_DMD.read_text())["losses"]


def _config(teacher_dir: Path, out: Path, stage: int, max_steps: int = STEPS) -> Path:
    cfg = replace(_dmd_cfg(teacher_dir, out, max_steps=max_steps), parallel="deepspeed", deepspeed=DeepSpeedOptions(stage=stage))
    path = out.parent / f"{out.name}.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def _launch(launcher: str, config: Path, port: int, trainer: tuple[str, str] = ("distill", "train")) -> subprocess.CompletedProcess:
    job = ["-m", "streamkd.cli", *trainer, "--config", str(config), "--no-progress"]
    if launcher == "one":
        cmd = [sys.executable, *job]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *job]
    else:  # DeepSpeed's own launcher: it adds --local_rank=N to the arguments
        cmd = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", *job[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=ENV)


def _logged(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in DMD_KEYS if k in r} for r in rows]


@pytest.mark.parametrize("launcher,stage,port", [("one", 2, 0), ("deepspeed", 2, 29531), ("torchrun", 3, 29532)])
def test_zero_matches_the_single_process_run(launcher: str, stage: int, port: int, teacher_dir: Path, tmp_path: Path) -> None:
    done = _launch(launcher, _config(teacher_dir, tmp_path / "run", stage), port)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _dmd_close(_logged(tmp_path / "run"), _golden(), PARITY_RTOL), (_logged(tmp_path / "run"), _golden())
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_zero3_teacher_matches_the_single_process_run(tmp_path: Path) -> None:
    """Teacher training (its prompt encoder trains too, and the q/k norm gains have their own
    learning-rate group) under ZeRO-3, two processes: the single-process golden losses."""
    cfg = replace(tiny_config(tmp_path / "run", max_steps=STEPS, threads=1), parallel="deepspeed",
                  deepspeed=DeepSpeedOptions(stage=3))
    path = tmp_path / "teacher.yaml"
    path.write_text(dump_yaml(cfg))
    done = _launch("torchrun", path, 29535, trainer=("train", "teacher"))
    assert done.returncode == 0, done.stderr[-3000:]
    golden = json.loads(GOLDEN.read_text())["losses"]
    got = _losses(tmp_path / "run")
    assert len(got) == STEPS and all(_close(a, b, PARITY_RTOL) for a, b in zip(got, golden)), (got, golden)


def test_zero3_resumes_exactly_and_refuses_another_world_size(teacher_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _launch("torchrun", _config(teacher_dir, run, 3, max_steps=2), 29533)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_0000002"
    assert json.loads((ckpt / "state.json").read_text())["engine"] == "deepspeed"
    assert sorted(p.name for p in (ckpt / "deepspeed").iterdir() if p.is_dir()) == ["critic", "model"]
    second = _launch("torchrun", _config(teacher_dir, run, 3), 29534)
    assert second.returncode == 0, second.stderr[-3000:]
    # steps 3-4 after the resume are the uninterrupted run's
    assert _dmd_close(_logged(run), _golden(), PARITY_RTOL), (_logged(run), _golden())
    # two processes' partitions cannot be read by one: said, with the way out
    more = _launch("one", _config(teacher_dir, run, 3, max_steps=STEPS + 2), 0)
    assert more.returncode == 2 and "holds DeepSpeed partitions of 2 processes" in more.stderr, more.stderr[-2000:]
    # nor by another engine (in this process: the error comes before any engine starts)
    with pytest.raises(CheckpointError, match="written by a parallel: deepspeed run"):
        DistillTrainer(replace(_dmd_cfg(teacher_dir, run, max_steps=STEPS + 2), deepspeed=DeepSpeedOptions(stage=3))).train(progress=False)


def test_deepspeed_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="deepspeed.stage must be 2 or 3"):
        DeepSpeedOptions(stage=1)
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"gradient_clipping": 5.0, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ValueError, match="sets gradient_clipping, zero_optimization.stage"):
        _deepspeed_config(DeepSpeedOptions(config=str(extra)), 2, 1.0)
    extra.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    merged = _deepspeed_config(DeepSpeedOptions(stage=3, config=str(extra)), 2, 1.0)
    assert merged["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert merged["gradient_clipping"] == 1.0 and merged["train_micro_batch_size_per_gpu"] == 2
    extra.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a JSON DeepSpeed config"):
        _deepspeed_config(DeepSpeedOptions(config=str(extra)), 2, 1.0)
