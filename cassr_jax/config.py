"""The run configuration of the trainer (and of inference from a run directory): defaults and validation.

Config files under configs/ are Python files with get_config() that start from `base_config()` here
(`from cassr_jax.config import base_config`), so they load from any working directory and from the installed
`cassr-train` console script. Sections:

  init      what the weights start from: exactly one of
              pretrained  a converted directory (unet/ vae/ text_encoder/ with model.json), a diffusers
                          directory, a single-file checkpoint or a hub id (converted on first use into
                          <workdir>/pretrained)
              random      a named random model built in code (RANDOM_MODELS: "tiny")
            controlnet: optional converted ControlNet directory to start the ControlNet from (default: a copy
            of the U-Net encoder); tokenizer: CLIP tokenizer directory or hub id (default: the pretrained
            source's tokenizer/); vae: optional saved VAE directory (checkpoint.save_model, e.g.
            cassr_jax.train.autoencoder.save_vae) to use as the frozen VAE instead of the one of pretrained /
            random (the demo fits one, as the tiny random model's VAE is random).
  model     kind ("cassr": the CasSR U-Net, stage 2; "scedit": the SCEdit tuners on the frozen SD U-Net, stage 1)
            plus that model's switches (CasSRConfig / SCEditConfig fields), parsed whole by the dataclass
            (unknown keys are named in the error).
  runtime   attention implementation, param_dtype (master weights), dtype (compute), remat.
  activation  stage-1 reference: {"name": ..., options}; "paired" reads references from a paired data set;
            "none" for a model that takes no reference (model.kind "scedit").
  text      the fixed prompt, the CFG negative prompt and the prompt dropout (to the empty prompt).
  data      cassr_jax.data.pipeline.default_data_config() without batch_size: the per-host batch is derived
            from train.batch_size (GLOBAL) / process count by the trainer.
  train     optimisation, logging, checkpointing, validation grids.
  mesh      data x fsdp device mesh (data = -1: every device not used by fsdp).
  distributed  jax.distributed settings (empty: auto-detect SLURM / TPU / JAX env, else one process).
  sample    inference settings.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from cassr_jax.data.pipeline import default_data_config

GENERAL_PROMPT = "clean, high-resolution"                 # paper Table 3: one fixed general prompt
NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"    # SeeSR's negative prompt
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The paper's training mixture (DIV2K, DIV8K, Flickr2K, OST, the first 10K FFHQ images) as folders of
# pre-cropped sub-images (cheap to decode), relative to the working directory; override data.sources to move it.
PAPER_SOURCES = ("folder:data/DIV2K_train_HR_sub,folder:data/DIV8K_sub,folder:data/Flickr2K_HR_sub,"
                 "folder:data/OST_sub,folder:data/FFHQ_10K")

ATTENTIONS = ("auto", "xla", "cudnn", "blockwise")
DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw")
RANDOM_MODELS = ("tiny",)
PAIRED_ACTIVATION = "paired"  # references come from the data set (scripts/make_paired_data.py --activation)
NO_ACTIVATION = "none"        # no stage-1 reference (a model that is not conditioned on one)
MODEL_KINDS = ("cassr", "scedit")


class ConfigError(ValueError):
  """A run config with problems; the message lists every problem, one per line."""


def base_config() -> ml_collections.ConfigDict:
  """The paper's settings: SD-1.5, Adam 5e-4, global batch 4, 100K steps, 512x512 HR crops."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.init = ml_collections.ConfigDict()
  c.init.pretrained = SD15_HUB_ID
  c.init.random = ""
  c.init.controlnet = ""
  c.init.tokenizer = ""
  c.init.vae = ""                           # saved VAE directory replacing init's VAE; empty: init's own

  c.model = ml_collections.ConfigDict()
  c.model.kind = "cassr"                    # or "scedit" (stage-1 tuners; configs/scedit_stage1.py)
  c.model.multiple_attention = True
  c.model.residual_add = True
  c.model.reference_source = "activation"   # or "lr" (paper ablation "LR-Image")
  c.model.conditioning_scale = 1.0

  c.runtime = ml_collections.ConfigDict()
  c.runtime.attention = "auto"
  c.runtime.param_dtype = "float32"          # fp32 master weights
  c.runtime.dtype = "bfloat16"               # compute
  c.runtime.remat = "full"                   # U-Net / ControlNet block rematerialisation policy ("none": off)

  # Stage 1: name plus that activation's options (e.g. weights for rrdbnet); "paired" = from the data set.
  c.activation = ml_collections.ConfigDict({"name": "rrdbnet"})

  c.text = ml_collections.ConfigDict()
  c.text.prompt = GENERAL_PROMPT
  c.text.negative_prompt = NEGATIVE_PROMPT
  c.text.prompt_dropout = 0.5                # train the unconditional branch for CFG (SeeSR uses 0.5)

  c.data = default_data_config()
  del c.data["batch_size"]                   # derived: train.batch_size / process count

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100_000
  c.train.batch_size = 4                     # GLOBAL batch (all hosts, all devices)
  c.train.grad_accum = 1                     # micro-batches per step (batch_size / grad_accum each)
  c.train.optimizer = "adam"
  c.train.learning_rate = 5e-4
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.weight_decay = 0.0                 # adamw only
  c.train.warmup_steps = 0
  c.train.lr_schedule = "constant"           # after warmup: constant | cosine | linear (decay to 0)
  c.train.grad_clip = 1.0                    # global-norm clip; 0 = off
  c.train.ema_decay = 0.0                    # EMA of the trained weights; 0 = off
  c.train.log_every = 50
  c.train.checkpoint_every = 2_000
  c.train.keep_checkpoints = 3
  c.train.val_every = 2_000                  # validation grid (LR | reference | sample | HR); 0 = off
  c.train.val_images = 4

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""     # "host:port"; empty: auto-detect (SLURM, TPU) or one process
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.sample = ml_collections.ConfigDict()
  c.sample.steps = 50
  c.sample.sampler = "dpmpp_2m"              # ddpm | ddim | dpmpp_2m | unipc
  c.sample.guidance_scale = 5.5
  c.sample.color_fix = "adain"               # adain | wavelet | none
  c.sample.latent_tile = 96                  # latent tile for large images (768 px)
  c.sample.latent_overlap = 32
  return c


