"""A tiny random Wan2.1 pipeline folder, built locally in seconds: the real-model path's test bed.

``make_tiny_wan(folder)`` writes what ``WanPipeline.save_pretrained`` writes for a real Wan2.1
checkpoint -- ``model_index.json``, ``transformer/`` (``WanTransformer3DModel``), ``vae/``
(``AutoencoderKLWan``), ``text_encoder/`` (``UMT5EncoderModel``), ``tokenizer/`` (a T5 fast
tokenizer) and ``scheduler/`` -- with random weights at toy width. Nothing is downloaded: the
tokenizer is a small unigram model trained here on a fixed word list, so any free text encodes
(unknown pieces fall back to ``<unk>``).

Every component is the diffusers / transformers class a real folder names, so code proven on this
folder runs the same code path on ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``; only the sizes differ.
``streamkd make-tiny-wan --out FOLDER`` builds one from the command line;
``configs/tiny-wan/`` are the training configs sized for it.

``make_tiny_wan_i2v(folder)`` writes the image-to-video counterpart (``WanImageToVideoPipeline``,
as ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` holds): the same components plus ``image_encoder/``
(``CLIPVisionModel``) and ``image_processor/`` (``CLIPImageProcessor``), the transformer reading
36 channels (latents + first-frame mask + first-frame latents) and the CLIP tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
)
"""Transformer shape of the tiny pipeline (Wan2.1's structure, 2 layers, width 24)."""

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
"""VAE shape: Wan's 8x spatial / 4x temporal compression and 16 latent channels, 8 base channels."""

TINY_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="gated-gelu")
"""UMT5 encoder shape (its ``d_model`` is the transformer's ``text_dim``)."""

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=16, projection_dim=32)
"""CLIP vision tower shape: 32x32 images in 16x16 patches = 4 patches + the class token = 5 tokens
of width 32 (Wan2.1 I2V: ViT-H/14 at 224 px, 257 tokens of width 1280)."""

TINY_I2V_TRANSFORMER = dict(TINY_TRANSFORMER, in_channels=16 + 4 + 16, out_channels=16,
                            image_dim=TINY_CLIP["hidden_size"], added_kv_proj_dim=24)
"""Transformer of the tiny I2V pipeline: 16 noisy latent channels + 4 mask channels (one per frame
of the VAE's 4x temporal stride) + 16 first-frame latent channels in; the image keys/values project
the embedded image tokens, so ``added_kv_proj_dim`` is the width (2 heads x 12)."""

VOCAB_WORDS = (
    "a the of and in on with over under through at by from to into near far above below "
    "forest desert ocean city snow mountain river lake field sky cloud road street house tree "
    "red green blue yellow white black orange purple brown grey golden dark bright "
    "cat dog bird horse car boat man woman child people camera walks runs flies drives moves slowly fast "
    "sunset sunrise night day rain fog light shadow water fire stone grass sand wave wind "
    "squares circles triangles dots lines cinematic shot view close wide aerial video"
).split()


def make_tokenizer(folder: str | Path | None = None, vocab_size: int = 256):
    """A T5 fast tokenizer (unigram, ``</s>`` appended, ``<pad>`` = 0) trained on ``VOCAB_WORDS``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    corpus = [" ".join(VOCAB_WORDS[i : i + 7]) for i in range(len(VOCAB_WORDS))] + list(VOCAB_WORDS)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def make_tiny_wan(folder: str | Path, seed: int = 0, **transformer_overrides) -> Path:
    """Write a tiny random ``WanPipeline`` folder to ``folder`` (created); returns it."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    transformer = WanTransformer3DModel(**{**TINY_TRANSFORMER, **transformer_overrides})
    with torch.no_grad():  # diffusers zero-initialises some projections; make every path carry signal
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKLWan(**TINY_VAE)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0, **TINY_TEXT))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=scheduler, transformer=transformer.eval())
    pipe.save_pretrained(str(folder))
    return folder


def make_tiny_wan_i2v(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``WanImageToVideoPipeline`` folder (Wan2.1 I2V layout) to ``folder``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    transformer = WanTransformer3DModel(**TINY_I2V_TRANSFORMER)
    with torch.no_grad():  # as make_tiny_wan: diffusers zero-initialises some projections
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKLWan(**TINY_VAE)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0, **TINY_TEXT))
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))
    size = TINY_CLIP["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                                   scheduler=scheduler, image_processor=image_processor,
                                   image_encoder=image_encoder.eval(), transformer=transformer.eval())
    pipe.save_pretrained(str(folder))
    return folder
