"""The CLIP image encoder of Wan2.1 image-to-video: first frames -> the tokens the DiT's image branch reads.

``CLIPImageEncoder.encode`` reproduces ``WanImageToVideoPipeline.encode_image``: the folder's own
image processor (resize, centre crop, CLIP normalisation), then ``CLIPVisionModel`` and its
*penultimate* hidden states -- all tokens, class token included (257 x 1280 for ViT-H/14 at 224 px).
Wan was trained on that layer, not on the pooled or last output. Frozen, like the text encoder.

Legend: B batch, H/W frame height/width, Li image tokens, D CLIP width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from streamkd.checkpoint import CheckpointError

__all__ = ["CLIPImageEncoder"]


class CLIPImageEncoder(nn.Module):
    """uint8 frames ``(B, H, W, 3)`` -> ``(B, Li, D)`` penultimate CLIP vision tokens."""

    def __init__(self, processor, model: nn.Module) -> None:
        super().__init__()
        self.processor = processor
        self.model = model.eval().requires_grad_(False)
        self.dim: int = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> "CLIPImageEncoder":
        """Load ``image_processor/`` and ``image_encoder/`` of a Wan I2V pipeline folder. The processor
        class is the one ``model_index.json`` names (as diffusers loads it), so resizing and
        normalisation are the pipeline's own. ``dtype=None`` loads float32."""
        import transformers

        folder = Path(folder)
        enc_dir, proc_dir = folder / "image_encoder", folder / "image_processor"
        for path in (enc_dir, proc_dir):
            if not path.is_dir():
                raise CheckpointError(f"{path} is missing: a Wan2.1 image-to-video folder keeps its CLIP image encoder in "
                                      "image_encoder/ and image_processor/; re-save it with WanImageToVideoPipeline.save_pretrained")
        index = json.loads((folder / "model_index.json").read_text())
        proc_name = (index.get("image_processor") or [None, "CLIPImageProcessor"])[1]
        proc_cls = getattr(transformers, proc_name, None)
        if proc_cls is None:
            raise CheckpointError(f"{folder}/model_index.json names image_processor class {proc_name!r}, which this "
                                  f"transformers ({transformers.__version__}) does not have")
        bar_was_on = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            model = transformers.CLIPVisionModel.from_pretrained(str(enc_dir), dtype=dtype or torch.float32)
        finally:
            if bar_was_on:
                transformers.utils.logging.enable_progress_bar()
        return cls(proc_cls.from_pretrained(str(proc_dir)), model)

    def train(self, mode: bool = True) -> "CLIPImageEncoder":
        return super().train(False)  # frozen: never in training mode (no dropout in the conditioning)

    @torch.no_grad()
    def encode(self, frames_BHWC: torch.Tensor) -> torch.Tensor:
        if frames_BHWC.ndim != 4 or frames_BHWC.shape[-1] != 3 or frames_BHWC.dtype != torch.uint8:
            raise ValueError(f"encode takes uint8 RGB frames (B, H, W, 3), got {tuple(frames_BHWC.shape)} of {frames_BHWC.dtype}")
        param = next(self.model.parameters())
        # the processor resizes on the host (PIL), as the pipeline does with the image it is given
        pixels = self.processor(images=list(frames_BHWC.cpu().numpy()), return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
        return out.hidden_states[-2]
