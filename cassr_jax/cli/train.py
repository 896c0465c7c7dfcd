"""`cassr-train` / scripts/train.py: absl flags + an ml_collections config file.

  cassr-train --config configs/a100x8.py --config.train.steps=1000 --workdir runs/x
Rerunning the same command resumes from the latest checkpoint in --workdir. Multi-host: run it on every host;
jax.distributed starts from the cluster environment (SLURM, TPU) or from --config.distributed.* overrides.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (a Python file with get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # absl's default (INFO) prints ~50 orbax lines per checkpoint save; the trainer's own output is the bar,
    # its messages and metrics.jsonl. --verbosity=0 brings the library logs back.
    logging.set_verbosity(logging.WARNING)
  from cassr_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from cassr_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(f"cassr-train: {e}", file=sys.stderr)
    sys.exit(2)


def main():
  app.run(_main)


if __name__ == "__main__":
  main()
