"""SD-1.5 U-Net forward: ours (JAX, jit over nnx.split/merge) vs diffusers' PyTorch U-Net, same process.

  python scripts/bench/unet_forward.py                    # 64x64 latent, batch 1, fp32, 5 runs each
  python scripts/bench/unet_forward.py --breakdown        # also per-module totals (what bounds the ratio)
  python scripts/bench/unet_forward.py --threads 1        # both single-threaded (pin with taskset -c N)

Random weights (diffusers' default UNet2DConditionModel with SD-1.5's 768-wide text context). Runs are
interleaved (ours, torch, ours, ...) so background load hits both alike; prints medians, the ratio and the
XLA compile time separately. Both use every core of the machine (torch's intra-op threads, XLA's pool)
unless --threads 1. Each run's process CPU time is recorded beside its wall time: on a machine shared with
other jobs the wall times of both scatter widely, and the CPU-time ratio is the steadier comparison of work.

--breakdown times every distinct (module, input shape) of the U-Net in both frameworks (our modules are
found by the torch module's name, since our attribute paths mirror diffusers') and prints, per kind of
module, the time summed over the whole forward.

Measured (2-core AMD EPYC VM shared with other jobs; jax 0.10.2, torch 2.13.0 CPU; random weights):
  2 cores, quiet (load ~1.5): ours 6.94 s vs torch 6.78 s median: 1.02x (mins 0.95x, CPU time 0.96x);
  1 core (taskset, --threads 1): ours 13.10 s vs torch 14.08 s: 0.93x (CPU time 0.94x);
  XLA compile 10-19 s; output within 4e-6 of torch's (relative to its max).
  Under heavy background load the wall-time ratio scatters (0.66-1.11x seen): torch's threads suffer more.
What bounded it (--breakdown, per-kind sums, 2 cores): before, XLA's CPU convolution was 1.3-2.3x torch's
at SD's 16x16 and 8x8 levels (weights dominate there) and 1x1 convolutions were 1.2-1.5x; cassr_jax.nn.
layers now runs those as one matmul on CPU (0.4-0.8x torch), which took the whole forward from 1.18x to
0.93x single-threaded. Now: resnets 0.89x overall, but the 3x3 convolutions at 64x64 and 32x32 (XLA's
Eigen convolution) remain 1.1-1.3x torch's oneDNN and are the main bound; self-attention 1.05x (blockwise,
exp-bound: 134M exponentials per 4096-token layer); cross-attention 1.04x; GroupNorm ~2x torch but <2% of
the time. XLA CPU flags tried (--xla_cpu_use_xnnpack, --xla_cpu_use_onednn): no measurable change on the
convolutions, so none is set. Rejected: Winograd F(2,3) and 9-shifted-matmul convolutions (slower in XLA).
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import time

import sys

if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1] == "1":
  # XLA's intra-op threads are fixed when the backend starts, so this must precede the jax import.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from cassr_jax.convert.strict import load_torch_state  # noqa: E402
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402


def build(latent: int, attention: str):
  from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  torch_model = TorchUNet(cross_attention_dim=768, sample_size=latent).eval()
  config = UNetConfig.from_diffusers(dict(torch_model.config))
  ours = nnx.eval_shape(lambda: UNet2DConditionModel(config, attention=attention, rngs=nnx.Rngs(0)))
  load_torch_state(ours, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
                   source="diffusers unet")
  gc.collect()
  return torch_model, ours


def jit_module(module, *example_args):
  """jit over split/merge: parameters are arguments (as in training/sampling), not baked constants."""
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
  start = time.perf_counter()
  compiled = fn.lower(state, *example_args).compile()
  return (lambda *a: compiled(state, *a)), time.perf_counter() - start


def interleaved(fns: dict, runs: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Wall and process-CPU seconds of each run, alternating between the functions."""
  wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      fn()
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return wall, cpu


def whole_model(torch_model, ours, latent: int, batch: int, runs: int):
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)
  context = rng.standard_normal((batch, 77, 768)).astype(np.float32)
  t = np.full((batch,), 500, np.int64)
  args = (jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context))
  forward, compile_s = jit_module(ours, *args)
  torch_args = (torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context))

  def run_torch():
    with torch.no_grad():
      return torch_model(*torch_args).sample

  def run_ours():
    return forward(*args).block_until_ready()

  run_ours(), run_torch()  # warm-up (first-run allocations, thread pools)
  times, cpu = interleaved({"ours": run_ours, "torch": run_torch}, runs)
  out = np.asarray(run_ours()).transpose(0, 3, 1, 2)
  ref = run_torch().numpy()
  err = float(np.abs(out - ref).max() / np.abs(ref).max())
  med = {k: statistics.median(v) for k, v in times.items()}
  med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
  runs_s = {k: ", ".join("%.2f" % x for x in v) for k, v in times.items()}
  attention = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.attention
  print(f"SD-1.5 U-Net forward, {latent}x{latent} latent, batch {batch}, fp32, {runs} interleaved runs each")
  print(f"  ours (jax {jax.__version__}, {jax.default_backend()}, attention={attention}): "
        f"median {med['ours']:.3f} s  (min {min(times['ours']):.3f}; runs {runs_s['ours']}; "
        f"CPU {med_cpu['ours']:.2f} s)")
  print(f"  torch {torch.__version__} ({torch.get_num_threads()} threads): median {med['torch']:.3f} s  "
        f"(min {min(times['torch']):.3f}; runs {runs_s['torch']}; CPU {med_cpu['torch']:.2f} s)")
  print(f"  ratio ours/torch: medians {med['ours'] / med['torch']:.2f}, mins "
        f"{min(times['ours']) / min(times['torch']):.2f}, CPU time {med_cpu['ours'] / med_cpu['torch']:.2f}   "
        f"XLA compile: {compile_s:.1f} s   rel max err vs torch: {err:.1e}")


