"""The GPU benchmark script runs end to end on the CPU in its CI-sized form (`pytest -m slow tests/test_bench_smoke.py`)."""
import os
import re
import subprocess

import pytest


@pytest.mark.slow  # several minutes of compiles on 2 cores; run before a GPU session
def test_gpu_bench_script_smoke():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
  result = subprocess.run(["bash", "scripts/bench/gpu.sh", "--smoke"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  out = result.stdout
  assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
  table = out[out.index("## Benchmarks"):]
  assert "| what | step / status | images/s | TFLOP/step | MFU | peak memory | ours/torch |" in table
  row = re.search(r"^\| train step micro 32px b1 float32 ma=on remat=full \| ([0-9.]+) s \| ([0-9.]+) img/s \| "
                  r"([0-9.e-]+) TFLOP \| n/a \| n/a \| ([0-9.]+) \|$", table, re.M)
  assert row, table
  step_s, images_s, tflop, ratio = map(float, row.groups())
  assert step_s > 0 and images_s > 0 and tflop > 0 and ratio > 0
  assert "| unet_forward_cli | ok" in table
  assert "| infer tiny 8->32, 1 steps" in table and "| metric lpips 64x64" in table, table
  assert "FAILED" not in table, table


def test_infer_bench_sd_size_is_sd15():
  """`scripts/bench/infer.py --sd15` builds SD-1.5's U-Net, VAE and CLIP (diffusers' defaults are not SD-1.5's)."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=import-outside-toplevel

  from cassr_jax.models.unet import UNetConfig  # pylint: disable=import-outside-toplevel
  from cassr_jax.models.vae import VAEConfig  # pylint: disable=import-outside-toplevel

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("bench_infer", os.path.join(root, "scripts", "bench", "infer.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  with torch.device("meta"):  # configs only, no weights
    unet = UNet2DConditionModel(**bench.SD["unet"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **bench.SD["vae"])
  assert UNetConfig.from_diffusers(dict(unet.config)) == UNetConfig.sd15()
  assert VAEConfig.from_diffusers(dict(vae.config)) == VAEConfig.sd15()
  assert bench.SD["text"] == dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
