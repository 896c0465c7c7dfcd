"""One CasSR stage-2 training step: step time, images/s, analytic TFLOP per step, MFU, peak device memory.

  python scripts/bench/train_step.py --size sd15 --resolution 512 --batch 4 --dtype bfloat16   # a GPU
  python scripts/bench/train_step.py --size tiny --vs-torch                                     # seconds, CPU
  python scripts/bench/train_step.py --size sd15 --resolution 256 --no-multiple-attention --vs-torch

The step is the trainer's own (cassr_jax.train.step.Trainer.step, the one a training run compiles), on a
config built in code (cassr_jax.config.tiny_config() with this run's sizes, dtype, attention, remat and
batch; references from the batch, as activation.name = "paired"; one device) and random weights at the
named size: the frozen VAE encodes the HR crop (posterior sample, scaled), t uniform over the 1000
training steps, noise added with SD's scaled-linear schedule, prompt dropout, CasSR forward, epsilon-MSE,
backward, gradient clipping and Adam on the trainable parameters (ControlNet + multiple attention).
`--no-multiple-attention` is the paper's "residual add only" model: SD + one ControlNet pass over the LR
image, i.e. exactly the work of diffusers' ControlNet training, which `--vs-torch` times in the same process
(diffusers' UNet2DConditionModel frozen + ControlNetModel trained + AutoencoderKL encode, forward + backward
+ torch.optim.Adam, same resolution, batch and dtype; autocast for bf16). Runs are interleaved (ours, torch,
ours, ...) so background load hits both alike.

TFLOP per step are counted from the shapes of every matmul and convolution (2 FLOPs per multiply-add) in
the jaxpr of the same trainer step built with XLA attention and without remat, i.e. model FLOPs: the VAE
encode (no gradient) counts as it runs, the recomputation of remat does not. MFU divides by the device's dense
peak for the compute dtype (table below; CPU: n/a).
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax import parallel
from cassr_jax.config import PAIRED_ACTIVATION, parse_model_switches, tiny_config
from cassr_jax.models.cassr_unet import CasSRUNet
from cassr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from cassr_jax.models.controlnet import ControlNetConfig
from cassr_jax.models.unet import UNetConfig
from cassr_jax.models.vae import AutoencoderKL, VAEConfig
from cassr_jax.nn.layers import Policy
from cassr_jax.schedulers.schedule import make_schedule
from cassr_jax.text import HashTokenizer
from cassr_jax.train.components import Components
from cassr_jax.train.step import Trainer, model_batch

# Dense peak TFLOP/s per chip: (bf16/fp16, fp32 as XLA runs it: TF32 tensor cores on A100/H100/H200).
PEAK_TFLOPS = {
    "H200": (989.0, 494.5), "H100 PCIe": (756.0, 378.0), "H100": (989.0, 494.5), "A100": (312.0, 156.0),
    "TPU v5 lite": (197.0, 197.0), "TPU v5e": (197.0, 197.0), "TPU v5p": (459.0, 459.0),
    "TPU v4": (275.0, 275.0),
}

SIZES = {
    # two levels, VAE and hint encoder downscale 2: the fastest compile (CI smoke runs)
    "micro": (dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                   attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4),
              dict(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4), 4, (8, 8)),
    # name: (U-Net diffusers kwargs, VAE config kwargs, text tokens, hint channels)
    "tiny": (dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=32, norm_num_groups=8),
             dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8), 8,
             (8, 16, 16, 16)),
    "small": (dict(block_out_channels=(64, 128, 256, 256), cross_attention_dim=768),
              dict(block_out_channels=(32, 64, 128, 128)), 77, (16, 32, 96, 256)),
    "sd15": (dict(cross_attention_dim=768), {}, 77, (16, 32, 96, 256)),
}


def peak_tflops(device, dtype: str) -> float | None:
  kind = device.device_kind
  for name, (bf16, fp32) in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return bf16 if dtype in ("bfloat16", "float16") else fp32
  return None


def matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and convolution in a jaxpr (sub-jaxprs included; scans times
  their length)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / rhs[out_dim]
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += times * matmul_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += times * matmul_flops(sub)
  return total


def bench_config(args, attention: str | None = None, remat: str | None = None):
  """The training config of this run: tiny_config() with the benchmark's batch, crop, dtype and model."""
  c = tiny_config()
  c.runtime.dtype = args.dtype
  c.runtime.attention = attention or args.attention
  c.runtime.remat = remat or args.remat
  c.model.multiple_attention = args.multiple_attention
  c.activation.name = PAIRED_ACTIVATION  # the batch carries the stage-1 reference
  c.data.crop_size = args.resolution
  c.train.batch_size = args.batch
  c.train.learning_rate = 1e-5
  return c


