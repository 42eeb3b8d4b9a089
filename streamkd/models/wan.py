"""Convert diffusers' ``WanTransformer3DModel`` checkpoints to and from ``streamkd.models.dit.DiT``.

Supported
    * Text-to-video Wan2.1 (1.3B / 14B), Wan2.2 TI2V-5B and the per-expert transformers of Wan2.2
      A14B (``transformer/`` and ``transformer_2/``): any config with ``qk_norm="rms_norm_across_heads"``,
      no CLIP image branch and no image position embedding. Channel-concatenated image
      conditioning (``in_channels != out_channels``) is plain patch embedding and is supported.
    * Local diffusers-format folders only (``config.json`` plus one ``diffusion_pytorch_model.safetensors``
      or shards listed in ``diffusion_pytorch_model.safetensors.index.json``), given either as the
      transformer folder itself or as a pipeline root holding ``transformer/``. Nothing is downloaded.
    * The converted model reproduces diffusers' forward in fp32 (to float rounding) for one timestep
      per sample and for per-token timesteps that are constant within each latent frame (Wan2.2's
      ``(B, seq_len)`` timestep path), which is what ``DiT``'s ``t_BF`` expresses.

Not supported (refused with ``WanConversionError``)
    * Wan2.1 I2V-14B's CLIP image branch (``image_dim`` / ``added_kv_proj_dim``) and FLF2V's image
      position embedding (``pos_embed_seq_len``); other ``qk_norm`` settings; odd ``freq_dim``.
    * ``.bin`` / pickled checkpoints, dtype variants (``*.fp16.safetensors``), VACE / other Wan
      derivatives whose ``_class_name`` is not ``WanTransformer3DModel``.
    * Exporting a model with an action embedding (it has no Wan counterpart).

Precision note: diffusers keeps ``time_embedder``, ``scale_shift_table`` and the block norms in fp32
when a pipeline is loaded in bf16 (``_keep_in_fp32_modules``); ``load_wan_dit(dtype=bf16)`` casts
every weight to ``dtype`` (only the RoPE tables stay fp32), so bf16 outputs match diffusers to bf16
rounding, not bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from streamkd.models.dit import DiT, DiTConfig
from streamkd.models.rope import Rope3D

__all__ = [
    "WanConversionError",
    "dit_config_from_diffusers",
    "diffusers_config_from_dit",
    "convert_diffusers_state_dict",
    "export_to_diffusers_state_dict",
    "load_wan_dit",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
_CLASS_NAME = "WanTransformer3DModel"
_IGNORED_SUFFIXES = ("norm_added_q.weight", "norm_added_q.bias")  # diffusers' _keys_to_ignore_on_load_unexpected

# WanTransformer3DModel.__init__ defaults, used for fields a config.json leaves out (as from_config does)
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}


class WanConversionError(ValueError):
    """A Wan config or checkpoint that cannot be converted; the message names the field or tensor."""


# ------------------------------------------------------------------------------------------ config
def dit_config_from_diffusers(config: Mapping[str, Any]) -> DiTConfig:
    """``DiTConfig`` for a ``WanTransformer3DModel`` config dict (the contents of its ``config.json``).

    Missing fields take diffusers' defaults; keys starting with ``_`` and unknown keys are ignored.
    """
    if not isinstance(config, Mapping):
        raise WanConversionError(f"config must be a dict, got {type(config).__name__}")
    class_name = config.get("_class_name")
    if class_name is not None and class_name != _CLASS_NAME:
        raise WanConversionError(f"_class_name is {class_name!r}; only {_CLASS_NAME!r} converts")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    if c["image_dim"] is not None:
        raise WanConversionError(
            f"image_dim={c['image_dim']} (Wan2.1 I2V CLIP image branch) is not supported; use a model without image_dim"
        )
    if c["added_kv_proj_dim"] is not None:
        raise WanConversionError(
            f"added_kv_proj_dim={c['added_kv_proj_dim']} (image key/value projections) is not supported"
        )
    if c["pos_embed_seq_len"] is not None:
        raise WanConversionError(
            f"pos_embed_seq_len={c['pos_embed_seq_len']} (FLF2V image position embedding) is not supported"
        )
    if c["qk_norm"] != "rms_norm_across_heads":
        raise WanConversionError(f"qk_norm={c['qk_norm']!r} is not supported; only 'rms_norm_across_heads'")
    patch = c["patch_size"]
    if not isinstance(patch, (list, tuple)) or len(patch) != 3 or not all(isinstance(p, int) for p in patch):
        raise WanConversionError(f"patch_size must be a list of three ints, got {patch!r}")
    positive = ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                "num_layers", "rope_max_seq_len")
    for field in positive:
        if not isinstance(c[field], int) or isinstance(c[field], bool) or c[field] < 1:
            raise WanConversionError(f"{field} must be a positive int, got {c[field]!r}")
    if c["freq_dim"] % 2:
        raise WanConversionError(f"freq_dim={c['freq_dim']} is odd; only even sinusoidal widths are supported")
    out_channels = c["out_channels"] if c["out_channels"] is not None else c["in_channels"]
    try:
        return DiTConfig(
            in_channels=c["in_channels"],
            out_channels=out_channels,
            patch_size=tuple(patch),
            num_layers=c["num_layers"],
            num_heads=c["num_attention_heads"],
            head_dim=c["attention_head_dim"],
            ffn_dim=c["ffn_dim"],
            text_dim=c["text_dim"],
            freq_dim=c["freq_dim"],
            num_actions=0,
            cross_attn_norm=bool(c["cross_attn_norm"]),
            eps=float(c["eps"]),
            rope_max_seq_len=c["rope_max_seq_len"],
        )
    except ValueError as e:
        raise WanConversionError(f"config does not fit DiTConfig: {e}") from e


def diffusers_config_from_dit(cfg: DiTConfig) -> dict[str, Any]:
    """Keyword arguments for ``WanTransformer3DModel`` equivalent to ``cfg`` (inverse of the above)."""
    if cfg.rope_theta != 10000.0:
        raise WanConversionError(f"rope_theta={cfg.rope_theta} has no diffusers counterpart (fixed at 10000)")
    return {
        "patch_size": tuple(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


# ------------------------------------------------------------------------------------- key mapping
def _key_map(cfg: DiTConfig) -> dict[str, str]:
    """diffusers key -> streamkd key, in a fixed order."""
    m: dict[str, str] = {}

    def linear(src: str, dst: str) -> None:
        m[f"{src}.weight"] = f"{dst}.weight"
        m[f"{src}.bias"] = f"{dst}.bias"

    linear("patch_embedding", "patch_embed")
    linear("condition_embedder.time_embedder.linear_1", "time_embed.0")
    linear("condition_embedder.time_embedder.linear_2", "time_embed.2")
    linear("condition_embedder.time_proj", "time_proj.1")
    linear("condition_embedder.text_embedder.linear_1", "text_proj.0")
    linear("condition_embedder.text_embedder.linear_2", "text_proj.2")
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}", f"blocks.{i}"
        for a_src, a_dst in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for proj in ("to_q", "to_k", "to_v"):
                linear(f"{src}.{a_src}.{proj}", f"{dst}.{a_dst}.{proj}")
            linear(f"{src}.{a_src}.to_out.0", f"{dst}.{a_dst}.to_out")
            for norm in ("norm_q", "norm_k"):
                m[f"{src}.{a_src}.{norm}.weight"] = f"{dst}.{a_dst}.{norm}.weight"
        if cfg.cross_attn_norm:
            linear(f"{src}.norm2", f"{dst}.cross_norm")
        linear(f"{src}.ffn.net.0.proj", f"{dst}.ffn.fc1")
        linear(f"{src}.ffn.net.2", f"{dst}.ffn.fc2")
        m[f"{src}.scale_shift_table"] = f"{dst}.modulation"
    linear("proj_out", "proj_out")
    m["scale_shift_table"] = "head_modulation"
    return m


def _is_table(diffusers_key: str) -> bool:
    """Modulation tables are (1, n, E) in diffusers and (1, 1, n, E) here."""
    return diffusers_key.endswith("scale_shift_table")


def _expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """streamkd parameter shapes for ``cfg``, computed on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = DiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_and_count(names: list[str]) -> str:
    return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename (and reshape the modulation tables of) a ``WanTransformer3DModel`` state dict for ``DiT(cfg)``.

    Tensors are returned as views of the inputs (no copy, dtype and device unchanged). Raises
    ``WanConversionError`` naming the diffusers tensor for missing keys, unexpected keys
    (``norm_added_q`` is ignored, as diffusers does) and shape mismatches. With
    ``cfg.num_actions > 0`` the result has no ``action_embed.weight``; load it with ``strict=False``
    (the embedding's zero init keeps the model equal to the Wan teacher).
    """
    key_map = _key_map(cfg)
    missing = [k for k in key_map if k not in sd]
    if missing:
        raise WanConversionError(f"checkpoint is missing tensor {_first_and_count(missing)} required by the config")
    unexpected = [k for k in sd if k not in key_map and not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise WanConversionError(
            f"checkpoint has unexpected tensor {_first_and_count(unexpected)} (unsupported Wan variant or config mismatch?)"
        )
    shapes = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for src, dst in key_map.items():
        t = sd[src]
        want = shapes[dst]
        want_src = want[:1] + want[2:] if _is_table(src) else want
        if tuple(t.shape) != want_src:
            bad.append(f"tensor {src!r} has shape {tuple(t.shape)} but the config implies {want_src}")
            continue
        out[dst] = t.unsqueeze(1) if _is_table(src) else t
    if bad:
        more = f" (and {len(bad) - 1} more mismatched tensors)" if len(bad) > 1 else ""
        raise WanConversionError(bad[0] + more)
    return out


def export_to_diffusers_state_dict(dit: DiT) -> dict[str, torch.Tensor]:
    """``WanTransformer3DModel`` state dict for ``dit`` (inverse of ``convert_diffusers_state_dict``).

    Tensors are detached views of the model's parameters; load with
    ``WanTransformer3DModel(**diffusers_config_from_dit(dit.cfg)).load_state_dict(...)``.
    """
    if dit.action_embed is not None:
        raise WanConversionError("action_embed (num_actions > 0) has no Wan counterpart; cannot export")
    ours = dit.state_dict()
    out: dict[str, torch.Tensor] = {}
    for src, dst in _key_map(dit.cfg).items():
        t = ours[dst].detach()
        out[src] = t.squeeze(1) if _is_table(src) else t
    return out


# ------------------------------------------------------------------------------------------ folder
def _resolve_folder(folder: str | Path, subfolder: str | None) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Wan transformer folder {str(root)!r} does not exist or is not a directory")
    if subfolder is not None:
        path = root / subfolder
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(path / CONFIG_NAME)!r} not found (subfolder={subfolder!r})")
        return path
    if (root / CONFIG_NAME).is_file():
        return root
    if (root / "transformer" / CONFIG_NAME).is_file():  # pipeline root
        return root / "transformer"
    raise FileNotFoundError(
        f"no {CONFIG_NAME} in {str(root)!r} nor in its 'transformer/' subfolder; pass a diffusers transformer folder or pipeline root"
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise WanConversionError(f"{str(path / CONFIG_NAME)!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise WanConversionError(f"{str(path / CONFIG_NAME)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def _weight_files(path: Path) -> dict[Path, list[str] | None]:
    """Safetensors files to read -> the keys to take from each (None = all of them)."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        return {single: None}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WanConversionError(f"{str(index)!r} is not a valid safetensors index (needs 'weight_map'): {e}") from e
        files: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(path / name, []).append(key)
        for shard in files:
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard.name!r} listed in {INDEX_NAME} is missing from {str(path)!r}")
        return files
    found = sorted(p.name for p in path.iterdir() if p.name.startswith("diffusion_pytorch_model"))
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} or {INDEX_NAME} in {str(path)!r}"
        + (f" (found {found}; .bin and dtype-variant checkpoints are not supported)" if found else "")
    )


