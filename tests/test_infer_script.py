"""scripts/infer.py in CasSR mode on a tiny exported pipeline: folders, bad files, skipping, two processes."""
import logging
import os
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest

from cassr_jax.data import images
from conftest import TEST_XLA_FLAGS
from test_pipeline import make_tiny_pipeline_dir

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "infer.py")


@pytest.fixture(scope="module")
def infer_main():
  return runpy.run_path(SCRIPT)["main"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer")
  pipeline = make_tiny_pipeline_dir(str(root / "cassr"))
  lr = root / "lr"
  (lr / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name in ("a.png", "b.png", "sub/c.png", "sub/d.png"):
    images.write_png(str(lr / name), (rng.random((10, 12, 3)) * 255).astype(np.uint8))
  (lr / "broken.png").write_bytes(b"not a png")
  return pipeline, str(lr), root


def test_folder_bad_file_skip_existing(infer_main, setup, tmp_path, caplog):
  pipeline, lr, _ = setup
  out = str(tmp_path / "sr")
  args = [lr, "--pipeline", pipeline, "--out", out, "--steps", "1", "--no-progress", "--attention", "xla"]
  with caplog.at_level(logging.INFO):
    assert infer_main(args) == 1  # the broken file fails; the others are written
  assert "broken.png" in caplog.text
  written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
  assert written == ["a.png", "b.png", "sub/c.png", "sub/d.png"]
  assert images.read_image(os.path.join(out, "a.png")).shape == (20, 24, 3)
  before = os.path.getmtime(os.path.join(out, "a.png"))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert infer_main([os.path.join(lr, "*.png"), "--pipeline", pipeline, "--out", out, "--steps", "1",
                       "--no-progress", "--attention", "xla"]) == 1
  assert "0 written, 2 kept, 1 failed" in caplog.text
  assert os.path.getmtime(os.path.join(out, "a.png")) == before
  # Never over an input: writing next to the inputs refuses the file that would be replaced.
  assert infer_main([os.path.join(lr, "a.png"), "--pipeline", pipeline, "--out", lr, "--steps", "1",
                     "--no-progress", "--attention", "xla"]) == 1
  assert "would overwrite the input" in caplog.text


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_split_a_folder(setup, tmp_path):
  pipeline, lr, _ = setup
  broken = os.path.join(lr, "broken.png")
  if os.path.exists(broken):
    os.remove(broken)  # this test checks the split between processes, not failures
  out = str(tmp_path / "sr2")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS.replace("device_count=8", "device_count=2"), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, SCRIPT, lr, "--pipeline", pipeline, "--out", out, "--steps", "1", "--no-progress",
       "--attention", "xla", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
       str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "process 0/2: 2 written" in logs[0] and "process 1/2: 2 written" in logs[1], logs
  written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
  assert written == ["a.png", "b.png", "sub/c.png", "sub/d.png"]


def test_activation_option_is_one_config():
  """--activation [--weights] becomes one config dict for --pipeline and --run alike (None: the saved one)."""
  from cassr_jax.cli.infer import activation_config, parse_args  # pylint: disable=import-outside-toplevel
  assert activation_config(parse_args(["--pipeline", "p"])) is None
  assert activation_config(parse_args(["--run", "r", "--activation", "bicubic"])) == {"name": "bicubic"}
  assert activation_config(parse_args(["--pipeline", "p", "--activation", "rrdbnet", "--weights", "w.pth"])) == {
      "name": "rrdbnet", "weights": "w.pth"}
