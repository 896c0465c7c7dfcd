"""Evaluation front-end: pairing, batching/sharding, backends and unavailable metrics, reports, CLI."""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging as std_logging
import os
import pathlib

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl import logging as absl_logging

from cassr_jax.data import images
from cassr_jax.eval import evaluate as evaluate_lib
from cassr_jax.eval import results
from cassr_jax.eval import metrics as metrics_lib
from cassr_jax.eval import pyiqa_backend, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def absl_testing_logs():
  """Collects absl error messages (absl logs to the Python 'absl' logger)."""
  messages = []

  class _Collect(std_logging.Handler):
    def emit(self, record):
      messages.append(record.getMessage())

  handler = _Collect(level=std_logging.ERROR)
  absl_logging.get_absl_logger().addHandler(handler)
  try:
    yield messages
  finally:
    absl_logging.get_absl_logger().removeHandler(handler)


class _MSE:
  """A full-reference test metric; records each batch's shape and sharding."""
  name, kind, higher_is_better, backend = "t_mse", metrics_lib.FULL_REFERENCE, False, "jax"

  def __init__(self):
    self.calls = []

  def __call__(self, pred, gt):
    self.calls.append((pred.shape, len(pred.sharding.device_set)))
    return jnp.mean((pred - gt) ** 2, axis=(1, 2, 3))


class _Brightness:
  name, kind, higher_is_better, backend = "t_bright", metrics_lib.NO_REFERENCE, True, "jax"

  def __call__(self, pred, gt):
    del gt
    return jnp.mean(pred, axis=(1, 2, 3))


class _MeanColourDistance:
  """A distribution metric: squared distance between the two sets' mean colours."""
  name, kind, higher_is_better, backend = "t_dist", metrics_lib.DISTRIBUTION, False, "jax"

  def features(self, images_):
    return jnp.mean(images_, axis=(1, 2))

  def fid_from_features(self, a, b):
    return float(np.sum((np.mean(a, 0) - np.mean(b, 0)) ** 2))


class _ModuleLevelDistance:
  """A distribution metric whose distance is its module's fid_from_features (like cassr_jax.eval.fid)."""
  name, kind, higher_is_better, backend = "t_mdist", metrics_lib.DISTRIBUTION, False, "jax"

  def features(self, images_):
    return jnp.mean(images_, axis=(1, 2))


def fid_from_features(a, b):
  return float(np.abs(np.mean(a) - np.mean(b)))


class _WeightsMissingOnCall(_MSE):
  name = "t_lazyweights"

  def __call__(self, pred, gt):
    raise FileNotFoundError("weights.bin not found; looked in:\n  /nowhere")


class _Broken:
  name, kind, higher_is_better, backend = "t_broken", metrics_lib.FULL_REFERENCE, False, "jax"

  def __call__(self, pred, gt):
    raise RuntimeError("kaboom")


class _OneScore(_MSE):
  name = "t_one"

  def __call__(self, pred, gt):
    return jnp.zeros((1,))


@pytest.fixture
def test_metrics(monkeypatch):
  entries = {"t_mse": _MSE(), "t_bright": _Brightness(), "t_dist": _MeanColourDistance(), "t_broken": _Broken(),
             "t_one": _OneScore(), "t_mdist": _ModuleLevelDistance(), "t_lazyweights": _WeightsMissingOnCall()}
  for name, metric in entries.items():
    monkeypatch.setitem(metrics_lib.METRICS._entries, name, metric)  # test-only registrations
  return entries


