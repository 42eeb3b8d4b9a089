"""Export of a streamkd DiT (a distilled student) to a diffusers ``WanTransformer3DModel`` folder.

Parity is checked against diffusers' own loader (``from_pretrained``), on the bidirectional forward
only: that is what diffusers' model computes (see ``export_wan_folder``). Tolerance as in
``test_wan_parity``: same fp32 math in a different op order, ~1e-6 apart; mapping errors show up
at >= 1e-2. The streamkd round trip (export -> ``load_wan_folder_with_extras``) must be exact.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from safetensors import safe_open  # noqa: E402

from streamkd.attention.sparse import BlockSparseConfig  # noqa: E402
from streamkd.models.dit import DiT, DiTConfig  # noqa: E402
from streamkd.models.wan import (  # noqa: E402
    WanConversionError,
    convert_diffusers_state_dict,
    dit_config_from_diffusers,
    export_wan_folder,
    load_wan_dit,
    load_wan_folder_with_extras,
)

from tests.test_wan_parity import ATOL, TINY  # noqa: E402  (the same tiny Wan config as the parity tests)
NUM_ACTIONS = 4
SHIFTS = ((0, 0), (1, 0), (0, 1), (-1, 0))  # camera-anchored RoPE: one token per move
BASE_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "streamkd_extras.json"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter (norm gains away from 1, zero-initialised tables non-zero), so no
    identity weight can hide a mapping error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif "scale_shift_table" in name or "action_embed" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


def _student(seed: int = 0, **dit_overrides) -> DiT:
    """A DiT converted from a tiny random Wan (where a real student starts), with ``dit_overrides``
    (actions, sparse attention) applied; an action embedding gets random (trained-looking) rows."""
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(**TINY)
    _randomize(wan, seed + 1)
    cfg = dataclasses.replace(dit_config_from_diffusers(dict(wan.config)), **dit_overrides)
    dit = DiT(cfg)
    sd = convert_diffusers_state_dict(wan.state_dict(), cfg)
    if cfg.num_actions:
        g = torch.Generator().manual_seed(seed)
        sd["action_embed.weight"] = 0.5 * torch.randn(cfg.num_actions + 1, cfg.dim, generator=g)
    dit.load_state_dict(sd, strict=True)
    return dit.eval()


def _inputs(cfg: DiTConfig, seed: int = 123):
    """Latents (2, C, 3 frames, 4, 4), per-frame timesteps (B, F), prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 3, 4, 4, generator=g)
    t_BF = torch.rand(2, 3, generator=g) * 1000
    ctx = torch.randn(2, 5, cfg.text_dim, generator=g)
    return x, t_BF, ctx


def _diffusers_out(wan: WanTransformer3DModel, dit: DiT, x, t_BF, ctx) -> torch.Tensor:
    # diffusers' per-frame form: one timestep per token (the Wan2.2 (B, seq_len) path)
    t_BL = t_BF.repeat_interleave(dit.tokens_per_frame(x.shape[3], x.shape[4]), dim=1)
    return wan(x, t_BL, ctx, return_dict=False)[0]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _meta(folder) -> dict:
    return json.loads((folder / "streamkd_extras.json").read_text())


# ------------------------------------------------------------------------------------------ parity
@torch.no_grad()
def test_export_loads_in_diffusers_and_matches(tmp_path) -> None:
    dit = _student()
    folder = export_wan_folder(dit, tmp_path / "student")
    assert folder == tmp_path / "student"
    assert _files(tmp_path) == ["student"]  # nothing left beside it
    assert _files(folder) == BASE_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel"
    assert config["_diffusers_version"] == diffusers.__version__
    meta = _meta(folder)
    assert meta["extras"] == {} and meta["torch_dtype"] == "float32"
    assert meta["diffusers_parity"]["null_action"] is None
    assert "bidirectional" in meta["diffusers_parity"]["reproduces"]

    wan = WanTransformer3DModel.from_pretrained(folder).eval()
    x, t_BF, ctx = _inputs(dit.cfg)
    ref = dit(x, t_BF, ctx)
    assert ref.abs().max() > 0.1  # not a degenerate all-zero comparison
    assert _maxdiff(_diffusers_out(wan, dit, x, t_BF, ctx), ref) <= ATOL
    assert _maxdiff(wan(x, t_BF[:, 0], ctx, return_dict=False)[0], dit(x, t_BF[:, 0], ctx)) <= ATOL


