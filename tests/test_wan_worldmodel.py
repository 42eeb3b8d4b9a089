"""A Wan2.1 teacher becomes an action-conditioned world model: fine-tuned on videos with per-frame
actions (``streamkd train teacher init=<pipeline folder> data=<videos> add_actions=N``).

Tiny random diffusers components built here, toy-world videos (with their action sidecars) at the
tiny pipeline's size; nothing downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from streamkd.bundle import load_model
from streamkd.cli import main
from streamkd.data.video import write_toy_videos
from streamkd.models.tiny_wan import make_tiny_wan
from streamkd.models.wan_model import WanOptions
from streamkd.train.teacher import TeacherTrainConfig, TeacherTrainer

WAN = WanOptions(height=32, width=48, horizon_frames=3, max_text_length=48)
PIXEL_FRAMES = 9  # 1 + 4 (3 - 1): the tiny pipeline's horizon through the Wan VAE


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wan-world")
    folder = make_tiny_wan(root / "tiny-wan")
    videos = root / "videos"
    write_toy_videos(videos, 4, num_frames=PIXEL_FRAMES)
    return folder, videos


def _cfg(folder: Path, videos: Path, out: Path, **changes) -> TeacherTrainConfig:
    base = dict(init=str(folder), wan=WAN, data=str(videos), add_actions=5, out_dir=str(out), batch_size=2, max_steps=2,
                lr=1e-3, warmup_steps=1, ckpt_every=1, log_every=1, tensorboard=False, i2v_prob=0.5)
    return TeacherTrainConfig(**{**base, **changes})


def test_fine_tune_adds_actions_starting_at_the_pretrained_model(setup, tmp_path: Path) -> None:
    folder, videos = setup
    trainer = TeacherTrainer(_cfg(folder, videos, tmp_path / "run"))
    base = load_model(str(folder), wan=WAN)
    model = trainer.model
    assert model.num_actions == 5 and not base.num_actions
    # only the DiT trains: the VAE and UMT5 are frozen and outside the module tree
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"dit"}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, base.codec.latent_channels, 3, *base.latent_hw, generator=gen)
    t, ctx = torch.full((1,), 500.0), base.encode_prompts(["a road through a forest"])
    with torch.no_grad():  # the zero-initialised action embedding: step 0 is the pretrained model, any action
        want = base.dit(x, t, ctx)
        for action in range(5):
            torch.testing.assert_close(model.dit(x, t, ctx, torch.full((1, 3), action)), want, atol=0, rtol=0)

    losses = trainer.train(progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    final = load_model(str(tmp_path / "run" / "final"))
    assert type(final).__name__ == "WanModel" and final.num_actions == 5
    assert final.cfg.pipeline == str(folder.resolve())  # the student-style checkpoint names its pipeline folder
    assert final.dit.action_embed.weight.abs().sum() > 0  # the actions of the videos trained it
    with torch.no_grad():
        left, right = (final.dit(x, t, ctx, torch.full((1, 3), a)) for a in (3, 4))
    assert not torch.equal(left, right)  # the fine-tuned teacher follows actions


def test_fine_tune_resumes_exactly(setup, tmp_path: Path) -> None:
    folder, videos = setup
    full = TeacherTrainer(_cfg(folder, videos, tmp_path / "a", max_steps=3)).train(progress=False)
    TeacherTrainer(_cfg(folder, videos, tmp_path / "b", max_steps=3)).train(stop_after=1, progress=False)
    rest = TeacherTrainer(_cfg(folder, videos, tmp_path / "b", max_steps=3)).train(progress=False)
    assert full[1:] == rest


def test_fine_tuned_world_model_generates_with_actions(setup, tmp_path: Path) -> None:
    folder, videos = setup
    TeacherTrainer(_cfg(folder, videos, tmp_path / "run", max_steps=1)).train(progress=False)
    out = tmp_path / "walk.mp4"
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "final"), "--prompt", "a path in the snow",
                 "--actions", "right:2,up:1", "--frames", str(PIXEL_FRAMES), "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_a_world_model_names_its_own_actions(setup, tmp_path: Path, capsys) -> None:
    """``action_names`` with ``add_actions``: the checkpoint keeps the vocabulary; ``--actions``
    and the protocol read it (index = the sidecars' id); names that cannot be typed are refused."""
    from serve.protocol import Action, ProtocolError, parse_client_message

    folder, videos = setup
    names = ["idle", "forward", "back", "left", "right", "jump"]
    TeacherTrainer(_cfg(folder, videos, tmp_path / "run", max_steps=1, add_actions=6, action_names=names)).train(progress=False)
    model = load_model(str(tmp_path / "run" / "final"))
    assert model.num_actions == 6 and model.action_names == names
    out = tmp_path / "walk.mp4"
    base = ["generate", "--checkpoint", str(tmp_path / "run" / "final"), "--prompt", "a path in the snow",
            "--frames", str(PIXEL_FRAMES), "--steps", "1", "--out", str(out)]
    assert main([*base, "--actions", "forward:2,jump:1"]) == 0 and out.stat().st_size > 0
    assert main([*base, "--actions", "up:2"]) != 0
    assert "unknown action 'up' at segment 1; allowed: idle, forward, back, left, right, jump" in capsys.readouterr().err
    assert parse_client_message('{"type": "action", "seq": 1, "action": "jump"}', names) == Action(1, 5)
    with pytest.raises(ProtocolError, match=r"must be one of \['idle', 'forward'"):
        parse_client_message('{"type": "action", "seq": 1, "action": "up"}', names)
    with pytest.raises(ProtocolError, match="this model takes no actions"):
        parse_client_message('{"type": "action", "seq": 1, "action": "up"}', [])
    for bad, match in ((names[:5], "names 5 actions, the model takes 6"), (["a", "b", "c", "d", "e", "b"], "repeats a name"),
                       (["idle", "go,left", "b", "c", "d", "e"], "'go,left' is not a usable action name")):
        with pytest.raises(ValueError, match=match):
            _cfg(folder, videos, tmp_path / "x", add_actions=6, action_names=bad)


def test_fine_tune_refuses_what_it_cannot_do(setup, tmp_path: Path) -> None:
    folder, videos = setup
    with pytest.raises(ValueError, match="fine-tuning it needs videos or shards"):
        TeacherTrainer(_cfg(folder, videos, tmp_path / "a", data=None))
    TeacherTrainer(_cfg(folder, videos, tmp_path / "b", max_steps=1)).train(progress=False)
    with pytest.raises(ValueError, match="already takes 5 actions; set add_actions: 0"):
        TeacherTrainer(_cfg(tmp_path / "b" / "final", videos, tmp_path / "c"))
    # a clip whose actions do not fit the model's vocabulary stops the batch, naming it
    bad = tmp_path / "bad"
    write_toy_videos(bad, 2, num_frames=PIXEL_FRAMES)
    sidecar = sorted(bad.glob("*.actions.json"))[0]
    sidecar.write_text(json.dumps([7] * len(json.loads(sidecar.read_text()))))
    with pytest.raises(ValueError, match="action 7"):
        TeacherTrainer(_cfg(folder, bad, tmp_path / "d", max_steps=1)).train(progress=False)


def test_latent_actions_take_each_latent_frames_most_held_action() -> None:
    from streamkd.bundle import latent_actions

    pixel = torch.tensor([[2, 1, 1, 3, 3, 4, 4, 4, 0], [0, 0, 0, 0, 0, 1, 2, 3, 4]])  # 9 frames: 3 latent frames at k = 4
    assert latent_actions(pixel, 4).tolist() == [[2, 1, 4], [0, 0, 1]]  # ties: the earliest held
    assert torch.equal(latent_actions(pixel, 1), pixel)
    with pytest.raises(ValueError, match="not 1 \\+ 4 k"):
        latent_actions(pixel[:, :8], 4)


def test_world_model_chain_from_videos(setup, tmp_path: Path) -> None:
    """Fine-tuned action teacher -> ODE pairs on the videos (first frames, actions) -> ODE init ->
    self-forcing DMD on the videos -> a causal student that streams with live actions."""
    from streamkd.bundle import CausalConfig, latent_actions
    from streamkd.distill.ode_pairs import ODEPairsConfig, ODEPairStore, generate_ode_pairs
    from streamkd.train.distill import DistillConfig, DistillTrainer

    folder, videos = setup
    TeacherTrainer(_cfg(folder, videos, tmp_path / "teacher", max_steps=1)).train(progress=False)
    teacher = str(tmp_path / "teacher" / "final")
    generate_ode_pairs(ODEPairsConfig(teacher=teacher, data=str(videos), out_dir=str(tmp_path / "pairs"), num_clips=2,
                                      shard_clips=2, num_steps=4, keep_sigmas=[1.0, 0.5]), progress=False)
    store = ODEPairStore(tmp_path / "pairs")
    sidecars = sorted(videos.glob("*.actions.json"))[:2]
    want = latent_actions(torch.tensor([json.loads(p.read_text()) for p in sidecars]), 4)
    assert torch.equal(store.actions[:2], want) and store.first_given
    common = dict(teacher=teacher, causal=CausalConfig(chunk_frames=1, sink_frames=1, window_frames=1), sigmas=[1.0, 0.5],
                  max_steps=1, batch_size=2, tensorboard=False, ckpt_every=1, log_every=1)
    DistillTrainer(DistillConfig(method="ode", ode_pairs=str(tmp_path / "pairs"), out_dir=str(tmp_path / "ode"), **common)
                   ).train(progress=False)
    DistillTrainer(DistillConfig(method="dmd", init=str(tmp_path / "ode" / "final"), data=str(videos), critic_ratio=1,
                                 out_dir=str(tmp_path / "dmd"), **common)).train(progress=False)
    student = load_model(str(tmp_path / "dmd" / "final"))
    assert student.is_causal and student.num_actions == 5
    out = tmp_path / "stream.mp4"
    assert main(["generate", "--checkpoint", str(tmp_path / "dmd" / "final"), "--prompt", "a path in the snow",
                 "--image", str(_first_frame_png(videos, tmp_path)), "--actions", "right:3,up:2", "--frames", "13",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    # bench stream takes the Wan student too: latency / memory against length, RGB frames counted
    result = tmp_path / "bench.json"
    assert main(["bench", "stream", "--checkpoint", str(tmp_path / "dmd" / "final"), "--milestones", "2", "4",
                 "--json", str(result)]) == 0
    bench = json.loads(result.read_text())
    assert bench["frames_out"] == 1 + 4 * (4 - 1) and set(bench["latency_ms"]) == {"2", "4"}
    # served: a session from an image, steered chunk by chunk (the server's backend, live actions)
    from streamkd.cli import _read_image
    from streamkd.serve.backends import ModelBackend, StreamSpec

    backend = ModelBackend(student)
    image = _read_image(str(_first_frame_png(videos, tmp_path)), student.frame_hw)  # the model's size, as clients send
    session = backend.start(StreamSpec("a path in the snow", seed=0, first_frame=image))
    sizes = [backend.step([session], [action])[0].shape for action in (4, 4, 1)]
    assert sizes == [(1, 32, 48, 3), (4, 32, 48, 3), (4, 32, 48, 3)]  # the VAE's 1 + 4 k framing
    # measured against held-out videos: the ground truth a real model has (random weights here:
    # only that it runs and reports finite figures with its floor and ceiling)
    result = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "dmd" / "final"), "--data", str(videos), "--episodes", "2",
                 "--json", str(result)]) == 0
    figures = next(iter(json.loads(result.read_text()).values()))
    assert all(math.isfinite(x) for x in (figures["video_psnr"], figures["floor"]["video_psnr"], figures["ceiling"]["video_psnr"]))


