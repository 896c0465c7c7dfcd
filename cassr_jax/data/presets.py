"""Degradation presets (x4plus, mild) and their validation into a frozen, plain-python `Settings`.

The operations that use them live in cassr_jax.data.degradations (kernels, noise, resizes, the pipeline) and
cassr_jax.data.jpeg (the JPEG codecs). Every number of a degradation is a field of its ConfigDict here.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_collections
import numpy as np

from cassr_jax.data.jpeg import JPEG_CODECS

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
RESIZE_DIRECTIONS = ("up", "down", "keep")


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------

def _stage(*, blur_prob, sinc_prob, blur_sigma, betag_range, betap_range, resize_prob, resize_range,
           noise_range, poisson_scale_range, jpeg_range, gaussian_noise_prob=0.5, gray_noise_prob=0.4):
  return ml_collections.ConfigDict(dict(
      blur_prob=blur_prob,
      kernel_list=KERNEL_TYPES,
      kernel_prob=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
      sinc_prob=sinc_prob,
      blur_sigma=blur_sigma,  # sigma_x and sigma_y are both drawn from this range
      rotation_range=(-math.pi, math.pi),
      betag_range=betag_range,  # generalized Gaussian shape: U[lo, 1] or U[1, hi] with probability 1/2 each
      betap_range=betap_range,  # plateau shape, same rule
      # sinc cut-off omega ~ U[sinc_cutoff_small] for kernel size < sinc_small_size, else U[sinc_cutoff_large]
      sinc_cutoff_small=(math.pi / 3, math.pi),
      sinc_cutoff_large=(math.pi / 5, math.pi),
      sinc_small_size=13,
      resize_prob=resize_prob,  # probabilities of (up, down, keep)
      resize_range=resize_range,  # down: s ~ U[lo, 1], up: s ~ U[1, hi]
      resize_modes=("area", "bilinear", "bicubic"),  # chosen uniformly
      gaussian_noise_prob=gaussian_noise_prob,  # else Poisson
      noise_range=noise_range,  # Gaussian sigma on the 0-255 scale
      poisson_scale_range=poisson_scale_range,
      gray_noise_prob=gray_noise_prob,
      jpeg_range=jpeg_range,  # quality ~ U[lo, hi]: a float for diffjpeg, an integer (inclusive) for libjpeg
  ))


def x4plus_preset() -> ml_collections.ConfigDict:
  """Real-ESRGAN x4plus (train_realesrgan_x4plus.yml): the degradation the CasSR paper trains with."""
  return ml_collections.ConfigDict(dict(
      name="x4plus",
      scale=4,
      kernel_sizes=tuple(range(7, 22, 2)),  # odd sizes drawn uniformly for all three kernels
      kernel_pad_to=21,
      # As Real-ESRGAN: the LR is made from the USM-sharpened HR (usm_sharpen), while the returned target
      # stays the plain HR (usm_target=False; Real-ESRGAN's GAN target is the plain HR too, and SD-based SR
      # trains its diffusion loss towards it). usm_target=True returns the sharpened HR instead.
      usm_sharpen=True,
      usm_target=False,
      usm_weight=0.5,
      usm_radius=50,
      usm_threshold=10,
      # DECISION: DiffJPEG's behaviour (float quality, 4:2:0 chroma repeated over 2x2 blocks), what Real-ESRGAN
      # trains with; 'libjpeg' (OpenCV's codec, smooth chroma upsampling) is the named alternative.
      jpeg_codec="diffjpeg",
      stage1=_stage(blur_prob=1.0, sinc_prob=0.1, blur_sigma=(0.2, 3.0), betag_range=(0.5, 4.0),
                    betap_range=(1.0, 2.0), resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
                    noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0), jpeg_range=(30, 95)),
      stage2=_stage(blur_prob=0.8, sinc_prob=0.1, blur_sigma=(0.2, 1.5), betag_range=(0.5, 4.0),
                    betap_range=(1.0, 2.0), resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
                    noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5), jpeg_range=(30, 95)),
      # Probability that stage 2 (blur, resize, noise) runs at all; Real-ESRGAN always runs it (1.0),
      # some later pipelines skip it at random (e.g. ResShift's second_order_prob).
      second_stage_prob=1.0,
      final=ml_collections.ConfigDict(dict(
          sinc_prob=0.8,  # else an identity (pulse) kernel
          sinc_cutoff=(math.pi / 3, math.pi),
          resize_modes=("area", "bilinear", "bicubic"),
          resize_first_prob=0.5,  # [resize + sinc, then JPEG] vs [JPEG, then resize + sinc]
      )),
  ))


def mild_preset() -> ml_collections.ConfigDict:
  """The milder online degradation of StableSR / SeeSR."""
  cfg = x4plus_preset()
  cfg.name = "mild"
  s1, s2 = cfg.stage1, cfg.stage2
  s1.blur_sigma, s1.betag_range, s1.betap_range = (0.2, 1.5), (0.5, 2.0), (1.0, 1.5)
  s1.resize_range, s1.noise_range, s1.poisson_scale_range = (0.3, 1.5), (1.0, 15.0), (0.05, 2.0)
  s1.jpeg_range = (60, 95)
  s2.blur_prob, s2.blur_sigma, s2.betag_range, s2.betap_range = 0.5, (0.2, 1.0), (0.5, 2.0), (1.0, 1.5)
  s2.resize_range, s2.noise_range, s2.poisson_scale_range = (0.6, 1.2), (1.0, 12.0), (0.05, 1.0)
  s2.jpeg_range = (60, 100)
  # DECISION: jpeg_codec stays 'diffjpeg' and the LR is made from the sharpened HR as in x4plus: StableSR and
  # SeeSR generate their pairs with Real-ESRGAN's GPU degradation code, which uses DiffJPEG. (Quality 100 is
  # the no-quantisation limit here; DiffJPEG itself would divide by zero.)
  return cfg


PRESETS = {"x4plus": x4plus_preset, "mild": mild_preset}


def preset(name: str) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown degradation preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]()


# --------------------------------------------------------------------------------------------------------
# Validated, plain-python view of the config (ConfigDict attribute access is slow in the hot loop)
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Stage:
  blur_prob: float
  kernel_list: tuple[str, ...]
  kernel_cum: tuple[float, ...]
  sinc_prob: float
  blur_sigma: tuple[float, float]
  rotation_range: tuple[float, float]
  betag_range: tuple[float, float]
  betap_range: tuple[float, float]
  sinc_cutoff_small: tuple[float, float]
  sinc_cutoff_large: tuple[float, float]
  sinc_small_size: int
  resize_cum: tuple[float, ...]
  resize_range: tuple[float, float]
  resize_modes: tuple[str, ...]
  gaussian_noise_prob: float
  noise_range: tuple[float, float]
  poisson_scale_range: tuple[float, float]
  gray_noise_prob: float
  jpeg_range: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Settings:
  """Checked degradation settings (build with `settings(config)`)."""
  scale: int
  kernel_sizes: tuple[int, ...]
  kernel_pad_to: int
  usm_sharpen: bool
  usm_weight: float
  usm_radius: int
  usm_threshold: float
  usm_target: bool
  jpeg_codec: str
  stage1: _Stage
  stage2: _Stage
  final_sinc_prob: float
  final_sinc_cutoff: tuple[float, float]
  final_resize_modes: tuple[str, ...]
  final_resize_first_prob: float
  second_stage_prob: float


def _prob(value, name):
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"degradation config: {name}={value} is not a probability in [0, 1]")
  return value


def _range(value, name, lo=-math.inf, hi=math.inf, cast=float):
  if not isinstance(value, Sequence) or len(value) != 2:
    raise ValueError(f"degradation config: {name}={value!r} must be a (low, high) pair")
  a, b = cast(value[0]), cast(value[1])
  if not lo <= a <= b <= hi:
    raise ValueError(f"degradation config: {name}={value!r} must satisfy {lo} <= low <= high <= {hi}")
  return a, b


def _around_one(value, name):
  lo, hi = _range(value, name, lo=1e-3)
  if not lo <= 1.0 <= hi:
    raise ValueError(f"degradation config: {name}={value!r} must contain 1 (low <= 1 <= high)")
  return lo, hi


def _cumulative(probs, n, name):
  probs = [float(p) for p in probs]
  if len(probs) != n or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
    raise ValueError(f"degradation config: {name}={tuple(probs)} must be {n} non-negative probabilities "
                     "summing to 1")
  return tuple(np.cumsum(probs) / sum(probs))


def _modes(modes, name):
  modes = tuple(modes)
  bad = [m for m in modes if m not in RESIZE_MODES]
  if not modes or bad:
    raise ValueError(f"degradation config: {name} has unknown resize modes {bad}; known: {list(RESIZE_MODES)}")
  return modes


def _stage_settings(c, name) -> _Stage:
  kernel_list = tuple(c.kernel_list)
  bad = [k for k in kernel_list if k not in KERNEL_TYPES]
  if bad:
    raise ValueError(f"degradation config: {name}.kernel_list has unknown kernels {bad}; known: {KERNEL_TYPES}")
  return _Stage(
      blur_prob=_prob(c.blur_prob, f"{name}.blur_prob"),
      kernel_list=kernel_list,
      kernel_cum=_cumulative(c.kernel_prob, len(kernel_list), f"{name}.kernel_prob"),
      sinc_prob=_prob(c.sinc_prob, f"{name}.sinc_prob"),
      blur_sigma=_range(c.blur_sigma, f"{name}.blur_sigma", lo=1e-3),
      rotation_range=_range(c.rotation_range, f"{name}.rotation_range"),
      betag_range=_around_one(c.betag_range, f"{name}.betag_range"),
      betap_range=_around_one(c.betap_range, f"{name}.betap_range"),
      sinc_cutoff_small=_range(c.sinc_cutoff_small, f"{name}.sinc_cutoff_small", lo=1e-3, hi=math.pi),
      sinc_cutoff_large=_range(c.sinc_cutoff_large, f"{name}.sinc_cutoff_large", lo=1e-3, hi=math.pi),
      sinc_small_size=int(c.sinc_small_size),
      resize_cum=_cumulative(c.resize_prob, 3, f"{name}.resize_prob"),
      resize_range=_around_one(c.resize_range, f"{name}.resize_range"),
      resize_modes=_modes(c.resize_modes, f"{name}.resize_modes"),
      gaussian_noise_prob=_prob(c.gaussian_noise_prob, f"{name}.gaussian_noise_prob"),
      noise_range=_range(c.noise_range, f"{name}.noise_range", lo=0.0),
      poisson_scale_range=_range(c.poisson_scale_range, f"{name}.poisson_scale_range", lo=0.0),
      gray_noise_prob=_prob(c.gray_noise_prob, f"{name}.gray_noise_prob"),
      jpeg_range=_range(c.jpeg_range, f"{name}.jpeg_range", lo=1, hi=100),
  )


def settings(config: ml_collections.ConfigDict | Settings) -> Settings:
  """Validates a degradation ConfigDict (clear ValueError naming the field) and freezes it."""
  if isinstance(config, Settings):
    return config
  sizes = tuple(int(k) for k in config.kernel_sizes)
  pad_to = int(config.kernel_pad_to)
  if not sizes or any(k % 2 == 0 or k < 1 or k > pad_to for k in sizes):
    raise ValueError(f"degradation config: kernel_sizes={sizes} must be odd and <= kernel_pad_to={pad_to}")
  if pad_to % 2 == 0:
    raise ValueError(f"degradation config: kernel_pad_to={pad_to} must be odd")
  scale = int(config.scale)
  if scale < 1:
    raise ValueError(f"degradation config: scale={scale} must be >= 1")
  radius = int(config.usm_radius)
  codec = str(config.get("jpeg_codec", "libjpeg"))
  if codec not in JPEG_CODECS:
    raise ValueError(f"degradation config: jpeg_codec={codec!r}; known: {JPEG_CODECS}")
  return Settings(
      scale=scale, kernel_sizes=sizes, kernel_pad_to=pad_to,
      usm_sharpen=bool(config.usm_sharpen), usm_weight=float(config.usm_weight),
      usm_radius=radius + 1 if radius % 2 == 0 else radius, usm_threshold=float(config.usm_threshold),
      usm_target=bool(config.get("usm_target", False)), jpeg_codec=codec,
      stage1=_stage_settings(config.stage1, "stage1"), stage2=_stage_settings(config.stage2, "stage2"),
      final_sinc_prob=_prob(config.final.sinc_prob, "final.sinc_prob"),
      final_sinc_cutoff=_range(config.final.sinc_cutoff, "final.sinc_cutoff", lo=1e-3, hi=math.pi),
      final_resize_modes=_modes(config.final.resize_modes, "final.resize_modes"),
      final_resize_first_prob=_prob(config.final.resize_first_prob, "final.resize_first_prob"),
      second_stage_prob=_prob(config.get("second_stage_prob", 1.0), "second_stage_prob"),
  )
