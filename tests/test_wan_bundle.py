"""A diffusers Wan2.1 pipeline folder works wherever a checkpoint does (tiny random components,
built here; nothing downloaded): loading, the teacher against diffusers' own WanPipeline, generate,
and the bad folders a user may hold."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from streamkd.bundle import checkpoint_kind, load_model  # noqa: E402
from streamkd.checkpoint import CheckpointError  # noqa: E402
from streamkd.models.tiny_wan import make_tiny_wan  # noqa: E402
from streamkd.models.wan_model import WanModel, WanOptions  # noqa: E402

SIZE = WanOptions(height=32, width=48, horizon_frames=3, max_text_length=16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_folder_loads_as_bidirectional_teacher(folder) -> None:
    assert checkpoint_kind(folder) == "wan-pipeline"
    model = load_model(folder, wan=SIZE)
    assert isinstance(model, WanModel) and not model.is_causal
    assert model.latent_hw == (4, 6) and model.frame_hw == (32, 48) and model.num_actions == 0
    assert model.codec.temporal_factor == 4 and model.null_prompt == ""
    # only the denoiser is trainable state: the frozen VAE and UMT5 stay out of parameters()
    assert all(name.startswith("dit.") for name in model.state_dict())
    ctx = model.encode_prompts(["a red car drives through the forest", ""])
    assert ctx.shape == (2, 16, 32)


def test_teacher_reproduces_wanpipeline(folder) -> None:
    """Same prompt, negative prompt, noise and timestep: our teacher (DiT + UMT5 + Wan VAE, one
    Euler step with CFG 5) gives the frames diffusers' WanPipeline gives."""
    from diffusers import WanPipeline

    from streamkd.bundle import SamplingConfig
    from streamkd.sampling.bidirectional import sample_clip

    prompt, negative = "a white boat on a blue lake near the mountain", "blurry, static"
    model = load_model(folder, wan=WanOptions(height=32, width=48, horizon_frames=3, max_text_length=16, negative_prompt=negative))
    shape = (1, 16, 3, 4, 6)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    pipe = WanPipeline.from_pretrained(str(folder))
    theirs = pipe(prompt, negative_prompt=negative, height=32, width=48, num_frames=9, num_inference_steps=1,
                  guidance_scale=5.0, latents=noise.clone(), output_type="pt", max_sequence_length=16).frames  # (1, 9, 3, H, W) in [0, 1]
    sampler = SamplingConfig(kind="euler", num_steps=1, shift=3.0, guidance_scale=5.0).make()
    latents = sample_clip(model, sampler, [prompt], None, None, 3, torch.Generator().manual_seed(5), guidance_scale=5.0)
    ours = model.codec.decode_float(latents)  # (1, 9, H, W, 3) in [-1, 1]
    theirs = theirs.permute(0, 1, 3, 4, 2).float() * 2 - 1
    assert ours.shape == theirs.shape == (1, 9, 32, 48, 3)
    assert theirs.std() > 0.01
    assert (ours - theirs).abs().max() < 1e-4


def test_generate_cli_text_to_video(folder, tmp_path) -> None:
    from streamkd.media.video import read_video

    out = tmp_path / "t2v.mp4"
    cmd = [sys.executable, "-m", "streamkd.cli", "generate", "--checkpoint", str(folder), "--prompt",
           "a red car drives through the forest at sunset, cinematic", "--frames", "9", "--height", "32", "--width", "48",
           "--steps", "2", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    frames = read_video(out)
    assert frames.shape == (9, 32, 48, 3)


@pytest.mark.parametrize("frames, message", [("8", "1 \\+ 4 k"), ("9 --actions right:4", "takes no actions")])
def test_generate_cli_refuses(folder, tmp_path, frames, message) -> None:
    cmd = [sys.executable, "-m", "streamkd.cli", "generate", "--checkpoint", str(folder), "--prompt", "a cat",
           "--height", "32", "--width", "48", "--out", str(tmp_path / "x.mp4"), "--frames", *frames.split()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), run.stderr[-2000:]


# ------------------------------------------------------------------------------------ bad folders
@pytest.mark.parametrize("component", ["tokenizer", "vae", "text_encoder"])
def test_missing_component(folder, tmp_path, component) -> None:
    bad = _copy(folder, tmp_path / "bad")
    shutil.rmtree(bad / component)
    with pytest.raises(CheckpointError, match=f"no {component}/ component"):
        load_model(bad, wan=SIZE)


def test_other_pipeline_class(folder, tmp_path) -> None:
    bad = _copy(folder, tmp_path / "bad")
    index = json.loads((bad / "model_index.json").read_text())
    index["_class_name"] = "WanImageToVideoPipeline"
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="WanImageToVideoPipeline"):
        load_model(bad, wan=SIZE)


