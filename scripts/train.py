"""Train CasSR: python scripts/train.py --config configs/a100x8.py --workdir runs/x [--config.a.b=value ...]

A thin CLI over cassr_jax.train.loop.train_and_evaluate (also installed as `cassr-train`).
"""
from cassr_jax.cli.train import main

if __name__ == "__main__":
  main()
