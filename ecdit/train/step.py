"""One training step (loss, gradients, update, EMA, NaN policy) and its jit with explicit shardings."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ecdit import parallel
from ecdit.diffusion import flow
from ecdit.models import stack
from ecdit.train import update as update_lib
from ecdit.train.state import TrainState, all_finite, ema_decay_at, ema_update, step_key


MAX_LOGGED_VECTOR = 16


def summarize_moe_stats(stats) -> dict[str, jax.Array]:
  """Averages each sown statistic over the layers that sowed it: {'moe/<name>': mean}. Small vectors
  (e.g. the experts-per-token histogram) are kept; larger arrays (per-token maps) become their mean."""
  groups = defaultdict(list)
  for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
    names = [getattr(k, 'key', None) for k in path]
    names = [n for n in names if isinstance(n, str)]
    if names:
      groups[names[-1]].append(jnp.asarray(leaf, jnp.float32))
  out = {}
  for name, leaves in sorted(groups.items()):
    if all(l.shape == leaves[0].shape for l in leaves):
      v = jnp.mean(jnp.stack(leaves), axis=0)
      out[f'moe/{name}'] = v if v.size <= MAX_LOGGED_VECTOR else jnp.mean(v)
    else:
      out[f'moe/{name}'] = jnp.mean(jnp.stack([jnp.mean(l) for l in leaves]))
  return out


def make_apply_fn(model) -> Callable[..., Any]:
  """`(params, x, t, text, mask, keep_idx) -> (prediction, collections)`, the sown statistics per block
  (unrolled, whatever the stack's layout)."""
  def apply_fn(params, x, t, text, mask, keep_idx):
    out, col = model.apply({'params': params}, x, t, text, mask, train=True, keep_idx=keep_idx,
                           mutable=['moe_stats', 'losses'])
    return out, {**col, 'moe_stats': stack.to_unrolled(dict(col.get('moe_stats', {})), model.config)}
  return apply_fn


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, cfg, patch_size: int,
                    fused: bool | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure step. Per-step randomness is fold_in(seed key, step), so a resumed run repeats it exactly.

  A non-finite loss or gradient norm, or an update that would make the parameters non-finite (an overflow),
  leaves params, optimizer state and EMA unchanged (the step counter still advances and `skipped` counts
  it); metrics['finite'] tells the loop, which stops under nan_policy='stop', or after
  train.max_skipped_steps consecutive skips under 'skip'. Either way a non-finite state is never produced,
  so never checkpointed. The skip is a select: a finite step's arithmetic does not depend on it.

  AdamW (the default) takes the fused update of `ecdit.train.update` (same numbers as the optax chain, a
  fraction of its memory traffic); other optimizers go through optax.
  """
  apply_fn = make_apply_fn(model)
  d, t = cfg.diffusion, cfg.train
  loss_kwargs = dict(t_sampling=d.t_sampling, t_mean=float(d.t_mean), t_std=float(d.t_std),
                     mask_ratio=float(d.mask_ratio), patch_size=patch_size)
  ema_decay = float(t.ema_decay)
  fused = update_lib.supports(t) if fused is None else fused

  def train_step(state: TrainState, batch):
    key = step_key(state)

    def loss_fn(params):
      return flow.flow_loss(apply_fn, params, batch, key, **loss_kwargs)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    decay = ema_decay_at(state.step, ema_decay)
    if fused:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)   # and, checked there, the new parameters
      params, opt_state, ema, finite = update_lib.fused_adamw_ema(t, lr_schedule, grads, grad_norm, finite,
                                                                  state.params, state.opt_state,
                                                                  state.ema_params, decay)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema = ema_update(state.ema_params, params, decay)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)   # an overflow too

      def pick(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state, ema = (pick(params, state.params), pick(opt_state, state.opt_state),
                                pick(ema, state.ema_params))

    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                              skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {'loss': loss, 'flow_loss': aux['flow_loss'], 'aux_loss': aux['aux_loss'],
               'grad_norm': grad_norm, 'lr': lr_schedule(state.step), 'finite': finite,
               'skipped': new_state.skipped}
    metrics.update(summarize_moe_stats(aux['moe_stats']))
    return new_state, metrics

  return train_step


def jit_train_step(train_step, mesh: Mesh, state_shardings, batch_shardings=None):
  """jit with explicit in/out shardings and the state donated: one compile, reused on every call.

  The step is traced inside `mesh` (its abstract mesh and the logical-axis rules), whatever context the
  caller is in: the MoE layers see the mesh and run expert-parallel, and the model's logical constraints
  resolve through `ecdit.parallel.LOGICAL_RULES`. Metrics come back replicated on every device."""
  batch_shardings = batch_shardings or parallel.batch_sharding(mesh)

  def step_in_mesh(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), parallel.activation_rules():
      return train_step(state, batch)

  return jax.jit(step_in_mesh, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))
