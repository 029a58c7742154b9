"""Rectified-flow objective and ODE samplers (with stand-in velocity fields whose answers are known)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit.diffusion import flow, sampler


def test_t_sampling():
  k = jax.random.key(0)
  t = flow.sample_t(k, 20000)
  assert t.shape == (20000,) and float(t.min()) > 0 and float(t.max()) < 1
  assert abs(float(jnp.median(t)) - 0.5) < 0.01            # logit-normal(0, 1) is symmetric about 1/2
  t = flow.sample_t(k, 20000, mean=1.0, std=0.5)
  assert abs(float(jnp.median(t)) - float(jax.nn.sigmoid(1.0))) < 0.01
  # logit(t) is the normal it came from: N(1, 0.5²) (the standard error of either estimate is < 0.004)
  logit = np.log(np.asarray(t, np.float64) / (1 - np.asarray(t, np.float64)))
  assert abs(logit.mean() - 1.0) < 0.02 and abs(logit.std() - 0.5) < 0.02
  u = flow.sample_t(k, 20000, sampling='uniform')
  assert abs(float(jnp.mean(u)) - 0.5) < 0.01 and abs(float(jnp.var(u)) - 1 / 12) < 0.003
  with pytest.raises(ValueError, match='t_sampling'):
    flow.sample_t(k, 4, sampling='cubic')


def test_interpolation_and_target():
  x0, eps = jnp.full((2, 4, 4, 3), 0.5), jnp.full((2, 4, 4, 3), -1.0)
  xt = flow.interpolate(x0, eps, jnp.array([0.0, 1.0]))
  np.testing.assert_array_equal(xt[0], x0[0])
  np.testing.assert_array_equal(xt[1], eps[1])
  np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.array([0.25, 0.25])), 0.25 * -1 + 0.75 * 0.5)
  # d x_t / dt is the target.
  np.testing.assert_array_equal(flow.velocity_target(x0, eps), eps - x0)


def test_keep_idx():
  assert flow.num_kept(256, 0.5) == 128 and flow.num_kept(64, 0.0) == 64 and flow.num_kept(4, 0.99) == 1
  idx = np.asarray(flow.random_keep_idx(jax.random.key(1), 3, 16, 8))
  assert idx.shape == (3, 8) and idx.dtype == np.int32
  for row in idx:
    assert len(set(row)) == 8 and list(row) == sorted(row) and row.max() < 16
  assert not np.array_equal(idx[0], idx[1])


def _oracle(keep_ratio_target=False):
  """An apply_fn that predicts the exact velocity: it sees x_t and t, and x0 is known (a constant)."""
  x0_value = 0.25

  def apply_fn(params, x, t, ids, mask, keep_idx):
    tt = t.reshape(-1, 1, 1, 1)
    eps = (x - (1 - tt) * x0_value) / tt
    v = eps - x0_value
    if keep_idx is not None:
      v = jnp.take_along_axis(flow.patchify(v, 2), keep_idx[:, :, None], axis=1)
    return v * params, {'losses': {'a': (jnp.float32(0.5),)}, 'moe_stats': {}}
  return apply_fn, x0_value


@pytest.mark.parametrize('mask_ratio', [0.0, 0.5])
def test_flow_loss(mask_ratio):
  apply_fn, x0_value = _oracle()
  batch = {'x0': jnp.full((4, 8, 8, 3), x0_value), 'text': jnp.zeros((4, 5), jnp.int32),
           'text_mask': jnp.ones((4, 5), bool)}
  key = jax.random.key(3)
  loss, aux = flow.flow_loss(apply_fn, 1.0, batch, key, mask_ratio=mask_ratio, patch_size=2)
  assert float(aux['flow_loss']) < 1e-8 and float(aux['aux_loss']) == 0.5
  np.testing.assert_allclose(loss, 0.5, atol=1e-6)


@pytest.mark.parametrize('mask_ratio', [0.0, 0.5])
def test_flow_loss_is_the_mse_assembled_by_hand(mask_ratio):
  """A model predicting the constant 0.3 sees x_t, t and the kept positions (passed back through its
  collections). From those alone: ε = (x_t − (1−t)·x0)/t (the interpolation solved for the noise), the
  target ε − x0 in 2×2 patches (row-major over the patch grid), the kept rows, and the loss is the mean of
  (0.3 − target)² over them. A constant prediction makes the order inside a patch irrelevant, so the
  patches are cut here by plain numpy reshapes."""
  b, hw, c, p, x0_value = 4, 8, 3, 2, 0.25
  batch = {'x0': jnp.full((b, hw, hw, c), x0_value), 'text': jnp.zeros((b, 5), jnp.int32),
           'text_mask': jnp.ones((b, 5), bool)}

  def apply_fn(params, x, t, ids, mask, keep_idx):
    n = (hw // p) ** 2 if keep_idx is None else keep_idx.shape[1]
    shape = (b, hw, hw, c) if keep_idx is None else (b, n, p * p * c)
    return jnp.full(shape, 0.3), {'moe_stats': {'x': x, 't': t, 'keep': keep_idx}}
  loss, aux = flow.flow_loss(apply_fn, None, batch, jax.random.key(3), mask_ratio=mask_ratio, patch_size=p)
  seen = aux['moe_stats']
  x, t = np.asarray(seen['x'], np.float64), np.asarray(seen['t'], np.float64)
  assert t.shape == (b,) and np.all((t > 0) & (t < 1)) and len(set(t.tolist())) == b   # one t per image
  eps = (x - (1 - t[:, None, None, None]) * x0_value) / t[:, None, None, None]
  # the noise is standard normal (768 values: the standard error of the std is 0.026)
  assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1) < 0.12
  target = (eps - x0_value).reshape(b, hw // p, p, hw // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  target = target.reshape(b, (hw // p) ** 2, p * p * c)                                # [B, N, patch_dim]
  if mask_ratio:
    keep = np.asarray(seen['keep'])
    assert keep.shape == (b, 8)                                                        # half of 16 tokens
    target = np.stack([target[i, keep[i]] for i in range(b)])
  else:
    assert seen['keep'] is None
  want = np.mean(np.square(0.3 - target))
  np.testing.assert_allclose(float(aux['flow_loss']), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)    # no balance loss sown


class _Linear:
  """A 'model' whose velocity is the exact rectified-flow velocity towards a fixed image per prompt:
  x0 = ids[:, :1] / 10 broadcast. Straight paths make Euler exact."""

  def apply(self, variables, x, t, ids, mask, train=False):
    x0 = (ids[:, :1].astype(jnp.float32) / 10.0 * mask[:, :1]).reshape(-1, 1, 1, 1)
    tt = t.reshape(-1, 1, 1, 1)
    eps = (x - (1 - tt) * x0) / jnp.maximum(tt, 1e-6)
    return eps - x0 + variables['params'] * 0


def test_euler_and_heun_on_an_ode_with_a_known_solution():
  """dx/dt = x from t=1 to t=0 (x(0) = x(1)/e). With h = 1/N, one Euler step multiplies x by (1 - h) and
  one Heun step by (1 - h + h²/2), the last interval being Euler: closed forms, and errors of order 1 and 2."""
  x1 = jnp.full((1, 2, 2, 1), 0.8, jnp.float32)
  ids, mask = jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool)

  def solve(method, n):
    return float(sampler.integrate(lambda p, x, t, i, m: x, None, x1, ids, mask, ids, mask, num_steps=n,
                                   cfg_scale=1.0, method=method)[0, 0, 0, 0])

  errors = {}
  for n in (8, 16, 32):
    h = 1.0 / n
    assert solve('euler', n) == pytest.approx(0.8 * (1 - h) ** n, rel=1e-5)
    assert solve('heun', n) == pytest.approx(0.8 * (1 - h + h * h / 2) ** (n - 1) * (1 - h), rel=1e-5)
    errors[n] = {m: abs(solve(m, n) - 0.8 / np.e) for m in ('euler', 'heun')}
  for n in (8, 16):   # halving h halves Euler's error and quarters Heun's
    assert 1.8 < errors[n]['euler'] / errors[2 * n]['euler'] < 2.2
    assert 3.4 < errors[n]['heun'] / errors[2 * n]['heun'] < 4.6


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_sampler_reaches_target_and_is_deterministic(method):
  model = _Linear()
  ids = jnp.array([[3, 0], [5, 0]], jnp.int32)
  mask = jnp.ones((2, 2), bool)
  null_ids, null_mask = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), bool)
  run = sampler.make_sampler(model, image_shape=(4, 4, 3), num_steps=4, cfg_scale=1.0, method=method)
  x = run(jnp.float32(0), ids, mask, null_ids, null_mask, 7)
  np.testing.assert_allclose(x[0], 0.3, atol=1e-5)
  np.testing.assert_allclose(x[1], 0.5, atol=1e-5)
  np.testing.assert_array_equal(x, run(jnp.float32(0), ids, mask, null_ids, null_mask, 7))
  # Guidance: v_u points to x0 = 0 (the empty caption), so scale s lands on s·x0 (paths stay straight).
  run2 = sampler.make_sampler(model, image_shape=(4, 4, 3), num_steps=4, cfg_scale=2.0, method=method)
  x2 = run2(jnp.float32(0), ids, mask, null_ids, null_mask, 7)
  np.testing.assert_allclose(x2[0], 0.6, atol=1e-4)
  np.testing.assert_allclose(x2[1], 1.0, atol=1e-4)  # 1.0 after clipping to [-1, 1]


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_integrate_records_each_steps_start_state_and_first_call_aux(method):
  """v = x (exponential paths): Euler multiplies x by 1 + dt per step, Heun by 1 + dt + dt²/2 (its last
  step by 1 + dt); aux is what the first model call of each step returned (here its t, per model row)."""
  n, dt = 4, -0.25
  noise = jnp.arange(1.0, 7.0).reshape(2, 3)
  ids, mask = jnp.ones((2, 1), jnp.int32), jnp.ones((2, 1), bool)
  null_ids, null_mask = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), bool)
  kw = dict(num_steps=n, cfg_scale=2.0, method=method)
  x, (states, aux) = sampler.integrate(lambda p, xx, t, i, m: (xx, t), None, noise, ids, mask, null_ids,
                                       null_mask, has_aux=True, **kw)
  g = 1 + dt if method == 'euler' else 1 + dt + dt * dt / 2
  np.testing.assert_allclose(states, np.stack([np.asarray(noise) * g ** k for k in range(n)]), rtol=1e-6)
  np.testing.assert_allclose(x, np.asarray(noise) * g ** (n - 1) * (1 + dt), rtol=1e-6)
  np.testing.assert_allclose(aux, np.repeat([[1.0], [0.75], [0.5], [0.25]], 4, 1))   # guided: 2B rows
  plain = sampler.integrate(lambda p, xx, t, i, m: xx, None, noise, ids, mask, null_ids, null_mask, **kw)
  np.testing.assert_array_equal(x, plain)


def test_settings_and_sampler_for_run():
  import types
  sample_cfg = types.SimpleNamespace(num_steps=4, cfg_scale=2.0, sampler='heun')
  assert sampler.settings(sample_cfg) == (4, 2.0, 'heun')
  assert sampler.settings(sample_cfg, num_steps=2, cfg_scale=0.0, method='euler') == (2, 0.0, 'euler')
  model = _Linear()
  model.config = types.SimpleNamespace(image_size=4, in_channels=3)

  class Tok:
    def encode_batch(self, texts):
      return (np.array([[len(t), 0] for t in texts], np.int32), np.array([[bool(t), False] for t in texts]))
  run = types.SimpleNamespace(model=model, params=jnp.float32(0), tokenizer=Tok(), decode=None,
                              cfg=types.SimpleNamespace(sample=sample_cfg))
  images = sampler.sampler_for_run(run, cfg_scale=1.0)(['abc', 'abcde'], 7)
  # straight paths to x0 = len(prompt) / 10: 0.3 → uint8 round(1.3·127.5) = 166, 0.5 → 191
  assert images.dtype == np.uint8 and images.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(images[0], 166)
  np.testing.assert_array_equal(images[1], 191)


def test_grid_and_png(tmp_path):
  imgs = np.zeros((5, 4, 4, 3), np.uint8)
  imgs[1] = 255
  g = sampler.make_grid(imgs, pad=1)
  assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3)  # 5 images: 3 columns, 2 rows
  assert (g[1:5, 6:10] == 255).all() and (g[1:5, 1:5] == 0).all()
  np.testing.assert_array_equal(sampler.to_uint8(np.array([-1.0, 0.0, 1.0])), [0, 128, 255])
  from PIL import Image
  p = sampler.save_png(g, tmp_path / 'g.png')
  assert np.array_equal(np.asarray(Image.open(p)), g)
