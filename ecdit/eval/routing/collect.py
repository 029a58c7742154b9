"""Experts per image token, out of the model.

With expert-choice routing every expert picks its C favourite tokens, so a token is processed by 0..E
experts. Each MoE layer sows that count as `moe_stats/experts_per_token [B, S]` (ecdit.layers.moe); this
module stacks it over the MoE layers, for one model call or for every step of the sampler's own loop.

Counts of a sampling run are those of each step's first model call (x_t at t = 1, 1 − 1/N, ...), for the
conditional half of the guided batch. With `routing_scope='image'` (the default) a token's count depends
only on its own image; with 'group' or 'batch' scope images share routing groups, so the counts depend on
what else is in the batch (during guided sampling that includes the unconditional copies).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ecdit.diffusion import sampler as sampler_lib
from ecdit.models import ecdit as ecdit_model


def moe_layer_names(mcfg) -> list[str]:
  """Names of the blocks whose FFN is an MoE layer, in depth order ('block_1', 'block_3', ...)."""
  return [f'block_{i}' for i in range(mcfg.depth) if mcfg.is_sparse_block(i)]


def check_has_moe(mcfg, where: str = 'model') -> None:
  if mcfg.routing == 'dense' or not moe_layer_names(mcfg):
    raise ValueError(f'{where} has no MoE layers (model.routing={mcfg.routing!r}, depth={mcfg.depth}, '
                     f'moe_every={mcfg.moe_every}): routing analysis needs an expert-choice or token-choice '
                     'model')


def counts_from_stats(moe_stats: dict, layers: Sequence[str]):
  """The sown `experts_per_token` of each named MoE layer, stacked: int32 `[layers, B, S]`."""
  out = []
  for name in layers:
    try:
      sown = moe_stats[name]['moe']['experts_per_token']
    except KeyError:
      raise ValueError(f'no moe_stats/experts_per_token sown by {name}; sown: {sorted(moe_stats)}') from None
    out.append(sown[0] if isinstance(sown, tuple) else sown)
  return jnp.stack(out).astype(jnp.int32)


def routing_fn(model) -> Callable:
  """Jitted `(params, x, t, ids, mask) -> (velocity [B,H,W,C], counts int32 [layers, B, S])`; t is `[B]`."""
  model = ecdit_model.for_inference(model)
  cfg = model.config
  check_has_moe(cfg)
  layers = moe_layer_names(cfg)

  @jax.jit
  def run(params, x, t, ids, mask):
    v, mut = model.apply({'params': params}, x, t, ids, mask, train=False, mutable=['moe_stats'])
    return v, counts_from_stats(mut['moe_stats'], layers)
  return run


def batched_counts(fn, params, x, t, ids, mask, batch_size: int) -> np.ndarray:
  """`fn`'s counts (`fn = routing_fn(model)`) for inputs of any length, `batch_size` rows at a time →
  numpy `[layers, N, S]`."""
  n = x.shape[0]
  out = [np.asarray(fn(params, x[i:i + batch_size], t[i:i + batch_size], ids[i:i + batch_size],
                       mask[i:i + batch_size])[1]) for i in range(0, n, batch_size)]
  return np.concatenate(out, axis=1)


def sample_with_routing(model, params, ids, mask, null_ids, null_mask, *, num_steps: int, cfg_scale: float,
                        method: str = 'euler', seed: int = 0):
  """Samples with the library sampler (`sampler.make_sampler`: same grid, noise, guidance and update),
  recording routing at each step's first model call.

  Returns (images float `[B,H,W,C]` in [-1, 1], ts `[T]` (the recorded times, T = num_steps), states
  `[T, B,H,W,C]` (x_t at those times), counts int32 `[T, layers, B, S]` of the conditional inputs).
  """
  if method not in sampler_lib.SAMPLERS:
    raise ValueError(f'sampler={method!r} is invalid: expected one of {list(sampler_lib.SAMPLERS)}')
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps}; expected an integer >= 1')
  cfg = model.config
  check_has_moe(cfg)
  layers = moe_layer_names(cfg)
  run = sampler_lib.make_sampler(
      model, image_shape=(cfg.image_size, cfg.image_size, cfg.in_channels), num_steps=num_steps,
      cfg_scale=cfg_scale, method=method, observe=lambda cols: counts_from_stats(cols['moe_stats'], layers))
  images, (states, counts) = run(params, ids, mask, null_ids, null_mask, seed)
  b = ids.shape[0]   # the conditional rows come first in the guided batch
  return (np.asarray(images), np.asarray(sampler_lib.time_grid(num_steps)[:-1]), np.asarray(states),
          np.asarray(counts)[:, :, :b])
