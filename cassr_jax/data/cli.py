"""The shared tail of the data-preparation command lines (scripts/make_paired_data.py, prepare_*.py)."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from cassr_jax.data.images import ImageError
from cassr_jax.data.sources import DataError


def run_job(job: Callable[[], dict]) -> int:
  """Runs job() with INFO logging; prints its result as one JSON line (exit code 0), or a data error as
  'error: ...' on stderr (exit code 2)."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    result = job()
  except (DataError, ImageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0
