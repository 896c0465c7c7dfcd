"""The CasSR training step (paper Eq. 3) as one jitted, sharded function, plus the validation preview (a real
sampling run with config.sample's sampler and steps).

Per example: the frozen VAE encodes the HR crop (posterior sample x scaling factor), t ~ U{0..T-1}, noise is
added with the SD schedule, the CasSR U-Net predicts epsilon (or v) from x_t, t, the prompt embedding (dropped
to the empty prompt with probability text.prompt_dropout), the LR upsampled to HR size and the stage-1
reference; the loss is the MSE to the schedule's target. Every random draw of an example is keyed by
(seed, step, epoch, index of the example), so the loss does not depend on how the batch is split over
devices, hosts or gradient-accumulation micro-batches.

config.model.kind "scedit" trains the SCEdit tuners (stage 1) with the same objective: the model is the frozen
SD U-Net with tuners, conditioned on the upsampled LR image (the CSC hint) and no stage-1 reference.

State layout (a dict pytree; TrainState below): params (the trainable nnx.State: ControlNet + multiple
attention), opt (nnx.Optimizer state over exactly those params), ema (optional), step, rng (threefry key
data). Frozen weights (SD U-Net, VAE, activation weights) and the prompt embeddings are a separate, never
donated input, so they stay bit-identical.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cassr_jax import parallel
from cassr_jax.activation import build_activation
from cassr_jax.color import color_fix
from cassr_jax.config import NO_ACTIVATION, PAIRED_ACTIVATION, model_kind
from cassr_jax.models import trainable_filter
from cassr_jax.sampling import cfg_denoiser, make_plan, sample_images
from cassr_jax.schedulers import add_noise, training_target
from cassr_jax.text import encode_prompts
from cassr_jax.train.components import Components
from cassr_jax.train.optim import make_optimizer

TrainState = dict[str, Any]   # {"params", "opt", ["ema"], "step", "rng"}
BATCH_KEYS = ("hr", "lr", "lr_up", "ref", "epoch", "index")
KEY_IMPL = "threefry2x32"      # explicit: results must not depend on the default PRNG implementation


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def model_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The keys the step reads, with int64 identities narrowed to int32 (x64 is off on devices)."""
  out = {}
  for k in BATCH_KEYS:
    if k in batch:
      v = np.asarray(batch[k])
      out[k] = v.astype(np.int32) if v.dtype.kind in "iu" else v
  return out


def _example_keys(key, epoch, index, n: int):
  """(B, n) keys: one stream per example, from its identity (epoch, index in the source)."""
  one = lambda e, i: jax.random.split(jax.random.fold_in(jax.random.fold_in(key, e), i), n)
  return jax.vmap(one)(epoch, index)


