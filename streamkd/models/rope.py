"""3D rotary position embedding (frame, row, column), laid out as in Wan2.1.

The head dim ``D`` is split into a temporal part ``D - 4*(D//6)`` and two spatial parts of
``2*(D//6)`` each; every part rotates consecutive channel pairs ``(x[2i], x[2i+1])`` by
``pos * theta**(-2i/dim)``. Angles are computed in float64 and stored as float32 tables, the same
precision diffusers' ``WanRotaryPosEmbed`` uses, so converted Wan weights see identical rotations.

Positions are passed in explicitly: the temporal position of a frame is decided by the attention
layout / KV cache (re-based, bounded), not by its index in the tensor.
"""

from __future__ import annotations

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
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # Module casts (.to(bf16), .half()) must not reach the angle tables: diffusers keeps Wan's
        # RoPE in fp32 too, and bf16 angles are off by ~1e-2 at large positions.
        super()._apply(fn, recurse)
        self.cos, self.sin = self.cos.float(), self.sin.float()
        return self

    def table(self, frame_pos: torch.Tensor, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape ``(len(frame_pos) * grid_h * grid_w, D/2)`` for tokens ordered
        (frame, row, column) -- the order patch embedding flattens them in."""
        if int(frame_pos.max()) >= self.max_len or max(grid_h, grid_w) > self.max_len:
            raise ValueError(f"RoPE position beyond max_len={self.max_len}; raise rope_max_seq_len")
        ft, fh, fw = self.half_dims
        num_f = frame_pos.shape[0]
        out = []
        for full in (self.cos, self.sin):
            t_part, h_part, w_part = full.split([ft, fh, fw], dim=1)
            t_FHWd = t_part[frame_pos].view(num_f, 1, 1, ft).expand(num_f, grid_h, grid_w, ft)
            h_FHWd = h_part[:grid_h].view(1, grid_h, 1, fh).expand(num_f, grid_h, grid_w, fh)
            w_FHWd = w_part[:grid_w].view(1, 1, grid_w, fw).expand(num_f, grid_h, grid_w, fw)
            out.append(torch.cat([t_FHWd, h_FHWd, w_FHWd], dim=-1).reshape(num_f * grid_h * grid_w, -1))
        return out[0], out[1]


def apply_rope(x_BLHD: torch.Tensor, cos_Ld: torch.Tensor, sin_Ld: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` by the per-token angles (``d = D/2``)."""
    x1, x2 = x_BLHD.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_Ld[None, :, None, :], sin_Ld[None, :, None, :]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x_BLHD)
