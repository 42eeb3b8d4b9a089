"""The prompt-adherence classifier recognises ground-truth styles and rejects wrong ones."""

from __future__ import annotations

from streamkd.data.toyworld import ToyWorldConfig, render
from streamkd.eval.prompt_classifier import PromptClassifier


def test_classifier_recognises_ground_truth_and_rejects_other_styles() -> None:
    world = ToyWorldConfig()
    clf = PromptClassifier(world)
    biome_acc, colour_acc = clf.heldout_accuracy(episodes=24)
    assert biome_acc >= 0.95
    assert colour_acc >= 0.4  # clip level, often one landmark or none in view; chance is 1/6
    frames = render(5, "snow with red squares", [0] + [4] * 11, 12, world)
    assert clf.accuracy(frames, "snow with red squares") == 1.0
    assert clf.accuracy(frames, "lava with red squares") == 0.0
