"""The quickstart's distillation stage runs its presets end to end (on a tiny teacher) and resumes."""

from __future__ import annotations

import json
from pathlib import Path

from streamkd.models.world import WorldModel
from streamkd.quickstart import distill

from .conftest import save_tiny_teacher


def test_quickstart_distills_a_causal_student_and_resumes(tmp_path: Path, monkeypatch) -> None:
    save_tiny_teacher(tmp_path / "teacher", horizon_frames=6, num_layers=1)  # the presets stream chunks of 3 frames
    monkeypatch.chdir(tmp_path)  # the presets write under ./runs/quickstart
    overrides = (f"teacher={tmp_path / 'teacher'}",)
    student_dir = distill(overrides=overrides)
    student = WorldModel.load(student_dir)
    assert student.is_causal and student.cfg.sampling.kind == "few_step" and len(student.cfg.sampling.sigmas) == 4
    dmd_log = [json.loads(line) for line in (tmp_path / "runs/quickstart/distill_dmd/losses.jsonl").read_text().splitlines()]
    assert dmd_log[-1]["step"] == 30 and any("dmd_loss" in r for r in dmd_log)
    # a second quickstart finds every stage done and does no training
    before = student_dir.joinpath("model.safetensors").stat().st_mtime_ns
    assert distill(overrides=overrides) == student_dir
    assert student_dir.joinpath("model.safetensors").stat().st_mtime_ns == before
