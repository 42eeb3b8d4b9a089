"""Revisit consistency (streamkd/eval/revisit.py): trajectories leave a place for the gap they
promise and come back; the scores put ground truth, a blurred mean, a frame-0 copier and random
texture where they belong; the runner gives every row; bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamkd.data.toyworld import ToyWorld, ToyWorldConfig
from streamkd.eval.revisit import (
    GAPS, KINDS, evaluate_revisits, gap_buckets, history_held, object_mask, other_place_frames, revisit_actions,
    score_trajectory,
)
from streamkd.bundle import CausalConfig
from streamkd.cache.memory import MemoryConfig
from tests.test_serve_batching import tiny_causal_model

WORLD = ToyWorldConfig()
SPAN, CHUNK = 9, 3  # the shipped students: 3 sinks + 6 window frames, 3-frame chunks
PROMPT = "forest with red squares"


def _episode(kind: str, gap: int, seed: int = 5):
    traj = revisit_actions(kind, gap, SPAN, CHUNK, WORLD, np.random.default_rng(seed))
    toy = ToyWorld(WORLD, seed, PROMPT)
    truth = toy.render(traj.actions, len(traj.actions))
    return traj, toy, truth


def _score(pred, truth, traj, toy, protocol: str):
    return score_trajectory(pred, truth, traj.actions, WORLD, sinks=3, window=6, chunk=CHUNK, protocol=protocol,
                            start=traj.return_start if protocol == "observed" else 1,
                            objects_THW=object_mask(toy, traj.actions, truth))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gap", GAPS)
def test_trajectories_return_after_the_promised_gap(kind: str, gap: int) -> None:
    traj, toy, truth = _episode(kind, gap)
    assert traj.return_start % CHUNK == 0 and 0 < traj.return_start < len(traj.actions)
    returning, _ = _score(truth, truth, traj, toy, "observed")
    assert returning[gap].count > 500, f"{kind}: no returning pixels at gap {gap} x {SPAN} frames"
    assert returning[gap].result()["median_gap_frames"] >= (gap / 2) * SPAN * (0.5 if gap == 32 else 1)


def test_scores_put_the_references_in_order() -> None:
    """Observed protocol (against ground truth): ground truth > blurred mean > frame-0 copier >
    random texture. Generated protocol (self-consistency): ground truth and a constant blurred
    mean are perfectly consistent (why it is shown beside the realism metrics), a copier that
    paints every place with frame 0 is not, nor is random texture."""
    traj, toy, truth = _episode("out_and_back", 8)
    rng = np.random.default_rng(0)
    T = len(truth)
    refs = {
        "ground_truth": truth,
        "blurred_mean": np.broadcast_to(np.rint(truth.reshape(-1, 3).mean(0)).astype(np.uint8), truth.shape).copy(),
        "frame0_copy": np.repeat(truth[:1], T, axis=0),
        "random_texture": rng.integers(0, 256, truth.shape, dtype=np.uint8),
    }
    observed, generated = {}, {}
    for name, frames in refs.items():
        pred = truth.copy()
        pred[traj.return_start :] = frames[traj.return_start :]
        ret, _ = _score(pred, truth, traj, toy, "observed")
        observed[name] = ret[8].result()["psnr"]
        ret, _ = _score(frames, truth, traj, toy, "generated")
        generated[name] = ret[8].result()["psnr"]
    assert observed["ground_truth"] == 100.0
    assert observed["ground_truth"] > observed["blurred_mean"] > observed["frame0_copy"] > observed["random_texture"], observed
    assert generated["ground_truth"] == generated["blurred_mean"] == 100.0
    assert generated["frame0_copy"] < 25 and generated["random_texture"] < 12, generated
    # a realistic painter without memory (another map of the biome) is no better than the mean
    other = other_place_frames(5, PROMPT, traj.actions, WORLD)
    pred = truth.copy()
    pred[traj.return_start :] = other[traj.return_start :]
    assert _score(pred, truth, traj, toy, "observed")[0][8].result()["psnr"] < observed["blurred_mean"]


def test_in_window_stability_catches_a_repainting_model() -> None:
    """Temporal stability compares what stays in the cache's window with its first rendering:
    a model that re-paints every frame from scratch scores low, ground truth 100 dB."""
    traj, toy, truth = _episode("loop", 2)
    _, win = _score(truth, truth, traj, toy, "generated")
    assert win.result()["psnr"] == 100.0
    noisy = np.clip(truth.astype(int) + np.random.default_rng(1).integers(-40, 41, truth.shape), 0, 255).astype(np.uint8)
    _, win = _score(noisy, truth, traj, toy, "generated")
    assert win.result()["psnr"] < 20


def test_gap_buckets() -> None:
    np.testing.assert_array_equal(gap_buckets(np.array([9, 35, 36, 143, 144, 1000]), 9), [2, 2, 8, 8, 32, 32])


def test_runner_gives_every_row_on_a_tiny_model() -> None:
    model = tiny_causal_model(CausalConfig(3, 3, 6), guidance=1.0)
    result = evaluate_revisits(model, episodes=1, first_index=0, gaps=(2,), oracle_max_gap=2)
    for row in ("model", "full_kv_oracle", "floor_mean_colour", "floor_other_place", "ceiling"):
        for protocol in ("observed", "generated"):
            assert result[row][protocol]["returning"]["2"]["pixels"] > 0, (row, protocol)
    assert result["ceiling"]["generated"]["returning"]["2"]["psnr"] == 100.0
    assert result["trajectories"][0]["gap"] == 2 and result["span_frames"] == 9
    first, last = result["history_held"]["2"]  # window only: 9 frames of a history that grows
    assert 0 < last < first <= 1


def test_bad_input_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown trajectory kind"):
        revisit_actions("spiral", 2, SPAN, CHUNK, WORLD, np.random.default_rng(0))
    with pytest.raises(ValueError, match="must be >= 1"):
        revisit_actions("loop", 0, SPAN, CHUNK, WORLD, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no room"):
        revisit_actions("loop", 2, SPAN, CHUNK, ToyWorldConfig(frame_size=64, map_size=128), np.random.default_rng(0))
    traj, toy, truth = _episode("idle", 2)
    with pytest.raises(ValueError, match="protocol"):
        score_trajectory(truth, truth, traj.actions, WORLD, sinks=3, window=6, chunk=3, protocol="dreamed")
    with pytest.raises(ValueError, match="frames must both be"):
        score_trajectory(truth[:-1], truth[:-1], traj.actions, WORLD, sinks=3, window=6, chunk=3, protocol="observed")
    model = tiny_causal_model(CausalConfig(3, 3, 6), guidance=1.0)
    model.cfg.causal = None
    with pytest.raises(ValueError, match="no causal config"):
        evaluate_revisits(model, episodes=1, first_index=0, gaps=(2,))


@pytest.mark.parametrize("memory", [MemoryConfig(), MemoryConfig(compressed_frames=4, fine_frames=2, bank_frames=4, retrieve_frames=2,
                                                                  admit_coverage=0.1, render=True, bank_level=1)],
                         ids=["window", "both-tiers-pooled-rendered-bank"])
def test_history_held_is_what_the_streaming_cache_holds(memory: MemoryConfig) -> None:
    """The eval's "history bytes held" replays the planner from the trajectory's cameras; it must
    be what a cache streaming that trajectory holds (its tier bytes, latents included) when the
    way back starts, over that many full-resolution pages."""
    causal = CausalConfig(3, 3, 6, memory=memory)
    model = tiny_causal_model(causal, guidance=1.0, anchor_warp=memory.render)
    dit, world = model.dit, model.cfg.world
    traj = revisit_actions("out_and_back", 8, SPAN, CHUNK, world, np.random.default_rng(3))
    want = history_held(model, causal, traj, bytes_per_value=4)  # fp32 pages here
    lh, lw = model.latent_hw
    cache = dit.new_cache(batch_size=1, height=lh, width=lw, sink_frames=3, window_frames=6, chunk_frames=3, memory=memory)
    actions = torch.from_numpy(traj.actions[None])
    gen = torch.Generator().manual_seed(0)
    ctx = model.encode_prompts([PROMPT])
    with torch.no_grad():
        for q0 in range(0, want["frames"], CHUNK):
            x = torch.randn(1, dit.cfg.in_channels, CHUNK, lh, lw, generator=gen)
            cache.write_latents(x)
            dit(x, torch.zeros(1, CHUNK), ctx, actions[:, q0 : q0 + CHUNK], cache=cache, write_cache=True, output=False)
    assert want["frames"] > 30 and len(cache._rows[0].cameras) == want["frames"]
    assert want["held_bytes"] == sum(cache.tier_bytes().values())
    page = 2 * cache.pool.k[:, 0].nbytes
    assert want["history_bytes"] == want["frames"] * page
    if memory.enabled:
        assert want["bank_entries"] == len(cache._rows[0].bank_packed) >= 2
        assert want["compressed_frames"] == len(cache._rows[0].compressed) == 4
    else:
        assert want["share"] == pytest.approx(9 / want["frames"])
