"""SD-based stage-1 activations (paper Table 2): SCEdit and an SD ControlNet, run through the project sampler.

Each samples SD latents conditioned on the bicubic-upsampled LR image (the SCEdit CSC hint / the ControlNet
hint), with CFG between a negative and a general prompt, decodes them and returns the image at x`scale`:
  SCEditActivation:     eps = SCEditUNet(x_t, t, text, hint=lr_up)        (cassr_jax/models/scedit.py)
  ControlNetActivation: eps = ControlNetSR(x_t, t, text, lr_up)           (cassr_jax/models/controlnet_sr.py)
They are not jittable (a whole sampling run per call, host-side prompt encoding): run them over a data set
with activate_images / make_paired_data.py, or let CasSRPipeline call them once per batch. Noise comes from
fold_in(key(seed), i) for image i of the call, so a call is deterministic.

The loop itself is cassr_jax.sampling.sample_images, the same run as CasSRPipeline's and the trainer's
preview (the samplers sit below cassr_jax.activation in the import order).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.activation import check_lr
from cassr_jax.image_ops import resize_bicubic
from cassr_jax.sampling import cfg_denoiser, make_plan, sample_images
from cassr_jax.schedulers.schedule import load_schedule_config, make_schedule
from cassr_jax.text import PromptCache, load_tokenizer

PRNG_IMPL = "threefry2x32"  # batching-independent noise (see cassr_jax.pipelines.cassr)
DEFAULT_PROMPT = "clean, high-resolution"
DEFAULT_NEGATIVE = "dotted, noise, blur, lowres, smooth"


class DiffusionActivation:
  """Base: an SD-based model + VAE + CLIP text encoder and tokenizer + schedule.

  weights: the model's directory (checkpoint.load_model); pretrained: a converted SD-1.5 directory with vae/,
  text_encoder/, tokenizer/ and scheduler_config.json. Or pass model / vae / text_encoder / tokenizer objects.
  """
  name = "diffusion"
  jittable = False
  model_types: tuple[str, ...] = ()

  def __init__(self, weights: str | None = None, *, pretrained: str | None = None, model=None, vae=None,
               text_encoder=None, tokenizer=None, scale: int = 4, steps: int = 20, sampler: str = "dpmpp_2m",
               guidance_scale: float = 5.5, prompt: str = DEFAULT_PROMPT,
               negative_prompt: str = DEFAULT_NEGATIVE, seed: int = 0, start_from_lr: bool = False,
               strength: float = 1.0, attention: str = "auto"):
    if int(scale) != scale or scale < 1:
      raise ValueError(f"activation {self.name!r}: scale must be a positive integer, got {scale}")
    if model is None:
      if not weights:
        raise ValueError(f"activation {self.name!r}: pass weights= (a model directory) or model=")
      meta = checkpoint.read_model_meta(weights)
      if meta["model_type"] not in self.model_types:
        raise ValueError(f"activation {self.name!r}: {weights} holds a {meta['model_type']!r} model, expected "
                         f"one of {self.model_types}")
      model = checkpoint.load_model(weights, attention=attention)
    if vae is None or text_encoder is None or tokenizer is None:
      if not pretrained:
        raise ValueError(f"activation {self.name!r}: pass pretrained= (converted SD directory) or vae=, "
                         "text_encoder= and tokenizer=")
      vae = vae or checkpoint.load_model(os.path.join(pretrained, "vae"), attention=attention)
      text_encoder = text_encoder or checkpoint.load_model(os.path.join(pretrained, "text_encoder"),
                                                           attention=attention)
      tokenizer = tokenizer or load_tokenizer(pretrained)
    self.scale = int(scale)
    self.schedule = make_schedule(load_schedule_config(pretrained))
    self.steps, self.sampler, self.guidance_scale = steps, sampler, guidance_scale
    self.seed, self.start_from_lr, self.strength = seed, start_from_lr, strength
    self._plan = make_plan(sampler, self.schedule, steps, strength=strength if start_from_lr else 1.0)
    prompts = PromptCache(text_encoder, tokenizer)
    self._contexts = (prompts(negative_prompt), prompts(prompt))
    unet_cfg = model.config.unet
    self._multiple = vae.config.downscale * 2 ** (len(unet_cfg.block_out_channels) - 1)
    self._graphdefs, self._states = zip(*(nnx.split(m) for m in (model, vae)))
    self._jitted = jax.jit(self._sample)

  def _denoise(self, model, x, t, context, lr_up):
    raise NotImplementedError

  def _sample(self, states, lr_up, keys, negative, positive):
    model, vae = (nnx.merge(g, s) for g, s in zip(self._graphdefs, states))
    b, ph, pw, _ = lr_up.shape
    f = vae.config.downscale
    positive = jnp.broadcast_to(positive, (b,) + positive.shape[1:])
    denoise = cfg_denoiser(lambda x, t, c, lr: self._denoise(model, x, t, c, lr), (negative, positive),
                           self.guidance_scale, extra=(lr_up,))
    return sample_images(denoise, keys, self._plan, latent_shape=(ph // f, pw // f, vae.config.latent_channels),
                         decode=vae.decode_latents,
                         start_latents=vae.encode_latents(lr_up * 2.0 - 1.0) if self.start_from_lr else None)

  def __call__(self, lr: jax.Array) -> jax.Array:
    lr = check_lr(lr, self.name)
    b, h, w, _ = lr.shape
    oh, ow = h * self.scale, w * self.scale
    lr_up = jnp.clip(resize_bicubic(lr, (oh, ow)), 0.0, 1.0)
    m = self._multiple
    ph, pw = -(-oh // m) * m, -(-ow // m) * m
    lr_up = jnp.pad(lr_up, ((0, 0), (0, ph - oh), (0, pw - ow), (0, 0)), mode="reflect" if min(oh, ow) > 1
                    else "edge")
    root = jax.random.key(self.seed, impl=PRNG_IMPL)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(b))
    return self._jitted(self._states, lr_up, keys, *self._contexts)[:, :oh, :ow]

  def pure(self):
    """Not jittable: the returned fn runs the whole host-side call (state is unused)."""
    return (lambda state, lr: self(lr)), None


class SCEditActivation(DiffusionActivation):
  """SCEdit (CSC-Tuner on SD-1.5) conditioned on the upsampled LR image (cassr_jax/models/scedit.py)."""
  name = "scedit"
  model_types = ("scedit",)

  def __init__(self, weights: str | None = None, *, control_scale: float = 1.0, **kwargs):
    self.control_scale = control_scale
    super().__init__(weights, **kwargs)

  def _denoise(self, model, x, t, context, lr_up):
    hint = lr_up if model.hint is not None else None
    return model(x, t, context, hint, control_scale=self.control_scale)


class ControlNetActivation(DiffusionActivation):
  """SD-1.5 + a (converted diffusers) ControlNet on the upsampled LR (cassr_jax/models/controlnet_sr.py)."""
  name = "controlnet"
  model_types = ("controlnet_sr",)

  def __init__(self, weights: str | None = None, *, conditioning_scale: float | None = None, **kwargs):
    self.conditioning_scale = conditioning_scale
    super().__init__(weights, **kwargs)

  def _denoise(self, model, x, t, context, lr_up):
    return model(x, t, context, lr_up, conditioning_scale=self.conditioning_scale)
