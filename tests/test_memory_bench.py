"""World memory's cost: the Wan-scale plan follows the cost model, the bench's figures are bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamkd.bench import bench_memory, bench_memory_markdown
from streamkd.cache.memory import MemoryConfig, memory_bytes_per_frame
from streamkd.cache.plan import DEFAULT_MEMORY, WAN_SHAPES, markdown, memory_plan_table
from streamkd.cli import main
from streamkd.data.toyworld import ToyWorldConfig
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiTConfig
from streamkd.bundle import CausalConfig, SamplingConfig
from streamkd.models.world import WorldModel, WorldModelConfig


# ----------------------------------------------------------------------------------------- plan
def _row(rows: list[dict], model: str, variant: str) -> dict:
    return next(r for r in rows if r["model"] == model and r["variant"] == variant)


def test_plan_follows_the_cost_model() -> None:
    rows = memory_plan_table()
    r = _row(rows, "Wan2.1-T2V-1.3B", "both")
    N, T, n = 30, 1560, 12 * 128
    # the formula of the memory module's docstring, written out independently: int8 k and v of the
    # pooled tokens, fp16 scales (one per key channel, one per value token)
    assert r["bytes_per_frame"]["compressed_level1"] == pytest.approx(N * (T / 4 * n * 2 + (n + T / 4) * 2))
    assert r["bytes_per_frame"]["compressed_level2"] == pytest.approx(N * (T / 16 * n * 2 + (n + T / 16) * 2))
    assert r["bytes_per_frame"]["window_or_bank_frame"] == N * T * n * 2 * 2
    for shape in WAN_SHAPES:
        want = memory_bytes_per_frame(num_layers=shape.num_layers, tokens_per_frame=shape.tokens_per_frame,
                                      channels=shape.channels, cfg=DEFAULT_MEMORY)
        assert _row(rows, shape.name, "both")["bytes_per_frame"] == want
    # every tier at capacity: 3 sinks + 6 window + 32 bank full frames, 16 level-1 + 32 level-2 frames
    c = r["bytes_per_frame"]
    assert r["kv_bytes_per_stream"] == pytest.approx((3 + 6 + 32) * c["window_or_bank_frame"]
                                                     + 16 * c["compressed_level1"] + 32 * c["compressed_level2"])
    assert r["attended_tokens_per_chunk"] == pytest.approx((3 + 4 + 6 + 3) * T + 16 * T / 4 + 32 * T / 16)
    assert r["attention_cost_ratio"] == pytest.approx(r["attended_tokens_per_chunk"] / ((3 + 6 + 3) * T))


def test_plan_memory_is_bounded_while_full_history_grows() -> None:
    for r in memory_plan_table():
        full, ratio = r["full_history_bytes"], r["memory_over_full_history"]
        # one KV figure for every stream length (the tiers are full after a few seconds) ...
        assert r["frames_to_capacity"] < 60 * r["latent_fps"]
        assert ratio["1"] * full["1"] == pytest.approx(ratio["60"] * full["60"]) == pytest.approx(r["kv_bytes_per_stream"])
        # ... against a full history linear in the length: 4 latent frames/s of full-resolution frames
        assert full["10"] == pytest.approx(10 * full["1"]) and full["60"] == pytest.approx(60 * full["1"])
        assert full["1"] == 60 * 4 * r["bytes_per_frame"]["window_or_bank_frame"]
        assert isinstance(r["sessions_per_gpu"], int) and r["sessions_per_gpu"] >= 0
    for r in memory_plan_table():
        if r["model"].endswith("1.3B") or r["variant"] == "window":
            assert r["sessions_per_gpu"] > 0
    small = _row(memory_plan_table(), "Wan2.1-T2V-1.3B", "both")
    assert small["sessions_per_gpu"] == int((80 - 2.6 - 10) * 1e9 // small["kv_bytes_per_stream"])
    assert "sessions per GPU" in markdown(memory_plan_table())


def test_plan_flags_a_config_the_grid_refuses() -> None:
    rows = memory_plan_table()
    # two levels at pool 2 need 4x4 cells; the 30x52 grid of 480x832 is not a multiple of 4
    assert _row(rows, "Wan2.1-T2V-1.3B", "both")["runs_on_grid"].startswith("no")
    assert _row(rows, "Wan2.1-T2V-1.3B", "bank")["runs_on_grid"] == "yes"
    one_level = memory_plan_table(MemoryConfig(compressed_frames=48, fine_frames=48))
    assert all(r["runs_on_grid"] == "yes" for r in one_level)


def test_cli_memory_plan_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["bench", "memory-plan", "--json", str(out)]) == 0
    assert "| Wan2.1-T2V-14B | both |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 10 and data["assumptions"]  # 2 models x (window, compressed, bank, both, bank pooled)
    rows = {(r["model"], r["variant"]): r for r in data["rows"]}
    full, pooled = rows["Wan2.1-T2V-1.3B", "bank"], rows["Wan2.1-T2V-1.3B", "bank pooled"]
    assert pooled["tier_bytes"]["bank"] == full["tier_bytes"]["bank"] * pooled["bytes_per_frame"]["bank_entry"] / \
        full["bytes_per_frame"]["window_or_bank_frame"]
    assert pooled["sessions_per_gpu"] > 3 * full["sessions_per_gpu"]


# ---------------------------------------------------------------------------------------- bench
@pytest.fixture(scope="module")
def tiny() -> WorldModel:
    """Random causal model, 4x4 token grid, camera actions of one token on a 16-token torus."""
    cfg = WorldModelConfig(
        dit=DiTConfig(in_channels=8, out_channels=8, num_layers=2, num_heads=2, head_dim=12, ffn_dim=32, text_dim=16,
                      num_actions=5, action_shifts=((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))),
        codec=CodecConfig(patch=4, latent_channels=8),
        world=ToyWorldConfig(frame_size=32, map_size=128, speed_px=8),
        horizon_frames=6,
        causal=CausalConfig(3, 3, 6),
        sampling=SamplingConfig(kind="euler", num_steps=1),
    )
    torch.manual_seed(0)
    return WorldModel(cfg).eval()


MEMORIES = {
    "window": None,
    "compressed": MemoryConfig(compressed_frames=4, fine_frames=2),
    # admit every frame, so that the bank is full long before the first milestone
    "bank": MemoryConfig(bank_frames=4, retrieve_frames=2, admit_coverage=0.0),
    "both": MemoryConfig(compressed_frames=4, fine_frames=2, bank_frames=4, retrieve_frames=2, admit_coverage=0.0),
}


@pytest.fixture
def one_thread():
    """Tensors this small gain nothing from more threads, and on a busy shared machine a second
    OpenMP thread waiting for a core makes these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_memory_is_bounded(tiny: WorldModel, one_thread) -> None:
    result = bench_memory(tiny, tiny.cfg.causal, frames=(30, 60), memories=MEMORIES, window=5)
    assert set(result["variants"]) == set(MEMORIES)
    assert set(result["latency_ratio_vs_window"]) == set(MEMORIES)
    for name, v in result["variants"].items():
        a, b = v["at"]["30"], v["at"]["60"]
        assert set(a) >= {"latency_ms", "tier_bytes", "cache_bytes", "pages_in_use", "gathered_bytes_per_chunk",
                          "chunk_own_bytes"}
        assert a["tier_bytes"] == b["tier_bytes"], name  # every tier at capacity by frame 30
        assert a["pages_in_use"] == b["pages_in_use"]
        assert result["flatness"][name]["cache_bytes"] == 1.0
        assert result["latency_ratio_vs_window"]["window"]["30"] == 1.0
    T, N, H, D, f32 = 16, 2, 2, 12, 4  # tokens per frame, layers, heads, head dim, bytes per value
    frame = N * T * H * D * 2 * f32
    at = {name: v["at"]["60"] for name, v in result["variants"].items()}
    assert at["window"]["cache_bytes"] == (3 + 6) * frame
    assert at["bank"]["tier_bytes"]["bank"] == 4 * frame and at["bank"]["pages_in_use"] == 3 + 6 + 4
    assert at["compressed"]["pages_in_use"] == 3 + 6 and at["compressed"]["tier_bytes"]["compressed"] > 0
    assert at["window"]["chunk_own_bytes"] == at["both"]["chunk_own_bytes"] == 3 * frame
    # history copied per chunk: sinks + window (+ 2 level-1 frames of 16/4 tokens, 2 level-2 of 1 token)
    assert at["window"]["gathered_bytes_per_chunk"] == (3 + 6) * frame
    assert at["compressed"]["gathered_bytes_per_chunk"] == ((3 + 6) * T + 2 * 4 + 2 * 1) * N * H * D * 2 * f32
    assert "| both | 60 |" in bench_memory_markdown(result)


def test_cli_bench_memory(tiny: WorldModel, tmp_path: Path, capsys, one_thread) -> None:
    tiny.save(tmp_path / "ckpt")
    out = tmp_path / "bench.json"
    assert main(["bench", "memory", "--checkpoint", str(tmp_path / "ckpt"), "--milestones", "6", "12",
                 "--json", str(out)]) == 0
    assert "What each figure counts" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["variants"]) == {"window", "compressed", "bank", "both"}