def test_bare_transformer_folder(folder) -> None:
    with pytest.raises(CheckpointError, match="pass the pipeline folder above it"):
        load_model(folder / "transformer")


def test_vae_transformer_channel_mismatch(folder, tmp_path) -> None:
    from diffusers import AutoencoderKLWan

    from streamkd.models.tiny_wan import TINY_VAE

    bad = _copy(folder, tmp_path / "bad")
    shutil.rmtree(bad / "vae")
    AutoencoderKLWan(**{**TINY_VAE, "z_dim": 8, "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8}).save_pretrained(str(bad / "vae"))
    with pytest.raises(CheckpointError, match="8 latent channels"):
        load_model(bad, wan=SIZE)


def test_size_not_divisible(folder) -> None:
    with pytest.raises(ValueError, match="not a multiple of the VAE stride 8 x patch 2x2 = 16x16"):
        load_model(folder, wan=WanOptions(height=40, width=48))


def test_toy_checkpoint_refuses_wan_options() -> None:
    with pytest.raises(ValueError, match="apply to Wan models"):
        load_model("toy-teacher", wan=WanOptions(height=32))


def test_student_save_references_pipeline(folder, tmp_path) -> None:
    """A saved Wan bundle holds the DiT only and names its pipeline; moved pipelines are found by --pipeline."""
    teacher = load_model(folder, wan=SIZE)
    teacher.save(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["kind"] == "wan" and saved["pipeline"] == str(folder.resolve())
    size = (tmp_path / "student" / "model.safetensors").stat().st_size
    assert size < 1.2 * sum(p.numel() * 4 for p in teacher.dit.parameters())  # no VAE / text encoder inside
    moved = _copy(folder, tmp_path / "moved")
    cfg = dict(saved, pipeline=str(tmp_path / "nowhere"))
    (tmp_path / "student" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pass the folder's new place"):
        load_model(tmp_path / "student")
    again = load_model(tmp_path / "student", pipeline=str(moved))
    x = torch.randn(1, 16, 3, 4, 6)
    t = torch.full((1, 3), 500.0)
    ctx = again.encode_prompts(["a dog"])
    assert torch.equal(again.dit(x, t, ctx), teacher.dit(x, t, ctx))


# ------------------------------------------------------------------------------------ end to end
def test_end_to_end_pipeline_to_served_stream(folder, tmp_path) -> None:
    """tiny Wan pipeline -> teacher ODE pairs on a prompt file -> ODE init -> self-forcing DMD ->
    export -> causal generate (streaming VAE decode) -> served over the websocket -> diffusers export:
    the configs of configs/tiny-wan/, with only the folders moved into tmp_path."""
    import asyncio

    from diffusers import WanTransformer3DModel

    from streamkd.config import load_config
    from streamkd.distill.ode_pairs import ODEPairsConfig, generate_ode_pairs
    from streamkd.generate import generate_frames
    from streamkd.models.wan import export_wan_folder
    from streamkd.serve.backends import ModelBackend
    from streamkd.serve.client import StreamClient
    from streamkd.serve.server import ServerConfig, StreamServer
    from streamkd.train.distill import DistillConfig, DistillTrainer

    configs = Path(__file__).resolve().parent.parent / "configs" / "tiny-wan"
    prompts = str(configs / "prompts.txt")
    pairs = tmp_path / "pairs"
    generate_ode_pairs(load_config(ODEPairsConfig, configs / "ode_pairs.yaml",
                                   [f"teacher={folder}", f"prompts={prompts}", f"out_dir={pairs}"]), progress=False)
    ode = load_config(DistillConfig, configs / "distill_ode.yaml",
                      [f"teacher={folder}", f"ode_pairs={pairs}", f"out_dir={tmp_path / 'ode'}"])
    losses = DistillTrainer(ode).train(progress=False)
    assert len(losses) == ode.max_steps and all(np.isfinite(r["ode_loss"]) for r in losses)
    dmd = load_config(DistillConfig, configs / "distill_dmd.yaml",
                      [f"teacher={folder}", f"init={tmp_path / 'ode' / 'final'}", f"prompts={prompts}", f"out_dir={tmp_path / 'dmd'}"])
    stats = DistillTrainer(dmd).train(progress=False)
    assert {"dmd_loss", "critic_loss"} <= set(stats[0]) and all(np.isfinite(v) for r in stats for v in r.values())

    student = load_model(tmp_path / "dmd" / "final")
    assert isinstance(student, WanModel) and student.is_causal and student.cfg.pipeline == str(folder.resolve())
    chunks = list(generate_frames(student, prompt="a red car drives through the forest", seed=3, actions=[0] * 9,
                                  first_frame=None))
    assert [len(c) for c in chunks] == [9, 12, 12] and chunks[0].shape[1:] == (32, 48, 3)

    async def serve() -> list:
        async with StreamServer(ServerConfig(port=0), ModelBackend(student, max_batch=2)) as srv:
            async with await StreamClient.connect(srv.url) as c:
                assert c.welcome["model"]["frame_size"] == [32, 48] and c.welcome["model"]["actions"] == []
                await c.send({"type": "start", "prompt": "a purple sky over the desert, cinematic", "fps": 100})
                frames = [await c.next_frame() for _ in range(14)]
                await c.send({"type": "prompt", "prompt": "x " * 200})  # over the 48-token limit: refused, not cut
                assert "shorten it" in (await c.next_event("error"))["message"]
                await c.prompt("a white boat on a blue lake")  # re-caches the window under the new prompt
                applied = await c.next_event("prompt_applied")
                while (f := await c.next_frame()).header.frame_seq < applied["frame_seq"]:
                    pass
                assert f.header.frame_seq == applied["frame_seq"] and f.header.flags & 16  # PROMPT_CHANGED
                assert (applied["frame_seq"] - 9) % 12 == 0  # at a chunk start: 9 frames, then 12 per chunk
                return frames

    frames = asyncio.run(asyncio.wait_for(serve(), 60))
    assert [f.header.frame_seq for f in frames] == list(range(14))
    assert frames[0].image.shape == (32, 48, 3) and frames[9].header.flags & 4  # chunk 2 starts at frame 9

    from streamkd.serve.server import build_backend

    moved = _copy(folder, tmp_path / "moved-pipeline")  # `streamkd serve --pipeline`: a student whose pipeline moved
    assert build_backend(str(tmp_path / "dmd" / "final"), False, 1, pipeline=str(moved)).model.cfg.pipeline == str(moved.resolve())

    out = export_wan_folder(student.dit, tmp_path / "diffusers")
    wan = WanTransformer3DModel.from_pretrained(str(out)).eval()
    x, t = torch.randn(1, 16, 3, 4, 6), torch.full((1,), 700.0)
    ctx = student.encode_prompts(["a dog"])
    with torch.no_grad():
        ours = student.dit(x, t[:, None].expand(1, 3), ctx)
        theirs = wan(x, t, ctx, return_dict=False)[0]
    assert (ours - theirs).abs().max() < 1e-5


def test_eval_and_serve_refuse_what_they_cannot_run(folder, tmp_path) -> None:
    from streamkd.serve.server import build_backend

    run = subprocess.run([sys.executable, "-m", "streamkd.cli", "eval", "--checkpoint", str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "exact ground truth" in run.stderr.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="bidirectional"):  # a pipeline's teacher: distil it first
        build_backend(str(folder), oracle=False, max_batch=1)


def test_prompt_cache_in_training_gives_the_same_pairs(folder, tmp_path) -> None:
    """ODE pairs with ``prompt_cache`` equal those without; every prompt (and the negative prompt)
    went through UMT5 once, into the cache folder."""
    from streamkd.config import load_config
    from streamkd.distill.ode_pairs import ODEPairsConfig, ODEPairStore, generate_ode_pairs

    configs = Path(__file__).resolve().parent.parent / "configs" / "tiny-wan"
    common = [f"teacher={folder}", f"prompts={configs / 'prompts.txt'}", "num_clips=4", "num_steps=4",
              "keep_sigmas=[1.0,0.9375]"]
    plain = generate_ode_pairs(load_config(ODEPairsConfig, configs / "ode_pairs.yaml", common + [f"out_dir={tmp_path / 'a'}"]),
                               progress=False)
    cached = generate_ode_pairs(load_config(ODEPairsConfig, configs / "ode_pairs.yaml",
                                            common + [f"out_dir={tmp_path / 'b'}", f"prompt_cache={tmp_path / 'cache'}"]),
                                progress=False)
    assert torch.equal(ODEPairStore(plain).latents, ODEPairStore(cached).latents)
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    prompts = (configs / "prompts.txt").read_text().splitlines()
    assert len(files) == len(set(prompts)) + 1  # the prompt file, then the (empty) negative prompt on first use
    with pytest.raises(ValueError, match="needs none"):
        generate_ode_pairs(load_config(ODEPairsConfig, configs / "ode_pairs.yaml",
                                       ["teacher=toy-teacher", "prompts=null", "wan.height=null", "wan.width=null",
                                        "wan.horizon_frames=null", "wan.max_text_length=null", f"out_dir={tmp_path / 'c'}",
                                        f"prompt_cache={tmp_path / 'cache'}"]), progress=False)


def test_wan_configs_parse_and_tiny_mirrors_the_real_recipe() -> None:
    from streamkd.config import load_config
    from streamkd.distill.ode_pairs import ODEPairsConfig
    from streamkd.train.distill import DistillConfig
    from streamkd.train.teacher import TeacherTrainConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    real, tiny = root / "wan2.1-t2v-1.3b", root / "tiny-wan"
    assert sorted(p.name for p in real.glob("*.yaml")) == sorted(p.name for p in tiny.glob("*.yaml"))
    kinds = {"ode_pairs.yaml": ODEPairsConfig, "teacher_world.yaml": TeacherTrainConfig}
    for folder in (real, tiny):
        for path in folder.glob("*.yaml"):
            cfg = load_config(kinds.get(path.name, DistillConfig), path, [])
            if path.name not in kinds:
                assert cfg.sigmas == [1.0, 0.9375, 0.8333333, 0.625] and cfg.causal.chunk_frames == 3
    dmd = load_config(DistillConfig, real / "distill_dmd.yaml", [])
    assert (dmd.wan.height, dmd.wan.width, dmd.wan.horizon_frames) == (480, 832, 21)
    assert (dmd.lr, dmd.critic_lr, dmd.critic_ratio, dmd.teacher_guidance) == (2e-6, 4e-7, 5, 3.0)
    # the image-to-video 14B configs: the same recipe on videos' first frames
    i2v = root / "wan2.1-i2v-14b-480p"
    assert sorted(p.name for p in i2v.glob("*.yaml")) == ["distill_dmd.yaml", "distill_ode.yaml", "ode_pairs.yaml"]
    for path in i2v.glob("*.yaml"):
        cfg = load_config(kinds.get(path.name, DistillConfig), path, [])
        assert cfg.prompts is None and (path.name == "distill_ode.yaml" or cfg.data == "data/clips")
    assert load_config(DistillConfig, i2v / "distill_dmd.yaml", []).causal == dmd.causal


@pytest.mark.distributed
def test_wan_dmd_two_processes_match_single_process(folder, tmp_path) -> None:
    """torchrun + FSDP2 on a Wan teacher (text-to-video, prompt file): the DiTs sharded, the
    frozen UMT5 and VAE replicated; two processes reproduce one process's losses to 1e-5."""
    import os

    from streamkd.config import dump_yaml, load_config
    from streamkd.train.distill import DistillConfig, DistillTrainer

    configs = Path(__file__).resolve().parent.parent / "configs" / "tiny-wan"
    overrides = [f"teacher={folder}", "init=null", f"prompts={configs / 'prompts.txt'}", "batch_size=2", "max_steps=3",
                 "critic_ratio=2", "log_every=1", "threads=1"]
    single = DistillTrainer(load_config(DistillConfig, configs / "distill_dmd.yaml", overrides + [f"out_dir={tmp_path / 'one'}"]))
    want = [{k: r[k] for k in ("dmd_loss", "critic_loss") if k in r} for r in single.train(progress=False)]
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(dump_yaml(load_config(DistillConfig, configs / "distill_dmd.yaml", overrides + [f"out_dir={tmp_path / 'two'}"])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "streamkd.cli", "distill", "train", "--config", str(cfg_path), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "two" / "losses.jsonl").read_text().splitlines()]
    got = [{k: r[k] for k in ("dmd_loss", "critic_loss") if k in r} for r in logged]
    assert [sorted(r) for r in got] == [sorted(r) for r in want] and len(got) == 3
    assert all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) for a, b in zip(got, want) for k in b), (got, want)


def test_other_transformer_class_named(folder, tmp_path) -> None:
    bad = _copy(folder, tmp_path / "bad")
    index = json.loads((bad / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "CogVideoXTransformer3DModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="transformer is a CogVideoXTransformer3DModel, expected WanTransformer3DModel"):
        load_model(bad, wan=SIZE)


def test_image_to_video_holds_the_image(folder) -> None:
    """A first frame (``--image``) is frame 0 held clean: the stream starts with the VAE's round
    trip of the image, bidirectional and streamed alike."""
    from streamkd.bundle import CausalConfig, SamplingConfig
    from streamkd.generate import generate_frames

    model = load_model(folder, wan=SIZE)
    image = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = model.codec.decode(model.codec.encode(image[None, None]))[0, 0].numpy()
    sampling = SamplingConfig(kind="euler", num_steps=2, shift=3.0, guidance_scale=5.0)
    for causal in (None, CausalConfig(chunk_frames=3, sink_frames=3, window_frames=3)):
        frames = np.concatenate(list(generate_frames(model, prompt="a cat", seed=0, actions=[0] * 3, first_frame=image.numpy(),
                                                     sampling=sampling, causal=causal)))
        assert frames.shape == (9, 32, 48, 3)
        assert np.abs(frames[0].astype(int) - expected.astype(int)).max() <= 1
