"""The component table shared by the converters: which of our model types each pipeline component becomes,
how its source config and weights are named, and the strict load + save of one component.

cassr_jax.convert.diffusers (directories, hub ids) and cassr_jax.convert.single_file (LDM files) both build on
it. Adding a model kind is one COMPONENTS entry: its subfolder, weight file stems, config parser and model type.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.convert import keys
from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import load_torch_state
from cassr_jax.jax_compat import eval_shape
from cassr_jax.nn.layers import Policy
from cassr_jax.registry import MODELS

DIFFUSERS_STEM = "diffusion_pytorch_model"
TRANSFORMERS_STEMS = ("model", "pytorch_model")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """How one pipeline component maps onto one of our registered model types."""
  name: str                      # subfolder in a diffusers pipeline and in our output
  model_type: str                # cassr_jax.registry.MODELS key
  config_parser: str             # classmethod of the config class that reads the source config.json dict
  weight_stems: tuple[str, ...]  # file stems of the weights, in order of preference
  class_names: tuple[str, ...]   # "_class_name" (diffusers) / "architectures" (transformers) that identify it
  # (our torch-convention key) -> candidate source keys, tried in order (older layouts, optional prefixes).
  aliases: Callable[[str], Sequence[str]] = lambda key: (key,)
  ignore_unexpected: tuple[str, ...] = ()  # regexes of source keys that are buffers, not weights
  # Rewrites a source state dict into the current layout before the strict load (old names, 1x1 convs).
  preprocess: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None


COMPONENTS: dict[str, ComponentSpec] = {
    "unet": ComponentSpec("unet", "unet", "from_diffusers", (DIFFUSERS_STEM,), ("UNet2DConditionModel",)),
    "vae": ComponentSpec("vae", "vae", "from_diffusers", (DIFFUSERS_STEM,), ("AutoencoderKL",),
                         preprocess=keys.normalize_vae_state_dict),
    "text_encoder": ComponentSpec(
        "text_encoder", "clip_text", "from_transformers", TRANSFORMERS_STEMS, ("CLIPTextModel",),
        aliases=keys.clip_aliases, ignore_unexpected=(keys.CLIP_POSITION_IDS,)),
    "controlnet": ComponentSpec("controlnet", "controlnet", "from_diffusers", (DIFFUSERS_STEM,),
                                ("ControlNetModel",)),
}
DEFAULT_COMPONENTS = ("unet", "vae", "text_encoder")


def parse_components(components: str | Sequence[str] | None) -> tuple[str, ...] | None:
  if components is None:
    return None
  if isinstance(components, str):
    components = [c.strip() for c in components.split(",") if c.strip()]
  unknown = [c for c in components if c not in COMPONENTS]
  if unknown:
    raise ValueError(f"unknown components {unknown}; known: {sorted(COMPONENTS)}")
  return tuple(components)


def parse_config(spec: ComponentSpec, values: Mapping, source: str):
  """Our config dataclass from a source config dict (diffusers/transformers config.json contents)."""
  config_cls = MODELS.get(spec.model_type).config_cls
  parser = getattr(config_cls, spec.config_parser, None)
  if parser is None:
    raise CheckpointError(f"{source}: {config_cls.__name__} has no {spec.config_parser}() to read it")
  try:
    return parser(dict(values))
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"{source}: {e}") from e


def source_dtype(state_dict: Mapping[str, np.ndarray]) -> str:
  """The dtype most floating-point tensors of `state_dict` have; float32 when that is none of DTYPES."""
  counts = collections.Counter(
      np.dtype(v.dtype).name for v in state_dict.values() if jnp.issubdtype(v.dtype, jnp.floating))
  common = counts.most_common(1)[0][0] if counts else "float32"
  return common if common in DTYPES else "float32"


def check_dtype(dtype: str | None) -> None:
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES} (or None to keep the source's), got {dtype!r}")


def _abstract(model_type: str, config, policy: Policy) -> nnx.Module:
  """The model with shape-only parameters (no random init: the checkpoint supplies every value)."""
  return eval_shape(lambda: checkpoint.build_model(model_type, config, policy=policy))


def load_component(model_type: str, config, state_dict: Mapping[str, np.ndarray], *, dtype: str | None,
                   source: str, rename: Callable[[str], str] | None = None,
                   aliases: Callable[[str], Sequence[str]] | None = None,
                   ignore_unexpected: Iterable[str] = (),
                   preprocess: Callable[[dict], dict] | None = None) -> nnx.Module:
  """Builds `model_type` with `config` and fills it strictly from `state_dict`.

  dtype: parameter (and compute) dtype; None keeps the source's dtype.
  rename: our torch-convention key -> source key. aliases: candidate source keys for a key, the first present
  in `state_dict` wins (applied after rename). preprocess: rewrites the state dict first.
  """
  check_dtype(dtype)
  if preprocess is not None:
    try:
      state_dict = preprocess(dict(state_dict))
    except ValueError as e:
      raise CheckpointError(f"{source}: {e}") from e
  dtype = dtype or source_dtype(state_dict)
  policy = Policy(jnp.dtype(dtype), jnp.dtype(dtype))
  model = _abstract(model_type, config, policy)

  def resolve(key: str) -> str:
    if rename is not None:
      key = rename(key)
    if aliases is not None:
      candidates = aliases(key)
      return next((c for c in candidates if c in state_dict), candidates[0])
    return key

  load_torch_state(model, state_dict, source=source, rename=resolve, ignore_unexpected=ignore_unexpected)
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model))):
    # State other than parameters (none in our models today) needs real initial values.
    concrete = checkpoint.build_model(model_type, config, policy=policy)
    nnx.update(concrete, nnx.state(model, nnx.Param))
    model = concrete
  return model


def save_component(out_dir: str, model: nnx.Module, model_type: str, config) -> str:
  checkpoint.save_model(out_dir, model, model_type, config)
  return out_dir
