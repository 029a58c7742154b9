"""The one Dense layer of the model: a kernel and a bias named by logical axes (so the rules table shards
them), xavier-uniform kernel and zero bias unless told otherwise. Attention, the DiT blocks and the dense
FFN all build their projections with it."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from ecdit.layers.matmul import dense_dot_general

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def logical_dense(features: int, axes: tuple[str, str], name: str, dtype: Any, param_dtype: Any,
                  kernel_init: Callable = xavier) -> nn.Dense:
  """nn.Dense whose kernel has logical axes `axes` (in, out) and whose bias has `axes[1:]`; in bfloat16 compute
  its products accumulate in float32 (`ecdit.layers.matmul`)."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name, dot_general=dense_dot_general,
                  kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(zeros, axes[1:]))


__all__ = ['logical_dense', 'xavier', 'zeros']
