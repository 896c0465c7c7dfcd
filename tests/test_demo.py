"""cassr-demo end to end at a reduced size (20 VAE fit steps, 2 training steps, 8 training crops, 1 held-out
128 px photo, 4 sampler steps of which 1 runs), then the same command again: it must skip every stage (no
refit, no retraining, outputs kept).

The command runs in a subprocess on one CPU device, as on a user's machine (this process simulates 8)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.cli import demo
from cassr_jax.data import images
from cassr_jax.train import export, loop
from cassr_jax.train.checkpointing import read_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--steps=2", "--heldout=1", "--sample-steps=4", "--photo-size=128", "--train-images=8", "--vae-steps=20"]
STAGES = ["data", "vae", "train", "sr", "eval_cassr", "eval_stage1"]


def run_demo(workdir: str) -> dict:
  # Faster-compiling XLA (as test_train_loop's subprocesses): compiles dominate 2 steps on 1 image.
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
             "--xla_cpu_use_fusion_emitters=false")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--workdir", workdir, *SMALL],
                        env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "not CasSR's quality" in proc.stdout
  with open(os.path.join(workdir, demo.RESULT_FILE)) as f:
    result = json.load(f)
  eval_dir = result["paths"]["eval"]
  result["metrics"] = {}
  for key in ("cassr", "stage1"):
    with open(os.path.join(eval_dir, key, "summary.json")) as f:
      result["metrics"][key] = json.load(f)
  return result


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_demo_end_to_end_then_resume(tmp_path):
  workdir = str(tmp_path / "demo")
  first = run_demo(workdir)
  assert first["skipped"] == [] and list(first["timings"]) == STAGES
  assert first["step"] == 2

  # Data: 8 training crops with references, the held-out photo (astronaut) as a paired set with a reference.
  train_set = os.path.join(workdir, "data", "train")
  assert len(os.listdir(os.path.join(train_set, "ref"))) == 8
  hr = images.read_image(os.path.join(workdir, "data", "heldout", "hr", "astronaut.png"))
  lr = images.read_image(os.path.join(workdir, "data", "heldout", "lr", "astronaut.png"))
  assert hr.shape == (128, 128, 3) and lr.shape == (32, 32, 3)

  # The CasSR output of the trained run: the HR's size, and a picture: closer to the HR than a flat image of the
  # HR's mean colour (measured here 12.8 dB against 10.4; uniform noise is 7-8 dB, the random VAE of the tiny
  # model gave noise). Even this short VAE fit (20 steps) and the LR's low frequencies (wavelet colour fix) make
  # it one; at full size the demo measured 19.6 dB (noise-like 12.2 with the random VAE).
  (out,) = first["paths"]["outputs"]
  sr = images.read_image(out)
  assert sr.shape == hr.shape
  values = demo.metric_values(first["metrics"]["cassr"])
  hr01 = hr.astype(np.float64) / 255.0
  flat_psnr = -10 * math.log10(np.mean((hr01.mean(axis=(0, 1)) - hr01) ** 2))
  assert math.isfinite(values["psnr"]) and values["psnr"] > flat_psnr + 1.0, (values, flat_psnr)
  ours = -10 * math.log10(np.mean((sr / 255.0 - hr01) ** 2))
  assert abs(ours - values["psnr"]) < 0.05  # the report's PSNR is this image's
  # Stage 1 alone (the real Real-ESRGAN weights) on this mild degradation: better than the tiny stage 2 (here
  # 16.0 dB / LPIPS 0.25 against 12.8 / 0.86; at 256 px on the three photos 22.0 / 0.22 against 19.6 / 0.72).
  stage1 = demo.metric_values(first["metrics"]["stage1"])
  assert stage1["psnr"] > values["psnr"] + 1.5 and 0 < stage1["lpips"] < values["lpips"] - 0.3, (stage1, values)
  assert all(values[m] is not None for m in ("psnr", "ssim", "lpips"))

  eval_dir = first["paths"]["eval"]
  for kind in ("cassr", "stage1"):
    for name in ("index.html", "summary.md", "summary.json", "per_image.csv", os.path.join("grids", "astronaut.png")):
      assert os.path.getsize(os.path.join(eval_dir, kind, name)) > 0, (kind, name)
  with open(os.path.join(eval_dir, "cassr", "index.html"), encoding="utf-8") as f:
    assert "astronaut" in f.read()

  # The VAE fitted to the training tiles is the run's frozen VAE, and the exported pipeline's.
  vae = first["vae"]
  assert vae["steps"] == 20 and vae["last_loss"] < 0.8 * vae["first_loss"], vae
  run = first["paths"]["run"]
  assert read_run_config(run).init.vae == first["paths"]["vae"] == os.path.join(workdir, demo.VAE_DIR)
  exported = export.export_run(run, str(tmp_path / "exported"))
  fitted = checkpoint.load_model(first["paths"]["vae"])
  in_export = checkpoint.load_model(os.path.join(exported, "vae"))
  assert in_export.config == fitted.config and fitted.config.scaling_factor == vae["scaling_factor"]
  for a, b in zip(jax.tree.leaves(nnx.state(in_export, nnx.Param)), jax.tree.leaves(nnx.state(fitted, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  with open(os.path.join(run, loop.METRICS_FILE)) as f:
    steps_logged = [json.loads(line)["step"] for line in f]
  assert steps_logged[-1] == 2
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in _files(workdir) if p != demo.RESULT_FILE}

  # The same command again: everything is found finished; nothing is retrained or rewritten.
  second = run_demo(workdir)
  assert second["timings"] == {} and second["skipped"] == STAGES
  assert second["step"] == 2 and second["metrics"] == first["metrics"]
  with open(os.path.join(run, loop.METRICS_FILE)) as f:
    assert [json.loads(line)["step"] for line in f] == steps_logged
  assert {p: os.path.getmtime(os.path.join(workdir, p)) for p in _files(workdir) if p != demo.RESULT_FILE} == before


def test_demo_config_file_is_the_demo_settings(tmp_path):
  from cassr_jax.config import validate_config
  from test_configs import load_config_file

  config = load_config_file("demo", tmp_path)
  assert config.to_dict() == demo.demo_config().to_dict()
  assert config.init.random == "tiny" and config.activation.name == "paired" and config.train.steps == 200
  config.data.sources = f"paired:{tmp_path}"
  validate_config(config, device_count=8, process_count=1)


def test_a_workdir_from_another_demo_version_or_settings_is_moved_aside(tmp_path):
  workdir = str(tmp_path / "demo")
  settings = {"heldout": 1, "sample_steps": 4, "photo_size": 128, "train_images": 8, "vae_steps": 20}
  assert demo.claim_workdir(workdir, settings, log=lambda _: None) is None  # new: claimed
  open(os.path.join(workdir, "kept"), "w").close()
  assert demo.claim_workdir(workdir, settings, log=lambda _: None) is None  # same version and settings: resumed
  assert os.path.exists(os.path.join(workdir, "kept"))
  logs = []
  moved = demo.claim_workdir(workdir, dict(settings, sample_steps=8), log=logs.append)
  assert moved == workdir + ".old-1" and os.path.exists(os.path.join(moved, "kept"))
  assert os.listdir(workdir) == [demo.STAMP_FILE] and "sample_steps 4 -> 8" in logs[0]
  # An older demo left no stamp (its run trained without the fitted VAE): moved aside, never deleted.
  os.remove(os.path.join(workdir, demo.STAMP_FILE))
  os.makedirs(os.path.join(workdir, "run"))
  assert demo.claim_workdir(workdir, settings, log=logs.append) == workdir + ".old-2"
  assert "older cassr-demo" in logs[1] and os.path.isdir(os.path.join(workdir + ".old-2", "run"))
