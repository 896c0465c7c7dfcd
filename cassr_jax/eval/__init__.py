"""Evaluation: metrics (JAX, pyiqa as a second backend), reports in the paper's Table-1 layout, comparison
grids and an HTML page, and the benchmark protocol runner.

Submodules are imported on use (`from cassr_jax.eval import evaluate`), so importing the package loads no
metric network.
"""
