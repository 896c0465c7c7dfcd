"""Conversion of diffusers / transformers checkpoints (a directory or a Hugging Face hub id) to our models.

Sources understood:
  * a diffusers pipeline directory (model_index.json; unet/, vae/, text_encoder/, controlnet/, tokenizer/),
  * one component directory (config.json + diffusion_pytorch_model.* or transformers model.* / pytorch_model.*,
    single file or sharded with an index, optionally a variant such as fp16),
  * a hub id (downloaded with huggingface_hub.snapshot_download, only the files needed),
  * a single-file LDM checkpoint (.safetensors / .ckpt), handed to cassr_jax.convert.single_file.
Each converted component is written as its own model directory (cassr_jax.checkpoint.save_model) under
out_dir/<component>; tokenizer files are copied to out_dir/tokenizer, scheduler/scheduler_config.json to
out_dir/scheduler_config.json.

safetensors sources are read as numpy and never import torch; pickles are read with torch's weights_only mode.
The component table (which model each subfolder becomes) is cassr_jax.convert.components.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

from cassr_jax.convert import single_file
from cassr_jax.convert.components import (COMPONENTS, DEFAULT_COMPONENTS, ComponentSpec, check_dtype,
                                          load_component, parse_components, parse_config, save_component)
from cassr_jax.convert.state_dict import CheckpointError, read_state_dict

CONFIG_FILE = "config.json"
PIPELINE_INDEX = "model_index.json"
TOKENIZER_DIR = "tokenizer"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"  # copied to out_dir/scheduler_config.json
DIFFUSERS_STEM = "diffusion_pytorch_model"
TRANSFORMERS_STEMS = ("model", "pytorch_model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------- configs


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e


# ----------------------------------------------------------------------------------------------- weights


def _with_variant(filename: str, variant: str | None) -> str:
  """diffusers/transformers variant naming: the variant goes before the last extension."""
  if not variant:
    return filename
  head, ext = filename.rsplit(".", 1)
  return f"{head}.{variant}.{ext}"


def weight_candidates(stems: Iterable[str], variant: str | None = None) -> list[str]:
  """File names (single file, then sharded index) in order of preference: safetensors before pickles."""
  out = []
  for suffix in WEIGHT_SUFFIXES:
    for stem in stems:
      out.append(_with_variant(stem + suffix, variant))
      out.append(_with_variant(stem + suffix + ".index.json", variant))
  return out


def read_component_weights(directory: str, stems: Iterable[str],
                           variant: str | None = None) -> tuple[dict[str, np.ndarray], str]:
  """Reads a component's weights (single file or sharded index); returns them and the file read."""
  tried = weight_candidates(stems, variant)
  for name in tried:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith(".index.json"):
      return read_state_dict(path), path
    shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
    if not shards:
      raise CheckpointError(f"{path}: index has an empty weight_map")
    out = {}
    for shard in shards:
      out.update(read_state_dict(os.path.join(directory, shard)))
    return out, path
  present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  raise CheckpointError(f"{directory}: no weights found (looked for {tried}; the folder has {present})")


# ----------------------------------------------------------------------------------------------- directories


def detect_component(config: Mapping, path: str) -> ComponentSpec:
  """Which component a config.json describes (diffusers _class_name or transformers architectures)."""
  names = [config.get("_class_name")] + list(config.get("architectures") or [])
  for spec in COMPONENTS.values():
    if any(n in spec.class_names for n in names if n):
      return spec
  if config.get("model_type") == "clip_text_model":
    return COMPONENTS["text_encoder"]
  known = sorted(n for s in COMPONENTS.values() for n in s.class_names)
  raise CheckpointError(f"{path}: unsupported model class {[n for n in names if n] or 'unknown'}; "
                        f"supported: {known}")


