"""Expert-parallel MoE: the MoE layer's computation inside `jax.shard_map` over the ('data','fsdp','expert',
'model') mesh, with the same results as on one device.

When it runs: `MoEFFN` calls `active_mesh()`, which returns the mesh set by `jax.set_mesh(mesh)` (or
`ecdit.parallel.use_mesh`) when that mesh has all four ecdit axes and more than one device, and None otherwise
(no mesh, a 1-device mesh, a foreign mesh, or already inside a shard_map) — then the single-device code runs.
`init` always takes the single-device code (its dummy batch of 1 need not divide over the mesh).

Per device (batch split over data·fsdp·expert, `n` = size of 'expert', `E_l = E / n` local experts):

  local groups (scope 'image', or 'group' whose groups fit in a device's tokens):
    x [B_l, S, d] → groups [G_l, Sg, d] → route locally (top-k over the whole, never split, token axis)
    → dispatch [E, G_l, C, d] → all_to_all over 'expert' (split E, stack groups): [E_l, n·G_l, C, d]
    → the E_l local experts → all_to_all back: [E, G_l, C, d] → gate-weight and combine → [B_l, S, d].
    Two all_to_alls per MoE layer forward (four with the backward pass), each moving the dispatched buffer.

  pooled groups (scope 'batch', or 'group' with group_size larger than a device's tokens): a routing group
    spans devices, so splitting it would change routing. To keep single-device semantics every device
    all-gathers the pool over data·fsdp·expert, routes all groups (redundantly, identical results), runs its
    E_l experts on the tokens they chose, and a psum over 'expert' adds the experts' outputs; each device
    keeps its own images' rows. This costs an all-gather of the activations and is meant for small research
    runs; 'image' and 'group' scopes are the scalable ones.

'model' axis: each expert's hidden width is split (Megatron style): `x·wi[:, :, h_l]`, GeLU, `·wo[:, h_l, :]`,
psum over 'model'. 'fsdp': expert weights enter the shard_map whole along 'embed' (XLA all-gathers them from
their fsdp shards, and reduce-scatters their gradients) — FSDP as usual.

Statistics ('moe_stats') and the token-choice balance loss are reduced over the batch axes so that they equal
the single-device values (experts_per_token stays split with the batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from ecdit.config.model import ModelConfig
from ecdit.layers import routing
from ecdit.layers.moe.dispatch import dispatch_and_combine, group_tokens
from ecdit.layers.moe.ffn import EXPERT_OUT, run_experts
from ecdit.layers.moe.layout import layout
from ecdit.layers.moe.router import route, routing_stats
from ecdit.parallel.mesh import AXES, BATCH_AXES


def active_mesh():
  """The mesh the MoE layer should split over, or None (see the module docstring)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  if mesh.size <= 1:
    return None
  manual = getattr(mesh, 'manual_axes', ())
  if manual:  # already inside a shard_map: the caller has taken charge of the layout
    return None
  return mesh


