"""A training run as an inference pipeline: the trained CasSR weights of a checkpoint plus the run's frozen
parts (VAE, text encoder, tokenizer, schedule, stage-1 activation), and its export to one directory that
CasSRPipeline.from_pretrained loads without the run or the original SD weights."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cassr_jax.activation import build_activation
from cassr_jax.config import PAIRED_ACTIVATION
from cassr_jax.pipelines.cassr import CasSRPipeline, Settings
from cassr_jax.train.checkpointing import load_trained_model
from cassr_jax.train.components import build_components


def pipeline_from_run(run_dir: str, step: int | None = None, *, ema: bool = True,
                      activation: Mapping[str, Any] | None = None, **kwargs) -> CasSRPipeline:
  """CasSRPipeline of a run directory (its latest checkpoint unless `step`).

  activation: the stage-1 config ({"name": ..., options}); default the run's own, or Real-ESRGAN x4plus
  (rrdbnet) for a run that read its references from a paired set. kwargs: Settings fields and CasSRPipeline
  options (devices=...).
  """
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


def export_run(run_dir: str, out_dir: str, step: int | None = None, *, ema: bool = True) -> str:
  """Writes the run's pipeline as one self-contained directory (CasSRPipeline.from_pretrained loads it)."""
  pipeline_from_run(run_dir, step, ema=ema).save_pretrained(out_dir)
  return out_dir