def _write_set(root, rng, sizes, *, names=None, noise=0.05):
  """pred/ and gt/ folders (pred = gt + noise); returns {name: (pred, gt)} as float arrays."""
  out = {}
  for d in ("pred", "gt"):
    os.makedirs(root / d, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    name = names[i] if names else f"img{i:02d}"
    gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pred = np.clip(gt.astype(np.int16) + rng.integers(-int(noise * 255), int(noise * 255) + 1, gt.shape), 0,
                   255).astype(np.uint8)
    images.write_png(root / "gt" / f"{name}.png", gt)
    images.write_png(root / "pred" / f"{name}.png", pred)
    out[name] = (pred.astype(np.float64) / 255, gt.astype(np.float64) / 255)
  return out


def test_pairing_lists_every_problem(tmp_path, rng):
  _write_set(tmp_path, rng, [(8, 8), (8, 8), (8, 8)], names=["a", "b", "c"])
  os.remove(tmp_path / "gt" / "b.png")  # result without ground truth
  images.write_png(tmp_path / "gt" / "d.png", np.zeros((8, 8, 3), np.uint8))  # ground truth without result
  images.write_png(tmp_path / "gt" / "c.png", np.zeros((8, 12, 3), np.uint8))  # size mismatch
  images.write_png(tmp_path / "pred" / "a.jpg", np.zeros((8, 8, 3), np.uint8))  # two files share a stem
  with pytest.raises(results.PairingError) as e:
    evaluate_lib.find_pairs(tmp_path / "pred", tmp_path / "gt")
  msg = str(e.value)
  assert len(e.value.problems) == 4, msg
  assert "b.png: no ground truth" in msg and "d.png: no result" in msg
  assert "c.png is 8x8" in msg and "c.png is 12x8" in msg and "a.jpg" in msg


def test_pairing_by_stem_with_lq(tmp_path, rng):
  _write_set(tmp_path, rng, [(8, 8), (8, 8)], names=["x", "y"])
  os.makedirs(tmp_path / "lq")
  images.write_png(tmp_path / "lq" / "x.png", np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(results.PairingError, match=r"y.png: no lq image named y"):
    evaluate_lib.find_pairs(tmp_path / "pred", tmp_path / "gt", lq_dir=tmp_path / "lq")
  images.write_png(tmp_path / "lq" / "y.png", np.zeros((2, 2, 3), np.uint8))
  pairs = evaluate_lib.find_pairs(tmp_path / "pred", tmp_path / "gt", lq_dir=tmp_path / "lq")
  assert [(p.name, os.path.basename(p.lq), p.width, p.height) for p in pairs] == [("x", "x.png", 8, 8),
                                                                                    ("y", "y.png", 8, 8)]


def test_evaluate_batches_by_size_pads_to_devices_and_matches_numpy(tmp_path, rng, test_metrics):
  data = _write_set(tmp_path, rng, [(8, 8)] * 5 + [(12, 8)] * 2)
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="t_mse,t_bright,t_dist,musiq",
                                 batch_size=4, devices=jax.devices("cpu"), backends=("jax",))
  assert len(jax.devices("cpu")) == 8  # tests/conftest.py
  # 5 images of 8x8 -> batches of 4 and 1, 2 of 12x8 -> one batch; each padded to the 8 devices.
  assert test_metrics["t_mse"].calls == [((8, 8, 8, 3), 8), ((8, 8, 8, 3), 8), ((8, 12, 8, 3), 8)]
  for name, (pred, gt) in data.items():
    np.testing.assert_allclose(result.per_image[name]["t_mse"], np.mean((pred - gt) ** 2), rtol=1e-5)
    np.testing.assert_allclose(result.per_image[name]["t_bright"], np.mean(pred), rtol=1e-5)
  s = result.summary
  np.testing.assert_allclose(s["t_mse"].value, np.mean([np.mean((p - g) ** 2) for p, g in data.values()]),
                             rtol=1e-5)
  mean_p = np.mean([p.mean((0, 1)) for p, _ in data.values()], 0)
  mean_g = np.mean([g.mean((0, 1)) for _, g in data.values()], 0)
  np.testing.assert_allclose(s["t_dist"].value, np.sum((mean_p - mean_g) ** 2), rtol=1e-4, atol=1e-9)
  assert (s["t_mse"].status, s["t_mse"].backend, s["t_mse"].count) == ("ok", "jax", 7)
  assert s["t_dist"].count == 7 and "t_dist" not in result.per_image["img00"]
  # MUSIQ has no JAX implementation: unavailable, with the reason.
  assert s["musiq"].status == "unavailable" and s["musiq"].value is None
  assert s["musiq"].reason == "jax: LookupError: no JAX implementation"


def test_pyiqa_backend_reports_why_it_is_unavailable():
  ok, why = pyiqa_backend.available()
  if ok:
    pytest.skip(f"pyiqa imports here ({why}); the unavailable path is not reachable")
  resolved = metrics_lib.resolve("maniqa")
  assert not resolved.available and resolved.metric is None
  assert resolved.reason.startswith("jax: LookupError: no JAX implementation; pyiqa: ")
  assert why.startswith("pyiqa does not import")


def test_failing_metric_is_reported_not_numbered(tmp_path, rng, test_metrics):
  _write_set(tmp_path, rng, [(8, 8)] * 2)
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt",
                                 metrics=["t_broken", "t_mse", "t_one", "t_lazyweights", "t_mdist"])
  lazy = result.summary["t_lazyweights"]
  assert (lazy.status, lazy.value) == ("unavailable", None)
  assert lazy.reason == "FileNotFoundError: weights.bin not found; looked in:"
  mdist = result.summary["t_mdist"]
  pred = np.stack([images.read_image(tmp_path / "pred" / f"img{i:02d}.png") for i in range(2)]) / 255
  gt = np.stack([images.read_image(tmp_path / "gt" / f"img{i:02d}.png") for i in range(2)]) / 255
  # Features are float32 means of [0, 1] pixels (about 3e-8 each): compare absolutely, since the value is a
  # small difference of two such means.
  np.testing.assert_allclose(mdist.value, abs(pred.mean() - gt.mean()), rtol=0, atol=1e-6)
  one = result.summary["t_one"]
  assert one.status == "failed" and "returned 1 scores for a batch of 8" in one.reason
  assert result.summary["t_broken"].status == "failed" and "kaboom" in result.summary["t_broken"].reason
  assert result.summary["t_broken"].value is None and result.summary["t_mse"].status == "ok"
  md = report.summary_markdown(result)
  assert "failed: RuntimeError: kaboom" in md


