"""The one chunk loop: every causal generation in streamkd goes through ``StreamGenerator``.

Legend: B streams, C latent channels, F frames per chunk, h/w latent size, H/W pixels.

Per chunk (Self-Forcing / CausVid style):
    1. start from fresh noise; for each level of the sampler, run the model on the chunk against
       the KV cache *read-only* (sinks + window, see ``streamkd.cache``), step the sampler;
    2. one *clean pass*: the finished chunk at t = 0 runs through the model once more and writes
       its keys/values into the cache -- later chunks see clean history, as in training;
    3. decode the chunk with the codec's stream decoder.

Image-to-video: frame 0 of the first chunk is the encoded first frame, held clean at t = 0 in
every step (per-frame timesteps), so it conditions the rest of the chunk and then sits in the
cache as the first sink frame.

Classifier-free guidance runs conditional and unconditional streams as one batch of 2B with one
cache; the velocity is ``v = v_uncond + s (v_cond - v_uncond)`` with ``s = guidance_scale``
(``s = 1`` is the plain conditional model and skips the second half). "Unconditional" drops the
prompt (the empty prompt) and the actions (the null action id) together.

The offline script, the server and training rollouts all call this class; the cached result equals
the full-sequence block-causal forward (tests/test_stream_equivalence.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamkd.bundle import CausalConfig

from streamkd.bundle import ModelBundle

StepHook = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(chunk index, step index, model input x_BCFhw, timesteps t_BF, guided velocity v_BCFhw)."""


ImageInputs = tuple[torch.Tensor, torch.Tensor]
"""Wan2.1 image-to-video conditioning of ``B`` clips: ``(condition_BCFhw, image_context_BLiD)``
(``WanModel.image_inputs`` / ``ImageStream``); the denoiser reads ``cat([x, condition])`` and the
CLIP tokens, the same in every CFG row."""


def with_image(x_BCFhw: torch.Tensor, image: ImageInputs | None, rows: int = 1) -> tuple[torch.Tensor, dict]:
    """The denoiser's input and keyword arguments for ``x`` (``rows`` copies of the batch: CFG)."""
    if image is None:
        return x_BCFhw, {}
    condition, context = image
    return (torch.cat([x_BCFhw, condition.repeat(rows, 1, 1, 1, 1)], 1),
            {"image_context_BLiD": context.repeat(rows, 1, 1)})


