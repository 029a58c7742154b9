"""Feed-forward layers: the dense FFN and the Mixture-of-Experts FFN (expert-choice or token-choice routing).

`make_ffn(cfg, sparse)(x, train=...)` is what a transformer block calls. The MoE layer:

  1. cuts the `[B, S, d]` tokens into routing groups `[G, Sg, d]` (`cfg.routing_scope`: one image per group,
     fixed-size groups spanning images, or the whole batch);
  2. routes in float32: `probs = softmax(x·W_r)` over experts, then `routing.expert_choice` (or
     `routing.token_choice`) gives an expert-centric plan `gate, index [G, E, C]`;
  3. dispatches with `cfg.moe_backend`:
       'gather'  takes the chosen tokens into an expert-major `[E, G, C, d]` buffer and scatter-adds the
                 gate-weighted expert outputs back (memory O(G·E·C·d));
       'onehot'  builds the one-hot dispatch tensor `[G, E, C, Sg]` and uses two einsums (memory
                 O(G·E·C·Sg), quadratic in the group size; the readable reference);
  4. runs the E stacked experts as one batched einsum over `[E, G·C, d]`; output = Σ over the experts that
     chose a token of gate · expert(token), not renormalised. A token no expert chose gets 0 (the block's
     residual carries it).

Expert-major `[E, G, C, d]` is the layout the experts' batched matmul wants (batch dimension first, the G·C
rows of one expert contiguous): gathering straight into it instead of `[G, E, C, d]` spares XLA a transpose
of the activations before and after each expert einsum, forward and backward (docs/performance.md).

Under `jax.set_mesh(mesh)` with ecdit's mesh axes and more than one device, steps 1-4 run expert-parallel in
`jax.shard_map` (ecdit.layers.moe.parallel) with the same results; one device runs the code below as is.

Sown collections (only when the caller makes them mutable in `apply`; `init` sows nothing, so the variables it
returns hold only 'params'):
  'moe_stats': experts_per_token `[B, S]` int32, experts_per_token_hist `[E+1]` (fraction of tokens with
               0..E experts), unrouted_fraction, mean_gate, router_logit_rms, and for token choice
               dropped_fraction (share of the k·tokens requests dropped for capacity).
  'losses':    aux_loss = cfg.aux_loss_weight · load_balance_loss (token choice only).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ecdit.layers import routing
from ecdit.config.model import ModelConfig

# tanh-approximate GeLU, as in the DiT and PixArt-α FFNs (PyTorch `nn.GELU(approximate='tanh')`); an exported
# model must use the same approximation.
GELU_APPROXIMATE = True

# Linear layers are Xavier-uniform with zero bias, as DiT initialises every nn.Linear.
_kernel_init = nn.initializers.xavier_uniform()
# Stacked experts [E, in, out]: fan-in/fan-out per expert, not across experts.
_expert_kernel_init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))


def _gelu(x):
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
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=nn.with_logical_partitioning(_kernel_init, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))
    h = _gelu(dense(self.hidden, ('embed', 'mlp'), 'wi')(x))
    return dense(self.width, ('mlp', 'embed'), 'wo')(h)


# ---- routing groups -------------------------------------------------------------------------------------

def group_tokens(x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """`[B, S, d]` → `[G, Sg, d]` routing groups per `cfg.routing_scope` (row-major, so groups of the 'group'
  scope are consecutive tokens of consecutive images). `ungroup` is the inverse reshape."""
  batch, tokens, width = x.shape
  if cfg.routing_scope == 'image':
    return x
  if cfg.routing_scope == 'batch':
    return x.reshape(1, batch * tokens, width)
  # 'group'
  total = batch * tokens
  if total % cfg.group_size:
    raise ValueError(f'model.group_size={cfg.group_size} must divide the batch\'s token count, '
                     f'batch·tokens = {batch}·{tokens} = {total}')
  return x.reshape(total // cfg.group_size, cfg.group_size, width)


def check_moe_config(cfg: ModelConfig) -> None:
  """Raises ValueError (naming the field) for a config the MoE layer cannot run; called at trace time,
  before anything compiles. ModelConfig may have been built without `from_dict`, so validate it here."""
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f'MoEFFN: cfg must be a ModelConfig, got {type(cfg).__name__}')
  cfg.validate()
  if cfg.routing not in ('expert_choice', 'token_choice'):
    raise ValueError(f"model.routing={cfg.routing!r} is invalid for an MoE layer: expected 'expert_choice' "
                     "or 'token_choice' ('dense' blocks use DenseFFN; see make_ffn)")


# ---- dispatch backends: tokens [G, S, d] + plan [G, E, C] -> [E, G, C, d] and back ------------------------

def _flat_index(index: jax.Array, tokens: int) -> jax.Array:
  """`[G, E, C]` positions within each group → `[E, G, C]` rows of the flattened `[G·S, d]` tokens."""
  groups = index.shape[0]
  offsets = (jnp.arange(groups, dtype=index.dtype) * tokens)[:, None, None]
  return jnp.swapaxes(index + offsets, 0, 1)


def gather_dispatch(x: jax.Array, index: jax.Array) -> jax.Array:
  """`[G, S, d]`, `[G, E, C]` → `[E, G, C, d]`: slot (e, g, c) holds token `index[g, e, c]` of group g."""
  groups, tokens, width = x.shape
  return x.reshape(groups * tokens, width)[_flat_index(index, tokens)]


def gather_combine(expert_out: jax.Array, gate: jax.Array, index: jax.Array, tokens: int) -> jax.Array:
  """`[E, G, C, d]` expert outputs → `[G, S, d]`: gate-weight each slot, scatter-add into its token."""
  weighted = expert_out * jnp.swapaxes(gate, 0, 1)[..., None].astype(expert_out.dtype)
  experts, groups, _, width = expert_out.shape
  flat = jax.ops.segment_sum(weighted.reshape(-1, width), _flat_index(index, tokens).reshape(-1),
                             num_segments=groups * tokens)
  return flat.reshape(groups, tokens, width)


def onehot_dispatch_mask(index: jax.Array, tokens: int, dtype, valid: jax.Array | None = None) -> jax.Array:
  """The `[G, E, C, S]` 0/1 dispatch tensor (empty slots all-zero)."""
  mask = jax.nn.one_hot(index, tokens, dtype=dtype)
  if valid is not None:
    mask = mask * valid[..., None].astype(dtype)
  return mask


# The one-hot einsums only select and add, so run them at full precision (on accelerators the default
# precision would round f32 activations to bf16/tf32 on the way through).
_EXACT = jax.lax.Precision.HIGHEST


def run_experts(xe: jax.Array, wi, bi, wo, bo) -> jax.Array:
  """E stacked FFNs on expert-major `[E, G, C, d]` → `[E, G, C, d]`; expert e sees only slice e."""
  h = jnp.einsum('egcd,edh->egch', xe, wi) + bi[:, None, None, :]
  return jnp.einsum('egch,ehd->egcd', _gelu(h), wo) + bo[:, None, None, :]


def dispatch_and_combine(x: jax.Array, gate: jax.Array, index: jax.Array, valid: jax.Array | None, backend: str,
                expert_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Dispatch `x [G, S, d]` per the plan, run `expert_fn` on expert-major `[E, G, C, d]`, combine back to
  `[G, S, d]`."""
  tokens = x.shape[1]
  if backend == 'gather':
    return gather_combine(expert_fn(gather_dispatch(x, index)), gate, index, tokens)
  if backend == 'onehot':
    dispatch = onehot_dispatch_mask(index, tokens, x.dtype, valid)
    xe = jnp.einsum('gecs,gsd->egcd', dispatch, x, precision=_EXACT)
    ye = expert_fn(xe)
    return jnp.einsum('gecs,gec,egcd->gsd', dispatch, gate.astype(ye.dtype), ye, precision=_EXACT)
  raise ValueError(f"model.moe_backend={backend!r} is invalid: expected one of ['gather', 'onehot']")


