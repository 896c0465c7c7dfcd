"""UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler with its defaults: B(h) = e^h - 1 ("bh2"),
order 2, data prediction (predict_x0), lower_order_final, final sigma 0, every corrector on.

Each step first corrects the latents the previous predictor produced (UniC, using the new model output), then
predicts the next latents (UniP). In log-SNR time with hh = -h and B = e^hh - 1, data predictions m:
  predictor: x_next = (sigma_next / sigma) x - alpha_next B m_now - alpha_next B rho_p (m_prev - m_now) / r
  corrector: x_now' = (sigma_now / sigma_last) x_last - alpha_now B m_last
                      - alpha_now B [rho_c0 (m_prev - m_last) / r + rho_c1 (m_now - m_last)]
The predictor's order is min(2, steps since the run began + 1, steps left); the corrector uses the order of
the predictor it corrects. The coefficients rho come from diffusers' small linear system, solved on the host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.schedulers import base
from cassr_jax.schedulers.schedule import NoiseSchedule

ORDER = 2


def _phi(h: float) -> tuple[float, float, float]:
  """(hh, h phi_1 = e^hh - 1, B(h)) for data prediction, hh = -h; bh2's B(h) is also e^hh - 1.
  The noise-free end (h = inf) gives (-inf, -1, -1)."""
  if not np.isfinite(h):
    return -np.inf, -1.0, -1.0
  hh = -h
  return hh, float(np.expm1(hh)), float(np.expm1(hh))


def _rhos(hh: float, h_phi_1: float, b_h: float, order: int) -> np.ndarray:
  """The right-hand side b_1..b_order of UniPC's order conditions (diffusers' loop)."""
  h_phi_k = h_phi_1 / hh - 1.0
  factorial, b = 1, []
  for k in range(1, order + 1):
    b.append(h_phi_k * factorial / b_h)
    factorial *= k + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  return np.asarray(b)


def make_plan(schedule: NoiseSchedule, steps: int, *, begin: int = 0, karras: bool = False,
              eta: float = 0.0) -> base.Plan:
  timesteps, sigmas, n, begin, alpha, sigma, lam = base.multistep_grid("unipc", schedule, steps, begin=begin,
                                                                       karras=karras, eta=eta)
  orders = [min(ORDER, n - i, i - begin + 1) for i in range(n)]  # predictor order of step i
  names = ("p_x", "p_m", "p_dm", "use_c", "c_x", "c_m", "c_dm", "c_new")
  table = {k: np.zeros(n) for k in names}
  for i in range(begin, n):
    # predictor i: from level i to level i + 1
    h = lam[i + 1] - lam[i]
    _, h_phi_1, b_h = _phi(h)
    table["p_x"][i] = sigma[i + 1] / sigma[i]
    table["p_m"][i] = -alpha[i + 1] * h_phi_1
    if orders[i] == 2:
      rk = (lam[i - 1] - lam[i]) / h
      table["p_dm"][i] = -alpha[i + 1] * b_h * 0.5 / rk   # rho_p = 0.5 for order 2
    # corrector at step i > begin: refines the latents predictor i - 1 made, from level i - 1 to level i
    if i > begin:
      order = orders[i - 1]
      h = lam[i] - lam[i - 1]
      hh, h_phi_1, b_h = _phi(h)
      table["use_c"][i] = 1.0
      table["c_x"][i] = sigma[i] / sigma[i - 1]
      table["c_m"][i] = -alpha[i] * h_phi_1
      if order == 1:
        rhos = np.array([0.5])
      else:
        rk = (lam[i - 2] - lam[i - 1]) / h
        rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), _rhos(hh, h_phi_1, b_h, 2))
        table["c_dm"][i] = -alpha[i] * b_h * rhos[0] / rk
      table["c_new"][i] = -alpha[i] * b_h * rhos[-1]
  table.update(alpha=alpha[:n], sigma=sigma[:n])
  return base.Plan("unipc", timesteps[begin:].astype(np.int32), base.rows(table, begin),
                   start_alpha=float(alpha[begin]), start_sigma=float(sigma[begin]),
                   prediction_type=schedule.prediction_type)


def init_state(x: jax.Array):
  zeros = x * 0
  # (latents before the last predictor, the last data prediction, the one before it)
  return zeros, zeros, zeros


def step(plan: base.Plan, row, x: jax.Array, model_output: jax.Array, state, noise):
  del noise
  last_x, m_last, m_prev = state
  # diffusers converts the model output with the uncorrected latents, then corrects them
  m, _ = base.x0_and_eps(plan.prediction_type, x, model_output, row["alpha"], row["sigma"], need_eps=False)
  corrected = (row["c_x"] * last_x + row["c_m"] * m_last + row["c_dm"] * (m_prev - m_last)
               + row["c_new"] * (m - m_last))
  x = jnp.where(row["use_c"] > 0, corrected, x)
  x_next = row["p_x"] * x + row["p_m"] * m + row["p_dm"] * (m_last - m)
  return x_next, (x, m, m_last)


SAMPLER = base.Sampler("unipc", make_plan, init_state, step)
