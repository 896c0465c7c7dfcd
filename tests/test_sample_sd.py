"""SD text-to-image end to end: tiny random diffusers models -> conversion -> our pipeline and CLI, checked
against diffusers' StableDiffusionPipeline on the same weights, prompt and starting noise."""
from __future__ import annotations

import json
import os
import runpy
import string

import numpy as np
import pytest
import torch
from conftest import relative_max_error
from test_convert import tiny_torch_models, write_pipeline
from test_schedulers import SD15_SCHEDULER

from cassr_jax.convert import diffusers as dconv
from cassr_jax.data import images
from cassr_jax.pipelines import sd
from cassr_jax.schedulers import load_schedule_config

SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 8x8 latents
SCHEDULER = dict(SD15_SCHEDULER, timestep_spacing="trailing")  # not SD-1.5's default: shows the file is read
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]


def write_tokenizer(directory):
  """A tiny CLIP BPE vocabulary (62 tokens, fits the tiny text encoder's 64) padding to 12 tokens."""
  tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
  tokens += [m.replace(" ", "") for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 12}, f)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(torch models, source pipeline dir, converted dir)."""
  models = tiny_torch_models()
  with torch.no_grad():  # random cross-attention barely moves the tiny U-Net: amplify it so the text matters
    for name, module in models["unet"].named_modules():
      if name.endswith("attn2"):
        module.to_v.weight.mul_(30.0)
        module.to_out[0].weight.mul_(10.0)
  source = write_pipeline(tmp_path_factory.mktemp("src") / "pipe", models, tokenizer=False)
  write_tokenizer(os.path.join(source, "tokenizer"))
  os.makedirs(os.path.join(source, "scheduler"))
  with open(os.path.join(source, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(SCHEDULER, f)
  out = str(tmp_path_factory.mktemp("out") / "sd")
  dconv.convert(source, out)
  return models, source, out


def test_conversion_copies_the_scheduler_config(converted):
  _, _, out = converted
  with open(os.path.join(out, "scheduler_config.json")) as f:
    assert json.load(f) == SCHEDULER
  assert load_schedule_config(out).timestep_spacing == "trailing"
  assert "scheduler/scheduler_config.json" in dconv.hub_allow_patterns(["unet"], None, ".safetensors")


# Shared by both tests below, so the compiled program is built once.
SETTINGS = dict(sampler="ddim", steps=3, guidance_scale=3.0, negative_prompt="a dog")


def test_text_to_image_matches_diffusers_pipeline(converted, rng):
  import diffusers  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel
  models, source, out = converted
  unet, vae, text_encoder, tokenizer, schedule = sd.load_sd(out)
  noise = rng.standard_normal((1, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
  ours = sd.generate(unet, vae, text_encoder, tokenizer, "a cat", schedule=schedule, noise=noise, height=SIZE,
                     width=SIZE, **SETTINGS)
  pipe = diffusers.StableDiffusionPipeline(
      vae=models["vae"], text_encoder=models["text_encoder"], unet=models["unet"],
      tokenizer=CLIPTokenizer.from_pretrained(os.path.join(source, "tokenizer")),
      scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)

  def reference(guidance_scale):
    with torch.no_grad():
      return pipe("a cat", negative_prompt="a dog", num_inference_steps=3, guidance_scale=guidance_scale,
                  height=SIZE, width=SIZE, latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
                  output_type="np").images

  guided = reference(SETTINGS["guidance_scale"])
  assert ours.shape == guided.shape == (1, SIZE, SIZE, 3)
  assert ((guided > 0.01) & (guided < 0.99)).mean() > 0.5  # a real comparison, not two clipped images
  error = relative_max_error(ours, guided)
  assert error < 1e-4
  # the prompts and the guidance really shape the image, far beyond the parity error
  guidance_effect = relative_max_error(reference(1.0), guided)
  assert guidance_effect > 100 * max(error, 1e-6)
  print(f"\nSD text-to-image vs diffusers: relative error {error:.2e} (guidance changes the image by "
        f"{guidance_effect:.2e})")


def test_sample_sd_cli_writes_a_png(converted, tmp_path):
  main = runpy.run_path(os.path.join(REPO, "scripts", "sample_sd.py"))["main"]
  _, _, out = converted
  target = tmp_path / "img" / "cat.png"
  args = ["--weights", out, "--prompt", "a cat", "--negative-prompt", SETTINGS["negative_prompt"],
          "--steps", str(SETTINGS["steps"]), "--sampler", SETTINGS["sampler"],
          "--cfg", str(SETTINGS["guidance_scale"]), "--seed", "1", "--size", str(SIZE), "--out", str(target)]
  assert main(args) == 0
  image = images.read_image(str(target))
  assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
  assert sorted(os.listdir(target.parent)) == ["cat.png"]  # no temporary file left behind
  with pytest.raises(SystemExit, match="missing"):
    main(["--weights", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.png")])
