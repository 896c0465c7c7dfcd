"""Parameter counts and per-step FLOPs of the CasSR stage-2 model at SD-1.5 size (no weights needed).

  python scripts/model_stats.py [--latent 64] [--xla]

Counts come from the abstract model (nnx.eval_shape). The multiple attention's extra FLOPs per denoising
step are computed analytically (matmuls, 2 FLOPs per multiply-add) and, with --xla, cross-checked with XLA's
cost analysis of the lowered forward passes (CasSR vs SD U-Net + ControlNet on the LR image).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax.models import frozen_filter, trainable_filter
from cassr_jax.models.cassr_unet import CasSRConfig, CasSRUNet
from cassr_jax.models.unet import UNetConfig


def count(state) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state))


def multiple_attention_flops(model: CasSRUNet, latent: int) -> int:
  """Matmul FLOPs of all reference + LR attentions for one image (batch 1, one U-Net evaluation)."""
  total = 0
  for (i, _, k), ma in zip(model.slots, model.multi_attention):
    dim = ma.ref_attn.to_q.in_features
    feat = ma.ref_attn.to_k.in_features
    side = latent // 2 ** (len(model.config.unet.block_out_channels) - 1 - i)
    tokens = side * side
    per_attention = 2 * tokens * dim * dim * 2          # q and output projections
    per_attention += 2 * tokens * feat * dim * 2        # k and v projections of the features
    per_attention += 2 * tokens * tokens * dim * 2      # scores and weighted sum
    total += 2 * per_attention                          # reference and LR attention
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 image)")
  parser.add_argument("--xla", action="store_true", help="also run XLA cost analysis (slow on CPU)")
  args = parser.parse_args()

  config = CasSRConfig.from_unet(UNetConfig.sd15())
  # XLA attention: cost analysis counts a loop body (the blockwise path) only once.
  model = nnx.eval_shape(lambda: CasSRUNet(config, attention="xla", rngs=nnx.Rngs(0)))
  total = count(nnx.state(model, nnx.Param))
  frozen = count(nnx.state(model, frozen_filter(model)))
  trainable = count(nnx.state(model, trainable_filter(model)))
  ma = count(nnx.state(model.multi_attention, nnx.Param))
  cn = count(nnx.state(model.controlnet, nnx.Param))
  print(f"CasSR U-Net at SD-1.5 size: total {total / 1e6:.1f}M parameters")
  print(f"  frozen (SD-1.5 U-Net)      {frozen / 1e6:8.1f}M")
  print(f"  trainable                  {trainable / 1e6:8.1f}M  (ControlNet {cn / 1e6:.1f}M + "
        f"multiple attention {ma / 1e6:.1f}M in {len(model.slots)} transformer blocks)")
  flops = multiple_attention_flops(model, args.latent)
  print(f"multiple attention, analytic: {flops / 1e9:.1f} GFLOP per U-Net evaluation at "
        f"{args.latent}x{args.latent} latent ({2 * flops / 1e9:.1f} GFLOP per CFG step); the ControlNet runs "
        "on [LR; ref], i.e. twice")

  if args.xla:
    b, s = 1, args.latent
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    inputs = (spec(b, s, s, 4), jax.ShapeDtypeStruct((b,), jnp.int32), spec(b, 77, 768),
              spec(b, 8 * s, 8 * s, 3), spec(b, 8 * s, 8 * s, 3))
    graphdef, state = nnx.split(model)

    def cassr(state, *a):
      return nnx.merge(graphdef, state)(*a)

    def baseline(state, x, t, ctx, lr_up, ref):
      m = nnx.merge(graphdef, state)
      down, mid = m.controlnet(x, t, ctx, lr_up)
      return m.unet(x, t, ctx, down_residuals=down, mid_residual=mid)

    costs = {}
    for name, fn in (("cassr", cassr), ("sd+controlnet", baseline)):
      analysis = jax.jit(fn).lower(state, *inputs).cost_analysis()
      analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
      costs[name] = float(analysis["flops"])
      print(f"XLA cost analysis, {name}: {costs[name] / 1e9:.1f} GFLOP per evaluation")
    print(f"XLA: CasSR adds {(costs['cassr'] - costs['sd+controlnet']) / 1e9:.1f} GFLOP per evaluation "
          "(multiple attention + the ControlNet's second pass on the reference)")


if __name__ == "__main__":
  main()
