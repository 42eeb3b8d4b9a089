"""GPU check, one command: what a machine with a CUDA GPU can tell us, in one run of under ten minutes.

    streamkd gpu-check --out gpu-check/                 # on a CUDA machine
    python -m streamkd.gpu_check --out gpu-check/       # the same
    streamkd gpu-check --tiny --out /tmp/gpu-check      # the same code paths at toy sizes, on CPU (CI)

Without a CUDA device (and without ``--tiny``) it prints one line and exits 0.

Sections, each written to ``--out`` as soon as it ends (``<section>.json``, plus ``summary.json``
rewritten after every section, so a run killed half-way keeps what it measured):

    a_kernel_tests   pytest on tests/test_sparse_kernel.py (with CUDA present every test there runs
                     the compiled Triton kernel) and on every other test marked ``gpu``; counts from
                     pytest's JUnit XML. ``--tiny`` runs only the ``gpu``-marked kernel tests, which
                     skip without CUDA (the interpreted kernel tests belong to the normal suite).
    b_kernel_bench   ``streamkd.kernels.bench_gpu`` (Triton block-sparse vs dense SDPA vs compiled
                     flex_attention) on a reduced grid, one sequence length at a time so that a cut-off
                     run keeps the lengths already measured; interpreted at a tiny size on CPU.
    c_stream         a Wan2.1-1.3B-shaped student with random weights (dim 1536, 30 layers, 12 heads,
                     FFN 8960, text width 4096, patch 1x2x2) streaming at 480x832 (latent 60x104, 1,560
                     tokens per latent frame) through ``StreamGenerator``, DiT in bf16, Self-Forcing's settings
                     (chunks of 3 latent frames, sigmas 1 / .9375 / .8333 / .625, 3 sink + 12 window
                     frames), decoded by a random-weight ``AutoencoderKLWan`` of Wan2.1's shape (fp32, as
                     ``streamkd.runtime`` places codecs): denoise and end-to-end FPS, first-frame latency,
                     KV bytes per tier, without and with memory (compressed tier + bank).
    d_distill_step   one self-forcing DMD step (student rollout with gradient, teacher with CFG, critic;
                     both optimizers) built by ``DistillTrainer`` from configs/wan2.1-t2v-1.3b/
                     distill_dmd.yaml pointed at a saved random-weight pipeline folder, bf16 with fp32
                     master weights (``runtime:``): step time and peak memory. When it runs out of device
                     memory it is measured again with activation checkpointing, then with every model
                     cut to 10 layers, and the JSON says which attempt ran out and at what peak.

The models come from a diffusers pipeline folder written here with random weights (the classes a
real ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` folder names, the loading path users take), except the
text encoder: a 1-layer UMT5 with UMT5-XXL's output width (4096) instead of the 11 GB original.
Prompts are encoded once per stream, when it starts: of the figures, only the first-frame latency
would grow, by UMT5-XXL's encode time.

Every figure is ``{"value", "unit", "counts"}``: ``counts`` says what was counted. A failing section
records its error (and whatever figures it had) and the run goes on; each section runs under an
alarm at the earlier of its own cap and the run's deadline (``--budget-s``), and sections left when
the deadline has passed are recorded as skipped. Timings on CUDA are taken between
``torch.cuda.synchronize()`` calls; warm-up is run first and left out of steady-state figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from streamkd.bench import _cache_figures
from streamkd.bundle import CausalConfig, load_model
from streamkd.cache.memory import MemoryConfig
from streamkd.config import load_config, to_dict
from streamkd.kernels import bench_gpu
from streamkd.kernels.bench_dit import WAN21_T2V_1_3B
from streamkd.models.tiny_wan import TINY_TEXT, TINY_TRANSFORMER, TINY_VAE, make_tokenizer
from streamkd.models.wan_model import WanOptions
from streamkd.runtime import place
from streamkd.sampling.schedule import FewStepSampler
from streamkd.sampling.stream import StreamGenerator
from streamkd.train.distill import DistillConfig, DistillTrainer

REPO = Path(__file__).resolve().parent.parent
"""The checkout this module runs from (tests/ and configs/ are read from it)."""

KERNEL_TESTS = "tests/test_sparse_kernel.py"

SIGMAS = [1.0, 0.9375, 0.8333333, 0.625]
"""Self-Forcing's four denoising levels (configs/wan2.1-t2v-1.3b/distill_dmd.yaml)."""

