"""Mixed precision: optimizer moments stored in bfloat16 (train.moment_dtype), computed in float32, against
numpy written from the AdamW and RMSProp equations with the moments rounded to bfloat16; the float32 default
unchanged; a bfloat16-parameter, bfloat16-compute train step end to end."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from ecdit.config import experiment as config_lib
from ecdit.train import optim
from ecdit.train import update as update_lib

LR, WD, CLIP = 1e-2, 0.05, 1.0


def _train_cfg(**over):
  t = config_lib.base_config().train
  t.learning_rate, t.warmup_steps, t.weight_decay, t.grad_clip = LR, 0, WD, CLIP
  for k, v in over.items():
    t[k] = v
  return t


def _params():
  r = np.random.RandomState(0)
  return {'a': jnp.asarray(r.normal(size=(7, 5)), jnp.float32), 'b': jnp.asarray(r.normal(size=(3, 6)), jnp.float32)}


def _grads(step):
  r = np.random.RandomState(100 + step)   # norms above and below CLIP: both branches of the clip
  return jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape) * (0.1 if step else 0.5), jnp.float32),
                      _params())


def _bf16(x):
  """Rounded to bfloat16 (nearest even), back in float32."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _clip(gs):
  norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in gs))
  return [g * np.float32(min(1.0, CLIP / norm)) for g in gs]


def _adamw_reference(steps, t):
  """numpy AdamW (decoupled decay, bias correction, clipped gradients); m, v stored rounded to bfloat16."""
  ps = [np.asarray(p) for p in jax.tree.leaves(_params())]
  ms, vs = [np.zeros_like(p) for p in ps], [np.zeros_like(p) for p in ps]
  for n in range(1, steps + 1):
    gs = _clip([np.asarray(g) for g in jax.tree.leaves(_grads(n - 1))])
    for i, g in enumerate(gs):
      m = (1 - t.b1) * g + t.b1 * ms[i]
      v = (1 - t.b2) * g * g + t.b2 * vs[i]
      u = (m / (1 - t.b1 ** n)) / (np.sqrt(v / (1 - t.b2 ** n)) + t.eps) + WD * ps[i]
      ps[i] = (ps[i] - LR * u).astype(np.float32)
      ms[i], vs[i] = _bf16(m), _bf16(v)
  return ps, ms, vs


def _rmsprop_reference(steps, t):
  """numpy RMSProp with momentum as optax composes it (eps inside the root, momentum over lr-scaled steps);
  nu and the momentum trace stored rounded to bfloat16."""
  ps = [np.asarray(p) for p in jax.tree.leaves(_params())]
  nus, trs = [np.zeros_like(p) for p in ps], [np.zeros_like(p) for p in ps]
  for n in range(steps):
    gs = _clip([np.asarray(g) for g in jax.tree.leaves(_grads(n))])
    for i, g in enumerate(gs):
      nu = t.rms_decay * nus[i] + (1 - t.rms_decay) * g * g
      tr = -LR * g / np.sqrt(nu + t.eps) + t.momentum * trs[i]
      ps[i] = (ps[i] + tr).astype(np.float32)
      nus[i], trs[i] = _bf16(nu), _bf16(tr)
  return ps, nus, trs


def _floats(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _assert_close(got, want, what, atol=0.0):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-6, atol=atol, err_msg=what)


def _assert_steps_close(got, want, p0, what):
  """The parameters' change over the steps, so a bfloat16 update (~3 digits, ~1e-4 here) cannot hide behind
  their size; atol: the float32 rounding of parameters of size ~1, once per step."""
  _assert_close([g - a for g, a in zip(jax.tree.leaves(got), p0)], [r - a for r, a in zip(want, p0)], what,
                atol=1e-6)


def test_bad_moment_dtype_is_one_line_naming_the_choices():
  c = config_lib.base_config()
  c.train.moment_dtype = 'float16'
  with pytest.raises(config_lib.ConfigError,
                     match=r"^train.moment_dtype='float16' is invalid: expected one of \['float32', 'bfloat16'\]$"):
    config_lib.validate(c)


