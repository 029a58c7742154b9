"""Optimizers and learning-rate schedules from the config's `train.*` section."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(train_cfg) -> optax.Schedule:
  """Linear warm-up from 0 to the peak over `warmup_steps`, then constant or cosine decay to
  `end_lr_factor·peak` at `num_steps`. The schedule is evaluated at the optimizer's update count."""
  peak = float(train_cfg.learning_rate)
  warm = int(train_cfg.warmup_steps)
  if train_cfg.schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif train_cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, max(1, int(train_cfg.num_steps) - warm),
                                        alpha=float(train_cfg.end_lr_factor))
  else:
    raise ValueError(f'train.schedule={train_cfg.schedule!r} is invalid: expected constant or cosine')
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def moment_dtype(train_cfg):
  """The dtype the optimizer moments are stored in between steps (train.moment_dtype), or None for optax's own
  (the parameters' dtype; float32 unless model.param_dtype says otherwise), which is the default and leaves
  the optimizer exactly as it was. Either way the update is computed in float32."""
  name = getattr(train_cfg, 'moment_dtype', 'float32')
  return None if name == 'float32' else jnp.dtype(name)


def _cast_floating(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def stored_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`inner` with its floating state (the moments: every floating leaf of the AdamW and RMSProp states is
  parameter-shaped) kept in `dtype`: each update upcasts the state to float32, runs `inner`, and rounds the
  new state back. The parameter update uses the unrounded moments, as optax's own `mu_dtype` does. The state
  keeps `inner`'s structure (the fused AdamW path, shardings and checkpoints read it), only its dtypes change;
  one wrapper for both moments and both optimizers (optax.rmsprop has no dtype argument, adamw none for nu)."""
  def init(params):
    return _cast_floating(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, _cast_floating(state, jnp.float32), params)
    return updates, _cast_floating(state, dtype)
  return optax.GradientTransformation(init, update)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Clipping (global norm), then AdamW or RMSProp-with-momentum scaled by the schedule, its moments stored
  in train.moment_dtype."""
  lr = schedule(train_cfg)
  if train_cfg.optimizer == 'adamw':
    opt = optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay)
  elif train_cfg.optimizer == 'rmsprop':
    opt = optax.rmsprop(lr, decay=train_cfg.rms_decay, eps=train_cfg.eps, momentum=train_cfg.momentum)
  else:
    raise ValueError(f'train.optimizer={train_cfg.optimizer!r} is invalid: expected adamw or rmsprop')
  if moment_dtype(train_cfg) is not None:
    opt = stored_in(opt, moment_dtype(train_cfg))
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip)), opt)
  return opt
