"""Rematerialisation: the `remat` runtime option changes the backward program, never the loss or gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cassr_fixtures import TINY_UNET
from cassr_jax import checkpoint
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import trainable_filter
from cassr_jax.models.cassr_unet import CasSRConfig, CasSRUNet
from cassr_jax.models.unet import CROSS_UP, UNetConfig, set_remat
from conftest import relative_max_error

CONFIG = CasSRConfig.from_unet(UNetConfig.from_diffusers(TINY_UNET))


def _remat_count(jaxpr) -> int:
  """Number of rematerialised regions (jax.checkpoint's primitive) in a jaxpr, nested ones included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ("remat2", "checkpoint", "remat")
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _remat_count(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _remat_count(sub)
  return count


def test_remat_same_loss_and_gradients_through_multiple_attention():
  """One cross-attention up block of CasSR with its multiple-attention hooks (the cheap part to compile)."""
  model = CasSRUNet(CONFIG, attention="xla", rngs=nnx.Rngs(0))
  for ma in model.multi_attention:  # random output projections, so the hooks change the output
    for attn in (ma.ref_attn, ma.lr_attn):
      kernel = attn.to_out[0].kernel
      kernel.set_value(0.3 * jax.random.normal(jax.random.key(1), kernel.shape, kernel.dtype))
  index = CONFIG.unet.up_block_types.index(CROSS_UP)
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  ch = CONFIG.unet.block_out_channels[0]
  x, temb, context = normal(2, 8, 8, 64), normal(2, 4 * ch), normal(2, 5, 24)
  skips = [normal(2, 8, 8, c) for c in (ch, ch)]
  feats = [normal(2, 8, 8, c) for c in model.controlnet.skip_channels]

  def loss_fn(params, rest, x, skips, temb, context, ref_feats, lr_feats):
    m = nnx.merge(graphdef, params, rest)
    hooks = m.up_attention_kwargs(ref_feats, lr_feats)[index]
    return jnp.mean(m.unet.up_blocks[index](x, skips, temb, context, hooks) ** 2)

  results = {}
  for remat in ("none", "full", "dots_saveable"):
    set_remat(model, remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # frozen U-Net weights differentiated too
    fn = jax.value_and_grad(loss_fn, argnums=(0, 2, 3, 6, 7))  # grads: params, x, skips, ref, LR features
    args = (params, rest, x, skips, temb, context, feats, [f + 1.0 for f in feats])
    assert (_remat_count(jax.make_jaxpr(fn)(*args).jaxpr) > 0) == (remat != "none")
    if remat != "dots_saveable":  # compiled and compared: "full" (one compile fewer keeps the test short)
      results[remat] = jax.jit(fn)(*args)
  loss, grads = results["none"]
  ma_grads = nnx.to_flat_state(grads[0]["multi_attention"])
  assert len(ma_grads) > 10 and all(float(jnp.abs(g.get_value()).max()) > 0 for p, g in ma_grads
                                     if "to_out" in map(str, p) and p[0] == 0)
  read = [k for i, _, k in model.slots if i == index]
  assert all(float(jnp.abs(grads[3][k]).max()) > 0 for k in read)  # the reference features get gradients
  assert all(float(jnp.abs(grads[4][k]).max()) > 0 for k in read)  # and the LR features
  for remat in ("full",):
    other_loss, other_grads = results[remat]
    assert abs(float(other_loss) - float(loss)) <= 1e-5 * abs(float(loss))
    pairs = zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads))
    assert all(relative_max_error(a, b) <= 1e-5 for a, b in pairs if float(jnp.abs(b).max()) > 0), remat


def test_remat_option_reaches_the_whole_training_program():
  """Built through the registry's runtime options; the abstract gradient program of the full CasSR has one
  rematerialised region per resnet and transformer block with remat on, none with it off."""
  counts = {}
  for remat in ("none", "full"):
    model = eval_shape(lambda: checkpoint.build_model("cassr_unet", CONFIG, remat=remat, attention="xla"))
    blocks = [*model.unet.down_blocks, model.unet.mid_block, *model.unet.up_blocks,
              *model.controlnet.down_blocks, model.controlnet.mid_block]
    assert {b.remat for b in blocks} == {remat}
    graphdef, params, rest = nnx.split(model, trainable_filter(model), ...)
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    inputs = (spec(1, 8, 8, 4), jax.ShapeDtypeStruct((1,), jnp.int32), spec(1, 5, 24), spec(1, 64, 64, 3),
              spec(1, 64, 64, 3))

    def loss_fn(params, rest, *inputs):
      return jnp.mean(nnx.merge(graphdef, params, rest)(*inputs) ** 2)

    counts[remat] = _remat_count(jax.make_jaxpr(jax.grad(loss_fn))(params, rest, *inputs).jaxpr)
  # TINY_UNET, resnets + transformers: U-Net down 2 + 1, mid 3, up 2 + 4; ControlNet down 2 + 1, mid 3.
  assert counts == {"none": 0, "full": 18}
  assert {b.remat for b in set_remat(model, False).unet.up_blocks} == {"none"}  # a config's boolean switch
  with pytest.raises(ValueError, match="remat='sometimes'"):
    eval_shape(lambda: CasSRUNet(CONFIG, remat="sometimes", rngs=nnx.Rngs(0)))