def convert_component_dir(src_dir: str, out_dir: str, *, component: str | None = None,
                          dtype: str | None = None, variant: str | None = None) -> nnx.Module:
  """Converts one component directory (config.json + weights) to our model directory `out_dir`."""
  config_path = os.path.join(src_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{src_dir}: no {CONFIG_FILE}; not a diffusers/transformers model directory")
  values = _read_json(config_path)
  spec = COMPONENTS[component] if component else detect_component(values, config_path)
  config = parse_config(spec, values, config_path)
  state_dict, weights_path = read_component_weights(src_dir, spec.weight_stems, variant)
  model = load_component(spec.model_type, config, state_dict, dtype=dtype, source=weights_path,
                         aliases=spec.aliases, ignore_unexpected=spec.ignore_unexpected,
                         preprocess=spec.preprocess)
  save_component(out_dir, model, spec.model_type, config)
  return model


def convert_diffusers_dir(src_dir: str, out_dir: str, *, components: str | Sequence[str] | None = None,
                          dtype: str | None = None, variant: str | None = None) -> dict[str, str]:
  """Converts a pipeline directory or one component directory; returns {component: our model dir}.

  components: which to convert (default: every supported one the source has). Tokenizer files are copied
  to out_dir/tokenizer when the text encoder is converted from a pipeline that has them.
  """
  check_dtype(dtype)
  wanted = parse_components(components)
  if not os.path.isdir(src_dir):
    raise CheckpointError(f"{src_dir}: no such directory")
  results = {}
  if os.path.isfile(os.path.join(src_dir, CONFIG_FILE)) and not os.path.isfile(
      os.path.join(src_dir, PIPELINE_INDEX)):
    spec = detect_component(_read_json(os.path.join(src_dir, CONFIG_FILE)), os.path.join(src_dir, CONFIG_FILE))
    if wanted is not None and spec.name not in wanted:
      raise CheckpointError(f"{src_dir}: holds a {spec.name} only, but {list(wanted)} were asked for")
    target = os.path.join(out_dir, spec.name)
    convert_component_dir(src_dir, target, component=spec.name, dtype=dtype, variant=variant)
    return {spec.name: target}
  present = [name for name in COMPONENTS if os.path.isfile(os.path.join(src_dir, name, CONFIG_FILE))]
  if wanted is None:
    wanted = tuple(present)
  missing = [c for c in wanted if c not in present]
  if missing or not wanted:
    raise CheckpointError(
        f"{src_dir}: no {missing or list(COMPONENTS)} component with a {CONFIG_FILE} "
        f"(found components {present}, entries {sorted(os.listdir(src_dir))})")
  for name in wanted:
    target = os.path.join(out_dir, name)
    convert_component_dir(os.path.join(src_dir, name), target, component=name, dtype=dtype, variant=variant)
    results[name] = target
  tokenizer = os.path.join(src_dir, TOKENIZER_DIR)
  if "text_encoder" in wanted and os.path.isdir(tokenizer):
    shutil.copytree(tokenizer, os.path.join(out_dir, TOKENIZER_DIR), dirs_exist_ok=True)
    results[TOKENIZER_DIR] = os.path.join(out_dir, TOKENIZER_DIR)
  scheduler = os.path.join(src_dir, SCHEDULER_CONFIG)
  if os.path.isfile(scheduler):  # the noise schedule the samplers read (cassr_jax.schedulers.load_schedule_config)
    target = os.path.join(out_dir, os.path.basename(SCHEDULER_CONFIG))
    shutil.copyfile(scheduler, target + ".tmp")
    os.replace(target + ".tmp", target)
  return results


# ----------------------------------------------------------------------------------------------- hub


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(source: str) -> bool:
  return bool(_HUB_ID.fullmatch(source)) and not os.path.exists(source)


def hub_allow_patterns(components: Sequence[str], variant: str | None, suffix: str) -> list[str]:
  """Only the files a conversion reads: index/configs, the weights in one format, the tokenizer."""
  patterns = [PIPELINE_INDEX, CONFIG_FILE]
  folders = [""] + [COMPONENTS[c].name + "/" for c in components]
  for folder in folders:
    specs = [COMPONENTS[c] for c in components] if not folder else [COMPONENTS[folder[:-1]]]
    stems = dict.fromkeys(s for spec in specs for s in spec.weight_stems)
    if folder:
      patterns.append(folder + CONFIG_FILE)
    for stem in stems:
      patterns.append(folder + _with_variant(stem + suffix, variant))
      patterns.append(folder + _with_variant(stem + suffix + ".index.json", variant))
      patterns.append(folder + (f"{stem}.{variant}-*{suffix}" if variant else f"{stem}-*-of-*{suffix}"))
  if "text_encoder" in components:
    patterns.append(TOKENIZER_DIR + "/*")
  patterns.append(SCHEDULER_CONFIG)
  return patterns


def _has_weights(directory: str, stems: Sequence[str], variant: str | None) -> bool:
  return any(os.path.isfile(os.path.join(directory, n)) for n in weight_candidates(stems, variant))


def download(repo_id: str, *, components: Sequence[str] = DEFAULT_COMPONENTS, revision: str | None = None,
             variant: str | None = None) -> str:
  """Downloads what converting `repo_id` needs (safetensors, or .bin where a component has no safetensors)."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  kwargs = dict(repo_id=repo_id, revision=revision)
  try:
    local = huggingface_hub.snapshot_download(
        allow_patterns=hub_allow_patterns(components, variant, ".safetensors"), **kwargs)
    lacking = []
    for name in components:
      sub = os.path.join(local, COMPONENTS[name].name)
      if os.path.isfile(os.path.join(sub, CONFIG_FILE)) and not _has_weights(
          sub, COMPONENTS[name].weight_stems, variant):
        lacking.append(name)
    root_single = os.path.isfile(os.path.join(local, CONFIG_FILE))
    if root_single and not _has_weights(
        local, [s for c in components for s in COMPONENTS[c].weight_stems], variant):
      lacking = list(components)
    if lacking:
      local = huggingface_hub.snapshot_download(
          allow_patterns=hub_allow_patterns(lacking, variant, ".bin"), **kwargs)
  except Exception as e:  # network, auth, missing repo/revision: all end the conversion the same way
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{repo_id}: not a local file or directory, and could not download it from the "
                          f"Hugging Face hub ({type(e).__name__}: {e})") from e
  return local


# ----------------------------------------------------------------------------------------------- entry point


def convert(source: str, out_dir: str, *, components: str | Sequence[str] | None = None,
            dtype: str | None = None, revision: str | None = None, variant: str | None = None,
            configs: Mapping[str, Mapping] | None = None) -> dict[str, str]:
  """Converts `source` (diffusers dir, component dir, single-file checkpoint or hub id) under `out_dir`.

  Returns {component: model directory}; each loads with cassr_jax.checkpoint.load_model.
  configs: single-file only, per-component source-format config dicts replacing the embedded SD-1.5 ones.
  """
  check_dtype(dtype)
  source = os.fspath(source)
  if os.path.isfile(source):
    return single_file.convert_single_file(source, out_dir, components=components, dtype=dtype,
                                           configs=configs)
  if configs:
    raise ValueError("configs= replaces the embedded configs of single-file checkpoints only; directories and "
                     "hub repos carry their own config.json")
  if os.path.isdir(source):
    return convert_diffusers_dir(source, out_dir, components=components, dtype=dtype, variant=variant)
  if is_hub_id(source):
    wanted = parse_components(components) or DEFAULT_COMPONENTS
    local = download(source, components=wanted, revision=revision, variant=variant)
    return convert_diffusers_dir(local, out_dir, components=components, dtype=dtype, variant=variant)
  raise CheckpointError(f"{source}: no such file or directory, and not a Hugging Face hub id (owner/name)")
