"""Wan2.1 image-to-video: the CLIP image branch of streamkd's DiT against diffusers' Wan model.

Wan2.1 I2V feeds the transformer 36 channels (16 noisy latents + 4 first-frame mask + 16 latents of
``[image, zeros...]``) -- plain patch embedding -- and the penultimate CLIP vision tokens, which
every cross-attention reads through its own key/value projections (``image_dim`` /
``added_kv_proj_dim``). Tolerance as in ``test_wan_parity``: the same fp32 math in a different op
order, so float32 rounding (~1e-6 on outputs ~1); 1e-5 leaves kernel-choice headroom while a
mapping error shows up at >= 1e-2.

diffusers' attention processor takes the *last 512* context tokens as the prompt and the rest as
image tokens (T5's padded length is hard-coded), so the reference calls here pass 512 prompt tokens.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from streamkd.models.dit import DiT, DiTConfig  # noqa: E402
from streamkd.models.wan import (  # noqa: E402
    WanConversionError,
    convert_diffusers_state_dict,
    diffusers_config_from_dit,
    dit_config_from_diffusers,
    export_to_diffusers_state_dict,
    load_wan_dit,
)
from tests.test_wan_parity import ATOL, TINY, _maxdiff, _randomize  # noqa: E402

TEXT_TOKENS = 512  # diffusers' WanAttnProcessor: prompt = the last 512 context tokens
IMAGE_TOKENS = 5  # CLIP patches + class token (257 for ViT-H/14 at 224 px)
I2V = dict(TINY, in_channels=4 + 4 + 4, out_channels=4, image_dim=24, added_kv_proj_dim=32)
"""Tiny Wan2.1 I2V transformer: latents + mask + first-frame latents in (4 latent channels, so the
mask keeps 4 too), width 32 so ``added_kv_proj_dim`` is the width, as in the real model."""


def _wan_i2v(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**I2V, **overrides})
    _randomize(model, seed + 1)
    return model.eval()


def _converted(wan: WanTransformer3DModel) -> DiT:
    cfg = dit_config_from_diffusers(dict(wan.config))
    dit = DiT(cfg)
    dit.load_state_dict(convert_diffusers_state_dict(wan.state_dict(), cfg), strict=True)
    return dit.eval()


def _inputs(cfg: DiTConfig, frames: int = 3, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, frames, 4, 4, generator=g)
    t = torch.rand(2, generator=g) * 1000
    ctx = torch.randn(2, TEXT_TOKENS, cfg.text_dim, generator=g)
    img = torch.randn(2, IMAGE_TOKENS, cfg.image_dim, generator=g)
    return x, t, ctx, img


# ------------------------------------------------------------------------------------------ parity
@torch.no_grad()
def test_i2v_forward_parity() -> None:
    wan = _wan_i2v()
    dit = _converted(wan)
    assert dit.cfg.image_dim == 24 and dit.cfg.in_channels == 12
    x, t, ctx, img = _inputs(dit.cfg)
    ref = wan(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    out = dit(x, t, ctx, image_context_BLiD=img)
    diff = _maxdiff(out, ref)
    print(f"I2V max abs diff {diff:.3g} (|ref| max {ref.abs().max():.3g})")
    assert ref.abs().max() > 0.1
    assert diff <= ATOL
    # the image branch carries signal: another image (not a permutation or rescale of the tokens:
    # attention and LayerNorm are blind to those) moves the output far beyond the tolerance
    other = torch.randn(img.shape, generator=torch.Generator().manual_seed(5))
    assert _maxdiff(dit(x, t, ctx, image_context_BLiD=other), out) > 1e-2


@torch.no_grad()
def test_i2v_per_frame_timesteps() -> None:
    wan = _wan_i2v(seed=3)
    dit = _converted(wan)
    x, _, ctx, img = _inputs(dit.cfg)
    t_BF = torch.tensor([[0.0, 250.0, 900.0], [999.0, 10.0, 500.0]])
    t_BL = t_BF.repeat_interleave(dit.tokens_per_frame(x.shape[3], x.shape[4]), dim=1)
    ref = wan(x, t_BL, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    assert _maxdiff(dit(x, t_BF, ctx, image_context_BLiD=img), ref) <= ATOL


def test_image_context_required_and_refused() -> None:
    i2v = _converted(_wan_i2v())
    x, t, ctx, img = _inputs(i2v.cfg)
    with pytest.raises(ValueError, match="image_dim=24, got no image context"):
        i2v(x, t, ctx)
    cfg = DiTConfig(in_channels=4, out_channels=4, num_layers=1, num_heads=2, head_dim=16, ffn_dim=32, text_dim=16)
    with pytest.raises(ValueError, match="image_dim=None, got an image context"):
        DiT(cfg)(x[:, :4], t, ctx, image_context_BLiD=img)
    # a text-to-video model has no image parameters at all
    assert not any("image" in k or "add_" in k for k in DiT(cfg).state_dict())
    with pytest.raises(ValueError, match="image_dim must be a positive int"):
        DiTConfig(image_dim=0)


# ------------------------------------------------------------------------------------ conversion
@torch.no_grad()
def test_load_and_export_i2v_folder(tmp_path) -> None:
    wan = _wan_i2v(seed=7)
    wan.save_pretrained(tmp_path / "transformer")
    dit = load_wan_dit(tmp_path / "transformer")
    x, t, ctx, img = _inputs(dit.cfg)
    ref = wan(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    assert _maxdiff(dit(x, t, ctx, image_context_BLiD=img), ref) <= ATOL
    # and back: every diffusers tensor (norm_added_q aside: diffusers ignores it) round-trips exactly
    back = export_to_diffusers_state_dict(dit)
    sd = {k: v for k, v in wan.state_dict().items() if "norm_added_q" not in k}
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    fresh = WanTransformer3DModel(**diffusers_config_from_dit(dit.cfg))
    fresh.load_state_dict(back, strict=True)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(added_kv_proj_dim=None), r"image_dim=24 with added_kv_proj_dim=None.*both"),
        (dict(image_dim=None), r"image_dim=None with added_kv_proj_dim=32.*both"),
        (dict(added_kv_proj_dim=16), r"added_kv_proj_dim=16 differs from the model width 32"),
    ],
    ids=["no-added-kv", "no-image-dim", "added-kv-not-width"],
)
def test_half_image_branch_refused(overrides, match) -> None:
    with pytest.raises(WanConversionError, match=match):
        dit_config_from_diffusers({**I2V, **overrides})


def test_missing_image_tensor_named() -> None:
    wan = _wan_i2v()
    cfg = dit_config_from_diffusers(dict(wan.config))
    sd = dict(wan.state_dict())
    del sd["blocks.1.attn2.norm_added_k.weight"]
    with pytest.raises(WanConversionError, match=r"missing tensor 'blocks\.1\.attn2\.norm_added_k\.weight'"):
        convert_diffusers_state_dict(sd, cfg)


# ------------------------------------------------------------------------- the pipeline folder
@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from streamkd.models.tiny_wan import make_tiny_wan_i2v

    return make_tiny_wan_i2v(tmp_path_factory.mktemp("wan-i2v") / "tiny-wan-i2v")


def _first_frame(seed: int = 0) -> torch.Tensor:
    """A smooth uint8 frame (1, 32, 48, 3): gradients plus a few random blobs, so CLIP and the VAE
    both see structure."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    base = torch.stack([yy, xx, 1 - yy * xx], -1)
    blobs = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(32, 48), mode="bilinear")
    return ((0.6 * base + 0.4 * blobs[0].permute(1, 2, 0)) * 255).round().to(torch.uint8)[None]