@pytest.mark.parametrize('optimizer', ['adamw', 'rmsprop'])
def test_moment_dtype_sets_the_state_dtype_and_the_default_is_optax_unchanged(optimizer):
  params = _params()
  state = optim.make_optimizer(_train_cfg(optimizer=optimizer, moment_dtype='bfloat16')).init(params)
  default = optim.make_optimizer(_train_cfg(optimizer=optimizer)).init(params)
  assert {x.dtype for x in _floats(state)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in _floats(default)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.structure(state) == jax.tree.structure(default)   # fused path, shardings, checkpoints
  t = _train_cfg(optimizer=optimizer)
  lr = optim.schedule(t)
  inner = (optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=WD) if optimizer == 'adamw' else
           optax.rmsprop(lr, decay=t.rms_decay, eps=t.eps, momentum=t.momentum))
  plain = optax.chain(optax.clip_by_global_norm(CLIP), inner)   # what make_optimizer built before the key
  tx, st, pst = optim.make_optimizer(t), default, plain.init(params)
  for n in range(2):   # the default's updates are bit for bit the plain chain's
    u, st = tx.update(_grads(n), st, params)
    pu, pst = plain.update(_grads(n), pst, params)
    assert jax.tree.structure((u, st)) == jax.tree.structure((pu, pst))
    for a, b in zip(jax.tree.leaves((u, st)), jax.tree.leaves((pu, pst))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fused_adamw_with_bfloat16_moments_matches_the_equations():
  t = _train_cfg(moment_dtype='bfloat16')
  tx, lr = optim.make_optimizer(t), optim.schedule(t)
  params = _params()
  opt_state, ema = tx.init(params), params

  @jax.jit
  def fused(params, opt_state, ema, grads):
    norm = optax.global_norm(grads)
    return update_lib.fused_adamw_ema(t, lr, grads, norm, jnp.isfinite(norm), params, opt_state, ema,
                                      jnp.float32(0.5))

  @jax.jit
  def chained(params, opt_state, grads):   # the optax path (optim.stored_in) must agree with it
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  p_opt, s_opt = params, opt_state
  for n in range(3):   # steps 2 and 3 read the rounded moments
    params, opt_state, ema, applied = fused(params, opt_state, ema, _grads(n))
    assert bool(applied)
    p_opt, s_opt = chained(p_opt, s_opt, _grads(n))
  ref_p, ref_m, ref_v = _adamw_reference(3, t)
  assert {x.dtype for x in _floats((opt_state, s_opt))} == {jnp.dtype(jnp.bfloat16)}
  p0 = [np.asarray(p) for p in jax.tree.leaves(_params())]
  for path, got_p, st in (('fused', params, opt_state), ('optax', p_opt, s_opt)):
    adam = update_lib._find(st, optax.ScaleByAdamState)
    got_m, got_v = adam.mu, adam.nu
    _assert_steps_close(got_p, ref_p, p0, f'{path} params')
    _assert_close(jax.tree.leaves(got_m), ref_m, f'{path} m')
    _assert_close(jax.tree.leaves(got_v), ref_v, f'{path} v')


def test_rmsprop_with_bfloat16_moments_matches_the_equations():
  t = _train_cfg(optimizer='rmsprop', moment_dtype='bfloat16')
  tx = optim.make_optimizer(t)
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for n in range(3):
    params, state = step(params, state, _grads(n))
  ref_p, ref_nu, ref_tr = _rmsprop_reference(3, t)
  nu = update_lib._find(state, optax.ScaleByRmsState).nu
  trace = update_lib._find(state, optax.TraceState).trace
  assert {x.dtype for x in _floats(state)} == {jnp.dtype(jnp.bfloat16)}
  p0 = [np.asarray(p) for p in jax.tree.leaves(_params())]
  _assert_steps_close(params, ref_p, p0, 'params')
  _assert_close(jax.tree.leaves(nu), ref_nu, 'nu')
  _assert_close(jax.tree.leaves(trace), ref_tr, 'trace')


def test_resuming_with_another_moment_dtype_is_refused(tmp_path):
  from ecdit.train import loop
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  (tmp_path / 'config.json').write_text('{"resolved_model": {}, "train": {}}')   # from before the key
  c = config_lib.base_config()
  mcfg = config_lib.validate(c)
  loop.check_layout_matches_run(tmp_path, mcfg, c.train)   # float32, as older runs stored them
  c.train.moment_dtype = 'bfloat16'
  with pytest.raises(config_lib.ConfigError, match=r"^train.moment_dtype='bfloat16' does not match the "
                                                   r"checkpoints .*--config.train.moment_dtype=float32, or"):
    loop.check_layout_matches_run(tmp_path, mcfg, c.train)


@pytest.mark.slow   # the module's one train-step compile (bfloat16 compiles slower than float32 on XLA:CPU)
def test_a_bfloat16_train_step_end_to_end():
  """bfloat16 parameters, compute and moments: one step trains (finite loss, applied, moments bfloat16),
  and the router keeps its float32 weights."""
  from _train_util import Batches, tiny_config
  from ecdit.parallel import batch_sharding
  from ecdit.train import loop
  cfg = tiny_config(moment_dtype='bfloat16')
  cfg.model.dtype = cfg.model.param_dtype = 'bfloat16'
  cfg.model.depth = cfg.model.moe_every = 1   # one MoE block: its router is what stays float32
  setup = loop.build(cfg)
  state = setup.init_state()
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  routers = {jax.tree_util.keystr(k) for k, _ in flat if 'router' in jax.tree_util.keystr(k)}
  assert routers
  for k, x in flat:
    want = jnp.float32 if jax.tree_util.keystr(k) in routers else jnp.bfloat16
    assert x.dtype == want, jax.tree_util.keystr(k)
  assert {x.dtype for x in _floats(state.opt_state)} == {jnp.dtype(jnp.bfloat16)}
  before = jax.tree.map(np.asarray, state.params)
  new, metrics = setup.train_step(state, next(Batches(cfg, batch_sharding(setup.mesh))))
  assert bool(metrics['finite']) and np.isfinite(float(metrics['loss'])) and int(new.skipped) == 0
  assert jax.tree.map(lambda a: a.dtype, new.params) == jax.tree.map(lambda a: a.dtype, state.params)
  assert any(np.any(np.asarray(a, np.float32) != np.asarray(b, np.float32))
             for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before)))
  assert {x.dtype for x in _floats(new.opt_state)} == {jnp.dtype(jnp.bfloat16)}
