"""Prompt conditioning for the toy world: a word-level text encoder.

Real teachers take T5 embeddings computed outside the model (``context`` of width 4096). The toy
world's prompts come from a closed vocabulary (``streamkd.data.toyworld.STYLE_VOCAB``), so a learned
embedding per word, plus a learned position embedding, is a complete text encoder. The empty
prompt ``""`` is the null prompt of classifier-free guidance: every token is the learned
``<null>`` embedding.
"""

from __future__ import annotations

import torch
from torch import nn


class WordPromptEncoder(nn.Module):
    def __init__(self, vocab: list[str] | tuple[str, ...], max_tokens: int, dim: int):
        super().__init__()
        self.vocab = tuple(vocab)
        self.index = {word: i + 1 for i, word in enumerate(self.vocab)}  # 0 = <null>
        self.max_tokens = max_tokens
        self.words = nn.Embedding(len(self.vocab) + 1, dim)
        self.positions = nn.Parameter(torch.zeros(max_tokens, dim))
        nn.init.normal_(self.words.weight, std=1.0)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(
                    f"prompt {prompt!r}: unknown word(s) {unknown}; this model knows {sorted(self.vocab)}"
                )
            if len(words) > self.max_tokens:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; this model takes at most {self.max_tokens}")
            ids = [self.index[w] for w in words]
            rows.append(ids + [0] * (self.max_tokens - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.positions.device)

    null_prompt = ""
    """CFG's unconditional prompt (streamkd.bundle.TextEncoder)."""

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """``(B, max_tokens, dim)`` prompt embeddings."""
        return self.words(self.token_ids(prompts)) + self.positions

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self(prompts)
