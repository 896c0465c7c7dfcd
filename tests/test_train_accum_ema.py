"""Gradient accumulation equals the whole-batch step; the EMA follows its closed-form recursion over the trained
weights (no copy of the frozen ones) and is what a run exports."""
import jax
import numpy as np
import pytest
from flax import nnx

from cassr_jax import parallel
from cassr_jax.models import trainable_filter
from cassr_jax.train import checkpointing, export
from cassr_jax.train.components import build_components
from cassr_jax.train.step import Trainer
from test_train_step import fixed_batch, leaves, tiny_config

DECAY = 0.9
EMA_STEPS = 3


def largest_relative_difference(a_tree, b_tree) -> float:
  """max |a - b| over every leaf, relative to the largest |b| (the metric of test_train_step)."""
  a, b = leaves(a_tree), leaves(b_tree)
  assert len(a) == len(b)
  scale = max(float(np.max(np.abs(x))) for x in b)
  return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b)) / scale


@pytest.fixture(scope="module")
def whole():
  """The tiny config on one device, whole-batch steps, EMA kept."""
  config = tiny_config(ema_decay=DECAY)
  return Trainer(config, build_components(config), parallel.make_mesh(1, jax.devices()[:1]))


def test_gradient_accumulation_equals_the_whole_batch_step(whole):
  # 2 micro-batches of 4 on data 2 x fsdp 2: each micro-batch is still split over the devices.
  config = tiny_config(ema_decay=DECAY, grad_accum=2)
  accum = Trainer(config, build_components(config), parallel.make_mesh(2, jax.devices()[:4]))
  assert accum.grad_accum == 2 and whole.grad_accum == 1
  batch = fixed_batch()
  before = leaves(whole.init_state()["params"])
  s1, m1 = whole.step(whole.init_state(), whole.frozen, parallel.host_local_to_global(batch, whole.mesh))
  s2, m2 = accum.step(accum.init_state(), accum.frozen, parallel.host_local_to_global(batch, accum.mesh))
  # Per-example random draws: the mean of the micro-batch losses / gradients is the whole batch's.
  assert abs(float(m2["loss"]) - float(m1["loss"])) <= 1e-5 * abs(float(m1["loss"]))
  assert abs(float(m2["grad_norm"]) - float(m1["grad_norm"])) <= 1e-5 * float(m1["grad_norm"])
  worst = largest_relative_difference(s2["params"], s1["params"])
  assert worst <= 1e-5, worst
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(s1["params"]), before))
  assert moved > 1e-4  # the step changed the parameters it is compared on


@pytest.fixture(scope="module")
def ema_history(whole):
  """EMA_STEPS steps on different batches: the final state and the host copies of the trained parameters
  before the first and after every step."""
  state = whole.init_state()
  history = [jax.tree.map(np.asarray, state["params"])]
  for step in range(EMA_STEPS):
    batch = parallel.host_local_to_global(fixed_batch(seed=step), whole.mesh)
    state, metrics = whole.step(state, whole.frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    history.append(jax.tree.map(np.asarray, state["params"]))
  return state, history


def test_ema_is_the_closed_form_recursion_of_the_trained_weights(whole, ema_history):
  state, history = ema_history
  # ema_0 = p_0, ema_n = d ema_(n-1) + (1 - d) p_n  =>  ema_n = d^n p_0 + sum_i (1 - d) d^(n-i) p_i
  n = len(history) - 1
  weights = [DECAY ** n] + [(1 - DECAY) * DECAY ** (n - i) for i in range(1, n + 1)]
  expected = jax.tree.map(lambda *ps: sum(w * p.astype(np.float64) for w, p in zip(weights, ps)), *history)
  assert jax.tree.structure(state["ema"]) == jax.tree.structure(state["params"])
  err = largest_relative_difference(state["ema"], expected)
  assert err <= 1e-6, err
  # ... and it is not simply the current weights (the recursion really lags behind them).
  assert largest_relative_difference(state["ema"], state["params"]) > 1e-4

  # Frozen weights have no EMA copy: the EMA holds exactly the trained leaves.
  model = build_components(whole.config, model_only=True).model
  trainable = nnx.state(model, trainable_filter(model))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  n_ema = sum(x.size for x in jax.tree.leaves(state["ema"]))
  assert n_ema == sum(x.size for x in jax.tree.leaves(trainable)) < n_params
  assert jax.tree.structure(state["ema"]) == jax.tree.structure(trainable)


def test_run_export_takes_the_ema_weights(whole, ema_history, tmp_path):
  state, _ = ema_history
  run = str(tmp_path / "run")
  checkpointing.write_run_config(run, whole.config)
  saver = checkpointing.Checkpointer(run, keep=1)
  saver.save(EMA_STEPS, state)
  saver.wait()
  saver.close()

  def trained(pipe):
    return nnx.state(pipe.unet, trainable_filter(pipe.unet))

  assert largest_relative_difference(trained(export.pipeline_from_run(run)), state["ema"]) == 0.0
  assert largest_relative_difference(trained(export.pipeline_from_run(run, ema=False)), state["params"]) == 0.0
