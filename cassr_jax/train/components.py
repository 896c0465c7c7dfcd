"""What a run starts from (config.init): the trained model (config.model.kind: the CasSR U-Net, or the SCEdit
tuners around the frozen SD U-Net), the frozen VAE and CLIP text encoder, the tokenizer and the noise schedule,
from converted / convertible SD-1.5 weights or a named random model built in code; config.init.vae replaces
the VAE with a saved one (e.g. fitted by cassr_jax.train.autoencoder).

The frozen weights always come from here (never from a training checkpoint), so init must be deterministic:
pretrained weights are read from disk, random ones from config.seed.
"""
from __future__ import annotations

import dataclasses
import inspect
import os

from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.config import model_config_values, model_kind, parse_model_switches
from cassr_jax.models.cassr_unet import CasSRConfig, CasSRUNet, cassr_from_pretrained
from cassr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from cassr_jax.models.controlnet import ControlNetConfig
from cassr_jax.models.scedit import SCEditUNet, scedit_from_pretrained
from cassr_jax.models.unet import CROSS_DOWN, CROSS_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel, UNetConfig
from cassr_jax.models.vae import AutoencoderKL, VAEConfig
from cassr_jax.nn.layers import Policy
from cassr_jax.schedulers import NoiseSchedule, load_schedule_config, make_schedule
from cassr_jax.text import HashTokenizer

PRETRAINED_DIR = "pretrained"   # <workdir>/pretrained: where a non-converted init.pretrained is converted to
COMPONENT_DIRS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class RandomModel:
  """Configs of a random model built in code (tests and offline demos)."""
  unet: UNetConfig
  vae: VAEConfig
  text: CLIPTextConfig
  scedit: tuple[tuple[str, object], ...] = ()  # SCEditConfig defaults of model.kind "scedit" (model overrides)


# SD-1.5's structure in miniature: VAE x8 (so the hint image is 8x the latent, as the ControlNet's hint encoder
# expects), a cross-attention U-Net level with multiple attention, a plain level; few ops, so it compiles fast.
RANDOM_MODELS = {
    "tiny": RandomModel(
        unet=UNetConfig(block_out_channels=(16, 32), down_block_types=(CROSS_DOWN, PLAIN_DOWN),
                        up_block_types=(PLAIN_UP, CROSS_UP), layers_per_block=1, heads=(2, 2),
                        cross_attention_dim=32, norm_num_groups=8),
        vae=VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
        text=CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2),
        # SCEdit's hint encoder at a quarter of its widths (4..24 channels, 32 out).
        scedit=(("hint_dim_ratio", 0.25), ("hint_out_channels", 32))),
}


@dataclasses.dataclass
class Components:
  model: CasSRUNet | SCEditUNet
  vae: AutoencoderKL | None
  text_encoder: CLIPTextModel | None
  tokenizer: object
  schedule: NoiseSchedule


def policy_of(config) -> Policy:
  return Policy.parse(config.runtime.param_dtype, config.runtime.dtype)


def runtime_options(config, build) -> dict:
  """attention (always) and remat (when this version of the model accepts it)."""
  options = {"attention": config.runtime.attention}
  if "remat" in inspect.signature(build).parameters:
    options["remat"] = str(config.runtime.remat)
  return options


def is_converted_dir(path: str) -> bool:
  return all(os.path.isfile(os.path.join(path, c, checkpoint.MODEL_FILE)) for c in COMPONENT_DIRS)


def converted_pretrained(config, workdir: str | None) -> str:
  """A directory of converted components for config.init.pretrained, converting on first use."""
  source = os.path.expanduser(str(config.init.pretrained))
  if os.path.isdir(source) and is_converted_dir(source):
    return source
  if workdir is None:
    raise ValueError(f"init.pretrained={source!r} is not a converted directory and no workdir was given to "
                     "convert it into")
  out = os.path.join(workdir, PRETRAINED_DIR)
  if is_converted_dir(out):
    return out
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  if jax.process_index() == 0:
    from cassr_jax.convert.diffusers import convert  # pylint: disable=import-outside-toplevel
    convert(source, out, components=COMPONENT_DIRS)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cassr_jax.train: pretrained weights converted")
  if not is_converted_dir(out):
    raise FileNotFoundError(f"{out}: conversion of {source!r} left no {COMPONENT_DIRS} (a shared filesystem "
                            "is needed on multi-host runs)")
  return out


def _cassr_config(config, unet_config: UNetConfig) -> CasSRConfig:
  switches = parse_model_switches(config)
  return dataclasses.replace(switches, unet=unet_config, controlnet=ControlNetConfig.from_unet(unet_config))


def _scedit_config(config, unet_config: UNetConfig, defaults=()):
  """SCEditConfig around `unet_config`: the random model's defaults, then the switches of config.model."""
  switches = parse_model_switches(config)
  explicit = {k: getattr(switches, k) for k in model_config_values(config)}
  return dataclasses.replace(switches, unet=unet_config, **{**dict(defaults), **explicit})


