"""Routing for Mixture-of-Experts layers: who processes which token, and with what weight.

Shapes: G routing groups, S tokens per group, E experts, C slots per expert per group (the capacity).
`probs` is always the router's softmax over experts, float `[G, S, E]`.

Both routers return the same dispatch plan, expert-centric `[G, E, C]` arrays, so the MoE layer has one
dispatch path:
  - `index[g, e, c]`: int32 position (in 0..S-1) of the token in slot c of expert e;
  - `gate[g, e, c]`: `probs[g, index[g, e, c], e]` — the weight of that expert's output for that token;
  - `valid[g, e, c]` (token choice only): whether the slot holds a token. Empty slots have `gate == 0` and
    `index == 0`, so treating them as real slots adds exactly zero.

Gradients reach the router only through `gate`; `index` is an integer array and carries none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# `capacity(S, E, f)`, the slot-count rounding rule, lives with the config that sizes the layers.
from ecdit.config.model import capacity  # noqa: F401


def _check_probs(probs, capacity_: int, name: str):
  if probs.ndim != 3:
    raise ValueError(f'{name}: probs must be [groups, tokens, experts], got shape {probs.shape}')
  tokens = probs.shape[1]
  if not 1 <= capacity_ <= tokens:
    raise ValueError(f'{name}: capacity={capacity_} is invalid: expected 1..{tokens} (tokens per group)')


def gates_at(probs: jax.Array, index: jax.Array) -> jax.Array:
  """`gate[g, e, c] = probs[g, index[g, e, c], e]` for `probs [G, S, E]` and `index [G, E, C]`."""
  return jnp.take_along_axis(jnp.swapaxes(probs, 1, 2), index, axis=2)


# The contract names the argument `capacity`, shadowing the function above.
# pylint: disable=redefined-outer-name
def expert_choice(probs: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Expert-choice routing (Zhou et al. 2022; EC-DiT Algorithm 1): every expert picks its top-C tokens.

  Args:
    probs: float `[G, S, E]`, the router softmax over experts.
    capacity: C, tokens each expert takes per group (static int, 1 <= C <= S).

  Returns:
    `(gate, index)`, both `[G, E, C]`. `index[g, e, :]` are the int32 positions of the tokens expert e
    chose in group g, in descending order of `probs[g, :, e]`, equal scores ordered by lower position first
    (`lax.top_k` documents this tie rule; tests/test_routing.py checks it). `gate` is `probs` at those
    positions and is differentiable w.r.t. `probs`. A token may be chosen by 0..E experts.
  """
  _check_probs(probs, capacity, 'expert_choice')
  gate, index = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # top-k along tokens, per expert
  return gate, index.astype(jnp.int32)


def token_choice(probs: jax.Array, k: int,
                 capacity: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Token-choice top-k routing with a per-expert capacity (GShard style), as an expert-centric plan.

  Every token asks for its k most probable experts. Requests are served in priority order — all first
  choices (in token-position order), then all second choices, and so on — and an expert accepts requests
  until its C slots are full; the rest are dropped. Gates are the raw router probabilities, not
  renormalised over the k choices (same convention as expert choice, so the two are compared like for like).

  Args:
    probs: float `[G, S, E]`, the router softmax over experts.
    k: choices per token, 1 <= k <= E.
    capacity: C, slots per expert per group.

  Returns:
    `(gate, index, valid, chosen)`: `gate`, `index` (int32), `valid` (bool) are `[G, E, C]`, slots filled in
    priority order; empty slots have `index == 0` and `gate == 0`. `chosen` is the float `[G, S, E]` 0/1
    mask of each token's k choices *before* capacity drops (the input `load_balance_loss` expects).
  """
  _check_probs(probs, capacity, 'token_choice')
  groups, tokens, experts = probs.shape
  if not 1 <= k <= experts:
    raise ValueError(f'token_choice: k={k} is invalid: expected 1..{experts} (experts)')
  _, choice = jax.lax.top_k(probs, k)                            # [G, S, k] expert ids, best first
  request = jax.nn.one_hot(jnp.swapaxes(choice, 1, 2), experts, dtype=jnp.int32)  # [G, k, S, E]
  request = request.reshape(groups, k * tokens, experts)        # rows in priority order: (rank, position)
  slot = jnp.cumsum(request, axis=1) - 1                        # slot each request would take at its expert
  slot = jnp.sum(slot * request, axis=-1)                       # [G, k·S]
  expert = jnp.swapaxes(choice, 1, 2).reshape(groups, k * tokens)
  position = jnp.broadcast_to(jnp.tile(jnp.arange(tokens, dtype=jnp.int32), k), (groups, k * tokens))
  # Requests beyond capacity get slot index C, out of bounds, and the scatter drops them.
  slot = jnp.where(slot < capacity, slot, capacity)
  group = jnp.broadcast_to(jnp.arange(groups)[:, None], (groups, k * tokens))
  index = jnp.zeros((groups, experts, capacity), jnp.int32).at[group, expert, slot].set(position, mode='drop')
  valid = jnp.zeros((groups, experts, capacity), bool).at[group, expert, slot].set(True, mode='drop')
  gate = jnp.where(valid, gates_at(probs, index), 0.0)
  chosen = jnp.sum(jax.nn.one_hot(choice, experts, dtype=probs.dtype), axis=2)  # [G, S, E]
  return gate, index, valid, chosen


# pylint: enable=redefined-outer-name


def load_balance_loss(probs: jax.Array, expert_mask: jax.Array) -> jax.Array:
  """Switch/GShard auxiliary load-balancing loss, averaged over groups.

  `loss = E · Σ_e f_e · P_e` per group, where `P_e` is the mean router probability of expert e over the
  group's tokens and `f_e` is the fraction of the group's routing requests (`expert_mask == 1` entries, i.e.
  the top-k choices before capacity drops) that went to expert e. `f` is normalised to sum to 1, so for
  k = 1 this is exactly the Switch Transformer loss, and a perfectly uniform router scores 1 for any k.

  Args:
    probs: float `[G, S, E]` router probabilities (gradients flow through these).
    expert_mask: `[G, S, E]` 0/1 mask of requested experts (no gradient).
  Returns:
    float32 scalar.
  """
  probs = probs.astype(jnp.float32)
  mask = jax.lax.stop_gradient(expert_mask.astype(jnp.float32))
  experts = probs.shape[-1]
  fraction = jnp.sum(mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=(1, 2))[:, None], 1.0)  # [G, E]
  mean_prob = jnp.mean(probs, axis=1)                                                       # [G, E]
  return jnp.mean(experts * jnp.sum(fraction * mean_prob, axis=-1))
