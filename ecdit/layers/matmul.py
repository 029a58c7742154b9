"""The model's weight matmuls in bfloat16 compute: bfloat16 operands, float32 accumulation and result, rounded
to bfloat16 after — forward and both backward products.

Why: on XLA:CPU (this machine has AVX512-BF16) a bfloat16 × bfloat16 dot whose result type is float32 runs at
~2× float32's rate, while a bfloat16 → bfloat16 dot, which `jnp.dot` and flax emit for bfloat16 compute, runs
at ~0.85× of float32 (docs/performance.md, "bfloat16 on XLA:CPU"). Plain autodiff of the fast form would
upcast the backward products to float32, so the two gradients are written out here (`jax.custom_vjp`).
The values are the plain bfloat16 dot's: a float32-accumulated product rounded once to bfloat16.

float32 operands take the plain `lax.dot_general` / `jnp.einsum` path, so float32 models are unchanged bit
for bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

_F32 = jnp.float32
# The bfloat16 Dense products' checkpoint name: a custom VJP hides its dot from `jax.checkpoint`'s
# dots policies, so train.remat='dots' saves these by name (ecdit.models.stack).
DENSE_OUT = 'dense_out'


def _fast(*arrays) -> bool:
  return all(a.dtype == jnp.bfloat16 for a in arrays)


def _wide(lhs, rhs, dims, out_dtype):
  """`lax.dot_general` accumulated and returned in float32, then rounded to `out_dtype`."""
  return lax.dot_general(lhs, rhs, dims, preferred_element_type=_F32).astype(out_dtype)


# ---- x[..., k] @ w[k, n]: every Dense of the model ----------------------------------------------------------

@jax.custom_vjp
def _dense(x, w):
  return _wide(x, w, (((x.ndim - 1,), (0,)), ((), ())), x.dtype)


def _dense_fwd(x, w):
  return _dense(x, w), (x, w)


def _dense_bwd(res, g):
  x, w = res
  dx = _wide(g, w, (((g.ndim - 1,), (1,)), ((), ())), x.dtype)                     # [..., n]·[k, n]ᵀ → [..., k]
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = _wide(x2, g2, (((0,), (0,)), ((), ())), w.dtype)                            # Σ_rows xᵀ·g → [k, n]
  return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """A drop-in `dot_general` for `nn.Dense` (`dot_general=`): its contraction of the inputs' last axis with a
  2-D kernel goes through `_dense` when both are bfloat16; anything else is `lax.dot_general` as given."""
  dense_dims = (((lhs.ndim - 1,), (0,)), ((), ()))
  if _fast(lhs, rhs) and rhs.ndim == 2 and preferred_element_type is None and dimension_numbers == dense_dims:
    return checkpoint_name(_dense(lhs, rhs), DENSE_OUT)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


# ---- the stacked experts: x[e, g, c, d] @ w[e, d, h] → [e, g, c, h] ----------------------------------------

_EXPERT = (((3,), (1,)), ((0,), (0,)))


@jax.custom_vjp
def _experts(x, w):
  return _wide(x, w, _EXPERT, x.dtype)


def _experts_fwd(x, w):
  return _experts(x, w), (x, w)


def _experts_bwd(res, g):
  x, w = res
  dx = _wide(g, w, (((3,), (2,)), ((0,), (0,))), x.dtype)       # [e,g,c,h]·[e,d,h] → [e,g,c,d]
  dw = _wide(x, g, (((1, 2), (1, 2)), ((0,), (0,))), w.dtype)   # [e,g,c,d]·[e,g,c,h] → [e,d,h]
  return dx, dw


_experts.defvjp(_experts_fwd, _experts_bwd)


def expert_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`einsum('egcd,edh->egch', x, w)`: each expert's rows times its own weight matrix."""
  if _fast(x, w):
    return _experts(x, w)
  return jnp.einsum('egcd,edh->egch', x, w)


__all__ = ['DENSE_OUT', 'dense_dot_general', 'expert_matmul']
