"""The jax-internals work-around in cassr_jax.jax_compat still takes effect with the installed jax."""
import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax import jax_compat


def test_quiet_tracer_origins_patches_and_restores():
  from jax._src.interpreters import partial_eval  # pylint: disable=import-outside-toplevel
  original = partial_eval.DynamicJaxprTracer.__dict__["_origin_msg"]
  seen = []

  def probe(x):
    seen.append(x._origin_msg())  # pylint: disable=protected-access
    return x

  with jax_compat.quiet_tracer_origins() as active:
    jax.make_jaxpr(probe)(jnp.ones(2))
  # If this fails, jax moved the private hook: eval_shape silently fell back to the quadratic path.
  assert active is True
  assert seen == [""]
  assert partial_eval.DynamicJaxprTracer.__dict__["_origin_msg"] is original


def test_eval_shape_builds_abstract_model():
  model = jax_compat.eval_shape(lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
  assert isinstance(model.kernel.value, jax.ShapeDtypeStruct) and model.kernel.value.shape == (3, 5)
