"""One static HTML page per evaluation run: the summary table and every comparison grid with its metrics.

The page uses only relative links (it opens from disk, from a copied folder or a file share), no server, no
scripts, no external fonts or styles.
"""
from __future__ import annotations

import html
import os
import urllib.parse
from collections.abc import Mapping

from cassr_jax.eval import metrics as metrics_lib
from cassr_jax.eval import report

from cassr_jax.eval.results import EvalResult

_STYLE = """
body { font-family: sans-serif; margin: 1em 2em; color: #111; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 2px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
section { margin-bottom: 2em; }
img { max-width: 100%; height: auto; display: block; }
"""


def relative_src(target: str, page_dir: str) -> str:
  """URL-quoted relative path from the page's folder to target (always '/' separated)."""
  rel = os.path.relpath(os.path.abspath(target), os.path.abspath(page_dir))
  return urllib.parse.quote(rel.replace(os.sep, "/"))


def _summary_table(result: EvalResult) -> str:
  rows = []
  for name, value, backend in report.summary_rows(result.summary, result.metrics):
    rows.append(f"<tr><th>{html.escape(name)}</th><td class=num>{html.escape(value)}</td>"
                f"<td>{html.escape(backend)}</td></tr>")
  return "<table><tr><th>Metric</th><th>Value</th><th>Backend</th></tr>" + "".join(rows) + "</table>"


def _pair_table(result: EvalResult, name: str) -> str:
  values = result.per_image.get(name, {})
  # Metrics without a value (unavailable, failed) are explained once in the summary table, not per image.
  columns = [n for n in report.per_image_columns(result) if result.summary[n].status == "ok"]
  head = "".join(f"<th>{html.escape(report.metric_heading(n))}</th>" for n in columns)
  cells = "".join(f"<td class=num>{html.escape(report.format_value(values.get(n)))}</td>" for n in columns)
  return f"<table><tr>{head}</tr><tr>{cells}</tr></table>"


def page_html(result: EvalResult, grids: Mapping[str, str], page_dir: str, *, title: str = "Evaluation") -> str:
  parts = ["<!DOCTYPE html>", "<html lang=en><head><meta charset=utf-8>",
           f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           (f"<p>{len(result.per_image)} image pairs; result folder <code>{html.escape(result.config['pred_dir'])}"
            f"</code>, ground truth <code>{html.escape(result.config['gt_dir'])}</code>.</p>"),
           _summary_table(result)]
  if result.skipped:
    parts.append("<p>Skipped: " + ", ".join(html.escape(f"{n} ({why})") for n, why in result.skipped) + "</p>")
  order = [p.name for p in result.pairs]
  for name in order:
    if name not in grids and name not in result.per_image:
      continue
    parts.append(f"<section id=\"{html.escape(name)}\"><h2>{html.escape(name)}</h2>")
    if any(result.summary[n].status == "ok" and result.summary[n].kind != metrics_lib.DISTRIBUTION
           for n in result.metrics):
      parts.append(_pair_table(result, name))
    if name in grids:
      parts.append(f"<img src=\"{html.escape(relative_src(grids[name], page_dir))}\" "
                   f"alt=\"{html.escape(name)} comparison\" loading=eager>")
    parts.append("</section>")
  parts.append("</body></html>\n")
  return "\n".join(parts)


def write_page(path: str | os.PathLike, result: EvalResult, grids: Mapping[str, str], *,
               title: str = "Evaluation") -> str:
  """Writes the page atomically at `path` (grid links relative to its folder); returns the path."""
  path = os.fspath(path)
  report.atomic_write_text(path, page_html(result, grids, os.path.dirname(os.path.abspath(path)), title=title))
  return path