PROMPTS = [
    "a red fox walks through a snowy forest at sunrise, cinematic shot",
    "aerial view of waves breaking on a sand beach",
    "a city street at night in the rain, light from the shop windows",
    "a horse runs across a green field under a cloud sky",
]

GIB = 2**30

WAN21_1_3B_TRANSFORMER = {k: v for k, v in WAN21_T2V_1_3B.items() if k != "_class_name"}
"""``WanTransformer3DModel`` arguments of Wan2.1-T2V-1.3B (the rest are diffusers' defaults)."""

WIDE_TINY_TEXT = dict(d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="gated-gelu")
"""A 1-layer UMT5 encoder whose output has UMT5-XXL's width, the DiT's ``text_dim``."""


@dataclass
class Scale:
    """The sizes one run uses: Wan2.1-1.3B's on a GPU, toy ones with ``--tiny``."""
    name: str
    transformer: dict
    """``WanTransformer3DModel`` arguments of the random pipeline folder."""
    vae: dict
    """``AutoencoderKLWan`` arguments ({}: diffusers' defaults, Wan2.1's VAE)."""
    text: dict
    """``UMT5Config`` fields of the text encoder (``d_model`` = the transformer's ``text_dim``)."""
    height: int
    width: int
    horizon_frames: int
    max_text_length: int
    causal: dict
    """``CausalConfig`` fields of the streams (chunk, sinks, window)."""
    memory: dict
    """``MemoryConfig`` fields of the stream with memory."""
    warmup_chunks: int
    stream_chunks: int
    """Chunks of each measured stream; those after the sinks and window are full are steady state."""
    distill_config: str
    """Under configs/: the distillation recipe of section d."""
    distill_attempts: tuple[tuple[int, bool], ...]
    """(layers, activation checkpointing) tried in turn for section d until one fits the device."""
    kernel_tests: tuple[tuple[str, tuple[str, ...]], ...]
    """(name, pytest arguments) of each pytest run of section a."""
    bench_lengths: tuple[int, ...]
    bench_argv: tuple[str, ...]
    """``streamkd.kernels.bench_gpu`` arguments besides --lengths and --device."""


WAN_1_3B = Scale(
    name="wan2.1-1.3b",
    transformer=WAN21_1_3B_TRANSFORMER, vae={}, text=WIDE_TINY_TEXT,
    height=480, width=832, horizon_frames=21, max_text_length=512,
    causal=dict(chunk_frames=3, sink_frames=3, window_frames=12),
    # one pooling level: the 30 x 52 token grid is divisible by 2, not by the 4 of two levels
    memory=dict(compressed_frames=12, fine_frames=12, pool=2, bank_frames=16, retrieve_frames=3),
    warmup_chunks=2, stream_chunks=10,
    distill_config="wan2.1-t2v-1.3b/distill_dmd.yaml",
    # the recipe as it is; then activation checkpointing; then a third of the depth
    distill_attempts=((30, False), (30, True), (10, True)),
    kernel_tests=(("kernel_file", (KERNEL_TESTS,)), ("gpu_marked", ("-m", "gpu", "tests", f"--ignore={KERNEL_TESTS}"))),
    bench_lengths=(16384, 32768),
    bench_argv=("--head-dims", "128", "--sparsity", "0", "0.5", "0.75", "0.9", "--repeats", "5"),
)


