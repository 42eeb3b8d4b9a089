"""``streamkd eval --data``: image-to-video fidelity against held-out videos, with floor and ceiling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamkd.cli import main
from streamkd.data.video import write_toy_videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("heldout")
    write_toy_videos(folder, 3, num_frames=12, base_seed=7)  # seeds the toy models never trained on
    return folder


def test_models_sit_between_floor_and_ceiling(videos: Path, tmp_path: Path) -> None:
    """The toy teacher and the fast student, conditioned on each video's first frame, caption and
    actions, beat repeating the first frame by more than 1 dB and stay below the codec's own round
    trip of the video (what no latent model can beat)."""
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", "toy-teacher", "--checkpoint", "toy-student-fast", "--data", str(videos),
                 "--episodes", "3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for name, r in results.items():
        assert r["clips"] == 3 and r["frames"] == 12
        assert r["floor"]["video_psnr"] + 1.0 < r["video_psnr"] < r["ceiling"]["video_psnr"], (name, r)
        assert 0.0 < r["gap_closed"] < 1.0


def test_eval_data_refusals(videos: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--checkpoint", "toy-teacher", "--data", str(videos), "--episodes", "5"]) == 2
    assert "holds 3 usable videos" in capsys.readouterr().err
    from streamkd.models.tiny_wan import make_tiny_wan

    folder = make_tiny_wan(tmp_path / "tiny-wan")
    assert main(["eval", "--checkpoint", str(folder)]) == 2
    assert "--data FOLDER" in capsys.readouterr().err