# ---- routing and statistics, shared by the single-device and the expert-parallel paths --------------------

def route(xg: jax.Array, router: jax.Array, cfg: ModelConfig, train: bool):
  """Groups `[G, Sg, d]` → `(logits, probs, gate, index, valid, chosen)`, router math in float32. `valid` and
  `chosen` are None for expert choice."""
  logits = jnp.einsum('gsd,de->gse', xg.astype(jnp.float32), router)
  probs = jax.nn.softmax(logits, axis=-1)                          # over experts
  cap = cfg.capacity_for(xg.shape[1], train)
  if cfg.routing == 'expert_choice':
    gate, index = routing.expert_choice(probs, cap)
    return logits, probs, gate, index, None, None
  gate, index, valid, chosen = routing.token_choice(probs, cfg.top_k, cap)
  return logits, probs, gate, index, valid, chosen


def routing_stats(logits, gate, index, valid, top_k: int, total: Callable = lambda a: a,
                  shards: int = 1) -> dict[str, jax.Array]:
  """The 'moe_stats' values for one set of groups. Under expert parallelism each device holds `1/shards` of the
  groups; `total` sums a value over those devices (identity on one device), so every statistic is the one a
  single device would compute over all groups. experts_per_token stays per device: `[G, Sg]`."""
  sg = jax.lax.stop_gradient
  groups, experts, _ = index.shape
  group_len = logits.shape[1]
  filled = jnp.ones(index.shape, jnp.int32) if valid is None else valid.astype(jnp.int32)
  counts = jax.vmap(lambda f, i: jax.ops.segment_sum(f.reshape(-1), i.reshape(-1), num_segments=group_len))(
      filled, index)                                               # [G, Sg] experts per token
  tokens = groups * group_len * shards
  hist = total(jnp.sum(jax.nn.one_hot(counts, experts + 1, dtype=jnp.float32), axis=(0, 1))) / tokens
  used = total(jnp.sum(filled))
  stats = {
      'experts_per_token': counts,
      'experts_per_token_hist': hist,
      'unrouted_fraction': hist[0],
      'mean_gate': sg(total(jnp.sum(gate)) / jnp.maximum(used, 1)),
      'router_logit_rms': sg(jnp.sqrt(total(jnp.sum(jnp.square(logits))) / (tokens * experts))),
  }
  if valid is not None:
    stats['dropped_fraction'] = 1.0 - used / (tokens * top_k)
  return stats


