"""CasSR in JAX / Flax NNX."""
