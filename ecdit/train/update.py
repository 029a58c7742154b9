"""The parameter update of one train step: clip → AdamW → apply → EMA, skipped when the step is non-finite.

`optax` composes the same update as separate tree passes (clip, moments, bias correction, decayed weights,
learning rate, apply), and the skip was a `jnp.where(finite, new, old)` over params, moments and EMA. On
XLA:CPU that costs 3–4× the memory traffic of the update itself: each pass is its own loop over every
parameter, and the data-dependent select keeps the donated buffers from being updated in place (measured in
docs/performance.md). Here every leaf is one chain of elementwise ops that XLA fuses into four loops (m, v,
params, EMA) updating the donated buffers in place, and the skip is folded into scalars: a non-finite step
zeroes the gradient and uses b1 = b2 = 1, lr = 0 and EMA decay 1, which leaves every value bit-for-bit
unchanged. A step is non-finite when its loss or gradients are, or when the parameters it would produce are
(an overflow from finite gradients): one read-only pass over the update finds that before it is applied
(4 more parameter-sized reads, g, p, m and v, beside the loops' 13 reads and writes).

The optimizer state keeps optax's structure (`optim.make_optimizer(...).init` makes it; checkpoints are
unchanged) and the arithmetic follows optax's op for op (scale_by_adam, add_decayed_weights,
scale_by_learning_rate, apply_updates; clipping multiplies by max_norm/norm instead of dividing by the norm
and multiplying by max_norm), so results agree with the optax chain to float rounding
(tests/test_train_update.py). Only AdamW takes this path; other optimizers use optax as is. Moments stored
in bfloat16 (train.moment_dtype) are upcast, updated in float32 and rounded back in the same loops, as
`optim.stored_in` does for the optax chain (tests/test_mixed_precision.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ecdit.train import optim


def supports(train_cfg) -> bool:
  return train_cfg.optimizer == 'adamw'


def _find(state, kind):
  """The first optax state of type `kind` in the (nested tuple) optimizer state."""
  if isinstance(state, kind):
    return state
  if isinstance(state, tuple):
    for s in state:
      found = _find(s, kind)
      if found is not None:
        return found
  return None


def _replace(state, kind, new):
  if isinstance(state, kind):
    return new
  if isinstance(state, tuple) and not hasattr(state, '_fields'):
    return tuple(_replace(s, kind, new) for s in state)
  return state


def fused_adamw_ema(train_cfg, lr_schedule: optax.Schedule, grads, grad_norm, finite, params, opt_state,
                    ema_params, ema_decay) -> tuple[Any, Any, Any, jax.Array]:
  """`(params, opt_state, ema_params, applied)` after one AdamW step with global-norm clipping and the EMA
  update, or the inputs unchanged (bit for bit, `applied` False) where `finite` (the loss and gradients) is
  False or the new parameters would not be finite. `grad_norm` is `optax.global_norm(grads)`."""
  adam = _find(opt_state, optax.ScaleByAdamState)
  sched = _find(opt_state, optax.ScaleByScheduleState)
  if adam is None or sched is None:
    raise ValueError('fused_adamw_ema expects the state of optim.make_optimizer with optimizer=adamw')
  b1, b2, eps, wd = (float(train_cfg.b1), float(train_cfg.b2), float(train_cfg.eps),
                     float(train_cfg.weight_decay))
  max_norm = float(train_cfg.grad_clip) if train_cfg.grad_clip and train_cfg.grad_clip > 0 else None
  store = optim.moment_dtype(train_cfg)   # None: the moments' own dtype, computed in it (the default)

  count = optax.safe_increment(adam.count)
  correct1 = 1 - b1 ** count          # optax's bias correction, in float32 (count ≥ 1, so never 0)
  correct2 = 1 - b2 ** count
  # Clipping as one scalar factor (optax divides every element by the norm, then multiplies by max_norm: a
  # division XLA will not duplicate into both moment loops, so it writes a clipped copy of the gradients first).
  clip = jnp.float32(1.0)
  if max_norm is not None:
    clip = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)

  def folded(ok):
    """The step's scalars, or those of an update that changes nothing where `ok` is False. (1 - b) is formed
    in Python, as optax does, so the applied path rounds exactly like optax."""
    return dict(b1=jnp.where(ok, jnp.float32(b1), 1.0), one_b1=jnp.where(ok, jnp.float32(1 - b1), 0.0),
                b2=jnp.where(ok, jnp.float32(b2), 1.0), one_b2=jnp.where(ok, jnp.float32(1 - b2), 0.0),
                step_size=jnp.where(ok, -lr_schedule(sched.count), 0.0), scale=jnp.where(ok, clip, 0.0),
                decay=jnp.where(ok, ema_decay, 1.0))

  def moments_and_param(k, ok, g, p, m, v):
    if store is not None:   # stored in bfloat16: the arithmetic in float32, the new moments rounded at the end
      g, m, v = (x.astype(jnp.float32) for x in (g, m, v))
    g = jnp.where(ok, g, jnp.zeros_like(g)) * k['scale'].astype(g.dtype)
    m = k['one_b1'].astype(g.dtype) * g + k['b1'].astype(m.dtype) * m
    v = k['one_b2'].astype(g.dtype) * g ** 2 + k['b2'].astype(v.dtype) * v
    u = (m / correct1.astype(m.dtype)) / (jnp.sqrt(v / correct2.astype(v.dtype) + 0.0) + eps)
    u = (u + wd * p) * k['step_size'].astype(u.dtype)
    # The select, not lr = 0, keeps a skipped step's parameters: an overflowed u times 0 is NaN. It is
    # elementwise in the same loop, so the donated buffer is still updated in place.
    p = jnp.where(ok, jnp.asarray(p + u).astype(p.dtype), p)
    return (m, v, p) if store is None else (m.astype(store), v.astype(store), p)

  # Finite gradients and state can still overflow the parameters (a huge learning rate or weight decay): one
  # read-only pass computes the new parameters without storing them, and a step whose update would be
  # non-finite is skipped like a non-finite loss. The finite path's arithmetic is unchanged (same scalars).
  # The moments and EMA are convex combinations of finite values, so finite parameters make them finite.
  try_k = folded(finite)
  new_finite = [jnp.all(jnp.isfinite(moments_and_param(try_k, finite, g, p, m, v)[2]))
                for g, p, m, v in zip(*(jax.tree.leaves(t) for t in (grads, params, adam.mu, adam.nu)))]
  finite = finite & jnp.all(jnp.stack(new_finite))
  k = folded(finite)

  def leaf(g, p, m, v, e):
    m, v, p = moments_and_param(k, finite, g, p, m, v)
    e = (k['decay'] * e + (1.0 - k['decay']) * p).astype(e.dtype)
    return p, m, v, e

  out = jax.tree.map(leaf, grads, params, adam.mu, adam.nu, ema_params)
  treedef = jax.tree.structure(params)
  new_p, new_m, new_v, new_e = (treedef.unflatten([t[i] for t in treedef.flatten_up_to(out)]) for i in range(4))
  new_adam = adam._replace(count=jnp.where(finite, count, adam.count), mu=new_m, nu=new_v)
  new_sched = sched._replace(count=jnp.where(finite, optax.safe_increment(sched.count), sched.count))
  opt_state = _replace(_replace(opt_state, optax.ScaleByAdamState, new_adam), optax.ScaleByScheduleState, new_sched)
  return new_p, opt_state, new_e, finite