def test_i2v_folder_loads(i2v_folder) -> None:
    from streamkd.bundle import load_model
    from streamkd.models.wan_model import WanModel, WanOptions

    model = load_model(i2v_folder, wan=WanOptions(height=32, width=48, horizon_frames=3, max_text_length=TEXT_TOKENS))
    assert isinstance(model, WanModel) and model.is_image_to_video and not model.is_causal
    assert model.dit.cfg.in_channels == 36 and model.dit.cfg.image_dim == 32
    # the frozen CLIP encoder stays out of the trainable state, like the VAE and UMT5
    assert all(name.startswith("dit.") for name in model.state_dict())
    cond, image = model.image_inputs(_first_frame(), 3)
    assert cond.shape == (1, 4 + 16, 3, 4, 6) and image.shape == (1, 5, 32)
    assert torch.equal(cond[:, :4, 0], torch.ones_like(cond[:, :4, 0])) and not cond[:, :4, 1:].any()


def test_teacher_reproduces_wan_i2v_pipeline(i2v_folder) -> None:
    """Same image, prompt, negative prompt, noise and timestep: our teacher (DiT + CLIP + UMT5 + Wan
    VAE, one Euler step with CFG 5) gives the frames diffusers' WanImageToVideoPipeline gives.
    Tolerance 1e-4 on [-1, 1] frames, as the text-to-video test: fp32 rounding through the VAE."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from streamkd.bundle import SamplingConfig, load_model
    from streamkd.models.wan_model import WanOptions
    from streamkd.sampling.bidirectional import sample_clip

    prompt, negative = "a white boat on a blue lake near the mountain", "blurry, static"
    model = load_model(i2v_folder, wan=WanOptions(height=32, width=48, horizon_frames=3, max_text_length=TEXT_TOKENS,
                                                  negative_prompt=negative))
    first = _first_frame()
    noise = torch.randn((1, 16, 3, 4, 6), generator=torch.Generator().manual_seed(5))
    pipe = WanImageToVideoPipeline.from_pretrained(str(i2v_folder))
    theirs = pipe(Image.fromarray(first[0].numpy()), prompt, negative_prompt=negative, height=32, width=48, num_frames=9,
                  num_inference_steps=1, guidance_scale=5.0, latents=noise.clone(), output_type="pt",
                  max_sequence_length=TEXT_TOKENS).frames  # (1, 9, 3, H, W) in [0, 1]
    sampler = SamplingConfig(kind="euler", num_steps=1, shift=3.0, guidance_scale=5.0).make()
    latents = sample_clip(model, sampler, [prompt], first, None, 3, torch.Generator().manual_seed(5), guidance_scale=5.0)
    ours = model.codec.decode_float(latents)  # (1, 9, H, W, 3) in [-1, 1]
    theirs = theirs.permute(0, 1, 3, 4, 2).float() * 2 - 1
    assert ours.shape == theirs.shape == (1, 9, 32, 48, 3)
    assert theirs.std() > 0.01
    diff = (ours - theirs).abs().max().item()
    print(f"I2V pipeline max abs diff {diff:.3g}")
    assert diff < 1e-4
    # the image matters: another first frame gives other frames
    other = sample_clip(model, sampler, [prompt], _first_frame(1), None, 3, torch.Generator().manual_seed(5), guidance_scale=5.0)
    assert (model.codec.decode_float(other) - ours).abs().max() > 1e-3


def test_i2v_teacher_needs_the_image(i2v_folder) -> None:
    from streamkd.bundle import SamplingConfig, load_model
    from streamkd.models.wan_model import WanOptions
    from streamkd.sampling.bidirectional import sample_clip

    model = load_model(i2v_folder, wan=WanOptions(height=32, width=48, horizon_frames=3, max_text_length=TEXT_TOKENS))
    sampler = SamplingConfig(kind="euler", num_steps=1, shift=3.0).make()
    with pytest.raises(ValueError, match="image-to-video model: pass the first frames"):
        sample_clip(model, sampler, ["a cat"], None, None, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="image_dim=32, got no image context"):  # code that skips image_inputs
        model.dit(torch.zeros(1, 36, 3, 4, 6), torch.zeros(1), torch.zeros(1, 4, 32))


def test_wan22_i2v_folder_refused(i2v_folder, tmp_path) -> None:
    import json
    import shutil

    from streamkd.checkpoint import CheckpointError
    from streamkd.models.wan_model import check_pipeline_folder

    bad = tmp_path / "wan22"
    shutil.copytree(i2v_folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["image_encoder"] = [None, None]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="without a CLIP image encoder"):
        check_pipeline_folder(bad)
    shutil.rmtree(bad / "image_processor")
    index = json.loads((i2v_folder / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no image_processor/ component"):
        check_pipeline_folder(bad)


def test_generate_cli_image_to_video(i2v_folder, tmp_path) -> None:
    import subprocess
    import sys

    from PIL import Image

    from streamkd.media.video import read_video

    image, out = tmp_path / "first.png", tmp_path / "i2v.mp4"
    Image.fromarray(_first_frame()[0].numpy()).save(image)
    base = [sys.executable, "-m", "streamkd.cli", "generate", "--checkpoint", str(i2v_folder), "--prompt", "a boat on a lake",
            "--frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--out", str(out)]
    run = subprocess.run([*base, "--image", str(image)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_video(out).shape == (9, 32, 48, 3)
    run = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "pass the first frames (generate: --image)" in run.stderr.strip().splitlines()[-1]


def test_i2v_bundle_save_load(i2v_folder, tmp_path) -> None:
    """A saved I2V bundle (e.g. a fine-tuned teacher) keeps its image branch and reloads its CLIP encoder."""
    from streamkd.bundle import load_model
    from streamkd.models.wan_model import WanModel, WanOptions

    model = load_model(i2v_folder, wan=WanOptions(height=32, width=48, horizon_frames=3, max_text_length=TEXT_TOKENS))
    model.save(tmp_path / "saved")
    back = WanModel.load(tmp_path / "saved")
    assert back.dit.cfg == model.dit.cfg and back.dit.cfg.image_dim == 32
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    cond, image = model.image_inputs(_first_frame(), 3)
    cond2, image2 = back.image_inputs(_first_frame(), 3)
    assert torch.equal(cond, cond2) and torch.equal(image, image2)


def test_image_stream_chunks_equal_the_whole_condition(i2v_folder) -> None:
    """A stream's image inputs, chunk by chunk (the VAE's streaming encoder over ``[image, 0, ...]``
    continued with zero frames), equal ``image_inputs`` of the whole length."""
    from streamkd.bundle import load_model
    from streamkd.models.wan_model import WanOptions

    model = load_model(i2v_folder, wan=WanOptions(height=32, width=48, horizon_frames=3, max_text_length=TEXT_TOKENS))
    first = torch.cat([_first_frame(0), _first_frame(1)])
    whole, context = model.image_inputs(first, 6)
    stream = model.image_stream(first)
    chunks = torch.cat([stream.next(n) for n in (1, 2, 3)], 2)
    assert chunks.shape == whole.shape == (2, 4 + 16, 6, 4, 6)
    torch.testing.assert_close(chunks, whole, atol=1e-5, rtol=0)
    assert torch.equal(stream.context_BLiD, context)
    assert (whole[:, 4:, 1] - whole[:, 4:, 2]).abs().max() > 1e-4  # the image reaches later latents


def test_streaming_an_i2v_model_equals_the_causal_full_sequence(i2v_folder) -> None:
    """An image-to-video model streams: each chunk reads the condition channels of its frames and
    the CLIP tokens, and equals the block-causal full-sequence forward over the clean history and
    the chunk with the whole clip's ``image_inputs`` (CFG rows included)."""
    from streamkd.attention.layout import CausalLayout
    from streamkd.bundle import CausalConfig, load_model
    from streamkd.models.wan_model import WanOptions
    from streamkd.sampling.schedule import FewStepSampler
    from streamkd.sampling.stream import StreamGenerator, guided

    model = load_model(i2v_folder, wan=WanOptions(height=32, width=48, horizon_frames=3, max_text_length=TEXT_TOKENS))
    causal = CausalConfig(chunk_frames=1, sink_frames=1, window_frames=2)
    first, prompt = _first_frame(), "a white boat on a blue lake"
    steps = []
    stream = StreamGenerator(model, FewStepSampler([1.0]), causal=causal, guidance_scale=3.0,
                             on_step=lambda c, i, x, t, v: steps.append((x, v)))
    stream.reset([prompt], first, torch.Generator().manual_seed(0))
    chunks = [stream.next_chunk() for _ in range(3)]
    cond, image = model.image_inputs(first, 3)
    context = model.encode_prompts([prompt, model.null_prompt])
    with torch.no_grad():
        for c, (noisy, v) in enumerate(steps):
            x = torch.cat([*chunks[:c], noisy], 2).repeat(2, 1, 1, 1, 1)
            t = torch.zeros(2, c + 1)
            t[:, c] = 1000.0
            full = model.dit(torch.cat([x, cond[:, :, : c + 1].repeat(2, 1, 1, 1, 1)], 1), t, context,
                             layout=CausalLayout(1, 1, 2), image_context_BLiD=image.repeat(2, 1, 1))
            torch.testing.assert_close(v, guided(full, 1, 3.0)[:, :, c:], atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="pass the first frames"):
        stream.reset([prompt], None, torch.Generator().manual_seed(0))