# ---- the layer ------------------------------------------------------------------------------------------

class MoEFFN(nn.Module):
  """E full-width GeLU experts behind a float32 router; see the module docstring for routing and stats.

  Called under `jax.set_mesh(mesh)` with a mesh that has ecdit's axes (data, fsdp, expert, model) and more
  than one device, the layer runs expert-parallel inside `jax.shard_map` (ecdit.layers.moe.parallel) with
  the same results; otherwise it runs the single-device computation below."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    check_moe_config(cfg)
    batch, tokens, width = x.shape
    if width != cfg.width:
      raise ValueError(f'MoEFFN: input width {width} != model.width={cfg.width}')
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    experts, hidden = cfg.num_experts, cfg.mlp_ratio * cfg.width

    router = self.param('router', nn.with_logical_partitioning(
        nn.initializers.normal(cfg.router_init_std), ('embed', 'expert')), (width, experts), jnp.float32)
    param = lambda name, init, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, axes), shape, param_dtype)
    wi = param('wi', _expert_kernel_init, (experts, width, hidden), ('expert', 'embed', 'mlp'))
    bi = param('bi', nn.initializers.zeros_init(), (experts, hidden), ('expert', 'mlp'))
    wo = param('wo', _expert_kernel_init, (experts, hidden, width), ('expert', 'mlp', 'embed'))
    bo = param('bo', nn.initializers.zeros_init(), (experts, width), ('expert', 'embed'))

    want_stats = self.is_mutable_collection('moe_stats') and not self.is_initializing()
    want_aux = cfg.routing == 'token_choice' and not self.is_initializing()
    from ecdit.layers.moe import parallel as moe_parallel  # parallel builds on this module; import at use
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
    dtype = jnp.dtype(cfg.dtype)
    xg = group_tokens(x, cfg)                                        # [G, Sg, d]
    logits, probs, gate, index, valid, chosen = route(xg, router, cfg, train)
    aux = None if chosen is None else routing.load_balance_loss(probs, chosen)
    cast = lambda a: a.astype(dtype)  # noqa: E731
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
