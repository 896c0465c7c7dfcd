"""Real-ESRGAN degradation: kernels, sampling statistics, operations, sizes and determinism."""
import dataclasses
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage, special, stats

from cassr_jax.data import degradations as D
from cassr_jax.data import presets
from cassr_jax.image_ops import to_uint8

# Every statistical check below uses a fixed seed (so it cannot flake) and the tolerance
# Z_TOL binomial standard deviations, i.e. |observed - p| <= Z_TOL * sqrt(p (1 - p) / N).
Z_TOL = 5.0
N_DRAWS = 20000


def _photo(h=64, w=96):
  from skimage import data
  img = data.astronaut()
  return np.ascontiguousarray(img[100:100 + h, 150:150 + w])


def _assert_prob(observed_count, n, p, what):
  tol = Z_TOL * math.sqrt(max(p * (1 - p), 1e-12) / n)
  assert abs(observed_count / n - p) <= tol, f"{what}: {observed_count / n:.4f} vs {p} (tol {tol:.4f})"


# ----------------------------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("kind", list(D.KERNEL_TYPES) + ["sinc", "pulse"])
@pytest.mark.parametrize("size", [7, 13, 21])
def test_kernel_sums_to_one_with_configured_shape_and_support(kind, size):
  spec = D.KernelSpec(kind, 1 if kind == "pulse" else size, 21, sigma_x=2.5, sigma_y=0.8, theta=0.6, beta=1.7,
                      cutoff=1.3)
  k = D.build_kernel(spec)
  assert k.shape == (21, 21)
  assert abs(k.sum() - 1.0) < 1e-12
  r = spec.size // 2
  outside = k.copy()
  outside[10 - r:11 + r, 10 - r:11 + r] = 0
  assert np.all(outside == 0), "weight outside the configured support"
  inner = k[10 - r:11 + r, 10 - r:11 + r]
  assert np.count_nonzero(inner[0]) > 0 and np.count_nonzero(inner[:, -1]) > 0, "support smaller than size"
  np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # point-symmetric: correlation == convolution
  if kind != "sinc":
    assert k.min() >= 0 and k[10, 10] == k.max()


def test_kernel_formulas():
  # Isotropic Gaussian = outer product of 1-D Gaussians.
  x = np.arange(-10, 11)
  g = np.exp(-x ** 2 / (2 * 1.7 ** 2))
  np.testing.assert_allclose(D.gaussian_kernel(21, 1.7, 1.7, 0.0), np.outer(g, g) / np.outer(g, g).sum(),
                             atol=1e-15)
  # Rotating by 90 degrees swaps the axes.
  np.testing.assert_allclose(D.gaussian_kernel(15, 3.0, 0.7, math.pi / 2), D.gaussian_kernel(15, 3.0, 0.7, 0.0).T,
                             atol=1e-12)
  # sigma_x acts along the columns (x), sigma_y along the rows.
  k = D.gaussian_kernel(21, 3.0, 0.5, 0.0)
  assert k[10, 14] > k[14, 10]
  # beta = 1: the generalized Gaussian is the Gaussian; plateau formula at a known point.
  np.testing.assert_allclose(D.generalized_gaussian_kernel(11, 2.0, 1.0, 0.3, 1.0),
                             D.gaussian_kernel(11, 2.0, 1.0, 0.3), atol=1e-15)
  p = D.plateau_kernel(11, 2.0, 2.0, 0.0, 2.0)  # 1 / ((d^2 / sigma^2)^beta + 1)
  assert p[5, 5] / p[5, 7] == pytest.approx(2.0, rel=1e-12)  # d = 2: q = 1
  assert p[5, 5] / p[5, 9] == pytest.approx(17.0, rel=1e-12)  # d = 4: q = 4, q^2 + 1 = 17
  # Sinc: cutoff * J1(cutoff r) / (2 pi r) against scipy's Bessel function.
  s = D.sinc_kernel(13, 1.1)
  yy, xx = np.mgrid[-6:7, -6:7]
  r = np.hypot(xx, yy)
  rs = np.maximum(r, 1e-9)
  ref = np.where(r == 0, 1.1 ** 2 / (4 * np.pi), 1.1 * special.j1(1.1 * rs) / (2 * np.pi * rs))
  np.testing.assert_allclose(s, ref / ref.sum(), atol=1e-14)
  z = np.linspace(0, 45, 2001)
  assert np.max(np.abs(D.bessel_j1(z) - special.j1(z))) < 1e-13