def build_components(args, config, abstract: bool = False) -> Components:
  """Random models of `args.size` with config's dtype, attention and remat (abstract: shapes only)."""
  unet_kw, vae_kw, _, hint = SIZES[args.size]
  unet_cfg = UNetConfig.from_diffusers(unet_kw)
  model_cfg = dataclasses.replace(parse_model_switches(config), unet=unet_cfg, controlnet=ControlNetConfig.from_unet(
      unet_cfg, conditioning_embedding_out_channels=hint))
  width = unet_cfg.cross_attention_dim  # a one-layer text encoder: it runs once, outside the step
  text_cfg = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=2)
  policy = Policy(jnp.float32, jnp.dtype(config.runtime.dtype))
  attention, remat = str(config.runtime.attention), str(config.runtime.remat)
  make = lambda: (CasSRUNet(model_cfg, policy=policy, attention=attention, remat=remat, rngs=nnx.Rngs(0)),
                  AutoencoderKL(VAEConfig(**vae_kw), policy=policy, attention=attention, rngs=nnx.Rngs(1)),
                  CLIPTextModel(text_cfg, attention="xla", rngs=nnx.Rngs(2)))
  if abstract:
    models = nnx.eval_shape(make)
  else:
    # One jitted initialisation: far faster than eager init, which compiles one program per parameter shape.
    graphdefs, states = jax.jit(lambda: tuple(zip(*(nnx.split(m) for m in make()))))()
    models = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, states))
  return Components(*models, HashTokenizer(text_cfg.vocab_size), make_schedule())


