"""Convert diffusers' ``WanTransformer3DModel`` checkpoints to and from ``streamkd.models.dit.DiT``.

Two directions: ``load_wan_dit`` reads a Wan teacher (a diffusers folder) into a ``DiT``;
``export_wan_folder`` writes a distilled student back as a diffusers folder (plus
``streamkd_extras.*`` for what Wan has no place for), and ``load_wan_folder_with_extras`` reads
such a folder back into the exact ``DiT`` that was exported.

Supported
    * Text-to-video Wan2.1 (1.3B / 14B), Wan2.1 image-to-video (I2V-14B 480p / 720p: the CLIP image
      branch, ``image_dim`` with ``added_kv_proj_dim`` equal to the model width), Wan2.2 TI2V-5B and
      the per-expert transformers of Wan2.2 A14B (``transformer/`` and ``transformer_2/``): any
      config with ``qk_norm="rms_norm_across_heads"`` and no image position embedding.
      Channel-concatenated image conditioning (``in_channels != out_channels``, 36 for Wan2.1 I2V)
      is plain patch embedding and is supported.
    * Local diffusers-format folders only (``config.json`` plus one ``diffusion_pytorch_model.safetensors``
      or shards listed in ``diffusion_pytorch_model.safetensors.index.json``), given either as the
      transformer folder itself or as a pipeline root holding ``transformer/``. Nothing is downloaded.
    * The converted model reproduces diffusers' forward in fp32 (to float rounding) for one timestep
      per sample and for per-token timesteps that are constant within each latent frame (Wan2.2's
      ``(B, seq_len)`` timestep path), which is what ``DiT``'s ``t_BF`` expresses.

Not supported (refused with ``WanConversionError``)
    * FLF2V's image position embedding (``pos_embed_seq_len``); ``image_dim`` without
      ``added_kv_proj_dim`` or the reverse, or ``added_kv_proj_dim`` other than the model width
      (``WanImageEmbedding`` outputs that width, so no released checkpoint differs); other ``qk_norm``
      settings; odd ``freq_dim``.
    * ``.bin`` / pickled checkpoints, dtype variants (``*.fp16.safetensors``), VACE / other Wan
      derivatives whose ``_class_name`` is not ``WanTransformer3DModel``.
    * Exporting (``diffusers_config_from_dit``, ``export_wan_folder``) a ``DiT`` with ``rope_theta``
      other than 10000, ``anchor_warp=True`` or an odd ``freq_dim``. ``export_to_diffusers_state_dict``
      refuses an action embedding (it has no Wan counterpart); ``export_wan_folder`` writes it to
      ``streamkd_extras.safetensors`` instead.

Precision note: diffusers keeps ``time_embedder``, ``scale_shift_table`` and the block norms in fp32
when a pipeline is loaded in bf16 (``_keep_in_fp32_modules``); ``load_wan_dit(dtype=bf16)`` casts
every weight to ``dtype`` (only the RoPE tables stay fp32), so bf16 outputs match diffusers to bf16
rounding, not bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from streamkd.checkpoint import _fsync_dir, atomic_save_safetensors
from streamkd.config import from_dict, to_dict
from streamkd.models.dit import DiT, DiTConfig
from streamkd.models.rope import Rope3D

__all__ = [
    "WanConversionError",
    "dit_config_from_diffusers",
    "diffusers_config_from_dit",
    "convert_diffusers_state_dict",
    "export_to_diffusers_state_dict",
    "export_wan_folder",
    "load_wan_dit",
    "load_wan_folder_with_extras",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
_CLASS_NAME = "WanTransformer3DModel"
_IGNORED_SUFFIXES = ("norm_added_q.weight", "norm_added_q.bias")  # diffusers' _keys_to_ignore_on_load_unexpected
EXTRAS_WEIGHTS_NAME = "streamkd_extras.safetensors"
EXTRAS_META_NAME = "streamkd_extras.json"
_EXPORT_FORMAT = "streamkd-wan-export"
_EXPORT_VERSION = 1
_EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, EXTRAS_META_NAME, EXTRAS_WEIGHTS_NAME)

# DiT tensors without a WanTransformer3DModel counterpart -> what they are (written into the extras
# json). A new DiT parameter missing from both this table and _key_map makes export refuse, so an
# export can never silently drop weights.
_EXTRA_TENSORS: dict[str, str] = {
    "action_embed.weight": (
        "nn.Embedding (num_actions + 1, dim); row num_actions is the null action (the unconditional rows "
        "of classifier-free guidance). Its row for each frame's action is added to that frame's timestep "
        "embedding (diffusers: the output of condition_embedder.time_embedder), which feeds both "
        "time_proj and the output head's scale_shift_table."
    ),
}

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
    if (c["image_dim"] is None) != (c["added_kv_proj_dim"] is None):
        raise WanConversionError(
            f"image_dim={c['image_dim']} with added_kv_proj_dim={c['added_kv_proj_dim']}: the CLIP image branch needs "
            "both (Wan2.1 I2V) or neither (text-to-video)"
        )
    inner_dim = c["num_attention_heads"] * c["attention_head_dim"]
    if c["added_kv_proj_dim"] is not None and c["added_kv_proj_dim"] != inner_dim:
        # the image keys/values project the embedded image tokens, which have the model width
        raise WanConversionError(
            f"added_kv_proj_dim={c['added_kv_proj_dim']} differs from the model width {inner_dim} "
            "(num_attention_heads * attention_head_dim); only Wan2.1 I2V's added_kv_proj_dim == width converts"
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
            image_dim=c["image_dim"],
        )
    except ValueError as e:
        raise WanConversionError(f"config does not fit DiTConfig: {e}") from e


def diffusers_config_from_dit(cfg: DiTConfig) -> dict[str, Any]:
    """Keyword arguments for ``WanTransformer3DModel`` equivalent to ``cfg`` (inverse of the above).

    Action fields (``num_actions``, ``action_shifts``) and ``sparse`` are left out: they do not
    change the weights Wan holds (see ``export_wan_folder`` for what they change in the outputs).
    """
    if cfg.rope_theta != 10000.0:
        raise WanConversionError(
            f"rope_theta={cfg.rope_theta}: WanTransformer3DModel's RoPE base is fixed at 10000, so this model's "
            "attention cannot be reproduced; only models trained with rope_theta=10000.0 export"
        )
    if cfg.anchor_warp:
        raise WanConversionError(
            "anchor_warp=True: the patch embedding reads the first frame warped by the camera (2*in_channels+1 "
            "input channels), which WanTransformer3DModel cannot compute; only models trained with "
            "anchor_warp=False export"
        )
    if cfg.freq_dim % 2:
        raise WanConversionError(
            f"freq_dim={cfg.freq_dim} is odd: diffusers zero-pads the sinusoid, DiT does not; use an even freq_dim"
        )
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
        "image_dim": cfg.image_dim,
        "added_kv_proj_dim": None if cfg.image_dim is None else cfg.dim,
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
    if cfg.image_dim is not None:
        img = "condition_embedder.image_embedder"
        linear(f"{img}.norm1", "image_embed.norm1")
        linear(f"{img}.ff.net.0.proj", "image_embed.fc1")
        linear(f"{img}.ff.net.2", "image_embed.fc2")
        linear(f"{img}.norm2", "image_embed.norm2")
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}", f"blocks.{i}"
        for a_src, a_dst in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for proj in ("to_q", "to_k", "to_v"):
                linear(f"{src}.{a_src}.{proj}", f"{dst}.{a_dst}.{proj}")
            linear(f"{src}.{a_src}.to_out.0", f"{dst}.{a_dst}.to_out")
            for norm in ("norm_q", "norm_k"):
                m[f"{src}.{a_src}.{norm}.weight"] = f"{dst}.{a_dst}.{norm}.weight"
        if cfg.image_dim is not None:
            linear(f"{src}.attn2.add_k_proj", f"{dst}.cross_attn.add_k_proj")
            linear(f"{src}.attn2.add_v_proj", f"{dst}.cross_attn.add_v_proj")
            m[f"{src}.attn2.norm_added_k.weight"] = f"{dst}.cross_attn.norm_added_k.weight"
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
        raise WanConversionError(
            "action_embed (num_actions > 0) has no Wan counterpart; use export_wan_folder, which writes it "
            f"beside the Wan weights in {EXTRAS_WEIGHTS_NAME}"
        )
    return _split_state_dict(dit)[0]


def _split_state_dict(dit: DiT) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(``WanTransformer3DModel`` state dict, DiT tensors Wan has no place for), as detached views."""
    ours = dit.state_dict()
    key_map = _key_map(dit.cfg)
    wan: dict[str, torch.Tensor] = {}
    for src, dst in key_map.items():
        t = ours[dst].detach()
        wan[src] = t.squeeze(1) if _is_table(src) else t
    mapped = set(key_map.values())
    extras = {k: v.detach() for k, v in ours.items() if k not in mapped}
    unknown = sorted(set(extras) - set(_EXTRA_TENSORS))
    if unknown:
        raise RuntimeError(f"DiT tensor {_first_and_count(unknown)} is neither mapped to Wan nor a known extra; "
                           "update streamkd.models.wan (_key_map or _EXTRA_TENSORS)")
    return wan, extras


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
    if num_actions and (path / EXTRAS_WEIGHTS_NAME).is_file():
        # zeros here would silently replace the exported student's trained action embedding
        raise WanConversionError(
            f"{str(path)!r} is a streamkd export holding a trained action embedding in {EXTRAS_WEIGHTS_NAME}; "
            "load it with load_wan_folder_with_extras(folder), or pass num_actions=0 for the Wan part alone"
        )
    cfg = dataclasses.replace(dit_config_from_diffusers(_read_config(path)), num_actions=num_actions)
    sd = convert_diffusers_state_dict(_read_weights(path, dtype, device), cfg)
    if cfg.num_actions:
        sd["action_embed.weight"] = torch.zeros(cfg.num_actions + 1, cfg.dim, dtype=dtype, device=device)
    return _build_dit(cfg, sd, device)


