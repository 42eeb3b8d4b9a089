"""Shared fixtures: a tiny toy-world teacher that distillation and distributed tests start from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamkd.data.toyworld import ToyClipDataset, ToyWorldConfig
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiTConfig
from streamkd.models.world import WorldModel, WorldModelConfig


def save_tiny_teacher(folder: Path, horizon_frames: int = 4, num_layers: int = 2, anchor_warp: bool = False) -> Path:
    """Random weights, a fitted codec, camera-anchored RoPE (one token per move), 32x32 frames;
    ``anchor_warp``: the first frame warped into every frame's input, as the shipped teacher."""
    cfg = WorldModelConfig(
        dit=DiTConfig(in_channels=8, out_channels=8, num_layers=num_layers, num_heads=2, head_dim=12, ffn_dim=32,
                      text_dim=16, num_actions=5, action_shifts=((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)),
                      anchor_warp=anchor_warp),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128),
        horizon_frames=horizon_frames,
    )
    torch.manual_seed(0)
    model = WorldModel(cfg)
    clips = ToyClipDataset(cfg.world, 2)
    model.codec.fit(torch.stack([clips[i]["frames"] for i in range(8)]))
    model.save(folder)
    return folder


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """The tiny teacher with a horizon of 4 frames."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def anchor_teacher_dir(tmp_path_factory) -> Path:
    """The tiny teacher with anchor-warp conditioning."""
    return save_tiny_teacher(tmp_path_factory.mktemp("anchor_teacher"), anchor_warp=True)
