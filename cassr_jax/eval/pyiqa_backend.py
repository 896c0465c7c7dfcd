"""pyiqa (IQA-PyTorch, the package the paper used) as a second metric backend.

Used only when `import pyiqa` works. On machines where PyPI's torchvision does not load next to the CPU torch
("operator torchvision::nms does not exist") the import fails and `load` raises with that reason, which the
reports show as "unavailable: ...". A local weights folder serves offline clusters: pyiqa caches its
checkpoints under torch.hub's directory, so `weights_dir` sets $TORCH_HOME to <weights_dir>/torch before the
import (put the files at <weights_dir>/torch/hub/pyiqa/).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from cassr_jax.eval import metric_info as metrics_lib

# Our metric name -> pyiqa's metric name (pyiqa's "psnr"/"ssim" default to the Y channel, so map explicitly).
PYIQA_NAMES = {
    "fid": "fid", "dists": "dists", "lpips": "lpips", "musiq": "musiq", "maniqa": "maniqa",
    "clipiqa": "clipiqa", "niqe": "niqe", "psnr_y": "psnr", "ssim_y": "ssim",
}


@functools.cache
def _import_pyiqa(weights_dir: str | None):
  if weights_dir is not None:
    os.environ["TORCH_HOME"] = os.path.join(weights_dir, "torch")
  import pyiqa  # pylint: disable=import-outside-toplevel
  return pyiqa


def available() -> tuple[bool, str]:
  """(True, version) when pyiqa imports, else (False, the reason)."""
  try:
    pyiqa = _import_pyiqa(None)
  except Exception as e:  # noqa: BLE001 - torchvision breaks with RuntimeError, not ImportError
    return False, f"pyiqa does not import ({type(e).__name__}: {e})"
  return True, getattr(pyiqa, "__version__", "unknown version")


class PyiqaMetric:
  """One pyiqa metric behind the package's metric protocol (NHWC float32 [0, 1] numpy/JAX batches)."""

  backend = "pyiqa"

  def __init__(self, name: str, net: Any, torch_module: Any):
    self.name = name
    self._net = net
    self._torch = torch_module
    self.kind = metrics_lib.info(name).kind
    self.higher_is_better = not bool(getattr(net, "lower_better", not metrics_lib.info(name).higher_is_better))

  def _tensor(self, images):
    x = np.ascontiguousarray(np.transpose(np.asarray(images, np.float32), (0, 3, 1, 2)))
    return self._torch.from_numpy(x)

  def __call__(self, pred, gt=None):
    with self._torch.no_grad():
      if self.kind == metrics_lib.FULL_REFERENCE:
        scores = self._net(self._tensor(pred), self._tensor(gt))
      else:
        scores = self._net(self._tensor(pred))
    return np.asarray(scores.detach().cpu().numpy(), np.float64).reshape(-1)

  def from_folders(self, pred_dir: str, gt_dir: str) -> float:
    """pyiqa's FID works on two folders, not on features."""
    return float(self._net(pred_dir, gt_dir))


def load(name: str, *, weights_dir: str | None = None) -> PyiqaMetric:
  """pyiqa's `name` metric, or raises (no mapping, pyiqa missing or broken, weights missing)."""
  if name not in PYIQA_NAMES:
    raise LookupError(f"pyiqa backend has no mapping for {name!r}")
  pyiqa = _import_pyiqa(weights_dir)
  import torch  # pylint: disable=import-outside-toplevel
  net = pyiqa.create_metric(PYIQA_NAMES[name], as_loss=False, device=torch.device("cpu"))
  return PyiqaMetric(name, net, torch)
