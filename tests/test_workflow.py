"""The README's workflow on a tiny SD-1.5-shaped checkpoint, command by command, as a user types it:

  cassr-convert --source <diffusers dir> --out weights      (random-weight diffusers/transformers models)
  cassr-train --config configs/tiny.py --config.init.pretrained=weights ...
  cassr-infer lr/ --run run --out sr/
  cassr-eval --pred sr/ --gt hr/ --lq lr/

It is the only test that trains from converted weights (init.pretrained) rather than the random model built in
code, so it also proves the pretrained path of the trainer: the frozen VAE and CLIP are the converted ones,
the ControlNet starts as a copy of the converted U-Net's encoder, and the real CLIP BPE tokenizer is used.
"""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as TorchUNet

from test_convert import _randomize, write_pipeline
from test_train_loop import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HR = 64  # px; LR 16 (x4)

# SD-1.5's structure in miniature (as the tiny random model): VAE x8, a cross-attention level and a plain one.
UNET = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
VAE = dict(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
           sample_size=HR)


def clip_tokenizer_files(directory):
  """A real CLIP byte-level BPE tokenizer with no merges: every byte is a token (512 + 2 special tokens)."""
  # GPT-2/CLIP's byte -> unicode map: printable bytes map to themselves, the others to 256 + n in byte order.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
  others = [b for b in range(256) if b not in printable]
  chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
  tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
  return len(tokens)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
  """Runs the four commands once; returns the folders they wrote."""
  root = tmp_path_factory.mktemp("workflow")
  # A diffusers SD folder with random weights, as `save_pretrained` writes it.
  source = str(root / "sd-tiny")
  tokenizer_dir = str(root / "tok")
  vocab = clip_tokenizer_files(tokenizer_dir)
  torch.manual_seed(0)
  clip = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
                                     eos_token_id=vocab - 1, pad_token_id=vocab - 1)
  models = {"unet": _randomize(TorchUNet(**UNET), 0, std=0.05), "vae": _randomize(TorchVAE(**VAE), 1, std=0.05),
            "text_encoder": _randomize(transformers.CLIPTextModel(clip), 2, std=0.05)}
  write_pipeline(source, models, tokenizer=False)
  os.rename(tokenizer_dir, os.path.join(source, "tokenizer"))
  DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(source, "scheduler"))
  # Photos: 6 HR for training; 2 held out (HR for evaluation, their x4 area-downscaled LR for inference).
  hr, test_hr, lr = root / "hr", root / "test_hr", root / "lr"
  for folder in (hr, test_hr, lr):
    folder.mkdir()
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:HR, 0:HR] / HR
  for i in range(8):
    img = np.stack([np.sin(x * (i + 1) * 3), np.cos(y * (i + 2) * 2), x * y], -1) * 0.5 + 0.5
    img = (np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1) * 255).astype(np.uint8)
    cv2.imwrite(str((test_hr if i < 2 else hr) / f"{i}.png"), img[..., ::-1])
    if i < 2:
      cv2.imwrite(str(lr / f"{i}.png"), cv2.resize(img, (HR // 4, HR // 4), interpolation=cv2.INTER_AREA)[..., ::-1])

  env = environment(str(root / "xla_cache"), devices=1)
  weights, run, sr, ev = (str(root / n) for n in ("weights", "run", "sr", "eval"))
  commands = {
      "convert": ["convert_weights.py", "--source", source, "--out", weights],
      "train": ["train.py", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.init.random=",
                f"--config.init.pretrained={weights}", f"--config.data.sources=folder:{hr}",
                "--config.train.steps=2", "--config.train.checkpoint_every=2", "--workdir", run],
      "infer": ["infer.py", str(lr), "--run", run, "--out", sr, "--steps", "2", "--no-progress"],
      "eval": ["evaluate.py", f"--pred={sr}", f"--gt={test_hr}", f"--lq={lr}", f"--out={ev}", "--metrics=psnr,ssim"],
  }
  logs = {}
  for name, args in commands.items():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", args[0]), *args[1:]], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name}: {' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    logs[name] = result.stdout + result.stderr
  return dict(source=source, weights=weights, run=run, sr=sr, eval=ev, hr=str(hr), lr=str(lr), logs=logs)


def test_convert_writes_every_component(workflow):
  for component in ("unet", "vae", "text_encoder", "tokenizer"):
    assert os.listdir(os.path.join(workflow["weights"], component)), component
  with open(os.path.join(workflow["weights"], "scheduler_config.json")) as f:
    assert json.load(f)["beta_schedule"] == "scaled_linear"


def test_training_from_converted_weights_uses_them(workflow):
  """The run trained 2 steps from the converted weights; its frozen VAE and text encoder are the converted ones
  and the ControlNet started as a copy of the converted U-Net's encoder."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from cassr_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from cassr_jax.train import loop  # pylint: disable=import-outside-toplevel
  from cassr_jax.train.components import build_components  # pylint: disable=import-outside-toplevel
  from cassr_jax.train.checkpointing import read_run_config  # pylint: disable=import-outside-toplevel

  with open(os.path.join(workflow["run"], loop.METRICS_FILE)) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert max(steps) == 2
  config = read_run_config(workflow["run"])
  assert config.init.pretrained == workflow["weights"] and not config.init.random
  parts = build_components(config, workflow["run"])
  for name, model in (("vae", parts.vae), ("text_encoder", parts.text_encoder)):
    converted = checkpoint.load_model(os.path.join(workflow["weights"], name))
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(converted, nnx.Param))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  unet = checkpoint.load_model(os.path.join(workflow["weights"], "unet"))
  np.testing.assert_array_equal(np.asarray(parts.model.controlnet.conv_in.kernel[...]),
                                np.asarray(unet.conv_in.kernel[...]))
  ids = parts.tokenizer(["a photo"], padding="max_length", max_length=77).input_ids[0]
  assert parts.tokenizer.convert_ids_to_tokens(ids[:8]) == [
      "<|startoftext|>", "a</w>", "p", "h", "o", "t", "o</w>", "<|endoftext|>"]


def test_infer_and_eval_outputs(workflow):
  outputs = sorted(os.listdir(workflow["sr"]))
  assert outputs == ["0.png", "1.png"]
  for name in outputs:
    image = cv2.imread(os.path.join(workflow["sr"], name))
    assert image.shape == (HR, HR, 3) and image.std() > 0
  with open(os.path.join(workflow["eval"], "summary.json")) as f:
    summary = {m["name"]: m["value"] for m in json.load(f)["metrics"]}
  assert np.isfinite(summary["psnr"]) and 0 < summary["ssim"] <= 1
