"""The training loop: train_and_evaluate(config, workdir).

Every process runs the same program (jax.distributed for several hosts): each reads its own shard of the data
(per-host batch = train.batch_size / process count), the batches become global arrays split over the
(data, fsdp) mesh, and one jitted step updates the sharded state. Process 0 alone writes the progress bar,
TensorBoard events, metrics.jsonl and validation grids (LR | reference | sample | HR on a fixed batch, sampled
with config.sample's sampler and steps); every process takes part in checkpoint saves.

Stops: after train.steps; on SIGTERM/SIGINT (saves a checkpoint of the last finished step, returns); on a
non-finite loss or gradient norm (FloatingPointError naming the step; the step was not applied and no
checkpoint is written after it, so the last checkpoint stays good).
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from cassr_jax import parallel
from cassr_jax.config import validate_config
from cassr_jax.data import pipeline
from cassr_jax.train import checkpointing
from cassr_jax.train.components import build_components
from cassr_jax.train.step import Trainer, model_batch, replicated

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------- distributed

def initialize_distributed(dist: ml_collections.ConfigDict) -> None:
  """jax.distributed from config.distributed, else from a cluster environment (SLURM, TPU pods, JAX_*)."""
  if jax.distributed.is_initialized():
    return
  address = str(dist.coordinator_address or "")
  if address:
    if not dist.num_processes or dist.process_id < 0:
      raise ValueError("distributed.coordinator_address needs distributed.num_processes and process_id")
    if int(dist.num_processes) > 1 and jax.config.jax_platforms in (None, "", "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, int(dist.num_processes), int(dist.process_id))
    return
  env = os.environ
  slurm_multi = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
  tpu_multi = bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if slurm_multi or tpu_multi or env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


# ------------------------------------------------------------------------------------------------- data

def host_data_config(config) -> ml_collections.ConfigDict:
  """config.data with the per-host batch (train.batch_size / process count) filled in."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.batch_size = int(config.train.batch_size) // jax.process_count()
  return data


def make_data_iterator(config):
  """This host's checkpointable iterator of training batches."""
  return pipeline.make_train_iterator(host_data_config(config), process_index=jax.process_index(),
                                      process_count=jax.process_count())


def validation_batch(config) -> dict[str, np.ndarray]:
  """A fixed batch, identical on every host (the first examples of the data as one process reads them)."""
  data = host_data_config(config)
  data.batch_size = int(config.train.val_images)
  data.num_workers = 0
  it = pipeline.make_train_iterator(data, process_index=0, process_count=1)
  return model_batch(next(it))


# ------------------------------------------------------------------------------------------------- logging

def _grid(rows: list[np.ndarray]) -> np.ndarray:
  """Images (B, H, W, 3) per column -> one uint8 grid, one example per row."""
  from cassr_jax.image_ops import to_uint8  # pylint: disable=import-outside-toplevel
  return to_uint8(np.concatenate([np.concatenate(list(col), axis=0) for col in rows], axis=1))


def write_png(path: str, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(path))
  os.close(fd)
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


INPUT_BOUND = 0.5  # warn once when more than this fraction of the time between two logs waits for data


class Logger:
  """Process 0's outputs: tqdm bar, TensorBoard (tensorboardX, no TensorFlow), metrics.jsonl.

  Between two logs it also reports `data_wait`, the fraction of the time this host spent blocked on the input
  pipeline (next(iterator)): near 0 when the accelerators set the pace (steps are dispatched asynchronously),
  near 1 when the data workers cannot keep up (the x4plus degradation costs ~60 CPU ms per 512 pair).
  """

  def __init__(self, workdir: str, total: int, initial: int, images_per_step: int, num_workers: int = 0,
               clock=time.perf_counter):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    self.workdir = workdir
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, smoothing=0.1)
    self.metrics = open(os.path.join(workdir, METRICS_FILE), "a")
    self.images_per_step = images_per_step
    self.num_workers = num_workers
    self.clock = clock
    self._last = None  # (time, step) of the previous log
    self._waited = 0.0  # seconds blocked on the input pipeline since the previous log
    self._warned = False

  def waited_for_data(self, seconds: float) -> None:
    self._waited += seconds

  def log(self, step: int, metrics: dict[str, float]) -> None:
    now = self.clock()
    if self._last is not None and step > self._last[1]:
      elapsed = now - self._last[0]
      step_time = elapsed / (step - self._last[1])
      data_wait = min(1.0, self._waited / elapsed) if elapsed > 0 else 0.0
      metrics = dict(metrics, step_time=step_time, images_per_s=self.images_per_step / step_time,
                     data_wait=data_wait)
      if data_wait > INPUT_BOUND and not self._warned:
        self._warned = True
        self.bar.write(f"cassr_jax.train: input-bound: {data_wait:.0%} of the time since the last log went to "
                       f"waiting for training data; more data workers (config.data.num_workers, now "
                       f"{self.num_workers}; each takes one core) or faster-decoding sources "
                       f"(scripts/prepare_train_data.py tiles) would speed training up")
    self._last = (now, step)
    self._waited = 0.0
    for k, v in metrics.items():
      self.writer.add_scalar(f"train/{k}", v, step)
    self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
    self.metrics.flush()
    shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}", "gnorm": f"{metrics['grad_norm']:.3f}"}
    if "step_time" in metrics:
      shown["s/step"] = f"{metrics['step_time']:.2f}"
      shown["img/s"] = f"{metrics['images_per_s']:.1f}"
      shown["data"] = f"{metrics['data_wait']:.0%}"
    self.bar.set_postfix(shown, refresh=False)

  def advance(self, n: int = 1) -> None:
    self.bar.update(n)

  def image(self, step: int, grid: np.ndarray) -> None:
    write_png(os.path.join(self.workdir, "images", f"val_{step:08d}.png"), grid)
    self.writer.add_image("val/lr_ref_sample_hr", grid, step, dataformats="HWC")

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
    self.metrics.close()


