"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with its defaults:
algorithm_type "dpmsolver++", solver_order 2, midpoint solver, lower_order_final, final sigma 0, and optional
Karras sigmas.

The solver works on the data prediction D = x0(x_t) in log-SNR time lambda = log(alpha / sigma). With
h = lambda_next - lambda_now and r = h_prev / h:
  first order (DDIM): x_next = (sigma_next / sigma_now) x - alpha_next (e^-h - 1) D_now
  second order:       ... - 0.5 alpha_next (e^-h - 1) (D_now - D_prev) / r
The first step of a run and the last step (onto sigma 0, where r would vanish) are first order.
"""
from __future__ import annotations

import jax
import numpy as np

from cassr_jax.schedulers import base
from cassr_jax.schedulers.schedule import NoiseSchedule

def make_plan(schedule: NoiseSchedule, steps: int, *, begin: int = 0, karras: bool = False,
              eta: float = 0.0) -> base.Plan:
  timesteps, sigmas, n, begin, alpha, sigma, lam = base.multistep_grid("dpmpp_2m", schedule, steps, begin=begin,
                                                                       karras=karras, eta=eta)
  i = np.arange(n)
  h = lam[i + 1] - lam[i]
  with np.errstate(invalid="ignore", divide="ignore"):
    ratio = np.where(sigma[i + 1] > 0, sigma[i + 1] / sigma[i], 0.0)
    phi = np.where(np.isfinite(h), np.expm1(-h), -1.0)      # e^-h - 1; -1 at the noise-free level
    h_prev = np.concatenate([[np.nan], lam[i[1:]] - lam[i[1:] - 1]])
    second = (i > begin) & (i != n - 1)                      # lower_order_final with final sigma 0
    r = np.where(second, h_prev / np.where(second, h, 1.0), 1.0)
  table = dict(alpha=alpha[:n], sigma=sigma[:n], coef_x=ratio, coef_d=-alpha[i + 1] * phi,
               coef_dd=np.where(second, -0.5 * alpha[i + 1] * phi / r, 0.0))
  return base.Plan("dpmpp_2m", timesteps[begin:].astype(np.int32), base.rows(table, begin),
                   start_alpha=float(alpha[begin]), start_sigma=float(sigma[begin]),
                   prediction_type=schedule.prediction_type)


def init_state(x: jax.Array):
  return x * 0  # the previous step's data prediction (unused by the first, first-order step)


def step(plan: base.Plan, row, x: jax.Array, model_output: jax.Array, previous, noise):
  del noise
  d, _ = base.x0_and_eps(plan.prediction_type, x, model_output, row["alpha"], row["sigma"], need_eps=False)
  out = row["coef_x"] * x + row["coef_d"] * d + row["coef_dd"] * (d - previous)
  return out, d


SAMPLER = base.Sampler("dpmpp_2m", make_plan, init_state, step)
