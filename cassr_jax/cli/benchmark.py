"""`cassr-benchmark`: the paper's Table-1 protocol for a trained model.

  cassr-benchmark --run runs/cassr --testsets data/testsets --out bench/cassr [--steps 50 --cfg 5.5]
  cassr-benchmark --pipeline exported/cassr --testsets data/testsets --sets RealSR,DRealSR

Each of --sets is <testsets>/<name> as written by scripts/prepare_testsets.py (lr/, hr/). Results go to
<out>/results/<set> (reused when complete), evaluations to <out>/<set>/, and <out>/table1.md / .json put our
row beside the paper's Table 1.
"""
from __future__ import annotations

import os

from absl import app, flags, logging

_RUN = flags.DEFINE_string("run", None, "training run directory")
_PIPELINE = flags.DEFINE_string("pipeline", None, "exported CasSR pipeline directory")
_TESTSETS = flags.DEFINE_string("testsets", None, "folder holding the prepared test sets", required=True)
_SETS = flags.DEFINE_list("sets", ["DIV2K-val", "RealSR", "DRealSR"], "test sets (sub-folders of --testsets)")
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_METRICS = flags.DEFINE_string("metrics", "paper", "comma-separated metrics, or paper / pixel / all")
_LABEL = flags.DEFINE_string("label", "Ours", "our row's label")
_STEPS = flags.DEFINE_integer("steps", None, "sampling steps (default: the pipeline's)")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the pipeline's)")
_SEED = flags.DEFINE_integer("seed", 0, "seed")
_WEIGHTS = flags.DEFINE_string("weights", None, "local folder of metric weights")


def main(argv) -> int:
  del argv
  from cassr_jax.eval import benchmark  # pylint: disable=import-outside-toplevel
  from cassr_jax.pipelines.cassr import CasSRPipeline  # pylint: disable=import-outside-toplevel
  from cassr_jax.train.export import pipeline_from_run  # pylint: disable=import-outside-toplevel

  if bool(_RUN.value) == bool(_PIPELINE.value):
    logging.error("give exactly one of --run and --pipeline")
    return 2
  try:
    sets = [benchmark.prepared_testset(name, os.path.join(_TESTSETS.value, name)) for name in _SETS.value]
    pipe = pipeline_from_run(_RUN.value) if _RUN.value else CasSRPipeline.from_pretrained(_PIPELINE.value)
  except (FileNotFoundError, ValueError) as e:
    logging.error("%s", e)
    return 2
  settings = {k: v for k, v in (("steps", _STEPS.value), ("guidance_scale", _CFG.value)) if v is not None}
  data = benchmark.run_table1(sets, os.path.join(_OUT.value, "results"), _OUT.value,
                              infer_fn=benchmark.pipeline_infer_fn(pipe, seed=_SEED.value, **settings),
                              metrics=_METRICS.value, label=_LABEL.value, weights_dir=_WEIGHTS.value)
  with open(os.path.join(_OUT.value, "table1.md"), encoding="utf-8") as f:
    print(f.read())
  return 0 if data else 1


def run() -> None:
  """Console entry point (`cassr-benchmark`)."""
  app.run(main)
