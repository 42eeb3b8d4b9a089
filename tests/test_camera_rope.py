"""Camera-anchored RoPE: a frame's spatial positions move with the camera, so a static world point
keeps one position in every frame (``streamkd.models.rope``, ``DiTConfig.action_shifts``)."""

from __future__ import annotations

import pytest
import torch

from streamkd.data.toyworld import ToyWorldConfig
from streamkd.models.codec import CodecConfig
from streamkd.models.dit import DiT, DiTConfig
from streamkd.models.rope import Rope3D, apply_rope
from streamkd.models.world import WorldModelConfig

SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))  # none up down left right, one token per frame


def test_offset_table_is_the_plain_table_at_shifted_positions() -> None:
    rope = Rope3D(head_dim=24, max_len=64)
    frames = [0, 1, 2]
    camera = torch.tensor([[[0, 0], [0, 1], [-2, 3]]])  # (B=1, F=3, 2)
    cos, sin = rope.table(frames, 4, 5, camera)
    big_cos, big_sin = rope.table(frames, 12, 12)  # plain, positions 0..11 on each axis
    cos_FHWd, big_FHWd = cos.view(3, 4, 5, -1), big_cos.view(3, 12, 12, -1)
    sin_FHWd, big_sin_FHWd = sin.view(3, 4, 5, -1), big_sin.view(3, 12, 12, -1)
    base = 4  # compare inside the plain grid: camera (dy, dx) -> rows base+dy.., cols base+dx..
    camera_shifted = rope.table(frames, 4, 5, camera + base)
    for f, (dy, dx) in enumerate(camera[0].tolist()):
        rows, cols = slice(base + dy, base + dy + 4), slice(base + dx, base + dx + 5)
        torch.testing.assert_close(camera_shifted[0].view(3, 4, 5, -1)[f], big_FHWd[f, rows, cols], atol=1e-6, rtol=0)
        torch.testing.assert_close(camera_shifted[1].view(3, 4, 5, -1)[f], big_sin_FHWd[f, rows, cols], atol=1e-6, rtol=0)
    # zero offset reproduces the plain table (which is what Wan parity runs on)
    plain_cos, _ = rope.table(frames, 4, 5)
    torch.testing.assert_close(cos_FHWd[0], plain_cos.view(3, 4, 5, -1)[0], atol=1e-7, rtol=0)
    assert sin_FHWd.shape == cos_FHWd.shape


def test_module_casts_keep_the_camera_frequencies_exact() -> None:
    """``.to(bf16)`` must not round the float64 camera frequencies (nor the angle tables)."""
    rope, cast = Rope3D(head_dim=24, max_len=64), Rope3D(head_dim=24, max_len=64).to(torch.bfloat16)
    assert cast.inv_freq_h.dtype == cast.inv_freq_w.dtype == torch.float64
    frames, camera = [0, 5], torch.tensor([[[3, -7], [1000, 2]]])
    for a, b in zip(rope.table(frames, 4, 5, camera), cast.table(frames, 4, 5, camera)):
        assert torch.equal(a, b)


def test_static_point_scores_like_the_same_position() -> None:
    """q of frame 1 at grid column c, k of frame 0 at grid column c+1, camera moved right by one
    token: the score equals that of an unmoved camera at the same grid column."""
    rope = Rope3D(head_dim=12, max_len=16)
    gen = torch.Generator().manual_seed(0)
    q0, k0 = torch.randn(1, 1, 1, 12, generator=gen), torch.randn(1, 1, 1, 12, generator=gen)
    moved = rope.table([0, 0], 3, 3, torch.tensor([[[0, 0], [0, 1]]]))
    still = rope.table([0, 0], 3, 3, torch.tensor([[[0, 0], [0, 0]]]))

    def score(tables, q_tok, k_tok):
        cos, sin = tables
        q = apply_rope(q0, cos[:, q_tok : q_tok + 1], sin[:, q_tok : q_tok + 1])
        k = apply_rope(k0, cos[:, k_tok : k_tok + 1], sin[:, k_tok : k_tok + 1])
        return (q * k).sum()

    frame1, row, col = 9, 1, 1  # token index = frame * 9 + row * 3 + col
    torch.testing.assert_close(score(moved, frame1 + row * 3 + col, row * 3 + col + 1),
                               score(still, frame1 + row * 3 + col, row * 3 + col), atol=1e-5, rtol=0)


