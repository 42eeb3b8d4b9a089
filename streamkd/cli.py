"""``streamkd``: one command line for training, generation, evaluation and benchmarks.

Every user mistake (bad config field, missing or corrupt checkpoint, bad action spec, unwritable
output) ends in one ``error: ...`` line and exit code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  streamkd train teacher --config configs/toyworld/teacher.yaml max_steps=200
  streamkd generate --checkpoint toy-teacher --prompt "forest with red squares" \\
      --seed 3 --actions right:16,up:8,none:4 --frames 12 --out out.mp4
  streamkd eval --checkpoint toy-teacher --episodes 16 --seed 0 --frames 12 --json eval.json
  streamkd bench stream --checkpoint toy-teacher --causal --json bench.json
  streamkd bench shapes --json docs/bench_student_shapes.json
  streamkd data toy-videos --out data/toy --clips 32
  streamkd data encode --data data/toy --checkpoint toy-teacher --out data/toy-shards
  streamkd serve --checkpoint toy-student            # then open http://127.0.0.1:8765/
  streamkd client --actions right:8,down:8 --frames 48 --out live.mp4
"""


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the checkpoint's config.json)")
    g.add_argument("--sampler", choices=["euler", "few_step"], help="euler ODE, or few_step (predict x0, re-noise)")
    g.add_argument("--steps", type=int, help="denoising steps (per chunk when streaming)")
    g.add_argument("--guidance", type=float, help="CFG scale s in uncond + s (cond - uncond); 1 = off")
    g.add_argument("--shift", type=float, help="timestep shift")
    g.add_argument("--causal", action="store_true", help="stream a bidirectional checkpoint through the causal chunk loop")
    g.add_argument("--chunk-frames", type=int, help="frames per chunk when streaming")
    g.add_argument("--sink-frames", type=int, help="attention-sink frames kept in the KV cache")
    g.add_argument("--window-frames", type=int, help="recent frames kept in the KV cache ring")


def _add_wan_args(p) -> None:
    g = p.add_argument_group("Wan models (a diffusers Wan pipeline folder or a student distilled from one)")
    g.add_argument("--height", type=int, help="video height in pixels (default: the checkpoint's; 480 for a pipeline folder)")
    g.add_argument("--width", type=int, help="video width in pixels (default: the checkpoint's; 832 for a pipeline folder)")
    g.add_argument("--negative-prompt", help="CFG's unconditional prompt (default: the checkpoint's; empty)")
    g.add_argument("--pipeline", help="a Wan student's pipeline folder (VAE, text encoder), if it moved")


