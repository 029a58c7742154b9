"""Optimizers and learning-rate schedules from the config's `train.*` section."""
from __future__ import annotations

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


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Clipping (global norm), then AdamW or RMSProp-with-momentum scaled by the schedule."""
  lr = schedule(train_cfg)
  if train_cfg.optimizer == 'adamw':
    opt = optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay)
  elif train_cfg.optimizer == 'rmsprop':
    opt = optax.rmsprop(lr, decay=train_cfg.rms_decay, eps=train_cfg.eps, momentum=train_cfg.momentum)
  else:
    raise ValueError(f'train.optimizer={train_cfg.optimizer!r} is invalid: expected adamw or rmsprop')
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip)), opt)
  return opt
