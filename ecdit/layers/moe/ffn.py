"""The feed-forward maths, written once: the dense FFN module and the E stacked expert FFNs.

Both are Dense → tanh-GeLU → Dense with biases; the experts run as one batched einsum over expert-major
`[E, G, C, d]` (batch dimension first, the G·C rows of one expert contiguous), on one device or, inside the
expert-parallel shard_map, with the hidden width split over 'model'.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ecdit.layers.dense import logical_dense
from ecdit.layers.matmul import expert_matmul

# tanh-approximate GeLU, as in the DiT and PixArt-α FFNs (PyTorch `nn.GELU(approximate='tanh')`); an exported
# model must use the same approximation.
GELU_APPROXIMATE = True
EXPERT_IN, EXPERT_OUT = 'moe_expert_in', 'moe_expert_out'   # checkpoint names (ecdit.models.stack)

# Linear layers are Xavier-uniform with zero bias, as DiT initialises every nn.Linear.
# Stacked experts [E, in, out]: fan-in/fan-out per expert, not across experts.
expert_kernel_init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))


def gelu(x):
  return jax.nn.gelu(x, approximate=GELU_APPROXIMATE)


class DenseFFN(nn.Module):
  """Dense → GeLU → Dense, with biases. `train` is accepted (same call as MoEFFN) and ignored."""
  width: int
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    def dense(features, axes, name):
      return logical_dense(features, axes, name, self.dtype, self.param_dtype)
    h = gelu(dense(self.hidden, ('embed', 'mlp'), 'wi')(x))
    return dense(self.width, ('mlp', 'embed'), 'wo')(h)


def run_experts(xe: jax.Array, wi, bi, wo, bo, model_axis: str | None = None) -> jax.Array:
  """E stacked FFNs on expert-major `[E, G, C, d]` → `[E, G, C, d]`; expert e sees only slice e.

  `model_axis` (inside shard_map, the hidden width split over it, Megatron style): each device holds
  `wi[:, :, h_l]`, `wo[:, h_l, :]`; the partial products are psummed before the output bias is added once."""
  xe = checkpoint_name(xe, EXPERT_IN)   # train.remat='save_moe' keeps these two: no dispatch or all_to_all
  h = expert_matmul(xe, wi) + bi[:, None, None, :]   # is run again in the backward pass
  out = expert_matmul(gelu(h), wo)
  if model_axis:
    out = jax.lax.psum(out, model_axis)
  return checkpoint_name(out + bo[:, None, None, :], EXPERT_OUT)
