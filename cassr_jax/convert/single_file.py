"""Single-file Stable Diffusion 1.x checkpoints (LDM / CompVis layout, .safetensors or .ckpt) to our models.

A single file holds the whole pipeline under three prefixes:
  model.diffusion_model.*          U-Net   (input_blocks / middle_block / output_blocks / time_embed / out)
  first_stage_model.*              VAE     (encoder.down.N.block.M, mid.attn_1 with 1x1-conv q/k/v/proj_out, ...)
  cond_stage_model.transformer.*   CLIP text encoder (transformers names, with or without "text_model.")
plus diffusion-schedule buffers and EMA copies ("model_ema.*"), which are not weights and are skipped.
ControlNet single files (lllyasviel's .pth/.safetensors: "input_hint_block.*", "zero_convs.*",
"middle_block_out.*" and the down path in U-Net numbering, bare or under "control_model.") convert to the
"controlnet" component.
Configs are embedded (SD-1.5's diffusers/transformers config.json values), so nothing is fetched from the
hub; `configs` replaces them per component (tests use small models). SD-2 (OpenCLIP) and SDXL files are
refused with a clear error. Every other key must map: anything missing, unexpected or misshapen is an error.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flax import nnx

from cassr_jax.convert import keys
from cassr_jax.convert.components import (COMPONENTS, load_component, parse_components, parse_config,
                                          save_component)
from cassr_jax.convert.state_dict import CheckpointError, read_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX}

# LDM DDPM/LatentDiffusion buffers (noise schedule, loss weights) and EMA copies: not part of any model.
_SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor")
_SKIPPED = re.compile(r"model_ema\..*|(" + "|".join(_SCHEDULE_KEYS) + ")")
_CLIP_POSITION_IDS = re.escape(CLIP_PREFIX) + keys.CLIP_POSITION_IDS

# SD-1.5's diffusers/transformers config.json values (runwayml/stable-diffusion-v1-5, openai/clip-vit-large-patch14).
SD15_CONFIGS: dict[str, dict] = {
    "unet": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "controlnet": {
        "_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "norm_eps": 1e-5, "norm_num_groups": 32,
    },
    "vae": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-5,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
    },
}


# ----------------------------------------------------------------------------------------------- key maps
# Each maps one of our keys (diffusers/transformers naming, see strict.torch_key) to its LDM key (no prefix).

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_resnet(rest: str) -> str:
  head, _, leaf = rest.partition(".")
  return f"{_UNET_RESNET.get(head, head)}.{leaf}"


def unet_ldm_key(key: str, config) -> str:
  """U-Net key -> LDM key. config: our UNetConfig (layers per block and up-block types place the layers)."""
  n = config.layers_per_block
  if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
    index = 1 + int(m[1]) * (n + 1) + int(m[3])
    return (f"input_blocks.{index}.0.{_unet_resnet(m[4])}" if m[2] == "resnets"
            else f"input_blocks.{index}.1.{m[4]}")
  if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
    return f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op.{m[2]}"
  if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
    return f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
    return f"middle_block.1.{m[1]}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
    index = int(m[1]) * (n + 1) + int(m[3])
    return (f"output_blocks.{index}.0.{_unet_resnet(m[4])}" if m[2] == "resnets"
            else f"output_blocks.{index}.1.{m[4]}")
  if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
    block = int(m[1])
    # The upsampler follows the resnet (and the transformer, when the block has one) of the last layer.
    slot = 2 if config.up_block_types[block].startswith("CrossAttn") else 1
    return f"output_blocks.{block * (n + 1) + n}.{slot}.conv.{m[2]}"
  head, _, leaf = key.rpartition(".")
  if head in _UNET_TOP:
    return f"{_UNET_TOP[head]}.{leaf}"
  raise CheckpointError(f"no LDM name for U-Net parameter {key!r}")


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_ldm_key(key: str, config) -> str:
  """VAE key -> LDM key. config: our VAEConfig (decoder blocks are numbered from the bottom in LDM)."""
  levels = len(config.block_out_channels)
  shortcut = lambda rest: rest.replace("conv_shortcut.", "nin_shortcut.")
  if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
    return f"encoder.down.{m[1]}.block.{m[2]}.{shortcut(m[3])}"
  if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
    return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
  if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
    return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{shortcut(m[3])}"
  if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
    return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
  if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
    return f"{m[1]}.mid.block_{int(m[2]) + 1}.{shortcut(m[3])}"
  if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
                       key):
    return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
  if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
    return f"{m[1]}.norm_out.{m[2]}"
  if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
    return key
  raise CheckpointError(f"no LDM name for VAE parameter {key!r}")


def clip_ldm_key(key: str, config=None) -> str:  # pylint: disable=unused-argument
  """CLIP key -> LDM key: transformers names with the "text_model." level (SD-1.x files keep it)."""
  return keys.with_clip_prefix(key)


def controlnet_ldm_key(key: str, config) -> str:
  """ControlNet key -> LDM key: the down path and mid block in U-Net numbering, plus the hint encoder
  (convs at even indices of input_hint_block, SiLU between), zero_convs and middle_block_out."""
  if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(\w+)", key):
    if m[1] == "conv_in":
      index = 0
    elif m[1] == "conv_out":
      index = 2 * (2 * (len(config.conditioning_embedding_out_channels) - 1) + 1)
    else:
      index = 2 * (int(m[2]) + 1)
    return f"input_hint_block.{index}.{m[3]}"
  if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(\w+)", key):
    return f"zero_convs.{m[1]}.0.{m[2]}"
  if m := re.fullmatch(r"controlnet_mid_block\.(\w+)", key):
    return f"middle_block_out.0.{m[1]}"
  return unet_ldm_key(key, config)


_LDM_KEY: dict[str, Callable[[str, object], str]] = {
    "unet": unet_ldm_key, "vae": vae_ldm_key, "text_encoder": clip_ldm_key, "controlnet": controlnet_ldm_key}
CONTROLNET_PREFIX = "control_model."


def is_controlnet_file(state_dict: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(("zero_convs.", CONTROLNET_PREFIX + "zero_convs.")) for k in state_dict)


def convert_controlnet_file(path: str, out_dir: str, *, dtype: str | None = None,
                            config: Mapping | None = None, state_dict=None) -> dict[str, str]:
  """Converts a ControlNet single file (bare keys or under "control_model.") to out_dir/controlnet."""
  state_dict = read_state_dict(path, prefer=("state_dict",)) if state_dict is None else state_dict
  prefix = CONTROLNET_PREFIX if any(k.startswith(CONTROLNET_PREFIX) for k in state_dict) else ""
  # Full training checkpoints also hold the SD weights next to control_model.*: only the ControlNet is kept.
  part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  spec = COMPONENTS["controlnet"]
  values = dict(config or SD15_CONFIGS["controlnet"])
  hint = part.get("input_hint_block.0.weight")
  if config is None and hint is not None and np.ndim(hint) == 4:
    values["conditioning_channels"] = int(np.shape(hint)[1])
  parsed = parse_config(spec, values, f"{path} (controlnet config)")
  model = load_component(spec.model_type, parsed, part, dtype=dtype, source=f"{path} [controlnet]",
                               rename=lambda key: controlnet_ldm_key(key, parsed))
  target = os.path.join(out_dir, "controlnet")
  save_component(target, model, spec.model_type, parsed)
  return {"controlnet": target}
# VAE mid-attention projections are 1x1 convolutions in LDM, linear layers in diffusers.
_VAE_CONV_ATTENTION = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


# ----------------------------------------------------------------------------------------------- conversion


def _split(state_dict: Mapping[str, np.ndarray], path: str) -> dict[str, dict[str, np.ndarray]]:
  """Groups keys by component (full keys kept, for error messages); refuses other SD families and strays."""
  keys = list(state_dict)
  if any(k.startswith("cond_stage_model.model.") for k in keys):
    raise CheckpointError(
        f"{path}: an SD-2.x checkpoint (OpenCLIP text encoder under 'cond_stage_model.model.'); only SD-1.x "
        "single files are supported. Convert the diffusers-format release (a directory or hub id) instead.")
  if any(k.startswith("conditioner.embedders.") for k in keys):
    raise CheckpointError(f"{path}: an SDXL checkpoint ('conditioner.embedders.*'); only SD-1.x single files "
                          "are supported.")
  if not any(k.startswith(UNET_PREFIX) for k in keys):
    prefixes = sorted({k.split(".")[0] for k in keys})[:20]
    raise CheckpointError(f"{path}: not an LDM Stable Diffusion checkpoint (no '{UNET_PREFIX}*' keys; "
                          f"top-level names: {prefixes})")
  parts = {name: {} for name in PREFIXES}
  strays = []
  for key in keys:
    name = next((n for n, p in PREFIXES.items() if key.startswith(p)), None)
    if name is not None:
      parts[name][key] = state_dict[key]
    elif not _SKIPPED.fullmatch(key):
      strays.append(key)
  if strays:
    raise CheckpointError(f"{path}: {len(strays)} keys belong to no supported component:\n" +
                          "\n".join(f"    {k}" for k in sorted(strays)))
  return parts


def _renamer(name: str, config, part: Mapping[str, np.ndarray]) -> Callable[[str], str]:
  prefix = PREFIXES[name]
  to_ldm = _LDM_KEY[name]

  def rename(key: str) -> str:
    full = prefix + to_ldm(key, config)
    if name == "text_encoder" and full not in part:
      # Older transformers (and so older SD-1.x files) had no "text_model." level.
      legacy = prefix + keys.without_clip_prefix(full[len(prefix):])
      if legacy in part:
        return legacy
    return full

  return rename


def _default_config(name: str, state_dict: Mapping[str, np.ndarray]) -> dict:
  values = dict(SD15_CONFIGS[name])
  conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
  if name == "unet" and conv_in is not None and np.ndim(conv_in) == 4:
    values["in_channels"] = int(np.shape(conv_in)[1])  # 9 for the SD-1.5 inpainting U-Net
  return values


def prepare_part(name: str, part: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Layout fixes before the strict load: the VAE's 1x1-conv attention weights become linear weights."""
  part = dict(part)
  if name == "vae":
    for key, value in part.items():
      if _VAE_CONV_ATTENTION.fullmatch(key[len(VAE_PREFIX):]) and np.ndim(value) in (3, 4):
        part[key] = np.asarray(value).reshape(np.shape(value)[:2])
  return part


