"""streamkd.models.text against diffusers' WanPipeline.encode_prompt on a tiny random Wan folder.

Both sides run the same transformers UMT5 in fp32 on the same token ids, under ``torch.no_grad``
as ``WanPipeline.__call__`` runs it (with autograd on, CPU SDPA takes another kernel and differs by
~1e-6), so parity is exact; 1e-6 is allowed where batch composition differs. Cache hits are
compared exactly: they are the bytes the miss wrote.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanPipeline  # noqa: E402
from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_prompt_clean  # noqa: E402

from streamkd.checkpoint import CheckpointError  # noqa: E402
from streamkd.models.text import PrefillCounts, PromptCacheError, PromptEmbeddingCache, UMT5TextEncoder, prompt_clean  # noqa: E402
from streamkd.models.tiny_wan import make_tiny_wan  # noqa: E402

ATOL = 1e-6
NEGATIVE = "blurred, static, worst quality, dark"
PROMPTS = [
    "a red cat walks in the forest",
    "  aerial   view of the\n snowy mountain \t at sunrise,\u00a0cinematic  ",
    "the dog &amp;amp; the horse run &lt;b&gt;fast&lt;/b&gt; on the sand &quot;near&quot; the ocean",
    "sky",
]
LONG = " ".join(["a golden dog runs over the green field near the river"] * 4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_wan(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def pipe(folder) -> WanPipeline:
    return WanPipeline.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def encoder(folder) -> UMT5TextEncoder:
    return UMT5TextEncoder.from_pretrained(folder, negative_prompt=NEGATIVE)


def _diffusers(pipe: WanPipeline, prompts: list[str], L: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():  # as WanPipeline.__call__
        return pipe.encode_prompt(prompts, max_sequence_length=L, **kwargs)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return (a - b).abs().max().item()


def _text_only(folder: Path, dest: Path) -> Path:
    """A copy of the folder's tokenizer/ and text_encoder/ (all UMT5TextEncoder reads)."""
    for sub in ("tokenizer", "text_encoder"):
        shutil.copytree(folder / sub, dest / sub)
    return dest


# --------------------------------------------------------------------------- parity with diffusers
def test_prompt_clean_matches_diffusers():
    tricky = PROMPTS + ["&amp;lt;i&amp;gt; x", "a\x1cb\x1f c", "a\u2003b\u200bc\u0085d", "\n\t ", "caf\u00e9 \u201cquoted\u201d"]
    assert [prompt_clean(t) for t in tricky] == [diffusers_prompt_clean(t) for t in tricky]


def test_encode_matches_diffusers_prompt_and_negative(encoder, pipe):
    L = encoder.max_length
    cond, uncond = _diffusers(pipe, PROMPTS, L, negative_prompt=NEGATIVE, do_classifier_free_guidance=True)
    ours = encoder.encode(PROMPTS)
    assert ours.shape == (len(PROMPTS), 512, encoder.dim) and ours.dtype == torch.float32 and not ours.requires_grad
    assert torch.equal(ours, cond)
    assert torch.equal(encoder.encode([encoder.null_prompt] * len(PROMPTS)), uncond)
    # the batch held different lengths: each row is zero exactly past its own token count
    counts = encoder.token_counts(PROMPTS)
    assert len(set(counts)) == len(counts)
    for row, n in zip(ours, counts):
        assert row[n:].abs().max() == 0 and row[n - 1].abs().max() > 0
    # a prompt's context does not depend on its batch
    assert _maxdiff(encoder.encode(PROMPTS[1:2])[0], ours[1]) <= ATOL


def test_default_negative_prompt_is_diffusers_default(folder, encoder, pipe):
    plain = UMT5TextEncoder(encoder.tokenizer, encoder.model, max_length=16)
    assert plain.null_prompt == ""
    _, uncond = _diffusers(pipe, PROMPTS[:2], 16, do_classifier_free_guidance=True)
    assert torch.equal(plain.encode([plain.null_prompt] * 2), uncond)


def test_eval_mode_cast_and_bare_string(encoder):
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"list of strings.*pass \[prompt\]"):
        encoder.encode("a red cat")
    half = UMT5TextEncoder(encoder.tokenizer, copy.deepcopy(encoder.model), max_length=16).to(torch.bfloat16)
    assert half.encode(PROMPTS[:1]).dtype == torch.bfloat16


