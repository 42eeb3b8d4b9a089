"""Prompt adherence: a tiny classifier, trained on ground-truth toy-world frames, predicts the style.

Features are what makes a toy-world style visible: a joint RGB colour histogram (4 levels per
channel, 64 bins). Two linear softmax heads on them predict the biome (the colour field and
texture, always in view) and the landmark colour.

* ``prompt_accuracy``: the share of generated frames whose biome is predicted as the prompt says
  (frame level: the biome fills every frame).
* ``landmark_colour_accuracy``: the share of clips whose landmark colour is predicted right from
  the histogram pooled over the clip (clip level: a 64x64 view often holds one landmark or none,
  so single frames cannot be judged; shapes are left out for the same reason).

The classifier is trained in seconds on ground-truth frames of training episodes
(deterministic) and reports both accuracies on held-out ground truth: the ceiling of each score.
"""

from __future__ import annotations

import numpy as np
import torch

from streamkd.data.toyworld import ToyWorldConfig, episode, heldout_seed, parse_prompt, prompt_for_seed, random_actions, render


def colour_histogram(frames_THWC: np.ndarray, mask_THW: np.ndarray | None = None) -> torch.Tensor:
    """``(T, 64)`` normalised joint RGB histograms (4 levels per channel), of the pixels in
    ``mask_THW`` when given (each frame normalised by its own count)."""
    q = frames_THWC.astype(np.int64) // 64  # 0..3
    idx = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    T = idx.shape[0]
    flat = idx.reshape(T, -1)
    keep = np.ones_like(flat, dtype=bool) if mask_THW is None else mask_THW.reshape(T, -1)
    hist = np.zeros((T, 64))
    for t in range(T):
        hist[t] = np.bincount(flat[t][keep[t]], minlength=64)
    return torch.from_numpy(np.sqrt(hist / np.maximum(keep.sum(1, keepdims=True), 1))).float()  # sqrt: Hellinger-like


class PromptClassifier:
    def __init__(self, world: ToyWorldConfig, train_episodes: int = 250, frames_per_episode: int = 8, seed: int = 0) -> None:
        self.world = world
        feats, biomes, colours = [], [], []
        for i in range(train_episodes):
            ep = episode("train", i, frames_per_episode, world, base_seed=seed + 12345)
            style = parse_prompt(ep["prompt"])
            feats.append(colour_histogram(ep["frames"].numpy()))
            biomes += [style.biome] * frames_per_episode
            colours += [style.colour] * frames_per_episode
        self.biomes = sorted(set(biomes))
        self.colours = sorted(set(colours))
        x = torch.cat(feats)
        self.w_biome = self._fit(x, torch.tensor([self.biomes.index(b) for b in biomes]), len(self.biomes))
        self.w_colour = self._fit(x, torch.tensor([self.colours.index(c) for c in colours]), len(self.colours))

    @staticmethod
    def _fit(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
        """Multinomial logistic regression with a small L2 penalty, full-batch L-BFGS (deterministic)."""
        xb = torch.cat([x, torch.ones(len(x), 1)], 1)
        w = torch.zeros(xb.shape[1], classes, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xb @ w, y) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    def predict(self, frames_THWC: np.ndarray, mask_THW: np.ndarray | None = None) -> tuple[list[str], list[str]]:
        x = colour_histogram(frames_THWC, mask_THW)
        xb = torch.cat([x, torch.ones(len(x), 1)], 1)
        return ([self.biomes[i] for i in (xb @ self.w_biome).argmax(1).tolist()],
                [self.colours[i] for i in (xb @ self.w_colour).argmax(1).tolist()])

    def accuracy(self, frames_THWC: np.ndarray, prompt: str, mask_THW: np.ndarray | None = None,
                 min_share: float = 0.25) -> float:
        """Share of frames whose biome matches the prompt's; with ``mask_THW`` judged on the masked
        pixels only (e.g. those no condition showed), over the frames where they cover at least
        ``min_share`` of the frame (nan when none does)."""
        if mask_THW is not None:
            keep = mask_THW.reshape(len(mask_THW), -1).mean(1) >= min_share
            if not keep.any():
                return float("nan")
            frames_THWC, mask_THW = frames_THWC[keep], mask_THW[keep]
        biomes, _ = self.predict(frames_THWC, mask_THW)
        return float(np.mean([b == parse_prompt(prompt).biome for b in biomes]))

    def colour_correct(self, frames_THWC: np.ndarray, prompt: str) -> bool:
        """Landmark colour of the whole clip (pooled histogram) matches the prompt's."""
        x = colour_histogram(frames_THWC).pow(2).mean(0, keepdim=True).sqrt()
        xb = torch.cat([x, torch.ones(1, 1)], 1)
        return self.colours[int((xb @ self.w_colour).argmax())] == parse_prompt(prompt).colour

    def heldout_accuracy(self, episodes: int = 32, frames: int = 12) -> tuple[float, float]:
        """(prompt accuracy, landmark-colour accuracy) on held-out ground truth: the ceilings."""
        frame_scores, clip_scores = [], []
        for i in range(episodes):
            seed = heldout_seed(i)
            prompt = prompt_for_seed(seed)
            gt = render(seed, prompt, random_actions(np.random.default_rng(seed), frames), frames, self.world)
            frame_scores.append(self.accuracy(gt, prompt))
            clip_scores.append(self.colour_correct(gt, prompt))
        return float(np.mean(frame_scores)), float(np.mean(clip_scores))
