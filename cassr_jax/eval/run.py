"""run_evaluation: evaluate a folder pair and write every output (reports, comparison grids, HTML page)."""
from __future__ import annotations

import dataclasses
import os

from cassr_jax.eval import compare, html, report
from cassr_jax.eval.evaluate import evaluate
from cassr_jax.eval.results import EvalResult


@dataclasses.dataclass
class RunOutputs:
  result: EvalResult
  files: dict[str, str]  # kind -> path (csv, markdown, json, html)
  grids: dict[str, str]  # pair name -> grid PNG


def run_evaluation(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   grids: bool = True, title: str = "Evaluation", column: str = "Ours", dataset: str | None = None,
                   pred_label: str = "CasSR", lr_resample: str = "nearest", panel_width: int = 384,
                   **evaluate_options) -> RunOutputs:
  """evaluate() and write everything to out_dir: per_image.csv, summary.md/.json, and (grids=True)
  grids/<name>.png plus index.html laying them out with their metric values."""
  result = evaluate(pred_dir, gt_dir, **evaluate_options)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  files = report.write_reports(result, out_dir, title=title, column=column, dataset=dataset)
  grid_paths: dict[str, str] = {}
  if grids:
    grid_paths = compare.write_grids(result.pairs, os.path.join(out_dir, "grids"), pred_label=pred_label,
                                     lr_resample=lr_resample, panel_width=panel_width)
    files["html"] = html.write_page(os.path.join(out_dir, "index.html"), result, grid_paths, title=title)
  return RunOutputs(result, files, grid_paths)
