"""The paper's evaluation protocol: our Table 1 row and Table 2/3 ablation rows next to the published numbers.

Test sets are the folders written by scripts/prepare_testsets.py (<root>/lr, <root>/hr). Running the model is
the pipeline's job: pass `infer_fn(lq_dir, out_dir)` that writes one result per LR image (same file stem;
`pipeline_infer_fn(pipe)` makes one from a CasSRPipeline, and `cassr-benchmark` runs a training run or an
exported pipeline over the sets);
results already complete in the results folder are reused unless `overwrite=True`. Every set is evaluated with
cassr_jax.eval.run.run_evaluation (reports, grids, HTML per set) and the tables are written as Markdown
and JSON (atomically) with the paper's values beside ours.
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cassr_jax.eval import html as html_lib
from cassr_jax.eval import metrics as metrics_lib
from cassr_jax.eval import report
from cassr_jax.eval import evaluate
from cassr_jax.eval.results import OK, MetricSummary
from cassr_jax.eval.run import run_evaluation

logger = logging.getLogger("cassr_jax.eval")

InferFn = Callable[[str, str], Any]

# --- Published numbers (CasSR paper, arXiv text in shared/reference/cassr-paper.txt) ---------------------------
# Table 1: "Quantitative comparisons on both synthetic and real-world benchmarks", all methods with their
# released models. Order of the values: TABLE1_METHODS. The text extraction lost the first block's dataset
# label; it is DIV2K-val: the text calls DIV2K the set where CasSR is best or second best throughout, and the
# ablations (Tables 2/3, run on one set) repeat this block's CasSR numbers (FID 30.7808, DISTS 0.1531).
TABLE1_METHODS = ("BSRGAN", "FeMaSR", "HAT", "DASR", "PASD", "StableSR", "DiffBIR", "SeeSR", "CasSR")
PAPER_TABLE1: dict[str, dict[str, tuple[float, ...]]] = {
    "DIV2K-val": {
        "fid": (52.9180, 42.2293, 41.7034, 55.3689, 31.6253, 31.2679, 39.4041, 28.5568, 30.7808),
        "dists": (0.1899, 0.1617, 0.1919, 0.3068, 0.1599, 0.1596, 0.1558, 0.1601, 0.1531),
        "lpips": (0.3516, 0.3272, 0.3175, 0.4505, 0.3254, 0.3316, 0.3658, 0.3050, 0.3225),
        "musiq": (62.5478, 60.8010, 57.0293, 53.0613, 65.7858, 55.9177, 67.0657, 66.3587, 68.6242),
        "maniqa": (0.3489, 0.3334, 0.3062, 0.2933, 0.3920, 0.2958, 0.4580, 0.4393, 0.4927),
        "clipiqa": (0.5623, 0.6167, 0.4486, 0.4603, 0.5933, 0.5053, 0.7018, 0.6277, 0.6861),
        "niqe": (3.7414, 3.8060, 4.1641, 4.5046, 3.6746, 4.5062, 2.9574, 3.8750, 3.6026),
    },
    "DRealSR": {
        "fid": (157.0340, 157.7239, 141.8644, 170.1904, 151.7256, 145.6182, 170.5032, 145.1622, 166.1467),
        "dists": (0.2352, 0.2270, 0.2462, 0.2697, 0.2544, 0.2073, 0.2683, 0.2342, 0.2868),
        "lpips": (0.3600, 0.3255, 0.3370, 0.3705, 0.3776, 0.2779, 0.4447, 0.3301, 0.3067),
        "musiq": (57.1217, 57.1217, 50.3458, 40.6016, 54.9425, 51.5160, 60.8363, 64.7460, 67.3450),
        "maniqa": (0.3420, 0.3155, 0.3102, 0.2700, 0.3917, 0.3235, 0.4486, 0.5048, 0.4985),
        "clipiqa": (0.5084, 0.5625, 0.3901, 0.4700, 0.5478, 0.5126, 0.6476, 0.6883, 0.7142),
        "niqe": (6.5994, 5.9545, 7.2654, 8.2681, 7.0751, 7.5105, 6.1496, 6.3751, 5.6890),
    },
    "RealSR": {
        "fid": (143.3876, 140.2071, 123.0671, 163.8753, 126.6657, 129.3065, 130.4431, 126.9731, 139.0698),
        "dists": (0.2125, 0.2263, 0.1996, 0.2662, 0.2066, 0.2034, 0.2313, 0.2264, 0.2459),
        "lpips": (0.2688, 0.2918, 0.2469, 0.3585, 0.2788, 0.2657, 0.3644, 0.3034, 0.3822),
        "musiq": (63.2816, 58.5714, 57.3266, 46.8467, 62.9266, 61.0109, 64.6228, 69.7639, 70.4224),
        "maniqa": (0.3782, 0.3510, 0.3364, 0.2585, 0.4080, 0.3667, 0.4545, 0.5463, 0.5326),
        "clipiqa": (0.5076, 0.5353, 0.3793, 0.3844, 0.5190, 0.5218, 0.6521, 0.6795, 0.6968),
        "niqe": (5.7083, 5.6371, 6.4163, 6.9204, 5.6479, 6.5735, 5.7470, 5.2362, 5.3491),
    },
}

ABLATION_METRICS = ("fid", "dists", "lpips", "musiq", "maniqa")
# Table 2: "importance of image activation module": which stage-1 model makes the reference image.
# (SCEdit is CasSR's default; its LPIPS is printed as 0.3175 here but 0.3225 in Table 1 - kept as printed.)
PAPER_TABLE2: dict[str, tuple[float, ...]] = {
    "LR-Image": (33.1480, 0.1797, 0.3216, 63.4204, 0.4534),
    "ControlNet": (30.5114, 0.1534, 0.3207, 69.0435, 0.5037),
    "SCEdit": (30.7808, 0.1531, 0.3175, 68.6242, 0.4927),
}
# Table 3: "effect of semantic feature": general description prompt / classifier-free guidance / caption prompt.
PAPER_TABLE3: dict[str, tuple[float, ...]] = {
    "general+cfg": (30.7808, 0.1531, 0.3225, 68.6242, 0.4927),
    "none": (32.6440, 0.1844, 0.3141, 57.3091, 0.3260),
    "cfg": (32.4908, 0.1572, 0.3250, 68.5192, 0.4773),
    "general+cfg+caption": (30.6618, 0.1535, 0.3280, 68.2996, 0.5057),
}
TABLE3_FLAGS = ("general", "cfg", "caption")
PAPER_ABLATIONS = {2: PAPER_TABLE2, 3: PAPER_TABLE3}
ABLATION_SET = "DIV2K-val"  # the set whose CasSR numbers Tables 2/3 repeat


@dataclasses.dataclass(frozen=True)
class BenchmarkSet:
  """One benchmark set: its name (a PAPER_TABLE1 key to get the paper's numbers) and its folders."""
  name: str
  lq_dir: str
  gt_dir: str


def prepared_testset(name: str, root: str | os.PathLike) -> BenchmarkSet:
  """A set written by scripts/prepare_testsets.py: <root>/lr and <root>/hr."""
  root = os.fspath(root)
  missing = [d for d in ("lr", "hr") if not os.path.isdir(os.path.join(root, d))]
  if missing:
    raise FileNotFoundError(f"{root}: not a prepared test set (missing {', '.join(missing)}/; "
                            "see scripts/prepare_testsets.py)")
  return BenchmarkSet(name, os.path.join(root, "lr"), os.path.join(root, "hr"))


def _stems(folder: str) -> set[str]:
  return set(evaluate.list_images(folder, "images", [])) if os.path.isdir(folder) else set()


def ensure_results(lq_dir: str, pred_dir: str, infer_fn: InferFn | None, *, overwrite: bool = False) -> None:
  """Runs infer_fn(lq_dir, pred_dir) unless pred_dir already has a result for every LR image."""
  if infer_fn is None:
    return
  missing = _stems(lq_dir) - _stems(pred_dir)
  if not overwrite and not missing and os.path.isdir(pred_dir):
    logger.info("%s: results complete, inference skipped", pred_dir)
    return
  os.makedirs(pred_dir, exist_ok=True)
  logger.info("inference: %s -> %s", lq_dir, pred_dir)
  infer_fn(lq_dir, pred_dir)


def _value(summary: MetricSummary) -> float | None:
  return summary.value if summary.status == OK else None


def _metric_entry(summary: MetricSummary) -> dict[str, Any]:
  return {"value": _value(summary), "backend": summary.backend, "status": summary.status,
          "reason": summary.reason}


def table1_markdown(ours: Mapping[str, Mapping[str, MetricSummary]], metrics: Sequence[str], *,
                    label: str = "Ours") -> str:
  """Dataset | Metrics | the paper's methods | our column | Backend, one row per metric (Table 1 layout)."""
  header = ["Dataset", "Metrics", *TABLE1_METHODS[:-1], "CasSR (paper)", label, "Backend"]
  rows = []
  for dataset, summaries in ours.items():
    paper = PAPER_TABLE1.get(dataset, {})
    for n in report.ordered_metrics(metrics):
      published = paper.get(n, (None,) * len(TABLE1_METHODS))
      rows.append([dataset, report.metric_heading(n), *map(report.format_value, published),
                   report.format_value(_value(summaries[n])), summaries[n].describe_backend()])
  return report.markdown_table(header, rows, [False, False] + [True] * (len(header) - 3) + [False])


def ablation_markdown(table: int, ours: Mapping[str, Mapping[str, MetricSummary]],
                      metrics: Sequence[str] = ABLATION_METRICS) -> str:
  """Table 2/3 layout (one row per variant, metric columns): the paper's row, then ours, per variant."""
  paper = PAPER_ABLATIONS[table]
  first = ["Reference"] if table == 2 else ["General description", "CFG", "Caption"]
  metrics = report.ordered_metrics(metrics)
  header = first + ["Source"] + [report.metric_heading(n) for n in metrics] + ["Backends"]
  rows = []
  for variant in list(paper) + [v for v in ours if v not in paper]:
    if table == 2:
      key = [variant]
    else:
      flags = set(variant.split("+")) if variant != "none" else set()
      key = ["✓" if f in flags else "×" for f in TABLE3_FLAGS]
    if variant in paper:
      published = dict(zip(ABLATION_METRICS, paper[variant]))
      rows.append(key + ["paper"] + [report.format_value(published.get(n)) for n in metrics] + [""])
    if variant in ours:
      s = ours[variant]
      backends = sorted({s[n].describe_backend() for n in metrics})
      rows.append(key + ["ours"] + [report.format_value(_value(s[n])) for n in metrics] + ["; ".join(backends)])
  return report.markdown_table(header, rows, [False] * (len(first) + 1) + [True] * len(metrics) + [False])


def _write_index(out_dir: str, title: str, markdown: str, pages: Mapping[str, str]) -> str:
  links = "".join(f"<li><a href=\"{html.escape(html_lib.relative_src(p, out_dir))}\">{html.escape(n)}</a></li>"
                  for n, p in pages.items())
  body = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title></head>"
          f"<body><h1>{html.escape(title)}</h1><pre>{html.escape(markdown)}</pre><ul>{links}</ul></body></html>\n")
  path = os.path.join(out_dir, "index.html")
  report.atomic_write_text(path, body)
  return path


