"""Shared fixtures: a tiny toy-world teacher that distillation and distributed tests start from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamkd.data.toyworld import ToyClipDataset, ToyWorldConfig
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiTConfig
from streamkd.models.world import WorldModel, WorldModelConfig


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """Random weights, a fitted codec, camera-anchored RoPE (one token per move), horizon 4."""
    cfg = WorldModelConfig(
        dit=DiTConfig(in_channels=8, out_channels=8, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16,
                      num_actions=5, action_shifts=((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128),
        horizon_frames=4,
    )
    torch.manual_seed(0)
    model = WorldModel(cfg)
    clips = ToyClipDataset(cfg.world, 2)
    model.codec.fit(torch.stack([clips[i]["frames"] for i in range(8)]))
    folder = tmp_path_factory.mktemp("teacher")
    model.save(folder)
    return folder
