"""What reports need to know about each metric (label, kind, direction), whether or not a backend can compute it."""
from __future__ import annotations

import dataclasses
from typing import Any

FULL_REFERENCE, NO_REFERENCE, DISTRIBUTION = "full_reference", "no_reference", "distribution"


@dataclasses.dataclass(frozen=True)
class MetricInfo:
  """What a report needs to know about a metric even when no backend can compute it."""
  label: str
  kind: str
  higher_is_better: bool


# The paper's seven (Table 1 order) first, then the pixel metrics the paper leaves out.
METRIC_INFO: dict[str, MetricInfo] = {
    "fid": MetricInfo("FID", DISTRIBUTION, False),
    "dists": MetricInfo("DISTS", FULL_REFERENCE, False),
    "lpips": MetricInfo("LPIPS", FULL_REFERENCE, False),
    "musiq": MetricInfo("MUSIQ", NO_REFERENCE, True),
    "maniqa": MetricInfo("MANIQA", NO_REFERENCE, True),
    "clipiqa": MetricInfo("CLIPIQA", NO_REFERENCE, True),
    "niqe": MetricInfo("NIQE", NO_REFERENCE, False),
    "lpips_vgg": MetricInfo("LPIPS-VGG", FULL_REFERENCE, False),
    "psnr": MetricInfo("PSNR", FULL_REFERENCE, True),
    "ssim": MetricInfo("SSIM", FULL_REFERENCE, True),
    "psnr_y": MetricInfo("PSNR-Y", FULL_REFERENCE, True),
    "ssim_y": MetricInfo("SSIM-Y", FULL_REFERENCE, True),
}
PAPER_METRICS = ("fid", "dists", "lpips", "musiq", "maniqa", "clipiqa", "niqe")
PIXEL_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")
DEFAULT_METRICS = PAPER_METRICS + PIXEL_METRICS
BACKENDS = ("jax", "pyiqa")


def info(name: str, metric: Any = None) -> MetricInfo:
  """The metric's MetricInfo (from the table, else from the metric object itself)."""
  if name in METRIC_INFO:
    return METRIC_INFO[name]
  if metric is not None:
    return MetricInfo(name.upper(), metric.kind, bool(metric.higher_is_better))
  return MetricInfo(name.upper(), "unknown", False)


def arrow(name: str, metric: Any = None) -> str:
  return "↑" if info(name, metric).higher_is_better else "↓"
