"""The bfloat16 matmuls (`ecdit.layers.matmul`) against numpy: float32 products of the bfloat16 values, rounded
once to bfloat16, forward and both gradients; every product of the bfloat16 gradient stays on the fast form
(bfloat16 operands, float32 result); float32 operands are the plain path bit for bit."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ecdit.layers import matmul

BF16 = jnp.bfloat16


def _bf16(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), BF16)


def _round(a):          # float32 numpy → bfloat16, round to nearest even (as XLA's convert)
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


def _close(got, want):  # one bfloat16 ulp: numpy and XLA add the float32 terms in different orders
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)


def _dense(x, w):
  return matmul.dense_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dots(f, *args):
  """(operand dtypes, result dtype) of every dot_general in the jaxpr of f (custom VJPs' rules included)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          inner = getattr(sub, 'jaxpr', None)
          if inner is not None:
            walk(getattr(inner, 'jaxpr', inner))
  walk(jax.make_jaxpr(f)(*args).jaxpr)
  return found


def test_dense_bf16_forward_and_gradients_match_numpy():
  rng = np.random.default_rng(0)
  x, w, g = _bf16(rng, 2, 3, 8), _bf16(rng, 8, 5), _bf16(rng, 2, 3, 5)
  y, vjp = jax.vjp(_dense, x, w)
  assert y.dtype == BF16
  xn, wn, gn = (np.asarray(a, np.float32) for a in (x, w, g))
  _close(y, _round(xn @ wn))
  dx, dw = vjp(g)
  assert dx.dtype == dw.dtype == BF16
  _close(dx, _round(gn @ wn.T))
  _close(dw, _round(xn.reshape(6, 8).T @ gn.reshape(6, 5)))


def test_experts_bf16_forward_and_gradients_match_numpy():
  rng = np.random.default_rng(1)
  x, w, g = _bf16(rng, 3, 2, 4, 8), _bf16(rng, 3, 8, 6), _bf16(rng, 3, 2, 4, 6)
  y, vjp = jax.vjp(matmul.expert_matmul, x, w)
  xn, wn, gn = (np.asarray(a, np.float32) for a in (x, w, g))
  _close(y, _round(np.einsum('egcd,edh->egch', xn, wn)))
  dx, dw = vjp(g)
  _close(dx, _round(np.einsum('egch,edh->egcd', gn, wn)))
  _close(dw, _round(np.einsum('egcd,egch->edh', xn, gn)))


def test_bf16_gradient_keeps_every_product_on_the_fast_form():
  rng = np.random.default_rng(2)
  x, w, we = _bf16(rng, 4, 8), _bf16(rng, 8, 8), _bf16(rng, 2, 8, 8)

  def loss(x, w, we):
    h = _dense(x, w)
    return jnp.sum(matmul.expert_matmul(h.reshape(2, 1, 2, 8), we).astype(jnp.float32) ** 2)
  dots = _dots(jax.grad(loss, argnums=(0, 1, 2)), x, w, we)
  assert len(dots) == 6, dots          # two forward products, four gradient products
  assert set(dots) == {(('bfloat16', 'bfloat16'), 'float32')}, dots


def test_float32_is_the_plain_path():
  rng = np.random.default_rng(3)
  x, w = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32), jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  np.testing.assert_array_equal(_dense(x, w), jax.lax.dot_general(x, w, (((1,), (0,)), ((), ()))))
  xe, we = x.reshape(2, 1, 2, 8), jnp.stack([w, 2 * w])
  np.testing.assert_array_equal(matmul.expert_matmul(xe, we), jnp.einsum('egcd,edh->egch', xe, we))
  assert _dots(_dense, x, w) == [(('float32', 'float32'), 'float32')]


def test_remat_dots_saves_the_bfloat16_products_too(capsys):
  """train.remat='dots' keeps the weight-matmul outputs in bfloat16 compute as in float32: the custom VJP hides
  its dot from jax's dots policy, so the policy also saves them by name."""
  from jax.ad_checkpoint import print_saved_residuals   # jax's public view of what a policy saves

  from ecdit.models.stack import checkpoint_policy

  def f(x, w1, w2):
    return jnp.sum(_dense(jnp.tanh(_dense(x, w1)), w2).astype(jnp.float32))
  for dt in (jnp.float32, BF16):
    x, w1, w2 = jnp.ones((8, 16), dt), jnp.ones((16, 32), dt), jnp.ones((32, 4), dt)
    print_saved_residuals(jax.checkpoint(f, policy=checkpoint_policy('dots')), x, w1, w2)
    saved = sorted(line.split()[0].split('[')[1] for line in capsys.readouterr().out.splitlines())
    assert saved == ['16,32]', '32,4]', '8,16]', '8,32]'], (dt, saved)   # the arguments, and the first product


def test_the_model_dense_takes_the_fast_form():
  """Through flax: `logical_dense` in bfloat16 compute (float32 parameters, as training keeps them) runs its
  forward and gradient products on the fast form — flax passes no result type that would bypass it."""
  import flax.linen as nn

  from ecdit.layers.dense import logical_dense
  layer = logical_dense(8, ('embed', 'mlp'), 'wi', jnp.bfloat16, jnp.float32)
  x = jnp.ones((4, 16), BF16)
  params = nn.unbox(layer.init(jax.random.key(0), x))

  def loss(params, x):
    return jnp.sum(layer.apply(params, x).astype(jnp.float32) ** 2)
  dots = _dots(jax.grad(loss, argnums=(0, 1)), params, x)
  assert len(dots) == 3 and set(dots) == {(('bfloat16', 'bfloat16'), 'float32')}, dots
