"""CasSRPipeline on a tiny random model: export/load, any size and float scale, per-image seeds, 8 devices == 1."""
import json
import os
import string

import jax
import numpy as np
import pytest
from flax import nnx

from cassr_jax.jax_compat import eval_shape
from cassr_jax.models.cassr_unet import CasSRConfig, CasSRUNet
from cassr_jax.models.controlnet import ControlNetConfig
from cassr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from cassr_jax.models.unet import UNetConfig
from cassr_jax.models.vae import AutoencoderKL, VAEConfig
from cassr_jax.pipelines.cassr import PIPELINE_FILE, CasSRPipeline, Settings, export_pipeline
from cassr_jax.text import load_tokenizer

TINY_UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, heads=(2, 2),
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                       norm_num_groups=8)
TINY_CONTROLNET = ControlNetConfig.from_unet(TINY_UNET, conditioning_embedding_out_channels=(8, 8, 8, 8))
TINY_VAE = VAEConfig(block_out_channels=(4, 4, 8, 8), layers_per_block=1, norm_num_groups=2)
MERGES = ["c l", "cl e", "cle a", "clea n</w>"]
# Few steps, no latent tiling by default (tests that want tiles pass them).
TEST_SETTINGS = Settings(steps=2, scale=2.0, latent_tile=None, vae_tile=None, guidance_scale=3.0,
                         color_fix="wavelet", prompt="clean", negative_prompt="blur")


def write_tiny_tokenizer(directory):
  tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
  tokens += [m.replace(" ", "") for m in MERGES] + [",</w>", "-</w>", "<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  return len(tokens)


def random_model(build, seed):
  """A model with random weights filled in numpy (eager nnx init compiles one program per parameter shape,
  minutes on a busy 2-core machine): kernels ~ N(0, 1/fan_in), norm scales ~ 1, biases small. Every weight,
  zero-initialised output projections included, is non-zero, so every input (the reference too) matters."""
  model = eval_shape(build)
  rng = np.random.default_rng(seed)

  def fill(path, var):
    shape, name = var.shape, str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "bias" or len(shape) < 2:
      value = 0.05 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return jax.numpy.asarray(value, var.dtype)

  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree_util.tree_map_with_path(
      lambda p, v: fill(p, v) if isinstance(v, jax.ShapeDtypeStruct) else v, nnx.to_pure_dict(params)))
  return model


def make_tiny_pipeline_dir(directory, *, activation="bicubic", settings=TEST_SETTINGS, seed=0):
  """Exports a tiny random CasSR pipeline."""
  tok_dir = os.path.join(os.path.dirname(os.path.abspath(directory)), "tiny_tokenizer")
  vocab = write_tiny_tokenizer(tok_dir)
  config = CasSRConfig(unet=TINY_UNET, controlnet=TINY_CONTROLNET)
  unet = random_model(lambda: CasSRUNet(config, attention="xla", rngs=nnx.Rngs(0)), seed)
  vae = random_model(lambda: AutoencoderKL(TINY_VAE, attention="xla", rngs=nnx.Rngs(0)), seed + 1)
  text_config = CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2)
  text = random_model(lambda: CLIPTextModel(text_config, attention="xla", rngs=nnx.Rngs(0)), seed + 2)
  export_pipeline(directory, unet=unet, vae=vae, text_encoder=text, tokenizer=load_tokenizer(tok_dir),
                  activation=activation, settings=settings)
  return directory


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  return make_tiny_pipeline_dir(str(tmp_path_factory.mktemp("pipe") / "cassr"))


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
  return CasSRPipeline.from_pretrained(pipeline_dir, attention="xla", devices=jax.local_devices()[:1])


def _images(rng):
  return [(rng.random((13, 11, 3)) * 255).astype(np.uint8), (rng.random((13, 11, 3)) * 255).astype(np.uint8)]


