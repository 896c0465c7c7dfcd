"""The training loop end to end (tiny config, CPU): 2-process run, SIGKILL/SIGTERM resume, NaN stop, overfit.

Subprocess runs share a persistent XLA compilation cache with this process's reference run, so the 8-device
tiny step compiles once per test session.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from cassr_jax.train import checkpointing, loop
from test_configs import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:80, 0:80] / 80.0
  for i in range(24):
    img = np.stack([np.sin(x * (i + 1) * 3), np.cos(y * (i + 2) * 2), x * y], -1) * 0.5 + 0.5
    img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
    Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
  return str(folder)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


STEPS = 8
OVERRIDES = ["--config.mesh.fsdp=2", "--config.train.checkpoint_every=2"]


def tiny(images, steps, **train):
  config = load_config_file("tiny", ROOT)
  config.data.sources = f"folder:{images}"
  config.mesh.fsdp = 2
  config.train.steps = steps
  config.train.checkpoint_every = 2
  for k, v in train.items():
    setattr(config.train, k, v)
  return config


def command(images, workdir, steps, *extra):
  return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
          os.path.join(ROOT, "configs", "tiny.py"), f"--config.data.sources=folder:{images}",
          f"--config.train.steps={steps}", *OVERRIDES, *extra, "--workdir", str(workdir)]


def environment(cache_dir, devices=8):
  """This process's XLA flags (conftest's fast-compiling ones, so the persistent cache serves its executables)
  with `devices` CPU devices."""
  flags = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
                   + [f"--xla_force_host_platform_device_count={devices}"])
  return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=flags,
              JAX_DEFAULT_PRNG_IMPL=jax.config.jax_default_prng_impl, JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def losses(workdir):
  """step -> loss from metrics.jsonl (a resumed run's later lines win)."""
  out = {}
  with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
    for line in f:
      record = json.loads(line)
      out[record["step"]] = record["loss"]
  return out


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory, cache_dir):
  """An uninterrupted STEPS-step run in this process (8 devices, data 4 x fsdp 2), through the CLI's library.

  This module's compiles go to the persistent cache (the subprocesses read the step from it); later test files
  in this worker do not."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
  previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  workdir = tmp_path_factory.mktemp("reference")
  history = loop.train_and_evaluate(tiny(images, STEPS, val_every=STEPS // 2, keep_checkpoints=10), str(workdir))
  yield workdir, {h["step"]: h["loss"] for h in history}
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
  compilation_cache.reset_cache()


def test_reference_run_logs_checkpoints_and_images(reference):
  workdir, loss = reference
  assert sorted(loss) == list(range(1, STEPS + 1)) and all(np.isfinite(v) for v in loss.values())
  assert losses(workdir) == loss
  assert checkpointing.Checkpointer(workdir, keep=3, read_only=True).all_steps() == list(range(2, STEPS + 1, 2))
  assert sorted(os.listdir(workdir / "images")) == [f"val_{STEPS // 2:08d}.png", f"val_{STEPS:08d}.png"]
  grid = np.asarray(Image.open(workdir / "images" / f"val_{STEPS:08d}.png"))
  assert grid.shape == (2 * 64, 4 * 64, 3)  # val_images rows x (LR | reference | sample | HR)
  lr_col, sample_col, hr_col = (grid[:, i * 64:(i + 1) * 64].astype(float) for i in (0, 2, 3))
  # A sampled image (config.sample: 2 steps from the noised LR latents), not a copy of an input column.
  assert np.abs(sample_col - lr_col).mean() > 2.0 and np.abs(sample_col - hr_col).mean() > 2.0
  assert sample_col.std() > 2.0
  assert len(os.listdir(workdir / "tensorboard")) == 1
  config = checkpointing.read_run_config(str(workdir))
  assert config.train.steps == STEPS and config.init.random == "tiny"
  model, _ = checkpointing.load_trained_model(str(workdir), ema=False)
  kernel = model.controlnet.conv_in.kernel.get_value()
  assert np.all(np.isfinite(kernel))


def test_two_processes_match_one(images, tmp_path, reference, cache_dir):
  """2 processes x 1 device (data 1 x fsdp 2: the fsdp all-gathers cross the processes) match the reference."""
  _, expected = reference
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "two"
  procs = [subprocess.Popen(command(images, workdir, 2, "--config.train.val_every=0",
                                    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                            env=environment(cache_dir, devices=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  got = losses(workdir)
  assert sorted(got) == [1, 2]  # one line per step: only process 0 writes metrics
  for step in (1, 2):
    assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got, expected)
  assert len(os.listdir(workdir / "tensorboard")) == 1


def test_sigkill_then_rerun_resumes_exactly(images, tmp_path, reference, cache_dir):
  _, expected = reference
  workdir = tmp_path / "killed"
  cmd = command(images, workdir, STEPS, "--config.train.val_every=0")
  env = environment(cache_dir)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").exists() else []
      steps = [int(s) for s in names if s.isdigit()]  # finished saves only (orbax renames when complete)
      if 2 in steps:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  first = losses(workdir)
  result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step" in result.stdout + result.stderr
  got = losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  resumed_from = max(first)
  assert resumed_from < STEPS
  for step in range(1, STEPS + 1):
    assert abs(got[step] - expected[step]) <= 1e-6 * abs(expected[step]), (step, resumed_from, got, expected)


@pytest.mark.slow  # a third training subprocess; SIGKILL resume covers the checkpoint path in CI
def test_sigterm_saves_and_exits_cleanly(images, tmp_path, cache_dir):
  workdir = tmp_path / "term"
  cmd = command(images, workdir, 1000, "--config.train.checkpoint_every=1000", "--config.train.val_every=0")
  proc = subprocess.Popen(cmd, env=environment(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  metrics = workdir / loop.METRICS_FILE
  while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.stat().st_size):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  saved = checkpointing.Checkpointer(workdir, keep=3, read_only=True).all_steps()
  assert len(saved) == 1 and 1 <= saved[0] < 1000
  assert max(losses(workdir)) == saved[0]  # the checkpoint holds the last finished step


def test_injected_nan_stops_with_the_step_and_keeps_the_checkpoint(images, tmp_path, monkeypatch, reference):
  calls = []
  clean = loop.model_batch

  def poisoned(batch):  # the third training batch carries a NaN image
    calls.append(1)
    batch = clean(batch)
    if len(calls) == 3:
      batch = dict(batch, hr=np.full_like(batch["hr"], np.nan))
    return batch

  monkeypatch.setattr(loop, "model_batch", poisoned)
  workdir = tmp_path / "nan"
  with pytest.raises(FloatingPointError, match="at step 3"):
    loop.train_and_evaluate(tiny(images, STEPS, val_every=0), str(workdir))
  assert checkpointing.Checkpointer(workdir, keep=3, read_only=True).all_steps() == [2]
  model, _ = checkpointing.load_trained_model(str(workdir), ema=False)
  reference_model, _ = checkpointing.load_trained_model(str(reference[0]), step=2, ema=False)
  np.testing.assert_array_equal(model.controlnet.conv_in.kernel.get_value(),
                                reference_model.controlnet.conv_in.kernel.get_value())


def test_run_exports_to_a_pipeline(reference, tmp_path):
  """A run directory as an inference pipeline, and its export as one directory that loads back alone."""
  from cassr_jax.pipelines.cassr import CasSRPipeline  # pylint: disable=import-outside-toplevel
  from cassr_jax.train import export  # pylint: disable=import-outside-toplevel
  workdir, _ = reference
  lr = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
  options = dict(steps=1, guidance_scale=2.0, latent_tile=None, vae_tile=None, output="float", seed=1)
  from_run = export.pipeline_from_run(str(workdir), ema=False)
  out = from_run([lr], **options)[0]
  assert out.shape == (32, 32, 3) and np.all(np.isfinite(out))
  from cassr_jax.cli import convert  # pylint: disable=import-outside-toplevel
  assert convert.main(["--kind", "run", "--source", str(workdir), "--out", str(tmp_path / "exported"),
                       "--no-ema"]) == 0
  again = CasSRPipeline.from_pretrained(str(tmp_path / "exported"))([lr], **options)[0]
  np.testing.assert_allclose(again, out, atol=1e-5)
