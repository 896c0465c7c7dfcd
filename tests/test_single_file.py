"""Single-file (LDM / CompVis) SD-1.x checkpoints.

The LDM key map is checked against diffusers' own LDM->diffusers converters (so the test is not circular):
on a small U-Net with three levels and two layers per block, and on the full SD-1.5 structure (shape-only,
with torch meta-device models and zero-stride numpy stand-ins, so no memory is spent).
"""
import os
import re

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders import single_file_utils as sfu
from flax import nnx

from cassr_jax.jax_compat import eval_shape
from cassr_jax import checkpoint
from cassr_jax.convert import components, single_file
from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import torch_key, torch_to_ours
from test_convert import CLIP_CONFIG, _randomize, assert_params_equal_torch, numpy_state, tiny_torch_models

# Three levels, two layers per block: the upsampler of a cross-attention up block sits in slot 2, that of a
# plain one in slot 1; resnet shortcuts where widths change.
RICH_UNET = dict(
    sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
SCHEDULE = {name: np.linspace(0, 1, 10, dtype=np.float32) for name in ("betas", "alphas_cumprod",
                                                                         "posterior_mean_coef1")}
EMA = {"model_ema.decay": np.array(0.9999, np.float32), "model_ema.num_updates": np.array(5, np.int32),
       "model_ema.diffusion_modelconv_inweight": np.zeros((3,), np.float32)}


def _diffusers_config(model):
  return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def _configs(models):
  return {"unet": _diffusers_config(models["unet"]), "vae": _diffusers_config(models["vae"]),
          "text_encoder": models["text_encoder"].config.to_dict()}


def _assert_same_state(got, expected):
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert np.shape(got[key]) == np.shape(value), key
    assert np.array_equal(np.asarray(got[key]), np.asarray(value)), key


@pytest.fixture(scope="module")
def torch_models():
  return tiny_torch_models(seed=3)


@pytest.fixture(scope="module")
def ldm_file(torch_models, tmp_path_factory):
  parts = {name: numpy_state(model) for name, model in torch_models.items()}
  state = single_file.to_ldm_state_dict(parts, _configs(torch_models))
  state.update(SCHEDULE)
  state.update(EMA)
  path = str(tmp_path_factory.mktemp("ldm") / "tiny-sd.safetensors")
  safetensors.numpy.save_file(state, path)
  return path, state


def test_map_agrees_with_diffusers_converters(torch_models):
  torch.manual_seed(0)
  unet = _randomize(TorchUNet(**RICH_UNET), 1)
  unet_state = numpy_state(unet)
  ldm = single_file.to_ldm_state_dict({"unet": unet_state}, {"unet": _diffusers_config(unet)})
  assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # cross-attn up block's upsampler
  assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # plain up block's upsampler
  _assert_same_state(sfu.convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet_state)

  vae_state = numpy_state(torch_models["vae"])
  ldm = single_file.to_ldm_state_dict({"vae": vae_state}, {"vae": _diffusers_config(torch_models["vae"])})
  assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
  _assert_same_state(sfu.convert_ldm_vae_checkpoint(ldm, dict(torch_models["vae"].config)), vae_state)

  clip_state = numpy_state(torch_models["text_encoder"])
  ldm = single_file.to_ldm_state_dict({"text_encoder": clip_state}, {"text_encoder": CLIP_CONFIG})
  assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm)
  got = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ldm).items()}
  _assert_same_state(got, clip_state)


def _meta_shapes(model):
  return {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}


def test_embedded_sd15_configs_match_the_real_structure():
  """Full SD-1.5 sizes, shapes only: diffusers' models (meta device) -> our LDM names -> diffusers' converter
  gives the same keys and shapes back, and our models built from the embedded configs take every key."""
  configs = single_file.SD15_CONFIGS
  with torch.device("meta"):
    torch_models = {
        "unet": TorchUNet(**{k: v for k, v in configs["unet"].items() if not k.startswith("_")}),
        "vae": TorchVAE(**{k: v for k, v in configs["vae"].items() if not k.startswith("_")}),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
    }
  parts = {name: _meta_shapes(model) for name, model in torch_models.items()}
  assert len(parts["unet"]) == 686 and len(parts["vae"]) == 248 and len(parts["text_encoder"]) == 196
  ldm = single_file.to_ldm_state_dict(parts)
  # Known names of SD-1.x files (diffusers' converter accepts either upsampler slot, so check them here).
  for key in ("model.diffusion_model.output_blocks.2.1.conv.weight",
              "model.diffusion_model.output_blocks.5.2.conv.bias",
              "model.diffusion_model.output_blocks.8.2.conv.weight",
              "model.diffusion_model.input_blocks.3.0.op.weight",
              "model.diffusion_model.middle_block.1.proj_in.weight",
              "first_stage_model.decoder.up.3.upsample.conv.weight",
              "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.bias"):
    assert key in ldm, key
  assert not any(k.startswith("first_stage_model.decoder.up.0.upsample") for k in ldm)
  back = sfu.convert_ldm_unet_checkpoint(ldm, configs["unet"])
  assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in parts["unet"].items()}
  back = sfu.convert_ldm_vae_checkpoint(ldm, configs["vae"])
  assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in parts["vae"].items()}

  for name, prefix in single_file.PREFIXES.items():
    spec = components.COMPONENTS[name]
    config = components.parse_config(spec, configs[name], name)
    model = eval_shape(lambda: checkpoint.build_model(spec.model_type, config))  # noqa: B023
    part = single_file.prepare_part(name, {k: v for k, v in ldm.items() if k.startswith(prefix)})
    rename = single_file._renamer(name, config, part)  # pylint: disable=protected-access
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      key = rename(torch_key(path))
      array = part[key]
      assert torch_to_ours(array, str(path[-1]), len(var.shape)).shape == tuple(var.shape), key
      used.add(key)
    assert used == set(part), name


