"""The MoE FFN: backends against each other and a naive loop, dense parity, routing scopes, token choice, stats,
bad input. Tiny float32 shapes: B=3 images of S=8 tokens, width 8, hidden 16, E=4 experts, C=4."""
import dataclasses
import functools
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_util import run_cli

from ecdit.layers import moe, routing
from ecdit.layers.moe import router as moe_router
from ecdit.config.model import ModelConfig

B, S, D, E = 3, 8, 8, 4
# A large router init so routing depends clearly on the input (the default 0.006 makes probs ~1/E).
BASE = ModelConfig(width=D, num_heads=1, mlp_ratio=2, num_experts=E, capacity_factor=2.0, router_init_std=1.0)
TOKEN_CHOICE = dataclasses.replace(BASE, routing='token_choice', top_k=2, capacity_factor=0.5)


def cfg_with(base=BASE, **changes):
  return dataclasses.replace(base, **changes)


@functools.partial(jax.jit, static_argnums=(0, 3))
def apply(cfg, params, x, train=True):
  """(y, collections) with stats and losses mutable. Jitted: one compile per config beats op-by-op here."""
  return moe.MoEFFN(cfg).apply({'params': params}, x, train=train, mutable=['moe_stats', 'losses'])


@pytest.fixture(scope='module')
def x():
  return jax.random.normal(jax.random.key(0), (B, S, D))


@pytest.fixture(scope='module')
def params(x):
  variables = moe.MoEFFN(BASE).init(jax.random.key(1), x, train=True)
  assert set(variables) == {'params'}  # init sows no stats or losses
  return nn.unbox(variables['params'])


# ---- naive reference: python loop over experts with the assignment computed in numpy ---------------------

def naive_capacity(cfg, tokens):
  """Slots per expert per group from the paper's C = S·f_c/E (token choice: S·f_c·k/E, GShard), rounded down,
  at least 1 and at most S; exact rational arithmetic, not the code's float product."""
  k = cfg.top_k if cfg.routing == 'token_choice' else 1
  c = Fraction(tokens) * Fraction(str(cfg.capacity_factor)) * k // cfg.num_experts
  return int(min(max(c, 1), tokens))


