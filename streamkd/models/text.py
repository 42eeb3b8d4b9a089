"""Wan2.1's text encoder (UMT5 through ``transformers``) and an on-disk cache of its embeddings.

``UMT5TextEncoder`` implements ``streamkd.bundle.TextEncoder`` and reproduces diffusers'
``WanPipeline._get_t5_prompt_embeds`` (diffusers 0.42):

1. clean each prompt (``prompt_clean``): ``ftfy.fix_text`` when ftfy is installed, HTML entities
   unescaped twice, runs of whitespace collapsed to one space, ends stripped;
2. tokenize with ``</s>`` appended, padded to ``max_length`` and truncated to it (the tokenizer
   keeps ``</s>`` as the last token of a truncated prompt);
3. run the encoder with the padding mask, cast to the encoder's dtype, and zero every row past the
   prompt's own token count, so a prompt's context does not depend on what it was batched with.

Prompts longer than ``max_length`` tokens are truncated, as in diffusers and in Wan's own
pipeline (the DiT was trained on 512-token contexts cut this way); diffusers says nothing, we log
a warning once per prompt, and ``strict=True`` refuses them instead.

``PromptEmbeddingCache`` stores each prompt's embedding (trimmed to its token count, so a file is
~n·D values rather than 512·D) as one safetensors file keyed by the encoder's identity, dtype,
``max_length`` and the cleaned prompt. It offers the same ``encode`` / ``null_prompt`` as the
encoder, so a training run can use it in its place; ``prefill`` fills it ahead of a run.

Shapes: B prompts, L = max_length tokens, D = the encoder's width (4096 for UMT5-XXL), n = a
prompt's token count after truncation (<= L).
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from streamkd.checkpoint import CheckpointError, atomic_save_safetensors

__all__ = ["UMT5TextEncoder", "PromptEmbeddingCache", "PromptCacheError", "PrefillCounts", "prompt_clean"]

log = logging.getLogger(__name__)

ENCODER_CLASSES = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}
"""``model_type`` of ``text_encoder/config.json`` -> the transformers class that loads it."""

_HAS_FTFY = importlib.util.find_spec("ftfy") is not None
_warned_ftfy = False


# --------------------------------------------------------------------------- prompt cleaning
def prompt_clean(text: str) -> str:
    """diffusers' ``pipeline_wan.prompt_clean``, step for step.

    ``regex`` (not ``re``) as diffusers uses it: its ``\\s`` excludes U+001C..U+001F, which ``re``'s
    includes, and the tokenizer sees the difference.
    """
    if _HAS_FTFY:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _clean_all(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):  # a bare string would be read as a list of one-letter prompts
        raise ValueError(f"prompts must be a list of strings, got the string {_abbrev(prompts)!r}; pass [prompt]")
    return [prompt_clean(p) for p in prompts]


def _abbrev(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _warn_ftfy_missing() -> None:
    global _warned_ftfy
    if not _HAS_FTFY and not _warned_ftfy:
        _warned_ftfy = True
        log.warning("ftfy is not installed: prompts are cleaned without ftfy.fix_text, as diffusers does without it, "
                    "but Wan's own pipeline (the one the model was trained with) always applies it, so prompts with "
                    "curly quotes or mojibake encode differently; pip install ftfy")


# --------------------------------------------------------------------------- the encoder
class UMT5TextEncoder(nn.Module):
    """Prompts -> ``(B, L, D)`` UMT5 context, zero past each prompt's tokens (``streamkd.bundle.TextEncoder``).

    ``negative_prompt`` is ``null_prompt``, the unconditional branch of CFG written as
    ``uncond + s·(cond − uncond)``: Wan guides away from its negative prompt. diffusers' default is
    ``""``; Self-Forcing / LongLive pass Wan's long default negative prompt.

    ``identity`` names the weights and tokenizer for ``PromptEmbeddingCache`` (``from_pretrained``
    fingerprints the folder's files); an encoder built from objects has none unless given one.
    """

    def __init__(self, tokenizer, model: nn.Module, max_length: int = 512, negative_prompt: str = "",
                 strict: bool = False, identity: str | None = None) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length} (Wan2.1 uses 512)")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}; pass '' for none")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.null_prompt = negative_prompt
        self.strict = strict
        self.identity = identity
        self.dim: int = model.config.d_model
        self._warned: set[str] = set()  # cleaned prompts already reported as truncated
        _warn_ftfy_missing()

    @classmethod
    def from_pretrained(cls, folder: str | Path, max_length: int = 512, negative_prompt: str = "",
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        strict: bool = False) -> "UMT5TextEncoder":
        """Load ``tokenizer/`` and ``text_encoder/`` of a Wan pipeline folder.

        ``dtype=None`` loads float32 (transformers 5 would otherwise keep the checkpoint's dtype);
        with bf16, transformers keeps UMT5's ``wo`` projections in fp32 as diffusers does.
        """
        import transformers

        folder = Path(folder)
        tok_dir, enc_dir = folder / "tokenizer", folder / "text_encoder"
        if not tok_dir.is_dir():
            raise CheckpointError(f"{tok_dir} is missing: a Wan pipeline folder keeps the UMT5 tokenizer there "
                                  "(tokenizer_config.json with tokenizer.json or spiece.model); pass a folder written by "
                                  "WanPipeline.save_pretrained, e.g. a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        config_path = enc_dir / "config.json"
        if not config_path.is_file():
            missing = config_path if enc_dir.is_dir() else enc_dir
            raise CheckpointError(f"{missing} is missing: a Wan pipeline folder keeps the UMT5 text encoder in "
                                  "text_encoder/ (config.json + model*.safetensors); pass a folder written by "
                                  "WanPipeline.save_pretrained, e.g. a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
        model_type = config.get("model_type")
        if model_type not in ENCODER_CLASSES:
            found = (config.get("architectures") or [model_type])[0]
            raise CheckpointError(f"{config_path} describes a {found} (model_type {model_type!r}); a Wan text encoder is "
                                  "a UMT5EncoderModel (model_type 'umt5') or a T5 encoder (model_type 't5')")
        model_cls = getattr(transformers, ENCODER_CLASSES[model_type])
        bar_was_on = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # a loading bar per command is noise in CLI output
        try:
            model = model_cls.from_pretrained(str(enc_dir), dtype=dtype or torch.float32).to(device)
        finally:
            if bar_was_on:
                transformers.utils.logging.enable_progress_bar()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        return cls(tokenizer, model, max_length=max_length, negative_prompt=negative_prompt, strict=strict,
                   identity=_fingerprint(tok_dir, enc_dir))

    def train(self, mode: bool = True) -> "UMT5TextEncoder":
        # Frozen: umt5-xxl's config has dropout 0.1, which would make prompts random if a caller's
        # .train() reached it.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype  # what diffusers casts the encoder output to

    # ------------------------------------------------------------------ token counts and truncation
    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each cleaned prompt, ``</s>`` included, before truncation."""
        return self._count(_clean_all(prompts))

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than ``max_length`` tokens (and so cut when encoded)."""
        return [n > self.max_length for n in self.token_counts(prompts)]

    def _count(self, texts: list[str]) -> list[int]:
        # verbose=False: the tokenizer's own "longer than model_max_length ... indexing errors"
        # warning does not apply to UMT5 (relative positions); _check_lengths says what does.
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def _check_lengths(self, texts: list[str], counts: list[int]) -> None:
        """Warn once per over-long cleaned prompt, or with ``strict`` raise naming the first."""
        over = [(t, n) for t, n in zip(texts, counts) if n > self.max_length]
        if not over:
            return
        if self.strict:
            text, n = over[0]
            more = f" (and {len(over) - 1} more prompt(s) in this batch)" if len(over) > 1 else ""
            raise ValueError(f"prompt {_abbrev(text)!r} is {n} tokens, over max_length {self.max_length}{more}; "
                             f"shorten the prompt or raise max_length up to {max(n for _, n in over)}")
        for text, n in over:
            if text not in self._warned:
                self._warned.add(text)
                log.warning("prompt %r is %d tokens, over max_length %d: it is truncated to %d tokens, as diffusers and "
                            "Wan's training do; shorten it or raise max_length to %d", _abbrev(text), n,
                            self.max_length, self.max_length, n)

    # ------------------------------------------------------------------ encoding
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, L, D)`` context on the encoder's device, in its dtype."""
        return self.pad(self.encode_trimmed(prompts))

    def encode_trimmed(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's context ``(n, D)`` without the zero padding: the rows ``encode`` keeps."""
        return self._encode_clean(_clean_all(prompts))[0]

    def pad(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Stack ``(n, D)`` contexts into ``(B, L, D)``, zero past each ``n`` (Wan's padding)."""
        return torch.stack([torch.cat([r_nD, r_nD.new_zeros(self.max_length - len(r_nD), self.dim)]) for r_nD in rows])

    @torch.no_grad()
    def _encode_clean(self, texts: list[str]) -> tuple[list[torch.Tensor], list[int]]:
        """Rows ``(n, D)`` and untruncated token counts of already cleaned prompts."""
        counts = self._count(texts)
        self._check_lengths(texts, counts)
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids_BL, mask_BL = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden_BLD = self.model(ids_BL, mask_BL).last_hidden_state.to(self.dtype)
        return [h_LD[:n] for h_LD, n in zip(hidden_BLD, mask_BL.gt(0).sum(dim=1).tolist())], counts


def _fingerprint(*folders: Path) -> str:
    """sha256 over every file of ``folders``: names, sizes and contents.

    Files over 8 MiB (the weight shards: UMT5-XXL is 11 GB) contribute 64 chunks of 64 KiB spread
    over the file instead of every byte: hashing all of it would cost ~10 s per run, and two
    different checkpoints of one shape differ in practically every chunk (any fine-tune moves all
    weights), so a sample tells them apart. A copy of the same files keeps the fingerprint.
    """
    h = hashlib.sha256()
    for folder in folders:
        # dot-files are download/lock bookkeeping, not the model
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in (p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)):
            size = path.stat().st_size
            h.update(f"{path.relative_to(folder.parent).as_posix()}\0{size}\0".encode())
            with open(path, "rb") as f:
                if size <= 8 << 20:
                    h.update(f.read())
                    continue
                for i in range(64):
                    f.seek(i * (size - (64 << 10)) // 63)
                    h.update(f.read(64 << 10))
    return h.hexdigest()


# --------------------------------------------------------------------------- the cache
class PromptCacheError(ValueError):
    """A cached prompt embedding is unreadable or does not belong to its key."""


@dataclass(frozen=True)
class PrefillCounts:
    computed: int
    """Distinct prompts encoded and written by this call."""
    cached: int
    """Distinct prompts whose file was already there (and read back intact)."""


CACHE_FORMAT = "streamkd-prompt-embedding-1"
"""Part of every key: a change in what a file holds invalidates all old files instead of misreading them."""


class PromptEmbeddingCache:
    """Prompt embeddings on disk, one safetensors file per (encoder, dtype, max_length, cleaned prompt).

    ``encode`` returns what ``encoder.encode`` returns (the same rows, re-padded with zeros); hits
    read a file instead of running UMT5. Keys hash the encoder's ``identity`` (its files'
    fingerprint), its dtype, ``max_length`` and the cleaned prompt, so another encoder, a cast or
    another length never reads a stale file, and prompts that clean to the same text share one.
    Files are ``folder/<key[:2]>/<key>.safetensors``, written atomically (temp file + rename), so
    several ranks may fill one cache at once. A file that does not read back is an error naming it,
    never silently recomputed: it means a disk or copy problem worth knowing about.
    """

    def __init__(self, folder: str | Path, encoder: UMT5TextEncoder) -> None:
        if encoder.identity is None:
            raise ValueError("the encoder has no identity, so cached embeddings could not be told from another "
                             "encoder's; build it with UMT5TextEncoder.from_pretrained(folder) or pass identity=")
        self.folder = Path(folder)
        self.encoder = encoder

    @property
    def null_prompt(self) -> str:
        return self.encoder.null_prompt

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def path(self, prompt: str) -> Path:
        """The file holding ``prompt``'s embedding under the current encoder, dtype and max_length."""
        return self._path(prompt_clean(prompt))

    def _path(self, text: str) -> Path:
        enc = self.encoder
        fields = [CACHE_FORMAT, enc.identity, str(enc.dtype), enc.max_length, text]
        key = hashlib.sha256(json.dumps(fields).encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``(B, L, D)``: ``encoder.encode(prompts)``, reading cached prompts and caching the rest."""
        texts = _clean_all(prompts)
        rows = self._lookup(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in rows))
        if missing:
            rows.update(self._compute(missing))
        return self.encoder.pad([rows[t] for t in texts])

    def prefill(self, prompts: list[str], batch_size: int = 16) -> PrefillCounts:
        """Encode and store every prompt not cached yet, ``batch_size`` at a time (for training runs).

        Files already there are read back, so a corrupt one fails here, before training starts.
        Counts are of distinct cleaned prompts.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(dict.fromkeys(_clean_all(prompts)))
        on_disk = {t: self._path(t).is_file() for t in texts}
        cached, missing = [t for t in texts if on_disk[t]], [t for t in texts if not on_disk[t]]
        for i in range(0, len(cached), batch_size):
            self._lookup(cached[i : i + batch_size])
        for i in range(0, len(missing), batch_size):
            self._compute(missing[i : i + batch_size])
        return PrefillCounts(computed=len(missing), cached=len(cached))

    # ------------------------------------------------------------------ files
    def _compute(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        rows, counts = enc._encode_clean(texts)
        for text, row_nD, n in zip(texts, rows, counts):
            path = self._path(text)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors({"embedding": row_nD}, path, metadata={
                "format": CACHE_FORMAT, "prompt": text, "tokens": str(n), "max_length": str(enc.max_length),
                "dtype": str(enc.dtype), "identity": enc.identity,
            })
        return dict(zip(texts, rows))

    def _lookup(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The cached rows among ``texts`` (cleaned), with the encoder's length policy applied to them."""
        rows, counts = {}, {}
        for text in dict.fromkeys(texts):
            path = self._path(text)
            if path.is_file():
                rows[text], counts[text] = self._read(path, text)
        self.encoder._check_lengths(list(counts), list(counts.values()))
        return rows

    def _read(self, path: Path, text: str) -> tuple[torch.Tensor, int]:
        enc = self.encoder
        fix = f"delete it and it is recomputed on the next run (it caches the prompt {_abbrev(text)!r})"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                row_nD = f.get_tensor("embedding")
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise PromptCacheError(f"prompt cache file {path} is corrupt or truncated ({e}); {fix}") from None
        expect = {"format": CACHE_FORMAT, "prompt": text, "max_length": str(enc.max_length), "dtype": str(enc.dtype),
                  "identity": enc.identity}
        wrong = [k for k, v in expect.items() if meta.get(k) != v]
        if wrong or not meta.get("tokens", "").isdigit():
            raise PromptCacheError(f"prompt cache file {path} does not hold what its name promises (metadata "
                                   f"{wrong or ['tokens']} differ); {fix}")
        n = min(int(meta["tokens"]), enc.max_length)
        if row_nD.dtype != enc.dtype or row_nD.ndim != 2 or row_nD.shape[0] != n or row_nD.shape[1] != enc.dim:
            raise PromptCacheError(f"prompt cache file {path} holds a {row_nD.dtype} tensor of shape {tuple(row_nD.shape)}, "
                                   f"expected {enc.dtype} ({n}, {enc.dim}); {fix}")
        return row_nD.to(enc.device), int(meta["tokens"])
