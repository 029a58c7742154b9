"""The fused AdamW + EMA update (ecdit.train.update) against the optax chain it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ecdit.train import optim
from ecdit.train import state as state_lib
from ecdit.train import update as update_lib
from ecdit.config.experiment import base_config


def _train_cfg(**over):
  t = base_config().train
  t.learning_rate, t.warmup_steps, t.num_steps, t.weight_decay, t.grad_clip = 1e-2, 2, 10, 0.05, 1.0
  for k, v in over.items():
    t[k] = v
  return t


def _params(seed=0):
  r = np.random.RandomState(seed)
  return {'a': {'kernel': jnp.asarray(r.normal(size=(7, 5)), jnp.float32), 'bias': jnp.zeros((5,), jnp.float32)},
          'b': jnp.asarray(r.normal(size=(3, 4, 6)), jnp.float32)}


def _grads(step, scale):
  r = np.random.RandomState(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape) * scale, jnp.float32), _params())


def _optax_step(tx, t, st, grads):
  """What the train step did before the fused path: optax chain, apply, EMA, select on finiteness."""
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, st.opt_state, st.params)
  params = optax.apply_updates(st.params, updates)
  ema = state_lib.ema_update(st.ema_params, params, state_lib.ema_decay_at(st.step, t.ema_decay))
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
  pick = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)  # noqa: E731
  return st.replace(step=st.step + 1, params=pick(params, st.params), opt_state=pick(opt_state, st.opt_state),
                    ema_params=pick(ema, st.ema_params))


def _fused_step(tx, t, st, grads):
  del tx
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm)
  params, opt_state, ema, _ = update_lib.fused_adamw_ema(
      t, optim.schedule(t), grads, grad_norm, finite, st.params, st.opt_state, st.ema_params,
      state_lib.ema_decay_at(st.step, t.ema_decay))
  return st.replace(step=st.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def _max_rel(a, b):
  return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('grad_clip', [1.0, 0.0])
def test_fused_matches_optax_chain(grad_clip):
  t = _train_cfg(grad_clip=grad_clip)
  tx = optim.make_optimizer(t)
  ref = state_lib.create(_params(), tx, seed=0)
  new = state_lib.create(_params(), tx, seed=0)
  ref_step, new_step = jax.jit(lambda s, g: _optax_step(tx, t, s, g)), jax.jit(lambda s, g: _fused_step(tx, t, s, g))
  for step in range(6):
    g = _grads(step, scale=0.05 if step % 2 else 3.0)   # odd steps below the clip norm, even steps above
    ref, new = ref_step(ref, g), new_step(new, g)
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(ref.opt_state)
  assert _max_rel(new.params, ref.params) < 1e-6
  assert _max_rel(new.ema_params, ref.ema_params) < 1e-6
  assert _max_rel(new.opt_state, ref.opt_state) < 1e-6
  assert int(new.opt_state[-1][0].count if grad_clip else new.opt_state[0].count) == 6
  assert _max_rel(new.params, _params()) > 1e-3        # it did move


def test_fused_non_finite_step_changes_nothing():
  t = _train_cfg()
  tx = optim.make_optimizer(t)
  st = state_lib.create(_params(), tx, seed=0)
  step = jax.jit(lambda s, g: _fused_step(tx, t, s, g))
  st = step(st, _grads(0, 0.1))
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(1, 0.1))
  after = step(st, bad)
  for x, y in zip(jax.tree.leaves((after.params, after.opt_state, after.ema_params)),
                  jax.tree.leaves((st.params, st.opt_state, st.ema_params))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))   # bit for bit, counts included
  good = step(after, _grads(1, 0.1))                              # and the next finite step still moves
  assert _max_rel(good.params, st.params) > 1e-4


def test_fused_skips_an_update_that_overflows():
  # First step, no clipping or decay: m̂ = g and v̂ = g², so each parameter moves by -lr·g/(|g| + eps) = +lr
  # for g = -1 (eps is below float32's resolution at 1). From 3e38 that is 4e38 > float32's max (3.4e38).
  t = _train_cfg(learning_rate=1e38, warmup_steps=0, grad_clip=0.0, weight_decay=0.0)
  tx = optim.make_optimizer(t)
  g = {'w': -jnp.ones((3,), jnp.float32)}
  step = jax.jit(lambda p: update_lib.fused_adamw_ema(
      t, optim.schedule(t), g, optax.global_norm(g), jnp.bool_(True), p, tx.init(p), p, jnp.float32(0.5)))
  big = {'w': jnp.array([1e38, 3e38, 0.0], jnp.float32)}   # only the middle one overflows: the whole step is skipped
  params, opt_state, ema, applied = step(big)
  assert not bool(applied)
  np.testing.assert_array_equal(params['w'], big['w'])
  np.testing.assert_array_equal(ema['w'], big['w'])
  for x, y in zip(jax.tree.leaves(opt_state), jax.tree.leaves(tx.init(big))):
    np.testing.assert_array_equal(x, y)                            # moments and counts untouched
  ok = {'w': jnp.array([1e38, 2e38, 0.0], jnp.float32)}
  params, _, ema, applied = step(ok)
  assert bool(applied)
  # |u| is 1 up to the float32 rounding of b1, b2 and the bias corrections (~7e-6)
  np.testing.assert_allclose(params['w'], np.float32([2e38, 3e38, 1e38]), rtol=1e-5)
  np.testing.assert_allclose(ema['w'], np.float32([1.5e38, 2.5e38, 0.5e38]), rtol=1e-5)   # 0.5·old + 0.5·new


def test_fused_rejects_a_foreign_state():
  t = _train_cfg()
  with pytest.raises(ValueError, match='adamw'):
    update_lib.fused_adamw_ema(t, optim.schedule(t), _params(), jnp.float32(1), jnp.bool_(True), _params(),
                               (optax.EmptyState(),), _params(), jnp.float32(0.9))
  assert update_lib.supports(_train_cfg()) and not update_lib.supports(_train_cfg(optimizer='rmsprop'))
