"""CasSR super-resolution: LR photos of any size -> SR photos, data-parallel over every local device.

    pipe = CasSRPipeline.from_pretrained("exported/cassr")
    out = pipe([lr_uint8_image, ...], scale=4.0, steps=20, seed=0)       # list of uint8 (H, W, 3)

Per batch of equal-sized LR images:
  1. lr_up = the LR bicubic-resized to the output size round(scale * h), round(scale * w) (any float scale),
     inside the compiled program; reference = the stage-1 activation's output resized to that size (or
     lr_up when the model's reference_source is "lr").
  2. Both are reflect-padded to the multiple the VAE and U-Net need (VAE factor x 2**(U-Net levels - 1)).
     lr_up is never made whole: it is a lazy image (pipelines.tiled.UpsampledLR) whose tiles are
     computed from the LR where they are used. Full-size float images exist once each (the reference, the
     decoded image, the output): tiles are cut from them inside the tile loops, CFG doubles a tile batch,
     not the image, and the colour fix runs tile by tile, so memory beyond them follows the tile.
  3. The sampler starts from the VAE latent of lr_up noised to the first step (the paper's LR start; off:
     pure noise), CFG between the negative and the general prompt as one doubled batch, optional latent
     tiles; tiled VAE decode; colour correction towards lr_up; crop back to the output size.
Noise is drawn per image from fold_in(seed, image id), so an image's result does not depend on how the
images are batched or on the device count. Batches are padded to a multiple of the local device count and
split over a 1-D data mesh of this process's devices (each host runs its own share of images; inference
needs no communication between hosts).

Exported directory (save_pretrained / export_pipeline): unet/ vae/ text_encoder/ (checkpoint.save_model
directories), tokenizer/, scheduler_config.json, activation/ (the stage-1 weights when it has a model), and
pipeline.json (activation name and options, prompts, default settings).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cassr_jax import checkpoint
from cassr_jax.activation import build_activation
from cassr_jax.color import COLOR_FIXES, color_fix_tiles
from cassr_jax.image_ops import resize_bicubic, to_float01, to_uint8
from cassr_jax.pipelines.tiled import UpsampledLR, tiled_denoiser, tiled_vae_decode, tiled_vae_encode
from cassr_jax.sampling import cfg_denoiser, get_sampler, make_plan, sample_images
from cassr_jax.schedulers.schedule import SCHEDULER_FILE, ScheduleConfig, load_schedule_config, make_schedule
from cassr_jax.text import PromptCache, load_tokenizer

PIPELINE_FILE = "pipeline.json"
FORMAT_VERSION = 1
GENERAL_PROMPT = "clean, high-resolution"
NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
DATA = "data"
# Fixed whatever jax's default: threefry's numbers do not depend on vmap, batching or sharding (rbg's may).
PRNG_IMPL = "threefry2x32"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Defaults of a pipeline call (each can be overridden per call). Tiles and overlaps in latent pixels."""
  prompt: str = GENERAL_PROMPT
  negative_prompt: str = NEGATIVE_PROMPT
  steps: int = 20
  sampler: str = "dpmpp_2m"
  karras: bool = False
  guidance_scale: float = 5.5
  scale: float = 4.0
  color_fix: str = "adain"
  start_from_lr: bool = True
  strength: float = 1.0
  latent_tile: int | None = 96     # 768 px; None: never tile the latents
  latent_overlap: int = 32
  vae_tile: int | None = 64        # decoder tile (512 px); the encoder uses the same size in pixels
  vae_overlap: int = 8
  tile_batch: int | None = 4       # latent tiles per U-Net call (x2 with CFG)

  def __post_init__(self):
    if self.color_fix not in COLOR_FIXES:
      raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {self.color_fix!r}")
    if not self.scale > 0:
      raise ValueError(f"scale must be positive, got {self.scale}")
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    get_sampler(self.sampler)

  def replace(self, **changes) -> "Settings":
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise TypeError(f"unknown pipeline settings {unknown}")
    return dataclasses.replace(self, **{k: v for k, v in changes.items()})


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class CasSRPipeline:
  """The CasSR U-Net, VAE, CLIP text encoder + tokenizer, stage-1 activation and noise schedule."""

  def __init__(self, unet, vae, text_encoder, tokenizer, activation, *, activation_config: Mapping[str, Any],
               schedule_config: ScheduleConfig | None = None, settings: Settings | None = None,
               devices: Sequence[jax.Device] | None = None):
    self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
    self.activation = activation
    self.activation_config = dict(activation_config)
    self.schedule_config = schedule_config or ScheduleConfig()
    self.schedule = make_schedule(self.schedule_config)
    self.settings = settings or Settings()
    self.prompts = PromptCache(text_encoder, tokenizer)
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.mesh = Mesh(np.asarray(self.devices), (DATA,))
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._unet_def, unet_state = nnx.split(unet)
    self._vae_def, vae_state = nnx.split(vae)
    self._states = jax.device_put((unet_state, vae_state), replicated)
    self._batch = NamedSharding(self.mesh, PartitionSpec(DATA))
    self._compiled: dict[tuple, Any] = {}
    # What padded sizes must be multiples of: a whole number of latents, each halved (levels - 1) times.
    self.latent_multiple = 2 ** (len(unet.config.unet.block_out_channels) - 1)
    self.pixel_multiple = vae.config.downscale * self.latent_multiple

  # ------------------------------------------------------------------------------------------ construction
  @classmethod
  def from_pretrained(cls, directory: str, *, policy=None, attention: str = "auto",
                      activation: str | Mapping[str, Any] | None = None, devices=None,
                      **settings) -> "CasSRPipeline":
    """Loads an exported directory (see the module docstring); settings override its saved defaults.

    activation: a name or config to use instead of the saved one (e.g. "bicubic").
    """
    path = os.path.join(directory, PIPELINE_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{directory}: not an exported CasSR pipeline (no {PIPELINE_FILE})")
    with open(path) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"{path}: unsupported pipeline format {meta.get('format')!r} (expected {FORMAT_VERSION})")
    load = lambda name: checkpoint.load_model(os.path.join(directory, name), policy=policy, attention=attention)
    unet, vae, text_encoder = load("unet"), load("vae"), load("text_encoder")
    tokenizer = load_tokenizer(os.path.join(directory, "tokenizer"))
    act_config = dict(meta["activation"]) if activation is None else (
        {"name": activation} if isinstance(activation, str) else dict(activation))
    built = build_activation(_resolve_paths(act_config, directory))
    defaults = Settings(**meta.get("settings", {})).replace(**settings)
    return cls(unet, vae, text_encoder, tokenizer, built, activation_config=act_config,
               schedule_config=load_schedule_config(directory), settings=defaults, devices=devices)

  def save_pretrained(self, directory: str) -> None:
    """Writes one self-contained directory (replaced atomically)."""
    export_pipeline(directory, unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, activation=self.activation_config,
                    activation_model=(self.activation.model if self.activation_config.get("name") == "rrdbnet"
                                      else None),
                    schedule_config=self.schedule_config, settings=self.settings)

  # ------------------------------------------------------------------------------------------------- calls
  def __call__(self, images, *, seed: int = 0, image_ids: Sequence[int] | None = None, output: str = "uint8",
               batch_size: int | None = None, **settings) -> list[np.ndarray]:
    """Super-resolves `images` (a list of (h, w, 3) uint8/float arrays, or one (B, h, w, 3) array).

    Settings (Settings fields) override the pipeline's defaults for this call: steps, sampler,
    guidance_scale, negative_prompt, prompt, scale, color_fix, start_from_lr, strength, latent_tile,
    latent_overlap, vae_tile, vae_overlap, tile_batch, karras.
    seed / image_ids: image i uses the noise of fold_in(key(seed), image_ids[i]) (threefry) (default ids 0..n-1).
    output: "uint8" or "float" ((H, W, 3) float32 in [0, 1]). batch_size: images per compiled call
    (default: the device count); batches are padded to a multiple of the device count.
    """
    if output not in ("uint8", "float"):
      raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    opts = self.settings.replace(**settings)
    if hasattr(images, "ndim"):
      images = [images] if images.ndim == 3 else list(images)
    images = [to_float01(np.asarray(im)) for im in images]
    ids = list(range(len(images))) if image_ids is None else [int(i) for i in image_ids]
    if len(ids) != len(images):
      raise ValueError(f"{len(ids)} image_ids for {len(images)} images")
    for i, im in enumerate(images):
      if im.ndim != 3 or im.shape[-1] != 3:
        raise ValueError(f"image {ids[i]}: expected (h, w, 3) RGB, got shape {im.shape}")
    n_dev = len(self.devices)
    batch_size = _round_up(batch_size or n_dev, n_dev)
    results: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
      by_shape.setdefault(im.shape, []).append(i)
    for indices in by_shape.values():
      for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        outs = self._run_batch(np.stack([images[i] for i in chunk]), [ids[i] for i in chunk], seed, opts)
        for i, out in zip(chunk, outs):
          results[i] = out if output == "float" else _to_uint8_by_rows(out)
    return results

  def output_size(self, h: int, w: int, scale: float) -> tuple[int, int]:
    return max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)

  def references(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stage-1 references for an LR batch, resized to `size` (bicubic, antialiased when shrinking)."""
    ref = np.asarray(self.activation(jnp.asarray(lr, jnp.float32)), np.float32)
    if ref.shape[1:3] != tuple(size):
      shrink = ref.shape[1] > size[0] or ref.shape[2] > size[1]
      ref = np.asarray(jnp.clip(resize_bicubic(jnp.asarray(ref), size, antialias=shrink), 0.0, 1.0))
    return ref

  def _run_batch(self, lr: np.ndarray, ids: list[int], seed: int, opts: Settings) -> np.ndarray:
    b, h, w, _ = lr.shape
    out_h, out_w = self.output_size(h, w, opts.scale)
    m = self.pixel_multiple
    ph, pw = _round_up(out_h, m), _round_up(out_w, m)
    # The LR is upsampled inside the compiled program, so no full-size copy of it exists outside; only a
    # stage-1 reference (made by an arbitrary activation) comes in at the output size.
    ref = None
    if self._uses_reference():
      ref = np.pad(self.references(lr, (out_h, out_w)), ((0, 0), (0, ph - out_h), (0, pw - out_w), (0, 0)),
                   mode=_pad_mode(out_h, out_w))
    root = jax.random.key(seed, impl=PRNG_IMPL)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(root, i))) for i in ids])
    total = _round_up(b, len(self.devices))
    if total > b:  # pad the batch to the device count with copies of the last image (outputs dropped)
      extra = lambda a: None if a is None else np.concatenate([a, np.repeat(a[-1:], total - b, axis=0)])
      lr, ref, keys = extra(lr), extra(ref), extra(keys)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    positive = jax.device_put(self.prompts(opts.prompt), replicated)
    negative = jax.device_put(self.prompts(opts.negative_prompt), replicated)
    fn = self._compiled_fn(opts, (total, h, w))
    put = lambda a: None if a is None else jax.device_put(a, self._batch)
    lr, ref = put(lr), put(ref)  # drops the host copy of the reference before the program runs
    out = fn(self._states, lr, ref, put(keys), positive, negative)
    del lr, ref
    return np.asarray(out)[:b, :out_h, :out_w]

  def _uses_reference(self) -> bool:
    return self.unet.config.reference_source == "activation" and self.unet.config.multiple_attention

  def compiled_memory(self, batch: int, out_h: int, out_w: int, **settings) -> dict[str, int]:
    """XLA's memory analysis (bytes) of the stage-2 program for `batch` outputs of about out_h x out_w (the LR
    size is out / scale, rounded; compiles, does not run): arguments (weights + inputs), outputs,
    temporaries and their sum, per device."""
    opts = self.settings.replace(**settings)
    h, w = (max(int(round(s / opts.scale)), 1) for s in (out_h, out_w))
    out_h, out_w = self.output_size(h, w, opts.scale)
    m = self.pixel_multiple
    total, ph, pw = _round_up(batch, len(self.devices)), _round_up(out_h, m), _round_up(out_w, m)
    lr = jax.ShapeDtypeStruct((total, h, w, 3), jnp.float32, sharding=self._batch)
    ref = (jax.ShapeDtypeStruct((total, ph, pw, 3), jnp.float32, sharding=self._batch)
           if self._uses_reference() else None)
    key_shape = jax.random.key_data(jax.random.key(0, impl=PRNG_IMPL)).shape
    keys = jax.ShapeDtypeStruct((total,) + key_shape, jnp.uint32, sharding=self._batch)
    ctx = self.prompts(opts.prompt)
    stats = self._compiled_fn(opts, (total, h, w)).lower(self._states, lr, ref, keys, ctx, ctx).compile()
    stats = stats.memory_analysis()
    out = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
           "temporaries": int(stats.temp_size_in_bytes)}
    out["total"] = sum(out.values())
    return out

  def _compiled_fn(self, opts: Settings, shape: tuple[int, int, int]):
    cache_key = (opts, shape)
    if cache_key not in self._compiled:
      b, h, w = shape
      self._compiled[cache_key] = jax.jit(self._make_sr_fn(opts, self.output_size(h, w, opts.scale)),
                                          out_shardings=self._batch)
    return self._compiled[cache_key]

  def _make_sr_fn(self, opts: Settings, out_size: tuple[int, int]):
    unet_def, vae_def, schedule = self._unet_def, self._vae_def, self.schedule
    plan = make_plan(opts.sampler, schedule, opts.steps, strength=opts.strength if opts.start_from_lr else 1.0,
                     karras=opts.karras)
    latent_tile = self._check_tile(opts.latent_tile, "latent_tile")
    vae_tile = self._check_tile(opts.vae_tile, "vae_tile")
    factor = self.vae.config.downscale

    out_h, out_w = out_size
    m = self.pixel_multiple
    ph, pw = _round_up(out_h, m), _round_up(out_w, m)

    def sr(states, lr, ref, keys, positive, negative):
      unet, vae = nnx.merge(unet_def, states[0]), nnx.merge(vae_def, states[1])
      b = lr.shape[0]
      # pad(clip(bicubic(lr))) as a lazy image: each tile computes its pixels, no full-size copy exists.
      lr_up = UpsampledLR(lr, (out_h, out_w), (ph, pw), _pad_mode(out_h, out_w))
      if ref is None:
        ref = lr_up
      keys = jax.vmap(lambda k: jax.random.wrap_key_data(k, impl=PRNG_IMPL))(keys)
      def guided(x, t, contexts, lr, rf):  # CFG on a tile: only a tile batch, never the image, is doubled
        return cfg_denoiser(lambda x, t, c, lr, rf: unet(x, t, c, lr, rf), contexts, opts.guidance_scale,
                            extra=(lr, rf))(x, t)

      apply = tiled_denoiser(guided, tile=latent_tile, overlap=opts.latent_overlap, tile_batch=opts.tile_batch,
                             image_scale=factor)
      contexts = tuple(jnp.broadcast_to(c, (b,) + c.shape[1:]) for c in (negative, positive))
      denoise = lambda x, t: apply(x, t, contexts, lr_up, ref)
      start = None
      if opts.start_from_lr:
        start = tiled_vae_encode(vae, lr_up.affine(2.0, -1.0), tile=None if vae_tile is None else vae_tile * factor,
                                 overlap=opts.vae_overlap * factor)
      decode = lambda latents: tiled_vae_decode(vae, latents, tile=vae_tile, overlap=opts.vae_overlap)
      return sample_images(denoise, keys, plan, latent_shape=(ph // factor, pw // factor, vae.config.latent_channels),
                           decode=decode, start_latents=start,
                           finish=lambda images: color_fix_tiles(images, lr_up.crop, opts.color_fix,
                                                                 finish=lambda fixed: jnp.clip(fixed, 0.0, 1.0)))

    return sr

  def _check_tile(self, tile: int | None, what: str) -> int | None:
    if tile is None:
      return None
    if tile < self.latent_multiple or tile % self.latent_multiple:
      raise ValueError(f"{what}={tile} must be a positive multiple of {self.latent_multiple} latent pixels")
    return int(tile)


def _to_uint8_by_rows(image: np.ndarray, rows: int = 128) -> np.ndarray:
  """to_uint8 a band of rows at a time (its float temporaries stay small for a large output)."""
  out = np.empty(image.shape, np.uint8)
  for start in range(0, image.shape[0], rows):
    out[start:start + rows] = to_uint8(image[start:start + rows])
  return out


def _pad_mode(out_h: int, out_w: int) -> str:
  """Padding of images to the size the VAE and U-Net need: mirrored, or repeated when 1 pixel wide."""
  return "reflect" if min(out_h, out_w) > 1 else "edge"


def _resolve_paths(config: Mapping[str, Any], directory: str) -> dict[str, Any]:
  """Activation options naming a file or folder inside the exported directory become absolute paths."""
  out = dict(config)
  for key, value in config.items():
    if isinstance(value, str) and value.startswith("./") and os.path.exists(os.path.join(directory, value)):
      out[key] = os.path.join(directory, value)
  return out


def export_pipeline(directory: str, *, unet, vae, text_encoder, tokenizer, activation: str | Mapping[str, Any],
                    activation_model=None, schedule_config: ScheduleConfig | None = None,
                    settings: Settings | None = None) -> None:
  """Writes a self-contained pipeline directory (everything into a temporary sibling, then renamed).

  activation: name or config ({"name": ..., options}); activation_model: its weights (an nnx model with a
  MODEL_KIND-registered type, e.g. RRDBNet), saved to activation/ and referenced from the config.
  """
  act = {"name": activation} if isinstance(activation, str) else dict(activation)
  with checkpoint.atomic_directory(directory) as tmp:
    checkpoint.save_model(os.path.join(tmp, "unet"), unet, "cassr_unet", unet.config)
    checkpoint.save_model(os.path.join(tmp, "vae"), vae, "vae", vae.config)
    checkpoint.save_model(os.path.join(tmp, "text_encoder"), text_encoder, "clip_text", text_encoder.config)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    if activation_model is not None:
      model_type = _model_type(activation_model)
      checkpoint.save_model(os.path.join(tmp, "activation"), activation_model, model_type, activation_model.config)
      act["weights"] = "./activation"
    with open(os.path.join(tmp, SCHEDULER_FILE), "w") as f:
      json.dump(dataclasses.asdict(schedule_config or ScheduleConfig()), f, indent=2)
    meta = {"format": FORMAT_VERSION, "activation": act,
            "settings": dataclasses.asdict(settings or Settings())}
    with open(os.path.join(tmp, PIPELINE_FILE), "w") as f:
      json.dump(meta, f, indent=2)


def _model_type(model) -> str:
  """The registry name of a model instance (model.json's model_type), from its module's MODEL_KIND."""
  from cassr_jax.registry import MODELS  # pylint: disable=import-outside-toplevel
  for name in MODELS.names():
    kind = MODELS.get(name)
    if isinstance(getattr(model, "config", None), kind.config_cls) and type(model).__module__.endswith(name):
      return name
  raise ValueError(f"cannot save a {type(model).__name__} as an activation model: no registered model type")


# ------------------------------------------------------------------------------------------ folders of files
@dataclasses.dataclass
class BatchReport:
  written: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (input, reason)


def find_images(specs: Sequence[str]) -> list[tuple[str, str]]:
  """(path, output-relative name) for every image named by `specs` (files, folders searched recursively,
  or glob patterns), sorted and without duplicates. Unknown names raise FileNotFoundError."""
  import glob  # pylint: disable=import-outside-toplevel

  from cassr_jax.data.images import IMAGE_EXTENSIONS  # pylint: disable=import-outside-toplevel

  found: dict[str, str] = {}
  for spec in specs:
    if os.path.isdir(spec):
      for root, _, files in os.walk(spec):
        for name in files:
          if name.lower().endswith(IMAGE_EXTENSIONS):
            full = os.path.join(root, name)
            found.setdefault(full, os.path.relpath(full, spec))
    elif os.path.isfile(spec):
      found.setdefault(spec, os.path.basename(spec))
    elif glob.has_magic(spec):
      matches = [m for m in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(m)]
      if not matches:
        raise FileNotFoundError(f"{spec}: the pattern matches no file")
      for m in matches:
        found.setdefault(m, os.path.basename(m))
    else:
      raise FileNotFoundError(f"{spec}: no such file or folder")
  return sorted(found.items(), key=lambda item: item[1] + "\0" + item[0])


def output_path(out_dir: str, relative: str, suffix: str = "") -> str:
  return os.path.join(out_dir, os.path.splitext(relative)[0] + suffix + ".png")


def process_share(items: Sequence[Any], process_index: int | None = None,
                  process_count: int | None = None) -> list[Any]:
  """This host's share of a job list (every process_count-th item): the hosts' shares are disjoint."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return list(items[index::count])


def super_resolve_files(pipe: CasSRPipeline, jobs: Sequence[tuple[int, str, str]], *, seed: int = 0,
                        batch_size: int | None = None, overwrite: bool = False, progress: bool = True,
                        **settings) -> BatchReport:
  """Runs `pipe` over jobs (image id, input path, output path): PNGs written atomically, existing outputs
  kept unless overwrite, an output that would replace its input refused, unreadable files reported and
  skipped. The image id seeds the image's noise (pass its index in the whole job list, so results do not
  depend on batching or on how the list is split between hosts)."""
  from cassr_jax.data import images as image_io  # pylint: disable=import-outside-toplevel

  report = BatchReport()
  batch_size = batch_size or len(pipe.devices)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(jobs), unit="image", disable=None)
  pending: list[tuple[int, str, str, np.ndarray]] = []

  def flush():
    groups: dict[tuple, list] = {}
    for job in pending:
      groups.setdefault(job[3].shape, []).append(job)
    for group in groups.values():
      try:
        outs = pipe([j[3] for j in group], seed=seed, image_ids=[j[0] for j in group], batch_size=batch_size,
                    **settings)
      except (ValueError, RuntimeError) as e:  # e.g. an image too small for the model: report, go on
        report.failed += [(j[1], str(e)) for j in group]
        continue
      for (_, path, target, _), out in zip(group, outs):
        try:
          os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
          image_io.write_png(target, out)
          report.written.append(target)
        except OSError as e:
          report.failed.append((path, f"writing {target}: {e}"))
    if bar is not None:
      bar.update(len(pending))
    pending.clear()

  for image_id, path, target in jobs:
    if os.path.exists(target) and os.path.samefile(target, path):
      report.failed.append((path, f"the output {target} would overwrite the input"))
    elif os.path.exists(target) and not overwrite:
      report.skipped.append(target)
    else:
      try:
        pending.append((image_id, path, target, image_io.read_image(path)))
        if len(pending) >= batch_size:
          flush()
        continue
      except (image_io.ImageError, OSError) as e:
        report.failed.append((path, str(e)))
    if bar is not None:
      bar.update(1)
  if pending:
    flush()
  if bar is not None:
    bar.close()
  return report
