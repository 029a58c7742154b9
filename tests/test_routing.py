"""Routing functions on small hand-computed inputs: capacity rounding, expert choice, token choice, balance loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit.layers import routing


@pytest.mark.parametrize('tokens,experts,factor,expected', [
    (256, 8, 2.0, 64),     # S·f/E exact
    (128, 64, 2.0, 4),     # EC-DiT-M per image at training
    (10, 4, 1.0, 2),       # 2.5 rounds down
    (3, 8, 1.0, 1),        # 0.375 → clipped up to 1
    (4, 1, 2.0, 4),        # 8 → clipped down to S
    (100, 1, 0.29, 29),    # 28.999999999999996 in binary floats; still 29
    (7, 2, 1, 3),          # integer factor accepted
])
def test_capacity_rounding(tokens, experts, factor, expected):
  assert routing.capacity(tokens, experts, factor) == expected


@pytest.mark.parametrize('args,needle', [
    ((16, 4, 0.0), 'factor=0.0'),
    ((16, 4, -1.0), 'factor=-1.0'),
    ((16, 0, 2.0), 'num_experts=0'),
    ((16, 2.5, 2.0), 'num_experts=2.5'),
    ((0, 4, 2.0), 'group_tokens=0'),
])
def test_capacity_rejects_bad_values(args, needle):
  with pytest.raises(ValueError, match=needle):
    routing.capacity(*args)


def test_expert_choice_hand_case_with_ties():
  # One group, 4 tokens, 2 experts. Expert 0 scores [.5, .7, .5, .1]: tokens 0 and 2 tie at .5.
  probs = jnp.array([[[0.5, 0.5], [0.7, 0.3], [0.5, 0.5], [0.1, 0.9]]], jnp.float32)
  gate, index = routing.expert_choice(probs, 3)
  assert index.dtype == jnp.int32 and gate.shape == index.shape == (1, 2, 3)
  np.testing.assert_array_equal(index, [[[1, 0, 2], [3, 0, 2]]])
  np.testing.assert_allclose(gate, [[[0.7, 0.5, 0.5], [0.9, 0.5, 0.5]]])


def test_expert_choice_all_equal_picks_lowest_positions():
  probs = jnp.full((2, 6, 4), 0.25, jnp.float32)
  _, index = routing.expert_choice(probs, 3)
  np.testing.assert_array_equal(index, np.broadcast_to([0, 1, 2], (2, 4, 3)))


def test_expert_choice_matches_stable_sort_with_many_ties():
  rng = np.random.RandomState(0)
  probs = rng.randint(0, 4, size=(3, 50, 5)).astype(np.float32) / 4  # heavy ties; softmax-ness irrelevant
  gate, index = routing.expert_choice(jnp.asarray(probs), 17)
  expected = np.argsort(-np.swapaxes(probs, 1, 2), axis=-1, kind='stable')[..., :17]
  np.testing.assert_array_equal(index, expected)
  np.testing.assert_array_equal(gate, np.take_along_axis(np.swapaxes(probs, 1, 2), expected, axis=-1))


def test_expert_choice_gradient_flows_through_gate_only():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 8, 4)), axis=-1)
  gate, index = routing.expert_choice(probs, 3)
  assert jnp.issubdtype(index.dtype, jnp.integer)  # integers: no tangent, nothing for the router to learn from
  weights = jax.random.normal(jax.random.key(1), gate.shape)
  grad = jax.grad(lambda p: jnp.sum(routing.expert_choice(p, 3)[0] * weights))(probs)
  # d/dprobs[g, s, e] = weight of the slot holding token s at expert e, zero where e did not pick s.
  expected = np.zeros(probs.shape, np.float32)
  for g in range(2):
    for e in range(4):
      for c in range(3):
        expected[g, index[g, e, c], e] += weights[g, e, c]
  np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_expert_choice_rejects_bad_capacity():
  with pytest.raises(ValueError, match='capacity=9'):
    routing.expert_choice(jnp.ones((1, 8, 2)) / 2, 9)


def test_token_choice_priority_by_rank_then_position():
  # Token 0: e0 > e1; token 1: e1 > e0; token 2: e2 > e1. k = 2.
  probs = jnp.array([[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]], jnp.float32)
  # C = 1: only first choices fit, although token 0's second choice (e1) comes earlier in position than
  # token 1's first choice of e1.
  gate, index, valid, chosen = routing.token_choice(probs, 2, 1)
  np.testing.assert_array_equal(index, [[[0], [1], [2]]])
  np.testing.assert_array_equal(valid, np.ones((1, 3, 1), bool))
  np.testing.assert_allclose(gate, [[[0.6], [0.7], [0.7]]])
  np.testing.assert_array_equal(chosen, [[[1, 1, 0], [1, 1, 0], [0, 1, 1]]])
  # C = 2: second choices of tokens 0 and 1 fit; token 2's second choice (e1) is the third request → dropped.
  gate, index, valid, _ = routing.token_choice(probs, 2, 2)
  np.testing.assert_array_equal(index, [[[0, 1], [1, 0], [2, 0]]])
  np.testing.assert_array_equal(valid, [[[True, True], [True, True], [True, False]]])
  np.testing.assert_allclose(gate, [[[0.6, 0.2], [0.7, 0.3], [0.7, 0.0]]])


def test_token_choice_top1_drops_overflow_in_position_order():
  probs = jnp.array([[[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]]], jnp.float32)
  gate, index, valid, _ = routing.token_choice(probs, 1, 2)
  np.testing.assert_array_equal(index, [[[0, 1], [0, 0]]])
  np.testing.assert_array_equal(valid, [[[True, True], [False, False]]])
  np.testing.assert_allclose(gate, [[[0.9, 0.8], [0.0, 0.0]]])


def test_load_balance_loss_hand_cases():
  # Balanced: each expert gets one of two tokens → f = [.5, .5]; P = [.55, .45]; loss = 2·(.275 + .225) = 1.
  probs = jnp.array([[[0.9, 0.1], [0.2, 0.8]]])
  mask = jnp.array([[[1, 0], [0, 1]]])
  np.testing.assert_allclose(routing.load_balance_loss(probs, mask), 1.0, rtol=1e-6)
  # Collapsed: both tokens to expert 0 → f = [1, 0]; P = [.8, .2]; loss = 2·.8 = 1.6.
  probs = jnp.array([[[0.9, 0.1], [0.7, 0.3]]])
  mask = jnp.array([[[1, 0], [1, 0]]])
  np.testing.assert_allclose(routing.load_balance_loss(probs, mask), 1.6, rtol=1e-6)
  # Uniform router with top-2 of 4: f = P = 1/4 per expert → 1 regardless of k.
  probs = jnp.full((1, 4, 4), 0.25)
  mask = jnp.array([[[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]]])
  np.testing.assert_allclose(routing.load_balance_loss(probs, mask), 1.0, rtol=1e-6)


def test_load_balance_loss_gradient_reaches_probs_not_mask():
  probs = jnp.array([[[0.9, 0.1], [0.7, 0.3]]])
  mask = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
  g_probs, g_mask = jax.grad(routing.load_balance_loss, argnums=(0, 1))(probs, mask)
  np.testing.assert_allclose(g_probs, [[[1.0, 0.0], [1.0, 0.0]]], rtol=1e-6)  # E·f_e/S = 2·1/2
  np.testing.assert_array_equal(g_mask, 0.0)
