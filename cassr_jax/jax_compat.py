"""Work-arounds that touch jax internals, kept in one place and each covered by a test that it still works.

eval_shape: nnx.eval_shape of a large model is quadratic in the number of parameters, because every nnx RNG
draw probes `getattr(tracer, "sharding", None)` and jax builds that AttributeError's message by walking the
whole jaxpr traced so far, only for the message to be discarded. Blanking the message while building makes the
trace linear (a small U-Net: ~20 s -> ~4 s). If jax moves the private hook, we fall back to the slow path.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

from flax import nnx


@contextlib.contextmanager
def quiet_tracer_origins():
  """While active, tracer errors carry no origin text (the only thing lost)."""
  try:
    from jax._src.interpreters import partial_eval  # pylint: disable=import-outside-toplevel
    cls = partial_eval.DynamicJaxprTracer
    original = cls.__dict__["_origin_msg"]
  except (ImportError, AttributeError, KeyError):  # jax internals moved: fall back to the slow path
    yield False
    return
  cls._origin_msg = lambda self: ""
  try:
    yield True
  finally:
    cls._origin_msg = original


def eval_shape(fn: Callable[[], nnx.Module]) -> nnx.Module:
  """nnx.eval_shape(fn) in linear time (see the module docstring)."""
  with quiet_tracer_origins():
    return nnx.eval_shape(fn)