# ---------------------------------------------------------------------------------------- sampling stats

@pytest.fixture(scope="module")
def x4plus_draws():
  s = D.settings(D.x4plus_preset())
  rng = np.random.default_rng(1234)
  return s, [D.sample_params(s, rng) for _ in range(N_DRAWS)]


def test_kernel_type_and_size_statistics(x4plus_draws):
  s, draws = x4plus_draws
  for stage, cfg in (("stage1", s.stage1), ("stage2", s.stage2)):
    kernels = [getattr(p, stage).kernel for p in draws]
    kinds = [k.kind for k in kernels]
    _assert_prob(kinds.count("sinc"), N_DRAWS, cfg.sinc_prob, f"{stage} sinc")
    probs = np.diff((0.0,) + cfg.kernel_cum)
    for name, p in zip(cfg.kernel_list, probs):
      _assert_prob(kinds.count(name), N_DRAWS, (1 - cfg.sinc_prob) * p, f"{stage} {name}")
    sizes = [k.size for k in kernels]
    for size in s.kernel_sizes:
      _assert_prob(sizes.count(size), N_DRAWS, 1 / len(s.kernel_sizes), f"{stage} size {size}")
    assert set(sizes) == set(s.kernel_sizes)
    lo, hi = cfg.blur_sigma
    gauss = [k for k in kernels if k.kind != "sinc"]
    sig = np.array([[k.sigma_x, k.sigma_y] for k in gauss])
    assert sig.min() >= lo and sig.max() <= hi
    assert np.mean(sig[:, 0]) == pytest.approx((lo + hi) / 2, abs=Z_TOL * (hi - lo) / math.sqrt(12 * len(gauss)))
    iso = [k for k in gauss if k.kind in ("iso", "generalized_iso", "plateau_iso")]
    assert all(k.sigma_x == k.sigma_y and k.theta == 0 for k in iso)
    aniso = np.array([k.theta for k in gauss if k.kind.endswith("aniso")])
    assert aniso.min() >= -math.pi and aniso.max() <= math.pi and abs(aniso.mean()) < 0.1
    for family, (b_lo, b_hi) in (("generalized", cfg.betag_range), ("plateau", cfg.betap_range)):
      betas = np.array([k.beta for k in gauss if k.kind.startswith(family)])
      assert betas.min() >= b_lo and betas.max() <= b_hi
      # Half U[lo, 1], half U[1, hi] (a range starting at 1 gives exactly 1 half the time).
      _assert_prob(int(np.sum(betas <= 1.0)), len(betas), 0.5, f"{stage} {family} beta<=1")
      if b_lo == 1.0:
        _assert_prob(int(np.sum(betas == 1.0)), len(betas), 0.5, f"{stage} {family} beta==1")
    sincs = [k for k in kernels if k.kind == "sinc"]
    for k in sincs:
      lo_c, hi_c = cfg.sinc_cutoff_small if k.size < cfg.sinc_small_size else cfg.sinc_cutoff_large
      assert lo_c <= k.cutoff <= hi_c
    assert min(k.cutoff for k in sincs if k.size >= 13) < math.pi / 3  # the wider range is used
  finals = [p.final_sinc.kind for p in draws]
  _assert_prob(finals.count("sinc"), N_DRAWS, s.final_sinc_prob, "final sinc")
  _assert_prob(sum(p.stage2.blur for p in draws), N_DRAWS, s.stage2.blur_prob, "second blur")
  assert all(p.stage1.blur for p in draws)


