"""Benchmark CasSR inference: seconds per image and images/s (compile time apart), optional torch comparison.

  python scripts/bench/infer.py --model tiny --lr-size 32 --steps 20 --batch 1 4
  python scripts/bench/infer.py --model tiny --lr-size 64 --steps 20 --no-multiple-attention --vs-torch
  python scripts/bench/infer.py --model sd --lr-size 128 --steps 20 50 --batch 1 8   # 128 -> 512 x4 (GPU)
  python scripts/bench/infer.py --model tiny --memory 1024 2048                      # peak memory, tiled

Random weights (tiny or SD-1.5 sized) built in torch (diffusers U-Net + ControlNet, VAE, transformers CLIP)
and converted, so --vs-torch runs diffusers' StableDiffusionControlNetPipeline on the same weights, sampler
(DPM-Solver++ 2M), steps, CFG and output size in this process. For that comparison our CasSR runs with
multiple attention off and the LR as the ControlNet input (SD + ControlNet: the same work), from pure noise,
no colour fix and no tiling. --memory prints XLA's memory analysis of the whole stage-2 program (weights,
inputs, temporaries) per output size, with latent and VAE tiling on.
"""
from __future__ import annotations

import argparse
import json
import os
import string
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from cassr_jax.convert.strict import load_torch_state
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import clip_text as clip_text_module
from cassr_jax.models import vae as vae_module
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
SD = dict(unet=dict(), hint=(16, 32, 96, 256),
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
  vae_module.load_state_dict(vae, numpy_state(vae_t))
  text = eval_shape(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(text_t.config.to_dict()),
                                          attention=attention, rngs=nnx.Rngs(0)))
  clip_text_module.load_state_dict(text, numpy_state(text_t))
  return CasSRPipeline(model, vae, text, tokenizer, _bicubic(), activation_config={"name": "bicubic"},
                       settings=settings)


def _bicubic():
  from cassr_jax.activation import build_activation  # pylint: disable=import-outside-toplevel
  return build_activation("bicubic", scale=4)


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
  return {"compile_s": first - run, "s_per_batch": run, "s_per_image": run / batch, "images_per_s": batch / run}


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
  run = float(np.median(times))
  return {"s_per_batch": run, "s_per_image": run / batch, "images_per_s": batch / run}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("tiny", "sd"), default="tiny")
  parser.add_argument("--lr-size", type=int, default=32, help="LR side; the output is 4x")
  parser.add_argument("--steps", type=int, nargs="+", default=[20])
  parser.add_argument("--batch", type=int, nargs="+", default=[1])
  parser.add_argument("--cfg", type=float, default=5.5)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--no-multiple-attention", action="store_true", help="SD + ControlNet work only")
  parser.add_argument("--vs-torch", action="store_true")
  parser.add_argument("--memory", type=int, nargs="*", default=None, help="output sides for --memory")
  parser.add_argument("--tile", type=int, default=64, help="latent tile (and VAE tile) for --memory")
  parser.add_argument("--json", default=None)
  parser.add_argument("--table-row", action="store_true", help="also print '| ... |' rows (scripts/bench/gpu.sh)")
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)

  spec = TINY if args.model == "tiny" else SD
  results = {"model": args.model, "backend": jax.default_backend(), "devices": len(jax.local_devices())}
  with tempfile.TemporaryDirectory() as tok_dir:
    vocab = write_letter_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.model_max_length = 77  # diffusers pads to it; a bare vocab folder leaves it unset
    parts = torch_models(spec, vocab)
    same_work = args.vs_torch or args.no_multiple_attention
    settings = Settings(prompt="clean", negative_prompt="blur", guidance_scale=args.cfg, scale=4.0,
                        latent_tile=None, vae_tile=None, color_fix="none" if same_work else "adain",
                        start_from_lr=not same_work)
    pipe = our_pipeline(parts, tokenizer, multiple_attention=not same_work, attention=args.attention,
                        settings=settings)
    if args.memory:
      mem = {}
      for side in args.memory:
        mem[side] = pipe.compiled_memory(1, side, side, steps=2, latent_tile=args.tile, latent_overlap=16,
                                         vae_tile=args.tile, tile_batch=1)
        print(f"memory {side}x{side}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem[side].items()))
      sides = sorted(mem)
      ratio = mem[sides[-1]]["total"] / mem[sides[0]]["total"]
      print(f"peak memory ratio {sides[-1]} / {sides[0]}: {ratio:.3f}")
      results["memory"] = {str(k): v for k, v in mem.items()}
      results["memory_ratio"] = ratio
    runs = []
    for steps in args.steps:
      for batch in args.batch:
        row = {"steps": steps, "batch": batch, "ours": time_ours(pipe, args.lr_size, batch, steps, args.repeats)}
        if args.vs_torch:
          row["torch"] = time_torch(parts, tokenizer, args.lr_size, batch, steps, args.cfg, args.repeats)
          row["ratio_ours_over_torch"] = row["ours"]["s_per_image"] / row["torch"]["s_per_image"]
        o = row["ours"]
        line = (f"{args.lr_size}->{4 * args.lr_size} steps {steps} batch {batch}: ours {o['s_per_image']:.3f} s/image "
                f"({o['images_per_s']:.2f} images/s, compile {o['compile_s']:.1f} s)")
        if args.vs_torch:
          line += (f"; torch {row['torch']['s_per_image']:.3f} s/image; ratio ours/torch "
                   f"{row['ratio_ours_over_torch']:.2f}")
        print(line, flush=True)
        if args.table_row:
          ratio = f"{row['ratio_ours_over_torch']:.2f}" if args.vs_torch else ""
          print(f"| infer {args.model} {args.lr_size}->{4 * args.lr_size}, {steps} steps, CFG {args.cfg}, "
                f"batch {batch} | {o['s_per_image']:.3f} s/image (compile {o['compile_s']:.0f} s) | "
                f"{o['images_per_s']:.2f} | | | | {ratio} |", flush=True)
        runs.append(row)
    results["runs"] = runs
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
