"""The quickstart's distillation stage runs its presets end to end (on a tiny teacher) and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamkd.data.toyworld import ToyClipDataset, ToyWorldConfig
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiTConfig
from streamkd.models.world import WorldModel, WorldModelConfig
from streamkd.quickstart import distill


def test_quickstart_distills_a_causal_student_and_resumes(tmp_path: Path, monkeypatch) -> None:
    cfg = WorldModelConfig(
        dit=DiTConfig(in_channels=8, out_channels=8, num_layers=1, num_heads=2, head_dim=12, ffn_dim=16, text_dim=16, num_actions=5),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128),
        horizon_frames=6,  # the presets stream chunks of 3 frames
    )
    torch.manual_seed(0)
    teacher = WorldModel(cfg)
    teacher.codec.fit(torch.stack([ToyClipDataset(cfg.world, 2)[i]["frames"] for i in range(8)]))
    teacher.save(tmp_path / "teacher")
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