def _first_frame_png(videos: Path, tmp_path: Path) -> Path:
    from PIL import Image

    from streamkd.media.video import read_video

    path = tmp_path / "first.png"
    Image.fromarray(read_video(sorted(videos.glob("*.mp4"))[0])[0]).save(path)
    return path


def test_fine_tune_on_shards_reads_their_prompt_embeddings(setup, tmp_path: Path, monkeypatch) -> None:
    """Pre-encoded shards feed a Wan fine-tune both latents and prompt embeddings: the same losses
    as training on the videos themselves, and UMT5 runs only for CFG's unconditional prompt."""
    from streamkd.data.shards import encode_shards
    from streamkd.data.video import VideoClipDataset
    from streamkd.models.text import UMT5TextEncoder

    folder, videos = setup
    from_videos = TeacherTrainer(_cfg(folder, videos, tmp_path / "videos", max_steps=2)).train(progress=False)
    model = load_model(str(folder), wan=WAN)
    encode_shards(VideoClipDataset(videos, PIXEL_FRAMES, 32, 48), model, tmp_path / "shards", clips_per_shard=2)
    encoded: list[str] = []
    real_encode = UMT5TextEncoder.encode
    monkeypatch.setattr(UMT5TextEncoder, "encode", lambda self, prompts: encoded.extend(prompts) or real_encode(self, prompts))
    from_shards = TeacherTrainer(_cfg(folder, tmp_path / "shards", tmp_path / "shards-run", max_steps=2)).train(progress=False)
    assert from_shards == pytest.approx(from_videos, rel=1e-5)
    assert set(encoded) <= {model.null_prompt}  # captions came from the shards
