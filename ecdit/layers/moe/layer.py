"""The FFN a transformer block calls: `make_ffn(cfg, sparse)`, the MoE layer `MoEFFN` and its config check.

MoEFFN owns the parameters, picks the path (single device here, or expert-parallel in shard_map under a mesh:
ecdit.layers.moe.parallel) and sows the statistics and the balance loss; the maths lives in ffn.py,
dispatch.py and router.py (see the package docstring).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecdit.config.model import ModelConfig
from ecdit.layers import routing
from ecdit.layers.moe import parallel as moe_parallel
from ecdit.layers.moe.dispatch import dispatch_and_combine, group_tokens
from ecdit.layers.moe.ffn import DenseFFN, expert_kernel_init, run_experts
from ecdit.layers.moe.router import route, routing_stats


def check_moe_config(cfg: ModelConfig) -> None:
  """Raises ValueError (naming the field) for a config the MoE layer cannot run; called at trace time,
  before anything compiles. ModelConfig may have been built without `from_dict`, so validate it here."""
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f'MoEFFN: cfg must be a ModelConfig, got {type(cfg).__name__}')
  cfg.validate()
  if cfg.routing not in ('expert_choice', 'token_choice'):
    raise ValueError(f"model.routing={cfg.routing!r} is invalid for an MoE layer: expected 'expert_choice' "
                     "or 'token_choice' ('dense' blocks use DenseFFN; see make_ffn)")


class MoEFFN(nn.Module):
  """E full-width GeLU experts behind a float32 router; see the package docstring for routing and stats.

  Called under `jax.set_mesh(mesh)` with a mesh that has ecdit's axes (data, fsdp, expert, model) and more
  than one device, the layer runs expert-parallel inside `jax.shard_map` (ecdit.layers.moe.parallel) with
  the same results; otherwise it runs the single-device computation below."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    check_moe_config(cfg)
    width = x.shape[-1]
    if width != cfg.width:
      raise ValueError(f'MoEFFN: input width {width} != model.width={cfg.width}')
    param_dtype = jnp.dtype(cfg.param_dtype)
    experts, hidden = cfg.num_experts, cfg.mlp_ratio * cfg.width

    # Created in this order (router, wi, bi, wo, bo): each draws the next key of the layer's 'params' stream.
    router = self.param('router', nn.with_logical_partitioning(
        nn.initializers.normal(cfg.router_init_std), ('embed', 'expert')), (width, experts), jnp.float32)
    param = lambda name, init, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, axes), shape, param_dtype)
    wi = param('wi', expert_kernel_init, (experts, width, hidden), ('expert', 'embed', 'mlp'))
    bi = param('bi', nn.initializers.zeros_init(), (experts, hidden), ('expert', 'mlp'))
    wo = param('wo', expert_kernel_init, (experts, hidden, width), ('expert', 'mlp', 'embed'))
    bo = param('bo', nn.initializers.zeros_init(), (experts, width), ('expert', 'embed'))

    want_stats = self.is_mutable_collection('moe_stats') and not self.is_initializing()
    want_aux = cfg.routing == 'token_choice' and not self.is_initializing()
    # `init` takes the single-device code: its dummy batch of 1 need not divide over the mesh.
    mesh = None if self.is_initializing() else moe_parallel.active_mesh()
    if mesh is not None:
      y, stats, aux = moe_parallel.moe_expert_parallel(
          x, (router, wi, bi, wo, bo), cfg, train, mesh, want_stats=want_stats, want_aux=want_aux)
    else:
      y, stats, aux = self._single_device(x, (router, wi, bi, wo, bo), train, want_stats)
    if want_aux:
      self.sow('losses', 'aux_loss', cfg.aux_loss_weight * aux)
    if want_stats:
      for name, value in stats.items():
        self.sow('moe_stats', name, value)
    return y

  def _single_device(self, x, weights, train, want_stats):
    cfg = self.cfg
    batch, tokens, width = x.shape
    router, wi, bi, wo, bo = weights
    cast = lambda a: a.astype(jnp.dtype(cfg.dtype))  # noqa: E731
    xg = group_tokens(x, cfg)                                        # [G, Sg, d]
    logits, probs, gate, index, valid, chosen = route(xg, router, cfg, train)
    aux = None if chosen is None else routing.load_balance_loss(probs, chosen)
    expert_fn = lambda xe: run_experts(xe, cast(wi), cast(bi), cast(wo), cast(bo))  # noqa: E731
    y = dispatch_and_combine(cast(xg), gate, index, valid, cfg.moe_backend, expert_fn)
    stats = None
    if want_stats:
      stats = routing_stats(logits, gate, index, valid, cfg.top_k)
      stats['experts_per_token'] = stats['experts_per_token'].reshape(batch, tokens)
    return y.reshape(batch, tokens, width), stats, aux


def make_ffn(cfg: ModelConfig, sparse: bool, name: str | None = None) -> nn.Module:
  """The FFN of one block: `MoEFFN(cfg)` if `sparse` (use `cfg.is_sparse_block(i)`), else the dense FFN of
  hidden width `cfg.mlp_ratio · cfg.width`. Both are called as `ffn(x, train=train)`."""
  if sparse:
    return MoEFFN(cfg, name=name)
  return DenseFFN(cfg.width, cfg.mlp_ratio * cfg.width, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype), name=name)
