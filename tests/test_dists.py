"""DISTS (JAX) against DISTS_pytorch's formula on the same L2-pooled VGG16 in plain torch
(cassr_jax.eval.torch_reference), real weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lpips import check_scores, parity_batch

from cassr_jax.eval import weights
from cassr_jax.eval.dists import DISTS, dists
from cassr_jax.eval.torch_reference import TorchL2Pool, reference_metric, score_nhwc
from cassr_jax.eval.vgg import l2_pool


def test_dists_matches_torch_reference():
  pred, gt = parity_batch()
  ours = np.asarray(dists(pred, gt))
  assert ours.shape == (8,) and ours.dtype == np.float32
  # Identical images give 1 - (sum of weights) / (sum of weights) plus the c terms' rounding: ~1e-7.
  check_scores(ours, score_nhwc(reference_metric("dists"), pred, gt), identical_max=1e-6)


@pytest.mark.parametrize("size", [(7, 10), (8, 9)])
def test_l2_pool_matches_dists_l2pooling(size):
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