@torch.no_grad()
def test_fp16_export(tmp_path) -> None:
    dit = _student(seed=2)
    folder = export_wan_folder(dit, tmp_path / "fp16", dtype=torch.float16)
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert _meta(folder)["torch_dtype"] == "float16"
    assert WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float16).dtype == torch.float16
    # read back in fp32, the export is exactly the student with its weights rounded to fp16
    rounded = copy.deepcopy(dit).half().float()
    wan = WanTransformer3DModel.from_pretrained(folder).eval()
    x, t_BF, ctx = _inputs(dit.cfg)
    assert _maxdiff(_diffusers_out(wan, dit, x, t_BF, ctx), rounded(x, t_BF, ctx)) <= ATOL
    back = load_wan_folder_with_extras(folder)
    for k, v in rounded.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------ extras
@torch.no_grad()
def test_action_student_round_trip(tmp_path) -> None:
    dit = _student(seed=4, num_actions=NUM_ACTIONS, action_shifts=SHIFTS)
    folder = export_wan_folder(dit, tmp_path / "world")
    assert _files(folder) == sorted([*BASE_FILES, "streamkd_extras.safetensors"])
    meta = _meta(folder)
    assert list(meta["extras"]) == ["action_embed.weight"]
    assert meta["extras"]["action_embed.weight"]["shape"] == [NUM_ACTIONS + 1, dit.cfg.dim]
    assert meta["dit_config"]["action_shifts"] == [list(s) for s in SHIFTS]
    parity = meta["diffusers_parity"]
    assert "actions=None" in parity["reproduces"] and "null action" not in parity["reproduces"]
    assert parity["null_action"] is False  # the random null row is not zero

    x, t_BF, ctx = _inputs(dit.cfg)
    actions = torch.tensor([[1, 2, 3], [0, NUM_ACTIONS, 1]])
    no_actions, with_actions = dit(x, t_BF, ctx), dit(x, t_BF, ctx, actions)
    null = dit(x, t_BF, ctx, torch.full_like(actions, NUM_ACTIONS))
    # the claim in the json: diffusers reproduces actions=None, and neither actions nor the null action
    wan = WanTransformer3DModel.from_pretrained(folder).eval()
    out = _diffusers_out(wan, dit, x, t_BF, ctx)
    assert _maxdiff(out, no_actions) <= ATOL
    assert _maxdiff(out, with_actions) > 1e-3 and _maxdiff(out, null) > 1e-3
    # streamkd gets the whole model back, bit for bit
    back = load_wan_folder_with_extras(folder)
    assert back.cfg == dit.cfg and not back.training
    assert back.state_dict().keys() == dit.state_dict().keys()
    for k, v in dit.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert torch.equal(back.action_shifts, dit.action_shifts)
    assert torch.equal(back(x, t_BF, ctx, actions), with_actions)
    # the plain Wan loader must not zero the trained action head behind the user's back
    with pytest.raises(WanConversionError, match="load_wan_folder_with_extras"):
        load_wan_dit(folder, num_actions=NUM_ACTIONS)
    assert _maxdiff(load_wan_dit(folder)(x, t_BF, ctx), no_actions) <= ATOL


