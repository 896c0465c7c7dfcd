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


def test_degrade_bench_runs_and_workers_use_one_core(tmp_path):
  """scripts/bench/degrade.py at a small size (the issue's speed figure comes from it): it reports the JPEG
  stages, and its process uses no more CPU than its main thread (helper threads limited, images.use_one_core)."""
  import json
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "degrade.json"
  result = subprocess.run([sys.executable, "scripts/bench/degrade.py", "--pairs", "6", "--crop", "128", "--no-pool",
                           "--json", str(out)], cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "JPEG stages (diffjpeg):" in result.stdout
  report = json.loads(out.read_text())
  single = report["single"]
  assert single["cpu_pairs_per_s"] > 0 and single["usm_sharpen"] and {"usm", "jpeg1", "jpeg2"} <= set(
      single["stage_ms_per_pair"])
  assert single["process_over_main_thread_cpu"] < 1.2
  assert set(report["decoding"]) == {"png0_tile", "png1_tile", "png3_2040x1356"}