class Trainer:
  """Holds the static parts (graph definitions, shardings, schedule, prompt embeddings) and the jitted step."""

  def __init__(self, config, components: Components, mesh: Mesh):
    self.config = config
    self.mesh = mesh
    self.schedule = components.schedule
    model = components.model
    self.model_config = model.config
    self.model_kind = model_kind(config)
    self.trainable = trainable_filter(model)
    self.graphdef, params, frozen_model = nnx.split(model, self.trainable, ...)
    self.tx, self.lr_schedule = make_optimizer(config.train)
    self.ema_decay = float(config.train.ema_decay)
    self.grad_accum = int(config.train.grad_accum)
    self.prompt_dropout = float(config.text.prompt_dropout)

    abstract_opt = nnx.eval_shape(lambda: nnx.Optimizer(model, self.tx, wrt=self.trainable))
    self.opt_graphdef, abstract_opt_state = nnx.split(abstract_opt)

    self.vae_graphdef, vae_state = nnx.split(components.vae)
    self.vae_scale = components.vae.config.downscale

    # Stage-1 reference: a jittable activation inside the step, or the data set's 'ref'.
    act = dict(config.activation.to_dict())
    self.activation_name = act["name"]
    self.uses_reference = (self.model_kind == "cassr" and model.config.reference_source == "activation"
                           and model.config.multiple_attention)
    if self.activation_name in (PAIRED_ACTIVATION, NO_ACTIVATION):
      self.act_fn, act_state = None, None
    else:
      activation = build_activation(act)
      if not activation.jittable:
        raise ValueError(f"activation {self.activation_name!r} is not jittable: write its references with "
                         "scripts/make_paired_data.py --activation and train with activation.name='paired'")
      self.act_fn, act_state = activation.pure()

    embed = lambda prompt: encode_prompts(components.text_encoder, components.tokenizer, prompt)
    text = {"prompt": embed(config.text.prompt), "empty": embed(""),
            "negative": embed(config.text.get("negative_prompt", ""))}
    # Validation sampling: config.sample's sampler and steps (the plan's tables are host-side constants).
    self.val_plan = make_plan(config.sample.sampler, self.schedule, int(config.sample.steps))

    # Shardings: parameters and optimizer state by their logical axis names, batches over every device.
    self.param_shardings = parallel.param_shardings(params, mesh)
    self.opt_shardings = parallel.param_shardings(abstract_opt_state, mesh)
    rep = replicated(mesh)
    self.state_shardings = {"params": self.param_shardings, "opt": self.opt_shardings, "step": rep, "rng": rep}
    if self.ema_decay > 0:
      self.state_shardings["ema"] = self.param_shardings
    self.frozen_shardings = {
        "model": parallel.param_shardings(frozen_model, mesh),
        "vae": parallel.param_shardings(vae_state, mesh),
        "act": parallel.param_shardings(act_state, mesh) if isinstance(act_state, nnx.State)
               else jax.tree.map(lambda _: rep, act_state),
        "text": {k: rep for k in text},
    }
    self.frozen = parallel.place({"model": frozen_model, "vae": vae_state, "act": act_state, "text": text},
                                 self.frozen_shardings)
    self._initial_params = params
    self.batch_sharding = parallel.batch_sharding(mesh)

    self._init_opt = jax.jit(self._make_opt_state, out_shardings=self.opt_shardings)
    self.step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                        self.batch_sharding),
                        out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self.preview = jax.jit(self._preview, in_shardings=(self.param_shardings, self.frozen_shardings, rep),
                           out_shardings=rep)

  # -- state ----------------------------------------------------------------------------------------------
  def init_state(self) -> TrainState:
    # Fresh buffers for everything that will be donated: device_put may alias the host model's arrays, and
    # XLA may return one buffer for equal outputs (Adam's zero mu and nu).
    params = parallel.place(self._initial_params, self.param_shardings, copy=True)
    rep = replicated(self.mesh)
    key = jax.random.key(int(self.config.seed), impl=KEY_IMPL)
    opt = jax.tree.map(jnp.copy, self._init_opt(params, self.frozen))
    state = {"params": params, "opt": opt,
             "step": parallel.place(jnp.zeros((), jnp.int32), rep),
             "rng": parallel.place(jax.random.key_data(key), rep)}
    if self.ema_decay > 0:
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings of the state (the restore target of a checkpoint)."""
    def structs(sharding, subtree):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), subtree)

    params = jax.tree.map(structs, self.param_shardings, self._initial_params)
    rep = replicated(self.mesh)
    key_data = jax.random.key_data(jax.random.key(0, impl=KEY_IMPL))
    state = {"params": params, "opt": jax.eval_shape(self._init_opt, params, self.frozen),
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
             "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rep)}
    if self.ema_decay > 0:
      state["ema"] = params
    return state

  def _merge(self, params, frozen):
    return nnx.merge(self.graphdef, params, frozen["model"])

  def _make_opt_state(self, params, frozen):
    model = self._merge(params, frozen)
    return nnx.state(nnx.Optimizer(model, self.tx, wrt=self.trainable))

  # -- the objective --------------------------------------------------------------------------------------
  def _reference(self, frozen, batch):
    if not self.uses_reference:
      return None
    if self.act_fn is None:
      return batch["ref"]
    return self.act_fn(frozen["act"], batch["lr"])

  def _apply(self, model, x_t, t, context, lr_up, ref):
    """The trained model's output: CasSR reads the upsampled LR (ControlNet) and the reference; SCEdit reads
    the upsampled LR as its CSC hint (none in SC mode)."""
    if self.model_kind == "scedit":
      return model(x_t, t, context, lr_up if model.hint is not None else None)
    return model(x_t, t, context, lr_up, ref)

  def _loss(self, params, frozen, batch, key):
    model = self._merge(params, frozen)
    vae = nnx.merge(self.vae_graphdef, frozen["vae"])
    b = batch["hr"].shape[0]
    keys = _example_keys(key, batch["epoch"], batch["index"], 4)
    k_post, k_t, k_noise, k_drop = (keys[:, i] for i in range(4))

    posterior = vae.encode(batch["hr"] * 2.0 - 1.0)
    eps_post = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], jnp.float32))(k_post)
    z = posterior.mean.astype(jnp.float32) + posterior.std.astype(jnp.float32) * eps_post
    latents = jax.lax.stop_gradient(vae.scale_latents(z))

    n_train = self.schedule.num_train_timesteps
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, n_train))(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(k_noise)
    x_t = add_noise(self.schedule, latents, noise, t)

    drop = jax.vmap(lambda k: jax.random.uniform(k))(k_drop) < self.prompt_dropout
    text = frozen["text"]
    context = jnp.where(drop[:, None, None], text["empty"], text["prompt"]).astype(jnp.float32)
    del b
    pred = self._apply(model, x_t, t, context, batch["lr_up"], self._reference(frozen, batch))
    target = training_target(self.schedule, latents, noise, t)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))

  def _grads(self, params, frozen, batch, key):
    grad_fn = jax.value_and_grad(self._loss)
    k = self.grad_accum
    if k == 1:
      return grad_fn(params, frozen, batch, key)

    # Micro-batch i takes rows i, i+k, ...: each device keeps its own rows (no data moves between devices).
    def micro(x):
      return x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)

    micro_batches = jax.tree.map(micro, batch)

    def body(carry, mb):
      mb = jax.lax.with_sharding_constraint(mb, self.batch_sharding)
      loss, grads = grad_fn(params, frozen, mb, key)
      total_loss, total = carry
      return (total_loss + loss, jax.tree.map(jnp.add, total, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro_batches)
    return loss / k, jax.tree.map(lambda g: g / k, grads)

  def _train_step(self, state: TrainState, frozen, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=KEY_IMPL), step)
    loss, grads = self._grads(state["params"], frozen, batch, key)
    grad_norm = optax.global_norm(grads)

    model = self._merge(state["params"], frozen)
    optimizer = nnx.merge(self.opt_graphdef, state["opt"])
    optimizer.update(model, grads)
    params, opt = nnx.state(model, self.trainable), nnx.state(optimizer)

    # A non-finite loss or gradient leaves the state as it was (the host stops with an error naming the step).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"params": keep(params, state["params"]), "opt": keep(opt, state["opt"]),
                 "step": step + 1, "rng": state["rng"]}
    if "ema" in state:
      d = self.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(e.dtype), state["ema"], params)
      new_state["ema"] = keep(ema, state["ema"])
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr_schedule(step)}
    return new_state, metrics

  # -- preview --------------------------------------------------------------------------------------------
  def _preview(self, params, frozen, batch):
    """The validation images in [0, 1]: "ref" (the stage-1 reference, or lr_up when the model takes none) and
    "sample" (a real sampling run with config.sample's settings: what inference gives)."""
    model = self._merge(params, frozen)
    vae = nnx.merge(self.vae_graphdef, frozen["vae"])
    ref = self._reference(frozen, batch)
    lr_up = batch["lr_up"]
    return {"ref": lr_up if ref is None else ref, "sample": self._sample(model, vae, frozen, lr_up, ref)}

  def _sample(self, model, vae, frozen, lr_up, ref):
    """config.sample's sampler with CFG, as inference runs it (without tiles): CasSR starts from the LR
    latents noised to the first step and colour-corrects towards lr_up (CasSRPipeline); SCEdit starts from
    pure noise (SCEditActivation). Image i's noise comes from fold_in(key(seed), i)."""
    s = self.config.sample
    b, h, w, _ = lr_up.shape
    root = jax.random.key(int(self.config.seed), impl=KEY_IMPL)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(b))
    text = frozen["text"]
    positive = jnp.broadcast_to(text["prompt"], (b,) + text["prompt"].shape[1:]).astype(jnp.float32)
    negative = text["negative"].astype(jnp.float32)
    extra = (lr_up,) if ref is None else (lr_up, ref)
    apply = lambda x, t, c, lr, *rf: self._apply(model, x, t, c, lr, rf[0] if rf else None)
    denoise = cfg_denoiser(apply, (negative, positive), float(s.guidance_scale), extra=extra)
    cassr = self.model_kind == "cassr"
    f = vae.config.downscale
    return sample_images(denoise, keys, self.val_plan, latent_shape=(h // f, w // f, vae.config.latent_channels),
                         decode=vae.decode_latents,
                         start_latents=vae.encode_latents(lr_up * 2.0 - 1.0) if cassr else None,
                         finish=(lambda images: jnp.clip(color_fix(images, lr_up, str(s.color_fix)), 0.0, 1.0))
                         if cassr else None)