# ------------------------------------------------------------------------------------------------ validation

# Sections validated by their owner (activation options by the factory's signature, model by the dataclass).
_FREE_SECTIONS = ("activation", "model")  # model: CasSRConfig names unknown keys itself


def tiny_config() -> ml_collections.ConfigDict:
  """The tiny random-weight CasSR (init.random = "tiny") on 64 px crops with bicubic stage 1, fp32: the config
  of configs/tiny.py (CPU tests) and the base of the demo's (cassr-demo)."""
  c = base_config()
  c.init.pretrained = ""
  c.init.random = "tiny"
  c.runtime.attention = "xla"
  c.runtime.dtype = "float32"
  c.runtime.remat = "none"
  c.activation.name = "bicubic"
  c.data.crop_size = 64
  c.data.num_workers = 0
  c.data.check_images = "none"
  c.train.batch_size = 8
  c.train.steps = 4
  c.train.learning_rate = 1e-3
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.val_every = 0
  c.train.val_images = 2
  c.sample.steps = 2
  return c


def _unknown_keys(config, reference, prefix: str) -> list[str]:
  problems = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if path == "data.batch_size":
      problems.append("data.batch_size: do not set it; train.batch_size is the GLOBAL batch and the per-host "
                      "batch is derived from it")
      continue
    if key not in reference:
      problems.append(f"{path}: unknown key (known here: {sorted(reference.keys())})")
      continue
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and path not in _FREE_SECTIONS:
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        problems.append(f"{path}: expected a section, got {value!r}")
      else:
        problems += _unknown_keys(ml_collections.ConfigDict(value) if isinstance(value, dict) else value,
                                  ref, path + ".")
  return problems


