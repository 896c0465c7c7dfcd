"""Test set-up: 8 virtual CPU devices for the multi-device tests (set before jax is imported)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def relative_max_error(ours, reference) -> float:
  """max |ours - reference| / max |reference| (the parity metric of the project)."""
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-12))
