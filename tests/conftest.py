"""Test set-up: 8 virtual CPU devices for the multi-device tests and fast-compiling XLA (set before jax is
imported)."""
import functools
import os

# The tests compile hundreds of small XLA programs and run each once or twice, so compile time dominates.
# LLVM's optimisation passes off cut it about 2.3x (compiling a small CasSR U-Net forward: 40 s -> 18 s of
# CPU) while the heavy convolutions still run in library kernels; parity errors are unchanged (CasSR:
# 4.2e-7); the older loop emitter for fusions cuts it again (to 7 s); results move by an ulp at most.
# Subprocesses sharing a persistent compilation cache with this process must use the same flags
# (test_train_loop.environment).
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                  "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Random init compiles one XLA program per parameter shape; the rbg generator compiles far faster than
# threefry on CPU (tests check properties, never particular random values).
jax.config.update("jax_default_prng_impl", "rbg")


# The slowest files first, longest first (measured under `pytest -n 2`); the rest follow in name order. With
# the file scheduler below this is greedy longest-first scheduling: the heavy files spread over both workers
# and the many short ones fill the end.
SLOW_FILES_FIRST = ("test_train_loop.py", "test_train_step.py", "test_demo.py", "test_workflow.py",
                    "test_cassr_unet.py", "test_infer_script.py", "test_rrdbnet.py", "test_pipeline.py",
                    "test_activation.py", "test_train_scedit.py", "test_convert.py", "test_scedit.py",
                    "test_remat.py", "test_fid.py", "test_vae.py", "test_unet.py", "test_tiled.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`pytest -n N`: whole files to whichever worker is free, in collection order. xdist's default "load"
  starts each worker on a block of consecutive tests (with -n 2, 58 of 466: worker 0 got every slow file and
  ran ~1000 s of them alone) and may split a file whose module fixture (a training run) then runs twice."""
  if config.getvalue("dist") != "load":
    return None  # an explicit --dist other than load wins
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=import-outside-toplevel
  config.option.loadscopereorder = False  # keep SLOW_FILES_FIRST's order, not "most tests first"
  return LoadFileScheduling(config, log)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def relative_max_error(ours, reference) -> float:
  """max |ours - reference| / max |reference| (the parity metric of the project)."""
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-12))


@functools.lru_cache(maxsize=None)
def _jitted(method: str, kwargs_items: tuple):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.jit(lambda m, *a: getattr(m, method)(*a, **dict(kwargs_items)))


def jit_call(model, *args, method: str = "__call__", **kwargs):
  """Calls model.method(*args, **kwargs) under nnx.jit, one compile per model structure and input shapes
  (eager op-by-op dispatch is far slower on CPU)."""
  return _jitted(method, tuple(sorted(kwargs.items())))(model, *args)