class _NeedsWeights(_MSE):
  name = "t_weights"

  def __init__(self, weights_dir=None):
    super().__init__()
    self.weights_dir = weights_dir

  def with_weights(self, weights_dir):
    return _NeedsWeights(weights_dir)

  def load(self):
    if self.weights_dir is None or not os.path.exists(os.path.join(self.weights_dir, "w.npz")):
      raise FileNotFoundError(f"w.npz not found in {self.weights_dir}")


def test_missing_weights_make_a_metric_unavailable(tmp_path, rng, monkeypatch):
  monkeypatch.setitem(metrics_lib.METRICS._entries, "t_weights", _NeedsWeights())  # test-only registration
  _write_set(tmp_path, rng, [(8, 8)])
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="t_weights", weights_dir=tmp_path)
  s = result.summary["t_weights"]
  assert s.status == "unavailable" and s.value is None
  assert s.reason.startswith(f"jax: FileNotFoundError: w.npz not found in {tmp_path}")
  (tmp_path / "w.npz").write_bytes(b"")
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="t_weights", weights_dir=tmp_path)
  assert result.summary["t_weights"].status == "ok"


def test_crop_border_applies_to_pixel_metrics(tmp_path, rng, monkeypatch, test_metrics):
  class _PixelMSE(_MSE):
    name = "psnr"
  metric = _PixelMSE()
  monkeypatch.setitem(metrics_lib.METRICS._entries, "psnr", metric)
  data = _write_set(tmp_path, rng, [(10, 12)])
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="psnr,t_mse", crop_border=2)
  pred, gt = data["img00"]
  assert metric.calls[0][0] == (8, 6, 8, 3)
  np.testing.assert_allclose(result.per_image["img00"]["psnr"], np.mean((pred - gt)[2:-2, 2:-2] ** 2), rtol=1e-5)
  np.testing.assert_allclose(result.per_image["img00"]["t_mse"], np.mean((pred - gt) ** 2), rtol=1e-5)
  with pytest.raises(ValueError, match="crop_border=5 leaves no pixels"):
    evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="psnr", crop_border=5)


def test_unreadable_image_is_skipped_and_reported(tmp_path, rng, test_metrics):
  _write_set(tmp_path, rng, [(8, 8)] * 3)
  data = (tmp_path / "pred" / "img01.png").read_bytes()
  (tmp_path / "pred" / "img01.png").write_bytes(data[:60])  # header intact, pixels truncated
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="t_mse")
  assert [n for n, _ in result.skipped] == ["img01"] and "img01" not in result.per_image
  assert result.summary["t_mse"].count == 2