def run_table1(testsets: Sequence[BenchmarkSet], results_root: str | os.PathLike, out_dir: str | os.PathLike, *,
               infer_fn: InferFn | None = None, metrics: str | Sequence[str] | None = None, label: str = "Ours",
               overwrite: bool = False, grids: bool = True, **evaluate_options) -> dict[str, Any]:
  """Results in <results_root>/<set name> (made by infer_fn when given), evaluation per set in
  <out_dir>/<set name>/, and <out_dir>/table1.md / table1.json with the paper's Table 1 beside ours."""
  out_dir, results_root = os.fspath(out_dir), os.fspath(results_root)
  names = metrics_lib.parse_metric_list(metrics)
  ours: dict[str, dict[str, MetricSummary]] = {}
  pages: dict[str, str] = {}
  for ts in testsets:
    pred_dir = os.path.join(results_root, ts.name)
    ensure_results(ts.lq_dir, pred_dir, infer_fn, overwrite=overwrite)
    run = run_evaluation(pred_dir, ts.gt_dir, os.path.join(out_dir, ts.name), lq_dir=ts.lq_dir,
                                      metrics=names, grids=grids, title=f"{ts.name}: {label}", column=label,
                                      dataset=ts.name, **evaluate_options)
    ours[ts.name] = run.result.summary
    if "html" in run.files:
      pages[ts.name] = run.files["html"]
  markdown = table1_markdown(ours, names, label=label)
  data = {"label": label, "paper_methods": list(TABLE1_METHODS),
          "datasets": {d: {n: {**_metric_entry(s[n]),
                               "paper": dict(zip(TABLE1_METHODS, PAPER_TABLE1[d][n]))
                               if n in PAPER_TABLE1.get(d, {}) else None} for n in names}
                       for d, s in ours.items()}}
  report.atomic_write_text(os.path.join(out_dir, "table1.md"), "# Table 1\n\n" + markdown)
  report.atomic_write_text(os.path.join(out_dir, "table1.json"), json.dumps(data, indent=1, ensure_ascii=False))
  _write_index(out_dir, f"Table 1: {label}", markdown, pages)
  return data


