"""The router and its statistics, shared by the single-device and the expert-parallel paths.

Router math runs in float32: `probs = softmax(x·W_r)` over experts, then `routing.expert_choice` (or
`routing.token_choice`) gives the expert-centric plan `gate, index [G, E, C]`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ecdit.config.model import ModelConfig
from ecdit.layers import routing


def route(xg: jax.Array, router: jax.Array, cfg: ModelConfig, train: bool):
  """Groups `[G, Sg, d]` → `(logits, probs, gate, index, valid, chosen)`, router math in float32. `valid` and
  `chosen` are None for expert choice."""
  logits = jnp.einsum('gsd,de->gse', xg.astype(jnp.float32), router)
  probs = jax.nn.softmax(logits, axis=-1)                          # over experts
  cap = cfg.capacity_for(xg.shape[1], train)
  if cfg.routing == 'expert_choice':
    gate, index = routing.expert_choice(probs, cap)
    return logits, probs, gate, index, None, None
  gate, index, valid, chosen = routing.token_choice(probs, cfg.top_k, cap)
  return logits, probs, gate, index, valid, chosen


def routing_stats(logits, gate, index, valid, top_k: int, total: Callable = lambda a: a,
                  shards: int = 1) -> dict[str, jax.Array]:
  """The 'moe_stats' values for one set of groups. Under expert parallelism each device holds `1/shards` of the
  groups; `total` sums a value over those devices (identity on one device), so every statistic is the one a
  single device would compute over all groups. experts_per_token stays per device: `[G, Sg]`."""
  sg = jax.lax.stop_gradient
  groups, experts, _ = index.shape
  group_len = logits.shape[1]
  filled = jnp.ones(index.shape, jnp.int32) if valid is None else valid.astype(jnp.int32)
  counts = jax.vmap(lambda f, i: jax.ops.segment_sum(f.reshape(-1), i.reshape(-1), num_segments=group_len))(
      filled, index)                                               # [G, Sg] experts per token
  tokens = groups * group_len * shards
  hist = total(jnp.sum(jax.nn.one_hot(counts, experts + 1, dtype=jnp.float32), axis=(0, 1))) / tokens
  used = total(jnp.sum(filled))
  stats = {
      'experts_per_token': counts,
      'experts_per_token_hist': hist,
      'unrouted_fraction': hist[0],
      'mean_gate': sg(total(jnp.sum(gate)) / jnp.maximum(used, 1)),
      'router_logit_rms': sg(jnp.sqrt(total(jnp.sum(jnp.square(logits))) / (tokens * experts))),
  }
  if valid is not None:
    stats['dropped_fraction'] = 1.0 - used / (tokens * top_k)
  return stats
