"""WanVAECodec against diffusers' AutoencoderKLWan: tiny random VAEs, fp32 on CPU.

Legend: B batch, F frames (latent frames for latents), H/W pixels, C latent channels, h/w latent size.
Frames are 32x48 (non-square) throughout, so latents are 4x6 (2x3 for the Wan2.2-style VAE).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan

from streamkd.models.tiny_wan import TINY_VAE, make_tiny_wan
from streamkd.models.wan_vae import WanVAECodec

ATOL = 1e-4
H, W = 32, 48

# Wan2.2 TI2V-5B's VAE shape at toy width: residual blocks, 2x2 patchify in front (16x spatial).
TINY_VAE22 = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                  is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)


def _latents(B: int, F: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 16, F, h, w, generator=g)


def _frames(B: int, F: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, F, H, W, 3), generator=g, dtype=torch.uint8)


def _mean_std(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latent statistics, (1, C, 1, 1, 1)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def _diffusers_decode(vae: AutoencoderKLWan, latents_BCFhw: torch.Tensor) -> torch.Tensor:
    """What WanPipeline does to its output latents, as [-1, 1] frames (B, F, H, W, 3)."""
    mean, std = _mean_std(vae)
    with torch.no_grad():
        video_BCFHW = vae.decode(latents_BCFhw / (1.0 / std) + mean, return_dict=False)[0]
    return video_BCFHW.permute(0, 2, 3, 4, 1)


def _diffusers_encode(vae: AutoencoderKLWan, frames_BFHWC: torch.Tensor) -> torch.Tensor:
    """WanImageToVideoPipeline's latent convention: posterior mode, (mu - mean) * (1 / std)."""
    mean, std = _mean_std(vae)
    x_BCFHW = frames_BFHWC.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        mu = vae.encode(x_BCFHW).latent_dist.mode()
    return (mu - mean) * (1.0 / std)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def codec() -> WanVAECodec:
    # No AutoencoderKLWan weight is zero-initialised, so the seeded default init gives non-trivial outputs.
    torch.manual_seed(0)
    return WanVAECodec(AutoencoderKLWan(**TINY_VAE))


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    """A 6-latent-frame video (decodes to 21 frames), batch 2."""
    return _latents(2, 6, H // 8, W // 8, seed=1)


@pytest.fixture(scope="module")
def full_decode(codec, latents) -> torch.Tensor:
    return codec.decode_float(latents)


def test_module_basics(codec, latents):
    assert (codec.temporal_factor, codec.spatial_factor, codec.latent_channels) == (4, 8, 16)
    assert dict(codec.named_children())["vae"] is codec.vae
    assert not codec.vae.training
    with torch.enable_grad():
        assert not codec.decode_float(latents[:, :, :1]).requires_grad


def test_decode_matches_wan_pipeline(codec, latents, full_decode):
    ref = _diffusers_decode(codec.vae, latents)
    assert _max_diff(full_decode, ref) <= ATOL
    assert full_decode.std() > 0.05  # the random VAE's output is not flat
    assert torch.equal(codec.decode(latents), full_decode.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8))


