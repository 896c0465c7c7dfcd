"""Conversion of diffusers / transformers checkpoints (directories, hub ids) to our model directories."""
import fnmatch
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.convert import diffusers as dconv
from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import export_torch_state
from conftest import relative_max_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UNET_CONFIG = dict(
    sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
VAE_CONFIG = dict(
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=16)
CLIP_CONFIG = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=12, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _randomize(module, seed, std=0.1):
  """Every weight random (so no zero-initialised tensor can hide a wrong mapping)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0, std)
  return module.eval()


def tiny_torch_models(seed=0):
  """{component: random-weight torch model} with the small configs above."""
  torch.manual_seed(seed)
  return {
      "unet": _randomize(TorchUNet(**UNET_CONFIG), seed),
      "vae": _randomize(TorchVAE(**VAE_CONFIG), seed + 1),
      "text_encoder": _randomize(
          transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG)), seed + 2),
  }


def numpy_state(module):
  """torch state dict as numpy (bf16 kept as ml_dtypes.bfloat16), position_ids buffers dropped."""
  out = {}
  for key, value in module.state_dict().items():
    if key.endswith("position_ids"):
      continue
    value = value.detach()
    out[key] = (value.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
                else value.numpy())
  return out


def assert_params_equal_torch(model, torch_state):
  """Our parameters, in torch layout, are bit-identical to `torch_state` (keys compared up to text_model.)."""
  ours = {k.removeprefix("text_model."): v for k, v in export_torch_state(model).items()}
  ref = {k.removeprefix("text_model."): v for k, v in torch_state.items()}
  assert sorted(ours) == sorted(ref)
  for key, value in ref.items():
    assert ours[key].dtype == value.dtype, key
    assert np.array_equal(np.ascontiguousarray(ours[key]).view(np.uint8),
                          np.ascontiguousarray(value).view(np.uint8)), key


def assert_roundtrip_bit_identical(model_dir, tmp_path):
  model = checkpoint.load_model(model_dir)
  meta = checkpoint.read_model_meta(model_dir)
  again = str(tmp_path / ("resaved-" + os.path.basename(model_dir)))
  checkpoint.save_model(again, model, meta["model_type"], model.config)
  reloaded = checkpoint.load_model(again)
  a = jax.tree.leaves(nnx.state(model, nnx.Param))
  b = jax.tree.leaves(nnx.state(reloaded, nnx.Param))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
  return model


def write_pipeline(directory, models, *, safe=True, tokenizer=True):
  """A diffusers pipeline folder as save_pretrained writes it (model_index.json + one folder each)."""
  os.makedirs(directory, exist_ok=True)
  index = {"_class_name": "StableDiffusionPipeline"}
  for name, model in models.items():
    model.save_pretrained(os.path.join(directory, name), safe_serialization=safe)
    index[name] = ["diffusers" if name != "text_encoder" else "transformers", type(model).__name__]
  if tokenizer:
    os.makedirs(os.path.join(directory, "tokenizer"))
    for fname, text in (("vocab.json", '{"a": 0}'), ("merges.txt", "#version: 0.2\n"),
                        ("tokenizer_config.json", '{"model_max_length": 12}')):
      with open(os.path.join(directory, "tokenizer", fname), "w") as f:
        f.write(text)
  with open(os.path.join(directory, "model_index.json"), "w") as f:
    json.dump(index, f)
  return str(directory)


def save_pickle_weights(model, directory, name):
  """A .bin checkpoint as torch.save writes it (transformers 5 no longer writes pytorch_model.bin itself)."""
  os.makedirs(directory, exist_ok=True)
  if hasattr(model, "save_config"):  # diffusers
    model.save_config(directory)
  else:
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
  torch.save(model.state_dict(), os.path.join(directory, name))
  return str(directory)


_forward = nnx.jit(lambda model, *args: model(*args))  # one compile instead of one per op (eager)


@pytest.fixture(scope="module")
def torch_models():
  return tiny_torch_models()


@pytest.fixture(scope="module")
def pipeline_dir(torch_models, tmp_path_factory):
  return write_pipeline(tmp_path_factory.mktemp("src") / "pipe", torch_models)


@pytest.fixture(scope="module")
def converted_in_fresh_process(pipeline_dir, tmp_path_factory):
  """Converts the safetensors pipeline in a fresh interpreter; returns (written dirs, out, torch imported?)."""
  out = str(tmp_path_factory.mktemp("out") / "sd")
  code = (
      "import json, sys\n"
      "from cassr_jax.convert.diffusers import convert\n"
      f"written = convert({pipeline_dir!r}, {out!r})\n"
      "print(json.dumps({'written': written, 'torch': 'torch' in sys.modules}))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  return report["written"], out, report["torch"]


def test_safetensors_conversion_does_not_import_torch(converted_in_fresh_process):
  written, _, torch_imported = converted_in_fresh_process
  assert sorted(written) == ["text_encoder", "tokenizer", "unet", "vae"]
  assert torch_imported is False


def test_pipeline_outputs_match_torch_and_roundtrip(torch_models, converted_in_fresh_process, rng, tmp_path):
  written, out, _ = converted_in_fresh_process
  out = pathlib.Path(out)
  assert sorted(written) == ["text_encoder", "tokenizer", "unet", "vae"]
  assert sorted(os.listdir(out / "tokenizer")) == ["merges.txt", "tokenizer_config.json", "vocab.json"]

  unet = assert_roundtrip_bit_identical(written["unet"], tmp_path)
  assert_params_equal_torch(unet, numpy_state(torch_models["unet"]))
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t = np.array([7, 600])
  ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
  with torch.no_grad():
    ref = torch_models["unet"](torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
  got = _forward(unet, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
  err = relative_max_error(np.asarray(got).transpose(0, 3, 1, 2), ref)
  assert err <= 1e-4, err

  vae = checkpoint.load_model(written["vae"])
  assert_params_equal_torch(vae, numpy_state(torch_models["vae"]))
  images = rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    ref = torch_models["vae"](torch.tensor(images), sample_posterior=False).sample.numpy()
  got = _forward(vae, jnp.asarray(images.transpose(0, 2, 3, 1)))
  err = relative_max_error(np.asarray(got).transpose(0, 3, 1, 2), ref)
  assert err <= 1e-4, err

  clip = checkpoint.load_model(written["text_encoder"])
  assert_params_equal_torch(clip, numpy_state(torch_models["text_encoder"]))
  ids = rng.integers(3, 64, (2, 12))
  with torch.no_grad():
    ref = torch_models["text_encoder"](torch.tensor(ids)).last_hidden_state.numpy()
  err = relative_max_error(_forward(clip, jnp.asarray(ids)).last_hidden_state, ref)
  assert err <= 1e-4, err


def test_pickle_sources_convert_exactly(torch_models, tmp_path):
  unet_dir = tmp_path / "unet"
  torch_models["unet"].save_pretrained(unet_dir, safe_serialization=False)
  assert sorted(os.listdir(unet_dir)) == ["config.json", "diffusion_pytorch_model.bin"]
  model = dconv.convert_component_dir(str(unet_dir), str(tmp_path / "out_unet"))
  assert_params_equal_torch(model, numpy_state(torch_models["unet"]))
  clip_dir = save_pickle_weights(torch_models["text_encoder"], tmp_path / "clip", "pytorch_model.bin")
  model = dconv.convert_component_dir(clip_dir, str(tmp_path / "out_clip"))
  assert_params_equal_torch(model, numpy_state(torch_models["text_encoder"]))


@pytest.mark.parametrize("component,dtype,fmt", [
    ("vae", torch.float16, "variant"), ("text_encoder", torch.bfloat16, "bin"),
    ("text_encoder", torch.bfloat16, "safetensors")])
def test_half_precision_sources_convert_exactly(torch_models, tmp_path, component, dtype, fmt):
  model = torch_models[component]
  src = tmp_path / "src"
  expected = numpy_state(model.to(dtype))
  try:
    if fmt == "variant":  # fp32 weights plus an fp16 variant beside them, as SD repos ship
      model.to(torch.float32).save_pretrained(src)
      model.to(dtype).save_pretrained(src, variant="fp16")
      assert os.path.isfile(src / "diffusion_pytorch_model.fp16.safetensors")
    elif fmt == "bin":
      save_pickle_weights(model, src, "pytorch_model.bin")
    else:
      model.save_pretrained(src)
  finally:
    model.to(torch.float32)
  written = dconv.convert(str(src), str(tmp_path / "out"), variant="fp16" if fmt == "variant" else None)
  assert checkpoint.read_model_meta(written[component])["param_dtype"] == str(dtype).removeprefix("torch.")
  loaded = assert_roundtrip_bit_identical(written[component], tmp_path)
  assert_params_equal_torch(loaded, expected)


def test_dtype_override_rounds_like_torch(torch_models, tmp_path):
  clip = torch_models["text_encoder"]
  clip.save_pretrained(tmp_path / "clip")
  model = dconv.convert_component_dir(str(tmp_path / "clip"), str(tmp_path / "out"), dtype="bfloat16")
  expected = numpy_state(clip.to(torch.bfloat16))
  clip.to(torch.float32)
  assert_params_equal_torch(model, expected)
  with pytest.raises(CheckpointError, match=r"no weights found.*model\.bf16\.safetensors"):
    dconv.convert(str(tmp_path / "clip"), str(tmp_path / "x"), variant="bf16")
  with pytest.raises(ValueError, match="dtype must be one of"):
    dconv.convert(str(tmp_path / "clip"), str(tmp_path / "x"), dtype="int8")


def test_sharded_weights_with_index(torch_models, tmp_path):
  clip = torch_models["text_encoder"]
  src = tmp_path / "clip"
  clip.save_pretrained(src)
  state = safetensors.numpy.load_file(str(src / "model.safetensors"))
  os.remove(src / "model.safetensors")
  keys = sorted(state)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, names in shards.items():
    safetensors.numpy.save_file({k: state[k] for k in names}, str(src / name))
  weight_map = {k: name for name, names in shards.items() for k in names}
  (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  model = dconv.convert_component_dir(str(src), str(tmp_path / "out"))
  assert_params_equal_torch(model, numpy_state(clip))


def test_controlnet_component_dir(tmp_path):
  kwargs = {k: v for k, v in UNET_CONFIG.items() if k not in ("sample_size", "up_block_types")}
  net = _randomize(TorchControlNet(**kwargs, conditioning_embedding_out_channels=(8, 16)), 5)
  net.save_pretrained(tmp_path / "cn")
  written = dconv.convert(str(tmp_path / "cn"), str(tmp_path / "out"))
  assert list(written) == ["controlnet"]
  assert checkpoint.read_model_meta(written["controlnet"])["model_type"] == "controlnet"
  model = dconv.convert_component_dir(str(tmp_path / "cn"), str(tmp_path / "out2"))
  assert_params_equal_torch(model, numpy_state(net))


def test_old_vae_attention_names(torch_models, tmp_path):
  """SD-1.5's hub VAE still uses query/key/value/proj_attn; it converts to the same parameters."""
  vae = torch_models["vae"]
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for key, value in numpy_state(vae).items():
    for new, was in old.items():
      key = key.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
    state[key] = value
  assert sum(".query." in k for k in state) == 4  # weight and bias, encoder and decoder
  os.makedirs(tmp_path / "vae")
  safetensors.numpy.save_file(state, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
  vae.save_config(tmp_path / "vae")
  model = dconv.convert_component_dir(str(tmp_path / "vae"), str(tmp_path / "out"))
  assert_params_equal_torch(model, numpy_state(vae))


def _component_dir(tmp_path, torch_model, state):
  directory = tmp_path / "comp"
  os.makedirs(directory, exist_ok=True)
  torch_model.save_config(directory)
  safetensors.numpy.save_file(state, str(directory / "diffusion_pytorch_model.safetensors"))
  return directory


def test_strict_lists_every_problem(torch_models, tmp_path):
  state = numpy_state(torch_models["unet"])
  del state["conv_in.bias"]
  del state["mid_block.attentions.0.proj_out.weight"]
  state["up_blocks.0.extra.weight"] = np.zeros((3,), np.float32)
  state["conv_out.weight"] = np.ascontiguousarray(state["conv_out.weight"][:, :8])
  directory = _component_dir(tmp_path, torch_models["unet"], state)
  with pytest.raises(CheckpointError) as info:
    dconv.convert(str(directory), str(tmp_path / "out"))
  message = str(info.value)
  assert "diffusion_pytorch_model.safetensors" in message
  for needle in ("2 missing keys", "conv_in.bias", "mid_block.attentions.0.proj_out.weight",
                 "1 unexpected keys", "up_blocks.0.extra.weight", "1 shape mismatches", "conv_out.weight"):
    assert needle in message, needle
  assert not os.path.exists(tmp_path / "out" / "unet")


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused(torch_models, tmp_path, writer):
  directory = tmp_path / "comp"
  os.makedirs(directory)
  torch_models["unet"].save_config(directory)
  marker = tmp_path / "pwned"
  payload = {"conv_in.weight": _Evil(marker)}
  path = directory / "diffusion_pytorch_model.bin"
  if writer == "torch.save":
    torch.save(payload, path)
  else:
    with open(path, "wb") as f:
      pickle.dump(payload, f)
  with pytest.raises(CheckpointError, match="weights-only.*refused"):
    dconv.convert(str(directory), str(tmp_path / "out"))
  assert not marker.exists()


def test_hub_id_downloads_only_what_is_needed(torch_models, tmp_path, monkeypatch):
  remote = tmp_path / "remote"
  write_pipeline(remote, {"unet": torch_models["unet"], "text_encoder": torch_models["text_encoder"]})
  torch_models["unet"].save_pretrained(remote / "unet", safe_serialization=False)  # both formats on the hub
  os.remove(remote / "text_encoder" / "model.safetensors")  # and a text encoder in .bin only
  save_pickle_weights(torch_models["text_encoder"], remote / "text_encoder", "pytorch_model.bin")
  (remote / "v1-5-pruned.safetensors").write_bytes(b"not needed")
  (remote / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not needed")
  cache = tmp_path / "cache"
  calls = []

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
    calls.append((repo_id, revision, list(allow_patterns)))
    for root, _, files in os.walk(remote):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), remote).replace(os.sep, "/")
        if any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
          os.makedirs(os.path.dirname(cache / rel), exist_ok=True)
          shutil.copy(os.path.join(root, name), cache / rel)
    return str(cache)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  written = dconv.convert("someone/tiny-sd", str(tmp_path / "out"), revision="main",
                          components="unet,text_encoder")
  assert sorted(written) == ["text_encoder", "tokenizer", "unet"]
  assert [c[:2] for c in calls] == [("someone/tiny-sd", "main")] * 2  # safetensors, then .bin for the text encoder
  downloaded = sorted(os.path.relpath(os.path.join(r, n), cache) for r, _, fs in os.walk(cache) for n in fs)
  assert downloaded == ["model_index.json", "text_encoder/config.json", "text_encoder/pytorch_model.bin",
                        "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
  assert_params_equal_torch(checkpoint.load_model(written["unet"]), numpy_state(torch_models["unet"]))
  assert_params_equal_torch(checkpoint.load_model(written["text_encoder"]),
                            numpy_state(torch_models["text_encoder"]))


def test_hub_offline_error_is_clear(tmp_path):
  with pytest.raises(CheckpointError, match="nobody-xyz/missing-model: not a local file or directory, and could not download"):
    dconv.convert("nobody-xyz/missing-model", str(tmp_path / "out"))


def test_bad_sources_give_clear_errors(torch_models, pipeline_dir, tmp_path):
  with pytest.raises(CheckpointError, match="no such file or directory, and not a Hugging Face hub id"):
    dconv.convert(str(tmp_path / "missing" / "dir"), str(tmp_path / "out"))
  with pytest.raises(CheckpointError, match=r"no \['controlnet'\] component"):
    dconv.convert(pipeline_dir, str(tmp_path / "out"), components="controlnet")
  with pytest.raises(ValueError, match="unknown components"):
    dconv.convert(pipeline_dir, str(tmp_path / "out"), components="unet,safety_checker")
  with pytest.raises(ValueError, match="single-file checkpoints only"):
    dconv.convert(pipeline_dir, str(tmp_path / "out"), configs={"unet": {"in_channels": 4}})
  bad = tmp_path / "bad"
  os.makedirs(bad)
  config = dict(torch_models["unet"].config, _class_name="UNet2DConditionModel", class_embed_type="timestep")
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"bad/config\.json: unsupported UNet2DConditionModel config: "
                                            r"class_embed_type='timestep'"):
    dconv.convert(str(bad), str(tmp_path / "out"))
  (bad / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
  with pytest.raises(CheckpointError, match="unsupported model class.*UNet3DConditionModel"):
    dconv.convert(str(bad), str(tmp_path / "out"))
  (bad / "config.json").write_text(json.dumps(dict(torch_models["unet"].config)))
  with pytest.raises(CheckpointError, match="no weights found"):
    dconv.convert(str(bad), str(tmp_path / "out"))


def _load_cli():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("convert_weights", os.path.join(REPO, "scripts",
                                                                                "convert_weights.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli(pipeline_dir, tmp_path, monkeypatch, capsys):
  cli = _load_cli()
  out = tmp_path / "out"
  assert cli.main(["--source", pipeline_dir, "--out", str(out), "--components", "text_encoder",
                   "--dtype", "bfloat16"]) == 0
  assert sorted(os.listdir(out)) == ["text_encoder", "tokenizer"]
  leaves = jax.tree.leaves(nnx.state(checkpoint.load_model(str(out / "text_encoder")), nnx.Param))
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert cli.main(["--source", str(tmp_path / "nothing.ckpt"), "--out", str(out)]) == 1
  assert "nothing.ckpt: no such file or directory" in capsys.readouterr().err

  from cassr_jax.convert import rrdbnet  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(rrdbnet, "convert_rrdbnet", lambda src, dst: calls.append((src, dst)))
  assert cli.main(["--kind", "rrdbnet", "--source", "x4plus.pth", "--out", str(tmp_path / "r")]) == 0
  assert calls == [("x4plus.pth", str(tmp_path / "r"))]
