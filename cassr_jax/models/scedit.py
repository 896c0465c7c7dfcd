"""SCEdit (Jiang et al. 2023, arXiv 2312.11392) on our SD U-Net: SC-Tuner and controllable CSC-Tuner.

Stage-1 option of CasSR (paper: "SCEdit on SD-1.5", conditioned on the LR image). The SD U-Net is frozen; only
the tuners (and, for CSC, the hint encoder) train. Both edit the decoder's skip connections only.

Facts taken from SCEdit's public code (modelscope/scepter: scepter/modules/model/tuner/sce/scetuning.py,
scetuning_component.py, scepter/modules/model/backbone/unet/unet_sd.py `_forward_origin` / `_forward_control`,
scepter/modules/model/network/ldm/ldm_sce.py, scepter/methods/scedit/ctr/sd15_512_sce_ctr_hed.yaml):
  - One tuner per skip connection (12 on SD-1.5), indexed in the DECODER's consumption order
    (m = 0 is the last skip made by the encoder), width = that skip's channels.
  - Tuner op "SCEAdapter": ln1 Linear(C, L, bias) -> nn.GELU (exact, erf) -> ln2 Linear(L, C, bias), applied per
    pixel; L = int(C * DOWN_RATIO) (1.0 in every published config); ln2's weight AND bias start at zero;
    out = shortcut + ln2(GELU(ln1(x))), shortcut defaulting to x.
  - SC-Tuner: skip' = tuner(skip) = skip + MLP(skip); with tuner_scale s < 1: skip + s * MLP(skip).
  - CSC-Tuner ("CSCTuners"): pre_hint_blocks = 7 3x3 convs (padding 1), SiLU between them and none after the
    last: 3->16->16->32(s2)->32->96(s2)->96->256(s2) (widths x PRE_HINT_DIM_RATIO, last = PRE_HINT_OUT_CHANNELS)
    map the [0, 1] condition image (torchvision ToTensor) to latent size. dense_hint_blocks: one
    (SiLU, zero-init conv k x k) per encoder skip, CASCADED (block i reads block i-1's output, block 0 reads the
    pre-hint), stride 2 exactly where the encoder skip is a downsampler output, k = DENSE_HINT_KERNAL 3
    (padding 1) or 1 (padding 0). Per decoder step m, with hint_m the dense hint of the same skip:
    c_m = hint_m + MLP_m(skip_m + hint_m), skip_m' = skip_m + control_scale * SCALE * c_m.
  - Parameter names: pre_hint_blocks.{0,2,...,12}, dense_hint_blocks.{i}.1, lsc_tuner_blocks.{m}.tuner_op.ln{1,2}
    (CSC); lsc_identity.{m}.tuner_op.ln{1,2} inside the U-Net (SC). See cassr_jax/convert/scedit.py.
With untrained tuners both variants compute exactly SD's output (zero ln2 and zero dense-hint convs).

Our layout: `unet` (frozen SD U-Net), `tuners` (nnx.List in decoder order; SCTuner or CSCTuner), `hint`
(HintEncoder, CSC only). About 99M trainable parameters for CSC at SD-1.5 size (tests count them).
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from cassr_jax.models import ModelKind
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from cassr_jax.nn import layers
from cassr_jax.nn.layers import FP32, Policy

MODES = ("sc", "csc")
PRE_HINT_WIDTHS = (16, 16, 32, 32, 96, 96)  # the six convs before the last (out width from the config)
PRE_HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)    # three stride-2 convs: image size / 8 = latent size


@dataclasses.dataclass(frozen=True)
class SCEditConfig:
  unet: UNetConfig = UNetConfig()
  mode: str = "csc"               # "csc": conditioned on a hint image (the LR image); "sc": unconditional tuning
  down_ratio: float = 1.0         # tuner hidden width / skip width (SCEdit DOWN_RATIO)
  scale: float = 1.0              # CSC output scale (SCEdit SCALE)
  hint_channels: int = 3          # PRE_HINT_IN_CHANNELS
  hint_out_channels: int = 256    # PRE_HINT_OUT_CHANNELS
  hint_dim_ratio: float = 1.0     # PRE_HINT_DIM_RATIO
  dense_hint_kernel: int = 3      # DENSE_HINT_KERNAL (3 or 1)

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"SCEdit config: mode must be one of {MODES}, got {self.mode!r}")
    if self.dense_hint_kernel not in (1, 3):
      raise ValueError(f"SCEdit config: dense_hint_kernel must be 3 or 1, got {self.dense_hint_kernel}")
    if not self.down_ratio > 0 or not self.hint_dim_ratio > 0:
      raise ValueError(f"SCEdit config: down_ratio ({self.down_ratio}) and hint_dim_ratio "
                       f"({self.hint_dim_ratio}) must be positive")



def skip_layout(cfg: UNetConfig) -> tuple[tuple[int, bool], ...]:
  """(channels, is_downsampler_output) of every encoder skip, in creation order (SCEdit's INPUT_BLOCK_CHANS
  and INPUT_DOWN_FLAG); mirrors UNet2DConditionModel.encode."""
  out = [(cfg.block_out_channels[0], False)]
  for i, ch in enumerate(cfg.block_out_channels):
    out += [(ch, False)] * cfg.layers_per_block
    if i < len(cfg.block_out_channels) - 1:
      out.append((ch, True))
  return tuple(out)


class SCTuner(nnx.Module):
  """SCEAdapter: x -> shortcut + ln2(GELU(ln1(x))) over the channel axis, ln2 zero-initialised."""

  def __init__(self, dim: int, hidden: int, *, policy: Policy = FP32, rngs: nnx.Rngs):
    self.ln1 = layers.linear(dim, hidden, policy=policy, rngs=rngs)
    self.ln2 = layers.linear(hidden, dim, zero_init=True, policy=policy, rngs=rngs)

  def delta(self, x):
    return self.ln2(jax.nn.gelu(self.ln1(x), approximate=False))

  def __call__(self, x, shortcut=None):
    return (x if shortcut is None else shortcut) + self.delta(x)


class CSCTuner(SCTuner):
  """The controllable tuner of one skip: c = hint + MLP(skip + hint) (same parameters as SCTuner)."""

  def __call__(self, skip, hint):  # pylint: disable=arguments-renamed
    return super().__call__(skip + hint, shortcut=hint)


class HintEncoder(nnx.Module):
  """CSC hint path: pre-hint convs (image -> latent size) and the cascaded zero-init dense-hint convs, one
  per encoder skip. Returns the dense hints in encoder (skip creation) order."""

  def __init__(self, config: SCEditConfig, *, policy: Policy = FP32, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    widths = [int(w * config.hint_dim_ratio) for w in PRE_HINT_WIDTHS] + [config.hint_out_channels]
    ins = [config.hint_channels] + widths[:-1]
    self.pre_hint_blocks = nnx.List([
        layers.conv(i, o, 3, stride=s, **kw) for i, o, s in zip(ins, widths, PRE_HINT_STRIDES)])
    k = config.dense_hint_kernel
    blocks, ch = [], config.hint_out_channels
    for chan, down in skip_layout(config.unet):
      blocks.append(layers.conv(ch, chan, k, stride=2 if down else 1, padding=k // 2, zero_init=True, **kw))
      ch = chan
    self.dense_hint_blocks = nnx.List(blocks)

  def __call__(self, image):
    h = image
    for j, conv in enumerate(self.pre_hint_blocks):
      h = conv(h)
      if j < len(self.pre_hint_blocks) - 1:
        h = nnx.silu(h)
    hints = []
    for conv in self.dense_hint_blocks:
      h = conv(nnx.silu(h))
      hints.append(h)
    return hints


class SCEditUNet(nnx.Module):
  """Frozen SD U-Net with SCEdit tuners on its skip connections.

  Inputs: latents (B, h, w, 4), timesteps, text context, and for CSC the hint image (B, 8h, 8w, 3) in [0, 1]
  (for super-resolution: the bicubic-upsampled LR image). Returns the U-Net output (eps), NHWC.
  """

  def __init__(self, config: SCEditConfig, *, policy: Policy = FP32, attention: str = "auto", rngs: nnx.Rngs,
               unet: UNet2DConditionModel | None = None):
    """unet: an existing (converted) U-Net to wrap as is (not copied); default builds a random one."""
    self.config = config
    if unet is not None and unet.config != config.unet:
      raise ValueError("SCEditUNet: the given U-Net's config differs from config.unet")
    self.unet = unet if unet is not None else UNet2DConditionModel(
        config.unet, policy=policy, attention=attention, rngs=rngs)
    layout = skip_layout(config.unet)
    tuner_cls = CSCTuner if config.mode == "csc" else SCTuner
    # Decoder order, as SCEdit numbers them: tuner m edits the skip the decoder consumes m-th.
    self.tuners = nnx.List([
        tuner_cls(ch, int(ch * config.down_ratio), policy=policy, rngs=rngs) for ch, _ in reversed(layout)])
    self.hint = HintEncoder(config, policy=policy, rngs=rngs) if config.mode == "csc" else None

  def edit_skips(self, skips, hint=None, *, control_scale: float = 1.0, tuner_scale: float = 1.0):
    """Applies the tuners to the encoder skips (creation order); returns the edited skips."""
    n = len(skips)
    if n != len(self.tuners):
      raise ValueError(f"SCEdit: {len(self.tuners)} tuners for {n} skip connections")
    if self.hint is None:
      return [s + tuner_scale * self.tuners[n - 1 - k].delta(s) for k, s in enumerate(skips)]
    hints = self.hint(hint)
    scale = control_scale * self.config.scale
    return [s + scale * self.tuners[n - 1 - k](s, h.astype(s.dtype))
            for k, (s, h) in enumerate(zip(skips, hints))]

  def trained_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The tuners and the hint encoder train; the SD U-Net stays frozen (cassr_jax.models.trainable_filter)."""
    return ("tuners", "hint"), ()

  def __call__(self, sample, timesteps, context, hint=None, *, control_scale: float = 1.0,
               tuner_scale: float = 1.0):
    """control_scale: CSC strength (SCEdit's control_scale); tuner_scale: SC strength (SCEdit's tuner_scale)."""
    unet = self.unet
    if self.hint is not None:
      expected = (sample.shape[0], 8 * sample.shape[1], 8 * sample.shape[2], self.config.hint_channels)
      if hint is None or tuple(hint.shape) != expected:
        raise ValueError(f"SCEdit (CSC): expected a hint image of shape {expected} (8x the latent size), "
                         f"got {None if hint is None else tuple(hint.shape)}")
      hint = hint.astype(unet.dtype)
    context = context.astype(unet.dtype)
    temb = unet.time_embed(timesteps, sample.shape[0])
    x, skips = unet.encode(sample, temb, context)
    x = unet.mid_block(x, temb, context)
    skips = self.edit_skips(skips, hint, control_scale=control_scale, tuner_scale=tuner_scale)
    return unet.decode(x, skips, temb, context)


def scedit_from_pretrained(unet: UNet2DConditionModel, config: SCEditConfig | None = None, *, mode: str = "csc",
                           policy: Policy = FP32, seed: int = 0, **overrides) -> SCEditUNet:
  """SCEdit around a (converted) SD U-Net, with fresh tuners (identity at start).

  The model holds `unet` itself (no copy, so no second set of U-Net weights). config: default
  SCEditConfig(unet=unet.config, mode=mode, **overrides). policy: dtype policy of the new tuners.
  """
  config = config or SCEditConfig(unet=unet.config, mode=mode, **overrides)
  return SCEditUNet(config, policy=policy, rngs=nnx.Rngs(seed), unet=unet)


def build(config: SCEditConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, attention: str = "auto"):
  return SCEditUNet(config, policy=policy, attention=attention, rngs=rngs)


MODEL_KIND = ModelKind(SCEditConfig, build)