def naive_logits_probs(cfg, params, x):
  """Router logits and softmax probabilities `[G, Sg, E]` of the groups of `x`, in float64 numpy."""
  xg = np.asarray(moe.group_tokens(x, cfg), np.float64)
  logits = xg @ np.asarray(params['router'], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return logits, probs / probs.sum(-1, keepdims=True)


def naive_assignments(cfg, params, x):
  """[(group, token, expert)] for the groups of `x`, from float64 numpy routing."""
  _, probs = naive_logits_probs(cfg, params, x)
  groups, tokens, experts = probs.shape
  cap = naive_capacity(cfg, tokens)
  out = []
  for g in range(groups):
    if cfg.routing == 'expert_choice':
      for e in range(experts):
        out += [(g, int(s), e) for s in np.argsort(-probs[g, :, e], kind='stable')[:cap]]
    else:  # serve all first choices in position order, then all second choices, ...
      taken = [0] * experts
      order = np.argsort(-probs[g], axis=-1, kind='stable')
      for rank in range(cfg.top_k):
        for s in range(tokens):
          e = int(order[s, rank])
          if taken[e] < cap:
            taken[e] += 1
            out.append((g, s, e))
  return out


def naive_moe(cfg, params, x, assignments):
  """y = Σ over (g, s, e) assignments of probs[g, s, e] · expert_e(x[g, s]), one expert at a time."""
  xg = moe.group_tokens(x, cfg)
  probs = jax.nn.softmax(jnp.einsum('gsd,de->gse', xg, params['router']), axis=-1)
  y = jnp.zeros_like(xg)
  for e in range(cfg.num_experts):
    g = np.array([a[0] for a in assignments if a[2] == e], np.int32)
    s = np.array([a[1] for a in assignments if a[2] == e], np.int32)
    if not len(g):
      continue
    h = jax.nn.gelu(xg[g, s] @ params['wi'][e] + params['bi'][e], approximate=moe.GELU_APPROXIMATE)
    out = h @ params['wo'][e] + params['bo'][e]
    y = y.at[g, s].add(probs[g, s, e][:, None] * out)
  return y.reshape(x.shape)


def loss_and_grads(fn, params, x, cotangent):
  return jax.jit(jax.value_and_grad(lambda p, xx: jnp.sum(fn(p, xx) * cotangent), argnums=(0, 1)))(params, x)


@pytest.fixture(scope='module', params=['expert_choice', 'token_choice'])
def three_way(request, params, x):
  """Loss and gradients of gather, onehot and the naive loop, for one routing kind."""
  base = BASE if request.param == 'expert_choice' else TOKEN_CHOICE
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  results = {}
  for backend in ('gather', 'onehot'):
    cfg = cfg_with(base, moe_backend=backend)
    results[backend] = loss_and_grads(lambda p, xx, c=cfg: apply(c, p, xx)[0], params, x, cotangent)
  assignments = naive_assignments(base, params, x)
  results['naive'] = loss_and_grads(lambda p, xx: naive_moe(base, p, xx, assignments), params, x, cotangent)
  return results


@pytest.mark.parametrize('backend', ['gather', 'onehot'])
def test_backend_matches_naive_loop(three_way, backend):
  (loss, (g_params, g_x)), (ref_loss, (ref_params, ref_x)) = three_way[backend], three_way['naive']
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, ref_x, atol=1e-5)
  assert set(g_params) == set(ref_params) == {'router', 'wi', 'bi', 'wo', 'bo'}
  for name in g_params:
    np.testing.assert_allclose(g_params[name], ref_params[name], atol=1e-5, err_msg=name)


def test_gather_matches_onehot_forward(params, x):
  for base in (BASE, TOKEN_CHOICE, cfg_with(routing_scope='batch'), cfg_with(routing_scope='group', group_size=12)):
    y_gather, stats_gather = apply(cfg_with(base, moe_backend='gather'), params, x)
    y_onehot, stats_onehot = apply(cfg_with(base, moe_backend='onehot'), params, x)
    np.testing.assert_allclose(y_gather, y_onehot, atol=1e-6)
    np.testing.assert_array_equal(stats_gather['moe_stats']['experts_per_token'][0],
                                  stats_onehot['moe_stats']['experts_per_token'][0])


def test_router_gets_gradient_through_gates(three_way):
  _, (g_params, _) = three_way['gather']
  assert float(jnp.linalg.norm(g_params['router'])) > 1e-4


# ---- dense parity ------------------------------------------------------------------------------------------

def test_dense_parity_when_every_expert_takes_every_token(params, x):
  # f_c = E → C = S: each token goes through all E experts with gates summing to 1 (softmax), so identical
  # experts give exactly the dense FFN.
  cfg = cfg_with(capacity_factor=float(E))
  assert cfg.capacity_for(S, True) == S
  dense = moe.make_ffn(cfg, sparse=False)
  dense_params = nn.unbox(dense.init(jax.random.key(3), x, train=True)['params'])
  shared = dict(params,
                wi=jnp.broadcast_to(dense_params['wi']['kernel'], params['wi'].shape),
                bi=jnp.broadcast_to(dense_params['wi']['bias'], params['bi'].shape),
                wo=jnp.broadcast_to(dense_params['wo']['kernel'], params['wo'].shape),
                bo=jnp.broadcast_to(dense_params['wo']['bias'], params['bo'].shape))
  y_dense = dense.apply({'params': dense_params}, x, train=True)
  for backend in ('gather', 'onehot'):
    y_moe, _ = apply(cfg_with(cfg, moe_backend=backend), shared, x)
    np.testing.assert_allclose(y_moe, y_dense, atol=1e-5)
  y_distinct, _ = apply(cfg, params, x)  # independently initialised experts: not the dense FFN
  assert float(jnp.max(jnp.abs(y_distinct - y_dense))) > 1e-2


