"""The paper's training paths against hand-built references: token masking (kept tokens carry their own
positions; the masked step's loss is the velocity MSE on the kept tokens), the RMSProp (optax) branch of the
step with its EMA and non-finite skip, and the skip on a non-finite gradient whose loss is finite.

The references are numpy from the equations: patchify by slicing, the 2-D sin-cos table from its formula,
RMSProp/EMA by hand. The optimizer tests run the real `make_train_step` on a stub model whose loss and
gradient are known in closed form, so they compile in milliseconds.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ecdit.layers.dit import DiTBlock
from ecdit.parallel import batch_sharding
from ecdit.train import loop, optim
from ecdit.train import state as state_lib
from ecdit.train.step import make_train_step

from _train_util import Batches, tiny_config


# ---- numpy references ---------------------------------------------------------------------------------

def np_patches(x, p):
  """[B, H, W, C] → [B, N, p·p·C]: grid cells row-major, each cell flattened (row, col, channel)."""
  b, h, w, _ = x.shape
  return np.stack([x[:, i:i + p, j:j + p, :].reshape(b, -1) for i in range(0, h, p) for j in range(0, w, p)], 1)


def np_positions(d, grid):
  """Token n = (row i, col j): the first d/2 channels [sin(i·ω_k), cos(i·ω_k)], the last d/2 the same of j,
  with ω_k = 10000^(−k/(d/4)), k < d/4."""
  omega = 10000.0 ** (-np.arange(d // 4) / (d / 4))
  rows = []
  for i in range(grid):
    for j in range(grid):
      rows.append(np.concatenate([np.sin(i * omega), np.cos(i * omega), np.sin(j * omega), np.cos(j * omega)]))
  return np.array(rows)


# ---- token masking ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def masked():
  """shapes_tiny shrunk to one (expert-choice MoE) block, with diffusion.mask_ratio=0.5 (the paper's) and
  random parameters (numpy, so no init compile; LayerNorm scales near 1), so every layer computes something.
  `fwd` is the training-mode call that also returns what enters the first block; `make_state` a fresh train
  state (the step donates it). One block instead of two: the train step compiles ~30% faster."""
  cfg = tiny_config(learning_rate=1e-3)
  cfg.model.depth, cfg.model.moe_every = 1, 1
  cfg.diffusion.mask_ratio = 0.5
  setup = loop.build(cfg)
  rng = np.random.default_rng(7)

  def draw(path, a):
    n = rng.standard_normal(a.shape).astype(np.float32)
    return 1 + 0.1 * n if path[-1].key == 'scale' else 0.1 * n
  params = jax.tree_util.tree_map_with_path(draw, setup.abstract_state.params)
  make_state = jax.jit(lambda p: state_lib.create(p, setup.tx, cfg.seed), out_shardings=setup.state_shardings)

  def grab(store):
    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, DiTBlock) and context.module.name == 'block_0':
        store['tokens'] = args[0]
      return next_fun(*args, **kwargs)
    return interceptor

  @jax.jit
  def fwd(params, x, t, text, mask, keep):
    store = {}
    with nn.intercept_methods(grab(store)):
      out, _ = setup.model.apply({'params': params}, x, t, text, mask, train=True, keep_idx=keep,
                                 mutable=['moe_stats', 'losses'])
    return out, store['tokens']
  return setup, params, make_state, fwd


def _hand_tokens(params, x, keep, mcfg):
  """What must enter the blocks: patch embedding + the position of each token's own grid cell, then
  gathered (keep `[B, K]`)."""
  pe = params['patch_embed']['proj']
  emb = np_patches(np.asarray(x, np.float64), mcfg.patch_size) @ np.asarray(pe['kernel'], np.float64) \
      + np.asarray(pe['bias'], np.float64)
  emb = emb + np_positions(mcfg.width, mcfg.image_size // mcfg.patch_size)[None]
  return np.take_along_axis(emb, np.asarray(keep)[:, :, None], axis=1)


def test_kept_tokens_carry_their_own_positions(masked):
  """Half the tokens kept, in random order: what enters the blocks is the hand-assembled embedding + the
  token's true position, row by row; and keeping the same tokens in another order permutes the output alike
  (attention and per-image expert choice do not see token order). A position table added after the gather
  gives row r the position r, and fails both."""
  setup, params, _, fwd = masked
  mcfg = setup.mcfg
  batch = next(Batches(setup.cfg, batch_sharding(setup.mesh)))
  b, n = setup.cfg.train.batch_size, mcfg.num_tokens
  x = batch['x0'] + 0.3 * jax.random.normal(jax.random.key(1), batch['x0'].shape)
  t = jnp.linspace(0.1, 0.9, b)
  rng = np.random.default_rng(0)
  keep = np.stack([rng.permutation(n)[:n // 2] for _ in range(b)]).astype(np.int32)
  out, tokens = fwd(params, x, t, batch['text'], batch['text_mask'], keep)
  np.testing.assert_allclose(tokens, _hand_tokens(params, x, keep, mcfg), atol=2e-5)
  out2, _ = fwd(params, x, t, batch['text'], batch['text_mask'], keep[:, ::-1])
  np.testing.assert_allclose(out2, np.asarray(out)[:, ::-1], atol=2e-5)
  assert np.abs(np.asarray(out)).max() > 1e-2   # a non-trivial output


def test_masked_train_step_loss_is_flow_loss_on_kept_tokens(masked):
  """One train step with mask_ratio=0.5: its flow loss is the velocity MSE over half the tokens, rebuilt by
  hand — t = sigmoid(u), x_t = t·ε + (1−t)·x0, target ε − x0 patchified and gathered at the kept indices
  (the 8 lowest of a uniform score per token, ascending) — with the model fed those tokens at their true
  positions."""
  setup, params, make_state, fwd = masked
  mcfg = setup.mcfg
  batch = next(Batches(setup.cfg, batch_sharding(setup.mesh)))
  b, n = setup.cfg.train.batch_size, mcfg.num_tokens
  # The step's randomness: fold_in(seed key, step), split into (t, noise, mask) keys.
  k_t, k_noise, k_mask = jax.random.split(jax.random.fold_in(jax.random.key(setup.cfg.seed), 0), 3)
  t = 1.0 / (1.0 + np.exp(-np.asarray(jax.random.normal(k_t, (b,)), np.float64)))
  eps = np.asarray(jax.random.normal(k_noise, batch['x0'].shape), np.float64)
  keep = np.sort(np.argsort(np.asarray(jax.random.uniform(k_mask, (b, n))), axis=1)[:, :n // 2], axis=1)
  x0 = np.asarray(batch['x0'], np.float64)
  tt = t[:, None, None, None]
  x_t = tt * eps + (1 - tt) * x0
  target = np.take_along_axis(np_patches(eps - x0, mcfg.patch_size), keep[:, :, None], axis=1)
  pred, tokens = fwd(params, jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32), batch['text'],
                     batch['text_mask'], jnp.asarray(keep, jnp.int32))
  assert pred.shape == (b, n // 2, mcfg.patch_dim)
  np.testing.assert_allclose(tokens, _hand_tokens(params, x_t, keep, mcfg), atol=2e-5)
  want = np.mean((np.asarray(pred, np.float64) - target) ** 2)

  new, m = setup.train_step(make_state(params), batch)
  assert bool(m['finite']) and np.isfinite(float(m['loss'])) and int(new.skipped) == 0
  np.testing.assert_allclose(float(m['flow_loss']), want, rtol=1e-5)
  assert float(m['aux_loss']) == 0.0 and float(m['loss']) == pytest.approx(want, rel=1e-5)  # expert choice
  # ... not the MSE of a zero prediction: the model's output matters to it
  assert abs(np.mean(target ** 2) - want) > 1e-2


# ---- the update: a stub model with a closed-form loss ---------------------------------------------------

class _Stub:
  """A 'model' predicting the exact velocity plus an offset per channel: with x0 = 0 the target is
  ε = x_t / t, so the flow loss is mean_c(off_c²) with off_c = a_c + ½·Σb + √z. `z = 0` keeps the loss
  finite while its gradient is +inf (d√z/dz at 0)."""
  config = None   # no scanned stack: stack.to_unrolled returns the (empty) statistics as they are

  def apply(self, variables, x, t, text, mask, *, train, keep_idx, mutable):
    del text, mask, train, keep_idx, mutable
    p = variables['params']
    off = p['a'] + 0.5 * jnp.sum(p['b']) + jnp.sqrt(p['z'])
    return x / t[:, None, None, None] + off, {}


def _stub_params(z=1.0):
  return {'a': jnp.array([0.3, -0.2, 0.5]), 'b': jnp.array([[0.1, 0.4], [-0.3, 0.2]]), 'z': jnp.float32(z)}


def _stub_batch():
  return {'x0': jnp.zeros((2, 4, 4, 3)), 'text': jnp.zeros((2, 3), jnp.int32), 'text_mask': jnp.ones((2, 3), bool)}


def _stub_grads(p):
  """∂/∂p of mean_c(off_c²), by hand."""
  off = p['a'] + 0.5 * p['b'].sum() + np.sqrt(p['z'])
  g_off = 2 * off / 3
  return {'a': g_off, 'b': np.full((2, 2), 0.5 * g_off.sum()), 'z': np.float64(g_off.sum() * 0.5 / np.sqrt(p['z']))}


@functools.lru_cache(maxsize=None)   # one compile per optimizer for the module
def _stub_step(optimizer):
  """(train config, the real step jitted, a fresh state) for `optimizer` on the stub model."""
  cfg = tiny_config(optimizer=optimizer, learning_rate=0.1, warmup_steps=0, grad_clip=1.0, ema_decay=0.9,
                    rms_decay=0.8, momentum=0.5, eps=1e-3, weight_decay=0.0, schedule='constant')
  tx = optim.make_optimizer(cfg.train)
  step = jax.jit(make_train_step(_Stub(), tx, optim.schedule(cfg.train), cfg, patch_size=2))
  return cfg, step, lambda: state_lib.create(_stub_params(), tx, seed=0)


def _host(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _opt_part(opt_state, kind):
  """The optax state of type `kind` inside the (nested) optimizer state."""
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind)) if isinstance(s, kind))


def test_rmsprop_step_and_ema_by_hand():
  """Two RMSProp-with-momentum steps (optax: ν ← ρν + (1−ρ)g², u = −lr·g/√(ν+ε), m ← u + μm, p ← p + m), after
  global-norm clipping, and the EMA with its warm-up decay min(d, (1+n)/(10+n)), all by hand."""
  cfg, step, fresh = _stub_step('rmsprop')
  tr = cfg.train
  state = fresh()
  p, ema = _host(state.params), _host(state.params)
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  mom = {k: np.zeros_like(v) for k, v in p.items()}
  norms = []
  for n in range(2):
    g = _stub_grads(p)
    norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    norms.append(norm)
    clip = min(1.0, tr.grad_clip / norm)
    decay = min(tr.ema_decay, (1 + n) / (10 + n))
    for k in p:
      gk = g[k] * clip
      nu[k] = tr.rms_decay * nu[k] + (1 - tr.rms_decay) * gk ** 2
      mom[k] = -tr.learning_rate * gk / np.sqrt(nu[k] + tr.eps) + tr.momentum * mom[k]
      p[k] = p[k] + mom[k]
      ema[k] = decay * ema[k] + (1 - decay) * p[k]
    state, m = step(state, _stub_batch())
    assert bool(m['finite']) and float(m['grad_norm']) == pytest.approx(norm, rel=1e-5)
  assert norms[0] > tr.grad_clip   # the clip is active
  rms, trace = _opt_part(state.opt_state, optax.ScaleByRmsState), _opt_part(state.opt_state, optax.TraceState)
  for k in p:
    np.testing.assert_allclose(state.params[k], p[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.ema_params[k], ema[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rms.nu[k], nu[k], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(trace.trace[k], mom[k], rtol=1e-5, atol=1e-9)
  assert int(state.step) == 2 and int(state.skipped) == 0


@pytest.mark.parametrize('optimizer', ['rmsprop', 'adamw'])   # the optax branch and the fused update
def test_non_finite_gradient_with_finite_loss_is_skipped(optimizer):
  """√z at z = 0: the loss is finite, one gradient is +inf. The step must see it through the gradient
  norm and leave params, EMA and optimizer state bit for bit as they were (after a real step, so the
  moments are non-zero), while the step counter advances and `skipped` counts it."""
  _, step, fresh = _stub_step(optimizer)
  state, _ = step(fresh(), _stub_batch())
  state = state.replace(params={**state.params, 'z': jnp.float32(0.0)})
  before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema_params))
  after, m = step(state, _stub_batch())
  assert np.isfinite(float(m['loss'])) and not np.isfinite(float(m['grad_norm']))
  assert not bool(m['finite']) and int(after.skipped) == 1 and int(after.step) == 2
  got = jax.tree.map(np.asarray, (after.params, after.opt_state, after.ema_params))
  assert jax.tree.structure(got) == jax.tree.structure(before)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(before)):
    np.testing.assert_array_equal(x, y)
  # the moved-away-from-init state is really what was kept (not a reset)
  assert not np.array_equal(np.asarray(after.params['a']), np.asarray(_stub_params()['a']))