def load_single_file_component(name: str, part: Mapping[str, np.ndarray], config_values: Mapping, *,
                               dtype: str | None, source: str) -> tuple[nnx.Module, object]:
  """Builds component `name` from its LDM keys (full keys, prefix included); returns (model, config)."""
  spec = COMPONENTS[name]
  config = parse_config(spec, config_values, f"{source} ({name} config)")
  part = prepare_part(name, part)
  model = load_component(
      spec.model_type, config, part, dtype=dtype, source=f"{source} [{name}]",
      rename=_renamer(name, config, part),
      ignore_unexpected=(_CLIP_POSITION_IDS,) if name == "text_encoder" else ())
  return model, config


def convert_single_file(path: str, out_dir: str, *, components: str | Sequence[str] | None = None,
                        dtype: str | None = None, configs: Mapping[str, Mapping] | None = None) -> dict[str, str]:
  """Converts an SD-1.x single-file checkpoint to out_dir/{unet,vae,text_encoder}; returns those paths.

  configs: per-component source-format config dicts (diffusers / transformers config.json contents)
  replacing the embedded SD-1.5 ones.
  """
  path = os.fspath(path)
  configs = dict(configs or {})
  unknown = sorted(set(configs) - set(PREFIXES) - {"controlnet"})
  if unknown:
    raise ValueError(f"configs: unknown components {unknown}; single files hold {sorted(PREFIXES)} "
                     "or a ControlNet")
  wanted = parse_components(components) or tuple(PREFIXES)
  unsupported = [c for c in wanted if c not in PREFIXES and c != "controlnet"]
  if unsupported:
    raise CheckpointError(f"{path}: single-file checkpoints hold {sorted(PREFIXES)}, not {unsupported}")
  state_dict = read_state_dict(path, prefer=("state_dict",))
  if is_controlnet_file(state_dict):
    if components and set(wanted) != {"controlnet"}:
      raise CheckpointError(f"{path}: a ControlNet checkpoint; it holds only the 'controlnet' component")
    return convert_controlnet_file(path, out_dir, dtype=dtype, config=configs.get("controlnet"),
                                   state_dict=state_dict)
  if "controlnet" in wanted:
    raise CheckpointError(f"{path}: an SD checkpoint without ControlNet weights ('zero_convs.*')")
  parts = _split(state_dict, path)
  empty = [c for c in wanted if not parts[c]]
  if empty:
    raise CheckpointError(f"{path}: no weights for {empty} (expected keys under "
                          f"{[PREFIXES[c] for c in empty]})")
  results = {}
  for name in wanted:
    values = configs.get(name) or _default_config(name, state_dict)
    model, config = load_single_file_component(name, parts[name], values, dtype=dtype, source=path)
    target = os.path.join(out_dir, name)
    save_component(target, model, COMPONENTS[name].model_type, config)
    results[name] = target
    del model
  return results


# ----------------------------------------------------------------------------------------------- export


def to_ldm_state_dict(parts: Mapping[str, Mapping[str, np.ndarray]],
                      configs: Mapping[str, Mapping] | None = None) -> dict[str, np.ndarray]:
  """Inverse conversion: diffusers/transformers state dicts {component: state dict} -> one LDM state dict.

  VAE mid-attention weights become 1x1 convs as LDM stores them. configs: source-format config dicts
  (default: the embedded SD-1.5 ones). Used to write single files and by the tests.
  """
  configs = dict(configs or {})
  out = {}
  for name, state_dict in parts.items():
    spec = COMPONENTS[name]
    config = parse_config(spec, configs.get(name) or SD15_CONFIGS[name], f"{name} config")
    for key, value in state_dict.items():
      if name == "text_encoder" and keys.is_clip_position_ids(key):
        continue
      ldm = _LDM_KEY[name](key, config)
      if name == "vae" and _VAE_CONV_ATTENTION.fullmatch(ldm) and np.ndim(value) == 2:
        value = np.asarray(value)[:, :, None, None]
      out[PREFIXES.get(name, "") + ldm] = value  # ControlNet files keep bare keys
  return out
