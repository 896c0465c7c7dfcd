"""Samplers vs diffusers' PyTorch schedulers fed the same model outputs (and the same injected noise)."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import relative_max_error

from cassr_jax import sampling
from cassr_jax.registry import SAMPLERS
from cassr_jax.schedulers import base
from cassr_jax.schedulers import schedule as schedule_lib

# SD-1.5's scheduler_config.json (a PNDMScheduler config; every sampler is built from it, as users do).
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SHAPE = (1, 8, 8, 4)
TOLERANCE = 1e-5
MAX_ERRORS: dict[str, float] = {}  # sampler -> worst relative error seen (printed with -s)


def fake_model(x, t) -> np.ndarray:
  """A fixed smooth function of (x, t), computed in float64 on the host for both sides."""
  x = np.asarray(x, np.float64)
  t = np.asarray(t, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
  return (0.8 * np.tanh(x) * np.cos(t / 250.0) + 0.3 * np.sin(0.7 * x + t / 90.0)).astype(np.float32)


def jax_fake_model(x, t):
  return jax.pure_callback(fake_model, jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)


def diffusers_scheduler(sampler: str, config: dict, *, karras: bool = False):
  import diffusers  # pylint: disable=import-outside-toplevel
  cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
         "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler}[sampler]
  extra = {"use_karras_sigmas": True} if karras else {}
  return cls.from_config(dict(config, **extra))


def diffusers_trajectory(sampler: str, config: dict, steps: int, x: np.ndarray, *, karras=False, eta=0.0,
                         noise=None, begin: int = 0, monkeypatch=None) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps, latents after every step) of diffusers' scheduler driven by fake_model."""
  scheduler = diffusers_scheduler(sampler, config, karras=karras)
  scheduler.set_timesteps(steps)
  timesteps = scheduler.timesteps[begin:]
  if begin and hasattr(scheduler, "set_begin_index"):
    scheduler.set_begin_index(begin)
  current = {"i": 0}
  if sampler == "ddpm":
    from diffusers.schedulers import scheduling_ddpm  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(noise[current["i"]]).reshape(shape))
  sample, path = torch.from_numpy(x), []
  for i, t in enumerate(timesteps):
    current["i"] = i
    out = torch.from_numpy(fake_model(sample.numpy(), [int(t)]))
    kwargs = {}
    if sampler == "ddim":
      kwargs = {"eta": eta, "variance_noise": None if noise is None else torch.from_numpy(noise[i])}
    sample = scheduler.step(out, t, sample, **kwargs).prev_sample
    path.append(sample.numpy())
  return timesteps.numpy(), np.stack(path)


@functools.lru_cache(maxsize=None)
def _compiled_run(sampler: str, static: tuple):
  """One jitted loop per sampler and static plan options; the tables are arguments (fewer compiles)."""
  prediction_type, noisy, clip_range = static

  def run(table, timesteps, x, noise):
    plan = base.Plan(sampler, timesteps, table, 1.0, 0.0, prediction_type, noisy, clip_range)
    return sampling.run_plan(sampler, plan, jax_fake_model, x, noise=noise, trajectory=True)[1]
  return jax.jit(run)


def our_trajectory(sampler: str, config: dict, steps: int, x: np.ndarray, *, karras=False, eta=0.0,
                   noise=None, strength=1.0):
  schedule = schedule_lib.make_schedule(schedule_lib.ScheduleConfig.from_diffusers(config))
  plan = sampling.make_plan(sampler, schedule, steps, karras=karras, eta=eta, strength=strength)
  run = _compiled_run(sampler, (plan.prediction_type, plan.noisy, plan.clip_range))
  path = run(dict(plan.table), plan.timesteps, jnp.asarray(x), None if noise is None else jnp.asarray(noise))
  return plan.timesteps, np.asarray(path)


def check_parity(name: str, ours, reference):
  (t_ours, path_ours), (t_ref, path_ref) = ours, reference
  np.testing.assert_array_equal(t_ours, t_ref)
  errors = [relative_max_error(a, b) for a, b in zip(path_ours, path_ref)]
  assert len(errors) == len(t_ref)
  MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), max(errors))
  assert max(errors) < TOLERANCE, f"{name}: per-step relative errors {errors}"
  # the run genuinely denoised: the final latents are far from the start
  assert np.abs(path_ref[-1] - path_ref[0]).max() > 0.1


def start(rng, steps=None):
  x = rng.standard_normal(SHAPE).astype(np.float32)
  noise = None if steps is None else rng.standard_normal((steps,) + SHAPE).astype(np.float32)
  return x, noise


CONFIGS = {"epsilon": SD15_SCHEDULER, "v": dict(SD15_SCHEDULER, prediction_type="v_prediction")}


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sampler,karras", [("dpmpp_2m", False), ("dpmpp_2m", True), ("unipc", False),
                                            ("ddim", False)])
