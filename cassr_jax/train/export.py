"""A training run as an inference object, and its export to one self-contained directory.

CasSR runs (config.model.kind "cassr"): the trained CasSR weights of a checkpoint plus the run's frozen parts
(VAE, text encoder, tokenizer, schedule, stage-1 activation) as a CasSRPipeline, exported to a directory that
CasSRPipeline.from_pretrained loads without the run or the original SD weights.

SCEdit runs ("scedit", stage 1): the trained tuners around the frozen SD U-Net as an SCEditActivation, exported
to an activation directory: scedit/ (the SCEditUNet, model_type "scedit"), vae/, text_encoder/, tokenizer/,
scheduler_config.json, and activation.json (the activation config, paths relative to the directory).
load_activation(directory) builds it; so does build_activation("scedit", weights=<dir>/scedit,
pretrained=<dir>), which is how the "scedit" activation finds its weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from cassr_jax import checkpoint
from cassr_jax.activation import build_activation
from cassr_jax.config import PAIRED_ACTIVATION, model_kind
from cassr_jax.pipelines.cassr import CasSRPipeline, Settings
from cassr_jax.schedulers.schedule import SCHEDULER_FILE
from cassr_jax.train.checkpointing import load_trained_model, read_run_config
from cassr_jax.train.components import build_components, converted_pretrained

ACTIVATION_FILE = "activation.json"
SCEDIT_DIR = "scedit"


def pipeline_from_run(run_dir: str, step: int | None = None, *, ema: bool = True,
                      activation: Mapping[str, Any] | None = None, **kwargs) -> CasSRPipeline:
  """CasSRPipeline of a CasSR run directory (its latest checkpoint unless `step`).

  activation: the stage-1 config ({"name": ..., options}); default the run's own, or Real-ESRGAN x4plus
  (rrdbnet) for a run that read its references from a paired set. kwargs: Settings fields and CasSRPipeline
  options (devices=...).
  """
  _require_kind(run_dir, "cassr", "an SCEdit (stage-1) run is an activation: use activation_from_run / "
                "export_run and load_activation")
  model, config = load_trained_model(run_dir, step, ema=ema)
  parts = build_components(config, run_dir)
  sample = dict(config.get("sample", {}))
  settings = Settings(prompt=config.text.prompt, negative_prompt=config.text.negative_prompt,
                      **{k: v for k, v in sample.items() if k in Settings.__dataclass_fields__})
  settings = settings.replace(**{k: kwargs.pop(k) for k in list(kwargs) if k in Settings.__dataclass_fields__})
  act_config = dict(activation or {k: v for k, v in dict(config.activation).items() if v not in ("", None)})
  if act_config.get("name") == PAIRED_ACTIVATION:
    act_config = {"name": "rrdbnet"}
  return CasSRPipeline(model, parts.vae, parts.text_encoder, parts.tokenizer, build_activation(act_config),
                       activation_config=act_config, schedule_config=parts.schedule.config, settings=settings,
                       **kwargs)


def activation_from_run(run_dir: str, step: int | None = None, *, ema: bool = True, **options):
  """SCEditActivation of an SCEdit run directory (options: SCEditActivation's, e.g. steps=, scale=)."""
  _require_kind(run_dir, "scedit", "a CasSR run is a pipeline: use pipeline_from_run / export_run")
  model, config = load_trained_model(run_dir, step, ema=ema)
  parts = build_components(config, run_dir)
  defaults = _activation_defaults(config)
  del defaults["name"], defaults["weights"]
  # The schedule comes from `pretrained` (SD-1.5's when the run built a random model).
  defaults["pretrained"] = None if config.init.random else converted_pretrained(config, run_dir)
  return build_activation("scedit", model=model, vae=parts.vae, text_encoder=parts.text_encoder,
                          tokenizer=parts.tokenizer, **{**defaults, **options})


def export_run(run_dir: str, out_dir: str, step: int | None = None, *, ema: bool = True) -> str:
  """Writes the run as one self-contained directory: a CasSR pipeline (CasSRPipeline.from_pretrained), or
  for an SCEdit run an activation directory (load_activation)."""
  if model_kind(read_run_config(run_dir)) == "scedit":
    model, config = load_trained_model(run_dir, step, ema=ema)
    parts = build_components(config, run_dir)
    with checkpoint.atomic_directory(out_dir) as tmp:
      checkpoint.save_model(os.path.join(tmp, SCEDIT_DIR), model, "scedit", model.config)
      checkpoint.save_model(os.path.join(tmp, "vae"), parts.vae, "vae", parts.vae.config)
      checkpoint.save_model(os.path.join(tmp, "text_encoder"), parts.text_encoder, "clip_text",
                            parts.text_encoder.config)
      parts.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
      with open(os.path.join(tmp, SCHEDULER_FILE), "w") as f:
        json.dump(dataclasses.asdict(parts.schedule.config), f, indent=2)
      with open(os.path.join(tmp, ACTIVATION_FILE), "w") as f:
        json.dump(_activation_defaults(config), f, indent=2)
    return out_dir
  pipeline_from_run(run_dir, step, ema=ema).save_pretrained(out_dir)
  return out_dir


def load_activation(directory: str, **options):
  """The activation of an exported SCEdit directory (options override activation.json's, e.g. steps=)."""
  path = os.path.join(directory, ACTIVATION_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not an exported activation (no {ACTIVATION_FILE})")
  with open(path) as f:
    config = json.load(f)
  for key in ("weights", "pretrained"):  # relative to the directory, so it may be moved
    if isinstance(config.get(key), str) and not os.path.isabs(config[key]):
      config[key] = os.path.normpath(os.path.join(directory, config[key]))
  return build_activation({**config, **options})


def _activation_defaults(config) -> dict[str, Any]:
  """SCEditActivation's config for a run: its weights in the export, the run's prompts, sampler and seed."""
  s = config.sample
  return {"name": "scedit", "weights": "./" + SCEDIT_DIR, "pretrained": ".", "steps": int(s.steps),
          "sampler": str(s.sampler), "guidance_scale": float(s.guidance_scale), "prompt": str(config.text.prompt),
          "negative_prompt": str(config.text.negative_prompt), "scale": int(config.data.scale),
          "seed": int(config.seed)}


def _require_kind(run_dir: str, kind: str, hint: str) -> None:
  found = model_kind(read_run_config(run_dir))
  if found != kind:
    raise ValueError(f"{run_dir}: the run trained model.kind={found!r}, not {kind!r}; {hint}")
