"""TrainState: everything a checkpoint needs to continue a run exactly."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: completed optimizer steps
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array             # uint32[2] raw key from the seed; per-step keys are fold_in(rng, step)
  skipped: jax.Array         # int32 scalar: steps whose update was skipped (non-finite loss/grads)


def create(params, tx, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params),
                    rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
                    skipped=jnp.zeros((), jnp.int32))


def step_key(state: TrainState):
  """The key for the update that produces step `state.step + 1`: a function of (seed, step) only."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def ema_decay_at(step, decay: float):
  """EMA decay with warm-up: min(decay, (1 + n) / (10 + n)) for the update after `n` completed steps, so
  early averages are not dominated by the random initialisation."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema, params, decay):
  """ema ← decay·ema + (1 − decay)·params, leafwise."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(l)) for l in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(l).dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
