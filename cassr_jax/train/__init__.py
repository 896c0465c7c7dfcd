"""CasSR training: run config -> models (components), optimizer (optim), jitted sharded step (step),
orbax checkpoints (checkpointing), the loop with logging (loop.train_and_evaluate) and its CLI (cli)."""
