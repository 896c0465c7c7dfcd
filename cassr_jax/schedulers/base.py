"""What every sampler shares: the host-side plan of a run, the sampler record, model-output conversion.

A sampler is split in two, so the whole denoising loop compiles to one XLA loop:
  * `make_plan` (host, numpy, float64): the timesteps and every per-step coefficient of a run, as arrays whose
    row i drives step i (the same numbers diffusers' scheduler computes step by step in Python);
  * `step` (pure JAX): one update of the latents from the model output, given that row and a small carried
    state (earlier model outputs for the multistep solvers).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.schedulers.schedule import NoiseSchedule, inference_timesteps


@dataclasses.dataclass(frozen=True)
class Plan:
  """The tables of one sampling run (rows begin..N-1 of an N-step schedule).

  timesteps: (n,) the model's integer t at each step. table: name -> (n,) float64 coefficients.
  start_alpha/start_sigma: the noise level of the first step (x = alpha x0 + sigma eps starts a run from an
  image). prediction_type, clip_range (None: no clipping) are static options of `step`. noisy: whether the
  steps consume fresh Gaussian noise (DDPM, DDIM with eta > 0).
  """
  sampler: str
  timesteps: np.ndarray
  table: Mapping[str, np.ndarray]
  start_alpha: float
  start_sigma: float
  prediction_type: str
  noisy: bool = False
  clip_range: float | None = None

  def __len__(self) -> int:
    return len(self.timesteps)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registered sampler (cassr_jax.registry.SAMPLERS).

  make_plan(schedule, steps, *, begin=0, karras=False, eta=0.0) -> Plan
  init_state(x) -> carried state (a pytree of arrays shaped like x, or ())
  step(plan, row, x, model_output, state, noise) -> (next x, next state); `row` holds this step's table
    entries as scalars, `noise` is a standard normal array like x (ignored unless plan.noisy).
  """
  name: str
  make_plan: Callable[..., Plan]
  init_state: Callable[[jax.Array], Any]
  step: Callable[..., tuple[jax.Array, Any]]


def no_state(x: jax.Array) -> tuple:
  del x
  return ()


def spacing_for(schedule: NoiseSchedule, default: str) -> str:
  return schedule.config.timestep_spacing or default


def begin_index(steps: int, begin: int) -> int:
  if not 0 <= begin < steps:
    raise ValueError(f"begin must be in [0, {steps}) for {steps} steps, got {begin}")
  return begin


def x0_and_eps(prediction_type: str, x: jax.Array, model_output: jax.Array, alpha, sigma,
               *, need_eps: bool = True):
  """(x0, eps) implied by the model output at x = alpha x0 + sigma eps (epsilon or v prediction)."""
  if prediction_type == "epsilon":
    eps = model_output
    return (x - sigma * eps) / alpha, eps
  if prediction_type == "v_prediction":
    x0 = alpha * x - sigma * model_output
    return x0, (alpha * model_output + sigma * x if need_eps else None)
  raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def maybe_clip(plan: Plan, x0: jax.Array) -> jax.Array:
  return x0 if plan.clip_range is None else jnp.clip(x0, -plan.clip_range, plan.clip_range)


# ----------------------------------------------------------------------------- sigma-space helpers (DPM, UniPC)


def full_sigmas(schedule: NoiseSchedule) -> np.ndarray:
  """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep, float32-rounded as diffusers keeps it."""
  abar = schedule.alphas_cumprod
  return np.sqrt((1.0 - abar) / abar).astype(np.float32).astype(np.float64)


def karras_sigmas(sigmas: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022) sigma ramp between the schedule's largest and smallest sigma."""
  ramp = np.linspace(0.0, 1.0, steps)
  hi, lo = float(sigmas.max()) ** (1.0 / rho), float(sigmas.min()) ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timestep whose sigma is `sigma` (linear interpolation in log sigma)."""
  log_sigmas = np.log(sigmas)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma[None, :] - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
  lo, hi = log_sigmas[low], log_sigmas[low + 1]
  w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
  return (1 - w) * low + w * (low + 1)


def alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """VP coefficients (alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps from sigma = sigma_t / alpha_t."""
  alpha = 1.0 / np.sqrt(sigma ** 2 + 1.0)
  return alpha, sigma * alpha


def log_snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """lambda = log(alpha / sigma); +inf where sigma = 0 (the final, noise-free level)."""
  with np.errstate(divide="ignore"):
    return np.log(alpha) - np.log(sigma)


def sigma_schedule(schedule: NoiseSchedule, steps: int, *, spacing: str, karras: bool):
  """(timesteps (N,), sigmas (N + 1,)) of the multistep solvers; the last sigma is 0 ("zero" final sigma)."""
  train_sigmas = full_sigmas(schedule)
  if karras:
    sigmas = karras_sigmas(train_sigmas, steps)
    timesteps = np.round(sigma_to_t(sigmas, train_sigmas)).astype(np.int64)
  else:
    timesteps = inference_timesteps(schedule.config, steps, spacing=spacing, multistep=True)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
  # diffusers keeps these sigmas in float32; round the same way so both sides step through equal levels.
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
  return timesteps, sigmas


def rows(table: Mapping[str, np.ndarray], begin: int) -> dict[str, np.ndarray]:
  return {k: np.asarray(v[begin:], np.float64) for k, v in table.items()}


def multistep_grid(name: str, schedule: NoiseSchedule, steps: int, *, begin: int, karras: bool, eta: float):
  """The shared start of the multistep solvers' plans (DPM-Solver++, UniPC): timesteps and sigmas (linspace
  spacing unless the config says otherwise, optionally Karras), the first step index, alpha, sigma and the
  log-SNR lambda of every point."""
  if eta != 0.0:
    raise ValueError(f"{name} is deterministic; eta applies to ddim only")
  timesteps, sigmas = sigma_schedule(schedule, steps, spacing=spacing_for(schedule, "linspace"), karras=karras)
  n = len(timesteps)
  begin = begin_index(n, begin)
  alpha, sigma = alpha_sigma(sigmas)
  return timesteps, sigmas, n, begin, alpha, sigma, log_snr(alpha, sigma)
