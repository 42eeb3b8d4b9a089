"""3D rotary position embedding (frame, row, column), laid out as in Wan2.1.

The head dim ``D`` is split into a temporal part ``D - 4*(D//6)`` and two spatial parts of
``2*(D//6)`` each; every part rotates consecutive channel pairs ``(x[2i], x[2i+1])`` by
``pos * theta**(-2i/dim)``. Angles are computed in float64 and stored as float32 tables, the same
precision diffusers' ``WanRotaryPosEmbed`` uses, so converted Wan weights see identical rotations.

Positions are passed in explicitly: the temporal position of a frame is decided by the attention
layout / KV cache (re-based, bounded), not by its index in the tensor.

Camera-anchored spatial positions (optional): a frame may carry a per-stream offset (rows, cols),
in tokens, added to its spatial RoPE positions. With the offset equal to the camera's translation
since the start of the stream, a point of a static world keeps one spatial position in every
frame, so "the same place in an earlier frame" is the zero relative offset that RoPE attention
finds easiest (compare PRoPE, Li et al. 2025, which puts relative camera poses into attention).
Offsets are unbounded integers: their angles are computed in float64 on the fly, exact to ~1e-10
rad for any offset a stream can reach, and only differences between frames ever matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Rope3D(nn.Module):
    def __init__(self, head_dim: int, max_len: int = 1024, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim < 6 or head_dim % 2:
            raise ValueError(f"head_dim {head_dim} does not fit 3D RoPE: use an even head_dim >= 6")
        self.dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
        self.max_len = max_len
        pos = torch.arange(max_len, dtype=torch.float64)
        tables = []
        for dim in self.dims:
            inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
            tables.append(torch.outer(pos, inv_freq))  # (max_len, dim/2) angles
        angles = torch.cat(tables, dim=1)  # (max_len, D/2): [temporal | rows | columns]
        self.half_dims = tuple(d // 2 for d in self.dims)
        self.inv_freq_h = 1.0 / theta ** (torch.arange(0, self.dims[1], 2, dtype=torch.float64) / self.dims[1])
        self.inv_freq_w = 1.0 / theta ** (torch.arange(0, self.dims[2], 2, dtype=torch.float64) / self.dims[2])
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # Module casts (.to(bf16), .half()) must not reach the angle tables: diffusers keeps Wan's
        # RoPE in fp32 too, and bf16 angles are off by ~1e-2 at large positions.
        # (re-floating after the cast would keep the rounding: keep the fp32 originals instead). The
        # float64 camera frequencies follow the module's device, so camera tables never copy them.
        exact = (self.cos, self.sin, self.inv_freq_h, self.inv_freq_w)
        super()._apply(fn, recurse)
        dev = self.cos.device
        self.cos, self.sin, self.inv_freq_h, self.inv_freq_w = (t.to(dev) for t in exact)
        return self

    def check_positions(self, largest: int) -> None:
        """Refuse a temporal position the tables do not cover (checked on the host: positions are
        host integers, so no device sync is needed to validate them)."""
        if largest >= self.max_len:
            raise ValueError(f"RoPE position {largest} beyond max_len={self.max_len}; raise rope_max_seq_len")

    def table(
        self, positions: Sequence[int], grid_h: int, grid_w: int, camera_BF2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape ``(len(positions) * grid_h * grid_w, D/2)`` for tokens ordered
        (frame, row, column) -- the order patch embedding flattens them in. ``positions`` are the
        frames' temporal positions as host integers (a ``range`` is built on the device directly).

        With ``camera_BF2`` (integer (rows, cols) offset of each frame of each stream) the tables
        are per stream, ``(B, F * grid_h * grid_w, D/2)``, spatial positions shifted by the offsets.
        """
        num_f = len(positions)
        if num_f:
            self.check_positions(max(positions))
        if max(grid_h, grid_w) > self.max_len:
            raise ValueError(f"RoPE grid {grid_h}x{grid_w} beyond max_len={self.max_len}; raise rope_max_seq_len")
        dev = self.cos.device
        if isinstance(positions, range):
            frame_pos = torch.arange(positions.start, positions.stop, positions.step, device=dev)
        else:
            frame_pos = torch.tensor(list(positions), dtype=torch.long, device=dev)
        ft, fh, fw = self.half_dims
        if camera_BF2 is not None:
            return self._camera_table(frame_pos, grid_h, grid_w, camera_BF2)
        out = []
        for full in (self.cos, self.sin):
            t_part, h_part, w_part = full.split([ft, fh, fw], dim=1)
            t_FHWd = t_part[frame_pos].view(num_f, 1, 1, ft).expand(num_f, grid_h, grid_w, ft)
            h_FHWd = h_part[:grid_h].view(1, grid_h, 1, fh).expand(num_f, grid_h, grid_w, fh)
            w_FHWd = w_part[:grid_w].view(1, 1, grid_w, fw).expand(num_f, grid_h, grid_w, fw)
            out.append(torch.cat([t_FHWd, h_FHWd, w_FHWd], dim=-1).reshape(num_f * grid_h * grid_w, -1))
        return out[0], out[1]

    def _camera_table(
        self, frame_pos: torch.Tensor, grid_h: int, grid_w: int, camera_BF2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ft, fh, fw = self.half_dims
        B, num_f = camera_BF2.shape[:2]
        assert num_f == frame_pos.shape[0], "one camera offset per frame"
        dev = self.cos.device
        cam = camera_BF2.to(dev, torch.float64)  # host camera offsets -> the tables' device
        rows_BFh = cam[..., 0:1] + torch.arange(grid_h, dtype=torch.float64, device=dev)  # (B, F, gh)
        cols_BFw = cam[..., 1:2] + torch.arange(grid_w, dtype=torch.float64, device=dev)  # (B, F, gw)
        ang_h = rows_BFh[..., None] * self.inv_freq_h  # (B, F, gh, fh)
        ang_w = cols_BFw[..., None] * self.inv_freq_w  # (B, F, gw, fw)
        out = []
        for fn, full in ((torch.cos, self.cos), (torch.sin, self.sin)):
            t_BFHWd = full[frame_pos, :ft].view(1, num_f, 1, 1, ft).expand(B, num_f, grid_h, grid_w, ft)
            h_BFHWd = fn(ang_h).float()[:, :, :, None].expand(B, num_f, grid_h, grid_w, fh)
            w_BFHWd = fn(ang_w).float()[:, :, None].expand(B, num_f, grid_h, grid_w, fw)
            out.append(torch.cat([t_BFHWd, h_BFHWd, w_BFHWd], dim=-1).reshape(B, num_f * grid_h * grid_w, -1))
        return out[0], out[1]

    def token_table(
        self, t_BS: torch.Tensor, rows_BS: torch.Tensor, cols_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``(B, S, D/2)`` of tokens at explicit positions: integer temporal positions,
        float64 spatial ones (camera offsets included; pooled memory tokens sit at the centres of
        their cells). For integer rows/cols this equals ``table`` bit for bit. The caller checks
        the temporal positions on the host (``check_positions``) before moving them here."""
        ft = self.half_dims[0]
        dev = rows_BS.device
        ang_h = rows_BS.to(torch.float64)[..., None] * self.inv_freq_h.to(dev)
        ang_w = cols_BS.to(torch.float64)[..., None] * self.inv_freq_w.to(dev)
        out = []
        for fn, full in ((torch.cos, self.cos), (torch.sin, self.sin)):
            out.append(torch.cat([full[t_BS, :ft], fn(ang_h).float(), fn(ang_w).float()], dim=-1))
        return out[0], out[1]


def apply_rope(x_BLHD: torch.Tensor, cos_Ld: torch.Tensor, sin_Ld: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` by the per-token angles (``d = D/2``); the tables are shared
    ``(L, d)`` or per stream ``(B, L, d)``."""
    x1, x2 = x_BLHD.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_Ld.unsqueeze(-2), sin_Ld.unsqueeze(-2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x_BLHD)