# ---- routing scope -----------------------------------------------------------------------------------------

def test_image_scope_output_independent_of_batch(params, x):
  y_batch, _ = apply(BASE, params, x)
  y_alone, _ = apply(BASE, params, x[1:2])
  np.testing.assert_allclose(y_batch[1], y_alone[0], atol=1e-6)
  y_other, _ = apply(BASE, params, jnp.stack([x[0], x[2]]))
  np.testing.assert_allclose(y_batch[0], y_other[0], atol=1e-6)


@pytest.mark.parametrize('scope', [dict(routing_scope='group', group_size=2 * S), dict(routing_scope='batch')])
def test_groups_spanning_images_couple_their_outputs(params, x, scope):
  cfg = cfg_with(**scope)
  y_ab, _ = apply(cfg, params, x[:2])
  y_ac, _ = apply(cfg, params, jnp.stack([x[0], x[2]]))
  assert float(jnp.max(jnp.abs(y_ab[0] - y_ac[0]))) > 1e-4


def test_batch_scope_equals_one_group_of_all_tokens(params, x):
  y_batch, _ = apply(cfg_with(routing_scope='batch'), params, x)
  y_group, _ = apply(cfg_with(routing_scope='group', group_size=B * S), params, x)
  np.testing.assert_array_equal(y_batch, y_group)


# ---- token choice ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', ['gather', 'onehot'])
def test_token_choice_dropped_tokens_get_zero_and_loss_is_sown(params, x, backend):
  cfg = cfg_with(TOKEN_CHOICE, top_k=1, moe_backend=backend)  # C = floor(8·0.5·1/4) = 1: most tokens dropped
  y, out = apply(cfg, params, x)
  counts = out['moe_stats']['experts_per_token'][0]
  expected_counts = np.zeros((B, S), np.int32)
  for g, s, _ in naive_assignments(cfg, params, x):
    expected_counts[g, s] += 1
  np.testing.assert_array_equal(counts, expected_counts)
  dropped = expected_counts == 0
  assert dropped.sum() >= B * (S - E)  # each expert takes at most one token per image
  np.testing.assert_array_equal(np.asarray(y)[dropped], 0.0)
  assert np.all(np.abs(np.asarray(y)[~dropped]).max(-1) > 0)
  probs = jax.nn.softmax(x @ params['router'], axis=-1)
  top1 = jax.nn.one_hot(jnp.argmax(probs, -1), E)
  expected = cfg.aux_loss_weight * routing.load_balance_loss(probs, top1)
  np.testing.assert_allclose(out['losses']['aux_loss'][0], expected, rtol=1e-6)
  np.testing.assert_allclose(out['moe_stats']['dropped_fraction'][0], 1 - counts.sum() / (B * S), rtol=1e-6)


def test_expert_choice_sows_no_aux_loss(params, x):
  _, out = apply(BASE, params, x)
  assert 'losses' not in out


# ---- statistics --------------------------------------------------------------------------------------------

# capacity_factor=1.3: C = floor(8·1.3/4) = floor(2.6) = 2, a product the rounding rule matters for
@pytest.mark.parametrize('scope', [dict(), dict(routing_scope='group', group_size=12), dict(routing_scope='batch'),
                                   dict(capacity_factor=1.3)])
