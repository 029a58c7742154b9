"""ODE samplers for the rectified flow (Euler, Heun) with classifier-free guidance, and PNG grids.

The flow runs from t=1 (noise) to t=0 (data) along the predicted velocity: x_{t'} = x_t + (t' − t)·v.
Guidance uses the empty caption as the unconditional input (the pipeline trains on it through caption
dropout): v = v_u + s·(v_c − v_u). Conditional and unconditional halves run as one batch.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ecdit import errors
from ecdit import outputs
from ecdit.models import ecdit as ecdit_model

SAMPLERS = ('euler', 'heun')
# Images one `ecdit sample` call draws into its grid (prompts x --repeat): all are held in memory at once.
MAX_IMAGES = 4096


def guided_velocity(apply_fn, params, x, t, ids, mask, null_ids, null_mask, cfg_scale: float,
                    has_aux: bool = False):
  """Velocity with classifier-free guidance. `t` is a scalar; null_* are `[1, L]` (broadcast).

  Returns `(velocity, aux)`. With `has_aux`, `apply_fn` returns `(velocity, aux)` and aux is that of the
  whole model batch (the conditional rows, then the unconditional ones when guided); else aux is None."""
  def call(*model_args):
    out = apply_fn(params, *model_args)
    v, aux = out if has_aux else (out, None)
    return v.astype(jnp.float32), aux

  b = x.shape[0]
  tb = jnp.full((b,), t, jnp.float32)
  if cfg_scale == 1.0:
    return call(x, tb, ids, mask)
  null_ids = jnp.broadcast_to(null_ids, ids.shape)
  null_mask = jnp.broadcast_to(null_mask, mask.shape)
  v, aux = call(jnp.concatenate([x, x]), jnp.concatenate([tb, tb]), jnp.concatenate([ids, null_ids]),
                jnp.concatenate([mask, null_mask]))
  v_c, v_u = v[:b], v[b:]
  return v_u + cfg_scale * (v_c - v_u), aux


def time_grid(num_steps: int) -> jax.Array:
  """The uniform grid from t=1 to t=0: float32 `[num_steps + 1]`."""
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def initial_noise(seed, batch: int, image_shape) -> jax.Array:
  """x at t=1: float32 `[batch, *image_shape]` from `jax.random.key(seed)` alone."""
  return jax.random.normal(jax.random.key(seed), (batch,) + tuple(image_shape), jnp.float32)


def integrate(apply_fn, params, noise, ids, mask, null_ids, null_mask, *, num_steps: int,
              cfg_scale: float, method: str = 'euler', has_aux: bool = False):
  """Integrates from t=1 to t=0 on a uniform grid of `num_steps` intervals; returns x at t=0.

  With `has_aux`, `apply_fn` returns `(velocity, aux)` and the result is `(x, (states, aux))`: per step the
  state x_t it starts from `[T, B, ...]` and the aux of its first model call (the guided batch: conditional
  rows first), stacked over the T = num_steps steps. Heun's second call's aux is dropped.
  """
  if method not in SAMPLERS:
    raise ValueError(f'sample.sampler={method!r} is invalid: expected one of {list(SAMPLERS)}')
  ts = time_grid(num_steps)
  vel = functools.partial(guided_velocity, apply_fn, params, ids=ids, mask=mask, null_ids=null_ids,
                          null_mask=null_mask, cfg_scale=cfg_scale, has_aux=has_aux)

  def step(x, i):
    t, t_next = ts[i], ts[i + 1]
    v, aux = vel(x, t)
    x_euler = x + (t_next - t) * v
    if method == 'euler':
      return x_euler, ((x, aux) if has_aux else None)
    # Heun: average the slopes at both ends; the last interval (t_next = 0) stays a plain Euler step.
    v_next, _ = vel(x_euler, t_next)
    x_heun = x + (t_next - t) * 0.5 * (v + v_next)
    return jnp.where(i == num_steps - 1, x_euler, x_heun), ((x, aux) if has_aux else None)

  x, recorded = jax.lax.scan(step, noise.astype(jnp.float32), jnp.arange(num_steps))
  return (x, recorded) if has_aux else x


def make_sampler(model, *, image_shape: tuple[int, int, int], num_steps: int, cfg_scale: float,
                 method: str = 'euler', clip: bool = True,
                 observe: Callable[[dict], Any] | None = None) -> Callable[..., Any]:
  """A jitted `fn(params, ids, mask, null_ids, null_mask, seed) -> images [B,H,W,C] in [-1,1]`.

  The noise comes from `jax.random.key(seed)` alone, so the same seed and prompts give the same images.
  `ids` may also be text states `[B,L,D]` (a frozen pretrained encoder). `clip=False` returns x unclipped
  (VAE latents, which the caller decodes). `observe(collections)` receives the sown collections
  (`moe_stats`, `losses`) of each step's first model call; then fn returns `(images, (states, observed))`,
  both stacked over steps (see `integrate`). The model runs as built for inference (its routing groups of
  model.inference_group_size tokens).
  """
  model = ecdit_model.for_inference(model)

  def apply_fn(params, x, t, ids, mask):
    if observe is None:
      return model.apply({'params': params}, x, t, ids, mask, train=False)
    v, collections = model.apply({'params': params}, x, t, ids, mask, train=False,
                                 mutable=['moe_stats', 'losses'])
    return v, observe(collections)

  @jax.jit
  def run(params, ids, mask, null_ids, null_mask, seed):
    noise = initial_noise(seed, ids.shape[0], image_shape)
    out = integrate(apply_fn, params, noise, ids, mask, null_ids, null_mask, num_steps=num_steps,
                    cfg_scale=cfg_scale, method=method, has_aux=observe is not None)
    x, recorded = out if observe is not None else (out, None)
    x = jnp.clip(x, -1.0, 1.0) if clip else x
    return x if observe is None else (x, recorded)

  return run


def settings(sample_cfg, *, num_steps: int | None = None, cfg_scale: float | None = None,
             method: str | None = None) -> tuple[int, float, str]:
  """(num_steps, cfg_scale, method): the explicit values, else the run's `sample.*` config."""
  return (int(num_steps or sample_cfg.num_steps),
          float(sample_cfg.cfg_scale if cfg_scale is None else cfg_scale),
          method or sample_cfg.sampler)