def test_single_file_converts_every_component(torch_models, ldm_file, tmp_path):
  path, _ = ldm_file
  written = single_file.convert_single_file(path, str(tmp_path / "out"), configs=_configs(torch_models))
  assert sorted(written) == ["text_encoder", "unet", "vae"]
  for name, model in torch_models.items():
    assert_params_equal_torch(checkpoint.load_model(written[name]), numpy_state(model))


def test_ckpt_fp16_and_legacy_clip_keys(torch_models, ldm_file, tmp_path):
  """.ckpt ({'state_dict': ...}, read weights-only), fp16, CLIP keys without "text_model." (older files)."""
  _, state = ldm_file
  half = {}
  for key, value in state.items():
    key = key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
    half[key] = torch.from_numpy(np.asarray(value).astype(np.float16) if value.dtype == np.float32 else value)
  half["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(12)[None]
  path = tmp_path / "tiny-sd.ckpt"
  torch.save({"state_dict": half, "global_step": 10}, path)
  from cassr_jax.convert.diffusers import convert  # pylint: disable=import-outside-toplevel
  written = convert(str(path), str(tmp_path / "out"), components="vae,text_encoder",
                    configs=_configs(torch_models))
  assert sorted(written) == ["text_encoder", "vae"]
  for name in written:
    expected = numpy_state(torch_models[name].to(torch.float16))
    torch_models[name].to(torch.float32)
    assert_params_equal_torch(checkpoint.load_model(written[name]), expected)
    assert checkpoint.read_model_meta(written[name])["param_dtype"] == "float16"


def test_strict_errors_list_every_problem(torch_models, ldm_file, tmp_path):
  _, state = ldm_file
  state = dict(state)
  del state["model.diffusion_model.out.2.bias"]
  state["model.diffusion_model.output_blocks.0.0.extra.weight"] = np.zeros((2,), np.float32)
  state["model.diffusion_model.time_embed.0.weight"] = np.zeros((3, 3), np.float32)
  path = str(tmp_path / "broken.safetensors")
  safetensors.numpy.save_file(state, path)
  with pytest.raises(CheckpointError) as info:
    single_file.convert_single_file(path, str(tmp_path / "out"), components="unet",
                                    configs=_configs(torch_models))
  message = str(info.value)
  for needle in ("broken.safetensors [unet]", "1 missing keys", "model.diffusion_model.out.2.bias",
                 "1 unexpected keys", "model.diffusion_model.output_blocks.0.0.extra.weight",
                 "1 shape mismatches", "model.diffusion_model.time_embed.0.weight"):
    assert needle in message, needle

  state = dict(ldm_file[1], **{"cond_stage_model.something.weight": np.zeros(1, np.float32),
                               "loss.discriminator.weight": np.zeros(1, np.float32)})
  safetensors.numpy.save_file(state, path)
  with pytest.raises(CheckpointError, match=r"2 keys belong to no supported component:\n.*"
                                            r"cond_stage_model\.something\.weight\n.*loss\.discriminator\.weight"):
    single_file.convert_single_file(path, str(tmp_path / "out"), configs=_configs(torch_models))


@pytest.mark.parametrize("key,message", [
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "SD-2.x checkpoint"),
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "SDXL checkpoint"),
])
def test_other_sd_families_are_refused(ldm_file, tmp_path, key, message):
  state = dict(ldm_file[1], **{key: np.zeros(1, np.float32)})
  path = str(tmp_path / "other.safetensors")
  safetensors.numpy.save_file(state, path)
  with pytest.raises(CheckpointError, match=re.escape(message)):
    single_file.convert_single_file(path, str(tmp_path / "out"))


def test_not_an_sd_checkpoint_and_malicious_ckpt(tmp_path):
  path = str(tmp_path / "other.safetensors")
  safetensors.numpy.save_file({"params_ema.conv_first.weight": np.zeros(1, np.float32)}, path)
  with pytest.raises(CheckpointError, match=r"not an LDM Stable Diffusion checkpoint.*params_ema"):
    single_file.convert_single_file(path, str(tmp_path / "out"))

  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  torch.save({"state_dict": {"model.diffusion_model.out.2.bias": Evil()}}, tmp_path / "evil.ckpt")
  with pytest.raises(CheckpointError, match="weights-only"):
    single_file.convert_single_file(str(tmp_path / "evil.ckpt"), str(tmp_path / "out"))
  assert not marker.exists()
  with pytest.raises(ValueError, match="unknown components"):
    single_file.convert_single_file(path, str(tmp_path / "out"), configs={"scheduler": {}})