TINY = Scale(
    name="tiny",
    transformer=TINY_TRANSFORMER, vae=TINY_VAE, text=TINY_TEXT,
    # 32 x 64 pixels: a 2 x 4 token grid, which the compressed tier's 2 x 2 pooling divides
    height=32, width=64, horizon_frames=6, max_text_length=48,
    causal=dict(chunk_frames=3, sink_frames=3, window_frames=3),
    memory=dict(compressed_frames=3, fine_frames=3, pool=2, bank_frames=4, retrieve_frames=2),
    warmup_chunks=1, stream_chunks=4,
    distill_config="tiny-wan/distill_dmd.yaml", distill_attempts=((TINY_TRANSFORMER["num_layers"], False),),
    kernel_tests=(("gpu_marked", ("-m", "gpu", KERNEL_TESTS)),),
    bench_lengths=(128,),
    bench_argv=("--head-dims", "32", "--width", "64", "--block", "32", "--sparsity", "0", "0.5", "--repeats", "1",
                "--passes", "fwd", "--no-flex"),
)
"""Toy sizes (``--tiny``): every code path of the full check, on a CPU in seconds."""


def figure(value, unit: str, counts: str) -> dict:
    return {"value": value, "unit": unit, "counts": counts}


def _error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]}


class Deadline(BaseException):
    """Raised by the alarm in the running section. A BaseException, so that no ``except Exception``
    on the way (library code, the OOM retry of section d) can swallow it."""


# ----------------------------------------------------------------------------------- the run
class Check:
    """What the sections share: device, sizes, output folder, and the random pipeline folders
    (written on first use, kept for the run in a temporary work folder)."""

    def __init__(self, scale: Scale, device: str, out: Path, work: Path) -> None:
        self.scale, self.out, self.work = scale, out, work
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # bf16 is the GPU's inference precision; CPU bf16 matmuls are slow and not what CPUs run
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self._pipelines: dict[int, Path] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def pipeline(self, num_layers: int) -> Path:
        """A random-weight Wan pipeline folder with ``num_layers`` transformer blocks."""
        if num_layers not in self._pipelines:
            folder = self.work / f"pipeline-{num_layers}-layers"
            write_random_pipeline(folder, dict(self.scale.transformer, num_layers=num_layers), self.scale.vae,
                                  self.scale.text, self.device)
            self._pipelines[num_layers] = folder
        return self._pipelines[num_layers]

    def prompt_file(self) -> Path:
        path = self.work / "prompts.txt"
        if not path.is_file():
            path.write_text("\n".join(PROMPTS) + "\n")
        return path


def write_random_pipeline(folder: Path, transformer: dict, vae: dict, text: dict, device, seed: int = 0) -> Path:
    """A diffusers ``WanPipeline`` folder with random weights (``streamkd.models.tiny_wan``'s layout
    and tokenizer, any sizes), in float32 as Wan2.1's diffusers folders store them."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    # built on the device: a random init of 1.3B parameters takes seconds there, a minute on a CPU
    with torch.device(device):
        dit = WanTransformer3DModel(**transformer)
        codec = AutoencoderKLWan(**vae)
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                              decoder_start_token_id=0, **text))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder.eval(), vae=codec.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=dit.eval())
    pipe.save_pretrained(str(folder))
    del pipe, dit, codec, encoder
    _free(device)
    return folder


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- a: kernel tests
def _junit_counts(path: Path) -> dict:
    """Totals of a pytest JUnit XML file, and the ids of the tests that failed or errored."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    return {**totals, "passed": totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"], "bad": bad}


def run_kernel_tests(check: Check, rec: dict) -> None:
    if not (REPO / KERNEL_TESTS).is_file():
        raise FileNotFoundError(f"{REPO / KERNEL_TESTS} is missing: run the check from a streamkd checkout "
                                "(pip install -e .), where tests/ is")
    for name, selection in check.scale.kernel_tests:
        xml = check.out / f"a_{name}.junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *selection]
        t0 = time.perf_counter()
        # the tests see the device the check runs on (--device cpu on a GPU machine hides the GPU)
        env = dict(os.environ, **({} if check.cuda else {"CUDA_VISIBLE_DEVICES": ""}))
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        rec["setup"][name] = {"command": " ".join(cmd[2:]), "exit_code": proc.returncode, "output_tail": proc.stdout[-3000:]}
        if not xml.is_file():
            raise RuntimeError(f"pytest {' '.join(selection)} wrote no report (exit code {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-1500:]}")
        c = _junit_counts(xml)
        where = f"pytest {' '.join(selection)}"
        rec["figures"][name] = {
            "passed": figure(c["passed"], "tests", f"{where}: tests that passed"),
            "failed": figure(c["failures"], "tests", f"{where}: tests that failed an assertion"),
            "errors": figure(c["errors"], "tests", f"{where}: tests that raised outside an assertion, or collection errors"),
            "skipped": figure(c["skipped"], "tests", f"{where}: tests skipped (e.g. those marked gpu, when CUDA is absent)"),
            "seconds": figure(seconds, "s", f"{where}: wall time of the pytest process, collection and kernel "
                                            "compilation included"),
        }
        rec["setup"][name]["failed_tests"] = c["bad"]
    rec["headline"] = {f"{name}_{k}": rec["figures"][name][k] for name, _ in check.scale.kernel_tests
                       for k in ("passed", "failed", "errors", "skipped")}
    if any(rec["figures"][name][k]["value"] for name, _ in check.scale.kernel_tests for k in ("failed", "errors")):
        raise AssertionError("kernel tests failed: " + ", ".join(b for name in rec["setup"]
                                                                  for b in rec["setup"][name]["failed_tests"]))


