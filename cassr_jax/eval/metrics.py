"""Metric registry and backend resolution.

Every metric follows one protocol: an object with `name`, `kind` ("full_reference" | "no_reference" |
"distribution"), `higher_is_better`, `backend` and `__call__(pred, gt) -> (B,)` on float32 NHWC [0, 1]
batches; a "distribution" metric (FID) instead has `features(images) -> (B, D)` and
`fid_from_features(a, b) -> float` (a method, or a function of the metric's module). A metric with weights may also have `with_weights(weights_dir)`
returning a copy that loads them from a local folder (--weights, offline clusters).

Two backends: the JAX metrics of this package (METRICS, lazy "module:attribute" entries) and pyiqa (the
paper's package, cassr_jax.eval.pyiqa_backend) when it imports. `resolve` tries them in order and returns the
first that loads; a metric that no backend can provide comes back as unavailable with every backend's reason,
so reports say why instead of printing a number.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Sequence
from typing import Any

from cassr_jax.eval import weights
from cassr_jax.eval.metric_info import (BACKENDS, DEFAULT_METRICS, DISTRIBUTION, FULL_REFERENCE, METRIC_INFO,  # noqa: F401
                                        NO_REFERENCE, PAPER_METRICS, PIXEL_METRICS, MetricInfo, arrow, info)
from cassr_jax.registry import Registry

# JAX metrics of this package (name -> "module:attribute").
METRICS = Registry("metric", {
    "psnr": "cassr_jax.eval.pixel:PSNR",
    "ssim": "cassr_jax.eval.pixel:SSIM",
    "psnr_y": "cassr_jax.eval.pixel:PSNR_Y",
    "ssim_y": "cassr_jax.eval.pixel:SSIM_Y",
    "lpips": "cassr_jax.eval.lpips:lpips",
    "lpips_vgg": "cassr_jax.eval.lpips:lpips_vgg",
    "dists": "cassr_jax.eval.dists:dists",
    "niqe": "cassr_jax.eval.niqe:NIQE_METRIC",
    "fid": "cassr_jax.eval.fid:FID_METRIC",
})


@dataclasses.dataclass
class Resolved:
  """A metric ready to run (`metric` set) or unavailable (`reason` set)."""
  name: str
  metric: Any = None
  backend: str | None = None
  reason: str | None = None

  @property
  def available(self) -> bool:
    return self.metric is not None


def _load_jax(name: str, weights_dir: str | None) -> Any:
  if name not in METRICS:
    raise LookupError("no JAX implementation")
  metric = METRICS.get(name)
  if weights_dir is not None:
    if hasattr(metric, "with_weights"):
      metric = metric.with_weights(weights_dir)
    else:
      # cassr_jax.eval.weights looks in $CASSR_METRIC_WEIGHTS after the (unset) per-metric folder.
      os.environ[weights.ENV_VAR] = weights_dir
  if hasattr(metric, "load"):
    metric.load()  # networks load their weights lazily: fail here (unavailable), not in the middle of a run
  return metric


def _load_pyiqa(name: str, weights_dir: str | None) -> Any:
  from cassr_jax.eval import pyiqa_backend  # pylint: disable=import-outside-toplevel
  return pyiqa_backend.load(name, weights_dir=weights_dir)


_LOADERS = {"jax": _load_jax, "pyiqa": _load_pyiqa}


def short_error(e: BaseException) -> str:
  """'Type: first line of the message' (reports stay one line per metric)."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def distribution_distance(metric: Any):
  """The metric's fid_from_features (a method, or a function of the module defining its class), or None."""
  distance = getattr(metric, "fid_from_features", None)
  if distance is None:
    distance = getattr(inspect.getmodule(type(metric)), "fid_from_features", None)
  return distance if callable(distance) else None


def protocol_problem(metric: Any) -> str | None:
  """Why `metric` cannot be run by the evaluation (None when it can)."""
  kind = getattr(metric, "kind", None)
  if kind not in (FULL_REFERENCE, NO_REFERENCE, DISTRIBUTION):
    return f"kind={kind!r}"
  if not hasattr(metric, "higher_is_better"):
    return "no higher_is_better"
  if kind == DISTRIBUTION:
    if not (hasattr(metric, "features") and distribution_distance(metric)) and not hasattr(metric, "from_folders"):
      return "a distribution metric needs features() and fid_from_features(), or from_folders()"
  elif not callable(metric):
    return "not callable"
  return None


def resolve(name: str, *, weights_dir: str | os.PathLike | None = None,
            backends: Sequence[str] = BACKENDS) -> Resolved:
  """The first backend (in `backends` order) that provides `name`; else unavailable with all reasons."""
  weights_dir = None if weights_dir is None else os.fspath(weights_dir)
  reasons = []
  for backend in backends:
    if backend not in _LOADERS:
      raise ValueError(f"unknown metric backend {backend!r}; known: {sorted(_LOADERS)}")
    try:
      metric = _LOADERS[backend](name, weights_dir)
    except Exception as e:  # noqa: BLE001 - any load failure (import, weights, torch) makes it unavailable
      reasons.append(f"{backend}: {short_error(e)}")
      continue
    problem = protocol_problem(metric)
    if problem:
      reasons.append(f"{backend}: {type(metric).__name__} does not follow the metric protocol ({problem})")
      continue
    return Resolved(name, metric, getattr(metric, "backend", backend))
  return Resolved(name, reason="; ".join(reasons) or "no backend tried")


def known_names() -> list[str]:
  return sorted(set(METRIC_INFO) | set(METRICS.names()))


def parse_metric_list(value: str | Sequence[str] | None) -> list[str]:
  """"psnr,ssim" / ["psnr", "ssim"] / "paper" / "all" / None (= all) -> names, unknown ones rejected."""
  if value is None:
    return list(DEFAULT_METRICS)
  items = value.split(",") if isinstance(value, str) else list(value)
  names: list[str] = []
  for item in (i.strip().lower() for i in items):
    if not item:
      continue
    expanded = {"paper": PAPER_METRICS, "all": DEFAULT_METRICS, "pixel": PIXEL_METRICS}.get(item, (item,))
    names.extend(n for n in expanded if n not in names)
  unknown = [n for n in names if n not in METRIC_INFO and n not in METRICS]
  if unknown:
    raise ValueError(f"unknown metric(s) {unknown}; known: {known_names()} (or paper, pixel, all)")
  if not names:
    raise ValueError("no metrics given")
  return names