def breakdown(torch_model, ours, latent: int, batch: int, runs: int, cpu_time: bool):
  """Per-module-kind totals: each distinct (module, input shapes) timed in isolation in both frameworks
  (median wall seconds, or process CPU seconds with cpu_time)."""
  from diffusers.models.attention_processor import Attention  # pylint: disable=import-outside-toplevel
  from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D  # pylint: disable=import-outside-toplevel
  from diffusers.models.transformers.transformer_2d import Transformer2DModel  # pylint: disable=import-outside-toplevel
  kinds = {ResnetBlock2D: "resnet", Transformer2DModel: "transformer", Downsample2D: "downsample",
           Upsample2D: "upsample", Attention: "attention"}
  calls = []  # (kind, name, args as numpy)
  hooks = []
  for name, module in torch_model.named_modules():
    kind = kinds.get(type(module))
    if kind is None:
      continue
    if kind == "attention":
      kind = "self-attention" if name.endswith("attn1") else "cross-attention"

    def hook(mod, args, kwargs, kind=kind, name=name):
      hidden = args[0] if args else kwargs["hidden_states"]
      extra = None  # temb for resnets, the text context for transformers and cross-attention
      if kind in ("resnet", "transformer", "cross-attention"):
        extra = args[1] if len(args) > 1 else kwargs.get("temb" if kind == "resnet" else "encoder_hidden_states")
      calls.append((kind, name, hidden.numpy().copy(), None if extra is None else extra.numpy().copy()))
    hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
  rng = np.random.default_rng(0)
  with torch.no_grad():
    torch_model(torch.from_numpy(rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)),
                torch.tensor([500] * batch), torch.from_numpy(rng.standard_normal((batch, 77, 768)).astype(np.float32)))
  for h in hooks:
    h.remove()
  named = dict(torch_model.named_modules())
  # One timing per distinct (kind, module shape signature); multiplied by how often it occurs.
  groups = collections.OrderedDict()
  for kind, name, x, extra in calls:
    sig = (kind, x.shape, None if extra is None else extra.shape,
           tuple(p.shape for p in named[name].parameters()))
    groups.setdefault(sig, []).append((name, x, extra))
  totals = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for (kind, shape, _, _), members in groups.items():
    name, x, extra = members[0]
    tmod = named[name]
    omod = ours
    for part in name.split("."):
      omod = omod[int(part)] if part.isdigit() else getattr(omod, part)
    if kind == "self-attention" or kind == "cross-attention":
      t_args = (torch.from_numpy(x),) + (() if extra is None else (torch.from_numpy(extra),))
      o_args = (jnp.asarray(x),) + (() if extra is None else (jnp.asarray(extra),))
    elif kind == "resnet":
      t_args = (torch.from_numpy(x), torch.from_numpy(extra))
      o_args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(extra))
    elif kind == "transformer":
      t_args = (torch.from_numpy(x), torch.from_numpy(extra))
      o_args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(extra))
    else:
      t_args = (torch.from_numpy(x),)
      o_args = (jnp.asarray(x.transpose(0, 2, 3, 1)),)
    fn, _ = jit_module(omod, *o_args)

    def run_torch(tmod=tmod, t_args=t_args, kind=kind):
      with torch.no_grad():
        if kind == "transformer":
          return tmod(t_args[0], encoder_hidden_states=t_args[1])
        return tmod(*t_args)

    run_ours = lambda fn=fn, o_args=o_args: fn(*o_args).block_until_ready()
    run_ours(), run_torch()
    times, cpu = interleaved({"ours": run_ours, "torch": run_torch}, runs)
    o_s, t_s = statistics.median(times["ours"]), statistics.median(times["torch"])
    if cpu_time:
      o_s, t_s = statistics.median(cpu["ours"]), statistics.median(cpu["torch"])
    n = len(members)
    totals[kind][0] += n * o_s
    totals[kind][1] += n * t_s
    totals[kind][2] += n
    print(f"    {kind:15s} {str(shape):22s} x{n}: ours {o_s * 1e3:8.1f} ms  torch {t_s * 1e3:8.1f} ms  "
          f"({o_s / t_s:.2f}x)  e.g. {name}", flush=True)
  print("  per kind, summed over the forward (attention modules are part of the transformers):")
  for kind, (o_s, t_s, n) in totals.items():
    print(f"    {kind:15s} {n:3d} calls: ours {o_s:7.3f} s  torch {t_s:7.3f} s  ratio {o_s / t_s:.2f}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--latent", type=int, default=64, help="latent size (64 = 512x512 image)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "blockwise"))
  p.add_argument("--breakdown", action="store_true", help="also time each kind of module separately")
  p.add_argument("--breakdown-only", action="store_true", help="skip the whole-model timing")
  p.add_argument("--cpu-time", action="store_true", help="breakdown in process CPU seconds, not wall")
  p.add_argument("--threads", type=int, default=0, help="1: both single-threaded; 0: all cores")
  args = p.parse_args()
  if args.threads == 1:
    torch.set_num_threads(1)
  elif args.threads:
    p.error("--threads takes 0 (all cores) or 1")
  flags = os.environ.get("XLA_FLAGS", "")
  print(f"devices: {jax.devices()}; cpu count {os.cpu_count()}; XLA_FLAGS={flags!r}; "
        f"torch threads {torch.get_num_threads()}")
  torch_model, ours = build(args.latent, args.attention)
  if not args.breakdown_only:
    whole_model(torch_model, ours, args.latent, args.batch, args.runs)
  if args.breakdown or args.breakdown_only:
    breakdown(torch_model, ours, args.latent, args.batch, args.runs, args.cpu_time)


if __name__ == "__main__":
  main()
