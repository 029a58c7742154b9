"""Smoke test of `ecdit bench suite` on a tiny config, and the analytic FLOP count against a hand computation."""
import json

import pytest

from ecdit.bench import flops, suite
from ecdit.config.model import ModelConfig

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)

KEYS = ('peak_gflops', 'mfu', 'achieved_gflops', 'ec_over_dense_train', 'ec_over_dense_infer',
        'ec_overhead_theory', 'e64_over_e8', 'gather_over_onehot', 'tc_over_ec', 'stream_gbps',
        'e64_over_e8_floor', 'peak_gflops_start', 'mfu_start')


def test_dense_flops_by_hand():
  cfg = ModelConfig(image_size=8, in_channels=4, patch_size=2, width=32, depth=2, num_heads=2, mlp_ratio=4,
                    routing='dense', text_encoder='precomputed', text_length=4, text_states_dim=16).validate()
  B, N, d, L, pd, dt = 3, 16, 32, 4, 16, 16
  patch = 2 * B * N * pd * d                 # 49152
  temb = 2 * B * (256 * d + d * d)           # 55296
  tproj = 2 * B * L * dt * d                 # 12288
  per_block = (2 * B * d * 6 * d             # adaLN: 36864
               + 2 * B * N * d * 4 * d       # self-attn q,k,v,o: 393216
               + 2 * 2 * B * N * N * d       # QK^T and AV: 98304
               + 2 * B * N * d * 2 * d       # cross q,o: 196608
               + 2 * B * L * d * 2 * d       # cross k,v on text: 49152
               + 2 * 2 * B * N * L * d       # cross QK^T and AV: 24576
               + 2 * B * N * 2 * d * 4 * d)  # FFN: 786432
  final = 2 * B * d * 2 * d + 2 * B * N * d * pd  # 12288 + 49152
  fwd = patch + temb + tproj + 2 * per_block + final
  assert fwd == 49152 + 55296 + 12288 + 2 * 1585152 + 61440 == 3348480
  assert flops.forward_flops(cfg, B) == fwd
  assert flops.train_step_flops(cfg, B) == 3 * fwd


def test_moe_flops_counts_capacity():
  base = dict(image_size=8, in_channels=4, patch_size=2, width=32, depth=2, num_heads=2, num_experts=4,
              text_encoder='precomputed', text_length=4, text_states_dim=16)
  dense = ModelConfig(**base, routing='dense').validate()
  ec1 = ModelConfig(**base, capacity_factor=1.0).validate()
  ec2 = ModelConfig(**base, capacity_factor=2.0).validate()
  B, N, d = 2, 16, 32
  router = 2 * B * N * d * 4
  ffn = 2 * B * N * 2 * d * 4 * d
  assert flops.forward_flops(ec1, B) - flops.forward_flops(dense, B) == router   # C = S/E: same expert work
  assert flops.forward_flops(ec2, B) - flops.forward_flops(dense, B) == router + ffn


@pytest.mark.bench
def test_suite_smoke(tmp_path):
  path = tmp_path / 'suite.json'
  lines = []
  tiny = dict(image_size=8, width=64, depth=2, num_heads=2, text_length=4, text_states_dim=16)
  r = suite.run('quick', str(path), batch=2, reps=1, warmup=1, routing_tokens=512, group_sizes=(256, 512),
                peak_n=128, model_overrides=tiny, log=lines.append)
  on_disk = json.loads(path.read_text())
  for k in KEYS:
    assert k in r and k in on_disk, k
  assert set(on_disk['gather_over_onehot']) == {'256', '512'}
  assert set(on_disk['gather_over_onehot']['256']) == {'time', 'memory'}
  assert r['peak_gflops'] > 0 and 0 < r['mfu'] and r['achieved_gflops'] > 0
  assert r['mfu'] == pytest.approx(r['achieved_gflops'] / r['peak_gflops'])
  assert r['mfu_start'] == pytest.approx(r['achieved_gflops'] / r['peak_gflops_start'])
  assert abs(r['ec_overhead_theory'] - 1) < 0.1
  assert any('| mfu |' in line for line in lines)
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    assert r['torch'] is None and r['peak_gflops_blas'] is None
  else:
    t = r['torch']
    assert set(t['train_ms']) == set(t['jax_over_torch_train']) == {'dense', 'ec_fc2_e8'}
    assert t['jax_over_torch_train']['dense'] == pytest.approx(r['train_ms']['dense'] / t['train_ms']['dense'])
    assert r['mfu_blas'] == pytest.approx(r['achieved_gflops'] / r['peak_gflops_blas'])
    assert any('jax_over_torch_train[dense]' in line for line in lines)


def test_bench_cases_are_the_training_set_up():
  """A bench case is `loop.build`'s step on training's initial state: its weights are `init_params(model, 0)`
  (what a seed-0 run starts from) and its first step's loss is the training step's on the same batch."""
  import flax.linen as nn
  import jax
  import numpy as np

  from ecdit.models.ecdit import build_model, init_params
  from ecdit.train import loop
  cfg = suite.bench_config(image_size=8, width=32, depth=2, num_heads=2, num_experts=4, text_length=4,
                           text_states_dim=16)
  setup = suite.train_setup(cfg, 2)
  state = setup.init_state()
  _, params = suite.initial_params(cfg)
  want = nn.unbox(init_params(build_model(cfg), 0))
  for a, b, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(b, c, rtol=1e-6, atol=1e-9)   # the same key; jit vs eager rounding only
  ref = loop.build(suite.train_config(2), cfg, devices=jax.devices()[:1], strict=True)
  _, m = ref.train_step(ref.init_state(), suite.random_batch(cfg, 2))
  case = suite.build_case('t', cfg, 2, with_infer=False)
  assert float(case.train()) == float(m['loss'])


