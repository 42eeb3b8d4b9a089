"""Codecs: RGB frames <-> diffusion latents, with a streaming decoder.

Legend: B batch, F frames, H/W pixels, C latent channels, h/w latent rows/columns.

Interface (``Codec``), what the generator and trainers rely on:
    encode(frames_BFHWC uint8) -> latents_BCFhw   (normalised: ~zero mean, unit variance on average)
    decode(latents_BCFhw) -> frames_BFHWC uint8
    stream_decoder() -> object with ``push(latents_BCFhw) -> frames_BFHWC`` for chunk-wise decoding.
A temporally-causal codec (the Wan VAE, 4x in time with a per-layer feature cache) keeps its
cache inside the stream decoder; the toy codec is frame-wise, so its decoder has no state.

``PatchPCACodec`` is the toy world's codec: a linear autoencoder over non-overlapping
``p x p`` RGB patches (pixel-unshuffle), whose encoder/decoder are the top principal components
of toy-world patches. PCA is the optimal linear autoencoder for squared error, is fitted in
closed form in seconds (no training run to ship or reproduce), and is exactly streamable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as Fn


@dataclass
class CodecConfig:
    """Toy patch-PCA codec shape."""

    patch: int = 4
    """Pixels per latent cell along each axis (spatial compression)."""
    latent_channels: int = 16
    """Principal components kept per patch (of 3 * patch**2)."""

    def __post_init__(self) -> None:
        if self.patch < 1:
            raise ValueError(f"patch must be >= 1, got {self.patch}")
        if not 1 <= self.latent_channels <= 3 * self.patch**2:
            raise ValueError(f"latent_channels must be in 1..{3 * self.patch**2} for patch={self.patch}, got {self.latent_channels}")


class _FramewiseStreamDecoder:
    def __init__(self, codec: "PatchPCACodec") -> None:
        self.codec = codec

    def push(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents_BCFhw)


class PatchPCACodec(nn.Module):
    temporal_factor = 1

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        n = 3 * cfg.patch**2
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("basis", torch.eye(n)[:, : cfg.latent_channels].clone())  # (n, C), orthonormal
        self.register_buffer("scale", torch.ones(cfg.latent_channels))

    @property
    def spatial_factor(self) -> int:
        return self.cfg.patch

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    def _patches(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """uint8 frames -> (B, F, h, w, 3*p*p) patch vectors in [-1, 1]."""
        B, F, H, W, _ = frames_BFHWC.shape
        p = self.cfg.patch
        if H % p or W % p:
            raise ValueError(f"frame size {H}x{W} is not divisible by the codec patch {p}")
        x = frames_BFHWC.to(self.mean.device, torch.float32).div(127.5).sub(1.0)
        x = x.permute(0, 1, 4, 2, 3).reshape(B * F, 3, H, W)
        x = Fn.pixel_unshuffle(x, p)  # (B*F, 3*p*p, h, w)
        return x.reshape(B, F, 3 * p * p, H // p, W // p).permute(0, 1, 3, 4, 2)

    @torch.no_grad()
    def fit(self, frames_BFHWC: torch.Tensor) -> "PatchPCACodec":
        """Principal components of the patches of ``frames`` (uint8)."""
        x = self._patches(frames_BFHWC).reshape(-1, self.mean.numel()).double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
        eigval, eigvec = torch.linalg.eigh(cov)  # ascending
        order = eigval.argsort(descending=True)[: self.cfg.latent_channels]
        self.mean.copy_(mean.float())
        self.basis.copy_(eigvec[:, order].float())
        # One scale for all channels (unit mean variance), not per-channel whitening: PCA is a
        # rotation of patch space, so this keeps diffusion in the latent equivalent to pixel-space
        # diffusion, where noise drowns fine texture before coarse structure. Whitening instead
        # blew the near-random texture components up to the same weight as the structure, and
        # the teacher spent its capacity on them.
        self.scale.fill_(float(eigval[order].mean().sqrt()))
        return self

    def encode(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        z = (self._patches(frames_BFHWC) - self.mean) @ self.basis / self.scale  # (B, F, h, w, C)
        return z.permute(0, 4, 1, 2, 3).contiguous()

    def decode(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        B, C, F, h, w = latents_BCFhw.shape
        p = self.cfg.patch
        z = latents_BCFhw.float().permute(0, 2, 3, 4, 1) * self.scale  # (B, F, h, w, C)
        x = (z @ self.basis.T + self.mean).permute(0, 1, 4, 2, 3).reshape(B * F, -1, h, w)
        x = Fn.pixel_shuffle(x, p).reshape(B, F, 3, h * p, w * p).permute(0, 1, 3, 4, 2)
        return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)

    def stream_decoder(self) -> _FramewiseStreamDecoder:
        return _FramewiseStreamDecoder(self)
