"""Evaluates super-resolved images against ground truth: the paper's metrics, PSNR/SSIM, pictures.

  python scripts/evaluate.py --pred results/RealSR --gt testsets/RealSR/hr --lq testsets/RealSR/lr \
      --out eval/RealSR [--metrics paper,psnr,ssim] [--crop-border 4] [--weights /data/metric_weights]

Pairs are matched by file stem. Writes per_image.csv, summary.md and summary.json (the paper's Table-1
layout, with the backend of every metric or "unavailable: reason"), and with --grids comparison PNGs under
grids/ and index.html (opens from disk).
"""
from __future__ import annotations

from absl import app, flags, logging

from cassr_jax.eval.results import PairingError
from cassr_jax.eval.run import run_evaluation
from cassr_jax.eval import metrics as metrics_lib

_PRED = flags.DEFINE_string("pred", None, "folder of results (super-resolved images)", required=True)
_GT = flags.DEFINE_string("gt", None, "folder of ground-truth HR images", required=True)
_LQ = flags.DEFINE_string("lq", None, "folder of LR inputs (for the comparison pictures)")
_REF = flags.DEFINE_string("ref", None, "folder of stage-1 reference images (for the comparison pictures)")
_METRICS = flags.DEFINE_string("metrics", ",".join(metrics_lib.DEFAULT_METRICS),
                               "comma-separated metrics, or paper / pixel / all")
_OUT = flags.DEFINE_string("out", None, "output folder (default: <pred>_eval)")
_CROP = flags.DEFINE_integer("crop_border", 0, "pixels trimmed per side for PSNR/SSIM")
_WEIGHTS = flags.DEFINE_string("weights", None, "local folder of metric weights (offline clusters)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "images per metric batch (padded to the device count)")
_BACKENDS = flags.DEFINE_list("backends", list(metrics_lib.BACKENDS), "metric backends in order of preference")
_GRIDS = flags.DEFINE_boolean("grids", True, "write comparison PNGs and index.html")
_LR_RESAMPLE = flags.DEFINE_enum("lr_resample", "nearest", ["nearest", "bicubic"], "LR upsampling in the grids")
_TITLE = flags.DEFINE_string("title", "Evaluation", "title of the reports")
_LABEL = flags.DEFINE_string("label", "Ours", "column heading of the results in the Table-1 summary")


def main(argv) -> int:
  del argv
  out = _OUT.value or _PRED.value.rstrip("/") + "_eval"
  try:
    outputs = run_evaluation(
        _PRED.value, _GT.value, out, lq_dir=_LQ.value, ref_dir=_REF.value, metrics=_METRICS.value,
        crop_border=_CROP.value, weights_dir=_WEIGHTS.value, batch_size=_BATCH.value, backends=_BACKENDS.value,
        grids=_GRIDS.value, lr_resample=_LR_RESAMPLE.value, title=_TITLE.value, column=_LABEL.value)
  except (PairingError, ValueError) as e:
    logging.error("%s", e)
    return 2
  with open(outputs.files["markdown"], encoding="utf-8") as f:
    print(f.read())
  for kind, path in outputs.files.items():
    logging.info("%s: %s", kind, path)
  return 0



def run() -> None:
  """Console entry point (`cassr-eval`)."""
  app.run(main)