def test_variants_cases_are_valid_configs_and_the_table_is_over_the_first():
  """Every `bench variants` case is a valid model and train config (so a typo in the table fails here, not
  after minutes of measuring), and the table's ratios are over the group's first case."""
  from ecdit.bench import variants
  from ecdit.config import experiment
  for group, cases in variants.GROUPS.items():
    for name, (model_over, train_over) in cases.items():
      cfg = suite.bench_config(**model_over)
      for k, v in model_over.items():
        assert getattr(cfg, k) == v, (group, name, k)
      c = suite.train_config(8, **train_over)
      for k, v in model_over.items():
        c.model[k] = v
      experiment.validate(c)
      assert all(c.train[k] == v for k, v in train_over.items())
  table = variants.format_group('layout', {'a': dict(ms=200., temp_mib=40., argument_mib=5., compile_s=1.),
                                           'b': dict(ms=300., temp_mib=10., argument_mib=5., compile_s=2.)})
  assert table.splitlines()[2:] == ['| a | 200 | 1.00 | 40 | 1.00 | 5 | 1.0 |', '| b | 300 | 1.50 | 10 | 0.25 | 5 | 2.0 |']


def test_time_interleaved_takes_turns_and_reports_medians():
  from ecdit.bench import timing
  calls = []
  ms = timing.time_interleaved({'a': lambda x: calls.append(('a', x)) or x, 'b': lambda x: calls.append(('b', x)) or x},
                               (1,), warmup=2, reps=3)
  assert set(ms) == {'a', 'b'} and all(v >= 0 for v in ms.values())
  assert calls == [('a', 1)] * 2 + [('b', 1)] * 2 + [('a', 1), ('b', 1)] * 3   # warm-ups, then turns


def test_profile_summary_on_hand_made_trace():
  from ecdit.bench import profile
  hlo = ('%ynn_fusion.3 = f32[8,16] fusion(%a), metadata={op_name="jit(train_step)/jvp(ECDiT)/block_3/ffn/wi/dot_general"}\n'
         '%multiply_add_fusion.1 = f32[8] fusion(%b), metadata={op_name="jit(train_step)/add"}\n')
  names = profile.op_names(hlo)
  assert names == {'ynn_fusion.3': 'jvp(ECDiT)/ffn/wi/dot_general', 'multiply_add_fusion.1': 'add'}
  events = [dict(ph='X', name='ynn_fusion.3', dur=3000), dict(ph='X', name='ynn_fusion.3', dur=1000),
            dict(ph='X', name='multiply_add_fusion.1', dur=2000), dict(ph='X', name='ThunkExecutor::Execute', dur=9e6),
            dict(ph='i', name='ynn_fusion.3'), dict(ph='X', name='dot.7', dur=2000)]
  by_kind, by_name, total = profile.summarize(events, names, steps=2)
  assert by_kind == {'ynn_fusion': 2.0, 'multiply_add_fusion': 1.0, 'dot': 1.0}
  assert by_name == {'jvp(ECDiT)/ffn/wi/dot_general': 2.0, 'add': 1.0, '(unnamed)': 1.0}
  assert total == 4.0


def test_parts_smoke():
  from ecdit.bench import parts
  tiny = dict(image_size=8, width=32, depth=2, num_heads=2, text_length=4, text_states_dim=16)
  lines = []
  r = parts.run((2, 4), batch=2, reps=1, warmup=1, model_overrides=tiny, log=lines.append)
  assert set(r['update_ms']) == {'dense', 'ec_e2', 'ec_e4'}
  # EC layers hold E full-width experts: more parameters than dense, growing with E.
  assert r['params']['dense'] < r['params']['ec_e2'] < r['params']['ec_e4']
  assert len(r['matmul_gflops']) == 6 and all(v > 0 for v in r['matmul_gflops'].values())
  assert any('rows/expert' in line for line in lines)


def test_torch_calibration_step_is_the_jax_model_and_updates():
  """The PyTorch calibration trains the same model: its initial forward is the JAX forward on the same weights,
  and a step moves the parameters and the EMA (by exactly 1 − decay of the step, from the initial weights)."""
  torch = pytest.importorskip('torch')
  import jax.numpy as jnp
  import numpy as np

  from ecdit.bench import torch_calibration
  cfg = suite.bench_config(image_size=8, width=32, depth=2, num_heads=2, num_experts=4, text_length=4,
                           text_states_dim=16)
  model, params = suite.initial_params(cfg)
  batch = suite.random_batch(cfg, 2)
  step = torch_calibration.TrainStep(cfg, params, batch, suite.train_config(2))
  t = np.array([0.3, 0.8], np.float32)
  want = model.apply({'params': params}, batch['x0'], jnp.asarray(t), batch['text'], batch['text_mask'])
  with torch.no_grad():
    got = step.model(torch.from_numpy(np.array(batch['x0'])), torch.from_numpy(t),
                     torch.from_numpy(np.array(batch['text'])), torch.from_numpy(np.array(batch['text_mask'])))
  np.testing.assert_allclose(got.numpy(), np.asarray(want), atol=1e-5)
  before = [p.detach().clone() for p in step.model.parameters()]
  loss = step()
  assert np.isfinite(loss)
  after = list(step.model.parameters())
  assert any(not torch.equal(a, b) for a, b in zip(before, after))
  decay = step.train_cfg.ema_decay
  for b, a, e in zip(before, after, step.ema):
    torch.testing.assert_close(e, b + (1 - decay) * (a.detach() - b), rtol=1e-5, atol=1e-7)