def _build_dit(cfg: DiTConfig, sd: dict[str, torch.Tensor], device: torch.device | str) -> DiT:
    """``DiT(cfg)`` holding ``sd`` (the full state dict), in eval mode, without paying for a random init."""
    with torch.device("meta"):
        model = DiT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    # non-persistent buffers are computed at init, not stored: build them for real (as DiT.__init__
    # does), the RoPE tables kept in fp32
    model.rope = Rope3D(cfg.head_dim, cfg.rope_max_seq_len, cfg.rope_theta).to(device)
    if cfg.action_shifts is not None:
        model.action_shifts = torch.tensor([*cfg.action_shifts, (0, 0)], dtype=torch.long, device=device)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # a new parameter/buffer in DiT that this loader does not know about
        raise RuntimeError(f"loading a Wan folder left {left_on_meta} uninitialised; update streamkd.models.wan")
    return model.eval()


# ------------------------------------------------------------------------------------------ export
def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "export_wan_folder records the diffusers version in config.json (_diffusers_version) and needs "
            "diffusers installed; pip install 'streamkd[wan]'"
        ) from None


def _parity_claim(dit: DiT) -> dict[str, Any]:
    """Which ``DiT`` outputs the exported ``WanTransformer3DModel`` reproduces, and which it cannot."""
    cfg = dit.cfg
    call, conditions = "DiT(x, t, context)", ["bidirectional attention (layout=None, cache=None)"]
    if cfg.image_dim is not None:  # diffusers: encoder_hidden_states_image, with a 512-token prompt
        call = "DiT(x, t, context, image_context_BLiD=clip_tokens)"
    missing = [
        "block-causal and cached (streaming) attention: diffusers' model attends bidirectionally, so running the "
        "student causally needs streamkd's streaming loop or other code applying the block-causal mask"
    ]
    null_action = None
    if dit.action_embed is not None:
        # the null action's camera shift is (0, 0), so its only trace is its embedding row
        null_action = bool((dit.action_embed.weight[cfg.num_actions] == 0).all())
        call = "DiT(x, t, context, actions=None)"
        if null_action:
            call += f" or with every frame's action the null action (id {cfg.num_actions}, a zero embedding row)"
        acting = f"the action embedding ({EXTRAS_WEIGHTS_NAME})"
        if cfg.action_shifts is not None:
            acting += " and camera-anchored RoPE (dit_config.action_shifts)"
        missing.append(f"actions: {acting} act only in streamkd"
                       + ("" if null_action else "; this includes the null action, whose embedding row is not zero"))
    if cfg.sparse is not None:
        conditions.append("dense attention (dit_config.sparse=None)")
        missing.append("block-sparse self-attention (dit_config.sparse): diffusers attends densely")
    return {"reproduces": f"{call} with {' and '.join(conditions)}, in fp32 to float rounding",
            "null_action": null_action, "does_not_reproduce": missing}