@torch.no_grad()
def test_zero_null_action_is_reproduced_too(tmp_path) -> None:
    dit = _student(seed=5, num_actions=NUM_ACTIONS, action_shifts=SHIFTS)
    dit.action_embed.weight[NUM_ACTIONS].zero_()  # as at init (load_wan_dit(num_actions=...))
    folder = export_wan_folder(dit, tmp_path / "world")
    parity = _meta(folder)["diffusers_parity"]
    assert parity["null_action"] is True and "null action" in parity["reproduces"]
    wan = WanTransformer3DModel.from_pretrained(folder).eval()
    x, t_BF, ctx = _inputs(dit.cfg)
    null = torch.full((2, 3), NUM_ACTIONS)
    assert _maxdiff(_diffusers_out(wan, dit, x, t_BF, ctx), dit(x, t_BF, ctx, null)) <= ATOL


@torch.no_grad()
def test_sparse_student_is_reproduced_dense(tmp_path) -> None:
    sparse = BlockSparseConfig(mode="topk", topk=1, sink_blocks=0, block_q=4, block_k=4)
    dit = _student(seed=6, sparse=sparse)
    folder = export_wan_folder(dit, tmp_path / "sparse")
    parity = _meta(folder)["diffusers_parity"]
    assert "dense attention" in parity["reproduces"]
    assert any("block-sparse" in s for s in parity["does_not_reproduce"])
    dense = DiT(dataclasses.replace(dit.cfg, sparse=None)).eval()
    dense.load_state_dict(dit.state_dict())
    x, t_BF, ctx = _inputs(dit.cfg)
    assert _maxdiff(dit(x, t_BF, ctx), dense(x, t_BF, ctx)) > 1e-3  # sparsity really drops something
    wan = WanTransformer3DModel.from_pretrained(folder).eval()
    assert _maxdiff(_diffusers_out(wan, dit, x, t_BF, ctx), dense(x, t_BF, ctx)) <= ATOL
    assert load_wan_folder_with_extras(folder).cfg.sparse == sparse


# ------------------------------------------------------------------------------------------ refusals
def test_refuses_folder_with_user_files(tmp_path) -> None:
    dit = _student()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(mine)) + ".*not a previous streamkd export"):
        export_wan_folder(dit, mine)
    assert _files(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        export_wan_folder(dit, tmp_path / "a_file")
    assert _files(tmp_path) == ["a_file", "mine"]


def test_reexport_replaces_previous_export_only(tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()  # an empty folder is fine
    export_wan_folder(_student(num_actions=NUM_ACTIONS), folder)
    assert "streamkd_extras.safetensors" in _files(folder)
    export_wan_folder(_student(seed=1), folder)  # a previous export is replaced whole: no stale extras
    assert _files(folder) == BASE_FILES and _files(tmp_path) == ["out"]
    assert load_wan_folder_with_extras(folder).cfg.num_actions == 0
    (folder / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(folder)) + r".*\['README.md'\]"):
        export_wan_folder(_student(), folder)
    assert (folder / "README.md").read_text() == "mine"


SMALL = dict(in_channels=4, out_channels=4, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, text_dim=8, freq_dim=32)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(rope_theta=32.0), r"rope_theta=32\.0.*only models trained with rope_theta=10000"),
        (dict(num_actions=1, action_shifts=((0, 1),), anchor_warp=True), "anchor_warp=True.*anchor_warp=False export"),
        (dict(freq_dim=31), "freq_dim=31.*use an even freq_dim"),
    ],
    ids=["rope_theta", "anchor_warp", "odd_freq_dim"],
)
def test_unexpressible_config_refused(tmp_path, overrides, match) -> None:
    dit = DiT(DiTConfig(**{**SMALL, **overrides}))
    with pytest.raises(WanConversionError, match=match):
        export_wan_folder(dit, tmp_path / "out")
    assert _files(tmp_path) == []


def test_load_needs_an_unedited_export(tmp_path) -> None:
    WanTransformer3DModel(**TINY).save_pretrained(tmp_path / "plain")
    with pytest.raises(WanConversionError, match="not a streamkd export.*load_wan_dit"):
        load_wan_folder_with_extras(tmp_path / "plain")
    folder = export_wan_folder(_student(), tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    config["eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WanConversionError, match="config.json has eps=1e-05"):
        load_wan_folder_with_extras(folder)
