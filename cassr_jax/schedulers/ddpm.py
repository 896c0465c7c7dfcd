"""Ancestral DDPM sampling (Ho et al. 2020), as diffusers' DDPMScheduler with the "fixed_small" variance.

Each step goes to the next timestep of the (spaced) schedule through the posterior q(x_prev | x_t, x0): its
mean from the predicted x0, plus sqrt(posterior variance) times fresh noise (none at t = 0).
"""
from __future__ import annotations

import jax
import numpy as np

from cassr_jax.schedulers import base
from cassr_jax.schedulers.schedule import NoiseSchedule, inference_timesteps


def make_plan(schedule: NoiseSchedule, steps: int, *, begin: int = 0, karras: bool = False,
              eta: float = 0.0) -> base.Plan:
  if karras:
    raise ValueError("ddpm does not support karras sigmas (use dpmpp_2m or unipc)")
  if eta != 0.0:
    raise ValueError("ddpm is always fully stochastic; eta applies to ddim only")
  config = schedule.config
  timesteps = inference_timesteps(config, steps, spacing=base.spacing_for(schedule, "leading"), multistep=False)
  begin = base.begin_index(len(timesteps), begin)
  abar = schedule.alphas_cumprod
  prev = np.concatenate([timesteps[1:], [-1]])
  abar_t = abar[timesteps]
  abar_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)
  alpha_step = abar_t / abar_prev            # the product of (1 - beta) over the skipped timesteps
  beta_step = 1.0 - alpha_step
  variance = np.maximum((1 - abar_prev) / (1 - abar_t) * beta_step, 1e-20)
  table = dict(alpha=np.sqrt(abar_t), sigma=np.sqrt(1 - abar_t),
               coef_x0=np.sqrt(abar_prev) * beta_step / (1 - abar_t),
               coef_x=np.sqrt(alpha_step) * (1 - abar_prev) / (1 - abar_t),
               std=np.where(timesteps > 0, np.sqrt(variance), 0.0))
  return base.Plan("ddpm", timesteps[begin:].astype(np.int32), base.rows(table, begin),
                   start_alpha=float(table["alpha"][begin]), start_sigma=float(table["sigma"][begin]),
                   prediction_type=schedule.prediction_type, noisy=True,
                   clip_range=config.clip_sample_range if config.clip_sample else None)


def step(plan: base.Plan, row, x: jax.Array, model_output: jax.Array, state, noise):
  x0, _ = base.x0_and_eps(plan.prediction_type, x, model_output, row["alpha"], row["sigma"], need_eps=False)
  x0 = base.maybe_clip(plan, x0)
  return row["coef_x0"] * x0 + row["coef_x"] * x + row["std"] * noise, state


SAMPLER = base.Sampler("ddpm", make_plan, base.no_state, step, stochastic=True)