def test_export_is_self_contained(pipeline_dir):
  names = sorted(os.listdir(pipeline_dir))
  assert names == sorted(["unet", "vae", "text_encoder", "tokenizer", "scheduler_config.json", PIPELINE_FILE])
  meta = json.load(open(os.path.join(pipeline_dir, PIPELINE_FILE)))
  assert meta["activation"] == {"name": "bicubic"} and meta["settings"]["steps"] == 2
  with pytest.raises(FileNotFoundError, match="not an exported CasSR pipeline"):
    CasSRPipeline.from_pretrained(os.path.join(pipeline_dir, "vae"))


def test_any_size_float_scale_and_per_image_seeds(pipe, rng):
  lr = _images(rng)
  out = pipe(lr, seed=3, scale=1.5)
  assert [o.shape for o in out] == [(20, 16, 3)] * 2 and out[0].dtype == np.uint8  # round(13*1.5), round(11*1.5)
  # Image 1 alone (id 1) gets the same noise as in the batch: batching does not change results.
  alone = pipe([lr[1]], seed=3, scale=1.5, image_ids=[1], output="float")
  np.testing.assert_allclose(alone[0] * 255.0, out[1].astype(np.float64), atol=1.0)
  assert np.abs(out[0].astype(int) - pipe([lr[0]], seed=4, scale=1.5)[0]).max() > 0  # the seed matters


@pytest.mark.slow  # three more compiles of the sampling loop
def test_switches_change_the_output(pipe, rng):
  lr = _images(rng)[:1]
  base = pipe(lr, output="float")[0]
  assert base.shape == (26, 22, 3) and 0.0 <= base.min() and base.max() <= 1.0
  for change in (dict(guidance_scale=1.0), dict(start_from_lr=False)):
    assert np.abs(pipe(lr, output="float", **change)[0] - base).max() > 1e-4, change
  with pytest.raises(TypeError, match="unknown pipeline settings"):
    pipe(lr, cfg=2.0)
  with pytest.raises(ValueError, match="color_fix"):
    pipe(lr, color_fix="hist")


def test_eight_devices_equal_one(pipeline_dir, rng):
  assert len(jax.local_devices()) == 8
  lr = _images(rng) * 3  # 6 images: padded to 8 on the 8-device mesh (latent and VAE tiles on)
  one = CasSRPipeline.from_pretrained(pipeline_dir, attention="xla", devices=jax.local_devices()[:1])
  eight = CasSRPipeline.from_pretrained(pipeline_dir, attention="xla")
  kw = dict(seed=11, output="float", latent_tile=2, latent_overlap=1, vae_tile=2, vae_overlap=1, tile_batch=2)
  a = one(lr, batch_size=6, **kw)
  b = eight(lr, **kw)
  np.testing.assert_allclose(np.stack(a), np.stack(b), atol=2e-5)
  assert np.abs(a[0] - a[2]).max() > 1e-3  # same picture, other id: other noise


def test_benchmark_runner_drives_the_pipeline(pipe, tmp_path, rng):
  """The Table-1 runner with a pipeline-backed infer_fn: one result per LR image, evaluated, our row written."""
  from cassr_jax.data import images  # pylint: disable=import-outside-toplevel
  from cassr_jax.eval import benchmark  # pylint: disable=import-outside-toplevel
  root = tmp_path / "RealSR"
  for i, lr in enumerate(_images(rng)):
    os.makedirs(root / "lr", exist_ok=True)
    os.makedirs(root / "hr", exist_ok=True)
    images.write_png(str(root / "lr" / f"img{i}.png"), lr)
    images.write_png(str(root / "hr" / f"img{i}.png"), (rng.random((20, 16, 3)) * 255).astype(np.uint8))
  # One image per call at scale 1.5: the program test_any_size_float_scale_and_per_image_seeds compiled.
  infer = benchmark.pipeline_infer_fn(pipe, scale=1.5, progress=False)
  data = benchmark.run_table1([benchmark.prepared_testset("RealSR", root)], tmp_path / "results",
                              tmp_path / "out", infer_fn=infer, metrics="psnr", grids=False)
  assert sorted(os.listdir(tmp_path / "results" / "RealSR")) == ["img0.png", "img1.png"]
  assert data["datasets"]["RealSR"]["psnr"]["value"] > 0
  assert os.path.isfile(tmp_path / "out" / "table1.md")