def test_stats_consistent(params, x, scope):
  cfg = cfg_with(**scope)
  _, out = apply(cfg, params, x)
  stats = {k: v[0] for k, v in out['moe_stats'].items()}
  counts = np.asarray(stats['experts_per_token'])
  assert counts.shape == (B, S) and counts.dtype == np.int32
  group_len = cfg.group_size or (S if cfg.routing_scope == 'image' else B * S)
  per_group = counts.reshape(-1, group_len).sum(-1)
  np.testing.assert_array_equal(per_group, E * naive_capacity(cfg, group_len))
  hist = np.bincount(counts.ravel(), minlength=E + 1) / counts.size
  np.testing.assert_allclose(stats['experts_per_token_hist'], hist, rtol=1e-6)
  np.testing.assert_allclose(stats['unrouted_fraction'], hist[0], rtol=1e-6)
  # mean gate: the router probability of every (token, expert) assignment of the numpy plan, averaged
  logits, probs = naive_logits_probs(cfg, params, x)
  plan = naive_assignments(cfg, params, x)
  np.testing.assert_allclose(stats['mean_gate'], np.mean([probs[g, s, e] for g, s, e in plan]), rtol=1e-5)
  np.testing.assert_allclose(stats['router_logit_rms'], np.sqrt(np.mean(np.square(logits))), rtol=1e-5)


def test_token_choice_top2_stats_by_hand():
  """One group of 4 tokens, 3 experts, k=2, C=2. Requests are served rank by rank: first choices
  t0→e0, t1→e1, t2→e0, t3→e1 fill e0 and e1; then t0→e1 and t1→e0 find them full (dropped), t2→e2 and
  t3→e2 fit. (Served token by token instead, t2's first choice would be the one dropped.)"""
  probs = np.array([[[0.5, 0.4, 0.1],
                     [0.4, 0.5, 0.1],
                     [0.6, 0.1, 0.3],
                     [0.1, 0.6, 0.3]]], np.float32)
  logits = np.log(probs)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def plan_and_stats(routing_kind, capacity):   # one compile each instead of many eager ops
    if routing_kind == 'tc':
      gate, index, valid, chosen = routing.token_choice(jnp.asarray(probs), 2, capacity)
      return (gate, index, valid, chosen), moe_router.routing_stats(jnp.asarray(logits), gate, index, valid, 2)
    gate, index = routing.expert_choice(jnp.asarray(probs), capacity)
    return (gate, index), moe_router.routing_stats(jnp.asarray(logits), gate, index, None, 1)

  (gate, index, valid, chosen), stats = plan_and_stats('tc', 2)
  np.testing.assert_array_equal(index, [[[0, 2], [1, 3], [2, 3]]])
  np.testing.assert_array_equal(valid, np.ones((1, 3, 2), bool))
  np.testing.assert_allclose(gate, [[[0.5, 0.6], [0.5, 0.6], [0.3, 0.3]]], rtol=1e-6)
  np.testing.assert_array_equal(chosen, [[[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 1, 1]]])
  np.testing.assert_array_equal(stats['experts_per_token'], [[1, 1, 2, 2]])
  np.testing.assert_allclose(stats['experts_per_token_hist'], [0, 0.5, 0.5, 0])
  assert float(stats['unrouted_fraction']) == 0
  np.testing.assert_allclose(stats['dropped_fraction'], 2 / 8, rtol=1e-6)          # 2 of 4·2 requests
  np.testing.assert_allclose(stats['mean_gate'], 2.8 / 6, rtol=1e-6)               # (.5+.6+.5+.6+.3+.3)/6
  np.testing.assert_allclose(stats['router_logit_rms'], np.sqrt(np.mean(logits.astype(np.float64) ** 2)),
                             rtol=1e-6)
  # Expert choice on the same probabilities, C=1: e0 and e2 take t2, e1 takes t3 (3 filled slots).
  (gate, index), stats = plan_and_stats('ec', 1)
  np.testing.assert_array_equal(index, [[[2], [3], [2]]])
  np.testing.assert_array_equal(stats['experts_per_token'], [[0, 0, 2, 1]])
  np.testing.assert_allclose(stats['experts_per_token_hist'], [0.5, 0.25, 0.25, 0])
  np.testing.assert_allclose(stats['unrouted_fraction'], 0.5)
  np.testing.assert_allclose(stats['mean_gate'], (0.6 + 0.6 + 0.3) / 3, rtol=1e-6)
  assert 'dropped_fraction' not in stats


