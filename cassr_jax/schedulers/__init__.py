"""Diffusion schedules and samplers in JAX (pure functions over host-computed tables)."""
from cassr_jax.schedulers.schedule import (NoiseSchedule, ScheduleConfig, add_noise, inference_timesteps,
                                           load_schedule_config, make_schedule, predict_x0, training_target)

__all__ = ["NoiseSchedule", "ScheduleConfig", "add_noise", "inference_timesteps", "load_schedule_config",
           "make_schedule", "predict_x0", "training_target"]
