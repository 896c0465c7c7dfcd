"""SCEdit SC-/CSC-Tuner on our U-Net: identity at init, parity with a PyTorch reference of SCEdit's tuners
through the checkpoint converter, training split, strict conversion errors, SD-1.5 parameter count."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from cassr_fixtures import TINY_UNET, nhwc_to_nchw, state_dict_numpy
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import config_from_dict
from cassr_jax.models import frozen_filter, trainable_filter
from cassr_jax import checkpoint
from cassr_jax.convert.scedit import export_scedit_tuners, load_scedit_tuners
from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import load_torch_state
from cassr_jax.models.scedit import (SCEditConfig, SCEditUNet, scedit_from_pretrained, skip_layout)
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from conftest import jit_call, relative_max_error


# --- A PyTorch reference of SCEdit's tuners, with SCEdit's module names (so state_dict() has its keys). ---
class TorchSCEAdapter(torch.nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.ln1 = torch.nn.Linear(dim, hidden)
    self.ln2 = torch.nn.Linear(hidden, dim)

  def forward(self, x):  # NCHW, per pixel
    y = self.ln2(torch.nn.functional.gelu(self.ln1(x.permute(0, 2, 3, 1))))
    return y.permute(0, 3, 1, 2)


class TorchSCTuner(torch.nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.tuner_op = TorchSCEAdapter(dim, hidden)

  def forward(self, x, shortcut=None):
    return (x if shortcut is None else shortcut) + self.tuner_op(x)


class TorchCSCTuners(torch.nn.Module):
  def __init__(self, layout, hint_out=256):
    super().__init__()
    widths, strides = (16, 16, 32, 32, 96, 96, hint_out), (1, 1, 2, 1, 2, 1, 2)
    seq, c_in = [], 3
    for j, (w, s) in enumerate(zip(widths, strides)):
      seq.append(torch.nn.Conv2d(c_in, w, 3, stride=s, padding=1))
      if j < len(widths) - 1:
        seq.append(torch.nn.SiLU())
      c_in = w
    self.pre_hint_blocks = torch.nn.Sequential(*seq)
    self.dense_hint_blocks = torch.nn.ModuleList()
    for chan, down in layout:
      self.dense_hint_blocks.append(torch.nn.Sequential(
          torch.nn.SiLU(), torch.nn.Conv2d(c_in, chan, 3, stride=2 if down else 1, padding=1)))
      c_in = chan
    self.lsc_tuner_blocks = torch.nn.ModuleList([TorchSCTuner(c, c) for c, _ in reversed(layout)])

  def hints(self, image):
    h, out = self.pre_hint_blocks(image), []
    for block in self.dense_hint_blocks:
      h = block(h)
      out.append(h)
    return out


def torch_skips(tu, x, t, ctx):
  """diffusers' down path: conv_in output and every down-block residual, in creation order."""
  emb = tu.time_embedding(tu.time_proj(t).to(x.dtype))
  h = tu.conv_in(x)
  skips = [h]
  for block in tu.down_blocks:
    if getattr(block, "has_cross_attention", False):
      h, res = block(h, temb=emb, encoder_hidden_states=ctx)
    else:
      h, res = block(h, temb=emb)
    skips += list(res)
  return skips


def torch_scedit(tu, tuners, mode, x, t, ctx, hint):
  """SD + SCEdit tuners: skip_k + residual_k through diffusers' ControlNet residual input."""
  skips = torch_skips(tu, x, t, ctx)
  n = len(skips)
  if mode == "csc":
    hints = tuners.hints(hint)
    res = [tuners.lsc_tuner_blocks[n - 1 - k](s + h, shortcut=h) for k, (s, h) in enumerate(zip(skips, hints))]
  else:
    res = [tuners[n - 1 - k](s) - s for k, s in enumerate(skips)]
  mid = torch.zeros_like(skips[-1])  # the mid block keeps the last skip's shape; diffusers needs a mid
  # residual to treat down_block_additional_residuals as ControlNet residuals
  return tu(x, t, ctx, down_block_additional_residuals=res, mid_block_additional_residual=mid).sample


def _inputs(rng, batch=2, latent=8):
  x = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
  t = np.array([7, 650][:batch])
  ctx = rng.standard_normal((batch, 5, 24)).astype(np.float32)
  hint = rng.random((batch, 8 * latent, 8 * latent, 3)).astype(np.float32)
  return x, t, ctx, hint


def _torch_unet_and_ours(unet_kwargs, seed):
  """A random-weight diffusers U-Net and our U-Net holding the same weights (built abstractly, no init)."""
  torch.manual_seed(seed)
  tu = TorchUNet(**unet_kwargs).eval()
  with torch.no_grad():
    for p in tu.parameters():
      p.normal_(0, 0.1)
  config = UNetConfig.from_diffusers(dict(tu.config))
  unet = eval_shape(lambda: UNet2DConditionModel(config, attention="xla", rngs=nnx.Rngs(0)))
  load_torch_state(unet, state_dict_numpy(tu), source="unet")
  return tu, unet


