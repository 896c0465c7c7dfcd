"""DISTS (JAX) against DISTS_pytorch's formula on the same L2-pooled VGG16 in plain torch, real weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lpips import TorchVGG16, check_scores, parity_batch

from cassr_jax.eval import weights
from cassr_jax.eval.dists import DISTS, dists
from cassr_jax.eval.vgg import l2_pool


def torch_dists(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """DISTS_pytorch.DISTS().forward(pred, gt) written out (its forward_once and score)."""
  backbone = TorchVGG16("l2")
  state = torch.load(weights.locate("dists"), map_location="cpu")
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1)
  chns = [3, 64, 128, 256, 512, 512]
  x, y = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (pred, gt))
  with torch.no_grad():
    feats0 = [x] + backbone((x - mean) / std)
    feats1 = [y] + backbone((y - mean) / std)
    w_sum = state["alpha"].sum() + state["beta"].sum()
    alpha = torch.split(state["alpha"] / w_sum, chns, dim=1)
    beta = torch.split(state["beta"] / w_sum, chns, dim=1)
    dist1 = dist2 = 0
    for k in range(len(chns)):
      x_mean = feats0[k].mean([2, 3], keepdim=True)
      y_mean = feats1[k].mean([2, 3], keepdim=True)
      s1 = (2 * x_mean * y_mean + 1e-6) / (x_mean ** 2 + y_mean ** 2 + 1e-6)
      dist1 = dist1 + (alpha[k] * s1).sum(1, keepdim=True)
      x_var = ((feats0[k] - x_mean) ** 2).mean([2, 3], keepdim=True)
      y_var = ((feats1[k] - y_mean) ** 2).mean([2, 3], keepdim=True)
      xy_cov = (feats0[k] * feats1[k]).mean([2, 3], keepdim=True) - x_mean * y_mean
      s2 = (2 * xy_cov + 1e-6) / (x_var + y_var + 1e-6)
      dist2 = dist2 + (beta[k] * s2).sum(1, keepdim=True)
  return (1 - (dist1 + dist2)).reshape(-1).numpy()


def test_dists_matches_torch_reference():
  pred, gt = parity_batch()
  ours = np.asarray(dists(pred, gt))
  assert ours.shape == (8,) and ours.dtype == np.float32
  # Identical images give 1 - (sum of weights) / (sum of weights) plus the c terms' rounding: ~1e-7.
  check_scores(ours, torch_dists(pred, gt), identical_max=1e-6)


@pytest.mark.parametrize("size", [(7, 10), (8, 9)])
def test_l2_pool_matches_dists_l2pooling(size):
  from test_lpips import TorchL2Pool  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).standard_normal((2, *size, 5)).astype(np.float32)
  reference = TorchL2Pool(5)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(l2_pool(x))
  assert ours.shape == reference.shape == (2, (size[0] + 1) // 2, (size[1] + 1) // 2, 5)
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)


def test_dists_metric_protocol(tmp_path):
  assert (dists.name, dists.kind, dists.higher_is_better, dists.backend) == (
      "dists", "full_reference", False, "jax")
  weights.copy_weights(str(tmp_path), keys=["vgg16"])  # alpha/beta missing from this directory
  (tmp_path / "dists_weights.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickled {} (not torch)
  with pytest.raises(ValueError, match="dists_weights.pt"):
    DISTS(weights_dir=str(tmp_path)).load()