def _check(problems: list[str], ok: bool, message: str) -> None:
  if not ok:
    problems.append(message)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def model_kind(config) -> str:
  """config.model.kind ("cassr" when absent: run configs written before the switch existed)."""
  return str(config.model.get("kind", "cassr"))


def model_config_values(config) -> dict[str, Any]:
  """config.model as a plain dict without `kind` (what the model's config dataclass is parsed from)."""
  values = dict(config.model.to_dict())
  values.pop("kind", None)
  return values


def parse_model_switches(config):
  """CasSRConfig / SCEditConfig (per model.kind) with the switches of config.model; the U-Net (and
  ControlNet) shapes come from init."""
  from cassr_jax.models import config_from_dict  # pylint: disable=import-outside-toplevel

  kind = model_kind(config)
  if kind not in MODEL_KINDS:
    raise ValueError(f"config.model.kind={kind!r}: not one of {MODEL_KINDS}")
  values = model_config_values(config)
  if "unet" in values or "controlnet" in values:
    raise ValueError("config.model: 'unet'/'controlnet' shapes come from config.init, not config.model")
  if kind == "scedit":
    from cassr_jax.models.scedit import SCEditConfig  # pylint: disable=import-outside-toplevel
    return config_from_dict(SCEditConfig, values)
  from cassr_jax.models.cassr_unet import CasSRConfig  # pylint: disable=import-outside-toplevel
  return config_from_dict(CasSRConfig, values)


def uses_reference(config) -> bool:
  """Whether the trained model reads a stage-1 reference (CasSR with multiple attention on the activation)."""
  if model_kind(config) != "cassr":
    return False
  values = model_config_values(config)
  return values.get("reference_source", "activation") == "activation" and values.get("multiple_attention", True)


def _looks_like_path(s: str) -> bool:
  return s.startswith((".", "/", "~")) or os.sep in s.strip("/").split("/", 1)[-1] or s.endswith(
      (".safetensors", ".ckpt", ".bin", ".pth"))