# ----------------------------------------------------------------------- b: kernel benchmark
BENCH_COUNTS = {
    "sdpa_ms": ("ms", "dense scaled_dot_product_attention (the backend torch picks), median of --repeats after warm-up"),
    "triton_ms": ("ms", "streamkd::block_sparse_attn (Triton), same layout, median of --repeats after warm-up and compilation"),
    "flex_ms": ("ms", "torch.compile(flex_attention) with the same blocks as full blocks, median after compilation"),
    "tflops": ("TFLOP/s", "effective TFLOP/s of the Triton kernel: FLOPs of the kept blocks (4 L S D H density forward, "
                          "2.5x that backward) per second"),
    "of_ideal": ("ratio", "(sdpa_ms / triton_ms) x density: 1.0 = the ideal speed-up 1 / density"),
}


def run_kernel_bench(check: Check, rec: dict) -> None:
    rec["setup"] = {"argv": list(check.scale.bench_argv), "lengths": list(check.scale.bench_lengths),
                    "what": "streamkd.kernels.bench_gpu: B = 1, heads = width / head dim, random block layout with "
                            "exactly round((1 - sparsity) N) kv blocks per q-block shared by every path"}
    if not check.cuda:
        rec["setup"]["note"] = "CPU tensors under TRITON_INTERPRET=1: checks the code path; the timings mean nothing"
    for L in check.scale.bench_lengths:  # one length per call: a run cut off at the deadline keeps the lengths done
        for row in bench_gpu.main(["--device", str(check.device), "--lengths", str(L), *check.scale.bench_argv]):
            key = f"L{row['L']}_D{row['D']}_sparsity{row['sparsity']:g}_{row['pass_']}"
            rec["figures"][key] = {name: figure(row[name], unit, f"{row['pass_']} at L = {row['L']}, D = {row['D']}, "
                                                f"{row['heads']} heads, sparsity {row['sparsity']:g}: {text}")
                                   for name, (unit, text) in BENCH_COUNTS.items() if row[name] is not None}
            if row["pass_"] == "fwd":  # headline: the forward pass at the longest length and the highest sparsity
                rec["headline"] = {f"{key}_{name}": rec["figures"][key][name] for name in ("triton_ms", "of_ideal")}