def run_ablation(table: int, variants: Mapping[str, InferFn | None], testset: BenchmarkSet,
                 results_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                 metrics: str | Sequence[str] | None = ABLATION_METRICS, overwrite: bool = False,
                 grids: bool = True, **evaluate_options) -> dict[str, Any]:
  """Table 2 (variant = stage-1 reference: LR-Image / ControlNet / SCEdit) or Table 3 (variant = prompt
  flags joined by '+': general+cfg, none, cfg, general+cfg+caption). Each variant's results are in
  <results_root>/<variant> (made by its infer_fn when given); writes <out_dir>/table<N>.md and .json."""
  if table not in PAPER_ABLATIONS:
    raise ValueError(f"ablation table must be 2 or 3, got {table}")
  if table == 3:
    bad = [v for v in variants if v != "none" and not set(v.split("+")) <= set(TABLE3_FLAGS)]
    if bad:
      raise ValueError(f"Table 3 variants are '+'-joined {TABLE3_FLAGS} or 'none'; got {bad}")
  out_dir, results_root = os.fspath(out_dir), os.fspath(results_root)
  names = metrics_lib.parse_metric_list(metrics)
  ours: dict[str, dict[str, MetricSummary]] = {}
  pages: dict[str, str] = {}
  for variant, infer_fn in variants.items():
    pred_dir = os.path.join(results_root, variant)
    ensure_results(testset.lq_dir, pred_dir, infer_fn, overwrite=overwrite)
    run = run_evaluation(pred_dir, testset.gt_dir, os.path.join(out_dir, variant),
                                      lq_dir=testset.lq_dir, metrics=names, grids=grids,
                                      title=f"Table {table}: {variant} on {testset.name}", column=variant,
                                      dataset=testset.name, **evaluate_options)
    ours[variant] = run.result.summary
    if "html" in run.files:
      pages[variant] = run.files["html"]
  markdown = ablation_markdown(table, ours, names)
  paper = PAPER_ABLATIONS[table]
  data = {"table": table, "dataset": testset.name, "paper_dataset": ABLATION_SET,
          "variants": {v: {n: {**_metric_entry(s[n]),
                               "paper": dict(zip(ABLATION_METRICS, paper[v])).get(n) if v in paper else None}
                           for n in names} for v, s in ours.items()}}
  report.atomic_write_text(os.path.join(out_dir, f"table{table}.md"), f"# Table {table}\n\n" + markdown)
  report.atomic_write_text(os.path.join(out_dir, f"table{table}.json"),
                           json.dumps(data, indent=1, ensure_ascii=False))
  _write_index(out_dir, f"Table {table} on {testset.name}", markdown, pages)
  return data


def pipeline_infer_fn(pipe, *, seed: int = 0, batch_size: int | None = None, **settings) -> InferFn:
  """infer_fn running a CasSRPipeline over every LR image of a folder (PNG per file stem, this host's share
  when several processes run; a bad file is reported, the rest go on)."""
  from cassr_jax.pipelines import cassr as pipeline_lib  # pylint: disable=import-outside-toplevel

  def infer(lq_dir: str, out_dir: str):
    inputs = pipeline_lib.find_images([lq_dir])
    jobs = [(i, path, pipeline_lib.output_path(out_dir, rel)) for i, (path, rel) in enumerate(inputs)]
    report_ = pipeline_lib.super_resolve_files(pipe, pipeline_lib.process_share(jobs), seed=seed,
                                               batch_size=batch_size, **settings)
    for path, reason in report_.failed:
      logger.error("failed: %s: %s", path, reason)
    return report_

  return infer