@pytest.fixture(scope="module")
def tiny_models():
  """Torch U-Net, our U-Net with its weights, and SCEdit around ours with SCEdit's own initialisation per mode.

  TINY_UNET has a downsampling skip (stride-2 dense-hint conv) and both block kinds; the tests share its
  compiled programs (one per mode), which keeps the file fast on CPU.
  """
  tu, unet = _torch_unet_and_ours(TINY_UNET, seed=5)
  return tu, unet, {mode: scedit_from_pretrained(unet, mode=mode, seed=1) for mode in ("csc", "sc")}


@pytest.mark.parametrize("mode", ["csc", "sc"])
def test_untrained_tuners_leave_sd_unchanged(tiny_models, mode, rng):
  _, unet, models = tiny_models
  model = models[mode]
  assert model.unet is unet and len(model.tuners) == len(skip_layout(unet.config)) == 4
  x, t, ctx, hint = (jnp.asarray(a) for a in _inputs(rng))
  plain = jit_call(unet, x, t, ctx)
  ours = jit_call(model, x, t, ctx, hint) if mode == "csc" else jit_call(model, x, t, ctx)
  err = relative_max_error(ours, plain)
  assert err <= 1e-6, err
  assert float(jnp.abs(plain).max()) > 0


@pytest.mark.parametrize("layout", ["csc", "sc", "sc_swift"])
def test_converted_scedit_checkpoint_matches_torch_reference(tiny_models, layout, rng, tmp_path):
  tu, unet, _ = tiny_models
  mode = "csc" if layout == "csc" else "sc"
  chans = skip_layout(unet.config)
  torch.manual_seed(4)
  if mode == "csc":
    ref = TorchCSCTuners(chans).eval()
  else:
    ref = torch.nn.ModuleList([TorchSCTuner(c, c) for c, _ in reversed(chans)]).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.normal_(0, 0.1)
  if layout == "csc":  # how SCEdit saves control_blocks (a ModuleList): keys "0.pre_hint_blocks.0.weight", ...
    state = torch.nn.ModuleList([ref]).state_dict()
    path = tmp_path / "pytorch_model.bin"
  elif layout == "sc":  # LatentDiffusionSCETuning: the U-Net's keys holding "lsc_identity"
    state = {f"model.lsc_identity.{k}": v for k, v in ref.state_dict().items()}
    path = tmp_path / "tuner.pth"
  else:  # ms-swift SCETuning: the adapter module sits one level deeper
    state = {}
    for key, value in ref.state_dict().items():
      m, rest = key.split(".", 1)
      state[f"model.lsc_identity.{m}.scetuner_0_SwiftSCETuning.{rest}"] = value
    path = tmp_path / "adapter.safetensors"
  if path.suffix == ".safetensors":
    safetensors.numpy.save_file({k: v.numpy() for k, v in state.items()}, str(path))
  else:
    torch.save(state, str(path))

  # Built abstractly (random init compiles per shape; every tuner weight is loaded anyway).
  model = eval_shape(
      lambda: SCEditUNet(SCEditConfig(unet=unet.config, mode=mode), attention="xla", rngs=nnx.Rngs(0)))
  nnx.update(model.unet, nnx.state(unet, nnx.Param))
  load_scedit_tuners(model, path)
  # Round trip: exported weights equal what was written, key for key.
  exported = export_scedit_tuners(model)
  canonical = {(k if mode == "csc" else f"lsc_identity.{k}"): v for k, v in ref.state_dict().items()}
  assert set(exported) == set(canonical)
  for key, value in canonical.items():
    assert np.array_equal(exported[key], value.numpy()), key

  x, t, ctx, hint = _inputs(rng)
  tx, tt, tctx = torch.tensor(nhwc_to_nchw(x)), torch.tensor(t), torch.tensor(ctx)
  with torch.no_grad():
    expected = torch_scedit(tu, ref, mode, tx, tt, tctx, torch.tensor(nhwc_to_nchw(hint))).numpy()
    plain = tu(tx, tt, tctx).sample.numpy()
  args = [jnp.asarray(a) for a in (x, t, ctx)] + ([jnp.asarray(hint)] if mode == "csc" else [])
  ours = nhwc_to_nchw(jit_call(model, *args))
  err = relative_max_error(ours, expected)
  print(f"SCEdit {layout} vs torch reference: relative max error {err:.2e}")
  assert err <= 1e-4, err
  assert relative_max_error(expected, plain) > 1e-2  # the tuners really act