def test_null_and_missing_actions_do_not_move_the_camera() -> None:
    dit = DiT(DiTConfig(in_channels=4, out_channels=4, num_layers=1, num_heads=2, head_dim=12, ffn_dim=16,
                        text_dim=8, num_actions=5, action_shifts=SHIFTS))
    null = torch.full((2, 4), dit.null_action)
    assert dit.camera_offsets(null, 2, 4).abs().sum() == 0
    assert dit.camera_offsets(None, 2, 4).abs().sum() == 0
    right_then_up = torch.tensor([[0, 4, 4, 1]])
    assert dit.camera_offsets(right_then_up, 1, 4)[0].tolist() == [[0, 0], [0, 1], [0, 2], [-1, 2]]


def test_cache_carries_the_camera_across_chunks_and_snapshots() -> None:
    dit = DiT(DiTConfig(in_channels=4, out_channels=4, num_layers=1, num_heads=2, head_dim=12, ffn_dim=16,
                        text_dim=8, num_actions=5, action_shifts=SHIFTS)).eval()
    cache = dit.new_cache(batch_size=1, height=4, width=4, sink_frames=1, window_frames=2, chunk_frames=2)
    x, ctx = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 2, 8)
    with torch.no_grad():
        dit(x, torch.zeros(1, 2), ctx, torch.tensor([[0, 4]]), cache=cache, write_cache=True)
        snap = cache.snapshot()
        dit(x, torch.zeros(1, 2), ctx, torch.tensor([[2, 2]]), cache=cache, write_cache=True)
    assert cache.camera_last_B2.tolist() == [[2, 1]]
    # slot 0: the sink (frame 0); the ring holds frame 3 in slot 1 and frame 2 in slot 2 (frame 1 evicted)
    assert cache.camera_BS2[0].tolist() == [[0, 0], [2, 1], [1, 1]]
    cache.restore(snap)
    assert cache.camera_last_B2.tolist() == [[0, 1]] and cache.camera_BS2[0, :2].tolist() == [[0, 0], [0, 1]]


@pytest.mark.parametrize(
    "shifts, match",
    [(((0, 0), (1, 0)), "one \\(rows, cols\\) pair per action"), (((0, 0, 1),) * 5, "one \\(rows, cols\\) pair")],
)
def test_bad_action_shifts_are_refused(shifts, match) -> None:
    with pytest.raises(ValueError, match=match):
        DiTConfig(num_actions=5, action_shifts=shifts)


def test_action_shifts_must_match_the_toy_camera() -> None:
    dit = dict(in_channels=24, out_channels=24, num_actions=5)
    cfg = WorldModelConfig(dit=DiTConfig(**dit, action_shifts=SHIFTS), codec=CodecConfig(patch=4, latent_channels=24))
    assert cfg.toy_action_shifts() == SHIFTS
    with pytest.raises(ValueError, match="do not match the toy world's camera.*speed_px=16"):
        WorldModelConfig(dit=DiTConfig(**dit, action_shifts=SHIFTS), codec=CodecConfig(patch=4, latent_channels=24),
                         world=ToyWorldConfig(speed_px=16))


# ------------------------------------------------------------------------------- anchor warp
def _anchor_dit(**kw) -> DiT:
    return DiT(DiTConfig(in_channels=24, out_channels=24, num_layers=1, num_heads=2, head_dim=12, ffn_dim=16, text_dim=8,
                         num_actions=5, action_shifts=SHIFTS, anchor_warp=True, **kw)).eval()


def test_anchor_warp_reproduces_the_ground_truth_view() -> None:
    """The first frame's latent, shifted by the camera, equals the toy world's own latent of each
    later frame wherever the mask says it is known (static map, no moving objects)."""
    from streamkd.data.toyworld import render
    from streamkd.models.codec import PatchPCACodec

    world = ToyWorldConfig(num_objects=0)
    actions = [0, 4, 4, 1, 1, 1, 3, 3, 2, 0, 4, 4]
    frames = torch.from_numpy(render(5, "forest with red squares", actions, 12, world))[None]
    codec = PatchPCACodec(CodecConfig(patch=4, latent_channels=24)).fit(frames[0, :4, None].transpose(0, 1))
    z = codec.encode(frames)
    dit = _anchor_dit()
    t = torch.full((1, 12), 500.0)
    t[:, 0] = 0
    a = torch.tensor([actions])
    cond = dit._anchor_condition(z, t, a, dit.camera_offsets(a, 1, 12), None, False)
    warped, mask = cond[:, :24], cond[:, 24:]
    known = mask.mean(dim=(0, 1, 3, 4))
    assert known[0] == 1 and known[1] == 0.875 and 0 < known.min() < 1  # one token column per move
    torch.testing.assert_close(warped * mask, z * mask, atol=1e-5, rtol=0)
    # unknown camera (null actions: CFG's unconditional rows) and no given first frame: no anchor
    null = torch.full_like(a, dit.null_action)
    cond = dit._anchor_condition(z, t, null, dit.camera_offsets(null, 1, 12), None, False)
    assert cond[:, 24, 0].all() and not cond[:, 24, 1:].any()
    t[:, 0] = 500.0
    assert not dit._anchor_condition(z, t, a, dit.camera_offsets(a, 1, 12), None, False)[:, 24].any()