def _add_device_args(p) -> None:
    g = p.add_argument_group("device and precision (streamkd.runtime)")
    g.add_argument("--device", default="auto", help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: the DiT and text encoder in bf16 (the codec stays fp32)")


def _runtime(args):
    from streamkd.runtime import RuntimeConfig

    return RuntimeConfig(device=getattr(args, "device", "auto"), precision=getattr(args, "precision", "fp32"))


def _placed(args, model):
    """``model`` on the device and in the precision of ``--device`` / ``--precision``."""
    from streamkd.runtime import place

    runtime = _runtime(args)
    return place(model, runtime.torch_device(), runtime.dtype)


def _sampling(args, model):
    from streamkd.generate import with_overrides
    from streamkd.bundle import CausalConfig

    sampling = with_overrides(model.cfg.sampling, kind=args.sampler, num_steps=args.steps, guidance_scale=args.guidance, shift=args.shift)
    if args.steps and sampling.sigmas is not None:  # explicit levels would override --steps
        from dataclasses import replace

        sampling = replace(sampling, sigmas=None)
    causal = model.cfg.causal
    if causal is None and args.causal:
        causal = CausalConfig()
    if causal is not None:
        from dataclasses import replace

        changes = {"chunk_frames": args.chunk_frames, "sink_frames": args.sink_frames, "window_frames": args.window_frames}
        causal = replace(causal, **{k: v for k, v in changes.items() if v is not None})
    elif any(v is not None for v in (args.chunk_frames, args.sink_frames, args.window_frames)):
        raise ValueError("--chunk-frames/--sink-frames/--window-frames need a causal checkpoint or --causal")
    return sampling, causal


def cmd_train(args) -> None:
    from streamkd import distributed
    from streamkd.config import load_config

    if args.what == "teacher":
        from streamkd.train.teacher import TeacherTrainConfig, TeacherTrainer

        cfg = load_config(TeacherTrainConfig, args.config, args.overrides)
        TeacherTrainer(cfg).train(progress=not args.no_progress)
        distributed.shutdown()


def cmd_distill(args) -> None:
    from streamkd import distributed
    from streamkd.config import load_config

    if args.what == "ode-pairs":
        from streamkd.distill.ode_pairs import ODEPairsConfig, generate_ode_pairs

        out = generate_ode_pairs(load_config(ODEPairsConfig, args.config, args.overrides), progress=not args.no_progress)
        print(f"ODE pairs in {out}")
    else:
        from streamkd.train.distill import DistillConfig, DistillTrainer

        cfg = load_config(DistillConfig, args.config, args.overrides)
        DistillTrainer(cfg).train(progress=not args.no_progress)
        distributed.shutdown()
        print(f"student: {cfg.out_dir}/final")


def cmd_export(args) -> None:
    import torch

    from streamkd.checkpoint import CheckpointError, latest_checkpoint, load_training_checkpoint
    from streamkd.config import deep_merge, from_dict, parse_overrides
    from streamkd.models.world import WorldModel
    from streamkd.train.teacher import TeacherTrainConfig

    if (args.run is None) == (args.checkpoint is None):
        raise ValueError("give one of --run (a training run's latest checkpoint) or --checkpoint (an inference checkpoint)")
    dtype = torch.float16 if args.fp16 else None
    if args.checkpoint is not None:
        if not args.diffusers:
            raise ValueError("--checkpoint is already an inference checkpoint: add --diffusers to export it to diffusers")
        if args.overrides:
            raise ValueError("overrides apply to --run exports; an inference checkpoint is exported as it is")
        model, source = _load(args, args.checkpoint), args.checkpoint
    else:
        folder = latest_checkpoint(args.run)
        if folder is None:
            raise CheckpointError(f"{args.run} holds no training checkpoint (checkpoints/latest is missing)")
        files, state = load_training_checkpoint(folder, [args.weights])
        if "student_config" in state and state["student_config"].get("kind") == "wan":  # a student of a Wan pipeline
            from streamkd.models.wan_model import WanModel, WanModelConfig

            model = WanModel(from_dict(WanModelConfig, deep_merge(state["student_config"], parse_overrides(args.overrides))))
        elif "student_config" in state:  # a distillation run: the student's own model config
            from streamkd.models.world import WorldModelConfig

            model = WorldModel(from_dict(WorldModelConfig, deep_merge(state["student_config"], parse_overrides(args.overrides))))
        else:
            model = WorldModel(from_dict(TeacherTrainConfig, deep_merge(state["config"], parse_overrides(args.overrides))).model)
        model.load_state_dict(files[args.weights])
        source = f"{args.weights} weights of {folder} (step {state['step']})"
    if args.diffusers:
        from streamkd.models.wan import export_wan_folder

        export_wan_folder(model.dit, args.out, dtype=dtype)
        print(f"exported the transformer of {source} to {args.out} (WanTransformer3DModel.from_pretrained; "
              "extras and what diffusers reproduces: streamkd_extras.json)")
        return
    model.save(args.out, dtype=dtype)
    print(f"exported {source} to {args.out}")


def _load(args, checkpoint: str):
    """The bundle of ``checkpoint`` with the Wan-only size/text flags of this command applied."""
    from streamkd.bundle import load_model
    from streamkd.models.wan_model import WanOptions

    wan = WanOptions(height=getattr(args, "height", None), width=getattr(args, "width", None),
                     negative_prompt=getattr(args, "negative_prompt", None))
    return _placed(args, load_model(checkpoint, wan=wan, pipeline=getattr(args, "pipeline", None)))


def _read_image(path: str, frame_hw: tuple[int, int]):
    """An image file as the uint8 first frame (image-to-video), resized and center-cropped to the model's size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"--image {path}: cannot read an image ({e})") from None
    H, W = frame_hw
    scale = max(H / image.height, W / image.width)
    image = image.resize((max(W, round(image.width * scale)), max(H, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - W) // 2, (image.height - H) // 2
    return np.array(image.crop((left, top, left + W, top + H)), dtype=np.uint8)  # a writable copy (torch.from_numpy)


def cmd_make_tiny_wan(args) -> None:
    from streamkd.models.tiny_wan import make_tiny_wan, make_tiny_wan_i2v

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; pick a new folder")
    if args.i2v:
        make_tiny_wan_i2v(out, seed=args.seed)
        print(f"wrote a tiny random Wan2.1 image-to-video pipeline to {out} (the text-to-video components plus "
              "image_encoder and image_processor)")
        return
    make_tiny_wan(out, seed=args.seed)
    print(f"wrote a tiny random Wan2.1 pipeline to {out} (model_index.json, transformer, vae, text_encoder, tokenizer, scheduler)")


def cmd_generate(args) -> None:
    from tqdm import tqdm

    from streamkd.bundle import latent_frames, pixel_frames
    from streamkd.data.actions import parse_action_spec
    from streamkd.generate import check_length, first_frame_for, generate_frames
    from streamkd.media.video import VideoWriter, check_output_path

    check_output_path(args.out)  # before any expensive work
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    model = _load(args, args.checkpoint)
    tf = model.codec.temporal_factor
    if args.frames is None:
        args.frames = pixel_frames(model.horizon_frames, tf)
    num_latent = latent_frames(args.frames, tf)
    if pixel_frames(num_latent, tf) != args.frames:
        raise ValueError(f"this model's codec is {tf}x in time: --frames must be 1 + {tf} k (e.g. "
                         f"{pixel_frames(num_latent - 1, tf)} or {pixel_frames(num_latent, tf)}), got {args.frames}")
    if model.num_actions:
        actions = parse_action_spec(args.actions, num_latent, model.action_names)
    elif args.actions != "none":
        raise ValueError(f"{args.checkpoint} takes no actions (its DiT has no action embedding); drop --actions")
    else:
        actions = [0] * num_latent
    sampling, causal = _sampling(args, model)
    if args.memory is not None:
        if causal is None:
            raise ValueError("--memory streams with world memory: it needs a causal checkpoint or --causal")
        from dataclasses import replace

        causal = replace(causal, memory=_memory_spec(args.memory))
    prompt = args.prompt
    model.encode_prompts([prompt])  # a prompt the encoder refuses fails here, before the video opens
    check_length(model, num_latent, causal)
    first = _read_image(args.image, model.frame_hw) if args.image else first_frame_for(model, args.seed, prompt)
    with VideoWriter(args.out, fps=args.fps) as writer, tqdm(total=args.frames, desc="frames", unit="f") as bar:
        for chunk in generate_frames(model, prompt=prompt, seed=args.seed, actions=actions, first_frame=first, sampling=sampling, causal=causal):
            writer.write(chunk)
            bar.update(len(chunk))
    print(f"wrote {args.frames} frames to {args.out}")


def _positive_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated positive integers, e.g. {flag} 10,50") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: give comma-separated positive integers, e.g. {flag} 10,50")
    return values


def _memory_spec(spec: str):
    """``window`` (no memory) or ``field=value,...`` of ``MemoryConfig`` (e.g. ``bank_frames=16,retrieve_frames=3``)."""
    from streamkd.cache.memory import MemoryConfig
    from streamkd.config import from_dict, parse_overrides

    if spec == "window":
        return None
    try:
        return from_dict(MemoryConfig, parse_overrides(spec.split(",")), path="memory")
    except ValueError as e:
        raise ValueError(f"--memory {spec!r}: {e}; write 'window' or field=value pairs separated by commas, "
                         "e.g. --memory compressed_frames=12,fine_frames=6") from None


def _report_from(args) -> None:
    """Tables and plots of a saved ``--json`` result, without evaluating again."""
    from streamkd.eval.figures import plot_revisits
    from streamkd.eval.run import markdown_report, plot_psnr_curves

    if args.checkpoint or args.grid or args.json:
        raise ValueError("--report-from re-renders a saved result: drop --checkpoint, --grid and --json")
    try:
        results = json.loads(Path(args.report_from).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--report-from {args.report_from}: cannot read a saved eval result ({e})") from None
    if not isinstance(results, dict) or not results:
        raise ValueError(f"--report-from {args.report_from}: not a streamkd eval result")
    if "fidelity_psnr" in results:  # a single checkpoint's result
        results = {Path(args.report_from).stem: results}
    report = markdown_report(results)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    if args.plot:
        plot_psnr_curves(results, args.plot)
    if args.revisit_plot:
        plot_revisits(results, args.revisit_plot)
    print(report)


def _eval_on_videos(args) -> None:
    """``eval --data``: image-to-video fidelity against held-out videos, with floor and ceiling."""
    from streamkd.eval.video import evaluate_on_videos

    results = {}
    for checkpoint in args.checkpoint:
        model = _load(args, checkpoint)
        sampling, causal = _sampling(args, model)
        results[checkpoint] = evaluate_on_videos(model, args.data, clips=args.episodes, seed=args.seed, sampling=sampling,
                                                 causal=causal).as_dict()
    lines = ["| checkpoint | video PSNR dB | floor (frame 0 copy) | ceiling (codec round trip) | gap closed |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['video_psnr']:.2f} | {r['floor']['video_psnr']:.2f} | {r['ceiling']['video_psnr']:.2f} | "
                     f"{r['gap_closed']:.2f} |")
    table = "\n".join(lines)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)


def cmd_eval(args) -> None:
    from dataclasses import replace

    from streamkd.eval.prompt_classifier import PromptClassifier
    from streamkd.eval.run import evaluate, markdown_report, plot_psnr_curves, wandering_frames
    from streamkd.models.world import WorldModel

    outs = [Path(p) for p in (args.json, args.markdown, args.plot, args.revisit_plot, args.grid, args.revisit_grid) if p]
    for out in outs:
        if not out.parent.is_dir():
            raise ValueError(f"{out}: folder {out.parent} does not exist; create it first")
    if args.report_from:
        _report_from(args)
        return
    if not args.checkpoint:
        raise ValueError("eval needs --checkpoint FOLDER (repeat to compare several), or --report-from RESULT.json")
    for flag in ("episodes", "drift_episodes", "untethered_episodes", "revisit_episodes", "t2v_episodes"):
        if (getattr(args, flag) or 0) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.episodes < 1:
        raise ValueError("--episodes must be >= 1")
    if args.data:
        _eval_on_videos(args)
        return
    asked_untethered = args.untethered not in (None, "auto")
    untethered = () if args.untethered in (None, "auto", "off") else _positive_ints(args.untethered, "--untethered")
    results, classifier, grid_rows, revisit_rows, revisit_cols = {}, None, {}, {}, []
    from streamkd.bundle import checkpoint_kind

    for checkpoint in args.checkpoint:
        if checkpoint_kind(checkpoint) != "toy":
            raise ValueError(f"{checkpoint} is a Wan model: the toy world's exact ground truth does not apply to it; measure "
                             "it against held-out videos with --data FOLDER (captioned videos, docs/data.md)")
    loaded = [(checkpoint, _placed(args, WorldModel.load(checkpoint))) for checkpoint in args.checkpoint]
    runs = [(checkpoint, model, *_sampling(args, model)) for checkpoint, model in loaded]
    if args.memory:  # one row per checkpoint and memory variant
        variants = [(spec, _memory_spec(spec)) for spec in args.memory]
        runs = [(f"{name} [{spec}]", model, sampling, replace(causal, memory=memory))
                for name, model, sampling, causal in runs if causal is not None for spec, memory in variants]
        if not runs:
            raise ValueError("--memory applies to streaming checkpoints: pass a causal checkpoint (or --causal)")
    if (asked_untethered and untethered or args.revisit_episodes) and all(causal is None for *_, causal in runs):
        names = ", ".join(args.checkpoint)
        raise ValueError(f"{names}: bidirectional (no causal config); --untethered and --revisit-episodes stream the "
                         "model: pass --causal to stream it, or drop them")
    for checkpoint, model, sampling, causal in runs:
        # in a comparison, streaming measurements apply to the checkpoints that stream
        classifier = classifier or PromptClassifier(model.cfg.world)
        streams = causal is not None
        frames = args.frames or model.cfg.horizon_frames
        multiples = () if not streams else untethered if asked_untethered else (10, 50, 200)
        revisits = (args.revisit_episodes if args.revisit_episodes is not None else 1) if streams else 0
        results[checkpoint] = evaluate(
            model, episodes=args.episodes, seed=args.seed, frames=frames, sampling=sampling, causal=causal,
            drift_episodes=args.drift_episodes, classifier=classifier, untethered_multiples=multiples,
            untethered_episodes=args.untethered_episodes, revisit_episodes=revisits,
            oracle_max_gap=args.oracle_max_gap if args.oracle_max_gap >= 0 else None, t2v_episodes=args.t2v_episodes,
        )
        if args.revisit_grid and streams:
            from streamkd.eval.revisit import observed_return

            out, truth, traj = observed_return(model, gap=8, index=args.seed + 2000, sampling=sampling, causal=causal)
            back = list(range(traj.return_start, len(truth), max(1, (len(truth) - traj.return_start) // 6)))[:6]
            revisit_rows.setdefault("ground truth", truth[back])
            revisit_rows[checkpoint] = out[back]
            revisit_cols = [f"{t}" for t in back]
        if args.grid:
            length = args.grid_frames if streams else min(args.grid_frames, model.cfg.horizon_frames)
            out, truth = wandering_frames(model, args.seed + 4000, length, sampling, causal)
            if len(truth) > len(grid_rows.get("ground truth", ())):
                grid_rows["ground truth"] = truth
            grid_rows[checkpoint] = out
    single = next(iter(results.values())) if len(results) == 1 else results  # keyed by run name
    text = json.dumps(single, indent=2)
    report = markdown_report(results)
    for path, content in ((args.json, text), (args.markdown, report)):
        if path:
            tmp = Path(path).with_name(f".{Path(path).name}.tmp")
            tmp.write_text(content + "\n")
            tmp.replace(path)
    if args.plot:
        plot_psnr_curves(results, args.plot)
    if args.revisit_plot:
        from streamkd.eval.figures import plot_revisits

        if not any("revisit" in r for r in results.values()):
            raise ValueError("--revisit-plot needs revisit figures: a causal checkpoint and --revisit-episodes >= 1")
        plot_revisits(results, args.revisit_plot)
    if args.revisit_grid:
        from streamkd.eval.figures import frame_grid

        if not revisit_rows:
            raise ValueError("--revisit-grid needs a causal checkpoint (or --causal)")
        frame_grid(revisit_rows, list(range(len(revisit_cols))), args.revisit_grid, titles=[f"frame {c}" for c in revisit_cols])
    if args.grid:
        from streamkd.eval.figures import frame_grid

        n = args.grid_frames
        # columns inside the shortest row (a bidirectional model's horizon), then along the walk
        short = min(len(frames) for frames in grid_rows.values())
        frame_grid(grid_rows, sorted({0, short // 2, short - 1, n // 4, n // 2, 3 * n // 4, n - 1}), args.grid)
    print(report)


def cmd_bench(args) -> None:
    from streamkd import bench

    table = None  # the memory benches print a markdown table; the others their JSON
    if args.what == "stream":
        if not args.checkpoint:
            raise ValueError("bench stream needs --checkpoint FOLDER")
        model = _load(args, args.checkpoint)  # any causal bundle: toy or a Wan student
        sampling, causal = _sampling(args, model)
        result = bench.bench_stream(model, sampling, causal, milestones=args.milestones or [100, 1000, 10000])
    elif args.what == "memory":
        from streamkd.models.world import WorldModel

        if not args.checkpoint:
            raise ValueError("bench memory needs --checkpoint FOLDER (e.g. toy-student-fast)")
        model = _placed(args, WorldModel.load(args.checkpoint))
        sampling, causal = _sampling(args, model)
        result = bench.bench_memory(model, causal, frames=tuple(args.milestones or (1000, 10000)), sampling=sampling)
        table = bench.bench_memory_markdown(result)
    elif args.what == "memory-plan":
        from streamkd.cache.plan import assumptions, markdown, memory_plan_table

        rows = memory_plan_table()
        table = markdown(rows)
        result = {"rows": rows, "assumptions": assumptions(rows)}
    elif args.what == "shapes":
        from streamkd.models.world import WorldModel

        result = bench.bench_student_shapes(WorldModel.load(args.checkpoint or "toy-teacher"))
    elif args.what == "distill":
        from streamkd.config import load_config
        from streamkd.train.distill import DistillConfig

        if not args.config:
            raise ValueError("bench distill needs --config (e.g. configs/toyworld/distill_dmd.yaml)")
        result = bench.bench_distill_memory(load_config(DistillConfig, args.config, args.overrides), args.multiples)
    else:
        from streamkd.config import load_config
        from streamkd.train.teacher import TeacherTrainConfig

        if not args.config:
            raise ValueError("bench train needs --config (e.g. configs/toyworld/teacher.yaml)")
        result = bench.bench_train(load_config(TeacherTrainConfig, args.config, args.overrides), steps=args.train_steps)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(table or text)


def cmd_data(args) -> None:
    if args.what == "toy-videos":
        from streamkd.data.video import write_toy_videos

        if args.clips is None:
            raise ValueError("data toy-videos needs --clips N (episodes to write)")
        frames = args.frames or 16
        paths = write_toy_videos(args.out, args.clips, num_frames=frames, base_seed=args.seed, fps=args.fps or 16)
        print(f"wrote {len(paths)} toy-world episodes of {frames} frames to {args.out} "
              "(clip-NNNNN.mp4 + .txt caption + .actions.json)")
        return
    from streamkd.bundle import load_model, pixel_frames
    from streamkd.data.shards import encode_shards
    from streamkd.data.video import VideoClipDataset
    from streamkd.models.wan_model import WanOptions

    if not args.data or not args.checkpoint:
        raise ValueError("data encode needs --data (a folder of videos or a .csv/.jsonl manifest) and --checkpoint "
                         "(the model whose codec and text encoder encode them)")
    wan = WanOptions(height=args.height, width=args.width, negative_prompt=args.negative_prompt)
    model = load_model(args.checkpoint, device=args.device, wan=wan, pipeline=args.pipeline)
    frames = args.frames or pixel_frames(model.horizon_frames, model.codec.temporal_factor)
    H, W = model.frame_hw
    dataset = VideoClipDataset(args.data, frames, H, W, fps=args.fps, stride=args.stride, decoder=args.decoder,
                               on_error=args.on_error)
    # how the clips were made: a rerun into the same --out resumes only when these are unchanged
    settings = {"data": str(Path(args.data).resolve()), "frames": frames, "height": H, "width": W, "fps": args.fps,
                "stride": args.stride}
    index = encode_shards(dataset, model, args.out, clips_per_shard=args.clips_per_shard, settings=settings,
                          checkpoint=str(args.checkpoint), progress=not args.no_progress)
    print(json.dumps({"out": args.out, "clips": index["clips"], "shards": len(index["shards"]),
                      "skipped": len(index["skipped"]), "latent_shape": index["latent_shape"],
                      "context_shape": index["context_shape"]}))


def cmd_serve(args) -> None:
    import os

    import torch

    from streamkd.serve.engine import EngineConfig
    from streamkd.serve.server import ServerConfig, run

    threads = args.threads or torch.get_num_threads()
    engine = EngineConfig(max_sessions=args.max_sessions, max_batch=args.max_batch, threads=threads)
    cfg = ServerConfig(host=args.host, port=args.port, token=args.token or os.environ.get("STREAMKD_TOKEN"),
                       origins=tuple(args.origins), idle_timeout_s=args.idle_timeout, send_timeout_s=args.send_timeout,
                       shutdown_timeout_s=args.shutdown_timeout, engine=engine)
    # All model work runs on the engine's worker thread, with ``threads`` OpenMP threads. The main
    # thread (model loading, the event loop) keeps one: an OpenMP team formed on it stays alive,
    # and with more OpenMP threads than cores libgomp stops spin-waiting, so every small parallel
    # op of the worker pays a futex wake-up (measured: ~1.7x slower chunks on 2 cores).
    extra = {} if args.memory is None else {"memory": _memory_spec(args.memory)}
    if args.pipeline is not None:
        extra["pipeline"] = args.pipeline
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(cfg, args.checkpoint, oracle=args.world_oracle, runtime=_runtime(args), **extra)
    finally:
        torch.set_num_threads(previous)


def cmd_client(args) -> None:
    import asyncio
    import os

    from streamkd.data.actions import parse_action_spec
    from streamkd.data.toyworld import parse_prompt
    from streamkd.media.video import check_output_path
    from streamkd.serve.client import ServerError, record

    check_output_path(args.out)
    if args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    actions = parse_action_spec(args.actions, args.frames)
    prompt = parse_prompt(args.prompt).prompt
    try:
        summary = asyncio.run(record(args.url, prompt=prompt, seed=args.seed, actions=actions, num_frames=args.frames,
                                     out=args.out, token=args.token or os.environ.get("STREAMKD_TOKEN"),
                                     codec=args.codec, fps=args.fps))
    except ServerError as e:
        raise ValueError(f"server: {e}") from None
    print(json.dumps(summary))
    print(f"wrote {summary['frames']} frames to {args.out}")


def cmd_quickstart(args) -> None:
    from streamkd.quickstart import run

    print(run(args.out_dir, args.episodes, args.long_frames, teacher=args.teacher))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamkd",
        description="Distil video diffusion teachers into causal, few-step, streaming world models (toy world built in).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train a model from a YAML config (+ key.sub=value overrides)",
        epilog="Any number of key.sub=value overrides may follow, e.g. max_steps=100 model.dit.num_layers=4",
    )
    p.add_argument("what", choices=["teacher"], help="what to train")
    p.add_argument("--config", required=True, help="YAML file under configs/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to the run folder)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "distill", help="distillation: sample ODE pairs from the teacher, or train the student (ode / dmd)",
        epilog="key.sub=value overrides may follow, e.g. max_steps=50 causal.window_frames=9",
    )
    p.add_argument("what", choices=["ode-pairs", "train"])
    p.add_argument("--config", required=True, help="YAML under configs/toyworld/")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "export", help="turn a training run's latest checkpoint into an inference checkpoint",
        epilog="key.sub=value overrides of the run's config may follow, e.g. model.sampling.shift=3",
    )
    p.add_argument("--run", help="training run folder (holds checkpoints/latest)")
    p.add_argument("--checkpoint", help="an inference checkpoint to export with --diffusers (instead of --run)")
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.add_argument("--diffusers", action="store_true",
                   help="write the transformer as a diffusers WanTransformer3DModel folder (action weights beside it)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to export")
    p.add_argument("--fp16", action="store_true", help="store float weights in fp16 (half the size)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("make-tiny-wan", help="write a tiny random diffusers Wan2.1 pipeline folder (the real-model path's "
                                             "test bed; nothing downloaded)")
    p.add_argument("--out", required=True, help="folder to create (WanPipeline.save_pretrained layout)")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--i2v", action="store_true", help="a WanImageToVideoPipeline folder (with a tiny CLIP image encoder)")
    p.set_defaults(func=cmd_make_tiny_wan)

    p = sub.add_parser("generate", help="render a video from a checkpoint (offline, any length for causal models)")
    p.add_argument("--checkpoint", default="toy-student",
                   help="checkpoint folder (config.json + model.safetensors) or shipped name (default: toy-student)")
    p.add_argument("--prompt", required=True, help="the prompt: the toy world's grammar ('forest with red squares'), free text for Wan models")
    p.add_argument("--seed", type=int, default=0, help="toy-world episode (first frame) and sampling seed")
    p.add_argument("--actions", default="none", help="action spec 'right:16,up:8,none:4' (repeats to fill) or a file")
    p.add_argument("--frames", type=int, help="frames to generate (default: the model's horizon, 12 for the toy world; "
                                               "1 + 4k for Wan's VAE)")
    p.add_argument("--out", required=True, help="output .mp4 (H.264)")
    p.add_argument("--fps", type=int, default=16, help="frames per second of the mp4")
    p.add_argument("--memory", help="world memory for this stream: 'window' (none) or MemoryConfig fields, e.g. "
                                    "bank_frames=16,retrieve_frames=3 (default: the checkpoint's causal.memory)")
    p.add_argument("--image", help="first frame from an image file (image-to-video; default: the toy world's frame 0, "
                                   "none for Wan models: text-to-video)")
    _add_wan_args(p)
    _add_sampling_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "quickstart", help="the main job on the toy world: distil the teacher (quickstart preset), eval table, long stream"
    )
    p.add_argument("--teacher", default="toy-teacher", help="teacher checkpoint folder or a shipped name")
    p.add_argument("--out-dir", default="outputs/quickstart", help="where the mp4 files go")
    p.add_argument("--episodes", type=int, default=8, help="held-out episodes for the eval table")
    p.add_argument("--long-frames", type=int, default=480, help="frames of the long causal stream")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("serve", help="real-time websocket server: browser client at /, protocol at /ws, /healthz")
    p.add_argument("--checkpoint", default="toy-student", help="causal checkpoint folder or shipped name (toy-student)")
    p.add_argument("--pipeline", help="a Wan student's pipeline folder (VAE, text encoder), if it moved")
    p.add_argument("--memory", help="world memory for every session: 'window' (none) or MemoryConfig fields, e.g. "
                                    "bank_frames=16,retrieve_frames=3 (default: the checkpoint's causal.memory)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; anything but loopback needs --token")
    p.add_argument("--port", type=int, default=8765, help="TCP port for HTTP and the websocket")
    p.add_argument("--token", help="shared secret clients send in hello (default: $STREAMKD_TOKEN)")
    p.add_argument("--origins", nargs="+", default=[], metavar="ORIGIN",
                   help="extra browser origins allowed to connect, e.g. http://myhost:8000 (the server's own always is)")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (more get close code 1013)")
    p.add_argument("--max-batch", type=int, default=8, help="most sessions batched into one forward")
    p.add_argument("--idle-timeout", type=float, default=120.0, help="seconds without a client message before closing")
    p.add_argument("--send-timeout", type=float, default=10.0,
                   help="deadline of every wait on a client's socket (send, ping, close); past it the connection is aborted")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="on SIGTERM, abort connections still open after this many seconds (a second SIGTERM: at once)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the generation worker (0: torch's default)")
    p.add_argument("--world-oracle", action="store_true",
                   help="serve the toy world's exact renderer instead of a model (client development; no checkpoint)")
    _add_device_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="stream from a running server into an mp4, sending actions live")
    p.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="websocket URL of streamkd serve")
    p.add_argument("--token", help="server token (default: $STREAMKD_TOKEN)")
    p.add_argument("--prompt", default="forest with red squares", help="style prompt")
    p.add_argument("--seed", type=int, default=0, help="toy-world episode (first frame) and sampling seed")
    p.add_argument("--actions", default="none", help="action spec 'right:16,up:8' (repeats to fill) or a file")
    p.add_argument("--frames", type=int, default=48, help="frames to record")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--codec", choices=["jpeg", "h264"], default="jpeg", help="codec on the wire")
    p.add_argument("--fps", type=float, default=16.0, help="stream pace and mp4 frame rate")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("eval", help="measure checkpoints against toy-world ground truth (held-out seeds)")
    p.add_argument("--checkpoint", action="append", help="checkpoint (repeat to compare several)")
    p.add_argument("--report-from", help="re-render the tables/plots of a saved --json result instead of evaluating")
    p.add_argument("--episodes", type=int, default=16, help="held-out episodes (with --data: videos)")
    p.add_argument("--data", help="held-out captioned videos (folder or manifest, docs/data.md): image-to-video fidelity "
                                  "against them, with floor and ceiling -- the ground truth of real (Wan) models")
    p.add_argument("--seed", type=int, default=0, help="index of the first held-out episode")
    p.add_argument("--frames", type=int, default=0, help="frames per episode (default: the model's horizon)")
    p.add_argument("--drift-episodes", type=int, default=4, help="tethered episodes for drift_psnr (causal runs)")
    p.add_argument("--untethered", default="auto",
                   help="untethered drift windows, in horizons, e.g. 10,50 (default auto: 10,50,200 for causal runs; off)")
    p.add_argument("--untethered-episodes", type=int, default=2, help="random-action episodes for untethered drift")
    p.add_argument("--revisit-episodes", type=int, default=None,
                   help="revisit trajectories per gap (default: 1 for causal runs, 0 otherwise)")
    p.add_argument("--oracle-max-gap", type=int, default=8,
                   help="run the full-KV oracle on revisit gaps up to this (cost grows with the square; -1: never)")
    p.add_argument("--t2v-episodes", type=int, default=4, help="text-to-video episodes (no first frame)")
    p.add_argument("--memory", action="append",
                   help="evaluate each causal checkpoint with this memory (repeat for a side-by-side table): "
                        "'window' or MemoryConfig fields, e.g. bank_frames=16,retrieve_frames=3")
    p.add_argument("--json", help="write the result(s) here as JSON")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--plot", help="write the PSNR-vs-frame plot here (PNG)")
    p.add_argument("--revisit-plot", help="write revisit PSNR against the gap here (PNG)")
    p.add_argument("--grid", help="write a PNG: ground truth beside each checkpoint along a wandering camera")
    p.add_argument("--grid-frames", type=int, default=96, help="length of the --grid episode")
    p.add_argument("--revisit-grid", help="write a PNG: ground truth beside each run along the way back of one "
                                          "observed revisit (gap 8: the place left the cache long ago)")
    _add_sampling_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench", help="benchmarks: stream (latency/memory vs length), train (samples/s), distill (step memory vs rollout), "
        "shapes (student frames/s by depth/steps/chunking against the teacher), memory (world-memory variants of "
        "one stream: latency, bytes per tier, pages, gathered bytes), memory-plan (world memory at Wan2.1 scale, "
        "from shapes)"
    )
    p.add_argument("what", choices=["stream", "train", "distill", "shapes", "memory", "memory-plan"])
    p.add_argument("--checkpoint", help="bench stream / memory: checkpoint folder; bench shapes: the teacher (default toy-teacher)")
    p.add_argument("--milestones", type=int, nargs="+",
                   help="bench stream: frame counts (default 100 1000 10000); bench memory: (default 1000 10000)")
    p.add_argument("--config", help="bench train / distill: YAML config")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4],
                   help="bench distill: rollout lengths in teacher horizons")
    p.add_argument("--train-steps", type=int, default=10, help="bench train: optimizer steps to time")
    p.add_argument("--json", help="write the result here as well")
    _add_sampling_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "data", help="datasets: encode (videos -> latent + prompt-embedding shards that trainers read instead of "
        "decoding), toy-videos (toy-world episodes as an mp4 folder with captions and actions)"
    )
    p.add_argument("what", choices=["encode", "toy-videos"])
    p.add_argument("--out", required=True, help="encode: shard folder (rerun into it to resume); toy-videos: video folder")
    p.add_argument("--data", help="encode: a folder of videos with <name>.txt captions, or a .csv/.jsonl manifest")
    p.add_argument("--checkpoint", help="encode: the model whose codec and text encoder encode the clips (a streamkd "
                                        "checkpoint, shipped name, or diffusers Wan pipeline folder)")
    p.add_argument("--frames", type=int, help="frames per clip (encode default: the model's horizon, 1 + 4k for Wan's "
                                              "VAE; toy-videos default: 16)")
    p.add_argument("--fps", type=float, help="encode: resample videos to this rate (default: each file's own); "
                                             "toy-videos: the mp4 rate (default 16)")
    p.add_argument("--stride", type=int, default=1, help="encode: take every stride-th frame after resampling")
    p.add_argument("--clips-per-shard", type=int, default=64, help="encode: clips per shard file")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="encode: stop at the first unreadable video, or skip it and record it in index.json")
    p.add_argument("--decoder", choices=["auto", "decord", "av"], default="auto", help="encode: video decoder")
    p.add_argument("--device", default="cpu", help="encode: where the codec and text encoder run (e.g. cuda)")
    p.add_argument("--no-progress", action="store_true", help="encode: no progress bar")
    p.add_argument("--clips", type=int, help="toy-videos: episodes to write")
    p.add_argument("--seed", type=int, default=0, help="toy-videos: base seed of the episodes")
    _add_wan_args(p)
    p.set_defaults(func=cmd_data)

    # listed here for --help; main() hands its arguments to streamkd.gpu_check, which parses them
    sub.add_parser("gpu-check", add_help=False,
                   help="on a CUDA machine, in under 10 minutes: compiled-kernel tests, kernel benchmark, a "
                        "Wan2.1-1.3B-shaped student streaming at 480x832 and one DMD step, as JSON (--tiny: toy sizes, CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-check"]:  # its own parser and exit codes (also: python -m streamkd.gpu_check)
        from streamkd.gpu_check import main as gpu_check

        return gpu_check(argv[1:])
    # the `deepspeed` launcher appends --local_rank=N to every worker's arguments; the same number
    # is in $LOCAL_RANK, which is what streamkd reads
    argv = [a for a in argv if not a.startswith("--local_rank=")]
    parser = build_parser()
    # key.sub=value overrides may sit anywhere after the subcommand, so they are collected from
    # what argparse does not know
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad or (extra and args.command not in ("train", "bench", "export", "distill")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)} (config overrides look like key.sub=value)")
    args.overrides = extra
    try:
        args.func(args)
        if args.command in ("train", "distill"):
            from streamkd import distributed

            distributed.exit_worker(0)  # under torchrun only: skip an unsafe teardown (see there)
    except (ValueError, OSError, ArithmeticError) as e:
        # user-facing errors are ValueError subclasses (ConfigError, CheckpointError, ActionSpecError,
        # OutputPathError, ...); OSError covers unreadable/unwritable paths; ArithmeticError is a
        # training loss gone non-finite. Anything else is a bug and keeps its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