def _random_model(config, spec: RandomModel, policy: Policy):
  rngs = nnx.Rngs(int(config.seed))
  if model_kind(config) == "scedit":
    unet = UNet2DConditionModel(spec.unet, policy=policy, rngs=rngs,
                                **runtime_options(config, UNet2DConditionModel.__init__))
    return SCEditUNet(_scedit_config(config, spec.unet, spec.scedit), policy=policy, rngs=rngs, unet=unet)
  model = CasSRUNet(_cassr_config(config, spec.unet), policy=policy, rngs=rngs,
                    **runtime_options(config, CasSRUNet.__init__))
  # An untrained CasSR must start from "SD + ControlNet": the ControlNet copies the U-Net encoder and the
  # multiple-attention output projections are zero, as with pretrained weights.
  from cassr_jax.models.controlnet import copy_unet_encoder  # pylint: disable=import-outside-toplevel
  copy_unet_encoder(model.unet, model.controlnet)
  return model


def _pretrained_model(config, root: str, policy: Policy):
  unet_dir = os.path.join(root, "unet")
  if model_kind(config) == "scedit":
    # The SD U-Net keeps its weights (frozen); the tuners start as the identity (zero output layers).
    unet = checkpoint.load_model(unet_dir, policy=policy, **runtime_options(config, UNet2DConditionModel.__init__))
    return scedit_from_pretrained(unet, _scedit_config(config, unet.config), policy=policy, seed=int(config.seed))
  unet = checkpoint.load_model(unet_dir, policy=policy, attention=config.runtime.attention)
  controlnet = None
  if config.init.controlnet:
    controlnet = checkpoint.load_model(os.path.expanduser(str(config.init.controlnet)), policy=policy,
                                       attention=config.runtime.attention)
  return cassr_from_pretrained(unet, _cassr_config(config, unet.config), controlnet, policy=policy,
                               seed=int(config.seed), **runtime_options(config, cassr_from_pretrained))


def load_vae(config, policy: Policy) -> AutoencoderKL:
  """The saved VAE of config.init.vae (a checkpoint.save_model directory of model_type "vae")."""
  path = os.path.expanduser(str(config.init.vae))
  try:
    meta = checkpoint.read_model_meta(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"init.vae={path!r}: {e}") from None
  if meta.get("model_type") != "vae":
    raise ValueError(f"init.vae={path!r}: a saved {meta.get('model_type')!r} model, not a VAE")
  return checkpoint.load_model(path, policy=policy, attention=config.runtime.attention)


def _check_vae(config, vae: AutoencoderKL, unet: UNetConfig) -> AutoencoderKL:
  if vae.config.latent_channels != unet.in_channels:
    raise ValueError(f"init.vae={str(config.init.vae)!r}: {vae.config.latent_channels} latent channels, the "
                     f"U-Net takes {unet.in_channels}")
  return vae


def build_components(config, workdir: str | None = None, *, model_only: bool = False) -> Components:
  """The models of config.init with config.runtime's dtypes and attention (frozen parts deterministic).

  The trained model is config.model.kind's: CasSRUNet ("cassr") or SCEditUNet ("scedit").
  model_only: only that model (and the schedule); vae, text_encoder and tokenizer are None.
  """
  policy = policy_of(config)
  if config.init.random:
    spec = RANDOM_MODELS[str(config.init.random)]
    vae = None
    if config.init.get("vae") and not model_only:  # a bad init.vae fails before the model is built
      vae = _check_vae(config, load_vae(config, policy), spec.unet)
    model = _random_model(config, spec, policy)
    if model_only:
      return Components(model, None, None, None, make_schedule())
    if vae is None:
      vae = AutoencoderKL(spec.vae, policy=policy, attention=config.runtime.attention,
                          rngs=nnx.Rngs(int(config.seed) + 1))
    text_encoder = CLIPTextModel(spec.text, policy=Policy(policy.param_dtype, policy.param_dtype),
                                 attention="xla", rngs=nnx.Rngs(int(config.seed) + 2))
    return Components(model, vae, text_encoder, HashTokenizer(spec.text.vocab_size), make_schedule())

  root = converted_pretrained(config, workdir)
  model = _pretrained_model(config, root, policy)
  schedule = make_schedule(load_schedule_config(root))
  if model_only:
    return Components(model, None, None, None, schedule)
  if config.init.get("vae"):
    vae = _check_vae(config, load_vae(config, policy), model.config.unet)
  else:
    vae = checkpoint.load_model(os.path.join(root, "vae"), policy=policy, attention=config.runtime.attention)
  text_encoder = checkpoint.load_model(os.path.join(root, "text_encoder"),
                                       policy=Policy(policy.param_dtype, policy.param_dtype), attention="xla")
  from cassr_jax.text import load_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer_source = str(config.init.tokenizer or "")
  if not tokenizer_source:
    tokenizer_source = root if os.path.isdir(os.path.join(root, "tokenizer")) else str(config.init.pretrained)
  tokenizer = load_tokenizer(os.path.expanduser(tokenizer_source))
  return Components(model, vae, text_encoder, tokenizer, schedule)