def guided(v_2B: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """CFG ``uncond + scale (cond - uncond)``; the first ``batch`` rows are the conditional half."""
    if v_2B.shape[0] == batch:
        return v_2B
    cond, uncond = v_2B[:batch], v_2B[batch:]
    return uncond + scale * (cond - uncond)


class StreamGenerator:
    def __init__(
        self,
        model: ModelBundle,
        sampler,
        *,
        causal: CausalConfig | None = None,
        guidance_scale: float = 1.0,
        batch_size: int = 1,
        on_step: StepHook | None = None,
        global_batch: tuple[int, slice] | None = None,
        pool=None,
    ) -> None:
        """``global_batch``: (size, this generator's rows) when these streams are one data-parallel
        rank's slice of a larger batch: noise is drawn for the whole batch and sliced, so every rank
        consumes the shared generator exactly as a single process rolling out all rows would.
        ``pool``: the ``PagePool`` to keep this stream's pages in (a causal config with memory),
        shared by the server's sessions so that batching them copies no cache."""
        causal = causal or model.cfg.causal
        if causal is None:
            raise ValueError("StreamGenerator needs a causal config (chunk/sink/window); pass causal=CausalConfig(...)")
        self.model = model
        self.sampler = sampler
        self.causal = causal
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.on_step = on_step
        self.global_batch = global_batch or (batch_size, slice(None))
        self.rows = batch_size * (2 if guidance_scale != 1.0 else 1)
        param = model.dit.proj_out.weight
        self.device, self.dtype = param.device, param.dtype
        h, w = model.latent_hw
        self.latent_shape = (model.codec.latent_channels, causal.chunk_frames, h, w)
        self.cache = model.dit.new_cache(
            batch_size=self.rows, height=h, width=w, sink_frames=causal.sink_frames,
            window_frames=causal.window_frames, chunk_frames=causal.chunk_frames,
            memory=model.cfg.memory_for_stream(causal.memory), pool=pool,
        )
        self.decoder = model.codec.stream_decoder()
        self.chunk_index = 0
        self.context = None
        self.first_latent = None
        self.image = None  # Wan2.1 image-to-video: the stream's image inputs (ImageStream)
        self.last_condition: torch.Tensor | None = None
        """Image-to-video: the condition channels the last chunk read (the trainer scores the
        rollout's window with them); None for other models."""
        self.generator: torch.Generator | list[torch.Generator] | None = None

    # ------------------------------------------------------------------------------ session state
    def reset(
        self, prompts: list[str], first_frames_BHWC: torch.Tensor | None, generator: torch.Generator | list[torch.Generator]
    ) -> None:
        """Start new streams: empty cache, new prompts, optional first frames (uint8).

        ``generator``: one for the batch, or one per stream (row ``b`` draws its noise from
        ``generator[b]`` alone, so a stream gives the same frames alone or batched with others --
        how the server batches independent sessions)."""
        if len(prompts) != self.batch_size:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {self.batch_size} streams")
        self.cache.reset()
        self.decoder = self.model.codec.stream_decoder()
        self.chunk_index = 0
        self.generator = generator
        self.set_prompts(prompts)
        self.first_latent = self.image = self.last_condition = None
        if self.model.dit.cfg.image_dim is not None:
            # Wan2.1 image-to-video: the image conditions every chunk (condition channels + CLIP
            # tokens, as its pipeline builds them); frame 0 is denoised, not held
            if first_frames_BHWC is None:
                raise ValueError("this is an image-to-video model: pass the first frames (generate: --image)")
            self.image = self.model.image_stream(first_frames_BHWC)
        elif first_frames_BHWC is not None:
            with torch.no_grad():
                self.first_latent = self.model.codec.encode(first_frames_BHWC[:, None]).to(self.device, self.dtype)

    def set_prompts(self, prompts: list[str]) -> None:
        """Prompts for the following chunks (the cached history keeps the old prompt's keys)."""
        with torch.no_grad():
            rows = list(prompts) + ([self.model.null_prompt] * self.batch_size if self.rows > self.batch_size else [])
            self.context = self.model.encode_prompts(rows).to(self.dtype)

    @property
    def frames_generated(self) -> int:
        return self.cache.frames_written

    # ----------------------------------------------------------------------------------- one chunk
    def _noise(self) -> torch.Tensor:
        if isinstance(self.generator, list):  # one generator per stream (see reset)
            assert len(self.generator) == self.batch_size and self.global_batch[0] == self.batch_size
            z = torch.cat([torch.randn((1, *self.latent_shape), generator=g, dtype=torch.float32) for g in self.generator])
            return z.to(self.device, self.dtype)
        size, rows = self.global_batch
        z = torch.randn((size, *self.latent_shape), generator=self.generator, dtype=torch.float32)[rows]
        return z.to(self.device, self.dtype)

    def _rows(self, x_BCFhw: torch.Tensor) -> torch.Tensor:
        return x_BCFhw.repeat(self.rows // self.batch_size, 1, 1, 1, 1)

    def _dit(self, x_BCFhw: torch.Tensor, t_BF: torch.Tensor, actions, condition: torch.Tensor | None, **kw):
        """One pass of the denoiser over the chunk's rows (the CFG rows share latents, and an
        image-to-video stream's condition channels and CLIP tokens)."""
        image = None if condition is None else (condition, self.image.context_BLiD)
        x, image_kw = with_image(self._rows(x_BCFhw), image, self.rows // self.batch_size)
        return self.model.dit(x, t_BF, self.context, actions, cache=self.cache, **image_kw, **kw)

    def _condition(self) -> torch.Tensor | None:
        """The next chunk's image-to-video condition channels (None for other models)."""
        return None if self.image is None else self.image.next(self.causal.chunk_frames)

    def _actions(self, actions_BF: torch.Tensor | None) -> torch.Tensor | None:
        if actions_BF is None or self.model.dit.action_embed is None:
            return None
        a = actions_BF  # host data: the DiT reads camera offsets from them there and copies them to its device
        if self.rows > self.batch_size:
            a = torch.cat([a, torch.full_like(a, self.model.dit.null_action)])
        return a

    def next_chunk(self, actions_BF: torch.Tensor | None = None, exit_step: int | None = None) -> torch.Tensor:
        """Denoise the next chunk, write it into the cache; returns its clean latents ``(B, C, F, h, w)``.

        ``exit_step`` (training rollouts, Self-Forcing sec. 3.2): stop at that sampler step and
        return its x0 prediction. Only that one model pass records a graph (when grad is enabled
        by the caller); earlier steps and the cache-writing pass never do, so history is detached
        and memory does not grow with the rollout.
        """
        F = self.causal.chunk_frames
        if actions_BF is not None and tuple(actions_BF.shape) != (self.batch_size, F):
            raise ValueError(f"actions must be (batch, chunk_frames) = ({self.batch_size}, {F}), got {tuple(actions_BF.shape)}")
        last = self.sampler.num_steps - 1 if exit_step is None else exit_step
        if not 0 <= last < self.sampler.num_steps:
            raise ValueError(f"exit_step must be in [0, {self.sampler.num_steps}), got {exit_step}")
        want_grad = torch.is_grad_enabled()
        actions = self._actions(actions_BF)
        condition = self.last_condition = self._condition()
        fixed = self.first_latent is not None and self.chunk_index == 0  # frame 0 is given
        x = self._noise()
        t_BF = torch.empty(self.rows, F, device=self.device)
        for i in range(last + 1):
            if fixed:
                x = torch.cat([self.first_latent, x[:, :, 1:]], 2)
            t_BF.fill_(1000.0 * self.sampler.sigmas[i])
            if fixed:
                t_BF[:, 0] = 0.0
            exiting = exit_step is not None and i == exit_step
            with torch.set_grad_enabled(want_grad and exiting):
                v = guided(self._dit(x, t_BF, actions, condition), self.batch_size, self.guidance_scale)
                if exiting:
                    x = x - self.sampler.sigmas[i] * v  # the x0 prediction
                    break
            if self.on_step is not None:
                self.on_step(self.chunk_index, i, x.clone(), t_BF[: self.batch_size].clone(), v)
            with torch.no_grad():
                x = self.sampler.step(v, i, x, self._noise() if self.sampler.stochastic else None)
        if fixed:
            x = torch.cat([self.first_latent, x[:, :, 1:]], 2)
        # clean pass: history enters the cache at t = 0, detached
        with torch.no_grad():
            self._dit(x.detach(), torch.zeros_like(t_BF), actions, condition, write_cache=True, output=False)
        self.chunk_index += 1
        return x

    @torch.no_grad()
    def observe(self, frames_BFHWC: torch.Tensor, actions_BF: torch.Tensor | None = None) -> torch.Tensor:
        """Ingest given frames (uint8, whole chunks) as if the stream had generated them: encode
        them, then run the clean pass of each chunk, which writes it into the cache (and every
        memory tier hanging off it). How a stream continues a real video, and how an eval shows
        the model a place before asking it to come back. Returns the latents ``(B, C, F', h, w)``.

        ``actions_BF[:, t]`` is the move into observed frame t (the stream's first frame's action
        is ignored, as in generation). The streaming decoder does not see the observed frames;
        a codec with temporal decoder state must be primed separately.
        """
        F, (H, W) = self.causal.chunk_frames, self.model.frame_hw
        if frames_BFHWC.ndim != 5 or frames_BFHWC.shape[0] != self.batch_size or frames_BFHWC.shape[2:] != (H, W, 3):
            raise ValueError(f"observe takes uint8 frames (batch={self.batch_size}, frames, {H}, {W}, 3), "
                             f"got {tuple(frames_BFHWC.shape)}")
        if frames_BFHWC.dtype != torch.uint8:
            raise ValueError(f"observe takes uint8 frames, got {frames_BFHWC.dtype}")
        tf = self.model.codec.temporal_factor
        if tf > 1 and (self.chunk_index or (frames_BFHWC.shape[1] - 1) % (tf * F)):
            raise ValueError(f"this codec is {tf}x in time: observe from the stream's start, 1 + {tf} x {F} x k frames "
                             f"(whole chunks of {F} latent frames), got {frames_BFHWC.shape[1]} frames after "
                             f"{self.chunk_index} chunks")
        latents = self.model.codec.encode(frames_BFHWC).to(self.device, self.dtype)
        self.observe_latents(latents, actions_BF)
        return latents

    @torch.no_grad()
    def observe_latents(self, latents_BCFhw: torch.Tensor, actions_BF: torch.Tensor | None = None) -> None:
        """``observe`` for latents: the clean pass of each chunk, exactly as ``next_chunk`` runs it
        after denoising (so observing a stream's own latents reproduces its cache)."""
        F = self.causal.chunk_frames
        B, C, num_f = latents_BCFhw.shape[:3]
        if (B, C) != (self.batch_size, self.latent_shape[0]) or tuple(latents_BCFhw.shape[3:]) != self.latent_shape[2:]:
            raise ValueError(f"latents must be (batch={self.batch_size}, {self.latent_shape[0]}, frames, "
                             f"{self.latent_shape[2]}, {self.latent_shape[3]}), got {tuple(latents_BCFhw.shape)}")
        if num_f == 0 or num_f % F:
            raise ValueError(f"observe takes whole chunks: a multiple of chunk_frames={F} frames, got {num_f}")
        if actions_BF is not None and tuple(actions_BF.shape) != (B, num_f):
            raise ValueError(f"actions must be (batch, frames) = ({B}, {num_f}), got {tuple(actions_BF.shape)}")
        t_BF = torch.zeros(self.rows, F, device=self.device)
        for start in range(0, num_f, F):
            x = latents_BCFhw[:, :, start : start + F].to(self.device, self.dtype)
            actions = self._actions(None if actions_BF is None else actions_BF[:, start : start + F])
            self._dit(x, t_BF, actions, self._condition(), write_cache=True, output=False)
            self.chunk_index += 1

    def decode(self, latents_BCFhw: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(B, F, H, W, 3)`` of a chunk, through the streaming decoder."""
        return self.decoder.push(latents_BCFhw)