def test_resize_noise_and_jpeg_statistics(x4plus_draws):
  s, draws = x4plus_draws
  for stage, cfg in (("stage1", s.stage1), ("stage2", s.stage2)):
    ps = [getattr(p, stage) for p in draws]
    probs = np.diff((0.0,) + cfg.resize_cum)
    for direction, p in zip(D.RESIZE_DIRECTIONS, probs):
      _assert_prob(sum(q.resize == direction for q in ps), N_DRAWS, p, f"{stage} resize {direction}")
    up = np.array([q.resize_scale for q in ps if q.resize == "up"])
    down = np.array([q.resize_scale for q in ps if q.resize == "down"])
    assert up.min() >= 1 and up.max() <= cfg.resize_range[1] and up.max() > cfg.resize_range[1] - 0.01
    assert down.min() >= cfg.resize_range[0] and down.max() <= 1 and down.min() < cfg.resize_range[0] + 0.01
    assert all(q.resize_scale == 1.0 for q in ps if q.resize == "keep")
    for mode in cfg.resize_modes:
      _assert_prob(sum(q.resize_mode == mode for q in ps), N_DRAWS, 1 / 3, f"{stage} mode {mode}")
    _assert_prob(sum(q.noise == "gaussian" for q in ps), N_DRAWS, cfg.gaussian_noise_prob, f"{stage} gaussian")
    _assert_prob(sum(q.gray_noise for q in ps), N_DRAWS, cfg.gray_noise_prob, f"{stage} gray")
    sig = np.array([q.noise_sigma for q in ps])
    assert cfg.noise_range[0] <= sig.min() and sig.max() <= cfg.noise_range[1]
    ps_scale = np.array([q.poisson_scale for q in ps])
    assert cfg.poisson_scale_range[0] <= ps_scale.min() and ps_scale.max() <= cfg.poisson_scale_range[1]
    q = np.array([x.jpeg_quality for x in ps])
    lo, hi = cfg.jpeg_range
    # DiffJPEG (the x4plus codec): a float quality ~ U[lo, hi], as Real-ESRGAN draws it.
    assert s.jpeg_codec == "diffjpeg" and lo <= q.min() < lo + 0.1 and hi - 0.1 < q.max() <= hi
    assert np.mean(q != np.round(q)) > 0.99
    assert stats.kstest(q, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-4
  _assert_prob(sum(p.final_resize_first for p in draws), N_DRAWS, s.final_resize_first_prob, "final order")
  assert all(p.second_stage for p in draws)  # Real-ESRGAN always runs stage 2
  c = D.x4plus_preset()
  c.second_stage_prob = 0.3
  rng = np.random.default_rng(5)
  n = 5000
  _assert_prob(sum(D.sample_params(c, rng).second_stage for _ in range(n)), n, 0.3, "second stage")


def test_libjpeg_quality_is_a_uniform_integer():
  c = D.x4plus_preset()
  c.jpeg_codec = "libjpeg"
  rng = np.random.default_rng(11)
  q = np.array([D.sample_params(c, rng).stage1.jpeg_quality for _ in range(2500)])
  lo, hi = c.stage1.jpeg_range
  assert np.all(q == np.round(q)) and q.min() == lo and q.max() == hi
  counts = np.bincount(q.astype(int) - lo, minlength=hi - lo + 1)
  assert stats.chisquare(counts).pvalue > 1e-4  # uniform over the integers [lo, hi]


def test_mild_preset_ranges():
  s = D.settings(D.mild_preset())
  rng = np.random.default_rng(7)
  draws = [D.sample_params(s, rng) for _ in range(3000)]
  q2 = np.array([p.stage2.jpeg_quality for p in draws])
  assert q2.min() >= 60 and 99.9 < q2.max() <= 100
  assert s.jpeg_codec == "diffjpeg"
  assert max(p.stage1.noise_sigma for p in draws) <= 15
  assert min(p.stage1.resize_scale for p in draws) >= 0.3
  assert 0.45 < np.mean([p.stage2.blur for p in draws]) < 0.55
  assert D.mild_preset().stage1.blur_sigma == (0.2, 1.5) and D.x4plus_preset().stage1.blur_sigma == (0.2, 3.0)


def test_config_validation_names_the_field():
  c = D.x4plus_preset()
  c.stage1.kernel_prob = (0.5, 0.5, 0.5, 0, 0, 0)
  with pytest.raises(ValueError, match="stage1.kernel_prob"):
    D.settings(c)
  c = D.x4plus_preset()
  c.kernel_sizes = (7, 8)
  with pytest.raises(ValueError, match="kernel_sizes"):
    D.settings(c)
  c = D.x4plus_preset()
  c.stage2.jpeg_range = (95, 30)
  with pytest.raises(ValueError, match="stage2.jpeg_range"):
    D.settings(c)
  with pytest.raises(ValueError, match="unknown degradation preset"):
    D.preset("nope")
  c = D.x4plus_preset()
  c.jpeg_codec = "mozjpeg"
  with pytest.raises(ValueError, match="jpeg_codec"):
    presets.settings(c)


# ------------------------------------------------------------------------------------------- operations

@pytest.mark.parametrize("spec", [
    D.KernelSpec("iso", 21, 21, 2.0, 2.0),  # separable path
    D.KernelSpec("plateau_aniso", 9, 21, 1.0, 2.0, 0.3, 1.5),  # direct
    D.KernelSpec("aniso", 13, 21, 3.0, 0.6, 0.7),  # row strips
    D.KernelSpec("aniso", 15, 21, 3.0, 0.6, 0.7),  # whole-image DFT
    D.KernelSpec("sinc", 21, 21, cutoff=1.0),  # whole-image DFT
    D.KernelSpec("iso", 21, 21, 0.3, 0.3),  # trimmed to its support
    D.KernelSpec("aniso", 21, 21, 3.0, 1.0, 0.0),  # axis-aligned: separable path
])
def test_filter2d_matches_float64_reference(spec):
  img = np.random.default_rng(0).random((40, 56, 3)).astype(np.float32)
  k = D.build_kernel(spec)
  ref = np.stack([ndimage.correlate(img[..., c].astype(np.float64), k, mode="mirror") for c in range(3)], -1)
  assert np.max(np.abs(D.filter2d(img, k) - ref)) < 2e-6


def test_rank_one_kernels_are_separated():
  for spec in (D.KernelSpec("iso", 21, 21, 2.0, 2.0), D.KernelSpec("aniso", 21, 21, 3.0, 1.0, 0.0)):
    k = D.build_kernel(spec)
    col, row = D._separate(k)
    assert np.max(np.abs(np.outer(col, row) - k)) < 1e-7 * k.max()
  for spec in (D.KernelSpec("aniso", 21, 21, 3.0, 1.0, 0.5), D.KernelSpec("sinc", 21, 21, cutoff=1.0),
               D.KernelSpec("plateau_iso", 21, 21, 2.0, 2.0, 0.0, 1.5)):
    assert D._separate(D.build_kernel(spec)) is None, spec


def test_a_data_worker_computes_on_one_core():
  # cv2.gemm (DiffJPEG's DCT) runs on the OpenBLAS inside OpenCV's wheel, which cv2.setNumThreads does not
  # limit: its helper thread then spins on a second core. After images.use_one_core every pool has one
  # thread and the process uses no more CPU than its main thread.
  import subprocess
  import sys
  code = (
      "import time, threadpoolctl, numpy as np\n"
      "from cassr_jax.data import images, jpeg\n"
      "images.use_one_core()\n"
      "pools = threadpoolctl.threadpool_info()\n"
      "assert any('opencv' in p['filepath'] for p in pools), pools\n"
      "assert all(p['num_threads'] == 1 for p in pools), pools\n"
      "img = np.random.default_rng(0).random((256, 256, 3), dtype=np.float32)\n"
      "jpeg.diffjpeg(img, 50.0)\n"
      "p, t = time.process_time(), time.thread_time()\n"
      "for _ in range(100): jpeg.diffjpeg(img, 50.0)\n"
      "print((time.process_time() - p) / (time.thread_time() - t))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert float(out.stdout.split()[-1]) < 1.1


def test_poisson_sampler_matches_poisson_distribution():
  rng = np.random.default_rng(3)
  worst = 1.0
  for vals in (2.0, 16.0, 256.0):
    for level in (1, 40, 128, 255):
      lam = level / 255 * vals
      x = D.poisson_sample_levels(rng, np.full(60000, level, np.uint8), vals).astype(np.int64)
      k = int(stats.poisson.ppf(1 - 1e-9, lam)) + 2
      pmf = stats.poisson.pmf(np.arange(k), lam)
      pmf[-1] += stats.poisson.sf(k - 1, lam)
      observed = np.bincount(np.minimum(x, k - 1), minlength=k)
      expected = pmf * x.size
      big = expected > 5
      o = np.append(observed[big], observed[~big].sum())
      e = np.append(expected[big], expected[~big].sum())
      if e[-1] < 1e-6:
        o, e = o[:-1], e[:-1]
      worst = min(worst, stats.chisquare(o, e * o.sum() / e.sum()).pvalue)
  assert worst > 1e-4
  assert np.all(D.poisson_sample_levels(rng, np.zeros(1000, np.uint8), 256.0) == 0)


def test_noise_fields():
  rng = np.random.default_rng(0)
  n = D.gaussian_noise(rng, (200, 200, 3), 20.0, gray=False)
  assert n.dtype == np.float32 and n.std() == pytest.approx(20 / 255, rel=0.02)
  assert D.gaussian_noise(rng, (8, 8, 3), 5.0, gray=True).shape == (8, 8, 1)
  img = np.full((100, 100, 3), 0.5, np.float32)
  pn = D.poisson_noise(rng, img, 1.0, gray=False)
  # 8-bit level 128 (0.50196), vals = 1 distinct level -> rate 0.50196 -> var = rate / vals^2.
  assert pn.shape == img.shape
  assert pn.var() == pytest.approx(128 / 255, rel=0.05)
  assert D.poisson_noise(rng, img, 1.0, gray=True).shape == (100, 100, 1)


def test_jpeg_is_the_real_codec():
  img = _photo().astype(np.float32)[..., ::-1] / 255
  ours = D.jpeg(np.ascontiguousarray(img), 40, "libjpeg")
  _, buf = cv2.imencode(".jpg", to_uint8(img), [cv2.IMWRITE_JPEG_QUALITY, 40])
  np.testing.assert_array_equal(to_uint8(ours), cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
  err = [np.abs(D.jpeg(np.ascontiguousarray(img), q, "libjpeg") - img).mean() for q in (20, 60, 95)]
  assert err[0] > err[1] > err[2] > 0


@pytest.mark.parametrize("size", [(19, 23), (48, 40), (7, 90), (150, 131), (32, 20)])
def test_area_resize_is_torch_adaptive_average_pooling(size):
  import torch
  from torch.nn import functional as F
  img = np.random.default_rng(1).random((64, 80, 3)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
  ours = D.resize(img, *size, "area")
  assert ours.shape == size + (3,) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref.numpy(), atol=2e-6)
  # OpenCV's INTER_AREA is a different filter off integer factors (coverage weights).
  if 64 % size[0] or 80 % size[1]:
    assert np.abs(cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA) - ref.numpy()).max() > 1e-3


def test_pipeline_wiring_with_neutral_parameters():
  """No blur, no resize, zero noise, JPEG 100, no sinc: the LR is the area-downsampled HR (up to JPEG)."""
  hr = _photo(64, 96)
  c = D.x4plus_preset()
  c.usm_sharpen = False
  s = D.settings(c)
  pulse = D.KernelSpec("pulse", 1, 21)
  neutral = D.StageParams(blur=False, kernel=pulse, resize="keep", resize_scale=1.0, resize_mode="area",
                          noise="gaussian", gray_noise=False, noise_sigma=0.0, poisson_scale=0.0, jpeg_quality=100)
  for first in (True, False):
    params = D.DegradationParams(neutral, neutral, pulse, final_resize_first=first, final_resize_mode="area")
    out = D.degrade_with_params(hr, s, params, D.example_seed(0, 0, 0))
    ref = cv2.resize(hr.astype(np.float32), (24, 16), interpolation=cv2.INTER_AREA)
    assert out["lr"].shape == (16, 24, 3)
    # Two JPEG q100 round trips (4:2:0 chroma: colour edges move by up to ~20 levels, luma by a few).
    luma = lambda a: cv2.cvtColor(a.astype(np.float32), cv2.COLOR_RGB2YCrCb)[..., 0]  # noqa: E731
    assert np.abs(luma(out["lr"]) - luma(ref)).max() <= 6
    assert np.abs(out["lr"] - ref).mean() < 2.5  # a swapped channel order would give ~30
    assert out["hr"] is hr
  # With a stage-2 resize (s2 != 1) the final resize + sinc and the JPEG no longer commute: orders differ.
  strong = dataclasses.replace(neutral, resize="up", resize_scale=1.2, resize_mode="bilinear", jpeg_quality=30)
  sinc = D.KernelSpec("sinc", 7, 21, cutoff=2.0)
  seq = D.example_seed(0, 0, 0)
  a = D.degrade_with_params(hr, s, D.DegradationParams(neutral, strong, sinc, True, "bicubic"), seq)["lr"]
  b = D.degrade_with_params(hr, s, D.DegradationParams(neutral, strong, sinc, False, "bicubic"), seq)["lr"]
  assert a.shape == b.shape == (16, 24, 3) and np.abs(a.astype(int) - b).mean() > 0.5
  # Skipping stage 2 removes its effect: with a neutral stage 1 the result is the neutral one again.
  strong_q100 = dataclasses.replace(strong, jpeg_quality=100, noise_sigma=20.0)  # the final JPEG uses stage 2's q
  skip = D.degrade_with_params(hr, s, D.DegradationParams(neutral, strong_q100, pulse, True, "area",
                                                          second_stage=False), seq)["lr"]
  full = D.degrade_with_params(hr, s, D.DegradationParams(neutral, neutral, pulse, True, "area"), seq)["lr"]
  assert np.array_equal(skip, full)


@pytest.mark.parametrize("scale,shape", [(4, (64, 96)), (2, (48, 40)), (4, (32, 32))])
def test_output_sizes_dtype_and_range(scale, shape):
  c = D.x4plus_preset()
  c.scale = scale
  hr = _photo(*shape)
  for i in range(12):
    out = D.degrade(hr, c, D.example_seed(1, 0, i))
    assert out["lr"].shape == (shape[0] // scale, shape[1] // scale, 3)
    assert out["lr"].dtype == np.uint8 and out["hr"].dtype == np.uint8
    assert np.array_equal(out["hr"], hr)
  with pytest.raises(ValueError, match="not a multiple of scale"):
    D.degrade(_photo(31, 32), c, 0)


def test_usm_matches_real_esrgan_formula_in_float64():
  """Real-ESRGAN's usm_sharp (residual, hard mask, blurred soft mask, clipped sharpening) in float64."""
  img = _photo(40, 56).astype(np.float64)[..., ::-1] / 255
  blur = cv2.GaussianBlur(img, (51, 51), 0)
  residual = img - blur
  soft = cv2.GaussianBlur((np.abs(residual) * 255 > 10).astype(np.float64), (51, 51), 0)
  ref = soft * np.clip(img + 0.5 * residual, 0, 1) + (1 - soft) * img
  ours = D.usm_sharpen(np.ascontiguousarray(img, np.float32), 0.5, 51, 10)
  assert ours.dtype == np.float32 and np.abs(ours - ref).max() < 1e-6
  assert np.abs(ref - img).max() > 0.05  # the sharpening is not a no-op


def test_usm_sharpening_of_the_hr():
  c = D.x4plus_preset()
  c.usm_target = True
  hr = _photo(64, 64)
  out = D.degrade(hr, c, D.example_seed(0, 0, 0))
  assert out["hr"].dtype == np.uint8 and out["hr"].shape == hr.shape
  # Sharpening raises high-frequency energy (Laplacian) and stays close to the original.
  lap = lambda a: np.abs(cv2.Laplacian(a.astype(np.float32), cv2.CV_32F)).mean()  # noqa: E731
  assert lap(out["hr"]) > 1.1 * lap(hr)
  assert np.abs(out["hr"].astype(int) - hr).mean() < 10
  # x4plus (as Real-ESRGAN): the LR is made from the sharpened HR, the target stays the plain HR.
  plain_target = D.degrade(hr, D.x4plus_preset(), D.example_seed(0, 0, 0))
  assert plain_target["hr"] is hr and np.array_equal(plain_target["lr"], out["lr"])
  c.usm_sharpen, c.usm_target = False, False
  unsharpened = D.degrade(hr, c, D.example_seed(0, 0, 0))["lr"]
  assert not np.array_equal(unsharpened, out["lr"])
  assert lap(out["lr"]) > lap(unsharpened)


def test_determinism_same_triple_same_bits_any_order():
  c = D.x4plus_preset()
  hr = _photo(64, 64)
  forward = [D.degrade(hr, c, D.example_seed(5, 2, i))["lr"] for i in range(8)]
  backward = [D.degrade(hr, D.settings(c), D.example_seed(5, 2, i))["lr"] for i in reversed(range(8))][::-1]
  for a, b in zip(forward, backward):
    assert np.array_equal(a, b)
  assert not np.array_equal(forward[0], D.degrade(hr, c, D.example_seed(5, 3, 0))["lr"])  # other epoch
  assert not np.array_equal(forward[0], D.degrade(hr, c, D.example_seed(6, 2, 0))["lr"])  # other seed
  assert sum(np.array_equal(forward[0], f) for f in forward) == 1
  # The sampled parameters of a triple are fixed too (stable draws).
  p1 = D.sample_params(c, D.child_rng(D.example_seed(5, 2, 3), 0))
  p2 = D.sample_params(c, D.child_rng(D.example_seed(5, 2, 3), 0))
  assert p1 == p2


def test_x4plus_lr_chroma_noise_diffjpeg_vs_libjpeg():
  """Issue 13's measurement at small scale: the LR's chroma noise is higher with DiffJPEG than with libjpeg."""
  from skimage import data

  from cassr_jax.data import jpeg
  photos = [data.astronaut(), data.coffee(), data.chelsea()]
  rng = np.random.default_rng(0)
  noise = {"diffjpeg": [], "libjpeg": []}
  for i in range(24):
    p = photos[i % 3]
    t, l = rng.integers(0, p.shape[0] - 128), rng.integers(0, p.shape[1] - 128)
    hr = np.ascontiguousarray(p[t:t + 128, l:l + 128])
    for codec, values in noise.items():
      c = D.x4plus_preset()
      c.jpeg_codec = codec
      values.append(jpeg.chroma_noise(D.degrade(hr, c, D.example_seed(0, 0, i))["lr"]))
  ours, real = np.array(noise["diffjpeg"]), np.array(noise["libjpeg"])
  assert np.median(ours) > 1.5 * np.median(real), (np.median(ours), np.median(real))
  # Paired by (HR crop, seed): the same degradation with either codec.
  assert np.mean(ours > real) > 0.8
  assert stats.wilcoxon(ours, real, alternative="greater").pvalue < 1e-5
