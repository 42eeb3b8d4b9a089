"""The command line: generate writes real videos; bad input is one clear line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamkd.cli import main
from streamkd.data.toyworld import ToyClipDataset, ToyWorldConfig
from streamkd.media.video import read_video, video_info
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiTConfig
from streamkd.bundle import CausalConfig, SamplingConfig
from streamkd.models.world import WorldModel, WorldModelConfig


def _tiny_model(causal: CausalConfig | None) -> WorldModel:
    cfg = WorldModelConfig(
        dit=DiTConfig(in_channels=8, out_channels=8, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16, num_actions=5),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128, speed_px=4),
        horizon_frames=6,
        causal=causal,
        sampling=SamplingConfig(kind="euler", num_steps=2),
    )
    torch.manual_seed(0)
    model = WorldModel(cfg)
    clips = ToyClipDataset(cfg.world, 2)
    model.codec.fit(torch.stack([clips[i]["frames"] for i in range(8)]))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    _tiny_model(None).save(root / "bidirectional")
    _tiny_model(CausalConfig(2, 2, 4)).save(root / "causal")
    return {"bidirectional": root / "bidirectional", "causal": root / "causal"}


def _generate(ckpt: Path, out: Path, *extra: str) -> int:
    return main(["generate", "--checkpoint", str(ckpt), "--prompt", "forest with red squares", "--seed", "3",
                 "--out", str(out), *extra])


def test_generate_bidirectional_writes_its_frames(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "teacher.mp4"
    assert _generate(checkpoints["bidirectional"], out, "--frames", "6", "--actions", "right:3,up") == 0
    info = video_info(out)
    assert (info["frames"], info["width"], info["height"]) == (6, 32, 32)


@pytest.mark.parametrize("frames", [7, 30])
def test_generate_causal_streams_any_length(checkpoints, tmp_path: Path, frames: int) -> None:
    out = tmp_path / "student.mp4"
    assert _generate(checkpoints["causal"], out, "--frames", str(frames), "--actions", "right:4,down:2,none") == 0
    video = read_video(out)
    assert video.shape == (frames, 32, 32, 3)


def test_generate_with_memory_streams_and_differs_once_memory_engages(checkpoints, tmp_path: Path, capsys) -> None:
    plain, mem = tmp_path / "plain.mp4", tmp_path / "memory.mp4"
    args = ("--frames", "40", "--actions", "right:4,left:4")
    assert _generate(checkpoints["causal"], plain, *args) == 0
    assert _generate(checkpoints["causal"], mem, *args, "--memory", "compressed_frames=4,bank_frames=4,retrieve_frames=2") == 0
    a, b = read_video(plain), read_video(mem)
    assert a.shape == b.shape == (40, 32, 32, 3) and not np.array_equal(a, b)
    assert _generate(checkpoints["bidirectional"], tmp_path / "x.mp4", "--memory", "window") == 2
    assert "needs a causal checkpoint" in capsys.readouterr().err


def test_generate_teacher_through_causal_path(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "causal_teacher.mp4"
    assert _generate(checkpoints["bidirectional"], out, "--frames", "9", "--causal", "--chunk-frames", "3", "--window-frames", "3") == 0
    assert video_info(out)["frames"] == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (["--actions", "right:4,jump:2"], "unknown action 'jump'"),
        (["--actions", "right:0"], "positive integer"),
        (["--frames", "40"], "at most its horizon of 6 latent frames"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--window-frames", "4"], "need a causal checkpoint or --causal"),
        (["--guidance", "-1"], "guidance_scale must be >= 0"),
    ],
)
def test_generate_bad_input(checkpoints, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "never.mp4"
    assert _generate(checkpoints["bidirectional"], out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_generate_unknown_prompt_word(checkpoints, tmp_path: Path, capsys) -> None:
    code = main(["generate", "--checkpoint", str(checkpoints["bidirectional"]), "--prompt", "jungle with red squares",
                 "--out", str(tmp_path / "x.mp4"), "--frames", "4"])
    assert code == 2 and "unknown word(s) ['jungle']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_unwritable_output_and_missing_checkpoint(checkpoints, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _generate(checkpoints["bidirectional"], blocker / "out.mp4") == 2
    assert "out.mp4" in capsys.readouterr().err
    assert _generate(checkpoints["bidirectional"], tmp_path / "out.txt") == 2
    assert ".mp4" in capsys.readouterr().err
    assert _generate(tmp_path / "no_such_ckpt", tmp_path / "out.mp4") == 2
    assert "no_such_ckpt does not exist" in capsys.readouterr().err


def test_truncated_checkpoint_is_refused(checkpoints, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoints["causal"] / "config.json").read_text())
    data = (checkpoints["causal"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert _generate(broken, tmp_path / "out.mp4") == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_train_bad_config_field(tmp_path: Path, capsys) -> None:
    assert main(["train", "teacher", "--config", "configs/toyworld/teacher.yaml", "model.dit.num_layer=3"]) == 2
    err = capsys.readouterr().err
    assert "num_layer" in err and "num_layers" in err
    assert main(["train", "teacher", "--config", "configs/toyworld/teacher.yaml", "prompt_dropout=2"]) == 2
    assert "prompt_dropout must be in [0, 1]" in capsys.readouterr().err
    assert main(["train", "teacher", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_eval_writes_json_table_and_plot(checkpoints, tmp_path: Path) -> None:
    out, md, png = tmp_path / "eval.json", tmp_path / "eval.md", tmp_path / "psnr.png"
    revisit_png, grid_png = tmp_path / "revisit.png", tmp_path / "grid.png"
    assert main(["eval", "--checkpoint", str(checkpoints["causal"]), "--episodes", "2", "--frames", "8", "--drift-episodes", "1",
                 "--untethered", "2,3", "--untethered-episodes", "1", "--revisit-episodes", "1", "--oracle-max-gap", "2",
                 "--t2v-episodes", "1", "--json", str(out), "--markdown", str(md), "--plot", str(png),
                 "--revisit-plot", str(revisit_png), "--grid", str(grid_png), "--grid-frames", "12",
                 "--revisit-grid", str(tmp_path / "revisit_grid.png")]) == 0
    result = json.loads(out.read_text())
    for key in ("fidelity_psnr", "action_error_px", "fps_end_to_end", "first_frame_latency_ms", "prompt_accuracy",
                "t2v_prompt_accuracy"):
        assert isinstance(result[key], float)
    assert set(result["drift_psnr"]) == {"1x", "10x"} and len(result["psnr_curve"]) == 10 * 6 - 1
    # text-to-video realism reads every pixel of the episode's 8 frames
    assert result["t2v_realism"]["episodes"] == 1 and result["t2v_realism"]["masked_pixels"] == 8 * 32 * 32
    assert "(text-to-video, all pixels)" in md.read_text()
    assert set(result["drift_untethered"]["model"]) == {"2x", "3x"} and result["drift_untethered"]["frames"] == 18
    assert set(result["revisit"]) >= {"model", "full_kv_oracle", "floor_mean_colour", "ceiling"}
    # the oracle ran on gap 2 only (--oracle-max-gap 2)
    oracle = result["revisit"]["full_kv_oracle"]["generated"]["returning"]
    assert oracle["8"]["psnr"] is None and oracle["32"]["psnr"] is None
    report = md.read_text()
    for table in ("| floor |", "| unseen pixels |", "| revisits: PSNR dB / SSIM |", "| untethered drift |"):
        assert table in report
    for figure in (png, revisit_png, grid_png, tmp_path / "revisit_grid.png"):
        assert figure.read_bytes()[:4] == b"\x89PNG"
    # the saved result re-renders to the same report without evaluating again
    again = tmp_path / "again.md"
    assert main(["eval", "--report-from", str(out), "--markdown", str(again)]) == 0
    assert again.read_text() == report.replace(str(checkpoints["causal"]), "eval")
    # the exact-shift ceiling beats the frozen floor on both metrics, by construction
    assert result["ceiling"]["fidelity_psnr"] > result["floor"]["fidelity_psnr"]
    assert result["ceiling"]["action_error_px"] < 0.1 < result["floor"]["action_error_px"]


def test_eval_bad_input(checkpoints, tmp_path: Path, capsys) -> None:
    bidirectional = str(checkpoints["bidirectional"])
    base = ["eval", "--episodes", "1", "--frames", "6", "--t2v-episodes", "0"]
    # streaming measurements on a bidirectional checkpoint: refused, naming the fix
    assert main([*base, "--checkpoint", bidirectional, "--untethered", "10"]) == 2
    assert "bidirectional" in (err := capsys.readouterr().err) and "--causal" in err
    assert main([*base, "--checkpoint", bidirectional, "--revisit-episodes", "1"]) == 2
    assert "--causal" in capsys.readouterr().err
    assert main([*base, "--checkpoint", bidirectional, "--revisit-plot", str(tmp_path / "r.png")]) == 2
    assert "--revisit-plot needs revisit figures" in capsys.readouterr().err
    for bad in ("ten", "0", "5,-1", ""):
        assert main([*base, "--checkpoint", str(checkpoints["causal"]), "--untethered", bad]) == 2
        assert "comma-separated positive integers" in capsys.readouterr().err
    assert main([*base, "--checkpoint", bidirectional, "--grid", str(tmp_path / "no" / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--checkpoint", bidirectional, "--revisit-episodes", "-1"]) == 2
    assert ">= 0" in capsys.readouterr().err
    assert main(["eval", "--report-from", str(tmp_path / "missing.json")]) == 2
    assert "cannot read a saved eval result" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "eval needs --checkpoint" in capsys.readouterr().err
    causal = str(checkpoints["causal"])
    assert main([*base, "--checkpoint", causal, "--memory", "bank_frames=4"]) == 2
    assert "retrieve_frames >= 1" in (err := capsys.readouterr().err) and "--memory" in err
    assert main([*base, "--checkpoint", causal, "--memory", "banks=4"]) == 2
    assert "unknown key 'memory.banks'" in capsys.readouterr().err
    assert main([*base, "--checkpoint", bidirectional, "--memory", "window"]) == 2
    assert "--memory applies to streaming checkpoints" in capsys.readouterr().err


def test_eval_memory_variants_side_by_side(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(checkpoints["causal"]), "--episodes", "1", "--frames", "6", "--drift-episodes", "1",
                 "--untethered", "off", "--revisit-episodes", "0", "--t2v-episodes", "0", "--memory", "window",
                 "--memory", "compressed_frames=4,fine_frames=2", "--json", str(out)]) == 0
    names = list(json.loads(out.read_text()))
    assert names == [f"{checkpoints['causal']} [window]", f"{checkpoints['causal']} [compressed_frames=4,fine_frames=2]"]


def test_entry_point_exit_code(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "streamkd.cli", "generate", "--checkpoint", str(tmp_path), "--prompt", "x",
                           "--out", str(tmp_path / "a.mp4")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_bench_stream_reports_bounded_cost(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "stream", "--checkpoint", str(checkpoints["causal"]), "--milestones", "20", "60", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["latency_ms"]) == set(result["peak_rss_mb"]) == {"20", "60"}
    assert result["cache_mb"] > 0 and "denoising passes" in result["counts"]


def test_bench_stream_refuses_bidirectional(checkpoints, capsys) -> None:
    assert main(["bench", "stream", "--checkpoint", str(checkpoints["bidirectional"])]) == 2
    assert "causal" in capsys.readouterr().err


def test_bench_shapes_streams_cut_down_students_beside_the_teacher(checkpoints) -> None:
    """Smoke run of ``streamkd bench shapes`` (the figures themselves are machine-dependent and
    recorded in docs/, not asserted): every shape streams, and the ratio is its own fps over the
    teacher's measured in the same call."""
    from streamkd import bench
    from streamkd.models.world import WorldModel

    teacher = WorldModel.load(checkpoints["bidirectional"])
    result = bench.bench_student_shapes(teacher, shapes=[(2, 2, 2, 1, 2), (1, 1, 1, 0, 2)], chunks=8)
    assert result["teacher"]["fps"] > 0 and len(result["students"]) == 2
    for row in result["students"]:
        assert row["chunk_ms"] > 0
        assert row["x_teacher"] == pytest.approx(row["fps"] / result["teacher"]["fps"])
