"""Benchmark protocol runner on tiny generated test sets with a bicubic / nearest 'model'."""
from __future__ import annotations

import json
import os
import pathlib

import cv2
import numpy as np
import pytest
from test_evaluate import test_metrics  # noqa: F401  (fixture registering the t_* test metrics)

from cassr_jax.data import images
from cassr_jax.eval import benchmark
from cassr_jax.eval import evaluate as evaluate_lib


def _prepared_set(root, rng, n=3, hr=32, scale=4):
  """A folder laid out like prepare_testsets.py's output: hr/, lr/ (area-downsampled)."""
  os.makedirs(root / "hr")
  os.makedirs(root / "lr")
  for i in range(n):
    noise = rng.random((hr // 8, hr // 8, 3)).astype(np.float32)
    img = (cv2.resize(noise, (hr, hr), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)
    images.write_png(root / "hr" / f"{i:04d}.png", img)
    images.write_png(root / "lr" / f"{i:04d}.png",
                     cv2.resize(img, (hr // scale, hr // scale), interpolation=cv2.INTER_AREA))
  return root


def _upsampler(interpolation, calls):
  def infer_fn(lq_dir, out_dir):
    calls.append((lq_dir, out_dir))
    for fname in sorted(os.listdir(lq_dir)):
      lr = images.read_image(os.path.join(lq_dir, fname))
      images.write_png(os.path.join(out_dir, fname),
                       cv2.resize(lr, (lr.shape[1] * 4, lr.shape[0] * 4), interpolation=interpolation))
  return infer_fn


def test_paper_tables_are_complete():
  for dataset, table in benchmark.PAPER_TABLE1.items():
    assert list(table) == ["fid", "dists", "lpips", "musiq", "maniqa", "clipiqa", "niqe"], dataset
    assert all(len(v) == len(benchmark.TABLE1_METHODS) for v in table.values()), dataset
  # Tables 2/3 repeat the DIV2K-val CasSR (SCEdit, general+CFG) FID/DISTS/MUSIQ/MANIQA of Table 1.
  cassr = {n: v[-1] for n, v in benchmark.PAPER_TABLE1["DIV2K-val"].items()}
  for row in (benchmark.PAPER_TABLE2["SCEdit"], benchmark.PAPER_TABLE3["general+cfg"]):
    got = dict(zip(benchmark.ABLATION_METRICS, row))
    assert [got[n] for n in ("fid", "dists", "musiq", "maniqa")] == [cassr[n] for n in ("fid", "dists", "musiq",
                                                                                          "maniqa")]


def test_table1_runs_inference_evaluates_and_writes_next_to_paper(tmp_path, rng, test_metrics):  # noqa: F811
  sets = [benchmark.prepared_testset(name, _prepared_set(tmp_path / "sets" / name, rng))
          for name in ("RealSR", "DRealSR")]
  calls = []
  infer_fn = _upsampler(cv2.INTER_CUBIC, calls)
  data = benchmark.run_table1(sets, tmp_path / "results", tmp_path / "bench", infer_fn=infer_fn,
                              metrics="musiq,t_mse,t_dist", label="CasSR (ours)", panel_width=64,
                              backends=("jax",))
  assert [c[1] for c in calls] == [str(tmp_path / "results" / n) for n in ("RealSR", "DRealSR")]
  # Our numbers are exactly what a direct evaluation of the inferred folder gives.
  direct = evaluate_lib.evaluate(tmp_path / "results" / "RealSR", sets[0].gt_dir, metrics="t_mse")
  entry = data["datasets"]["RealSR"]
  assert entry["t_mse"]["value"] == pytest.approx(direct.summary["t_mse"].value, rel=1e-12)
  assert entry["t_mse"]["paper"] is None and entry["musiq"]["value"] is None
  assert entry["musiq"]["paper"]["CasSR"] == 70.4224 and entry["musiq"]["status"] == "unavailable"
  md = pathlib.Path(tmp_path / "bench" / "table1.md").read_text(encoding="utf-8")
  assert "| RealSR | MUSIQ ↑ | 63.2816 |" in md and "| 70.4224 | – | unavailable: jax: " in md
  assert "| DRealSR | MUSIQ ↑ | 57.1217 |" in md
  assert f"| {entry['t_mse']['value']:.4f} | jax |" in md
  table = json.loads(pathlib.Path(tmp_path / "bench" / "table1.json").read_text(encoding="utf-8"))
  assert table["datasets"]["DRealSR"]["musiq"]["paper"]["HAT"] == 50.3458
  for name in ("RealSR", "DRealSR"):
    assert os.path.exists(tmp_path / "bench" / name / "index.html")
    assert len(os.listdir(tmp_path / "bench" / name / "grids")) == 3
  # Complete results are reused, not inferred again.
  benchmark.run_table1(sets[:1], tmp_path / "results", tmp_path / "bench2", infer_fn=infer_fn, metrics="t_mse",
                       grids=False)
  assert len(calls) == 2


def test_ablation_rows(tmp_path, rng, test_metrics):  # noqa: F811
  ts = benchmark.prepared_testset("DIV2K-val", _prepared_set(tmp_path / "div2k", rng))
  calls = []
  variants = {"LR-Image": _upsampler(cv2.INTER_NEAREST, calls), "SCEdit": _upsampler(cv2.INTER_CUBIC, calls)}
  data = benchmark.run_ablation(2, variants, ts, tmp_path / "results", tmp_path / "abl",
                                metrics="musiq,maniqa,t_mse", grids=False, backends=("jax",))
  ours = data["variants"]
  # Nearest upsampling is further from the (smooth) HR than bicubic: the rows differ the expected way.
  assert ours["LR-Image"]["t_mse"]["value"] > ours["SCEdit"]["t_mse"]["value"] > 0
  assert ours["SCEdit"]["musiq"]["paper"] == 68.6242 and ours["SCEdit"]["maniqa"]["paper"] == 0.4927
  md = pathlib.Path(tmp_path / "abl" / "table2.md").read_text(encoding="utf-8")
  lines = md.splitlines()
  assert lines[2].startswith("| Reference | Source | MUSIQ ↑ | MANIQA ↑ | T_MSE ↓ |")
  assert "| LR-Image | paper | 63.4204 | 0.4534 | – |" in md
  assert f"| SCEdit | ours | – | – | {ours['SCEdit']['t_mse']['value']:.4f} |" in md
  assert "| ControlNet | paper | 69.0435 |" in md and "| ControlNet | ours" not in md
  with pytest.raises(ValueError, match="Table 3 variants"):
    benchmark.run_ablation(3, {"cfg+typo": None}, ts, tmp_path / "results", tmp_path / "abl3")
  data3 = benchmark.run_ablation(3, {"general+cfg": _upsampler(cv2.INTER_CUBIC, calls)}, ts, tmp_path / "results",
                                 tmp_path / "abl3", metrics="t_mse", grids=False)
  md3 = pathlib.Path(tmp_path / "abl3" / "table3.md").read_text(encoding="utf-8")
  assert "| × | × | × | paper | – |" in md3  # 'none' row: metric t_mse has no paper value
  assert f"| ✓ | ✓ | × | ours | {data3['variants']['general+cfg']['t_mse']['value']:.4f} | jax |" in md3


def test_prepared_testset_checks_layout(tmp_path):
  os.makedirs(tmp_path / "x" / "hr")
  with pytest.raises(FileNotFoundError, match="missing lr/"):
    benchmark.prepared_testset("x", tmp_path / "x")