def moe_expert_parallel(x, weights, cfg: ModelConfig, train: bool, mesh, *, want_stats: bool, want_aux: bool):
  """`x [B, S, d]` → `(y [B, S, d], stats dict or None, balance loss or None)`, expert-parallel on `mesh`."""
  router, wi, bi, wo, bo = weights
  batch, tokens, width = x.shape
  split = layout(cfg, batch, tokens, mesh.shape)
  local, shards, pooled = split.local, split.shards, split.pooled
  n_exp, n_model = mesh.shape['expert'], mesh.shape['model']
  e_local = cfg.num_experts // n_exp
  cast = lambda a: a.astype(jnp.dtype(cfg.dtype))  # noqa: E731
  # Specs and collectives name only the axes of size > 1: shard_map's replication typing counts an axis named
  # in a spec as "varying" whatever its size, and XLA keeps a psum over a size-1 axis as an (empty) all-reduce.
  batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
  e_axis = 'expert' if n_exp > 1 else None
  h_axis = 'model' if n_model > 1 else None

  def total(a):
    return a if pooled or not batch_axes else jax.lax.psum(a, batch_axes)

  def body(x, router, wi, bi, wo, bo):
    if pooled:
      pool = jax.lax.all_gather(x, batch_axes, axis=0, tiled=True, to='invarying')
      xg = group_tokens(pool, cfg)
    else:
      xg = group_tokens(x, cfg)
    logits, probs, gate, index, valid, chosen = route(xg, router, cfg, train)
    experts_fn = lambda xe: run_experts(xe, cast(wi), cast(bi), cast(wo), cast(bo), h_axis)  # noqa: E731
    if pooled:
      # This device's experts only: slice the plan along E, run, and add the experts' outputs over 'expert'.
      if e_axis:
        start = jax.lax.axis_index(e_axis) * e_local
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, e_local, axis=1)  # noqa: E731
        plan = (take(gate), take(index), None if valid is None else take(valid))
      else:
        plan = (gate, index, valid)
      y = dispatch_and_combine(cast(xg), *plan, cfg.moe_backend, experts_fn)
      if e_axis:
        y = jax.lax.psum(y, e_axis)
      y = y.reshape(batch, tokens, width)
      y = jax.lax.dynamic_slice_in_dim(y, jax.lax.axis_index(batch_axes) * local, local, axis=0)
    else:
      def remote_experts(xe):                                      # [E, G_l, C, d]
        if n_exp > 1:
          xe = jax.lax.all_to_all(xe, 'expert', 0, 1, tiled=True)  # [E_l, n·G_l, C, d]
        ye = experts_fn(xe)
        if n_exp > 1:
          ye = jax.lax.all_to_all(ye, 'expert', 1, 0, tiled=True)  # [E, G_l, C, d]
          ye = checkpoint_name(ye, EXPERT_OUT)   # the returned outputs too: remat='save_moe' keeps them
        return ye
      y = dispatch_and_combine(cast(xg), gate, index, valid, cfg.moe_backend, remote_experts)
      y = y.reshape(local, tokens, width)

    out = {'y': y}
    if want_stats:
      stats = routing_stats(logits, gate, index, valid, cfg.top_k, total, 1 if pooled else shards)
      counts = stats['experts_per_token'].reshape(-1, tokens)
      if pooled:
        counts = jax.lax.dynamic_slice_in_dim(counts, jax.lax.axis_index(batch_axes) * local, local, axis=0)
      stats['experts_per_token'] = counts
      out['stats'] = stats
    if want_aux:
      aux = total(routing.load_balance_loss(probs, chosen))
      out['aux'] = aux if pooled else aux / shards
    return out

  bspec = P(batch_axes or None)
  in_specs = (P(batch_axes or None, None, None), P(), P(e_axis, None, h_axis), P(e_axis, h_axis),
              P(e_axis, h_axis, None), P(e_axis, None))
  out_specs = {'y': P(batch_axes or None, None, None)}
  if want_stats:
    out_specs['stats'] = {'experts_per_token': bspec, 'experts_per_token_hist': P(), 'unrouted_fraction': P(),
                          'mean_gate': P(), 'router_logit_rms': P()}
    if cfg.routing == 'token_choice':
      out_specs['stats']['dropped_fraction'] = P()
  if want_aux:
    out_specs['aux'] = P()
  # shard_map gets flat leaves (its error report for a dict of specs is itself broken in jax 0.10.2).
  flat_specs, tree = jax.tree.flatten(out_specs)
  def flat_body(*args):
    return tuple(tree.flatten_up_to(body(*args)))
  flat = jax.shard_map(flat_body, mesh=mesh, in_specs=in_specs, out_specs=tuple(flat_specs))(
      x, router, wi, bi, wo, bo)
  out = jax.tree.unflatten(tree, flat)
  return out['y'], out.get('stats'), out.get('aux')
