"""Benchmark CasSR inference: seconds per image and images/s (compile time apart), optional torch comparison.

  python scripts/bench/infer.py --model tiny --lr-size 32 --steps 20 --batch 1 4
  python scripts/bench/infer.py --model tiny --lr-size 16 --steps 4 --vs-torch
  python scripts/bench/infer.py --sd15 --lr-size 128 --steps 20 50 --batch 1 8   # 128 -> 512 x4 (GPU)
  python scripts/bench/infer.py --sd15 --lr-size 64 --steps 20 --vs-torch       # 256 output vs diffusers
  python scripts/bench/infer.py --model tiny --memory 1024 2048                  # peak memory, tiled

Random weights (tiny or SD-1.5 sized: --sd15 = --model sd) built in torch (diffusers U-Net + ControlNet, VAE,
transformers CLIP) and converted, so --vs-torch runs diffusers' StableDiffusionControlNetPipeline (on CUDA
when torch has it) on the same weights, sampler (DPM-Solver++ 2M), steps, CFG and output size in this
process. For that comparison our CasSR runs with multiple attention off and the LR as the ControlNet input
(SD + ControlNet: the same work), from pure noise, no colour fix and no tiling ("ours"), and then as full
CasSR (multiple attention on the bicubic reference, LR start, AdaIN) ("full_cassr"); both ratios are
printed. --memory runs one tiled super-resolution (2 steps, CFG, full CasSR) per output side, each in a
fresh process, and reports the process's peak resident memory (above the memory after model load, too)
and XLA's memory analysis of the compiled program, and their ratios between the largest and smallest side.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import string
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from cassr_jax.convert.keys import load_clip_state_dict, load_vae_state_dict
from cassr_jax.convert.strict import load_torch_state
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models.cassr_unet import CasSRConfig, CasSRUNet
from cassr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from cassr_jax.models.controlnet import ControlNetConfig
from cassr_jax.models.unet import UNetConfig
from cassr_jax.models.vae import AutoencoderKL, VAEConfig
from cassr_jax.pipelines.cassr import CasSRPipeline, Settings
from cassr_jax.text import load_tokenizer

TINY = dict(unet=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, attention_head_dim=4,
                      cross_attention_dim=64, norm_num_groups=16,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
            hint=(16, 16, 32, 32), vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                                             norm_num_groups=16, latent_channels=4),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))
# SD-1.5's U-Net: diffusers' UNet2DConditionModel defaults except cross_attention_dim (768 = CLIP-L, not 1280).
SD = dict(unet=dict(cross_attention_dim=768, attention_head_dim=8), hint=(16, 32, 96, 256),
          vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4),
          text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))


def write_letter_tokenizer(directory: str) -> int:
  """A character-level CLIP BPE vocabulary (prompt content does not matter for timing)."""
  tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
  tokens += [",</w>", "<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  return len(tokens)


def torch_models(spec, vocab: int, seed: int = 0):
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKL as TorchVAE  # pylint: disable=import-outside-toplevel
  from diffusers import ControlNetModel, UNet2DConditionModel  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTextConfig as TorchCLIPConfig  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTextModel as TorchCLIP  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  unet_kw = dict(spec["unet"])
  unet = UNet2DConditionModel(**unet_kw).eval()
  cn_kw = {k: v for k, v in unet_kw.items() if k != "up_block_types"}
  controlnet = ControlNetModel(**cn_kw, conditioning_embedding_out_channels=spec["hint"]).eval()
  with torch.no_grad():  # random zero convolutions too, so the ControlNet does real work
    for p in controlnet.parameters():
      p.normal_(0, 0.02)
  vae = TorchVAE(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 **spec["vae"]).eval()
  text = TorchCLIP(TorchCLIPConfig(vocab_size=vocab, max_position_embeddings=77, **spec["text"])).eval()
  return unet, controlnet, vae, text


def numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def our_pipeline(torch_parts, tokenizer, *, multiple_attention: bool, attention: str, settings: Settings):
  unet_t, cn_t, vae_t, text_t = torch_parts
  unet_cfg = UNetConfig.from_diffusers(dict(unet_t.config))
  cn_cfg = ControlNetConfig.from_diffusers(dict(cn_t.config))
  config = CasSRConfig(unet=unet_cfg, controlnet=cn_cfg, multiple_attention=multiple_attention,
                       reference_source="activation" if multiple_attention else "lr")
  model = eval_shape(lambda: CasSRUNet(config, attention=attention, rngs=nnx.Rngs(0)))
  load_torch_state(model.unet, numpy_state(unet_t), source="unet")
  load_torch_state(model.controlnet, numpy_state(cn_t), source="controlnet")
  if multiple_attention:  # untrained projections are zero; random ones so the attention does its work
    rng = np.random.default_rng(0)
    state = nnx.state(model.multi_attention, nnx.Param)
    nnx.update(model.multi_attention, jax.tree.map(
        lambda a: jax.numpy.asarray(0.02 * rng.standard_normal(a.shape), a.dtype), nnx.to_pure_dict(state)))
  vae = eval_shape(lambda: AutoencoderKL(VAEConfig.from_diffusers(dict(vae_t.config)), attention=attention,
                                         rngs=nnx.Rngs(0)))
  load_vae_state_dict(vae, numpy_state(vae_t))
  text = eval_shape(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(text_t.config.to_dict()),
                                          attention=attention, rngs=nnx.Rngs(0)))
  load_clip_state_dict(text, numpy_state(text_t))
  return CasSRPipeline(model, vae, text, tokenizer, _bicubic(), activation_config={"name": "bicubic"},
                       settings=settings)


def _bicubic():
  from cassr_jax.activation import build_activation  # pylint: disable=import-outside-toplevel
  return build_activation("bicubic", scale=4)


def full_settings(cfg: float) -> Settings:
  """Full CasSR: multiple attention on the stage-1 reference, start from the noised LR latent, AdaIN colour
  fix, no tiling (tiles are set per call where wanted)."""
  return Settings(prompt="clean", negative_prompt="blur", guidance_scale=cfg, scale=4.0, latent_tile=None,
                  vae_tile=None, color_fix="adain", start_from_lr=True)


def _describe(t: dict) -> str:
  text = f"{t['s_per_image']:.3f} s/image ({t['images_per_s']:.2f} images/s"
  return text + (f", compile {t['compile_s']:.1f} s)" if "compile_s" in t else ")")


def time_ours(pipe, lr_size: int, batch: int, steps: int, repeats: int, **settings):
  rng = np.random.default_rng(0)
  images = [(rng.random((lr_size, lr_size, 3)) * 255).astype(np.uint8) for _ in range(batch)]
  t0 = time.perf_counter()
  pipe(images, steps=steps, batch_size=batch, **settings)
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    pipe(images, steps=steps, batch_size=batch, **settings)
    times.append(time.perf_counter() - t0)
  run = float(np.median(times))
  # compile_s: the first call's extra time over a steady call (an estimate: on a loaded machine the two calls'
  # noise can exceed the compile time of a program already in the persistent cache; never below 0).
  return {"compile_s": max(first - run, 0.0), "first_call_s": first, "s_per_batch": run, "s_per_image": run / batch,
          "images_per_s": batch / run}


def time_torch(torch_parts, tokenizer, lr_size: int, batch: int, steps: int, cfg: float, repeats: int):
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  unet_t, cn_t, vae_t, text_t = torch_parts
  scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon")
  pipe = StableDiffusionControlNetPipeline(vae=vae_t, text_encoder=text_t, tokenizer=tokenizer, unet=unet_t,
                                           controlnet=cn_t, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  pipe.to(device)
  size = 4 * lr_size
  rng = np.random.default_rng(0)
  hint = [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(batch)]
  kw = dict(prompt=["clean"] * batch, negative_prompt=["blur"] * batch, image=hint, num_inference_steps=steps,
            guidance_scale=cfg, height=size, width=size, output_type="np")
  with torch.inference_mode():
    pipe(**kw)  # warm-up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      pipe(**kw)
      times.append(time.perf_counter() - t0)
  pipe.to("cpu")
  run = float(np.median(times))
  return {"s_per_batch": run, "s_per_image": run / batch, "images_per_s": batch / run, "device": device}


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(pipe, side: int, tile: int) -> dict[str, float]:
  """Peak memory (MiB) of one tiled side x side super-resolution (2 steps, CFG) in this process.

  rss_base: resident memory after the models are built; rss_peak: the process's high-water mark while the
  program compiles and runs (VmHWM, reset after the models are built via /proc/self/clear_refs);
  rss_working = rss_peak - rss_base. xla_*: XLA's memory analysis of the same compiled program
  (arguments = weights + inputs, outputs, temporaries).
  """
  import gc  # pylint: disable=import-outside-toplevel
  settings = dict(steps=2, latent_tile=tile, latent_overlap=16, vae_tile=tile, tile_batch=1)
  rng = np.random.default_rng(0)
  lr = (rng.random((side // 4, side // 4, 3)) * 255).astype(np.uint8)
  gc.collect()
  with open("/proc/self/clear_refs", "w") as f:  # "5": reset the high-water mark to the current RSS
    f.write("5")
  base = _status_kib("VmRSS")
  out = pipe([lr], **settings)[0]
  peak = _status_kib("VmHWM")
  assert out.shape == (side, side, 3)
  xla = pipe.compiled_memory(1, side, side, **settings)
  mib = lambda kib: kib / 1024.0
  result = {"rss_base": mib(base), "rss_peak": mib(peak), "rss_working": mib(peak - base)}
  result.update({f"xla_{k}": v / 2**20 for k, v in xla.items()})
  return result


def memory_table(args) -> dict[str, dict[str, float]]:
  """Runs measure_memory for every side of args.memory, each in a fresh process, and prints the ratios."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  mem = {}
  for side in args.memory:
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--attention", args.attention,
           "--cfg", str(args.cfg), "--tile", str(args.tile), "--memory-child", str(side)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in done.stdout.splitlines() if l.startswith("MEMORY ")]
    if done.returncode or not lines:
      raise RuntimeError(f"memory run for {side}x{side} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    mem[side] = json.loads(lines[-1][len("MEMORY "):])
    m = mem[side]
    print(f"memory {side}x{side}: peak RSS {m['rss_peak']:.0f} MiB (after model load {m['rss_base']:.0f}, "
          f"working {m['rss_working']:.0f}); XLA estimate {m['xla_total']:.0f} MiB (arguments "
          f"{m['xla_arguments']:.0f}, outputs {m['xla_outputs']:.0f}, temporaries {m['xla_temporaries']:.0f})",
          flush=True)
  sides = sorted(mem)
  if len(sides) >= 2:
    lo, hi = mem[sides[0]], mem[sides[-1]]
    ratios = {k: hi[k] / lo[k] for k in ("rss_peak", "rss_working", "xla_total", "xla_temporaries")}
    print(f"peak memory ratio {sides[-1]} / {sides[0]}: process RSS {ratios['rss_peak']:.3f} (working "
          f"{ratios['rss_working']:.3f}), XLA estimate {ratios['xla_total']:.3f} (temporaries "
          f"{ratios['xla_temporaries']:.3f})", flush=True)
    if args.table_row:
      print(f"| tiled inference peak memory {args.model}, {sides[-1]}^2 vs {sides[0]}^2 | RSS {hi['rss_peak']:.0f} "
            f"vs {lo['rss_peak']:.0f} MiB ({ratios['rss_peak']:.3f}), XLA {hi['xla_total']:.0f} vs "
            f"{lo['xla_total']:.0f} MiB ({ratios['xla_total']:.3f}) | | | | | |", flush=True)
    mem["ratios"] = ratios
  return {str(k): v for k, v in mem.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("tiny", "sd"), default="tiny")
  parser.add_argument("--sd15", action="store_const", const="sd", dest="model", help="= --model sd")
  parser.add_argument("--lr-size", type=int, default=32, help="LR side; the output is 4x")
  parser.add_argument("--steps", type=int, nargs="+", default=[20])
  parser.add_argument("--batch", type=int, nargs="+", default=[1])
  parser.add_argument("--cfg", type=float, default=5.5)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--no-multiple-attention", action="store_true", help="SD + ControlNet work only")
  parser.add_argument("--vs-torch", action="store_true")
  parser.add_argument("--memory", type=int, nargs="*", default=None,
                      help="output sides: peak memory of tiled inference, each side in a fresh process")
  parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--tile", type=int, default=64, help="latent tile (and VAE tile) for --memory")
  parser.add_argument("--json", default=None)
  parser.add_argument("--table-row", action="store_true", help="also print '| ... |' rows (scripts/bench/gpu.sh)")
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)

  if args.memory:
    results = {"model": args.model, "memory": memory_table(args)}
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    return
  spec = TINY if args.model == "tiny" else SD
  results = {"model": args.model, "backend": jax.default_backend(), "devices": len(jax.local_devices())}
  with tempfile.TemporaryDirectory() as tok_dir:
    vocab = write_letter_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.model_max_length = 77  # diffusers pads to it; a bare vocab folder leaves it unset
    parts = torch_models(spec, vocab)
    same_work = args.vs_torch or args.no_multiple_attention
    if args.memory_child:
      pipe = our_pipeline(parts, tokenizer, multiple_attention=True, attention=args.attention,
                          settings=full_settings(args.cfg))
      print("MEMORY " + json.dumps(measure_memory(pipe, args.memory_child, args.tile)), flush=True)
      return
    runs = [{"steps": steps, "batch": batch} for steps in args.steps for batch in args.batch]
    # One pipeline at a time (at SD-1.5 size each holds ~6 GB of weights next to torch's).
    variants = [("ours", not same_work)] + ([("full_cassr", True)] if args.vs_torch else [])
    for name, multiple_attention in variants:
      if multiple_attention:
        settings = full_settings(args.cfg)
      else:  # SD + ControlNet work: the LR as the ControlNet input, from pure noise, no colour fix
        settings = Settings(prompt="clean", negative_prompt="blur", guidance_scale=args.cfg, scale=4.0,
                            latent_tile=None, vae_tile=None, color_fix="none", start_from_lr=False)
      pipe = our_pipeline(parts, tokenizer, multiple_attention=multiple_attention, attention=args.attention,
                          settings=settings)
      for row in runs:
        row[name] = time_ours(pipe, args.lr_size, row["batch"], row["steps"], args.repeats)
        print(f"{args.lr_size}->{4 * args.lr_size} steps {row['steps']} batch {row['batch']}: {name} "
              f"{_describe(row[name])}", flush=True)
      del pipe
      gc.collect()
    if args.vs_torch:
      for row in runs:
        row["torch"] = time_torch(parts, tokenizer, args.lr_size, row["batch"], row["steps"], args.cfg,
                                  args.repeats)
        for name, _ in variants:
          row[f"ratio_{name}_over_torch"] = row[name]["s_per_image"] / row["torch"]["s_per_image"]
        print(f"{args.lr_size}->{4 * args.lr_size} steps {row['steps']} batch {row['batch']}: torch "
              f"({row['torch']['device']}) {_describe(row['torch'])}; ratio ours (SD + ControlNet work) / torch "
              f"{row['ratio_ours_over_torch']:.2f}, full CasSR / torch {row['ratio_full_cassr_over_torch']:.2f}",
              flush=True)
    if args.table_row:
      for row in runs:
        o = row["ours"]
        what = "SD + ControlNet work" if same_work else "full CasSR"
        is_goal = args.model == "sd" and args.lr_size == 128 and row["steps"] == 20 and row["batch"] == 1
        goal_of = lambda t: (f"; goal < 0.5 s/image on one H100: {'met' if t['s_per_image'] < 0.5 else 'MISSED'}"
                             if is_goal else "")
        goal = "" if same_work else goal_of(o)
        ratio = f"{row['ratio_ours_over_torch']:.2f}" if args.vs_torch else ""
        print(f"| infer {args.model} {args.lr_size}->{4 * args.lr_size}, {row['steps']} steps, CFG {args.cfg}, "
              f"batch {row['batch']}, {what} | {o['s_per_image']:.3f} s/image (compile {o['compile_s']:.0f} s"
              f"{goal}) | {o['images_per_s']:.2f} | | | | {ratio} |", flush=True)
        if args.vs_torch:
          f = row["full_cassr"]
          print(f"| infer {args.model} {args.lr_size}->{4 * args.lr_size}, {row['steps']} steps, CFG {args.cfg}, "
                f"batch {row['batch']}, full CasSR | {f['s_per_image']:.3f} s/image (compile {f['compile_s']:.0f} s"
                f"{goal_of(f)}) "
                f"| {f['images_per_s']:.2f} | | | | {row['ratio_full_cassr_over_torch']:.2f} |", flush=True)
    results["runs"] = runs
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
