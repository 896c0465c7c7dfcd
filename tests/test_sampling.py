"""sampling.sample (the compiled loop, start points, strength) and cfg_denoiser."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import relative_max_error
from test_schedulers import SD15_SCHEDULER, diffusers_scheduler, fake_model

from cassr_jax import sampling
from cassr_jax.schedulers import schedule as schedule_lib

SHAPE = (2, 8, 8, 4)


def jnp_fake_model(x, t):
  """fake_model written in jnp, so it traces into the compiled loop like a real U-Net."""
  t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.8 * jnp.tanh(x) * jnp.cos(t / 250.0) + 0.3 * jnp.sin(0.7 * x + t / 90.0)


def diffusers_run(sampler, steps, eps, *, start=None, strength=1.0):
  """diffusers' loop (and its img2img start for `start`) with fake_model; returns the final latents."""
  scheduler = diffusers_scheduler(sampler, SD15_SCHEDULER)
  scheduler.set_timesteps(steps)
  begin = steps - int(steps * strength)
  timesteps = scheduler.timesteps[begin:]
  if hasattr(scheduler, "set_begin_index"):
    scheduler.set_begin_index(begin)
  x = torch.from_numpy(eps)
  if start is not None:
    x = scheduler.add_noise(torch.from_numpy(start), x, timesteps[:1])
  for t in timesteps:
    out = torch.from_numpy(fake_model(x.numpy(), [int(t)] * x.shape[0]))
    x = scheduler.step(out, t, x).prev_sample
  return x.numpy()


@pytest.fixture(scope="module")
def schedule():
  return schedule_lib.make_schedule(schedule_lib.ScheduleConfig.from_diffusers(SD15_SCHEDULER))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "ddim"])
def test_jitted_sample_equals_diffusers_step_by_step(sampler, schedule, rng):
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  scale = jnp.float32(1.0)  # a closed-over array, as model weights are

  @jax.jit
  def run(noise):
    return sampling.sample(lambda x, t: scale * jnp_fake_model(x, t), jax.random.key(0), schedule=schedule,
                           sampler=sampler, steps=12, noise=noise)

  ours = np.asarray(run(jnp.asarray(eps)))
  reference = diffusers_run(sampler, 12, eps)
  assert relative_max_error(ours, reference) < 1e-5
  assert np.abs(ours - eps).max() > 0.1


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_start_latents_and_strength_match_diffusers_img2img(sampler, strength, schedule, rng):
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  start = rng.standard_normal(SHAPE).astype(np.float32)
  ours = jax.jit(lambda s, n: sampling.sample(jnp_fake_model, jax.random.key(0), schedule=schedule,
                                              sampler=sampler, steps=10, start_latents=s, strength=strength,
                                              noise=n))(jnp.asarray(start), jnp.asarray(eps))
  reference = diffusers_run(sampler, 10, eps, start=start, strength=strength)
  assert relative_max_error(ours, reference) < 1e-5


def test_strength_runs_the_last_share_of_the_steps(schedule, rng):
  calls = []  # the timesteps of every model call, recorded from inside the compiled loop
  recording = lambda x, t: jax.pure_callback(  # noqa: E731
      lambda x, t: (calls.append(np.asarray(t).copy()), fake_model(x, t))[1],
      jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)
  start = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  sampling.sample(recording, jax.random.key(1), schedule=schedule, sampler="ddim", steps=10,
                  start_latents=start, strength=0.3)
  plan = sampling.make_plan("ddim", schedule, 10)
  assert [int(t[0]) for t in calls] == plan.timesteps[7:].tolist()
  assert all(t.shape == (SHAPE[0],) and t.dtype == np.int32 for t in calls)


def test_pure_noise_start_is_seeded_and_errors_are_clear(schedule):
  run = jax.jit(lambda key: sampling.sample(jnp_fake_model, key, schedule=schedule, sampler="ddpm", steps=5,
                                            shape=SHAPE))
  a, b, c = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  with pytest.raises(ValueError, match="needs shape"):
    sampling.sample(jnp_fake_model, jax.random.key(0), schedule=schedule)
  with pytest.raises(ValueError, match="needs start_latents"):
    sampling.sample(jnp_fake_model, jax.random.key(0), schedule=schedule, shape=SHAPE, strength=0.5)
  with pytest.raises(ValueError, match="differs"):
    sampling.sample(jnp_fake_model, jax.random.key(0), schedule=schedule, shape=(1, 8, 8, 4),
                    start_latents=jnp.zeros(SHAPE))