# ------------------------------------------------------------------------------- c: streaming
def _stream_figures(check: Check, model, causal, label: str) -> dict:
    """One warm-up stream, then one measured stream of ``stream_chunks`` chunks."""
    scale, F = check.scale, causal.chunk_frames
    stream = StreamGenerator(model, FewStepSampler(SIGMAS), causal=causal)
    fill = -(-(causal.sink_frames + causal.window_frames) // F)  # chunks until sinks and window are full
    steady = range(fill, scale.stream_chunks)
    assert len(steady) > 0, "stream_chunks must go past the chunks that fill the cache"
    with torch.no_grad():
        stream.reset([PROMPTS[0]], None, torch.Generator().manual_seed(0))
        for _ in range(scale.warmup_chunks):  # kernel selection, allocator growth, the VAE's first-chunk path
            stream.decode(stream.next_chunk()).cpu()
        if check.cuda:
            torch.cuda.reset_peak_memory_stats(check.device)
        denoise_s, decode_s, rgb = [], [], []
        check.sync()
        t_request = time.perf_counter()
        stream.reset([PROMPTS[1]], None, torch.Generator().manual_seed(1))
        first_frame_s = None
        for _ in range(scale.stream_chunks):
            t0 = time.perf_counter()
            latents = stream.next_chunk()
            check.sync()
            t1 = time.perf_counter()
            frames = stream.decode(latents).cpu()  # to the host, as the writer and the server take them
            t2 = time.perf_counter()
            if first_frame_s is None:
                first_frame_s = t2 - t_request
            denoise_s.append(t1 - t0)
            decode_s.append(t2 - t1)
            rgb.append(frames.shape[1])
    denoise = sum(denoise_s[i] for i in steady)
    total = denoise + sum(decode_s[i] for i in steady)
    passes = f"{len(SIGMAS)} denoising passes + 1 cache-writing pass"
    over = (f"chunks {steady.start}..{steady.stop - 1} of a {scale.stream_chunks}-chunk stream (after the {fill} chunks "
            f"that fill {causal.sink_frames} sink + {causal.window_frames} window frames), warm-up stream excluded")
    figs = {
        "denoise_fps": figure(F * len(steady) / denoise, "latent frames/s",
                              f"{label}: latent frames / wall time of next_chunk ({passes}, model only), {over}"),
        "end_to_end_fps": figure(sum(rgb[i] for i in steady) / total, "RGB frames/s",
                                 f"{label}: RGB frames out of the stream decoder (4 per latent frame) / wall time of "
                                 f"next_chunk + streaming VAE decode + copy of the uint8 frames to the host, {over}"),
        "first_frame_latency_s": figure(first_frame_s, "s",
                                        f"{label}: reset (empty cache, prompt encoded by the stand-in text encoder: "
                                        "UMT5-XXL's encode time is not in it) to the first chunk's RGB frames on the "
                                        "host (the decoder returns a chunk's frames together), warm process"),
        "chunk_denoise_ms": figure(1e3 * sorted(denoise_s[i] for i in steady)[len(steady) // 2], "ms",
                                   f"{label}: median wall time of next_chunk ({passes}), {over}"),
        "chunk_decode_ms": figure(1e3 * sorted(decode_s[i] for i in steady)[len(steady) // 2], "ms",
                                  f"{label}: median wall time of decoding one chunk ({F * 4} RGB frames) to host uint8, {over}"),
    }
    cache = _cache_figures(stream.cache)
    kv = f"{label}: bytes of keys/values the cache holds after {scale.stream_chunks} chunks, as the cache object reports them"
    figs["kv_cache_bytes"] = figure(sum(cache["tier_bytes"].values()), "bytes", f"{kv}, all tiers")
    for tier, nbytes in cache["tier_bytes"].items():
        figs[f"kv_{tier}_bytes"] = figure(nbytes, "bytes", f"{kv}, {tier} tier")
    figs["kv_frame_bytes"] = figure(cache["frame_bytes"], "bytes",
                                    f"{label}: keys/values of one latent frame, all layers, in the cache's dtype")
    if cache["pages_in_use"] is not None:
        figs["pages_in_use"] = figure(cache["pages_in_use"], "pages", f"{label}: pages of the pool referenced at the end "
                                      f"(of {cache['pool_pages']} preallocated; one page = one latent frame)")
    if check.cuda:
        figs["peak_memory_gib"] = figure(torch.cuda.max_memory_allocated(check.device) / GIB, "GiB",
                                         f"{label}: torch.cuda.max_memory_allocated over the measured stream (model "
                                         "weights, VAE, cache, activations; not the allocator's reserve or the CUDA context)")
    return figs


def run_stream(check: Check, rec: dict) -> None:
    scale = check.scale
    layers = scale.transformer["num_layers"]
    t0 = time.perf_counter()
    folder = check.pipeline(layers)
    built = time.perf_counter() - t0
    options = WanOptions(height=scale.height, width=scale.width, horizon_frames=scale.horizon_frames,
                         max_text_length=scale.max_text_length)
    # the project's inference placement: DiT and text encoder in the compute dtype, the VAE in fp32
    model = place(load_model(folder, device=check.device, wan=options), check.device, check.dtype).eval()
    loaded = time.perf_counter() - t0 - built
    h, w = model.latent_hw
    _, ph, pw = model.dit.cfg.patch_size
    rec["setup"] = {
        "model": f"{scale.name}-shaped DiT with random weights, {layers} layers, width {model.dit.cfg.dim}, "
                 f"{model.dit.cfg.num_heads} heads, FFN {model.dit.cfg.ffn_dim}, text width {model.dit.cfg.text_dim}, "
                 f"{sum(p.numel() for p in model.dit.parameters()):,} parameters",
        "video": f"{scale.height}x{scale.width} pixels, latent {h}x{w}, {(h // ph) * (w // pw)} tokens per latent frame",
        "dtype": f"DiT and text encoder {check.dtype}, VAE {model.codec.vae.dtype} (streamkd.runtime.place)",
        "device": str(check.device),
        "causal": scale.causal, "sigmas": SIGMAS, "guidance_scale": 1.0, "memory": scale.memory,
        "text_encoder": f"random {scale.text['num_layers']}-layer UMT5, output width {scale.text['d_model']}, "
                        f"{scale.max_text_length} tokens (not UMT5-XXL: it runs once per stream, in reset, so only "
                        "first_frame_latency_s would change, by UMT5-XXL's encode time)",
        "vae": f"random-weight AutoencoderKLWan ({'Wan2.1 shape' if not scale.vae else scale.vae}), streaming decode",
        "pipeline_build_s": built, "model_load_s": loaded,
    }
    for label, memory in (("window", None), ("memory", MemoryConfig(**scale.memory))):
        causal = CausalConfig(**scale.causal, memory=memory)
        what = "sinks + window" if memory is None else "sinks + window + memory (compressed tier + bank)"
        rec["figures"][label] = _stream_figures(check, model, causal, what)
        _free(check.device)
    rec["headline"] = {f"{label}_{k}": rec["figures"][label][k] for label in ("window", "memory")
                       for k in ("denoise_fps", "end_to_end_fps", "first_frame_latency_s", "kv_cache_bytes")}


# ---------------------------------------------------------------------------- d: distill step
def _distill_attempt(check: Check, num_layers: int, checkpointing: bool, rec: dict, key: str) -> None:
    """Build a DistillTrainer on a ``num_layers``-block random pipeline and run two DMD steps;
    figures go to ``rec`` as they are measured."""
    config = REPO / "configs" / check.scale.distill_config
    overrides = [f"teacher={check.pipeline(num_layers)}", "init=null", f"prompts={check.prompt_file()}",
                 "prompt_cache=null", f"out_dir={check.work / 'distill'}", "batch_size=1", "max_steps=2",
                 # every step a student and a critic update, so that the second step is the first's work again
                 "critic_ratio=1", "tensorboard=false", f"runtime.device={check.device}",
                 f"runtime.precision={'bf16' if check.dtype == torch.bfloat16 else 'fp32'}",
                 f"runtime.activation_checkpointing={str(checkpointing).lower()}"]
    cfg = load_config(DistillConfig, config, overrides)
    setup = rec["setup"][key] = {"config": str(config.relative_to(REPO)), "overrides": overrides, "layers": num_layers,
                                 "runtime": to_dict(cfg.runtime)}
    figs = rec["figures"][key] = {}
    if check.cuda:
        torch.cuda.reset_peak_memory_stats(check.device)
    t0 = time.perf_counter()
    trainer = DistillTrainer(cfg)
    check.sync()
    figs["build_s"] = figure(time.perf_counter() - t0, "s", "DistillTrainer(cfg): read the teacher, build student, EMA "
                             "and critic and place them (streamkd.runtime), optimizers")
    setup.update(rollout_frames=trainer.rollout_frames, causal=to_dict(cfg.causal),
                 parameters_per_model=sum(p.numel() for p in trainer.student.parameters()))
    if check.cuda:
        figs["static_memory_gib"] = figure(torch.cuda.memory_allocated(check.device) / GIB, "GiB",
                                           "torch.cuda.memory_allocated after building: teacher (compute dtype), student, "
                                           "EMA and critic (fp32 master weights), VAE and text encoder")
    what = (f"one DMD step: student rollout of {trainer.rollout_frames} latent frames in chunks of "
            f"{cfg.causal.chunk_frames} (a graph at each chunk's exit step), teacher with CFG and critic on the rollout, "
            f"student and critic backward and AdamW steps, EMA update; {cfg.runtime.precision}, activation "
            f"checkpointing {'on' if checkpointing else 'off'}")
    for step, name in ((0, "first_step"), (1, "step")):
        if check.cuda:
            torch.cuda.reset_peak_memory_stats(check.device)
        check.sync()
        t0 = time.perf_counter()
        # the step itself: DistillTrainer.train() also checkpoints at the end of every call, tens of
        # GB of writes at this size that are not part of a step
        stats = trainer._dmd_step()
        trainer.step += 1
        check.sync()
        seconds = time.perf_counter() - t0
        when = ("the first step, with one-time costs (optimizer state allocation, kernel selection)" if step == 0
                else "the second step: the steady figure")
        figs[f"{name}_s"] = figure(seconds, "s", f"wall time of {what}; {when}")
        if check.cuda:
            peak = torch.cuda.max_memory_allocated(check.device)
            figs[f"{name}_peak_memory_gib"] = figure(peak / GIB, "GiB", f"torch.cuda.max_memory_allocated during {when} "
                                                     "(tensors only: not the allocator's reserve or the CUDA context)")
            if step == 1:
                figs["fits_80_gb"] = figure(peak < 80e9, "bool", "the second step's peak below 80 GB (10^9 bytes), "
                                            "an 80 GB card's size (which also holds the CUDA context and allocator reserve)")
    for name in ("dmd_loss", "critic_loss"):
        figs[name] = figure(stats[name], "loss", f"the second step's {name} (random weights: only its finiteness means anything)")


def run_distill_step(check: Check, rec: dict) -> None:
    full = check.scale.transformer["num_layers"]
    ran_out = []
    for num_layers, checkpointing in check.scale.distill_attempts:
        key = f"layers_{num_layers}_checkpointing_{'on' if checkpointing else 'off'}"
        try:
            _distill_attempt(check, num_layers, checkpointing, rec, key)
        except torch.OutOfMemoryError as e:
            rec["setup"].setdefault(key, {})["error"] = _error(e)
            rec["figures"].setdefault(key, {})["oom_peak_memory_gib"] = figure(
                torch.cuda.max_memory_allocated(check.device) / GIB, "GiB",
                "torch.cuda.max_memory_allocated when this attempt ran out of device memory")
            ran_out.append(key)
        else:
            if ran_out:
                rec["setup"]["note"] = (
                    f"out of device memory first ({', '.join(ran_out)}); measured as {key}"
                    + ("" if num_layers == full else f", every model cut to {num_layers} of {full} layers: weights, "
                       f"optimizer state and activations grow about linearly with depth, so ~{full / num_layers:.0f}x "
                       f"these memory figures at {full} layers (an estimate, not measured)"))
            rec["headline"] = {f"{key}_{name}": rec["figures"][key][name] for name in ("step_s", "step_peak_memory_gib")
                               if name in rec["figures"][key]}
            return
        # outside the except clause: its traceback (and the models its frames hold) is released
        _free(check.device)
    raise RuntimeError(f"out of device memory in every attempt ({', '.join(ran_out)})")


# ------------------------------------------------------------------------------ orchestration
@dataclass
class Section:
    name: str
    run: Callable[[Check, dict], None]
    """Fills ``rec["setup"]``, ``rec["figures"]`` and ``rec["headline"]``; raises on failure."""
    cap_s: float
    """Most seconds this section may take (half of it with ``--tiny``)."""


SECTIONS = (
    Section("a_kernel_tests", run_kernel_tests, 150),
    Section("b_kernel_bench", run_kernel_bench, 120),
    Section("c_stream", run_stream, 180),
    Section("d_distill_step", run_distill_step, 300),
)


def _on_alarm(signum, frame) -> None:
    raise Deadline()


def run_section(section: Section, check: Check, deadline: float) -> dict:
    rec: dict = {"section": section.name, "status": "ok", "seconds": 0.0, "setup": {}, "figures": {}, "headline": {},
                 "error": None}
    left = deadline - time.monotonic()
    if left <= 0:
        rec.update(status="skipped",
                   error={"type": "Deadline", "message": "the run's deadline had passed before this section started"})
        return rec
    limit = min(section.cap_s, left)
    t0 = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        try:
            section.run(check, rec)
        finally:  # disarmed before the handlers below run, so the alarm cannot interrupt them
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Deadline:
        rec.update(status="failed", error={"type": "Deadline", "message": f"stopped after {limit:.0f} s (the "
                   f"{'section cap' if limit == section.cap_s else 'run deadline'}); figures measured before are kept"})
    except Exception as e:
        rec.update(status="failed", error=_error(e))
    rec["seconds"] = time.monotonic() - t0
    _free(check.device)
    return rec


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamkd gpu-check", description=__doc__.splitlines()[0],
                                epilog="See docs/gpu.md for what each figure counts.")
    p.add_argument("--out", required=True, type=Path, help="folder for the JSON files (created)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every code path in seconds, on CPU when there is no GPU")
    p.add_argument("--device", help="cuda (default when present), cuda:N, or cpu (with --tiny)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="deadline of the whole run in seconds; sections left after it are skipped (default 540)")
    p.add_argument("--sections", nargs="+", choices=[s.name for s in SECTIONS], help="run only these sections")
    p.add_argument("--work-dir", type=Path, help="where the random pipeline folders go (default: a temporary folder, removed)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}, but torch sees no CUDA device")
    if device == "cpu" and not args.tiny:
        if args.device is None:
            print("gpu-check: no CUDA device (torch.cuda.is_available() is False): nothing to check; "
                  "--tiny runs the same code paths at toy sizes on CPU")
            return 0
        parser.error("the full-size check needs a CUDA device; on CPU use --tiny")
    if device == "cpu":
        # the Triton kernels run interpreted on CPU tensors; read when the kernel module is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # toy sizes on shared CI cores: a second thread only adds wake-ups (measured: a tiny chunk took
        # 30 ms on one thread, seconds on two of a loaded 2-core machine); CPU timings mean nothing here
        torch.set_num_threads(1)
    scale = TINY if args.tiny else WAN_1_3B
    factor = 0.5 if args.tiny else 1.0  # tiny sections take seconds; a hang must not hold CI for minutes
    sections = [replace(s, cap_s=s.cap_s * factor) for s in SECTIONS if not args.sections or s.name in args.sections]
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = started + args.budget_s
    with tempfile.TemporaryDirectory(prefix="streamkd-gpu-check-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        check = Check(scale, device, args.out, work)
        summary = {
            "scale": scale.name, "device": torch.cuda.get_device_name(check.device) if check.cuda else "cpu",
            "torch": torch.__version__, "compute_dtype": str(check.dtype), "budget_s": args.budget_s,
            "sections": {}, "headline": {},
        }
        for section in sections:
            rec = run_section(section, check, deadline)
            _write(args.out / f"{section.name}.json", rec)
            summary["sections"][section.name] = {"status": rec["status"], "seconds": rec["seconds"],
                                                 "error": None if rec["error"] is None else
                                                 f"{rec['error']['type']}: {rec['error']['message'][:300]}"}
            summary["headline"].update({f"{section.name}.{k}": v for k, v in rec["headline"].items()})
            summary["total_s"] = time.monotonic() - started
            _write(args.out / "summary.json", summary)
            error = "" if rec["error"] is None else f": {summary['sections'][section.name]['error']}"
            print(f"gpu-check {section.name}: {rec['status']} ({rec['seconds']:.1f} s){error}", flush=True)
    bad = [name for name, s in summary["sections"].items() if s["status"] != "ok"]
    print(f"gpu-check: {len(sections) - len(bad)}/{len(sections)} sections ok in {summary['total_s']:.0f} s; "
          f"JSON in {args.out}" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
