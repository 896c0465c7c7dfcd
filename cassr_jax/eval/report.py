"""Evaluation reports: per-image CSV, and the summary in the layout of the paper's Table 1 (Markdown, JSON).

Table 1 of the paper lists, per dataset, one row per metric (FID, DISTS, LPIPS, MUSIQ, MANIQA, CLIPIQA, NIQE,
each with its arrow) and one column per method. Our summary keeps that layout: metric rows with arrows, the
run's values as a column, and a Backend column saying which implementation computed each value, or
"unavailable: reason" / "failed: error" instead of a number. Every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cassr_jax.eval import metrics as metrics_lib

from cassr_jax.eval.results import EvalResult, MetricSummary

MISSING = "–"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text (UTF-8) through a temporary sibling and a rename, so readers never see half a file."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def format_value(value: Any, digits: int = 4) -> str:
  """4 decimals like the paper's tables; anything that is not a finite number is shown as a dash."""
  if isinstance(value, (int, float)) and math.isfinite(value):
    return f"{value:.{digits}f}"
  return MISSING


def metric_heading(name: str) -> str:
  return f"{metrics_lib.info(name).label} {metrics_lib.arrow(name)}"


def ordered_metrics(names: Sequence[str]) -> list[str]:
  """The paper's Table-1 order first, then the others in the order given."""
  order = list(metrics_lib.PAPER_METRICS) + list(metrics_lib.PIXEL_METRICS)
  return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), list(names).index(n)))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
  def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(cell(h) for h in header) + " |",
           "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
  lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def per_image_columns(result: EvalResult) -> list[str]:
  return [n for n in ordered_metrics(result.metrics) if result.summary[n].kind != metrics_lib.DISTRIBUTION]


def per_image_csv(result: EvalResult) -> str:
  columns = per_image_columns(result)
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["name", "width", "height"] + columns)
  for pair in result.pairs:
    if pair.name not in result.per_image:
      continue
    values = result.per_image[pair.name]
    writer.writerow([pair.name, pair.width, pair.height] +
                    [repr(values[n]) if n in values else "" for n in columns])
  return buf.getvalue()


def summary_rows(summary: Mapping[str, MetricSummary], names: Sequence[str]) -> list[list[str]]:
  return [[metric_heading(n), format_value(summary[n].value), summary[n].describe_backend()]
          for n in ordered_metrics(names)]


def summary_markdown(result: EvalResult, *, title: str = "Evaluation", column: str = "Ours",
                     dataset: str | None = None) -> str:
  header = (["Dataset"] if dataset else []) + ["Metrics", column, "Backend"]
  rows = [([dataset] if dataset else []) + r for r in summary_rows(result.summary, result.metrics)]
  text = f"# {title}\n\n{len(result.per_image)} image pairs"
  text += f" (pred: `{result.config['pred_dir']}`, gt: `{result.config['gt_dir']}`"
  if result.config.get("crop_border"):
    text += f", crop border {result.config['crop_border']} for PSNR/SSIM"
  text += ")\n\n"
  text += markdown_table(header, rows, [False] * (len(header) - 2) + [True, False])
  if result.skipped:
    text += "\nSkipped (unreadable):\n\n" + "".join(f"- {n}: {why}\n" for n, why in result.skipped)
  return text


def summary_dict(result: EvalResult) -> dict[str, Any]:
  return {
      "images": len(result.per_image),
      "metrics": [{"name": n, "label": s.label, "higher_is_better": s.higher_is_better, "kind": s.kind,
                   "status": s.status, "backend": s.backend, "value": s.value, "count": s.count,
                   "reason": s.reason} for n, s in ((n, result.summary[n]) for n in ordered_metrics(result.metrics))],
      "skipped": [{"name": n, "reason": why} for n, why in result.skipped],
      "config": result.config,
  }


def write_reports(result: EvalResult, out_dir: str | os.PathLike, *, title: str = "Evaluation",
                  column: str = "Ours", dataset: str | None = None) -> dict[str, str]:
  """per_image.csv, summary.md, summary.json in out_dir; returns {kind: path}."""
  out_dir = os.fspath(out_dir)
  paths = {k: os.path.join(out_dir, f) for k, f in (("csv", "per_image.csv"), ("markdown", "summary.md"),
                                                     ("json", "summary.json"))}
  atomic_write_text(paths["csv"], per_image_csv(result))
  atomic_write_text(paths["markdown"], summary_markdown(result, title=title, column=column, dataset=dataset))
  atomic_write_text(paths["json"], json.dumps(summary_dict(result), indent=1, ensure_ascii=False) + "\n")
  return paths