def _read_weights(path: Path, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    sd: dict[str, torch.Tensor] = {}
    for file, keys in _weight_files(path).items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            available = set(f.keys())
            for key in keys if keys is not None else sorted(available):
                if key not in available:
                    raise WanConversionError(f"tensor {key!r} is listed in {INDEX_NAME} but absent from shard {file.name!r}")
                t = f.get_tensor(key)
                sd[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return sd


def load_wan_dit(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    subfolder: str | None = None,
    num_actions: int = 0,
) -> DiT:
    """A ``DiT`` holding the weights of a local diffusers ``WanTransformer3DModel`` folder.

    ``folder`` is the transformer folder itself or a pipeline root with ``transformer/`` (pass
    ``subfolder="transformer_2"`` for Wan2.2 A14B's low-noise expert). Never touches the network.
    ``num_actions > 0`` adds a zero-initialised action embedding (a world model starting exactly at
    the Wan teacher). The model is returned in eval mode; weights are cast to ``dtype`` on ``device``
    while reading, and the model is built on the meta device, so no random init is paid for.
    """
    path = _resolve_folder(folder, subfolder)
    cfg = dataclasses.replace(dit_config_from_diffusers(_read_config(path)), num_actions=num_actions)
    sd = convert_diffusers_state_dict(_read_weights(path, dtype, device), cfg)
    with torch.device("meta"):
        model = DiT(cfg)
    if model.action_embed is not None:
        sd["action_embed.weight"] = torch.zeros(cfg.num_actions + 1, cfg.dim, dtype=dtype, device=device)
    model.load_state_dict(sd, strict=True, assign=True)
    # RoPE tables are non-persistent buffers computed at init; build them for real, kept in fp32
    model.rope = Rope3D(cfg.head_dim, cfg.rope_max_seq_len, cfg.rope_theta).to(device)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # a new parameter/buffer in DiT that this loader does not know about
        raise RuntimeError(f"load_wan_dit left {left_on_meta} uninitialised; update streamkd.models.wan")
    return model.eval()