class _Stop:
  """SIGTERM / SIGINT -> a flag the loop polls after every step (a save, then a clean return)."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    print(f"cassr_jax.train: signal {signum}: saving a checkpoint and stopping", flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


# ---------------------------------------------------------------------------------------------------- loop

def _host(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Trains config (cassr_jax.config) in workdir, resuming from its latest checkpoint.

  Returns the host metrics of the steps run by this call: [{"step", "loss", "grad_norm", "lr"}, ...].
  """
  initialize_distributed(config.distributed)
  validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  if is_main:
    checkpointing.write_run_config(workdir, config)

  mesh = parallel.make_mesh_from_config(config.mesh)
  components = build_components(config, workdir)
  trainer = Trainer(config, components, mesh)
  del components
  data_iterator = make_data_iterator(config)
  checkpointer = checkpointing.Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
  start = checkpointer.latest_step()
  if start is None:
    state, start = trainer.init_state(), 0
  else:
    state = checkpointer.restore(start, trainer.abstract_state(), data_iterator)
    if is_main:
      print(f"cassr_jax.train: resumed from step {start} in {checkpointer.directory}", flush=True)
  if is_main:
    print(f"cassr_jax.train: {jax.device_count()} {jax.devices()[0].platform} devices on "
          f"{jax.process_count()} host(s), mesh {dict(mesh.shape)}, batch {int(config.train.batch_size)}, "
          f"steps {start}..{int(config.train.steps)}; the first step compiles (minutes at SD-1.5 size)",
          flush=True)

  t = config.train
  total = int(t.steps)
  val_every = int(t.val_every)
  val_batch = None
  if val_every:
    val_batch = parallel.place(validation_batch(config), replicated(mesh))
  logger = (Logger(workdir, total, start, int(t.batch_size), int(config.data.num_workers)) if is_main
            else None)
  history: list[dict[str, Any]] = []
  pending = None  # (step, device metrics) of the last dispatched step, read one step later

  def flush():
    nonlocal pending
    if pending is None:
      return
    step, metrics = pending
    pending = None
    values = _host(metrics)
    if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
      checkpointer.wait()
      raise FloatingPointError(
          f"non-finite loss {values['loss']} (grad norm {values['grad_norm']}) at step {step}; the step was "
          f"not applied; last good checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory}")
    history.append({"step": step, **values})
    if logger is not None and (step % int(t.log_every) == 0 or step == total):
      logger.log(step, values)

  def preview(step):
    out = jax.device_get(trainer.preview(state["params"], trainer.frozen, val_batch))
    if logger is not None:
      host = jax.device_get(val_batch)
      logger.image(step, _grid([host["lr_up"], out["ref"], out["sample"], host["hr"]]))

  step = start
  try:
    with _Stop() as stop:
      while step < total:
        waiting = time.perf_counter()
        host_batch = next(data_iterator)
        if logger is not None:
          logger.waited_for_data(time.perf_counter() - waiting)
        batch = parallel.host_local_to_global(model_batch(host_batch), mesh)
        state, metrics = trainer.step(state, trainer.frozen, batch)
        flush()
        step += 1
        pending = (step, metrics)
        if logger is not None:
          logger.advance()
        stopping = stop.any_process()
        if step % int(t.checkpoint_every) == 0 or step == total or stopping:
          flush()
          checkpointer.save(step, state, data_iterator)
        if val_every and (step % val_every == 0 or step == total):
          flush()
          preview(step)
        if stopping:
          break
      flush()
  finally:
    checkpointer.wait()
    checkpointer.close()
    if logger is not None:
      logger.close()
  return history