def make_batch(args, rng):
  """A training batch as the data pipeline gives it (HR crop, LR x4 smaller, upsampled LR, stage-1 reference,
  identities), plus the text context the torch step takes."""
  _, _, tokens, _ = SIZES[args.size]
  b, r = args.batch, args.resolution
  image = lambda size: rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
  return {"hr": image(r), "lr": image(max(r // 4, 1)), "lr_up": image(r), "ref": image(r),
          "epoch": np.zeros(b, np.int32), "index": np.arange(b, dtype=np.int32),
          "context": rng.standard_normal((b, tokens, SIZES[args.size][0]["cross_attention_dim"])).astype(np.float32)}


def ours_runner(args, batch):
  """(run one step of the trainer, compile seconds, analytic FLOPs per step)."""
  mesh = parallel.make_mesh(1, jax.devices()[:1])
  config = bench_config(args)
  parts = build_components(args, config)
  trainer = Trainer(config, parts, mesh)
  batch = parallel.host_local_to_global(model_batch(batch), mesh)
  start = time.perf_counter()
  compiled = trainer.step.lower(trainer.abstract_state(), trainer.frozen, batch).compile()
  compile_s = time.perf_counter() - start

  # Model FLOPs: the same step, traced (not run) with XLA attention (no loops) and no remat, same weights.
  flops_config = bench_config(args, attention="xla", remat="none")
  shapes = build_components(args, flops_config, abstract=True)
  rebuild = lambda abstract, real: nnx.merge(nnx.split(abstract)[0], nnx.state(real))
  flops_trainer = Trainer(flops_config, dataclasses.replace(parts, model=rebuild(shapes.model, parts.model),
                                                            vae=rebuild(shapes.vae, parts.vae)), mesh)
  jaxpr = jax.make_jaxpr(flops_trainer.step)(flops_trainer.abstract_state(), flops_trainer.frozen, batch)
  flops = matmul_flops(jaxpr.jaxpr)
  del flops_trainer, jaxpr
  state = {"state": trainer.init_state()}

  def run():
    state["state"], metrics = compiled(state["state"], trainer.frozen, batch)
    return float(metrics["loss"])

  return run, compile_s, flops


def torch_runner(args, batch):
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKL as TorchVAE  # pylint: disable=import-outside-toplevel
  from diffusers import ControlNetModel as TorchControlNet  # pylint: disable=import-outside-toplevel
  from diffusers import DDPMScheduler  # pylint: disable=import-outside-toplevel
  from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=import-outside-toplevel
  unet_kw, vae_kw, _, hint = SIZES[args.size]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  unet = TorchUNet(**unet_kw).to(device).requires_grad_(False)
  controlnet = TorchControlNet.from_unet(unet, conditioning_embedding_out_channels=hint).to(device).train()
  vae_cfg = VAEConfig(**vae_kw)
  n = len(vae_cfg.block_out_channels)
  vae = TorchVAE(block_out_channels=vae_cfg.block_out_channels, layers_per_block=vae_cfg.layers_per_block,
                 norm_num_groups=vae_cfg.norm_num_groups, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                 ).to(device).requires_grad_(False)
  scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  optimizer = torch.optim.Adam(controlnet.parameters(), lr=1e-5)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)
  hr, lr_up = nchw(batch["hr"] * 2.0 - 1.0), nchw(batch["lr_up"])  # the VAE reads [-1, 1]
  context = torch.from_numpy(batch["context"]).to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def run():
    # diffusers' examples/controlnet/train_controlnet.py, one step
    with autocast:
      with torch.no_grad():
        latents = vae.encode(hr).latent_dist.sample() * vae_cfg.scaling_factor
      noise = torch.randn_like(latents)
      t = torch.randint(0, 1000, (latents.shape[0],), device=device)
      noisy = scheduler.add_noise(latents, noise, t)
      down, mid = controlnet(noisy, t, context, controlnet_cond=lr_up, return_dict=False)
      eps = unet(noisy, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                 return_dict=False)[0]
      loss = torch.nn.functional.mse_loss(eps.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss.detach())

  def peak_memory():
    return torch.cuda.max_memory_allocated() if device == "cuda" else None

  return run, peak_memory


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=tuple(SIZES), default="tiny",
                 help="micro | tiny | small | sd15 (full SD-1.5)")
  p.add_argument("--sd15", action="store_const", const="sd15", dest="size", help="same as --size sd15")
  p.add_argument("--resolution", type=int, default=None, help="HR crop side (default 512, tiny 64)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  p.add_argument("--multiple-attention", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="none")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--vs-torch", action="store_true", help="also time the equivalent diffusers step")
  p.add_argument("--table-row", action="store_true", help="print one '| ... |' summary row at the end")
  args = p.parse_args()
  args.resolution = args.resolution or {"micro": 32, "tiny": 64}.get(args.size, 512)
  device = jax.devices()[0]
  batch = make_batch(args, np.random.default_rng(0))
  what = (f"CasSR train step, size {args.size}, {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{args.dtype}, multiple attention {'on' if args.multiple_attention else 'off'}, remat {args.remat}")
  print(what, f"\n  device: {device.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)",
        flush=True)
  ours, compile_s, flops = ours_runner(args, batch)
  fns = {"ours": ours}
  if args.vs_torch:
    fns["torch"], torch_peak = torch_runner(args, batch)
  losses = {name: fn() for name, fn in fns.items()}  # warm-up
  times = {name: [] for name in fns}
  for _ in range(args.runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      losses[name] = fn()
      times[name].append(time.perf_counter() - start)
  med = {name: statistics.median(v) for name, v in times.items()}
  peak = peak_tflops(device, args.dtype)
  mfu = flops / med["ours"] / (peak * 1e12) if peak else None
  stats = device.memory_stats() or {}
  mem = stats.get("peak_bytes_in_use")
  print(f"  ours: {med['ours']:.3f} s/step (runs {', '.join(f'{t:.3f}' for t in times['ours'])}), "
        f"{args.batch / med['ours']:.2f} images/s, compile {compile_s:.1f} s, loss {losses['ours']:.4f}")
  print(f"  analytic {flops / 1e12:.4g} TFLOP/step, {flops / med['ours'] / 1e12:.4g} TFLOP/s, MFU "
        f"{'%.1f%%' % (100 * mfu) if mfu is not None else 'n/a'} (peak "
        f"{'%.0f TFLOP/s' % peak if peak else 'n/a for ' + device.device_kind}), peak device memory "
        f"{'%.2f GiB' % (mem / 2**30) if mem else 'n/a'}, process max RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
  ratio = None
  if args.vs_torch:
    ratio = med["ours"] / med["torch"]
    tmem = torch_peak()
    print(f"  torch: {med['torch']:.3f} s/step (runs {', '.join(f'{t:.3f}' for t in times['torch'])}), "
          f"{args.batch / med['torch']:.2f} images/s, loss {losses['torch']:.4f}"
          + (f", peak memory {tmem / 2**30:.2f} GiB" if tmem else ""))
    print(f"  ratio ours/torch (median step time): {ratio:.2f}")
  if args.table_row:
    print(f"| train step {args.size} {args.resolution}px b{args.batch} {args.dtype} "
          f"ma={'on' if args.multiple_attention else 'off'}{'' if args.remat == 'none' else ' remat=' + args.remat} | "
          f"{med['ours']:.3f} s | "
          f"{args.batch / med['ours']:.2f} img/s | {flops / 1e12:.4g} TFLOP | "
          f"{'%.1f%%' % (100 * mfu) if mfu is not None else 'n/a'} | "
          f"{'%.2f GiB' % (mem / 2**30) if mem else 'n/a'} | "
          f"{'%.2f' % ratio if ratio is not None else '-'} |")


if __name__ == "__main__":
  main()
