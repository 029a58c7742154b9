"""Rectified-flow objective: timestep sampling, interpolation, token masking and the loss.

Convention (DESIGN §1): x_t = t·ε + (1−t)·x0 with t=1 pure noise, and the model predicts the velocity
v = ε − x0, so dx_t/dt = v and sampling integrates from t=1 down to t=0.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from ecdit.config.experiment import T_SAMPLINGS
from ecdit.layers.dit import patchify   # the model's token layout: the masked loss compares kept patches


def sample_t(key, batch: int, *, sampling: str = 'logit_normal', mean: float = 0.0, std: float = 1.0):
  """Timesteps `[batch]` in (0, 1). Logit-normal is SD3's: t = sigmoid(u), u ~ N(mean, std²)."""
  if sampling == 'logit_normal':
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
  if sampling == 'uniform':
    return jax.random.uniform(key, (batch,), jnp.float32)
  raise ValueError(f'diffusion.t_sampling={sampling!r} is invalid: expected one of {list(T_SAMPLINGS)}')


def interpolate(x0, noise, t):
  """x_t = t·noise + (1−t)·x0, with t `[B]` broadcast over the image axes."""
  t = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return t * noise + (1.0 - t) * x0


def velocity_target(x0, noise):
  return noise - x0


def num_kept(num_tokens: int, mask_ratio: float) -> int:
  """Tokens kept by token masking: round(N·(1−r)), at least 1."""
  return max(1, min(num_tokens, int(round(num_tokens * (1.0 - mask_ratio)))))


def routed_tokens(cfg, mcfg) -> int:
  """Tokens per image the backbone (and so its MoE routing groups) sees in a training step of experiment
  `cfg`: all of model `mcfg`'s, or the kept ones under token masking (diffusion.mask_ratio)."""
  ratio = float(cfg.diffusion.mask_ratio)
  return num_kept(mcfg.num_tokens, ratio) if ratio > 0 else mcfg.num_tokens


def random_keep_idx(key, batch: int, num_tokens: int, keep: int):
  """A random subset of `keep` token positions per example, `[batch, keep]` int32, sorted ascending."""
  scores = jax.random.uniform(key, (batch, num_tokens))
  idx = jnp.argsort(scores, axis=1)[:, :keep]
  return jnp.sort(idx, axis=1).astype(jnp.int32)


def sum_collection(tree) -> jax.Array:
  """Sum of every leaf of a sown collection (e.g. the token-choice balance losses); 0 when empty."""
  leaves = jax.tree_util.tree_leaves(tree)
  return sum((jnp.sum(l).astype(jnp.float32) for l in leaves), jnp.zeros((), jnp.float32))


def flow_loss(apply_fn: Callable[..., Any], params, batch: Mapping[str, jax.Array], key, *,
              t_sampling: str = 'logit_normal', t_mean: float = 0.0, t_std: float = 1.0,
              mask_ratio: float = 0.0, patch_size: int = 2):
  """Rectified-flow MSE for one batch (`ecdit.data.batch` step arrays: x0, text, text_mask).

  `apply_fn(params, x_t, t, text, text_mask, keep_idx)` returns `(prediction, collections)`: the
  velocity `[B,H,W,C]` when keep_idx is None, else the kept patches `[B,K,patch_dim]`. With
  mask_ratio > 0 a random fraction of image tokens is dropped from the backbone's input and the loss is
  taken on the kept tokens only. Returns `(loss, aux)`; aux holds the pure flow loss, the auxiliary
  (balance) loss and the sown collections.
  """
  x0 = batch['x0'].astype(jnp.float32)
  b, h, w, _ = x0.shape
  k_t, k_noise, k_mask = jax.random.split(key, 3)
  t = sample_t(k_t, b, sampling=t_sampling, mean=t_mean, std=t_std)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = interpolate(x0, noise, t)
  target = velocity_target(x0, noise)
  keep_idx = None
  if mask_ratio > 0:
    n = (h // patch_size) * (w // patch_size)
    keep_idx = random_keep_idx(k_mask, b, n, num_kept(n, mask_ratio))
    target = jnp.take_along_axis(patchify(target, patch_size), keep_idx[:, :, None], axis=1)
  pred, collections = apply_fn(params, x_t, t, batch['text'], batch['text_mask'], keep_idx)
  mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
  aux_loss = sum_collection(collections.get('losses', {}))
  return mse + aux_loss, {'flow_loss': mse, 'aux_loss': aux_loss,
                          'moe_stats': collections.get('moe_stats', {})}
