"""The one table from logical axis names to mesh axes, and the shardings it gives parameters and batches.

  param_sh = param_shardings(abstract_params(model), mesh)   # NamedSharding per parameter
  batch_sh = batch_sharding(mesh)                            # leading axis over data·fsdp·expert
  params   = shard_params(params, mesh)                      # device_put a (boxed or plain) tree

Optimizer state: optax states mirror the parameter tree, so `jax.tree.map` the parameter shardings onto the
moments (`opt_state_shardings`), and replicate scalars (step counts).

Reading the table: a logical name maps to a mesh axis, a tuple of axes, or None (replicated). flax assigns a
rule only when its mesh axes are still free in that array, first rule first, so the table's order matters:
'batch' comes before 'embed', so an activation `[batch, length, embed]` splits its batch over fsdp and keeps
its width whole, while a weight `[embed, mlp]` splits its width over fsdp. A second 'embed' in one weight
(the `[embed, embed]` timestep MLP) stays unsplit.

Pitfalls this table avoids (shared/research/anchors.md §4, §9):
  - 'length' (tokens of an image) and 'capacity' are never split: a routing group's token axis stays whole on
    one device, since top-k over a split axis is wrong or all-gathers.
  - 'expert' shards expert weights over the 'expert' mesh axis and the batch also runs over 'expert'; the MoE
    layer moves tokens between the two layouts with all_to_all (ecdit.layers.moe.parallel).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ecdit.parallel.mesh import BATCH_AXES

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ('batch', BATCH_AXES),      # images: over every data-parallel axis, 'expert' included
    ('group', BATCH_AXES),      # routing groups of the MoE layer: split like the images they come from
    ('length', None),           # tokens of an image: never split (a routing group's token axis)
    ('capacity', None),         # slots of an expert in a group: never split
    # parameters
    ('expert', 'expert'),       # stacked expert weights [E, ...]
    ('layers', None),           # the scanned stack's leading unit axis (model.scan_layers): not split
    ('embed', 'fsdp'),          # model width: FSDP splits large weights along it
    ('text_embed', 'fsdp'),     # text encoder width
    ('mlp', 'model'),           # FFN hidden (dense and expert FFNs, text MLP)
    ('heads', 'model'),         # query / attention-output projections
    ('kv', 'model'),            # key / value projections
    ('cond', 'model'),          # adaLN outputs (6·width per block)
    ('vocab', None),            # text vocabulary: small next to the experts; kept whole
    ('patch', None),            # patch_dim and the 256-wide timestep features
)


def logical_to_spec(logical: P | tuple | None) -> P:
  """A logical PartitionSpec (names such as 'embed') → the mesh-axis PartitionSpec under LOGICAL_RULES.

  Same resolution as flax's `logical_to_mesh_axes` (rules in table order; a rule applies when its mesh axes
  are still unused in this array), except that a name occurring twice is allowed: its second occurrence stays
  unsplit (flax refuses such arrays; the timestep MLP's `[embed, embed]` kernel is one)."""
  if logical is None:
    return P()
  names = tuple(logical)
  out: list[Any] = [_UNSET] * len(names)
  used: set[str] = set()
  for name, axes in LOGICAL_RULES:
    if name not in names:
      continue
    pos = names.index(name)
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    if out[pos] is _UNSET and not used & set(flat):
      out[pos] = axes
      used |= set(flat)
  unknown = sorted({n for n, o in zip(names, out) if o is _UNSET and n is not None and n not in _KNOWN})
  if unknown:
    raise ValueError(f'logical axis name(s) {unknown} have no rule in LOGICAL_RULES; known: {sorted(_KNOWN)}')
  return P(*(None if o is _UNSET else o for o in out))


_UNSET = object()
_KNOWN = frozenset(name for name, _ in LOGICAL_RULES)


def param_specs(abstract_params_boxed) -> Any:
  """Mesh PartitionSpecs for a (boxed: `nn.Partitioned` leaves) parameter tree, in the unboxed tree's shape.
  Unboxed leaves (no logical names) are replicated."""
  logical = nn.get_partition_spec(abstract_params_boxed)
  return jax.tree.map(logical_to_spec, logical, is_leaf=lambda x: isinstance(x, P))


def param_shardings(abstract_params_boxed, mesh: Mesh) -> Any:
  """NamedSharding per parameter, for `jax.jit(..., in_shardings=/out_shardings=)` and `jax.device_put`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(abstract_params_boxed),
                      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(opt_state, params_shardings, mesh: Mesh) -> Any:
  """Shardings for an optax state: subtrees shaped like the parameters get the parameters' shardings,
  everything else (step counts, scalars) is replicated."""
  param_struct = jax.tree.structure(params_shardings)
  replicated = NamedSharding(mesh, P())

  def visit(node):
    if jax.tree.structure(node) == param_struct:
      return params_shardings
    return jax.tree.map(lambda _: replicated, node)

  return jax.tree.map(visit, opt_state, is_leaf=lambda n: jax.tree.structure(n) == param_struct)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (step counters, keys, metrics)."""
  return NamedSharding(mesh, P())


def batch_spec(ndim: int = 1) -> P:
  """Leading (batch) axis over data·fsdp·expert, the rest whole."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array (`[B, ...]`): images split over data·fsdp·expert. Trailing dimensions of a
  NamedSharding spec default to unsplit, so the default `ndim=1` fits arrays of any rank."""
  return NamedSharding(mesh, batch_spec(ndim))


def shard_params(params, mesh: Mesh, shardings=None) -> Any:
  """Place a parameter tree on the mesh and return it unboxed. The shardings come from `shardings` if given,
  else from the tree's own `nn.Partitioned` metadata (an already-unboxed tree without `shardings` has none,
  and would be replicated: pass the boxed tree, or the shardings from `param_shardings`)."""
  if shardings is None:
    shardings = param_shardings(params, mesh)
  return jax.device_put(nn.unbox(params), shardings)


def activation_rules():
  """A context manager that makes the model's `nn.with_logical_constraint`s use LOGICAL_RULES."""
  return nn.logical_axis_rules(LOGICAL_RULES)
