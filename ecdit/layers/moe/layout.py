"""How the MoE layer splits over a mesh, and whether it can: written once, for the layer at trace time and for
`ecdit.models.ecdit.check_fits` before anything compiles.

  layout(cfg, batch, tokens, mesh.shape) → Layout(local, shards, pooled), or a ValueError naming the numbers.

The batch is split over data·fsdp·expert (`shards` pieces of `local` images), experts over 'expert', each
expert's hidden width over 'model'. Routing groups either fit in one device's tokens (routed locally) or are
`pooled`: a group spans devices, so every device routes the whole pool (ecdit.layers.moe.parallel).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from ecdit.config.model import ModelConfig
from ecdit.layers.moe.dispatch import check_group_size
from ecdit.parallel.checks import require_divisible
from ecdit.parallel.mesh import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class Layout:
  local: int     # images per device
  shards: int    # devices the batch is split over (data·fsdp·expert)
  pooled: bool   # routing groups span devices: all-gather the pool and route it on every device


def check_experts(cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> None:
  """Experts by 'expert' and the expert hidden width by 'model' (ValueError naming both numbers)."""
  require_divisible('model.num_experts', cfg.num_experts, mesh_shape, 'expert')
  require_divisible('MoE hidden width (model.mlp_ratio·model.width)', cfg.mlp_ratio * cfg.width, mesh_shape,
                    'model')


def layout(cfg: ModelConfig, batch: int, tokens: int, mesh_shape: Mapping[str, int]) -> Layout:
  """The split of `batch` images of `tokens` tokens on a mesh of `mesh_shape`; ValueError naming the numbers
  when it cannot split."""
  shards = math.prod(mesh_shape[a] for a in BATCH_AXES)
  if batch % shards:
    raise ValueError(f'MoE layer: batch size {batch} is not divisible by mesh data·fsdp·expert={shards}')
  check_experts(cfg, mesh_shape)
  local = batch // shards
  if cfg.routing_scope == 'image':
    return Layout(local, shards, False)
  if cfg.routing_scope == 'batch':
    return Layout(local, shards, shards > 1)
  if shards == 1:  # 'group' on one device: the groups just have to tile the batch
    check_group_size(cfg, batch, tokens)
    return Layout(local, shards, False)
  own = local * tokens
  if own % cfg.group_size == 0:
    return Layout(local, shards, False)
  if cfg.group_size % own == 0:
    return Layout(local, shards, True)
  raise ValueError(f'model.group_size={cfg.group_size} neither divides nor is a multiple of the tokens per '
                   f'device (local batch {local} · {tokens} tokens = {own}); routing groups would straddle devices')
