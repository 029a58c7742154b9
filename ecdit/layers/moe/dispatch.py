"""Moving tokens to their experts and back: routing groups, and the 'gather' and 'onehot' dispatch backends.

  tokens [B, S, d] --group_tokens--> [G, Sg, d] --dispatch--> expert-major [E, G, C, d] --experts-->
  [E, G, C, d] --gate-weight, combine--> [G, Sg, d]

Expert-major `[E, G, C, d]` is the layout the experts' batched matmul wants: gathering straight into it
instead of `[G, E, C, d]` spares XLA a transpose of the activations before and after each expert einsum,
forward and backward (docs/performance.md).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ecdit.config.model import ModelConfig


def check_group_size(cfg: ModelConfig, batch: int, tokens: int) -> None:
  """ValueError unless `cfg.group_size` divides the batch's token count (routing_scope 'group', one device)."""
  total = batch * tokens
  if total % cfg.group_size:
    raise ValueError(f'model.group_size={cfg.group_size} must divide the batch\'s token count, '
                     f'batch·tokens = {batch}·{tokens} = {total}')


def group_tokens(x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """`[B, S, d]` → `[G, Sg, d]` routing groups per `cfg.routing_scope` (row-major, so groups of the 'group'
  scope are consecutive tokens of consecutive images). Reshaping back to `[B, S, d]` undoes it."""
  batch, tokens, width = x.shape
  if cfg.routing_scope == 'image':
    return x
  if cfg.routing_scope == 'batch':
    return x.reshape(1, batch * tokens, width)
  check_group_size(cfg, batch, tokens)  # 'group'
  return x.reshape(batch * tokens // cfg.group_size, cfg.group_size, width)


# ---- dispatch backends: tokens [G, S, d] + plan [G, E, C] -> [E, G, C, d] and back ------------------------

def _flat_index(index: jax.Array, tokens: int) -> jax.Array:
  """`[G, E, C]` positions within each group → `[E, G, C]` rows of the flattened `[G·S, d]` tokens."""
  groups = index.shape[0]
  offsets = (jnp.arange(groups, dtype=index.dtype) * tokens)[:, None, None]
  return jnp.swapaxes(index + offsets, 0, 1)


def gather_dispatch(x: jax.Array, index: jax.Array) -> jax.Array:
  """`[G, S, d]`, `[G, E, C]` → `[E, G, C, d]`: slot (e, g, c) holds token `index[g, e, c]` of group g."""
  groups, tokens, width = x.shape
  return x.reshape(groups * tokens, width)[_flat_index(index, tokens)]


def gather_combine(expert_out: jax.Array, gate: jax.Array, index: jax.Array, tokens: int) -> jax.Array:
  """`[E, G, C, d]` expert outputs → `[G, S, d]`: gate-weight each slot, scatter-add into its token."""
  weighted = expert_out * jnp.swapaxes(gate, 0, 1)[..., None].astype(expert_out.dtype)
  _, groups, _, width = expert_out.shape
  flat = jax.ops.segment_sum(weighted.reshape(-1, width), _flat_index(index, tokens).reshape(-1),
                             num_segments=groups * tokens)
  return flat.reshape(groups, tokens, width)


def onehot_dispatch_mask(index: jax.Array, tokens: int, dtype, valid: jax.Array | None = None) -> jax.Array:
  """The `[G, E, C, S]` 0/1 dispatch tensor (empty slots all-zero)."""
  mask = jax.nn.one_hot(index, tokens, dtype=dtype)
  if valid is not None:
    mask = mask * valid[..., None].astype(dtype)
  return mask


# The one-hot einsums only select and add, so run them at full precision (on accelerators the default
# precision would round f32 activations to bf16/tf32 on the way through).
_EXACT = jax.lax.Precision.HIGHEST


def dispatch_and_combine(x: jax.Array, gate: jax.Array, index: jax.Array, valid: jax.Array | None, backend: str,
                         expert_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Dispatch `x [G, S, d]` per the plan, run `expert_fn` on expert-major `[E, G, C, d]`, combine back to
  `[G, S, d]`. 'gather': memory O(G·E·C·d); 'onehot': O(G·E·C·S), quadratic in the group size (the readable
  reference)."""
  tokens = x.shape[1]
  if backend == 'gather':
    return gather_combine(expert_fn(gather_dispatch(x, index)), gate, index, tokens)
  if backend == 'onehot':
    dispatch = onehot_dispatch_mask(index, tokens, x.dtype, valid)
    xe = jnp.einsum('gecs,gsd->egcd', dispatch, x, precision=_EXACT)
    ye = expert_fn(xe)
    return jnp.einsum('gecs,gec,egcd->gsd', dispatch, gate.astype(ye.dtype), ye, precision=_EXACT)
  raise ValueError(f"model.moe_backend={backend!r} is invalid: expected one of ['gather', 'onehot']")