def test_generate_cli_streams_an_i2v_model(i2v_folder, tmp_path) -> None:
    import subprocess
    import sys

    from PIL import Image

    from streamkd.media.video import read_video

    image, out = tmp_path / "first.png", tmp_path / "i2v_stream.mp4"
    Image.fromarray(_first_frame()[0].numpy()).save(image)
    run = subprocess.run([sys.executable, "-m", "streamkd.cli", "generate", "--checkpoint", str(i2v_folder), "--causal",
                          "--chunk-frames", "1", "--sink-frames", "1", "--window-frames", "2", "--image", str(image),
                          "--prompt", "a boat on a lake", "--frames", "21", "--height", "32", "--width", "48",
                          "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_video(out).shape == (21, 32, 48, 3)  # 6 latent frames: past the teacher's horizon of 3


def test_i2v_distillation_chain(i2v_folder, tmp_path) -> None:
    """A Wan2.1 I2V teacher distils into a causal I2V student: ODE pairs from videos' first frames
    (every frame denoised, the image as condition channels + CLIP tokens, stored beside the
    trajectories) -> ODE init -> self-forcing DMD on the videos -> a student that streams from an
    image and is served."""
    import numpy as np

    from streamkd.bundle import CausalConfig, load_model
    from streamkd.data.prompts import condition_source
    from streamkd.data.video import write_toy_videos
    from streamkd.distill.ode_pairs import ODEPairsConfig, ODEPairStore, generate_ode_pairs
    from streamkd.models.wan_model import WanOptions
    from streamkd.sampling.bidirectional import sample_clip
    from streamkd.serve.backends import ModelBackend, StreamSpec
    from streamkd.train.distill import DistillConfig, DistillTrainer

    wan = WanOptions(height=32, width=48, horizon_frames=3, max_text_length=TEXT_TOKENS)
    videos = tmp_path / "videos"
    write_toy_videos(videos, 2, num_frames=9)
    pairs_cfg = ODEPairsConfig(teacher=str(i2v_folder), wan=wan, data=str(videos), out_dir=str(tmp_path / "pairs"),
                               num_clips=2, shard_clips=2, num_steps=4, keep_sigmas=[1.0, 0.5], guidance_scale=3.0)
    generate_ode_pairs(pairs_cfg, progress=False)
    store = ODEPairStore(tmp_path / "pairs")
    assert not store.first_given and store.image is not None
    assert store.image[0].shape == (2, 4 + 16, 3, 4, 6) and store.image[1].shape == (2, 5, 32)
    # the pairs' end points are the teacher's own image-to-video samples (the pipeline's, see above)
    teacher = load_model(i2v_folder, wan=wan)
    data = condition_source(teacher, None, 3, pairs_cfg.base_seed, str(videos))
    first = torch.stack([data[i]["frames"][0] for i in range(2)])
    want = sample_clip(teacher, pairs_cfg.make_sampler(), [data[i]["prompt"] for i in range(2)], first, None, 3,
                       torch.Generator().manual_seed(pairs_cfg.base_seed * 1_000_003), guidance_scale=3.0)
    torch.testing.assert_close(store.latents[:, -1].float(), want, atol=2e-2, rtol=0)  # stored in fp16

    common = dict(teacher=str(i2v_folder), wan=wan, causal=CausalConfig(chunk_frames=1, sink_frames=1, window_frames=2),
                  sigmas=[1.0, 0.5], max_steps=1, batch_size=2, tensorboard=False, ckpt_every=1, log_every=1)
    ode = DistillTrainer(DistillConfig(method="ode", ode_pairs=str(tmp_path / "pairs"), out_dir=str(tmp_path / "ode"),
                                       **common)).train(progress=False)
    assert np.isfinite(ode[0]["ode_loss"])
    stats = DistillTrainer(DistillConfig(method="dmd", init=str(tmp_path / "ode" / "final"), data=str(videos),
                                         critic_ratio=1, rollout_frames=6, out_dir=str(tmp_path / "dmd"), **common)
                           ).train(progress=False)
    assert {"dmd_loss", "critic_loss"} <= set(stats[0]) and all(np.isfinite(v) for v in stats[0].values())
    (tmp_path / "prompts.txt").write_text("a boat on a lake\n")
    with pytest.raises(ValueError, match="set data="):  # an I2V teacher scores rollouts from images only
        DistillTrainer(DistillConfig(method="dmd", init=str(tmp_path / "ode" / "final"), prompts=str(tmp_path / "prompts.txt"),
                                     out_dir=str(tmp_path / "no-images"), **common)).train(progress=False)
    student = load_model(tmp_path / "dmd" / "final")
    assert student.is_causal and student.is_image_to_video
    backend = ModelBackend(student)
    session = backend.start(StreamSpec("a boat on a lake", seed=0, first_frame=first[0].numpy()))
    assert [backend.step([session], [0])[0].shape for _ in range(3)] == [(1, 32, 48, 3), (4, 32, 48, 3), (4, 32, 48, 3)]

    import asyncio

    from streamkd.serve.client import StreamClient
    from streamkd.serve.server import ServerConfig, StreamServer

    async def serve() -> list:
        async with StreamServer(ServerConfig(port=0), ModelBackend(student)) as srv:
            async with await StreamClient.connect(srv.url) as c:
                assert c.welcome["model"]["image_to_video"] is True
                await c.send({"type": "start", "prompt": "a boat on a lake", "first_frame": None})
                assert "start.first_frame must be an image" in (await c.next_event("error"))["message"]
                await c.start("a boat on a lake", first_frame=first[0].numpy(), fps=100)
                return [await c.next_frame() for _ in range(5)]

    frames = asyncio.run(asyncio.wait_for(serve(), 60))
    assert [f.header.frame_seq for f in frames] == list(range(5)) and frames[0].image.shape == (32, 48, 3)


def test_make_tiny_wan_i2v_cli_then_generate_from_an_image(tmp_path) -> None:
    """The command-line path: a tiny I2V folder, then a clip from an image through it."""
    import numpy as np
    from PIL import Image

    from streamkd.cli import main

    folder = tmp_path / "tiny-i2v"
    assert main(["make-tiny-wan", "--i2v", "--out", str(folder)]) == 0
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "--checkpoint", str(folder), "--image", str(image), "--prompt", "a boat", "--height", "32",
                 "--width", "48", "--frames", "9", "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
