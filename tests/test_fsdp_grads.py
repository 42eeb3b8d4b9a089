"""FSDP2 cannot silently go wrong: two processes (gloo, CPU) give the single-process gradient of
every parameter, for the teacher's flow-matching step, the distillation ODE step and both halves
of a DMD step (student update, critic update).

Loss parity (tests/test_distributed.py) is a weak check of sharding: a gradient that is wrong,
missing or never all-gathered may still leave the loss close. Here each flow runs one real step
in one process and in two FSDP2 ranks with half of the global batch each; the full (unsharded)
gradient of every parameter -- before clipping and before the optimizer step -- must agree.

Tolerance: ``max|g_2 - g_1| <= GRAD_RTOL * max|g_1|`` per parameter. Both runs compute in
float32 on the same weights and data; what differs is the order of reductions (FSDP's
reduce-scatter averages two half-batch gradients instead of summing over the whole batch, and the
BLAS kernels block a batch of 2 rows differently from one of 4). That moves the last bits of each
sum: measured at most ~9e-7 of the parameter's largest entry; 1e-5 leaves room for other CPUs'
vector widths and is far below any real error (a missing all-gather, a gradient not averaged or
counted twice, a wrong row slice moves gradients by O(1) relative).

FSDP2 also warns when a sharded module returns a view ("returned a view tensor ... will silently
drop the pre-backward hook"): an in-place op on such an output skips the parameter all-gather
before that module's backward. The model's outputs are fresh tensors (``DiT.forward``), so no
rank may emit that warning in any of these steps.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from streamkd import distributed
from streamkd.bundle import CausalConfig
from streamkd.distill.ode_pairs import ODEPairsConfig, generate_ode_pairs
from streamkd.train.distill import DistillConfig, DistillTrainer
from streamkd.train.teacher import TeacherTrainConfig, TeacherTrainer

from .test_training import tiny_config

pytestmark = pytest.mark.distributed

WORLD = 2
TIMEOUT_S = 300
GRAD_RTOL = 1e-5
FLOWS = ("teacher", "ode", "dmd_student", "dmd_critic")
FSDP_VIEW_WARNING = ("view tensor", "pre-backward hook")
NO_CLIP = 1e9
"""grad_clip of every run: clip_grad_norm_ then scales by exactly 1.0, so the gradients the
optimizer's pre-step hook sees are the unclipped ones."""


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """The full gradient of every trainable parameter (None where it got none). A collective under
    FSDP2 (sharded gradients are DTensors): every rank calls it, in the same parameter order."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            out[name] = None if g is None else (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def _capture_at_step(opt: distributed.Optimized, model: torch.nn.Module, into: dict, key: str) -> None:
    """Record ``model``'s gradients when ``opt``'s optimizer is about to step: after backward and
    clipping (a no-op at ``NO_CLIP``), before the update. The trainers' own steps run unchanged."""
    opt.opt.register_step_pre_hook(lambda *_: into.__setitem__(key, _full_grads(model)))


def _teacher_cfg(out: Path) -> TeacherTrainConfig:
    """The tiny teacher recipe with a batch of 4 (2 rows per rank) and one token per latent pixel:
    with a (1, 1, 1) patch the DiT's unpatchify is a view, the case its output clone is for (the
    distillation runs keep the default (1, 2, 2), where the reshape copies)."""
    cfg = tiny_config(out, batch_size=4, grad_clip=NO_CLIP, threads=1)
    return replace(cfg, model=replace(cfg.model, dit=replace(cfg.model.dit, patch_size=(1, 1, 1))))


def _distill_cfg(teacher_dir: Path, pairs: Path, out: Path, method: str) -> DistillConfig:
    """Tiny recipe: 2 chunks of 2 frames, 2 levels, a batch of 4 (2 rows per rank), CFG 2 for DMD."""
    return DistillConfig(
        method=method, teacher=str(teacher_dir), ode_pairs=str(pairs), out_dir=str(out), causal=CausalConfig(2, 2, 2),
        sigmas=[1.0, 0.5], batch_size=4, critic_ratio=2, teacher_guidance=2.0, grad_clip=NO_CLIP, tensorboard=False,
        threads=1,
    )


