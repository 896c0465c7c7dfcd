"""The sharded CasSR training step: 8 devices (data 4 x fsdp 2) equal 1 device, frozen weights stay
bit-identical, optimizer state exists only for the trained parameters, the tiny model overfits a batch;
gradient accumulation equals the whole-batch step; the EMA follows its closed-form recursion over the trained
weights (no copy of the frozen ones) and is what a run exports.

One 1-device trainer (with an EMA) serves every test that needs one: each trainer compiles its own step."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from cassr_jax import parallel
from cassr_jax.models import frozen_filter, trainable_filter
from cassr_jax.train import checkpointing, export
from cassr_jax.train.components import build_components
from cassr_jax.train.step import Trainer
from conftest import relative_max_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = 0.9
EMA_STEPS = 3


def tiny_config(**train):
  from test_configs import load_config_file  # pylint: disable=import-outside-toplevel
  config = load_config_file("tiny", ROOT)
  config.data.sources = "folder:/unused"
  for k, v in train.items():
    setattr(config.train, k, v)
  return config


def fixed_batch(batch=8, crop=64, seed=0):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:crop, 0:crop] / crop
  hr = np.stack([np.stack([np.sin(x * (i + 2) * 3), np.cos(y * (i + 1) * 2), x * y], -1) * 0.5 + 0.5
                 for i in range(batch)]).astype(np.float32)
  lr = hr.reshape(batch, crop // 4, 4, crop // 4, 4, 3).mean((2, 4))
  lr = np.clip(lr + rng.normal(0, 0.02, lr.shape), 0, 1).astype(np.float32)
  lr_up = np.repeat(np.repeat(lr, 4, 1), 4, 2)
  return {"hr": hr, "lr": lr, "lr_up": lr_up, "epoch": np.zeros(batch, np.int32),
          "index": np.arange(batch, dtype=np.int32)}


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trainers():
  """1 device with an EMA (whole-batch steps), 8 devices without one."""
  config = tiny_config(ema_decay=DECAY)
  one = Trainer(config, build_components(config), parallel.make_mesh(1, jax.devices()[:1]))
  config = tiny_config()
  eight = Trainer(config, build_components(config), parallel.make_mesh(2))
  assert dict(eight.mesh.shape) == {"data": 4, "fsdp": 2}
  return one, eight


def _buffers(tree):
  return [(jax.tree_util.keystr(path), shard.data.unsafe_buffer_pointer())
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] for shard in x.addressable_shards]


def test_donated_state_shares_no_buffer_on_a_data_mesh():
  """On a data-only mesh (a100x8: data 8 x fsdp 1) every donated state buffer is its own: the ControlNet
  starts as a copy of the frozen U-Net encoder, and a replicated placement that kept the source's buffer
  made XLA reject the step (a buffer donated and read in one call) and crash."""
  config = tiny_config()
  trainer = Trainer(config, build_components(config), parallel.make_mesh(1))
  assert dict(trainer.mesh.shape) == {"data": 8, "fsdp": 1}
  state = _buffers(trainer.init_state())
  owners = {}
  for name, pointer in state + _buffers(trainer.frozen):
    owners.setdefault(pointer, []).append(name)
  shared = [names for names in owners.values() if len(names) > 1]
  assert not shared, shared[:3]
  assert len(state) == 8 * len(jax.tree.leaves(trainer.init_state()))


def test_eight_devices_equal_one(trainers):
  one, eight = trainers
  batch = fixed_batch()
  s1, m1 = one.step(one.init_state(), one.frozen, parallel.host_local_to_global(batch, one.mesh))
  s8, m8 = eight.step(eight.init_state(), eight.frozen, parallel.host_local_to_global(batch, eight.mesh))
  assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-5 * abs(float(m1["loss"]))
  # Relative to the largest trained parameter: on zero-initialised leaves Adam's first update is
  # lr * g / (|g| + eps), which amplifies the reduction-order noise of near-zero gradients (per leaf ~1e-4).
  p1, p8 = leaves(s1["params"]), leaves(s8["params"])
  scale = max(np.max(np.abs(a)) for a in p1)
  worst = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p8)) / scale
  assert worst <= 1e-5, worst
  # The update really moved the trained parameters (a step that changed nothing would also "match").
  before = leaves(one.init_state()["params"])
  assert max(relative_max_error(a, b) for a, b in zip(leaves(s1["params"]), before)) > 1e-4
  # Parameters and optimizer state live on the fsdp-sharded layout the logical-axis rules give.
  kernel = s8["params"]["controlnet"]["conv_in"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  mu = s8["opt"]["opt_state"][1][0].mu["controlnet"]["conv_in"]["kernel"]
  assert mu.sharding.spec == kernel.sharding.spec


def test_frozen_bit_identical_and_optimizer_state_for_trainables_only(trainers):
  _, eight = trainers
  config = eight.config
  fresh = build_components(config).model  # frozen weights are rebuilt deterministically from init
  frozen_before = leaves(nnx.state(fresh, frozen_filter(fresh)))
  state = eight.init_state()
  for step in range(3):
    state, metrics = eight.step(state, eight.frozen, parallel.host_local_to_global(fixed_batch(seed=step), eight.mesh))
    assert np.isfinite(float(metrics["loss"]))
  assert int(state["step"]) == 3
  frozen_after = leaves(eight.frozen["model"])
  assert len(frozen_after) == len(frozen_before)
  assert all(np.array_equal(a, b) for a, b in zip(frozen_after, frozen_before))

  trainable = nnx.state(fresh, trainable_filter(fresh))
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  n_frozen = sum(x.size for x in frozen_before)
  adam = state["opt"]["opt_state"][1][0]
  assert sum(x.size for x in jax.tree.leaves(adam.mu)) == n_trainable
  assert sum(x.size for x in jax.tree.leaves(adam.nu)) == n_trainable
  # Everything else is a scalar counter (Adam's, the lr schedule's, the optimizer's step).
  opt_leaves = jax.tree.leaves(state["opt"])
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * n_trainable
  assert sum(1 for x in opt_leaves if not x.ndim) == 3
  # Every parameter is either trained or frozen (the tiny U-Net is smaller than its ControlNet + attention).
  assert n_frozen > 0 and n_trainable > 0
  assert n_frozen + n_trainable == sum(x.size for x in jax.tree.leaves(nnx.state(fresh, nnx.Param)))


def test_tiny_model_overfits_one_fixed_batch(trainers):
  """Same batch, same noise and timesteps every step (the step counter that seeds them is held at 0): the
  loss must halve. The step count it takes is printed (pytest -s) for the README."""
  _, eight = trainers
  batch = parallel.host_local_to_global(fixed_batch(), eight.mesh)
  state = eight.init_state()
  zero = state["step"]
  first = None
  for step in range(1, 201):
    state["step"] = jax.device_put(np.zeros((), np.int32), zero.sharding)
    state, metrics = eight.step(state, eight.frozen, batch)
    loss = float(metrics["loss"])
    first = loss if first is None else first
    if loss <= first / 2:
      break
  print(f"\ntiny CasSR: loss {first:.4f} -> {loss:.4f} (halved) after {step} steps on one fixed batch")
  assert loss <= first / 2, (first, loss)


def largest_relative_difference(a_tree, b_tree) -> float:
  """max |a - b| over every leaf, relative to the largest |b| (the metric of test_train_step)."""
  a, b = leaves(a_tree), leaves(b_tree)
  assert len(a) == len(b)
  scale = max(float(np.max(np.abs(x))) for x in b)
  return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b)) / scale


@pytest.fixture(scope="module")
def whole(trainers):
  """The tiny config on one device, whole-batch steps, EMA kept."""
  return trainers[0]


def test_gradient_accumulation_equals_the_whole_batch_step(whole):
  # 2 micro-batches of 4 on data 2 x fsdp 2: each micro-batch is still split over the devices.
  config = tiny_config(ema_decay=DECAY, grad_accum=2)
  accum = Trainer(config, build_components(config), parallel.make_mesh(2, jax.devices()[:4]))
  assert accum.grad_accum == 2 and whole.grad_accum == 1
  batch = fixed_batch()
  before = leaves(whole.init_state()["params"])
  s1, m1 = whole.step(whole.init_state(), whole.frozen, parallel.host_local_to_global(batch, whole.mesh))
  # conftest's fast-compiling flags leave XLA's CPU loops unoptimised: the micro-batch scan (convolutions in a
  # while loop) then runs ~25x slower (70 s) than at optimisation level 1, which compiles ~35 s longer.
  accum_state, accum_batch = accum.init_state(), parallel.host_local_to_global(batch, accum.mesh)
  accum_step = accum.step.lower(accum_state, accum.frozen, accum_batch).compile(
      compiler_options={"xla_backend_optimization_level": 1})
  s2, m2 = accum_step(accum_state, accum.frozen, accum_batch)
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