def test_encode_matches_diffusers_posterior_mode(codec):
    frames = _frames(2, 9, seed=2)
    ours = codec.encode(frames)
    assert ours.shape == (2, 16, 3, H // 8, W // 8)
    assert _max_diff(ours, _diffusers_encode(codec.vae, frames)) <= ATOL


@pytest.mark.parametrize("split", [(1, 1, 1, 1, 1, 1), (2, 2, 2), (3, 3), (1, 2, 3), (3, 1, 2), (5, 1)])
def test_stream_decode_equals_full_decode(codec, latents, full_decode, split):
    decoder = codec.stream_decoder()
    chunks = []
    start = 0
    for n in split:
        chunk = decoder.push_float(latents[:, :, start : start + n])
        assert chunk.shape[1] == (1 + 4 * (n - 1) if start == 0 else 4 * n)
        chunks.append(chunk)
        start += n
    assert _max_diff(torch.cat(chunks, dim=1), full_decode) <= ATOL


def test_stream_decode_uint8_equals_decode(codec, latents):
    decoder = codec.stream_decoder()
    frames = torch.cat([decoder.push(latents[:, :, a:b]) for a, b in [(0, 1), (1, 3), (3, 6)]], dim=1)
    assert frames.dtype == torch.uint8
    assert torch.equal(frames, codec.decode(latents))


def test_interleaved_stream_decoders(codec, latents, full_decode):
    # A second stream with another batch size: its cache must not leak into the first.
    other = _latents(1, 4, H // 8, W // 8, seed=3)
    d1, d2 = codec.stream_decoder(), codec.stream_decoder()
    out1, out2 = [], []
    for a, b in [(0, 2), (2, 3), (3, 4)]:
        out1.append(d1.push_float(latents[:, :, a:b]))
        out2.append(d2.push_float(other[:, :, a:b]))
    out1.append(d1.push_float(latents[:, :, 4:]))
    assert _max_diff(torch.cat(out1, dim=1), full_decode) <= ATOL
    assert _max_diff(torch.cat(out2, dim=1), codec.decode_float(other)) <= ATOL


@pytest.mark.parametrize("split", [(1, 4, 4, 4, 4), (5, 12), (13, 4), (9, 8)])
def test_stream_encode_equals_full_encode(codec, split):
    frames = _frames(2, 17, seed=4)
    full = codec.encode(frames)
    encoder = codec.stream_encoder()
    chunks = []
    start = 0
    for n in split:
        chunk = encoder.push(frames[:, start : start + n])
        assert chunk.shape[2] == (1 + (n - 1) // 4 if start == 0 else n // 4)
        chunks.append(chunk)
        start += n
    assert _max_diff(torch.cat(chunks, dim=2), full) <= ATOL


def test_frame_counts_and_round_trip_shapes(codec):
    for F in (1, 5, 9):
        latents = codec.encode(_frames(1, F, seed=F))
        assert latents.shape == (1, 16, 1 + (F - 1) // 4, H // 8, W // 8)
        frames = codec.decode(latents)
        assert frames.shape == (1, F, H, W, 3) and frames.dtype == torch.uint8


def test_batch_rows_independent(codec, latents, full_decode):
    for b in range(latents.shape[0]):
        assert _max_diff(codec.decode_float(latents[b : b + 1]), full_decode[b : b + 1]) <= ATOL
    frames = _frames(2, 5, seed=5)
    both = codec.encode(frames)
    assert _max_diff(codec.encode(frames[1:]), both[1:]) <= ATOL


def test_wan22_style_vae_streams_and_matches_diffusers():
    torch.manual_seed(0)
    codec = WanVAECodec(AutoencoderKLWan(**TINY_VAE22))
    assert codec.spatial_factor == 16
    latents = _latents(1, 3, H // 16, W // 16, seed=6)
    full = codec.decode_float(latents)
    assert _max_diff(full, _diffusers_decode(codec.vae, latents)) <= ATOL
    decoder = codec.stream_decoder()
    assert _max_diff(torch.cat([decoder.push_float(latents[:, :, :2]), decoder.push_float(latents[:, :, 2:])], 1), full) <= ATOL
    frames = _frames(1, 9, seed=7)
    encoded = codec.encode(frames)
    assert _max_diff(encoded, _diffusers_encode(codec.vae, frames)) <= ATOL
    encoder = codec.stream_encoder()
    assert _max_diff(torch.cat([encoder.push(frames[:, :5]), encoder.push(frames[:, 5:])], 2), encoded) <= ATOL


def test_follows_module_dtype(codec, latents):
    codec64 = WanVAECodec(AutoencoderKLWan(**TINY_VAE)).to(torch.float64)
    codec64.load_state_dict(codec.state_dict())
    assert codec64.latents_std.dtype == torch.float64
    frames64 = codec64.decode_float(latents[:1, :, :2])
    assert frames64.dtype == torch.float64
    assert _max_diff(frames64, codec.decode_float(latents[:1, :, :2])) <= ATOL
    assert codec64.encode(_frames(1, 1, seed=8)).dtype == torch.float64


def test_from_pretrained_pipeline_and_vae_folders(tmp_path):
    folder = make_tiny_wan(tmp_path / "pipe")
    from_pipeline = WanVAECodec.from_pretrained(folder)
    from_vae = WanVAECodec.from_pretrained(folder / "vae")
    reference = AutoencoderKLWan.from_pretrained(str(folder / "vae"))
    latents = _latents(1, 2, H // 8, W // 8, seed=9)
    expected = _diffusers_decode(reference, latents)
    assert _max_diff(from_pipeline.decode_float(latents), expected) <= ATOL
    assert _max_diff(from_vae.decode_float(latents), expected) <= ATOL
    assert not from_pipeline.vae.training


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WanVAECodec.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="'vae/' subfolder"):
        WanVAECodec.from_pretrained(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="'AutoencoderKL'.*AutoencoderKLWan"):
        WanVAECodec.from_pretrained(tmp_path)


def test_bad_inputs(codec):
    with pytest.raises(ValueError, match=r"1 \+ 4k frames.*got 8; use 5 or 9"):
        codec.encode(_frames(1, 8, seed=0))
    with pytest.raises(ValueError, match=r"frame size 30x48 .* stride 8"):
        codec.encode(torch.zeros(1, 1, 30, 48, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 frames.*torch.float32"):
        codec.encode(torch.zeros(1, 1, H, W, 3))
    with pytest.raises(ValueError, match=r"RGB frames \(B, F, H, W, 3\)"):
        codec.encode(torch.zeros(1, 1, 3, H, W, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latents have 8 channels.*z_dim=16"):
        codec.decode(torch.zeros(1, 8, 1, 4, 6))
    with pytest.raises(ValueError, match=r"0 latent frames"):
        codec.decode(torch.zeros(1, 16, 0, 4, 6))

    encoder = codec.stream_encoder()
    with pytest.raises(ValueError, match=r"the first push takes 1 \+ 4k frames.*got 4"):
        encoder.push(_frames(1, 4, seed=0))
    encoder.push(_frames(1, 1, seed=0))
    with pytest.raises(ValueError, match=r"each push after the first takes a positive multiple of 4 frames.*got 3"):
        encoder.push(_frames(1, 3, seed=0))
    with pytest.raises(ValueError, match=r"started with batch 1 at 32x48 frames; got batch 2"):
        encoder.push(_frames(2, 4, seed=0))

    decoder = codec.stream_decoder()
    decoder.push_float(torch.zeros(1, 16, 1, 4, 6))
    with pytest.raises(ValueError, match=r"started with batch 1 at 4x6 latents; got batch 1 at 4x4"):
        decoder.push_float(torch.zeros(1, 16, 1, 4, 4))
