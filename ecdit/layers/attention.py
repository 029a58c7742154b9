"""Attention for EC-DiT blocks: self-attention with grouped key/value heads (GQA) and cross-attention from
image tokens to text states with a key padding mask.

One module, `Attention`, does both: queries come from `x`, keys/values from `context` (= `x` for
self-attention). Query and output projections are full width (`num_heads · head_dim`); key and value
projections have `num_kv_heads · head_dim` outputs, and each group of `num_heads / num_kv_heads` query heads
shares one key/value head. Parameter count (with biases): 2·d·(H·hd) + 2·d_ctx·(KV·hd) + biases, i.e. the
paper's `d·(H + 2·KV + H)·hd` for self-attention.

Logits and softmax run in float32. A query row whose keys are all masked (e.g. an empty caption) yields a
zero output, never NaN.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecdit.layers.dense import logical_dense, xavier, zeros


def _softmax(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis, normalised by one reciprocal per row times a multiply: on XLA:CPU the
  elementwise division of `jax.nn.softmax` makes attention ~25% slower forward+backward (docs/performance.md)."""
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(shifted)
  return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _probs(qh: jax.Array, kh: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Attention weights `[B, KV, G·Lq, Lk]` of heads-major (already scaled) queries and keys; rows with no
  valid key are all zero."""
  logits = jnp.einsum('bkqd,bksd->bkqs', qh, kh)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = _softmax(logits)
  if key_mask is not None:
    # All-masked rows: softmax over uniform -inf-ish logits is uniform; zero them out explicitly.
    probs = probs * jnp.any(key_mask, axis=-1)[:, None, None, None].astype(probs.dtype)
  return probs


# Differentiated as written, the forward must keep the logits-sized softmax intermediates for the backward,
# which splits it into separate max/exp/sum passes; inference runs the same math as a few fused ops. So the
# backward recomputes the weights from q and k (FlashAttention's trade: one extra QKᵀ in the backward, no
# `B·H·Lq·Lk` residuals) — self-attention fwd+bwd 33 → 22 ms at the bench shape (docs/performance.md).
@jax.custom_vjp
def _attend(qh: jax.Array, kh: jax.Array, vh: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Heads-major float32 attention: `[B, KV, G·Lq, hd]` queries (scaled), `[B, KV, Lk, hd]` keys/values."""
  return jnp.einsum('bkqs,bksd->bkqd', _probs(qh, kh, key_mask), vh)


def _attend_fwd(qh, kh, vh, key_mask):
  out = _attend(qh, kh, vh, key_mask)
  return out, (qh, kh, vh, key_mask, out)


def _attend_bwd(residuals, d_out):
  qh, kh, vh, key_mask, out = residuals
  probs = _probs(qh, kh, key_mask)
  d_v = jnp.einsum('bkqs,bkqd->bksd', probs, d_out)
  d_probs = jnp.einsum('bkqd,bksd->bkqs', d_out, vh)
  # Softmax backward: dS = P·(dP − rowsum(P·dP)), and rowsum(P·dP) = rowsum(dO·O) is Lq·hd work, not Lq·Lk.
  d_logits = probs * (d_probs - jnp.sum(d_out * out, axis=-1, keepdims=True))
  d_q = jnp.einsum('bkqs,bksd->bkqd', d_logits, kh)
  d_k = jnp.einsum('bkqs,bkqd->bksd', d_logits, qh)
  return d_q, d_k, d_v, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None
                          ) -> jax.Array:
  """q `[B, Lq, H, hd]`, k/v `[B, Lk, KV, hd]` with KV dividing H, key_mask bool `[B, Lk]` (True = attend).

  Returns `[B, Lq, H, hd]` in q's dtype. Rows with no valid key give zeros."""
  b, lq, h, hd = q.shape
  kv = k.shape[2]
  if h % kv:
    raise ValueError(f'attention: {h} query heads are not a multiple of {kv} key/value heads')
  groups = h // kv
  # Heads-major layout: the G query heads that share a key/value head are stacked along the query axis, so
  # both products are plain batched matmuls over (B, KV) with the contracted axis last; on XLA:CPU this is
  # ~35% faster forward+backward than contracting in the `[B, Lq, KV, G, hd]` layout (docs/performance.md).
  # Scale q, not the logits: Lq·hd elements instead of Lq·Lk (and exact when hd is a power of 4).
  qh = q.reshape(b, lq, kv, groups, hd).astype(jnp.float32) * jnp.float32(1.0 / hd ** 0.5)
  qh = qh.transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * lq, hd)
  kh = jnp.swapaxes(k.astype(jnp.float32), 1, 2)                    # [B, KV, Lk, hd]
  vh = jnp.swapaxes(v.astype(jnp.float32), 1, 2)
  out = _attend(qh, kh, vh, key_mask).reshape(b, kv, groups, lq, hd)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, hd).astype(q.dtype)


class Attention(nn.Module):
  """Multi-head attention with `num_kv_heads` key/value heads. `context=None` → self-attention.

  `zero_init_out`: zero-initialise the output projection (used for the cross-attention branch so that a
  fresh block is the identity, as PixArt-α does)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  out_features: int
  zero_init_out: bool = False
  context_axis: str = 'embed'     # logical name of the context's feature axis
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _dense(self, features: int, axes: tuple[str, str], name: str, kernel_init: Callable = xavier):
    return logical_dense(features, axes, name, self.dtype, self.param_dtype, kernel_init)

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, key_mask: jax.Array | None = None
               ) -> jax.Array:
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}')
    self_attn = context is None
    ctx = x if self_attn else context
    ctx_axis = 'embed' if self_attn else self.context_axis
    b, lq, _ = x.shape
    lk = ctx.shape[1]
    h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    # Projections: batch over data·fsdp·expert, heads over 'model' (the layout of their weights' outputs).
    # Constrained flat (`[B, L, heads·hd]`), which the mesh always divides (its weights are checked).
    q = nn.with_logical_constraint(self._dense(h * hd, ('embed', 'heads'), 'query')(x),
                                   ('batch', 'length', 'heads')).reshape(b, lq, h, hd)
    k = nn.with_logical_constraint(self._dense(kv * hd, (ctx_axis, 'kv'), 'key')(ctx),
                                   ('batch', 'length', 'kv')).reshape(b, lk, kv, hd)
    v = nn.with_logical_constraint(self._dense(kv * hd, (ctx_axis, 'kv'), 'value')(ctx),
                                   ('batch', 'length', 'kv')).reshape(b, lk, kv, hd)
    out = dot_product_attention(q, k, v, key_mask).reshape(b, lq, h * hd)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads'))
    out_init = zeros if self.zero_init_out else xavier
    return self._dense(self.out_features, ('heads', 'embed'), 'out', out_init)(out)