def validate_config(config: ml_collections.ConfigDict, *, device_count: int | None = None,
                    process_count: int | None = None) -> None:
  """Checks the whole run config; raises one ConfigError listing every problem (before anything compiles).

  device_count / process_count (when known) also check that the global batch splits over them.
  """
  problems = _unknown_keys(config, base_config(), "")
  if problems:  # the rest assumes the known layout
    raise ConfigError("bad run config:\n  " + "\n  ".join(problems))
  c = config

  # init
  pretrained, random = str(c.init.pretrained or ""), str(c.init.random or "")
  _check(problems, bool(pretrained) != bool(random),
         f"init: set exactly one of init.pretrained (weights) or init.random (one of {RANDOM_MODELS}); got "
         f"pretrained={pretrained!r}, random={random!r}")
  if random:
    _check(problems, random in RANDOM_MODELS, f"init.random={random!r}: not one of {RANDOM_MODELS}")
  if pretrained and _looks_like_path(pretrained):
    _check(problems, os.path.exists(os.path.expanduser(pretrained)),
           f"init.pretrained={pretrained!r}: no such file or directory")
  for key in ("controlnet", "tokenizer"):
    value = str(c.init[key] or "")
    if value and _looks_like_path(value):
      _check(problems, os.path.exists(os.path.expanduser(value)), f"init.{key}={value!r}: no such file or directory")

  vae = str(c.init.get("vae", "") or "")
  if vae:
    from cassr_jax.checkpoint import MODEL_FILE  # pylint: disable=import-outside-toplevel
    vae_dir = os.path.expanduser(vae)
    _check(problems, os.path.isfile(os.path.join(vae_dir, MODEL_FILE)),
           f"init.vae={vae!r}: " + ("no such directory" if not os.path.isdir(vae_dir) else
                                    f"not a saved model directory (no {MODEL_FILE})"))

  # model switches (the dataclass names unknown keys and bad values)
  kind = model_kind(c)
  try:
    parse_model_switches(c)
  except (ValueError, TypeError) as e:
    problems.append(f"model: {e}")
  if kind == "scedit":
    _check(problems, not str(c.init.controlnet or ""),
           f"init.controlnet={c.init.controlnet!r}: model.kind='scedit' has no ControlNet (leave it empty)")

  # runtime
  _check(problems, c.runtime.attention in ATTENTIONS, f"runtime.attention={c.runtime.attention!r}: not one of "
         f"{ATTENTIONS}")
  for key in ("param_dtype", "dtype"):
    _check(problems, c.runtime[key] in DTYPES, f"runtime.{key}={c.runtime[key]!r}: not one of {DTYPES}")
  from cassr_jax.models import blocks  # pylint: disable=import-outside-toplevel
  remat_policies = getattr(blocks, "REMAT_POLICIES", ("none", "full"))
  _check(problems, c.runtime.remat in remat_policies,
         f"runtime.remat={c.runtime.remat!r}: not one of {tuple(remat_policies)}")

  # activation
  act = dict(c.activation.to_dict())
  name = act.pop("name", None)
  if name is None:
    problems.append("activation: needs a 'name'")
  elif kind == "scedit" or name == NO_ACTIVATION:
    # SCEdit is itself the stage-1 model: it is conditioned on the LR image and trained on the HR alone.
    _check(problems, kind == "scedit", f"activation.name={NO_ACTIVATION!r}: only for model.kind='scedit' (CasSR "
           "needs a stage-1 reference; 'bicubic' is the cheapest)")
    _check(problems, name == NO_ACTIVATION and not act,
           f"activation.name={name!r}: model.kind='scedit' takes no stage-1 reference; set activation to "
           f"{{'name': {NO_ACTIVATION!r}}}")
  elif name == PAIRED_ACTIVATION:
    _check(problems, not act, f"activation 'paired' takes no options, got {sorted(act)}")
  else:
    from cassr_jax.registry import ACTIVATIONS  # pylint: disable=import-outside-toplevel
    if name not in ACTIVATIONS:
      problems.append(f"activation.name={name!r}: unknown; known: {ACTIVATIONS.names() + [PAIRED_ACTIVATION]}")
    else:
      import inspect  # pylint: disable=import-outside-toplevel
      try:
        params = inspect.signature(ACTIVATIONS.get(name)).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
          unknown = sorted(set(act) - set(params))
          _check(problems, not unknown, f"activation {name!r}: unknown options {unknown}; accepted: "
                 f"{sorted(params)}")
      except ValueError as e:  # a listed module that does not exist yet
        problems.append(f"activation.name={name!r}: {e}")

  # text
  _check(problems, isinstance(c.text.prompt, str), f"text.prompt must be a string, got {c.text.prompt!r}")
  _check(problems, _is_number(c.text.prompt_dropout) and 0 <= c.text.prompt_dropout <= 1,
         f"text.prompt_dropout={c.text.prompt_dropout!r}: expected a number in [0, 1]")

  # data
  from cassr_jax.data import sources  # pylint: disable=import-outside-toplevel
  try:
    specs = sources.parse_sources(c.data.sources)
    for spec in specs:
      if spec.kind in ("folder", "paired"):
        _check(problems, os.path.isdir(spec.path), f"data.sources: {spec.kind} {spec.path!r}: no such directory")
    if name == PAIRED_ACTIVATION:
      _check(problems, all(s.kind == "paired" for s in specs),
             "activation 'paired' reads references from the data: every data.sources entry must be 'paired:'")
  except ValueError as e:
    problems.append(str(e))
  crop = c.data.crop_size
  _check(problems, isinstance(crop, int) and crop > 0 and crop % 64 == 0,
         f"data.crop_size={crop!r}: training needs a fixed crop, a positive multiple of 64 (VAE x8, U-Net x8)")

  # train
  t = c.train
  for key in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
              "val_images"):
    _check(problems, isinstance(t[key], int) and not isinstance(t[key], bool) and t[key] >= 1,
           f"train.{key}={t[key]!r}: expected a positive integer")
  for key in ("warmup_steps", "val_every"):
    _check(problems, isinstance(t[key], int) and t[key] >= 0, f"train.{key}={t[key]!r}: expected an integer >= 0")
  _check(problems, _is_number(t.learning_rate) and t.learning_rate > 0,
         f"train.learning_rate={t.learning_rate!r}: expected a number > 0")
  _check(problems, _is_number(t.grad_clip) and t.grad_clip >= 0, f"train.grad_clip={t.grad_clip!r}: expected >= 0")
  _check(problems, _is_number(t.ema_decay) and 0 <= t.ema_decay < 1,
         f"train.ema_decay={t.ema_decay!r}: expected 0 (off) or a number in (0, 1)")
  _check(problems, _is_number(t.weight_decay) and t.weight_decay >= 0,
         f"train.weight_decay={t.weight_decay!r}: expected >= 0")
  _check(problems, t.optimizer in OPTIMIZERS, f"train.optimizer={t.optimizer!r}: not one of {OPTIMIZERS}")
  _check(problems, t.lr_schedule in LR_SCHEDULES, f"train.lr_schedule={t.lr_schedule!r}: not one of {LR_SCHEDULES}")
  batch_ok = isinstance(t.batch_size, int) and isinstance(t.grad_accum, int) and t.grad_accum >= 1
  if batch_ok:
    _check(problems, t.batch_size % t.grad_accum == 0,
           f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if process_count:
      _check(problems, t.batch_size % process_count == 0,
             f"train.batch_size={t.batch_size} (global) is not divisible by the {process_count} processes")
    if device_count:
      micro = t.batch_size // t.grad_accum
      _check(problems, micro % device_count == 0,
             f"train.batch_size / grad_accum = {micro} (one micro-batch) must be a multiple of the "
             f"{device_count} devices it is split over")

  # sample (the validation grid samples with these)
  sm = c.sample
  _check(problems, isinstance(sm.steps, int) and not isinstance(sm.steps, bool) and sm.steps >= 1,
         f"sample.steps={sm.steps!r}: expected a positive integer")
  _check(problems, _is_number(sm.guidance_scale), f"sample.guidance_scale={sm.guidance_scale!r}: expected a number")
  from cassr_jax.registry import SAMPLERS  # pylint: disable=import-outside-toplevel
  _check(problems, sm.sampler in SAMPLERS, f"sample.sampler={sm.sampler!r}: not one of {SAMPLERS.names()}")
  from cassr_jax.color import COLOR_FIXES  # pylint: disable=import-outside-toplevel
  _check(problems, sm.color_fix in COLOR_FIXES, f"sample.color_fix={sm.color_fix!r}: not one of {COLOR_FIXES}")

  # mesh
  m = c.mesh
  _check(problems, isinstance(m.fsdp, int) and m.fsdp >= 1, f"mesh.fsdp={m.fsdp!r}: expected a positive integer")
  _check(problems, isinstance(m.data, int) and (m.data == -1 or m.data >= 1),
         f"mesh.data={m.data!r}: expected -1 (the rest) or a positive integer")
  if device_count and isinstance(m.fsdp, int) and m.fsdp >= 1 and isinstance(m.data, int):
    if m.data == -1:
      _check(problems, device_count % m.fsdp == 0, f"mesh.fsdp={m.fsdp} does not divide the {device_count} devices")
    else:
      _check(problems, m.data * m.fsdp == device_count,
             f"mesh.data x mesh.fsdp = {m.data} x {m.fsdp} != the {device_count} devices")

  d = c.distributed
  _check(problems, isinstance(d.num_processes, int) and d.num_processes >= 0,
         f"distributed.num_processes={d.num_processes!r}: expected an integer >= 0")
  if problems:
    raise ConfigError("bad run config:\n  " + "\n  ".join(problems))


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run config as JSON-able data (tuples become lists), for <workdir>/config.json."""
  def plain(v):
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    if dataclasses.is_dataclass(v):
      return plain(dataclasses.asdict(v))
    return v
  return plain(config.to_dict())


def config_from_json_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """Inverse of config_to_json_dict (keys unknown to this version are kept; validate_config names them)."""
  return ml_collections.ConfigDict(values)