def test_reports_table1_layout_csv_json(tmp_path, rng, test_metrics):
  data = _write_set(tmp_path, rng, [(8, 8)] * 3)
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="t_mse,t_dist,clipiqa,musiq",
                                 backends=("jax",))
  paths = report.write_reports(result, tmp_path / "out", column="CasSR (ours)")
  assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]
  rows = list(csv.DictReader(io.StringIO(pathlib.Path(paths["csv"]).read_text(encoding="utf-8"))))
  assert [r["name"] for r in rows] == sorted(data)
  assert list(rows[0]) == ["name", "width", "height", "musiq", "clipiqa", "t_mse"]  # Table-1 order
  np.testing.assert_allclose(float(rows[1]["t_mse"]), result.per_image["img01"]["t_mse"], rtol=1e-12)
  assert rows[0]["musiq"] == ""  # unavailable (pyiqa-only here): no number
  md = pathlib.Path(paths["markdown"]).read_text(encoding="utf-8")
  lines = [line for line in md.splitlines() if line.startswith("| ")]
  assert lines[0] == "| Metrics | CasSR (ours) | Backend |"
  assert [line.split(" | ")[0] for line in lines[1:]] == ["| MUSIQ ↑", "| CLIPIQA ↑", "| T_MSE ↓",
                                                          "| T_DIST ↓"]
  assert f"| {result.summary['t_mse'].value:.4f} | jax |" in md
  assert "| MUSIQ ↑ | – | unavailable: " in md
  summary = json.loads(pathlib.Path(paths["json"]).read_text(encoding="utf-8"))
  by_name = {m["name"]: m for m in summary["metrics"]}
  assert by_name["musiq"]["value"] is None and by_name["musiq"]["status"] == "unavailable"
  assert by_name["t_dist"]["backend"] == "jax" and by_name["t_mse"]["count"] == 3 and summary["images"] == 3


def test_parse_metric_list():
  assert metrics_lib.parse_metric_list("paper")[:2] == ["fid", "dists"]
  assert metrics_lib.parse_metric_list("psnr, ssim,psnr") == ["psnr", "ssim"]
  with pytest.raises(ValueError, match="unknown metric"):
    metrics_lib.parse_metric_list("psnr,bogus")


def _load_cli():
  spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(REPO, "scripts", "evaluate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # defines the absl flags (once per process)
  return module


def test_cli_writes_reports_and_rejects_bad_pairs(tmp_path, rng, capsys):
  _write_set(tmp_path, rng, [(8, 8)] * 2)
  os.makedirs(tmp_path / "lq")
  for n in ("img00", "img01"):
    images.write_png(tmp_path / "lq" / f"{n}.png", np.zeros((2, 2, 3), np.uint8))
  cli = _load_cli()
  argv = ["evaluate.py", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--lq",
          str(tmp_path / "lq"), "--metrics", "musiq", "--backends", "jax", "--out", str(tmp_path / "out")]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  assert cli.main([]) == 0
  assert "| MUSIQ ↑ | – | unavailable: " in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "out")) == ["grids", "index.html", "per_image.csv", "summary.json",
                                                  "summary.md"]
  assert sorted(os.listdir(tmp_path / "out" / "grids")) == ["img00.png", "img01.png"]
  os.remove(tmp_path / "gt" / "img01.png")
  with absl_testing_logs() as logged:
    assert cli.main([]) == 2
  assert "img01.png: no ground truth" in "".join(logged)


def test_real_psnr_through_evaluate_matches_skimage(tmp_path):
  """PSNR (cassr_jax.eval.pixel) through the batched, sharded, border-cropped path on a real photo.
  (SSIM's parity is tests/test_pixel_metrics.py's; its CPU compile would dominate this test.)"""
  skimage_metrics = pytest.importorskip("skimage.metrics")
  photo = images.read_image(os.path.join(REPO, "cassr_jax", "assets", "astronaut_lr.png"))
  os.makedirs(tmp_path / "pred")
  os.makedirs(tmp_path / "gt")
  expected = {}
  for i, (y, x) in enumerate([(0, 0), (8, 16), (40, 24)]):
    gt = np.ascontiguousarray(photo[y:y + 64, x:x + 80])
    pred = cv2.resize(cv2.resize(gt, (20, 16), interpolation=cv2.INTER_AREA), (80, 64),
                      interpolation=cv2.INTER_CUBIC)
    images.write_png(tmp_path / "gt" / f"{i}.png", gt)
    images.write_png(tmp_path / "pred" / f"{i}.png", pred)
    expected[str(i)] = skimage_metrics.peak_signal_noise_ratio(gt[4:-4, 4:-4], pred[4:-4, 4:-4], data_range=255)
  result = evaluate_lib.evaluate(tmp_path / "pred", tmp_path / "gt", metrics="psnr", crop_border=4,
                                 backends=("jax",))
  assert (result.summary["psnr"].backend, result.summary["psnr"].status) == ("jax", "ok")
  for name, psnr in expected.items():
    np.testing.assert_allclose(result.per_image[name]["psnr"], psnr, rtol=1e-5)
  np.testing.assert_allclose(result.summary["psnr"].value, np.mean(list(expected.values())), rtol=1e-5)
