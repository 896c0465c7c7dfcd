"""The optax optimizer of config.train: global-norm clipping, Adam/AdamW, linear warmup then a schedule."""
from __future__ import annotations

import optax


def learning_rate_schedule(train) -> optax.Schedule:
  """Linear warmup from 0 over warmup_steps, then constant, cosine or linear decay to 0 at train.steps."""
  lr, warmup, steps = float(train.learning_rate), int(train.warmup_steps), int(train.steps)
  rest = max(steps - warmup, 1)
  if train.lr_schedule == "constant":
    after = optax.constant_schedule(lr)
  elif train.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, rest)
  elif train.lr_schedule == "linear":
    after = optax.linear_schedule(lr, 0.0, rest)
  else:
    raise ValueError(f"train.lr_schedule={train.lr_schedule!r}: unknown")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(train)
  parts = []
  if float(train.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(train.grad_clip)))
  if train.optimizer == "adam":
    parts.append(optax.adam(schedule, b1=float(train.b1), b2=float(train.b2)))
  elif train.optimizer == "adamw":
    parts.append(optax.adamw(schedule, b1=float(train.b1), b2=float(train.b2),
                             weight_decay=float(train.weight_decay)))
  else:
    raise ValueError(f"train.optimizer={train.optimizer!r}: unknown")
  return optax.chain(*parts), schedule