def test_token_choice_top2_layer_stats_match_the_naive_plan(params, x):
  """Through the layer at k=2 with C = floor(8·0.7·2/4) = floor(2.8) = 2: the experts per token, the dropped
  share and the mean gate of the numpy plan."""
  cfg = cfg_with(TOKEN_CHOICE, capacity_factor=0.7)
  _, out = apply(cfg, params, x)
  stats = {k: v[0] for k, v in out['moe_stats'].items()}
  plan = naive_assignments(cfg, params, x)
  counts = np.zeros((B, S), np.int32)
  for g, s, _ in plan:
    counts[g, s] += 1
  np.testing.assert_array_equal(stats['experts_per_token'], counts)
  assert len(plan) < B * S * 2                                  # some requests were dropped
  np.testing.assert_allclose(stats['dropped_fraction'], 1 - len(plan) / (B * S * 2), rtol=1e-6)
  _, probs = naive_logits_probs(cfg, params, x)
  np.testing.assert_allclose(stats['mean_gate'], np.mean([probs[g, s, e] for g, s, e in plan]), rtol=1e-5)


def test_eval_capacity_factor_used_at_eval(params, x):
  cfg = cfg_with(eval_capacity_factor=1.0)
  _, out_train = apply(cfg, params, x, train=True)
  _, out_eval = apply(cfg, params, x, train=False)
  assert int(out_train['moe_stats']['experts_per_token'][0].sum()) == B * E * 4  # C = 8·2/4
  assert int(out_eval['moe_stats']['experts_per_token'][0].sum()) == B * E * 2   # C = 8·1/4


# ---- dtypes, params, factory -------------------------------------------------------------------------------

def test_bfloat16_compute_keeps_router_float32(x):
  cfg = cfg_with(dtype='bfloat16')
  variables = moe.MoEFFN(cfg).init(jax.random.key(1), x, train=True)
  params = nn.unbox(variables['params'])
  assert params['router'].dtype == jnp.float32 and params['wi'].dtype == jnp.float32
  y16, out16 = apply(cfg, params, x)
  y32, out32 = apply(BASE, params, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out16['moe_stats']['experts_per_token'][0],
                                out32['moe_stats']['experts_per_token'][0])
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05 * float(jnp.abs(y32).max()))


def test_param_logical_axes(x):
  boxed = moe.MoEFFN(BASE).init(jax.random.key(1), x, train=True)['params']
  names = {k: v.names for k, v in boxed.items()}
  assert names == {'router': ('embed', 'expert'), 'wi': ('expert', 'embed', 'mlp'), 'bi': ('expert', 'mlp'),
                   'wo': ('expert', 'mlp', 'embed'), 'bo': ('expert', 'embed')}
  dense = moe.make_ffn(BASE, sparse=False).init(jax.random.key(1), x, train=False)['params']
  assert dense['wi']['kernel'].names == ('embed', 'mlp') and dense['wo']['kernel'].names == ('mlp', 'embed')
  assert dense['wi']['bias'].names == ('mlp',) and dense['wo']['bias'].names == ('embed',)


def test_make_ffn_picks_layer_by_block():
  cfg = BASE  # moe_every=2: blocks 1, 3, ... are sparse
  assert isinstance(moe.make_ffn(cfg, cfg.is_sparse_block(1)), moe.MoEFFN)
  assert isinstance(moe.make_ffn(cfg, cfg.is_sparse_block(0)), moe.DenseFFN)
  assert moe.make_ffn(cfg, False).hidden == 2 * D


# ---- bad input: ValueError naming the field, raised while tracing (before any compile) --------------------