# --------------------------------------------------------------------------- truncation
def test_truncation_warns_once_per_prompt_and_matches_diffusers(encoder, pipe, caplog):
    short = UMT5TextEncoder(encoder.tokenizer, encoder.model, max_length=12)
    n = short.token_counts([LONG])[0]
    assert n > 12 and short.truncated([PROMPTS[3], LONG]) == [False, True]
    with caplog.at_level(logging.WARNING, logger="streamkd.models.text"):
        out = short.encode([LONG, PROMPTS[3], LONG])
        short.encode([LONG])
    warnings = [r.getMessage() for r in caplog.records if "over max_length" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"is {n} tokens, over max_length 12" in warnings[0] and "'a golden dog runs over" in warnings[0]
    assert "..." in warnings[0] and LONG not in warnings[0]  # abbreviated
    cond, _ = _diffusers(pipe, [LONG, PROMPTS[3], LONG], 12, do_classifier_free_guidance=False)
    assert torch.equal(out, cond) and out[0].abs().amax(dim=1).gt(0).all()  # all 12 rows are prompt


def test_strict_refuses_over_long_prompts(encoder):
    strict = UMT5TextEncoder(encoder.tokenizer, encoder.model, max_length=12, strict=True)
    n = strict.token_counts([LONG])[0]
    assert strict.encode([PROMPTS[3]]).shape == (1, 12, encoder.dim)
    with pytest.raises(ValueError, match=rf"is {n} tokens, over max_length 12.*shorten the prompt or raise max_length up to {n}"):
        strict.encode([PROMPTS[3], LONG])


# --------------------------------------------------------------------------- the cache
def test_cache_hit_is_identical_and_small(encoder, tmp_path):
    cache = PromptEmbeddingCache(tmp_path, encoder)
    calls = []
    hook = encoder.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        miss = cache.encode(PROMPTS)
        assert len(calls) == 1
        hit = cache.encode(PROMPTS)
        assert len(calls) == 1  # served from disk
    finally:
        hook.remove()
    assert torch.equal(hit, miss) and _maxdiff(hit, encoder.encode(PROMPTS)) <= ATOL
    path = cache.path(PROMPTS[0])
    padded_bytes = encoder.max_length * encoder.dim * 4
    assert path.is_file() and path.stat().st_size < padded_bytes / 10
    assert cache.path(" a red  cat walks in the forest ") == path  # prompts that clean alike share a file
    assert cache.null_prompt == NEGATIVE and (cache.max_length, cache.dim) == (encoder.max_length, encoder.dim)


def test_prefill_counts_and_stale_keys(folder, encoder, tmp_path):
    cache = PromptEmbeddingCache(tmp_path, encoder)
    assert cache.prefill(PROMPTS + PROMPTS[:2], batch_size=3) == PrefillCounts(computed=4, cached=0)
    assert cache.prefill(PROMPTS + ["a blue bird"]) == PrefillCounts(computed=1, cached=4)
    # another max_length: other keys, nothing stale read
    other_len = PromptEmbeddingCache(tmp_path, UMT5TextEncoder.from_pretrained(folder, max_length=64))
    assert other_len.path(PROMPTS[0]) != cache.path(PROMPTS[0])
    assert other_len.prefill(PROMPTS) == PrefillCounts(computed=4, cached=0)
    assert other_len.encode(PROMPTS).shape == (4, 64, encoder.dim)
    # other weights of the same shape: another identity
    changed = _text_only(folder, tmp_path / "changed")
    model = type(encoder.model).from_pretrained(str(changed / "text_encoder"))
    with torch.no_grad():
        model.shared.weight.mul_(1.5)
    model.save_pretrained(str(changed / "text_encoder"))
    other_weights = UMT5TextEncoder.from_pretrained(changed)
    assert other_weights.identity != encoder.identity
    assert PromptEmbeddingCache(tmp_path, other_weights).path(PROMPTS[0]) != cache.path(PROMPTS[0])
    # a copy of the same files is the same encoder
    assert UMT5TextEncoder.from_pretrained(_text_only(folder, tmp_path / "copy")).identity == encoder.identity


def test_corrupt_cache_file_is_named(encoder, tmp_path):
    cache = PromptEmbeddingCache(tmp_path, encoder)
    cache.prefill(PROMPTS[:2])
    path = cache.path(PROMPTS[0])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PromptCacheError, match=rf"{path.name} is corrupt or truncated.*delete it"):
        cache.encode(PROMPTS[:2])
    with pytest.raises(PromptCacheError, match="delete it"):
        cache.prefill(PROMPTS[:2])
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(PromptCacheError, match=rf"{path.name} is corrupt"):
        cache.encode(PROMPTS[:1])
    path.unlink()
    assert cache.prefill(PROMPTS[:2]) == PrefillCounts(computed=1, cached=1)


def test_cache_hit_applies_the_length_policy(encoder, tmp_path):
    lenient = UMT5TextEncoder(encoder.tokenizer, encoder.model, max_length=12, identity=encoder.identity)
    PromptEmbeddingCache(tmp_path, lenient).prefill([LONG])
    strict = UMT5TextEncoder(encoder.tokenizer, encoder.model, max_length=12, strict=True, identity=encoder.identity)
    with pytest.raises(ValueError, match="over max_length 12"):
        PromptEmbeddingCache(tmp_path, strict).encode([LONG])


def test_cache_needs_an_identity(encoder, tmp_path):
    with pytest.raises(ValueError, match="from_pretrained"):
        PromptEmbeddingCache(tmp_path, UMT5TextEncoder(encoder.tokenizer, encoder.model))


# --------------------------------------------------------------------------- folder errors
@pytest.mark.parametrize("sub", ["tokenizer", "text_encoder"])
def test_missing_subfolder_is_named(folder, tmp_path, sub):
    broken = _text_only(folder, tmp_path)
    shutil.rmtree(broken / sub)
    with pytest.raises(CheckpointError, match=rf"{broken / sub} is missing.*WanPipeline.save_pretrained"):
        UMT5TextEncoder.from_pretrained(broken)


def test_wrong_encoder_class_is_named(folder, tmp_path):
    broken = _text_only(folder, tmp_path)
    config_path = broken / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type="bert", architectures=["BertModel"])
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="describes a BertModel.*UMT5EncoderModel"):
        UMT5TextEncoder.from_pretrained(broken)