def _recording_apply(calls):
  def apply(x, t, context, lr):
    calls.append((x.shape, t.shape, context, lr))
    return jnp_fake_model(x, t) + context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1) + 0.1 * lr
  return apply


def test_cfg_scale_one_is_the_plain_conditional_call(rng):
  negative, positive = (jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32) for _ in range(2))
  x, lr = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(2))
  t = jnp.array([500, 500], jnp.int32)
  calls = []
  out = sampling.cfg_denoiser(_recording_apply(calls), (negative, positive), 1.0, extra=(lr,))(x, t)
  assert len(calls) == 1 and calls[0][0] == SHAPE
  np.testing.assert_array_equal(out, _recording_apply([])(x, t, positive, lr))


@pytest.mark.parametrize("batch_one_negative", [False, True])
def test_cfg_is_one_doubled_call_with_the_guidance_formula(batch_one_negative, rng):
  negative = jnp.asarray(rng.standard_normal((1 if batch_one_negative else 2, 5, 6)), jnp.float32)
  positive = jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32)
  x, lr = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(2))
  t = jnp.array([300, 300], jnp.int32)
  calls = []
  out = sampling.cfg_denoiser(_recording_apply(calls), (negative, positive), 5.5, extra=(lr,))(x, t)
  assert len(calls) == 1
  x_shape, t_shape, context, doubled_lr = calls[0]
  assert x_shape == (4,) + SHAPE[1:] and t_shape == (4,)
  np.testing.assert_array_equal(context[2:], positive)
  np.testing.assert_array_equal(context[:2], jnp.broadcast_to(negative, positive.shape))
  np.testing.assert_array_equal(doubled_lr, jnp.concatenate([lr, lr]))
  plain = _recording_apply([])
  u, c = plain(x, t, jnp.broadcast_to(negative, positive.shape), lr), plain(x, t, positive, lr)
  np.testing.assert_allclose(out, u + 5.5 * (c - u), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(c - u)).max() > 1e-3  # the contexts really differ


def test_cfg_denoiser_drives_a_jitted_sample(schedule, rng):
  negative, positive = (jnp.asarray(rng.standard_normal((1, 5, 6)), jnp.float32) for _ in range(2))
  apply = lambda x, t, context: (  # noqa: E731
      jnp_fake_model(x, t) + 0.1 * context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1))
  run = jax.jit(lambda key, s: sampling.sample(sampling.cfg_denoiser(apply, (negative, positive), s), key,
                                               schedule=schedule, steps=4, shape=(1, 8, 8, 4)))
  a = run(jax.random.key(0), 1.0)
  b = run(jax.random.key(0), 7.5)  # a traced scale: always the doubled batch
  assert a.shape == b.shape == (1, 8, 8, 4) and np.isfinite(np.asarray(b)).all()
  assert np.abs(np.asarray(a - b)).max() > 1e-3


@pytest.mark.parametrize("sampler, lr_start", [("dpmpp_2m", True), ("ddpm", False)])
def test_sample_images_is_per_image_and_starts_like_sample(schedule, sampler, lr_start, rng):
  """sample_images (the pipeline's, the trainer preview's and the SD activations' run): image i depends only on
  keys[i] (batching does not matter), and with an identity decode it is `sample` from the same key."""
  images = jnp.asarray(rng.uniform(0, 1, (2, 6, 6, 3)), jnp.float32)
  plan = sampling.make_plan(sampler, schedule, 3, strength=0.7 if lr_start else 1.0)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7, impl="threefry2x32"), i))(jnp.arange(2))
  identity = lambda a: a
  run = jax.jit(lambda im, k: sampling.sample_images(jnp_fake_model, k, plan, latent_shape=(6, 6, 3),
                                                     decode=identity,
                                                     start_latents=im * 2.0 - 1.0 if lr_start else None,
                                                     finish=lambda out: jnp.clip(out * 0.9, 0.0, 1.0)))
  both = np.asarray(run(images, keys))
  alone = np.asarray(run(images[1:], keys[1:]))
  np.testing.assert_array_equal(alone[0], both[1])
  assert np.abs(both[0] - both[1]).max() > 1e-2
  if not plan.noisy:  # `sample` draws step noise another way; the start and the loop are the same
    latents = sampling.sample(jnp_fake_model, keys[0], schedule=schedule, sampler=sampler, steps=3,
                              start_latents=images[:1] * 2.0 - 1.0, strength=0.7)
    expected = np.clip((np.asarray(latents)[0] + 1.0) * 0.5 * 0.9, 0.0, 1.0)
    np.testing.assert_allclose(both[0], expected, atol=1e-6)
