"""One Wan-style diffusion transformer for teacher, critic and causal student.

Legend: B batch, C latent channels, F latent frames, H/W latent height/width, T tokens per frame,
L tokens (F*T), Lc prompt tokens, Li image tokens (CLIP patches + class token), E model width,
N heads, D head dim (``context_BLcD`` / ``image_context_BLiD``: D is the encoder's width there).

The architecture follows Wan2.1 (3D patch embedding, 3D RoPE, AdaLN modulation from a shared
timestep projection plus a learned per-block table, RMS q/k norm across heads, cross-attention to
prompt tokens, GELU-tanh FFN, modulated output head), so diffusers' ``WanTransformer3DModel``
weights convert one-to-one (``streamkd.models.wan``). Two generalisations serve streaming:

* **Per-frame timesteps and actions.** ``t_BF`` gives every latent frame its own noise level, so a
  clean conditioning frame (image-to-video: frame 0 at t=0) and clean cached history live in the
  same sequence as noisy frames. An optional action embedding is added to the timestep embedding
  of its frame, before the shared projection, so actions steer the AdaLN modulation of exactly the
  frame they apply to.
* **Anchor-warp conditioning** (optional, with camera-anchored RoPE): the stream's first frame, when
  given, is shifted by each frame's camera translation and concatenated to that frame's input
  channels with a mask of where it is known -- Wan2.1 image-to-video concatenates the first frame
  the same way, here it is first moved to where the camera looks (render-then-inpaint, as world
  models that condition on reprojected memory do). Copying what the first frame already shows
  becomes a per-token map instead of an attention pattern that must be learned from noise; the
  cache keeps the anchor (it is sink frame 0), so streaming sees exactly what the full sequence sees.
* **Optional CLIP image branch** (``image_dim``, Wan2.1 I2V): the CLIP vision tokens of the first
  frame are embedded and read by every cross-attention through their own key/value projections;
  that attention's output is added to the prompt attention's (decoupled cross-attention, as in
  diffusers' ``WanAttnProcessor``). Without ``image_dim`` the model is exactly the text-to-video one.
* **Attention mode is a runtime choice**, not a model type:
    - bidirectional  (``layout=None, cache=None``): every token sees every token -- teacher, critic;
    - block-causal   (``layout=CausalLayout``): the full sequence under the chunked causal rule of
      ``streamkd.attention.layout`` -- student training, and the reference for streaming;
    - cached         (``cache=KVCache``): one chunk of queries against the cache plus itself;
      ``write_cache=True`` also stores the chunk's keys/values (the clean pass of streaming).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from streamkd.attention.dispatch import attention
from streamkd.attention.layout import CausalLayout, block_causal_mask
from streamkd.attention.sparse import BlockSparseConfig, sparse_self_attention
from streamkd.cache.kv_cache import KVCache
from streamkd.cache.memory import MemoryConfig, Packed, coarsen, compress_frame, piece_positions, replay, wrap_near
from streamkd.cache.paged import PagedKVCache
from streamkd.models.rope import Rope3D, apply_rope


@dataclass
class DiTConfig:
    """Shape of the transformer. Every size in the code derives from these fields."""

    in_channels: int = 16
    """Latent channels in (codec latent channels)."""
    out_channels: int = 16
    """Latent channels out (flow-matching velocity)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(frames, rows, columns) per token. Causal modes need 1 frame per token."""
    num_layers: int = 6
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads; width = num_heads * head_dim."""
    head_dim: int = 48
    """Channels per head (RoPE splits it over frames/rows/columns)."""
    ffn_dim: int = 768
    """Hidden width of the feed-forward network."""
    text_dim: int = 64
    """Width of the prompt embeddings fed to cross-attention (4096 for Wan's T5)."""
    freq_dim: int = 256
    """Sinusoidal timestep embedding width."""
    num_actions: int = 0
    """Discrete actions for world-model conditioning; 0 disables it (plain Wan)."""
    anchor_warp: bool = False
    """Concatenate the first frame, shifted by the camera, and its known-mask to every frame's
    input (``2 * in_channels + 1`` input channels). Needs ``action_shifts``."""
    action_shifts: tuple[tuple[int, int], ...] | None = None
    """Camera-anchored RoPE: per action id, the camera's (rows, cols) translation in tokens that the
    action causes between two frames. When set, each frame's spatial RoPE positions are offset by
    the cumulative translation, so a static point keeps its position across frames (see
    ``streamkd.models.rope``). None: actions act only through the learned embedding."""
    cross_attn_norm: bool = True
    """LayerNorm (with affine) before cross-attention, as in Wan2.1."""
    eps: float = 1e-6
    """Epsilon of every norm."""
    sparse: BlockSparseConfig | None = None
    """Block-sparse self-attention (``streamkd.attention.sparse``: Triton kernel on CUDA, gather
    path on CPU) in every mode -- teacher, critic, student training and cached streaming. None:
    dense."""
    rope_max_seq_len: int = 1024
    """Largest RoPE position per axis."""
    rope_theta: float = 10000.0
    """RoPE base."""
    image_dim: int | None = None
    """Width of the CLIP image tokens read by cross-attention (1280 for Wan2.1 I2V's ViT-H/14);
    None: no image branch (text-to-video). Image-to-video also concatenates the first frame and
    its mask to the latents: that is only ``in_channels`` (36 = 16 + 4 + 16 for Wan2.1 I2V)."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints, got {self.patch_size}")
        if self.head_dim < 6 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE, got {self.head_dim}")
        if self.num_actions < 0:
            raise ValueError(f"num_actions must be >= 0 (0 disables actions), got {self.num_actions}")
        if self.image_dim is not None and self.image_dim < 1:
            raise ValueError(f"image_dim must be a positive int (the CLIP width) or None, got {self.image_dim}")
        if self.anchor_warp and self.action_shifts is None:
            raise ValueError("anchor_warp needs action_shifts (the camera translation per action); set both or neither")
        if self.action_shifts is not None:
            self.action_shifts = tuple(tuple(int(v) for v in row) for row in self.action_shifts)
            if len(self.action_shifts) != self.num_actions or any(len(row) != 2 for row in self.action_shifts):
                raise ValueError(
                    f"action_shifts needs one (rows, cols) pair per action ({self.num_actions}), got "
                    f"{self.action_shifts}; set it to null to disable camera-anchored RoPE"
                )

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def embed_channels(self) -> int:
        """Input channels of the patch embedding (latents, plus anchor and mask when warped)."""
        return 2 * self.in_channels + 1 if self.anchor_warp else self.in_channels


# ------------------------------------------------------------------------------------ attention
@dataclass
class _SelfAttnPlan:
    """How self-attention runs in this forward; built once, shared by all blocks."""

    mode: Literal["full", "chunked", "cached", "memory"]
    cos: torch.Tensor | None = None  # query (and, in "full", key) rotation
    sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    cache: KVCache | None = None
    write_cache: bool = False
    cache_cos: torch.Tensor | None = None
    cache_sin: torch.Tensor | None = None
    # "chunked": per query chunk (query token slice, key token index, q cos/sin, k cos/sin)
    chunks: list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    sparse: BlockSparseConfig | None = None
    causal_chunk: int = 0  # block-causal "full": tokens per chunk (the sparse path's form of ``mask``)
    # "memory": per query chunk (query token slice, per row: (attended pieces, q cos, q sin, k cos, k sin))
    memory_chunks: list | None = None
    memory: MemoryConfig | None = None
    grid: tuple[int, int] = (0, 0)
    # "memory" with memory.render: per row, per query chunk (first frame, end frame, the retrieved
    # bank entries as (frame, camera moved next to the chunk's)), oldest first
    render: list[list[tuple[int, int, list[tuple[int, tuple[int, int]]]]]] | None = None
    # "cached" with autograd: per layer, the history this pass read (rotated keys, values). A block
    # recomputed in backward (activation checkpointing) runs after the chunk's cache-writing pass
    # moved the cache on; it reads the history kept here, the one its forward saw.
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def attend(self, q_BLHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, mask: torch.Tensor | None = None,
               q_offset: int | None = None) -> torch.Tensor:
        """Dense dispatch, or block-sparse when configured (queries are the last keys unless
        ``q_offset`` says otherwise)."""
        if self.sparse is None:
            return attention(q_BLHD, k_BSHD, v_BSHD, mask)
        causal = self.causal_chunk if mask is not None else 0
        return sparse_self_attention(q_BLHD, k_BSHD, v_BSHD, self.sparse, q_offset, causal)


class Attention(nn.Module):
    """Multi-head attention with RMS q/k norm across heads (Wan's ``rms_norm_across_heads``)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float, kv_dim: int | None = None,
                 image_kv: bool = False):
        """``image_kv`` (cross-attention of an image model): own key/value projections and key norm
        for the (already embedded, width ``dim``) image tokens."""
        super().__init__()
        inner = num_heads * head_dim
        kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.Linear(inner, dim)
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if image_kv:
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_k = nn.RMSNorm(inner, eps=eps)

    def kv(self, ctx_BSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.to_k(ctx_BSE)).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(ctx_BSE).unflatten(-1, (self.num_heads, -1))
        return k, v

    def qkv(self, x_BLE: torch.Tensor, ctx_BSE: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.norm_q(self.to_q(x_BLE)).unflatten(-1, (self.num_heads, -1))
        return (q, *self.kv(ctx_BSE))

    def write_kv(self, x_BLE: torch.Tensor, cache: KVCache, layer: int) -> None:
        """Store this layer's (un-rotated) keys/values of ``x`` -- all a cache-writing pass needs
        from the last block."""
        k, v = self.kv(x_BLE)
        cache.write(layer, k.detach(), v.detach())

    def cross(self, x_BLE: torch.Tensor, ctx_BSE: torch.Tensor, img_BLiE: torch.Tensor | None = None) -> torch.Tensor:
        """Attention to the prompt tokens ``ctx_BSE``, plus, given ``img_BLiE``, a second attention
        of the same queries to the image tokens: two softmaxes, outputs summed before ``to_out``
        (the image cannot crowd out the prompt in one softmax, or vice versa)."""
        q, k, v = self.qkv(x_BLE, ctx_BSE)
        out_BLE = attention(q, k, v).flatten(2)
        if img_BLiE is not None:
            k_img = self.norm_added_k(self.add_k_proj(img_BLiE)).unflatten(-1, (self.num_heads, -1))
            v_img = self.add_v_proj(img_BLiE).unflatten(-1, (self.num_heads, -1))
            out_BLE = out_BLE + attention(q, k_img, v_img).flatten(2)
        return self.to_out(out_BLE)

    def self_attn(self, x_BLE: torch.Tensor, plan: _SelfAttnPlan, layer: int) -> torch.Tensor:
        q_BLND, k_BLND, v_BLND = self.qkv(x_BLE, x_BLE)
        if plan.mode == "full":
            q, k = apply_rope(q_BLND, plan.cos, plan.sin), apply_rope(k_BLND, plan.cos, plan.sin)
            out_BLND = plan.attend(q, k, v_BLND, plan.mask, q_offset=0)
        elif plan.mode == "cached":
            cache = plan.cache
            q, k = apply_rope(q_BLND, plan.cos, plan.sin), apply_rope(k_BLND, plan.cos, plan.sin)
            rotate = lambda kc: apply_rope(kc, plan.cache_cos, plan.cache_sin)  # noqa: E731
            if torch.is_grad_enabled() and not plan.write_cache:  # a graph: maybe recomputed later (see plan.history)
                if layer not in plan.history:
                    kc, vc = cache.history_kv(layer, rotate)
                    plan.history[layer] = kc.to(k.dtype), vc.to(v_BLND.dtype)
                kc, vc = plan.history[layer]
                k_all, v_all = torch.cat([kc, k], 1), torch.cat([vc, v_BLND], 1)
            else:
                k_all, v_all = cache.attention_kv(layer, k, v_BLND, rotate)
            if plan.mask is not None:  # rows of a paged batch attend to different numbers of keys
                out_BLND = attention(q, k_all, v_all, plan.mask)
            else:
                out_BLND = plan.attend(q, k_all, v_all)
            if plan.write_cache:
                cache.write(layer, k_BLND.detach(), v_BLND.detach())
        elif plan.mode == "memory":
            out_BLND = _memory_attention(q_BLND, k_BLND, v_BLND, plan)
        else:  # "chunked": reference path when sinks and window have a gap; see attention.layout
            outs = []
            for q_slice, k_index, q_cos, q_sin, k_cos, k_sin in plan.chunks:
                q = apply_rope(q_BLND[:, q_slice], q_cos, q_sin)
                k = apply_rope(k_BLND[:, k_index], k_cos, k_sin)
                outs.append(plan.attend(q, k, v_BLND[:, k_index]))
            out_BLND = torch.cat(outs, 1)
        return self.to_out(out_BLND.flatten(2))


def _memory_attention(q_BLND: torch.Tensor, k_BLND: torch.Tensor, v_BLND: torch.Tensor, plan: _SelfAttnPlan) -> torch.Tensor:
    """Full-sequence self-attention that reads, for every chunk and row, what a streaming paged
    cache with memory reads (``streamkd.cache.memory.replay``): sinks, retrieved frames, the
    compressed tier (pooled and quantized from the same layer's keys, as the cache does when a
    frame leaves the window) and the window, then the chunk itself."""
    T = plan.grid[0] * plan.grid[1]
    outs = []
    for q_slice, rows in plan.memory_chunks:
        row_out = []
        for b in range(q_BLND.shape[0]):
            # one entry per row, or one for all rows (a model without camera: every row reads alike)
            pieces, q_cos, q_sin, k_cos, k_sin = rows[b] if len(rows) > 1 else rows[0]
            packed: dict[tuple[int, int], Packed] = {}
            ks, vs = [], []
            for f, _, _, level in pieces:
                kf, vf = k_BLND[b, f * T : (f + 1) * T], v_BLND[b, f * T : (f + 1) * T]
                if level:
                    if (f, 1) not in packed:
                        packed[f, 1] = compress_frame(kf, vf, plan.memory, plan.grid)
                    if level == 2 and (f, 2) not in packed:
                        packed[f, 2] = coarsen(packed[f, 1], plan.memory, plan.grid, kf.dtype)
                    kf, vf = packed[f, level].unpack(kf.dtype)
                ks.append(kf)
                vs.append(vf)
            k_mem = apply_rope(torch.cat(ks)[None], k_cos, k_sin) if ks else k_BLND[b : b + 1, :0]
            q = apply_rope(q_BLND[b : b + 1, q_slice], q_cos, q_sin)
            k = torch.cat([k_mem, apply_rope(k_BLND[b : b + 1, q_slice], q_cos, q_sin)], 1)
            v = torch.cat([torch.cat(vs)[None] if vs else v_BLND[b : b + 1, :0], v_BLND[b : b + 1, q_slice]], 1)
            row_out.append(attention(q, k, v))
        outs.append(torch.cat(row_out))
    return torch.cat(outs, 1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _layer_norm(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """LayerNorm computed in fp32 (Wan's FP32LayerNorm), affine only when ``norm`` is given."""
    if norm is None:
        return nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return nn.functional.layer_norm(x.float(), x.shape[-1:], norm.weight.float(), norm.bias.float(), eps)


def _modulate(x_BLE: torch.Tensor, shift_BFE: torch.Tensor, scale_BFE: torch.Tensor, eps: float) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` with per-frame shift/scale broadcast over the frame's tokens."""
    B, L, E = x_BLE.shape
    num_f = shift_BFE.shape[1]
    x_BFTE = _layer_norm(x_BLE, eps).view(B, num_f, L // num_f, E)
    out = x_BFTE * (1 + scale_BFE[:, :, None]) + shift_BFE[:, :, None]
    return out.view(B, L, E).type_as(x_BLE)


def _gated_add(x_BLE: torch.Tensor, y_BLE: torch.Tensor, gate_BFE: torch.Tensor) -> torch.Tensor:
    B, L, E = x_BLE.shape
    num_f = gate_BFE.shape[1]
    y_BFTE = y_BLE.float().view(B, num_f, L // num_f, E) * gate_BFE[:, :, None]
    return (x_BLE.float() + y_BFTE.view(B, L, E)).type_as(x_BLE)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        E = cfg.dim
        self.eps = cfg.eps
        # 1. self-attention (AdaLN-modulated, gated)
        self.self_attn = Attention(E, cfg.num_heads, cfg.head_dim, cfg.eps)
        # 2. cross-attention to the prompt tokens
        self.cross_norm = nn.LayerNorm(E, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.cross_attn = Attention(E, cfg.num_heads, cfg.head_dim, cfg.eps, image_kv=cfg.image_dim is not None)
        # 3. feed-forward (AdaLN-modulated, gated)
        self.ffn = FeedForward(E, cfg.ffn_dim)
        # per-block offsets added to the shared timestep projection: (shift, scale, gate) x 2
        self.modulation = nn.Parameter(torch.randn(1, 1, 6, E) / E**0.5)

    def forward(
        self, x_BLE: torch.Tensor, ctx_BLcE: torch.Tensor, tproj_BF6E: torch.Tensor, plan: _SelfAttnPlan, layer: int,
        kv_only: bool = False, img_BLiE: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``img_BLiE``: embedded image tokens (image models), read by cross-attention.
        ``kv_only``: only store the modulated input's self-attention keys/values in the plan's
        cache and return None -- all a cache-writing pass needs from the last block. (A flag of
        ``forward``, not a method of its own, so FSDP's per-block hooks gather the weights.)"""
        if kv_only:
            shift1, scale1 = (self.modulation[:, :, :2] + tproj_BF6E[:, :, :2].float()).unbind(2)
            self.self_attn.write_kv(_modulate(x_BLE, shift1, scale1, self.eps), plan.cache, layer)
            return None
        shift1, scale1, gate1, shift3, scale3, gate3 = (self.modulation + tproj_BF6E.float()).unbind(2)
        # 1. self-attention
        h = self.self_attn.self_attn(_modulate(x_BLE, shift1, scale1, self.eps), plan, layer)
        x_BLE = _gated_add(x_BLE, h, gate1)
        # 2. cross-attention
        h = _layer_norm(x_BLE, self.eps, self.cross_norm).type_as(x_BLE) if self.cross_norm else x_BLE
        x_BLE = x_BLE + self.cross_attn.cross(h, ctx_BLcE, img_BLiE)
        # 3. feed-forward
        h = self.ffn(_modulate(x_BLE, shift3, scale3, self.eps))
        return _gated_add(x_BLE, h, gate3)


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: fp32 LayerNorm, GELU MLP (hidden = input width), fp32
    LayerNorm -- diffusers' ``WanImageEmbedding``, whose LayerNorms keep torch's default eps 1e-5
    (not the model's ``eps``) and whose GELU is exact (not tanh)."""

    eps = 1e-5

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim, eps=self.eps)
        self.fc1 = nn.Linear(image_dim, image_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(image_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=self.eps)

    def forward(self, img_BLiD: torch.Tensor) -> torch.Tensor:
        h = _layer_norm(img_BLiD, self.eps, self.norm1).type_as(img_BLiD)
        h = self.fc2(self.act(self.fc1(h)))
        return _layer_norm(h, self.eps, self.norm2).type_as(h)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos(t w_i), sin(t w_i)]`` with ``w_i = 10000^(-i/(dim/2))`` (diffusers' Timesteps with
    flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.dim
        # 1. patch embedding and positions
        self.patch_embed = nn.Conv3d(cfg.embed_channels, E, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_max_seq_len, cfg.rope_theta)
        # 2. conditioning: timestep (+ action) -> temb -> 6 modulations; prompt -> tokens of width E
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, E), nn.SiLU(), nn.Linear(E, E))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(E, 6 * E))
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, E), nn.GELU(approximate="tanh"), nn.Linear(E, E))
        # CLIP image tokens -> tokens of width E (image models only)
        self.image_embed = ImageEmbedding(cfg.image_dim, E) if cfg.image_dim is not None else None
        self.action_embed = None
        if cfg.num_actions:
            # one extra row = "no action" (dropped for classifier-free guidance); zero init makes
            # adding actions to a pretrained model a no-op at step 0
            self.action_embed = nn.Embedding(cfg.num_actions + 1, E)
            nn.init.zeros_(self.action_embed.weight)
        if cfg.action_shifts is not None:
            # the null action (dropped for CFG) does not move the camera: positions are not anchored
            # a host tensor, not a buffer: camera offsets are host data (memory retrieval and the
            # cache's positions read them on the host), so they never need a device round-trip
            self.action_shifts = torch.tensor([*cfg.action_shifts, (0, 0)], dtype=torch.long)
        else:
            self.action_shifts = None
        # 3. blocks
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        # 4. output head
        self.proj_out = nn.Linear(E, cfg.out_channels * math.prod(cfg.patch_size))
        self.head_modulation = nn.Parameter(torch.randn(1, 1, 2, E) / E**0.5)

    @property
    def null_action(self) -> int:
        return self.cfg.num_actions

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.cfg.patch_size
        return (height // ph) * (width // pw)

    def new_cache(
        self, *, batch_size: int, height: int, width: int, sink_frames: int, window_frames: int,
        chunk_frames: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
        reuse_rotated: bool = True, memory: MemoryConfig | None = None, pool=None,
    ) -> KVCache | PagedKVCache:
        """A cache sized for this model and a latent of ``height x width``. ``reuse_rotated=False``
        gives back the memory of the per-chunk rotated key/value buffers (one more copy of the
        visible cache, see ``streamkd.cache.kv_cache``) for re-rotating the keys on every pass.
        With ``memory`` the cache is the paged store with its memory tiers (``streamkd.cache.paged``)."""
        param = self.proj_out.weight
        if memory is not None and memory.render and not self.cfg.anchor_warp:
            raise ValueError("memory.render draws bank entries into the anchor channels, and this model has none "
                             "(dit.anchor_warp: false); set memory.render: false")
        if memory is not None:
            _, ph, pw = self.cfg.patch_size
            return PagedKVCache(
                num_layers=self.cfg.num_layers, batch_size=batch_size, grid=(height // ph, width // pw),
                num_heads=self.cfg.num_heads, head_dim=self.cfg.head_dim, sink_frames=sink_frames,
                window_frames=window_frames, chunk_frames=chunk_frames, memory=memory,
                use_camera=self.action_shifts is not None, dtype=dtype or param.dtype, device=device or param.device,
                pool=pool,
            )
        return KVCache(
            num_layers=self.cfg.num_layers, batch_size=batch_size, tokens_per_frame=self.tokens_per_frame(height, width),
            num_heads=self.cfg.num_heads, head_dim=self.cfg.head_dim, sink_frames=sink_frames,
            window_frames=window_frames, chunk_frames=chunk_frames,
            dtype=dtype or param.dtype, device=device or param.device, reuse_rotated=reuse_rotated,
        )

    def _plan(
        self, num_frames: int, gh: int, gw: int, layout: CausalLayout | None, cache: KVCache | None, write_cache: bool,
        device: torch.device, camera_BF2: torch.Tensor | None,
    ) -> _SelfAttnPlan:
        """``camera_BF2``: camera-anchored offsets of this forward's frames (None: plain RoPE)."""
        T = gh * gw
        rope = self.rope.table
        if cache is not None:
            q_pos = range(cache.query_position, cache.query_position + num_frames)
            cos, sin = rope(q_pos, gh, gw, camera_BF2)
            plan = _SelfAttnPlan("cached", cos, sin, cache=cache, write_cache=write_cache)
            # the cache decides what the chunk reads (sinks, window and, on a paged cache, memory)
            # and where RoPE places it; the tables are the same for every pass of a chunk
            plan.cache_cos, plan.cache_sin = cache.key_rope(self.rope, gh, gw, camera_BF2)
            plan.mask = cache.key_mask(num_frames * T)
            return plan
        if layout is not None and layout.memory is not None and layout.memory.enabled:
            return self._memory_plan(num_frames, gh, gw, layout, device, camera_BF2)
        if layout is None or not layout.evicts_within(num_frames):
            cos, sin = rope(range(num_frames), gh, gw, camera_BF2)
            mask = None if layout is None else block_causal_mask(num_frames, T, layout, device)
            return _SelfAttnPlan("full", cos, sin, mask=mask)
        chunks = []
        for q0 in range(0, num_frames, layout.chunk_frames):
            q1 = min(q0 + layout.chunk_frames, num_frames)
            frames, positions, q_first = layout.visible(q0)
            frames += list(range(q0, q1))
            positions += list(range(q_first, q_first + q1 - q0))
            k_index = (torch.tensor(frames, device=device)[:, None] * T + torch.arange(T, device=device)).flatten()
            q_cam = k_cam = None
            if camera_BF2 is not None:
                q_cam, k_cam = camera_BF2[:, q0:q1], camera_BF2[:, frames]
            q_cos, q_sin = rope(range(q_first, q_first + q1 - q0), gh, gw, q_cam)
            k_cos, k_sin = rope(positions, gh, gw, k_cam)
            chunks.append((slice(q0 * T, q1 * T), k_index, q_cos, q_sin, k_cos, k_sin))
        return _SelfAttnPlan("chunked", chunks=chunks)

    def _memory_plan(self, num_frames: int, gh: int, gw: int, layout: CausalLayout, device: torch.device,
                     camera_BF2: torch.Tensor | None) -> _SelfAttnPlan:
        """Per chunk and row: what a streaming paged cache with ``layout.memory`` would read, and
        the RoPE tables of those keys and of the chunk (see ``_memory_attention``)."""
        memory = layout.memory
        cams = None if camera_BF2 is None else [[tuple(c) for c in row] for row in camera_BF2.tolist()]
        window = num_frames if layout.window_frames is None else layout.window_frames
        per_row = replay(memory, sink_frames=layout.sink_frames, window_frames=window, chunk_frames=layout.chunk_frames,
                         num_frames=num_frames, grid=(gh, gw), cameras=cams)
        B = 1 if camera_BF2 is None else camera_BF2.shape[0]
        T, F = gh * gw, layout.chunk_frames
        render = [[] for _ in range(B)] if memory.render and cams is not None else None
        chunks = []
        for c, q0 in enumerate(range(0, num_frames, F)):
            q1 = min(q0 + F, num_frames)
            rows = []
            for b in range(B):
                pieces, q_first, retrieved = per_row[b][c]
                if render is not None:
                    near = cams[b][q0]
                    render[b].append((q0, q1, [(f, wrap_near(cams[b][f], near, memory.wrap_tokens)) for f in retrieved]))
                q_cam = None if camera_BF2 is None else camera_BF2[b : b + 1, q0:q1]
                q_cos, q_sin = self.rope.table(range(q_first, q_first + q1 - q0), gh, gw, q_cam)
                positions = piece_positions([piece[1:] for piece in pieces], (gh, gw), memory.pool, camera_BF2 is not None)
                if len(positions[0]):
                    self.rope.check_positions(int(positions[0].max()))
                t_S, r_S, c_S = (torch.from_numpy(a).to(device)[None] for a in positions)
                k_cos, k_sin = self.rope.token_table(t_S, r_S, c_S)
                rows.append((pieces, q_cos, q_sin, k_cos, k_sin))
            chunks.append((slice(q0 * T, q1 * T), rows))
        return _SelfAttnPlan("memory", memory_chunks=chunks, memory=memory, grid=(gh, gw), render=render)

    def _embed_patches(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        """``(B, L, E)`` tokens ordered (frame, row, column). The convolution's stride equals its
        kernel, so it is one matmul over non-overlapping patches; CPU torch would run it through
        the generic (slow) 3D convolution instead, ~0.2 ms per call at the toy size."""
        conv = self.patch_embed
        B, C, num_f, H, W = x_BCFHW.shape
        pt, ph, pw = self.cfg.patch_size
        patches = x_BCFHW.reshape(B, C, num_f // pt, pt, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return nn.functional.linear(patches.flatten(4).flatten(1, 3), conv.weight.flatten(1), conv.bias)

    def _anchor_condition(
        self, x_BCFHW: torch.Tensor, t_BF: torch.Tensor, actions_BF: torch.Tensor | None, camera_BF2: torch.Tensor,
        cache: KVCache | None, write_cache: bool, anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
        render: list[list[tuple[int, int, list[tuple[torch.Tensor, tuple[int, int]]]]]] | None = None,
    ) -> torch.Tensor:
        """``(B, C + 1, F, H, W)``: the anchor latent shifted into each frame's view, and the mask of
        latent pixels it covers. The anchor is frame 0 when it is given clean (t = 0); in cached
        mode, once written, it is the cache's sink frame 0; ``anchor`` overrides both (see
        ``forward``). Frames whose camera is unknown (a null action at or before them: CFG's
        unconditional rows) get a zero mask. ``render`` (rendered memory): per row, segments of
        frames ``(f0, f1, [(latent (C, H, W), camera)])`` whose sources are drawn over the anchor,
        in order, where they see the place."""
        B, C, num_f, H, W = x_BCFHW.shape
        dev = x_BCFHW.device
        streaming_on = cache is not None and cache.frames_written > 0
        if anchor is not None:
            anchor_BCHW, anchor_cam_B2 = anchor[0], anchor[1].to(dev)
            has_B = torch.ones(B, dtype=torch.bool, device=dev)
        elif streaming_on:
            anchor_BCHW, anchor_cam_B2, has_B = cache.anchor_BCHW, cache.anchor_camera_B2, cache.anchor_valid_B
        else:
            anchor_BCHW, anchor_cam_B2, has_B = x_BCFHW[:, :, 0], camera_BF2[:, 0].to(dev), t_BF[:, 0] == 0
            if write_cache:
                cache.write_anchor(anchor_BCHW.detach(), anchor_cam_B2, has_B)
        _, ph, pw = self.cfg.patch_size
        d_BF2 = (camera_BF2.to(dev) - anchor_cam_B2[:, None]) * torch.tensor([ph, pw], device=dev)
        rows_BFH = torch.arange(H, device=dev) + d_BF2[..., :1]  # anchor row seen at each frame row
        cols_BFW = torch.arange(W, device=dev) + d_BF2[..., 1:]
        known_BF = torch.ones(B, num_f, dtype=torch.bool, device=dev)  # where each frame's camera is known
        if streaming_on:
            known_BF = known_BF & cache.camera_known_B[:, None]
        if actions_BF is not None:
            # the camera is known up to the first null action (the stream's frame 0 moves nothing)
            null = actions_BF == self.null_action
            if not streaming_on:
                null[:, 0] = False
            known_BF = known_BF & (null.long().cumsum(1) == 0)
        if write_cache:
            cache.camera_known_B.copy_(known_BF[:, -1])
        mask_BFHW = (
            (known_BF & has_B[:, None])[:, :, None, None]
            & ((rows_BFH >= 0) & (rows_BFH < H))[..., None]
            & ((cols_BFW >= 0) & (cols_BFW < W))[:, :, None, :]
        )
        b = torch.arange(B, device=dev)[:, None, None, None]
        warped_BFHWC = anchor_BCHW.permute(0, 2, 3, 1)[
            b, rows_BFH.clamp(0, H - 1)[..., :, None], cols_BFW.clamp(0, W - 1)[..., None, :]
        ]
        if render is not None:
            warped_BFHWC, mask_BFHW = self._render_memory(warped_BFHWC, mask_BFHW, render, camera_BF2, known_BF)
        mask_BFHW1 = mask_BFHW[..., None].to(x_BCFHW.dtype)
        cond_BFHWC = torch.cat([warped_BFHWC * mask_BFHW1, mask_BFHW1], -1)
        return cond_BFHWC.permute(0, 4, 1, 2, 3)

    def _render_memory(
        self, warped_BFHWC: torch.Tensor, mask_BFHW: torch.Tensor,
        render: list[list[tuple[int, int, list[tuple[torch.Tensor, tuple[int, int]]]]]], camera_BF2: torch.Tensor,
        known_BF: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw each row's memory sources over the warped anchor (later sources over earlier ones)
        where they see the frame's place and its camera is known; see ``MemoryConfig.render``."""
        _, _, H, W, _ = warped_BFHWC.shape
        _, ph, pw = self.cfg.patch_size
        dev = warped_BFHWC.device
        rows_out, masks_out = [], []
        for b, segments in enumerate(render):
            row, row_mask = warped_BFHWC[b], mask_BFHW[b]
            for f0, f1, sources in segments:
                if not sources:
                    continue
                seg, seg_mask = row[f0:f1], row_mask[f0:f1]
                for latent_CHW, cam in sources:
                    d_F2 = (camera_BF2[b, f0:f1] - torch.tensor(cam)) * torch.tensor([ph, pw])
                    rows_FH = (torch.arange(H) + d_F2[:, :1]).to(dev)
                    cols_FW = (torch.arange(W) + d_F2[:, 1:]).to(dev)
                    sees_FHW = (
                        known_BF[b, f0:f1, None, None]
                        & ((rows_FH >= 0) & (rows_FH < H))[:, :, None]
                        & ((cols_FW >= 0) & (cols_FW < W))[:, None, :]
                    )
                    drawn_FHWC = latent_CHW.permute(1, 2, 0)[rows_FH.clamp(0, H - 1)[:, :, None], cols_FW.clamp(0, W - 1)[:, None, :]]
                    seg = torch.where(sees_FHW[..., None], drawn_FHWC.to(seg.dtype), seg)
                    seg_mask = seg_mask | sees_FHW
                row = torch.cat([row[:f0], seg, row[f1:]])
                row_mask = torch.cat([row_mask[:f0], seg_mask, row_mask[f1:]])
            rows_out.append(row)
            masks_out.append(row_mask)
        return torch.stack(rows_out), torch.stack(masks_out)

    def camera_offsets(
        self, actions_BF: torch.Tensor | None, batch: int, num_frames: int, cache: KVCache | None = None
    ) -> torch.Tensor | None:
        """Cumulative camera translation (rows, cols) in tokens of each frame, as a host tensor, or
        None when the model has no camera-anchored RoPE. Continues from the last frame written into
        ``cache``. Only differences between frames matter, so the start of the stream is the origin.
        Actions are user input and live on the host; given on a device they are copied back (a sync)."""
        if self.action_shifts is None:
            return None
        if actions_BF is None:
            step_BF2 = torch.zeros(batch, num_frames, 2, dtype=torch.long, device="cpu")
        else:
            step_BF2 = self.action_shifts[actions_BF.cpu()]
        camera_BF2 = step_BF2.cumsum(1)
        if cache is not None:
            camera_BF2 = camera_BF2 + cache.camera_last_B2[:, None]
        return camera_BF2

    def forward(
        self,
        x_BCFHW: torch.Tensor,
        t_BF: torch.Tensor,
        context_BLcD: torch.Tensor,
        actions_BF: torch.Tensor | None = None,
        *,
        layout: CausalLayout | None = None,
        cache: KVCache | None = None,
        write_cache: bool = False,
        anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
        output: bool = True,
        image_context_BLiD: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Predict the flow-matching velocity ``noise - x0`` for every latent frame.

        ``t_BF``: per-frame timesteps in [0, 1000] (a ``(B,)`` tensor is broadcast over frames).
        ``actions_BF``: per-frame action ids, ``cfg.num_actions`` meaning "none given".
        ``anchor`` (anchor_warp models, full-sequence calls): ``(latent (B, C, H, W), camera (B, 2))``
        of the stream's first frame when this clip is a window far into the stream -- the camera in
        this call's coordinates (``camera_offsets``: frame f sits at the summed shifts of actions
        ``0..f``). Default: this clip's frame 0 when it is given clean.
        ``image_context_BLiD`` (image models, required there): the CLIP vision tokens of the
        conditioning image, width ``cfg.image_dim`` (Wan2.1 I2V: the penultimate hidden states,
        257 tokens); the same for every frame and every pass of a stream.
        ``output=False`` (with ``write_cache``: the clean pass of streaming) fills the cache exactly
        as a full pass would and returns None: the last block stops at its keys/values (no
        attention, cross-attention, FFN or head) -- for a 2-block student, ~40% of the pass.
        """
        cfg = self.cfg
        B, _, num_f, height, width = x_BCFHW.shape
        pt, ph, pw = cfg.patch_size
        if (layout is not None or cache is not None) and pt != 1:
            raise ValueError("causal and cached attention need patch_size[0] == 1 (one frame per token)")
        if height % ph or width % pw or num_f % pt:
            raise ValueError(f"latent (F={num_f}, H={height}, W={width}) is not divisible by patch_size {cfg.patch_size}")
        if layout is not None and cache is not None:
            raise ValueError("pass either layout (full-sequence block-causal) or cache (streaming), not both")
        if write_cache and cache is None:
            raise ValueError("write_cache=True needs a cache to write into")
        if not output and not write_cache:
            raise ValueError("output=False only makes sense with write_cache=True (a pass that neither returns nor stores)")
        if anchor is not None:
            if cache is not None or not cfg.anchor_warp:
                raise ValueError("anchor= is for full-sequence calls of anchor_warp models (a cache keeps its own anchor)")
            want = ((B, x_BCFHW.shape[1], height, width), (B, 2))
            if tuple(anchor[0].shape) != want[0] or tuple(anchor[1].shape) != want[1]:
                raise ValueError(f"anchor must be (latent {want[0]}, camera {want[1]}), got "
                                 f"({tuple(anchor[0].shape)}, {tuple(anchor[1].shape)})")
        if (image_context_BLiD is None) != (cfg.image_dim is None):
            raise ValueError(
                "image_context_BLiD is required by a model with image_dim and refused by one without; "
                f"this model has image_dim={cfg.image_dim}, got "
                f"{'no image context' if image_context_BLiD is None else 'an image context'}"
            )
        gf, gh, gw = num_f // pt, height // ph, width // pw
        if t_BF.ndim == 1:
            t_BF = t_BF[:, None].expand(B, gf)
        if t_BF.shape != (B, gf):
            raise ValueError(f"timesteps must be (B,) or (B, frames) = ({B}, {gf}), got {tuple(t_BF.shape)}")

        camera_BF2 = self.camera_offsets(actions_BF, B, gf, cache)
        if actions_BF is not None:  # host actions (the camera's input) go to the device for their embedding
            actions_BF = actions_BF.to(x_BCFHW.device, non_blocking=True)
        plan = self._plan(gf, gh, gw, layout, cache, write_cache, x_BCFHW.device, camera_BF2)
        plan.sparse = cfg.sparse
        if layout is not None:
            plan.causal_chunk = layout.chunk_frames * gh * gw
        # 1. patch embedding (of the latents and, with anchor_warp, the shifted first frame + mask,
        # and the memory rendered over it)
        x_in = x_BCFHW
        if cfg.anchor_warp:
            render = None
            if isinstance(cache, PagedKVCache) and camera_BF2 is not None:
                sources = cache.render_sources(camera_BF2)
                render = None if sources is None else [[(0, gf, row)] for row in sources]
            elif plan.render is not None:
                history = x_BCFHW.detach()  # history is detached, as in streaming
                render = [[(f0, f1, [(history[b, :, f], cam) for f, cam in entries]) for f0, f1, entries in row]
                          for b, row in enumerate(plan.render)]
            cond = self._anchor_condition(x_BCFHW, t_BF, actions_BF, camera_BF2, cache, write_cache, anchor, render)
            x_in = torch.cat([x_BCFHW, cond], 1)
        x_BLE = self._embed_patches(x_in)
        # 2. conditioning
        temb_BFE = self.time_embed(sinusoidal_embedding(t_BF, cfg.freq_dim).to(self.proj_out.weight.dtype))
        if actions_BF is not None:
            if self.action_embed is None:
                raise ValueError("this model has no action conditioning (num_actions=0); pass actions=None")
            temb_BFE = temb_BFE + self.action_embed(actions_BF)
        tproj_BF6E = self.time_proj(temb_BFE).unflatten(-1, (6, -1))
        ctx_BLcE = self.text_proj(context_BLcD)
        img_BLiE = None if image_context_BLiD is None else self.image_embed(image_context_BLiD)
        # 3. blocks
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last and not output:
                block(x_BLE, ctx_BLcE, tproj_BF6E, plan, i, kv_only=True)
            else:
                x_BLE = block(x_BLE, ctx_BLcE, tproj_BF6E, plan, i, img_BLiE=img_BLiE)
        if write_cache:
            if isinstance(cache, PagedKVCache):
                cache.write_latents(x_BCFHW)
            if camera_BF2 is not None:
                cache.write_camera(camera_BF2)
            cache.commit()
        if not output:
            return None
        # 4. output head and unpatchify
        shift, scale = (self.head_modulation + temb_BFE[:, :, None].float()).unbind(2)
        x_BLE = self.proj_out(_modulate(x_BLE, shift, scale, cfg.eps))
        out = x_BLE.reshape(B, gf, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, out.shape[1], gf * pt, gh * ph, gw * pw)
        # A fresh tensor, never a view: FSDP2 hangs the hook that all-gathers this module's
        # parameters before its backward on the output tensor, and an in-place op by a caller on a
        # view rebuilds the view's autograd node without it -- backward then reads resharded
        # (freed) parameters. FSDP2 warns "returned a view tensor" on every such forward. The
        # reshape above copies for most patch sizes; for some ((1, 1, 1), (1, 1, 2)) it is a view.
        return out.clone() if out._is_view() else out