def _one_step_grads(teacher_dir: Path, pairs: Path, out: Path) -> tuple[dict[str, dict], list[str]]:
    """Each flow's gradients in the first step of its trainer, and every warning raised meanwhile.
    Runs alone or as one rank of a torchrun-style group (``streamkd.distributed.init`` reads the
    environment)."""
    grads: dict[str, dict] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = TeacherTrainer(_teacher_cfg(out / "teacher"))
        _capture_at_step(teacher.opt, teacher.model, grads, "teacher")
        teacher.train(stop_after=1, progress=False)
        ode = DistillTrainer(_distill_cfg(teacher_dir, pairs, out / "ode", "ode"))
        _capture_at_step(ode.opt, ode.student, grads, "ode")
        ode.train(stop_after=1, progress=False)
        dmd = DistillTrainer(_distill_cfg(teacher_dir, pairs, out / "dmd", "dmd"))
        _capture_at_step(dmd.opt, dmd.student, grads, "dmd_student")
        _capture_at_step(dmd.critic_opt, dmd.critic, grads, "dmd_critic")
        dmd.train(stop_after=1, progress=False)  # step 0 (critic_ratio 2): a student update, then a critic update
    return grads, [f"{w.category.__name__}: {w.message}" for w in caught]


def _rank(rank: int, port: int, teacher_dir: Path, pairs: Path, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    grads, caught = _one_step_grads(teacher_dir, pairs, out / "two")  # one run folder, as under torchrun
    torch.save({"grads": grads if rank == 0 else None, "warnings": caught}, out / f"rank{rank}.pt")
    distributed.shutdown()
    distributed.exit_worker(0)  # as a torchrun worker leaves: interpreter teardown after gloo can abort


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One step of every flow in one process and in two FSDP2 ranks."""
    tmp = tmp_path_factory.mktemp("fsdp_grads")
    pairs = tmp / "pairs"
    generate_ode_pairs(ODEPairsConfig(teacher=str(teacher_dir), out_dir=str(pairs), num_clips=4, shard_clips=4,
                                      num_steps=4, keep_sigmas=[1.0, 0.5]), progress=False)
    single, _ = _one_step_grads(teacher_dir, pairs, tmp / "single")
    ranks = mp.start_processes(_rank, args=(_free_port(), teacher_dir, pairs, tmp), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ranks.join(timeout=1):  # raises, with the rank's traceback, if one fails
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail(f"the 2-process run did not finish in {TIMEOUT_S} s (a rank waiting in a collective?)")
    results = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return {"single": single, "two": results[0]["grads"], "warnings": [w for r in results for w in r["warnings"]]}


@pytest.mark.parametrize("flow", FLOWS)
def test_two_process_gradients_equal_single_process(runs: dict, flow: str) -> None:
    one, two = runs["single"][flow], runs["two"][flow]
    assert list(two) == list(one)
    # every trainable parameter takes part in the step (a None would be skipped by the optimizer)
    assert all(g is not None for g in one.values()), [n for n, g in one.items() if g is None]
    assert all(g is not None for g in two.values()), [n for n, g in two.items() if g is None]
    for name, g1 in one.items():
        g2 = two[name]
        assert g2.shape == g1.shape, f"{flow} {name}: {tuple(g2.shape)} vs {tuple(g1.shape)}"
        scale = float(g1.abs().max())
        assert scale > 0, f"{flow} {name}: the single-process gradient is zero, nothing is compared"
        err = float((g2 - g1).abs().max())
        assert err <= GRAD_RTOL * scale, f"{flow} {name}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def test_no_fsdp_view_warning(runs: dict) -> None:
    bad = [w for w in runs["warnings"] if any(s in w for s in FSDP_VIEW_WARNING)]
    assert not bad, bad