def _read_export_meta(path: Path) -> dict[str, Any] | None:
    """The extras json of a streamkd export in ``path``; None when ``path`` holds none."""
    meta_path = path / EXTRAS_META_NAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise WanConversionError(f"{str(meta_path)!r} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != _EXPORT_FORMAT:
        raise WanConversionError(
            f"{str(meta_path)!r} is not a streamkd export description (format is not {_EXPORT_FORMAT!r})"
        )
    if meta.get("version") != _EXPORT_VERSION:
        raise WanConversionError(
            f"{str(meta_path)!r} has format version {meta.get('version')!r}; this streamkd reads version "
            f"{_EXPORT_VERSION} -- use the streamkd that wrote it"
        )
    return meta


def _check_target(folder: Path) -> None:
    """Export only into a new folder, an empty one or a previous export: never over a user's files."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"export target {str(folder)!r} is a file; pass a folder path")
    if not folder.is_dir():
        return
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return
    if EXTRAS_META_NAME not in names:
        raise FileExistsError(
            f"export target {str(folder)!r} is not empty and is not a previous streamkd export "
            f"(no {EXTRAS_META_NAME}); choose a new or empty folder"
        )
    try:
        _read_export_meta(folder)
    except WanConversionError as e:
        raise FileExistsError(f"export target {str(folder)!r} is not a previous streamkd export ({e}); "
                              "choose a new or empty folder") from None
    foreign = [n for n in names if n not in _EXPORT_FILES]
    if foreign:
        raise FileExistsError(
            f"export target {str(folder)!r} is a previous export but also holds {foreign}, which export would delete; "
            "move them out or choose another folder"
        )


def _write_json(data: dict[str, Any], path: Path) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def export_wan_folder(dit: DiT, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``dit`` (a distilled student, or any ``DiT``) as a diffusers ``WanTransformer3DModel`` folder.

    ``WanTransformer3DModel.from_pretrained(folder)`` loads the result; ``load_wan_folder_with_extras``
    restores the exact ``DiT``. Returns ``folder``. ``dtype`` casts every floating tensor written
    (None: keep the model's); diffusers' config.json has no dtype field, so pass it to
    ``from_pretrained(folder, torch_dtype=...)`` -- the extras json records it as ``torch_dtype``.

    What the diffusers model computes: the student's *weights* in Wan's bidirectional forward. It
    equals ``dit(x, t, context)`` with no ``layout`` and no ``cache`` (fp32, to float rounding; a
    ``(B, F)`` per-frame ``t`` is diffusers' ``(B, seq_len)`` timestep repeated over each frame's
    tokens). A student runs block-causally at inference: that needs streamkd's streaming loop (or
    other code that applies the block-causal mask), not diffusers' pipeline. A model with actions
    is reproduced only for ``actions=None`` -- and also for all-null actions when the null action's
    embedding row is zero (true at init; training with action dropout moves it); its action embedding
    and camera-anchored RoPE (``action_shifts``) act only in streamkd. A model configured for
    block-sparse attention (``cfg.sparse``) is reproduced with dense attention. The extras json's
    ``diffusers_parity`` states all of this for the model at hand.

    Files written (the whole folder is built beside ``folder`` and renamed into place, so a crash
    leaves either the previous folder or the new one, never a mix):

    * ``config.json`` -- diffusers' config (``_class_name``, ``_diffusers_version`` and
      ``WanTransformer3DModel``'s arguments), as ``save_pretrained`` writes it;
    * ``diffusion_pytorch_model.safetensors`` -- the Wan weights, diffusers' names;
    * ``streamkd_extras.json`` -- always: ``format`` ("streamkd-wan-export"), ``version`` (1),
      ``dit_config`` (the full ``DiTConfig``, ``streamkd.config.to_dict`` form: action fields,
      ``sparse`` and all), ``torch_dtype`` (dtype name, or the sorted names if mixed),
      ``extras`` (streamkd tensor name -> ``{"shape", "what"}``), ``diffusers_parity``
      (``reproduces``, ``null_action``: bool or null without actions, ``does_not_reproduce``) and
      ``load`` (how to read the folder back);
    * ``streamkd_extras.safetensors`` -- only when ``extras`` is not empty: those tensors under
      their ``DiT.state_dict()`` names (today ``action_embed.weight``). To load them without
      ``load_wan_folder_with_extras``: ``cfg = streamkd.config.from_dict(DiTConfig, dit_config)``,
      convert the Wan weights with ``convert_diffusers_state_dict(..., cfg)``, add these tensors and
      ``DiT(cfg).load_state_dict(..., strict=True)``.

    Refuses (``FileExistsError``, naming the folder) a ``folder`` that is neither new, empty nor a
    previous export holding only these files; refuses (``WanConversionError``, naming the field) a
    config Wan cannot express -- see ``diffusers_config_from_dit``.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (torch.float16, torch.bfloat16, torch.float32), got {dtype}")
    cfg = dit.cfg
    wan_config = {"_class_name": _CLASS_NAME, "_diffusers_version": _diffusers_version(),
                  **diffusers_config_from_dit(cfg)}
    wan_config["patch_size"] = list(wan_config["patch_size"])
    folder = Path(folder).expanduser()
    _check_target(folder)
    wan_sd, extras = _split_state_dict(dit)
    if dtype is not None:
        wan_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in wan_sd.items()}
        extras = {k: v.to(dtype) if v.is_floating_point() else v for k, v in extras.items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in [*wan_sd.values(), *extras.values()]})
    meta = {
        "format": _EXPORT_FORMAT,
        "version": _EXPORT_VERSION,
        "dit_config": to_dict(cfg),
        "torch_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "extras": {k: {"shape": list(v.shape), "what": _EXTRA_TENSORS[k]} for k, v in extras.items()},
        "diffusers_parity": _parity_claim(dit),
        "load": (
            "streamkd.models.wan.load_wan_folder_with_extras(folder) restores the exact DiT; by hand: "
            "cfg = streamkd.config.from_dict(DiTConfig, dit_config), DiT(cfg).load_state_dict("
            f"{{**convert_diffusers_state_dict(<{WEIGHTS_NAME}>, cfg), **<{EXTRAS_WEIGHTS_NAME}>}}, strict=True). "
            "WanTransformer3DModel.from_pretrained(folder) loads the diffusers part alone"
        ),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():  # left by a crashed export of a process that had this pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        atomic_save_safetensors(wan_sd, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        if extras:
            atomic_save_safetensors(extras, tmp / EXTRAS_WEIGHTS_NAME, metadata={"format": "pt"})
        _write_json(wan_config, tmp / CONFIG_NAME)
        _write_json(meta, tmp / EXTRAS_META_NAME)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():  # empty, or a previous export (checked above): swap it out, then delete it
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    _fsync_dir(folder.parent)
    return folder


def load_wan_folder_with_extras(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> DiT:
    """The ``DiT`` that ``export_wan_folder`` wrote to ``folder``: Wan weights, action head and config.

    The config comes from ``streamkd_extras.json`` (so ``num_actions``, ``action_shifts`` and
    ``sparse`` come back); ``config.json`` must still describe the same transformer. Every tensor
    comes back bit for bit when ``dtype`` is the exported dtype or wider (an fp16 export read as
    fp32 is exact). Returned in eval mode, weights cast to ``dtype`` on ``device`` (RoPE tables fp32).
    A plain diffusers Wan folder has no extras json: load it with ``load_wan_dit``.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"export folder {str(path)!r} does not exist or is not a directory")
    meta = _read_export_meta(path)
    if meta is None:
        raise WanConversionError(
            f"{str(path)!r} has no {EXTRAS_META_NAME}, so it is not a streamkd export; load a plain diffusers "
            "Wan folder with load_wan_dit(folder)"
        )
    try:
        cfg = from_dict(DiTConfig, meta.get("dit_config"), path="dit_config")
    except ValueError as e:
        raise WanConversionError(f"{str(path / EXTRAS_META_NAME)!r}: {e}") from e
    # a config.json edited after export would pair the weights with the wrong streamkd config
    written = _read_config(path)
    for key, want in json.loads(json.dumps(diffusers_config_from_dit(cfg))).items():
        if key in written and written[key] != want:
            raise WanConversionError(
                f"config.json has {key}={written[key]!r} but {EXTRAS_META_NAME} implies {want!r}; the folder was "
                "edited after export -- export the model again"
            )
    sd = convert_diffusers_state_dict(_read_weights(path, dtype, device), cfg)
    shapes = _expected_shapes(cfg)
    needed = sorted(set(shapes) - set(_key_map(cfg).values()))
    listed = sorted(meta.get("extras") or {})
    if listed != needed:
        raise WanConversionError(
            f"{EXTRAS_META_NAME} lists extras {listed} but its dit_config needs {needed}; export the model again"
        )
    extras: dict[str, torch.Tensor] = {}
    if needed:
        extras_path = path / EXTRAS_WEIGHTS_NAME
        if not extras_path.is_file():
            raise FileNotFoundError(f"{EXTRAS_META_NAME} lists {needed} but {str(extras_path)!r} is missing")
        with safe_open(str(extras_path), framework="pt", device="cpu") as f:
            if sorted(f.keys()) != needed:
                raise WanConversionError(
                    f"{str(extras_path)!r} holds {sorted(f.keys())} but {EXTRAS_META_NAME} lists {needed}; "
                    "export the model again"
                )
            for key in needed:
                t = f.get_tensor(key)
                if tuple(t.shape) != shapes[key]:
                    raise WanConversionError(f"extra tensor {key!r} has shape {tuple(t.shape)} but dit_config implies "
                                             f"{shapes[key]}; export the model again")
                extras[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return _build_dit(cfg, {**sd, **extras}, device)