def test_deterministic_samplers_match_diffusers(sampler, karras, prediction, steps, rng):
  config = CONFIGS[prediction]
  x, _ = start(rng)
  check_parity(sampler + ("_karras" if karras else ""),
               our_trajectory(sampler, config, steps, x, karras=karras),
               diffusers_trajectory(sampler, config, steps, x, karras=karras))


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_match_diffusers_with_the_same_noise(sampler, eta, prediction, steps, rng,
                                                                 monkeypatch):
  config = CONFIGS[prediction]
  x, noise = start(rng, steps)
  check_parity(f"{sampler}(eta={eta})" if sampler == "ddim" else sampler,
               our_trajectory(sampler, config, steps, x, eta=eta, noise=noise),
               diffusers_trajectory(sampler, config, steps, x, eta=eta, noise=noise, monkeypatch=monkeypatch))


# The spacings each sampler does not use by default (the default ones run above); 20 steps reuse compiles.
@pytest.mark.parametrize("sampler,spacing,eta", [
    ("ddpm", "trailing", 0.0), ("ddim", "linspace", 0.5), ("ddim", "trailing", 0.0),
    ("dpmpp_2m", "leading", 0.0), ("dpmpp_2m", "trailing", 0.0), ("unipc", "leading", 0.0),
    ("unipc", "trailing", 0.0)])
def test_timestep_spacings_match_diffusers(sampler, spacing, eta, rng, monkeypatch):
  config = dict(SD15_SCHEDULER, timestep_spacing=spacing)
  x, noise = start(rng, 20)
  noise = noise if sampler == "ddpm" or eta else None
  name = f"{sampler}(eta={eta})" if eta else sampler
  check_parity(name, our_trajectory(sampler, config, 20, x, noise=noise, eta=eta),
               diffusers_trajectory(sampler, config, 20, x, noise=noise, eta=eta, monkeypatch=monkeypatch))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_strength_starts_mid_schedule_like_diffusers_img2img(sampler, rng):
  # diffusers' img2img: begin = steps - int(steps * strength), set_begin_index(begin) for multistep solvers
  steps, strength = 20, 0.6
  begin = steps - int(steps * strength)
  x, _ = start(rng)
  ours = our_trajectory(sampler, SD15_SCHEDULER, steps, x, strength=strength)
  reference = diffusers_trajectory(sampler, SD15_SCHEDULER, steps, x, begin=begin)
  assert len(ours[0]) == int(steps * strength)
  check_parity(sampler, ours, reference)


def test_plan_start_level_equals_diffusers_add_noise(rng):
  schedule = schedule_lib.make_schedule(schedule_lib.ScheduleConfig.from_diffusers(SD15_SCHEDULER))
  x0, eps = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
  for sampler in SAMPLERS.names():
    for karras in ([False, True] if sampler == "dpmpp_2m" else [False]):
      reference = diffusers_scheduler(sampler, SD15_SCHEDULER, karras=karras)
      reference.set_timesteps(20)
      begin = 8
      if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(begin)
      expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(eps),
                                     reference.timesteps[begin:begin + 1]).numpy()
      plan = sampling.make_plan(sampler, schedule, 20, strength=0.6, karras=karras)
      ours = plan.start_alpha * x0 + plan.start_sigma * eps
      assert relative_max_error(ours, expected) < 1e-6, (sampler, karras)


def test_every_registered_sampler_resolves():
  assert SAMPLERS.names() == ["ddim", "ddpm", "dpmpp_2m", "unipc"]
  for name in SAMPLERS.names():
    assert SAMPLERS.get(name).name == name


def test_bad_options_are_refused():
  schedule = schedule_lib.make_schedule()
  with pytest.raises(ValueError, match="karras"):
    sampling.make_plan("ddim", schedule, 10, karras=True)
  with pytest.raises(ValueError, match="eta"):
    sampling.make_plan("dpmpp_2m", schedule, 10, eta=0.5)
  with pytest.raises(ValueError, match="steps"):
    sampling.make_plan("unipc", schedule, 0)
  with pytest.raises(ValueError, match="strength"):
    sampling.make_plan("ddim", schedule, 10, strength=0.05)
  with pytest.raises(ValueError, match="timestep_spacing"):
    schedule_lib.ScheduleConfig(timestep_spacing="uniform")
  with pytest.raises(ValueError, match="unknown sampler"):
    sampling.get_sampler("euler")


def test_schedule_config_from_file(tmp_path):
  (tmp_path / "scheduler").mkdir()
  config = dict(SD15_SCHEDULER, prediction_type="v_prediction", timestep_spacing="trailing")
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
  loaded = schedule_lib.load_schedule_config(str(tmp_path))
  assert loaded.prediction_type == "v_prediction" and loaded.timestep_spacing == "trailing"
  assert schedule_lib.load_schedule_config(None) == schedule_lib.ScheduleConfig()
  (tmp_path / "scheduler_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=os.path.join(str(tmp_path), "scheduler_config.json")):
    schedule_lib.load_schedule_config(str(tmp_path))


def teardown_module(module):
  del module
  if MAX_ERRORS:
    print("\nmax relative parity error per sampler:", {k: f"{v:.2e}" for k, v in sorted(MAX_ERRORS.items())})
