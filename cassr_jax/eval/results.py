"""The records an evaluation produces (pairs, per-metric summaries, the whole result), shared by the
evaluator, the reports, the comparison grids and the HTML page."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"  # MetricSummary.status


class PairingError(ValueError):
  """The folders do not pair up; `problems` lists every problem found."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__(f"{len(self.problems)} pairing problem(s):\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class ImagePair:
  name: str  # the shared file stem
  pred: str
  gt: str
  width: int
  height: int
  lq: str | None = None
  ref: str | None = None


@dataclasses.dataclass
class MetricSummary:
  """One metric's line of the summary: a value, or why there is none."""
  name: str
  label: str
  higher_is_better: bool
  kind: str
  status: str
  backend: str | None = None
  value: float | None = None
  count: int = 0
  reason: str | None = None

  def describe_backend(self) -> str:
    return self.backend if self.status == OK else f"{self.status}: {self.reason}"


@dataclasses.dataclass
class EvalResult:
  pairs: list[ImagePair]
  metrics: list[str]
  per_image: dict[str, dict[str, float]]  # pair name -> metric -> value (per-image metrics only)
  summary: dict[str, MetricSummary]
  skipped: list[tuple[str, str]]  # (pair name, reason) of pairs whose pixels could not be read
  config: dict[str, Any]
