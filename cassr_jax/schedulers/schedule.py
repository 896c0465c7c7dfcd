"""The diffusion noise schedule shared by training and every sampler.

SD-1.5 trains with 1000 steps and the "scaled_linear" betas: sqrt(beta) linear from sqrt(0.00085) to
sqrt(0.012), squared. The schedule is read from a diffusers `scheduler_config.json` when one is given
(conversion copies it next to the weights); otherwise SD-1.5's values apply.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULER_FILE = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The fields of a diffusers scheduler config that define the forward process."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  steps_offset: int = 1          # SD-1.5's; only the samplers' "leading" spacing uses it
  # None: each sampler's own diffusers default ("leading" for DDPM/DDIM, "linspace" for DPM-Solver++/UniPC),
  # which is what diffusers does with SD-1.5's config (it names no spacing).
  timestep_spacing: str | None = None
  set_alpha_to_one: bool = False  # DDIM's last step goes to abar = 1 (True) or abar[0] (SD-1.5: False)
  clip_sample: bool = False       # DDPM/DDIM clip the predicted x0 to +-clip_sample_range
  clip_sample_range: float = 1.0

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
    if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS} (or None), got "
                       f"{self.timestep_spacing!r}")
    if self.num_train_timesteps < 2:
      raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")

  @classmethod
  def from_diffusers(cls, values: Mapping[str, Any]) -> "ScheduleConfig":
    """Keeps the fields above from a diffusers scheduler config (any scheduler class); ignores the rest."""
    names = {f.name for f in dataclasses.fields(cls)}
    if values.get("trained_betas") is not None:
      raise ValueError("trained_betas (an explicit beta list) is not supported")
    return cls(**{k: v for k, v in values.items() if k in names})


def load_schedule_config(directory: str | os.PathLike | None) -> ScheduleConfig:
  """ScheduleConfig from `directory`/scheduler_config.json (or `directory`/scheduler/...), else SD-1.5's."""
  if directory is None:
    return ScheduleConfig()
  for path in (os.path.join(directory, SCHEDULER_FILE), os.path.join(directory, "scheduler", SCHEDULER_FILE)):
    if os.path.isfile(path):
      try:
        with open(path) as f:
          return ScheduleConfig.from_diffusers(json.load(f))
      except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid scheduler config: {e}") from e
  return ScheduleConfig()


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """alphas_cumprod[t] for t = 0..T-1 (float64 on the host, so samplers can derive their tables exactly)."""
  config: ScheduleConfig
  betas: np.ndarray
  alphas_cumprod: np.ndarray

  @property
  def num_train_timesteps(self) -> int:
    return self.config.num_train_timesteps

  @property
  def prediction_type(self) -> str:
    return self.config.prediction_type


def make_schedule(config: ScheduleConfig | None = None) -> NoiseSchedule:
  config = config or ScheduleConfig()
  n = config.num_train_timesteps
  if config.beta_schedule == "scaled_linear":
    # diffusers computes this in float32; so do we, then keep float64 for everything derived.
    betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=np.float32) ** 2
  else:
    betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float32)
  # diffusers keeps alphas_cumprod as float32 (torch.cumprod of float32): round the same way.
  alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32).astype(np.float64)
  return NoiseSchedule(config, betas.astype(np.float64), alphas_cumprod)


def _coefficients(schedule: NoiseSchedule, timesteps: jax.Array, ndim: int, dtype):
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[timesteps]
  shape = (-1,) + (1,) * (ndim - 1)
  return (jnp.sqrt(abar).reshape(shape).astype(dtype), jnp.sqrt(1.0 - abar).reshape(shape).astype(dtype))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
  """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, per-example integer timesteps (B,)."""
  a, s = _coefficients(schedule, timesteps, x0.ndim, x0.dtype)
  return a * x0 + s * noise


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
  """What the denoiser is trained to output: the noise (epsilon) or v = sqrt(abar) noise - sqrt(1-abar) x0."""
  if schedule.prediction_type == "epsilon":
    return noise
  a, s = _coefficients(schedule, timesteps, x0.ndim, x0.dtype)
  return a * noise - s * x0


def predict_x0(schedule: NoiseSchedule, x_t: jax.Array, model_output: jax.Array, timesteps: jax.Array) -> jax.Array:
  """x0 implied by a model output at x_t (the one-step prediction used for quick previews)."""
  a, s = _coefficients(schedule, timesteps, x_t.ndim, x_t.dtype)
  if schedule.prediction_type == "epsilon":
    return (x_t - s * model_output) / a
  return a * x_t - s * model_output


def inference_timesteps(config: ScheduleConfig, steps: int, *, spacing: str, multistep: bool) -> np.ndarray:
  """The model's timesteps for a `steps`-step run, descending, as diffusers' set_timesteps computes them.

  multistep: DPM-Solver/UniPC place steps + 1 points and drop the last (t = 0); DDPM/DDIM place `steps`.
  """
  n, total = int(steps), config.num_train_timesteps
  if not 1 <= n <= total:
    raise ValueError(f"steps must be in [1, {total}], got {steps}")
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
  points = n + 1 if multistep else n
  if spacing == "linspace":
    t = np.linspace(0, total - 1, points).round()[::-1]
  elif spacing == "leading":
    t = (np.arange(points) * (total // points)).round()[::-1] + config.steps_offset
  else:  # trailing: the ratio is total / steps in both families
    t = np.round(np.arange(total, 0, -total / n)) - 1
  t = t[:n].astype(np.int64)
  if t.min() < 0 or t.max() >= total:
    raise ValueError(f"timesteps {t.tolist()} fall outside [0, {total}) (steps_offset={config.steps_offset})")
  return t
