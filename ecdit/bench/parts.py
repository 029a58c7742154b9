"""`ecdit bench parts [--experts=8,64] [--batch=8]`: the two costs that separate EC from dense and E=64 from E=8.

1. The parameter update alone (`ecdit.train.update.fused_adamw_ema`, jitted, state donated) on the parameter
   tree of the suite's dense model and of its EC models: expert-choice layers hold E full-width experts, and
   a float32 AdamW + EMA step moves every parameter whatever the activated compute.
2. The expert matmuls alone, in the shapes one MoE layer of the suite's model gives them at f_c=2
   (`[E, G·C, d] @ [E, d, 4d]` with G·C = batch · 2 · tokens / E rows per expert): forward `X·W`, input
   gradient `dH·Wᵀ` and weight gradient `Xᵀ·dH`, each as GFLOP/s. Fewer rows per expert (more experts at a
   fixed f_c) makes all three slower on XLA:CPU, the weight gradient most.

All cases take turns within each rep (`ecdit.bench.timing`); medians in ms. docs/performance.md reads it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ecdit.bench import suite
from ecdit.bench.timing import time_interleaved
from ecdit.train import update


def _update_fn(cfg):
  """A no-argument function running one fused AdamW + EMA update in place on `cfg`'s parameters (the
  training set-up's optimizer state, `suite.train_setup`)."""
  setup = suite.train_setup(cfg, batch=8)
  st = setup.init_state()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), st.params)
  count = sum(p.size for p in jax.tree.leaves(st.params))

  def step(p, opt, ema, g):
    norm = optax.global_norm(g)
    return update.fused_adamw_ema(setup.cfg.train, setup.lr_schedule, g, norm, jnp.isfinite(norm), p, opt, ema,
                                  0.999)[:3]
  jitted = jax.jit(step, donate_argnums=(0, 1, 2))
  holder = {'s': (st.params, st.opt_state, st.ema_params)}

  def fn():
    holder['s'] = jitted(*holder['s'], grads)
    return holder['s'][0]
  return fn, count


def _matmul_fns(experts: int, rows: int, d: int, h: int):
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (experts, rows, d))
  w = jax.random.normal(k[1], (experts, d, h))
  dh = jax.random.normal(k[2], (experts, rows, h))
  fwd = jax.jit(lambda x, w: jnp.einsum('end,edh->enh', x, w))
  dx = jax.jit(lambda dh, w: jnp.einsum('enh,edh->end', dh, w))
  dw = jax.jit(lambda x, dh: jnp.einsum('end,enh->edh', x, dh))
  return {'fwd X·W': lambda: fwd(x, w), 'dX dH·Wᵀ': lambda: dx(dh, w), 'dW Xᵀ·dH': lambda: dw(x, dh)}


def run(experts=(8, 64), batch: int = 8, reps: int = 5, warmup: int = 1, model_overrides: dict | None = None,
        log=print) -> dict:
  over = dict(model_overrides or {})
  m = {**suite.BENCH_MODEL, **over}
  d, h = m['width'], m['width'] * m.get('mlp_ratio', 4)
  tokens = (m['image_size'] // m['patch_size']) ** 2
  out = {'update_ms': {}, 'params': {}, 'matmul_ms': {}, 'matmul_gflops': {}}
  # Update: one EC case at a time in turns with the dense one (the E=64 state is several GB); the dense
  # figure kept is that of the last pair.
  dense_fn, out['params']['dense'] = _update_fn(suite.bench_config(**{**over, 'routing': 'dense'}))
  for e in experts:
    fn, out['params'][f'ec_e{e}'] = _update_fn(suite.bench_config(**{**over, 'num_experts': e}))
    ms = time_interleaved({'dense': dense_fn, f'ec_e{e}': fn}, (), warmup, reps)
    out['update_ms'].update(ms)
    del fn
  log('update alone (fused AdamW + EMA, in place):')
  for k, ms in out['update_ms'].items():
    n = out['params'][k]
    arrays = suite.UPDATE_ARRAYS_PER_PARAM
    log(f'  {k:8s} {n / 1e6:7.1f} M params  {ms:8.1f} ms  {n * 4 * arrays / ms / 1e6:6.1f} GB/s ({arrays} arrays)')
  log(f'expert matmuls of one MoE layer at f_c=2, batch {batch} ({tokens} tokens/image, d={d}, hidden {h}):')
  for e in experts:
    rows = batch * 2 * tokens // e
    fns = _matmul_fns(e, rows, d, h)
    ms = time_interleaved(fns, (), warmup, reps)
    flops = 2.0 * e * rows * d * h
    for name, t in ms.items():
      key = f'E={e} {name}'
      out['matmul_ms'][key], out['matmul_gflops'][key] = t, flops / (t * 1e-3) / 1e9
      log(f'  E={e:<3d} {rows:5d} rows/expert  {name:10s} {t:7.1f} ms  {out["matmul_gflops"][key]:6.1f} GFLOP/s')
  return out