def test_anchor_override_gives_a_late_window_the_streams_first_frame() -> None:
    """A window far into a stream, run alone with ``anchor=`` (the stream's first frame at its
    camera offset in the window's coordinates) gets exactly the anchor condition its frames have in
    the full-stream forward: how DMD's teacher scores the last window of a long rollout."""
    dit = _anchor_dit()
    gen = torch.Generator().manual_seed(3)
    T, ws = 14, 8
    z = torch.randn(2, 24, T, 8, 8, generator=gen)
    a = torch.randint(0, 5, (2, T), generator=gen)
    a[:, 0] = 0
    t = torch.full((2, T), 500.0)
    t[:, 0] = 0
    camera = dit.camera_offsets(a, 2, T)
    full = dit._anchor_condition(z, t, a, camera, None, False)
    anchor = (z[:, :, 0], camera[:, 0] - camera[:, ws - 1])
    wa = a[:, ws:]
    window = dit._anchor_condition(z[:, :, ws:], t[:, ws:], wa, dit.camera_offsets(wa, 2, T - ws), None, False, anchor)
    assert full[:, 24, ws:].any()  # the walk stays near enough that some of the first frame is in view
    torch.testing.assert_close(window, full[:, :, ws:], atol=0, rtol=0)
    # without the override the window's own frame 0 would be the anchor: a different condition
    t_w = t[:, ws:].clone()
    t_w[:, 0] = 0
    own = dit._anchor_condition(z[:, :, ws:], t_w, wa, dit.camera_offsets(wa, 2, T - ws), None, False)
    assert not torch.equal(own, full[:, :, ws:])
    # through forward; and refused where a cache keeps its own anchor
    out = dit(z[:, :, ws:], t[:, ws:], torch.zeros(2, 4, 8), wa, anchor=anchor)
    assert out.shape == z[:, :, ws:].shape
    cache = dit.new_cache(batch_size=2, height=8, width=8, sink_frames=1, window_frames=3, chunk_frames=3)
    with pytest.raises(ValueError, match="anchor= is for full-sequence calls"):
        dit(z[:, :, :3], t[:, :3], torch.zeros(2, 4, 8), a[:, :3], cache=cache, anchor=anchor)
    with pytest.raises(ValueError, match=r"anchor must be \(latent \(2, 24, 8, 8\), camera \(2, 2\)\)"):
        dit(z[:, :, ws:], t[:, ws:], torch.zeros(2, 4, 8), wa, anchor=(anchor[0][:1], anchor[1]))


def test_anchor_warp_needs_camera_shifts() -> None:
    with pytest.raises(ValueError, match="anchor_warp needs action_shifts"):
        DiTConfig(num_actions=5, anchor_warp=True)


def test_warm_start_into_anchor_warp_is_exact(tmp_path) -> None:
    """A plain checkpoint continued with anchor_warp and camera RoPE: the new input channels start
    at zero, so without camera motion (null actions) the model computes exactly what it did."""
    from streamkd.models.world import WorldModel
    from streamkd.train.teacher import TeacherTrainer

    from .test_training import tiny_config

    plain = tiny_config(tmp_path / "plain", max_steps=1)
    TeacherTrainer(plain).train(progress=False)
    start = WorldModel.load(tmp_path / "plain" / "final")
    warped_dit = DiTConfig(**{**vars(plain.model.dit), "action_shifts": SHIFTS, "anchor_warp": True})
    cfg = tiny_config(tmp_path / "warp", init=str(tmp_path / "plain" / "final"),
                      model=WorldModelConfig(**{**vars(plain.model), "dit": warped_dit}))
    model = TeacherTrainer(cfg).model
    assert model.dit.patch_embed.weight.shape[1] == 2 * 8 + 1
    assert model.dit.patch_embed.weight[:, 8:].abs().sum() == 0
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 8, 4, 8, 8, generator=gen), start.encode_prompts(["forest with red squares", ""])
    t = torch.tensor([[0.0, 500.0, 500.0, 500.0], [0.0, 900.0, 100.0, 300.0]])
    null = torch.full((2, 4), start.dit.null_action)
    with torch.no_grad():
        torch.testing.assert_close(model.dit(x, t, ctx, null), start.dit(x, t, ctx, null), atol=1e-5, rtol=0)