def from_config(model, sample_cfg, *, clip: bool = True, num_steps: int | None = None,
                cfg_scale: float | None = None, method: str | None = None,
                observe: Callable[[dict], Any] | None = None) -> Callable[..., Any]:
  """`make_sampler` for `model`'s image shape with the `sample.*` settings (explicit values override)."""
  mcfg = model.config
  num_steps, cfg_scale, method = settings(sample_cfg, num_steps=num_steps, cfg_scale=cfg_scale, method=method)
  return make_sampler(model, image_shape=(mcfg.image_size, mcfg.image_size, mcfg.in_channels),
                      num_steps=num_steps, cfg_scale=cfg_scale, method=method, clip=clip, observe=observe)


def sampler_for_run(run, *, num_steps: int | None = None, cfg_scale: float | None = None,
                    method: str | None = None) -> Callable[[list, int], np.ndarray]:
  """`generate(prompts, seed) -> uint8 [B,H,W,C]` for a restored run (`ecdit.train.workdir.Restored`): its
  model and params, its prompt encoder, its VAE decoder if it trains on latents, its `sample.*` defaults."""
  fn = from_config(run.model, run.cfg.sample, clip=run.decode is None, num_steps=num_steps,
                   cfg_scale=cfg_scale, method=method)

  def generate(prompts, seed):
    return sample_prompts(fn, run.params, run.tokenizer, list(prompts), int(seed), decode=run.decode)
  return generate


def _text_array(a) -> jax.Array:
  a = np.asarray(a)
  return jnp.asarray(a, jnp.int32 if np.issubdtype(a.dtype, np.integer) else jnp.float32)


def sample_prompts(sampler, params, tokenizer, prompts: list[str], seed: int, decode=None) -> np.ndarray:
  """Encodes the prompts and the empty caption, runs `sampler`, returns uint8 images `[B,H,W,C]`.

  `tokenizer.encode_batch(texts) -> (ids or states, mask)`; `decode` (e.g. a VAE's) maps the sampled
  latents to pixels in [-1, 1] (clipped here)."""
  ids, mask = tokenizer.encode_batch(list(prompts))
  null_ids, null_mask = tokenizer.encode_batch([''])
  x = sampler(params, _text_array(ids), jnp.asarray(mask, bool), _text_array(null_ids),
              jnp.asarray(null_mask, bool), seed)
  if decode is not None:
    x = decode(x)
  return to_uint8(np.clip(np.asarray(x, np.float32), -1.0, 1.0))


def to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def check_image_count(prompts: int, repeat: int) -> None:
  """UsageError unless prompts x repeat images fit one grid (MAX_IMAGES): checked before a checkpoint is read."""
  if prompts * repeat > MAX_IMAGES:
    raise errors.UsageError(f'--repeat={repeat} with {prompts} prompt(s) asks for {prompts * repeat} images: '
                            f'expected at most {MAX_IMAGES} per call ({max(1, MAX_IMAGES // prompts)} per prompt here)')


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
  """uint8 `[B,H,W,C]` -> one uint8 image with the examples row-major on a white background."""
  images = np.asarray(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  images = images[..., :3]
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  b, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(b)))
  rows = int(math.ceil(b / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
  from PIL import Image, PngImagePlugin
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  info = PngImagePlugin.PngInfo()
  info.add_text(*outputs.PNG_MARK)   # lets a later --out recognise the file as ours and replace it
  try:
    Image.fromarray(image).save(tmp, format='PNG', pnginfo=info)
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)   # no stray .tmp when the save or the rename fails
  return path