def test_every_tuner_parameter_gets_gradient_and_unet_stays_frozen(tiny_models, rng):
  model = nnx.clone(tiny_models[2]["csc"])
  frozen_before = jax.tree.map(np.asarray, nnx.state(model, frozen_filter(model)))
  trainable = trainable_filter(model)
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=trainable)
  x, t, ctx, hint = (jnp.asarray(a) for a in _inputs(rng))
  target = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return jnp.mean((m(x, t, ctx, hint) - target) ** 2)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
    optimizer.update(model, grads)
    return grads

  # SCEdit's zero inits delay some gradients by one step (ln1 behind a zero ln2; cascaded hint convs behind
  # SiLU(0) = 0; the pre-hint convs behind the first zero dense-hint conv), never by two.
  seen = None
  for _ in range(2):
    nonzero = jax.tree.map(lambda g: bool(np.any(np.asarray(g) != 0)), step(model, optimizer))
    seen = nonzero if seen is None else jax.tree.map(lambda a, b: a or b, seen, nonzero)
  flat = nnx.to_flat_state(seen)
  missing = [".".join(map(str, p)) for p, v in flat if not v.get_value()]
  n_trainable = len(nnx.to_flat_state(nnx.state(model, trainable)))
  assert len(flat) == n_trainable == 4 * 4 + 2 * (7 + 4) and not missing, f"no gradient: {missing}"
  frozen_after = jax.tree.map(np.asarray, nnx.state(model, frozen_filter(model)))
  leaves_before, leaves_after = jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)
  assert len(leaves_before) > 0 and all(np.array_equal(a, b) for a, b in zip(leaves_before, leaves_after))
  assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, frozen_filter(model)))} == {"unet"}


def test_converter_is_strict_and_names_keys(tmp_path):
  unet = eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_diffusers(TINY_UNET), rngs=nnx.Rngs(0)))
  model = scedit_from_pretrained(unet, mode="csc")
  good = export_scedit_tuners(model)
  # A missing key, a wrong shape and a stray key are all reported, with our parameter names.
  bad = {("0." + k): v for k, v in good.items() if k != "dense_hint_blocks.2.1.bias"}
  bad["0.lsc_tuner_blocks.0.tuner_op.ln1.weight"] = np.zeros((3, 3), np.float32)
  bad["0.extra.weight"] = np.zeros(1, np.float32)
  with pytest.raises(CheckpointError) as err:
    load_scedit_tuners(model, bad, source="bad.bin")
  text = str(err.value)
  assert "dense_hint_blocks.2.1.bias (ours: hint.dense_hint_blocks.2.bias" in text
  assert "lsc_tuner_blocks.0.tuner_op.ln1.weight: checkpoint (3, 3)" in text and "extra.weight" in text
  # An SC checkpoint given to a CSC model says so.
  sc_model = scedit_from_pretrained(unet, mode="sc")
  sc_state = {"model." + k: v for k, v in export_scedit_tuners(sc_model).items()}
  with pytest.raises(CheckpointError, match="SCEdit SC checkpoint, but the model is configured with mode='csc'"):
    load_scedit_tuners(model, sc_state, source="sc.bin")
  load_scedit_tuners(sc_model, sc_state)  # and loads into an SC model
  (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
  with pytest.raises(CheckpointError, match="junk.bin"):
    load_scedit_tuners(model, tmp_path / "junk.bin")


def test_csc_parameter_count_at_sd15_size():
  model = eval_shape(lambda: SCEditUNet(SCEditConfig(), rngs=nnx.Rngs(0)))
  count = lambda part: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(part, nnx.Param)))
  conv = lambda i, o, k=3: i * o * k * k + o
  # Independent count from SCEdit's SD-1.5 layout.
  skips = [320] * 4 + [640] * 3 + [1280] * 5
  pre = sum(conv(i, o) for i, o in zip((3, 16, 16, 32, 32, 96, 96), (16, 16, 32, 32, 96, 96, 256)))
  dense = sum(conv(i, o) for i, o in zip([256] + skips[:-1], skips))
  mlp = sum(2 * (c * c + c) for c in skips)
  assert count(model.hint) == pre + dense == 79_431_760
  assert count(model.tuners) == mlp == 19_680_000
  trainable = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, trainable_filter(model))))
  assert trainable == 99_111_760 and abs(trainable - 99e6) / 99e6 < 0.01  # "about 99M" (SCEdit paper)
  assert count(model.unet) == 859_520_964  # SD-1.5 U-Net, untouched


def test_config_from_dict_validation_and_save_load(tiny_models, tmp_path, rng):
  model = tiny_models[2]["csc"]
  config = dataclasses.replace(model.config, scale=0.5)
  assert config_from_dict(SCEditConfig, dataclasses.asdict(config)) == config
  with pytest.raises(ValueError, match="unknown config keys"):
    config_from_dict(SCEditConfig, {**dataclasses.asdict(config), "tuner": "x"})
  with pytest.raises(ValueError, match="mode"):
    SCEditConfig(mode="lora")
  with pytest.raises(ValueError, match="config differs"):
    SCEditUNet(dataclasses.replace(config, unet=UNetConfig()), unet=model.unet, rngs=nnx.Rngs(0))
  x, t, ctx, hint = (jnp.asarray(a) for a in _inputs(rng, batch=1))
  with pytest.raises(ValueError, match=r"hint image of shape \(1, 64, 64, 3\)"):
    model(x, t, ctx, hint[:, :32, :32])
  with pytest.raises(ValueError, match="hint image"):
    model(x, t, ctx)
  checkpoint.save_model(str(tmp_path / "scedit"), model, "scedit", config)
  back = checkpoint.load_model(str(tmp_path / "scedit"))
  assert isinstance(back, SCEditUNet) and back.config == config
  a, b = jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))
  assert len(a) == len(b) and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))
