"""Wan's causal video VAE (diffusers' ``AutoencoderKLWan``) as a streamkd codec, with streaming.

Legend: B batch, F frames (latent frames for latents), H/W pixels, C latent channels (the VAE's
``z_dim``), h/w latent rows/columns, P channels the VAE's convolutions see (3 for RGB, 3 * p * p after
Wan2.2's ``patch_size = p`` pixel-unshuffle).

Contract (``streamkd.bundle.Codec``, see ``streamkd.models.codec``):
    encode(frames_BFHWC uint8) -> latents_BCFhw            1 + 4k frames -> 1 + k latent frames
    decode(latents_BCFhw) -> frames_BFHWC uint8            F latent frames -> 1 + 4(F - 1) frames
    stream_decoder().push(latents_BCFhw) -> frames_BFHWC   first push 1 + 4(F - 1) frames, later 4F
    stream_encoder().push(frames_BFHWC) -> latents_BCFhw   first push 1 + 4k frames, later 4k
Latents are normalised as Wan's pipelines do: ``(mu - latents_mean) / latents_std`` with the VAE
config's per-channel ``latents_mean`` / ``latents_std``, where ``mu`` is the posterior *mean* (diffusers'
``latent_dist.mode()``, ``sample_mode="argmax"``), never a sample, so encoding is deterministic. Decoding
inverts it as ``WanPipeline`` does before ``vae.decode``: ``latents / (1 / latents_std) + latents_mean``.
Pixels are uint8 <-> [-1, 1] (``x / 127.5 - 1``); decoded frames are clamped to [-1, 1] (as diffusers
does) and rounded back to uint8. ``decode_float`` / ``push_float`` return the [-1, 1] frames before
rounding, for exact comparisons and for losses in pixel space.

Why streaming is exact. diffusers' ``AutoencoderKLWan._encode`` runs the encoder on frame 0 alone and
then on groups of 4 frames, and ``_decode`` runs the decoder one latent frame at a time (frame 0 with
``first_chunk=True``). Each call carries a per-layer feature cache (the last two time steps every causal
convolution saw, or the marker ``"Rep"`` for an upsampler that has seen only frame 0) in a list on the
module (``vae._feat_map`` / ``vae._enc_feat_map``). We drive ``vae.encoder`` / ``vae.decoder`` with the
same chunking, but each stream owns its cache list, so
    * pushing a video in pieces makes exactly the calls the whole-video pass makes;
    * streams are independent (two decoders of one VAE may interleave), and ``encode`` / ``decode`` -- the
      same code with a fresh cache -- leave no state on the shared module.

diffusers internals relied upon (diffusers 0.42): ``encoder(x, feat_cache=, feat_idx=)`` and
``decoder(x, feat_cache=, feat_idx=, first_chunk=)``; a cache needs at most one slot per
``WanCausalConv3d`` of the encoder / decoder (how ``AutoencoderKLWan.clear_cache`` sizes it);
``quant_conv`` / ``post_quant_conv`` are 1x1x1, so frame-wise; the encoder's output is the posterior's
``[mean, logvar]`` along channels; ``patchify`` / ``unpatchify`` for ``patch_size``.

Not used: diffusers' tiling and slicing (we never call ``vae.encode`` / ``vae.decode``), so results are
exact but memory grows with frame size; accelerate offload hooks on those methods are bypassed too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, patchify, unpatchify
from torch import nn

CONFIG_NAME = "config.json"


def _frames_to_uint8(frames_BFHWC: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0..255 (round to nearest)."""
    return frames_BFHWC.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def _cache_slots(module: nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def _resolve_vae_folder(folder: str | Path) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Wan VAE folder {str(root)!r} does not exist or is not a directory")
    for path in (root, root / "vae"):  # the VAE folder itself, or a pipeline root holding vae/
        if (path / CONFIG_NAME).is_file():
            return path
    raise FileNotFoundError(
        f"no {CONFIG_NAME} in {str(root)!r} nor in its 'vae/' subfolder; pass a diffusers Wan pipeline folder or its vae/ folder"
    )


def _check_same_stream(started: tuple[int, int, int] | None, shape: tuple[int, int, int], what: str, factory: str) -> None:
    """A stream's pushes keep the (batch, height, width) of its first push (None: this is the first)."""
    if started is not None and shape != started:
        raise ValueError(f"this stream started with batch {started[0]} at {started[1]}x{started[2]} {what}; "
                         f"got batch {shape[0]} at {shape[1]}x{shape[2]} -- start a new {factory}() for a new shape")


class WanStreamDecoder:
    """Decodes a latent video chunk by chunk; holds this stream's decoder feature cache.

    The first push of F latent frames yields 1 + 4(F - 1) frames, every later push 4F; concatenated,
    they are ``codec.decode`` of the whole latent video. Batch size and latent size are fixed by the
    first push."""

    def __init__(self, codec: "WanVAECodec") -> None:
        self.codec = codec
        self._cache: list = [None] * codec._decoder_slots
        self._shape: tuple[int, int, int] | None = None  # (B, h, w) of the first push

    @torch.no_grad()
    def push_float(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        """The next frames as floats in [-1, 1], ``(B, n, H, W, 3)`` in the VAE's dtype."""
        self.codec._check_latents(latents_BCFhw)
        first = self._shape is None
        shape = (latents_BCFhw.shape[0], *latents_BCFhw.shape[3:])
        _check_same_stream(self._shape, shape, "latents", "stream_decoder")
        frames = self.codec._decode_chunk(latents_BCFhw, self._cache, first)
        self._shape = shape
        return frames

    def push(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        """The next frames as uint8 ``(B, n, H, W, 3)``."""
        return _frames_to_uint8(self.push_float(latents_BCFhw))


class WanStreamEncoder:
    """Encodes a video chunk by chunk; holds this stream's encoder feature cache.

    The first push takes 1 + 4k frames (k + 1 latent frames: Wan codes frame 0 alone), every later
    push 4k frames (k latent frames); concatenated, the latents are ``codec.encode`` of the whole video.
    Batch size and frame size are fixed by the first push."""

    def __init__(self, codec: "WanVAECodec") -> None:
        self.codec = codec
        self._cache: list = [None] * codec._encoder_slots
        self._shape: tuple[int, int, int] | None = None  # (B, H, W) of the first push

    @torch.no_grad()
    def push(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, k, h, w)`` (``k + 1`` on the first push) of the next frames (uint8)."""
        return self._push(frames_BFHWC, uint8=True)

    @torch.no_grad()
    def push_float(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """``push`` for frames in [-1, 1] (``codec.encode_float``'s inputs: an image-to-video
        condition video ``[image, 0, 0, ...]``, whose 0 no uint8 level holds)."""
        if not frames_BFHWC.is_floating_point():
            raise ValueError(f"push_float takes float frames in [-1, 1], got {frames_BFHWC.dtype}; use push for uint8")
        return self._push(frames_BFHWC, uint8=False)

    def _push(self, frames_BFHWC: torch.Tensor, uint8: bool) -> torch.Tensor:
        first = self._shape is None
        self.codec._check_frames(frames_BFHWC, "the first push" if first else "each push after the first", first, uint8)
        shape = (frames_BFHWC.shape[0], *frames_BFHWC.shape[2:4])
        _check_same_stream(self._shape, shape, "frames", "stream_encoder")
        if uint8:
            latents = self.codec._encode_chunk(frames_BFHWC, self._cache, first)
        else:
            latents = self.codec._encode_scaled(frames_BFHWC.to(self.codec.vae.device, self.codec.vae.dtype), self._cache, first)
        self._shape = shape
        return latents


class WanVAECodec(nn.Module):
    """A diffusers ``AutoencoderKLWan`` (Wan2.1, or Wan2.2 with ``patch_size``) behind streamkd's codec
    contract; see the module docstring for conventions. Holds the VAE as the submodule ``vae`` (so
    ``.to(device / dtype)`` moves it), in eval mode; inputs are moved to the VAE's device and dtype."""

    temporal_factor = 4
    """Frames per latent frame after the first, fixed by diffusers' 1 + 4k chunking of the encoder."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        super().__init__()
        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"WanVAECodec wraps a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        c = vae.config
        if 2 ** sum(c.temperal_downsample) != self.temporal_factor:
            raise ValueError(f"temperal_downsample={list(c.temperal_downsample)} compresses time "
                             f"{2 ** sum(c.temperal_downsample)}x; diffusers' Wan VAE chunking needs exactly two True (4x)")
        self.patch = c.patch_size or 1
        if c.in_channels != 3 * self.patch**2 or c.out_channels != 3 * self.patch**2:
            raise ValueError(f"in_channels={c.in_channels}, out_channels={c.out_channels} with patch_size={c.patch_size}: "
                             f"an RGB Wan VAE has 3 * patch_size**2 = {3 * self.patch**2} of each")
        if len(c.latents_mean) != c.z_dim or len(c.latents_std) != c.z_dim:
            raise ValueError(f"latents_mean / latents_std have {len(c.latents_mean)} / {len(c.latents_std)} entries; "
                             f"they need one per latent channel (z_dim={c.z_dim})")
        self.vae = vae
        self.latent_channels: int = c.z_dim
        # One 2x spatial downsample per stage but the last, then Wan2.2's patchify on top.
        self.spatial_factor: int = 2 ** (len(c.dim_mult) - 1) * self.patch
        # Derived from the config, so not part of the state dict; (1, C, 1, 1, 1) to broadcast over latents.
        self.register_buffer("latents_mean", torch.tensor(c.latents_mean, dtype=vae.dtype).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(c.latents_std, dtype=vae.dtype).view(1, -1, 1, 1, 1), persistent=False)
        self._encoder_slots = _cache_slots(vae.encoder)
        self._decoder_slots = _cache_slots(vae.decoder)
        self.eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "WanVAECodec":
        """Load from a diffusers Wan pipeline folder (holding ``vae/``) or from the VAE folder itself."""
        path = _resolve_vae_folder(folder)
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path / CONFIG_NAME)!r} is not valid JSON: {e}") from e
        class_name = config.get("_class_name") if isinstance(config, dict) else None
        if class_name != AutoencoderKLWan.__name__:
            raise ValueError(f"{str(path / CONFIG_NAME)!r} names _class_name={class_name!r}; WanVAECodec loads only "
                             f"{AutoencoderKLWan.__name__!r} (Wan2.1 / Wan2.2 VAEs)")
        return cls(AutoencoderKLWan.from_pretrained(str(path)))

    # ------------------------------------------------------------------------------------ contract
    @torch.no_grad()
    def encode(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(B, 1 + 4k, H, W, 3)`` -> normalised posterior-mean latents ``(B, C, 1 + k, h, w)``."""
        self._check_frames(frames_BFHWC, "encode", first=True)
        return self._encode_chunk(frames_BFHWC, [None] * self._encoder_slots, first=True)

    @torch.no_grad()
    def encode_float(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """Frames in [-1, 1] ``(B, 1 + 4k, H, W, 3)`` -> normalised latents, for inputs uint8 cannot
        hold: Wan2.1 I2V encodes ``[image, zeros...]``, and 0 lies between two uint8 levels."""
        if not frames_BFHWC.is_floating_point():
            raise ValueError(f"encode_float takes float frames in [-1, 1], got {frames_BFHWC.dtype}; use encode for uint8")
        self._check_frames(frames_BFHWC, "encode_float", first=True, uint8=False)
        x = frames_BFHWC.to(self.vae.device, self.vae.dtype)
        return self._encode_scaled(x, [None] * self._encoder_slots, first=True)

    @torch.no_grad()
    def decode_float(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, F, h, w)`` -> frames ``(B, 1 + 4(F - 1), H, W, 3)`` in [-1, 1]."""
        self._check_latents(latents_BCFhw)
        return self._decode_chunk(latents_BCFhw, [None] * self._decoder_slots, first=True)

    def decode(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, F, h, w)`` -> uint8 frames ``(B, 1 + 4(F - 1), H, W, 3)``."""
        return _frames_to_uint8(self.decode_float(latents_BCFhw))

    def stream_decoder(self) -> WanStreamDecoder:
        return WanStreamDecoder(self)

    def stream_encoder(self) -> WanStreamEncoder:
        return WanStreamEncoder(self)

    # ---------------------------------------------------------------------------------- internals
    def _check_frames(self, frames_BFHWC: torch.Tensor, who: str, first: bool, uint8: bool = True) -> None:
        if frames_BFHWC.ndim != 5 or frames_BFHWC.shape[-1] != 3:
            raise ValueError(f"{who} takes RGB frames (B, F, H, W, 3), got shape {tuple(frames_BFHWC.shape)}")
        if uint8 and frames_BFHWC.dtype != torch.uint8:
            raise ValueError(f"{who} takes uint8 frames (0..255), got {frames_BFHWC.dtype}; quantise them first, "
                             f"e.g. [-1, 1] floats with x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)")
        F, H, W = frames_BFHWC.shape[1:4]
        s = self.spatial_factor
        if H % s or W % s or H == 0 or W == 0:
            raise ValueError(f"frame size {H}x{W} is not a positive multiple of the Wan VAE's spatial stride {s}; "
                             f"crop or pad to e.g. {max(s, H // s * s)}x{max(s, W // s * s)}")
        if first and (F - 1) % 4:
            lo = 1 + (F - 1) // 4 * 4
            raise ValueError(f"{who} takes 1 + 4k frames (Wan's causal VAE codes frame 0 alone, then 4 frames per latent "
                             f"frame), got {F}; use {lo} or {lo + 4} frames")
        if not first and (F == 0 or F % 4):
            raise ValueError(f"{who} takes a positive multiple of 4 frames (4 per latent frame), got {F}")

    def _check_latents(self, latents_BCFhw: torch.Tensor) -> None:
        if latents_BCFhw.ndim != 5 or not latents_BCFhw.is_floating_point():
            raise ValueError(f"latents must be floats (B, C, F, h, w), got shape {tuple(latents_BCFhw.shape)} "
                             f"of {latents_BCFhw.dtype}")
        if latents_BCFhw.shape[1] != self.latent_channels:
            raise ValueError(f"latents have {latents_BCFhw.shape[1]} channels; this Wan VAE has "
                             f"z_dim={self.latent_channels} (latents must be (B, C, F, h, w))")
        if latents_BCFhw.shape[2] == 0:
            raise ValueError("got 0 latent frames (B, C, F=0, h, w); pass at least one")

    def _encode_chunk(self, frames_BFHWC: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        """uint8 frames -> normalised latents, continuing the stream whose encoder cache is ``cache``."""
        # Scale in fp32 and cast once: in bf16 the division and the subtraction would each round.
        x = frames_BFHWC.to(self.vae.device, torch.float32).div(127.5).sub(1.0).to(self.vae.dtype)
        return self._encode_scaled(x, cache, first)

    def _encode_scaled(self, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        """[-1, 1] frames ``(B, F, H, W, 3)`` in the VAE's dtype -> normalised latents."""
        vae = self.vae
        x_BPFHW = patchify(x.permute(0, 4, 1, 2, 3).contiguous(), self.patch)
        # diffusers' _encode chunking: frame 0 alone, then 4 frames per call -> one latent frame per call.
        starts = ([0] if first else []) + list(range(1 if first else 0, x_BPFHW.shape[2], 4))
        ends = starts[1:] + [x_BPFHW.shape[2]]
        out = [vae.encoder(x_BPFHW[:, :, a:b], feat_cache=cache, feat_idx=[0]) for a, b in zip(starts, ends)]
        moments = vae.quant_conv(torch.cat(out, dim=2))  # (B, 2C, F, h, w): posterior [mean, logvar]
        mu = moments[:, : self.latent_channels]
        return (mu - self.latents_mean) / self.latents_std

    def _decode_chunk(self, latents_BCFhw: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        """Normalised latents -> [-1, 1] frames, continuing the stream whose decoder cache is ``cache``."""
        vae = self.vae
        z = latents_BCFhw.to(vae.device, vae.dtype)
        z = z / (1.0 / self.latents_std) + self.latents_mean  # WanPipeline's denormalisation, written as it does
        x = vae.post_quant_conv(z)
        # diffusers' _decode chunking: one latent frame per call; the stream's frame 0 is its first chunk.
        out = [vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=first and i == 0)
               for i in range(x.shape[2])]
        video_BPFHW = unpatchify(torch.cat(out, dim=2), self.patch).clamp(-1.0, 1.0)
        return video_BPFHW.permute(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