@pytest.mark.parametrize('changes,needle', [
    (dict(moe_backend='scatter'), 'moe_backend'),
    (dict(routing_scope='sequence'), 'routing_scope'),
    (dict(capacity_factor=0.0), 'capacity_factor'),
    (dict(capacity_factor=-2.0), 'capacity_factor'),
    (dict(eval_capacity_factor=0.0), 'eval_capacity_factor'),
    (dict(num_experts=0), 'num_experts'),
    (dict(routing='dense'), 'routing'),
    (dict(routing_scope='group', group_size=5), r'group_size=5.*3·8 = 24'),
    (dict(routing_scope='group'), 'group_size'),
])
def test_bad_config_raises_before_compile(x, changes, needle):
  cfg = cfg_with(**changes)
  with pytest.raises(ValueError, match=needle):
    jax.eval_shape(lambda xx: moe.MoEFFN(cfg).init(jax.random.key(0), xx, train=True), x)


# ---- the benchmark stays runnable ---------------------------------------------------------------------------

def test_bench_routing_runs_tiny():
  from ecdit.bench import routing as bench_routing
  lines = []
  rows = bench_routing.run(tokens=512, reps=1, warmup=0, experts=(4,), groups=(256, 512), width=64,
                           log=lines.append)
  assert [(r.experts, r.group, r.groups, r.capacity) for r in rows] == [(4, 256, 2, 128), (4, 512, 1, 256)]
  assert all(r.ms[b] > 0 and r.temp_mib[b] > 0 for r in rows for b in ('gather', 'onehot'))
  assert lines[-1].count('\n') == 3  # header, rule, two rows
  bad = run_cli('bench', 'nonesuch', timeout=120)
  assert bad.returncode != 0 and "'routing'" in bad.stderr, bad.stderr


def test_bench_routing_refuses_bad_flags_before_measuring():
  from ecdit.bench import routing as bench_routing
  good = dict(tokens=512, reps=1, warmup=0, experts=(4,), groups=(256, 512))
  bench_routing.check_args(**good)
  for change, needle in [(dict(tokens=0), '--tokens=0'), (dict(tokens=300), '--tokens=300'),
                         (dict(groups=(768,)), '--group_sizes=768'), (dict(experts=(-3,)), '--experts=-3'),
                         (dict(reps=0), '--reps=0')]:
    with pytest.raises(ValueError, match=f'^{needle}.* is invalid'):
      bench_routing.check_args(**{**good, **change})
  with pytest.raises(ValueError, match='^--tokens=0'):   # run() checks first, instead of 0 meaning the default
    bench_routing.run(tokens=0, log=lambda s: pytest.fail(f'measured: {s}'))
  # More experts than a group's tokens, or than memory holds: refused before anything is allocated.
  with pytest.raises(ValueError, match=r'^--experts=100000000 is invalid: expected at most 256, the tokens of the '
                                       r'smallest routing group \(--group_sizes=256,1024,4096\)'):
    bench_routing.run(quick=True, experts=(8, 10**8), log=lambda s: pytest.fail(f'measured: {s}'))
  with pytest.raises(ValueError, match=r'^--experts=256 is invalid: its expert weights and gradients at d=64 need '
                                       r'0\.1 GiB, more than this machine\'s 0\.0 GiB of memory$'):
    bench_routing.check_args(**{**good, 'experts': (256,)}, width=64, memory=2**20)


def test_bench_profile_and_parts_bound_the_expert_count():
  from ecdit.bench import suite as bench_suite
  bench_suite.check_bench_experts([8, 64], memory=64 * 2**30)
  with pytest.raises(ValueError, match=r'^--experts=257 is invalid: expected at most 256, the tokens per image'):
    bench_suite.check_bench_experts([8, 257])
  # 64 experts × 6 sparse layers × (w_in + w_out: 2·384·1536) × 4 bytes × 5 copies = 8.44 GiB
  with pytest.raises(ValueError, match=r'^--experts=64 is invalid: .* need 8\.4 GiB, more than this machine\'s '
                                       r'4\.0 GiB'):
    bench_suite.check_bench_experts([64], memory=4 * 2**30)
