"""The block stack: `depth` DiT blocks, unrolled (`block_0 … block_{depth-1}`) or scanned over units.

With `model.scan_layers` the repeating unit — `scan_unit` consecutive blocks (dense…, MoE) — is traced once
and run `depth / scan_unit` times by `nn.scan`: compile time stops growing with depth. Its parameters (and the
statistics it sows) are stacked on a leading `layers` axis:

  unrolled  params['block_{u·k + j}'][...]              (k-th unit, j-th block in it; u = scan_unit)
  scanned   params['blocks']['block_{j}'][...][k]

`to_unrolled` / `to_scanned` convert any tree in one layout (params, gradients, optimizer moments, sown
`moe_stats`) to the other; everything that names blocks (exports, analysis, parameter counts) reads the
unrolled view.

`remat` (train.remat) rematerialises each scanned unit under a named `jax.checkpoint` policy (REMAT_POLICIES).
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec

from ecdit.config.experiment import REMAT_POLICIES
from ecdit.config.model import ModelConfig
from ecdit.layers.dit import MOE_OUT, DiTBlock
from ecdit.layers.moe.ffn import EXPERT_IN, EXPERT_OUT
from ecdit.layers.matmul import DENSE_OUT

SCANNED = 'blocks'   # the scanned stack's module name
_BLOCK = re.compile(r'block_(\d+)$')


def checkpoint_policy(name: str):
  """The `jax.checkpoint` policy of a REMAT_POLICIES name ('none' is not rematerialised at all).

  full      save nothing: every activation of the unit is recomputed in the backward pass
  dots      save the outputs of weight matmuls (no batch dimension), recompute the rest; in bfloat16 compute
            those are `ecdit.layers.matmul`'s custom-VJP products, which the policy finds by name
  save_moe  save only the MoE layers' expert inputs (after dispatch), expert outputs and combined outputs:
            the backward pass runs no routing, dispatch or all_to_all again, only the experts' first matmul;
            attention and dense FFNs are recomputed
  """
  if name not in REMAT_POLICIES:
    raise ValueError(f'train.remat={name!r} is invalid: expected one of {list(REMAT_POLICIES)}')
  return {'full': None,
          'dots': jax.checkpoint_policies.save_from_both_policies(
              jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
              jax.checkpoint_policies.save_only_these_names(DENSE_OUT)),
          'save_moe': jax.checkpoint_policies.save_only_these_names(MOE_OUT, EXPERT_IN, EXPERT_OUT)}.get(name)


class BlockUnit(nn.Module):
  """`scan_unit` consecutive blocks; the scan body (carry = tokens `[B, S, d]`)."""
  cfg: ModelConfig
  train: bool = False

  @nn.compact
  def __call__(self, tokens, c, ctx, text_mask):
    for j in range(self.cfg.scan_unit):
      tokens = DiTBlock(self.cfg, j, name=f'block_{j}')(tokens, c, ctx, text_mask, train=self.train)
    return tokens, None


def check_remat(cfg: ModelConfig, remat: str) -> None:
  """A train.remat value this model can run (a known policy; anything but 'none' needs the scanned stack)."""
  if remat == 'none':
    return
  checkpoint_policy(remat)
  if not cfg.scan_layers:
    raise ValueError(f'train.remat={remat!r} needs model.scan_layers=True (it rematerialises the scanned '
                     "unit); use train.remat='none' or scan the stack")


def run_blocks(cfg: ModelConfig, remat: str, tokens, c, ctx, text_mask, *, train: bool):
  """The stack, called inside the model's compact `__call__` (its modules are the model's children).
  tokens `[B, S, d]`, c `[B, d]`, ctx `[B, L, d]`, text_mask `[B, L]` → tokens `[B, S, d]`."""
  check_remat(cfg, remat)
  if not cfg.scan_layers:
    for i in range(cfg.depth):
      tokens = DiTBlock(cfg, i, name=f'block_{i}')(tokens, c, ctx, text_mask, train=train)
    return tokens
  unit = BlockUnit
  if remat != 'none':
    unit = nn.remat(BlockUnit, policy=checkpoint_policy(remat), prevent_cse=False)
  scan = nn.scan(unit, variable_axes={'params': 0, 'moe_stats': 0, 'losses': 0},
                 split_rngs={'params': True}, in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                 length=cfg.depth // cfg.scan_unit, metadata_params={nn.PARTITION_NAME: 'layers'})
  tokens, _ = scan(cfg, train, name=SCANNED)(tokens, c, ctx, text_mask)
  return tokens


# ---- the two layouts ------------------------------------------------------------------------------------

def _leaves_map(fn, tree):
  return jax.tree_util.tree_map(fn, tree, is_leaf=lambda a: isinstance(a, PartitionSpec))


def to_unrolled(tree: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """A scanned-layout tree (a dict holding 'blocks') → the unrolled layout; other trees are returned as is.
  Works on arrays, numpy arrays, `jax.ShapeDtypeStruct`s (abstract trees) and PartitionSpecs (the leading
  'layers' entry dropped)."""
  if not isinstance(tree, dict) or SCANNED not in tree:
    return tree
  u, n = cfg.scan_unit, cfg.depth // cfg.scan_unit
  out = {k: v for k, v in tree.items() if k != SCANNED}
  for name, sub in tree[SCANNED].items():
    j = int(_BLOCK.match(name).group(1))
    for k in range(n):
      out[f'block_{u * k + j}'] = _leaves_map(lambda a, k=k: _index(a, k), sub)
  return out


def to_scanned(tree: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """An unrolled-layout tree (block_0 … block_{depth-1}) → the scanned layout ('blocks', stacked)."""
  if not isinstance(tree, dict) or 'block_0' not in tree:
    return tree
  u, n = cfg.scan_unit, cfg.depth // cfg.scan_unit
  out = {k: v for k, v in tree.items() if not _BLOCK.match(k)}
  out[SCANNED] = {f'block_{j}': jax.tree_util.tree_map(lambda *a: _stack(a),
                                                       *[tree[f'block_{u * k + j}'] for k in range(n)])
                  for j in range(u)}
  return out


def layout_of(tree: dict[str, Any]) -> str:
  """'scanned', 'unrolled' or 'none' (no blocks) for a params-like tree."""
  if SCANNED in tree:
    return 'scanned'
  return 'unrolled' if any(_BLOCK.match(k) for k in tree) else 'none'


def _index(a, k):
  if isinstance(a, PartitionSpec):
    return PartitionSpec(*a[1:])
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
  return a[k]


def _stack(arrays):
  if isinstance(arrays[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(arrays),) + tuple(arrays[0].shape), arrays[0].dtype)
  if isinstance(arrays[0], np.ndarray):
    return np.stack(arrays)
  return jax.numpy.stack(arrays)
