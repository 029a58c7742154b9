"""`ecdit compare` over seeds: grouping of replicas, Student-t intervals and steps-to-loss by hand.

No model and no JAX: each workdir holds only the config.json, metrics.jsonl and eval file a run would have.
"""
from __future__ import annotations

import json
import math

import pytest

from ecdit.eval import compare, seeds
from cli_util import run_cli

T2 = 4.303   # t(0.975, df=2) from a printed table


def workdir(path, *, seed=0, experts=8, losses=(1.0, 0.9, 0.8, 0.7, 0.6), overall=None, rate=4.0,
            data_dir='./data', name='shapes_small_ec'):
  path.mkdir(parents=True)
  cfg = {'name': name, 'seed': seed, 'data': {'dir': data_dir, 'image_size': 32},
         'model': {'routing': 'expert_choice', 'num_experts': experts, 'capacity_factor': 2.0},
         'train': {'log_every': 50, 'num_steps': 50 * len(losses)}}
  (path / 'config.json').write_text(json.dumps(cfg))
  lines = [json.dumps({'step': 50 * (i + 1), 'flow_loss': v, 'steps_per_sec': rate}) for i, v in enumerate(losses)]
  (path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')
  if overall is not None:
    (path / 'eval').mkdir()
    counts = {'single_object': {'correct': int(100 * overall), 'images': 100}}
    (path / 'eval' / 'step_0000250.json').write_text(json.dumps(
        {'overall': overall, 'tags': {'single_object': overall}, 'counts': counts, 'step': 250}))
  return path


def test_interval_and_ema_by_hand():
  iv = seeds.interval([0.5, 0.6, 0.7])               # sd 0.1
  assert iv['mean'] == pytest.approx(0.6) and iv['n'] == 3
  assert iv['hi'] - iv['mean'] == pytest.approx(T2 * 0.1 / math.sqrt(3), rel=1e-4)
  assert seeds.interval([0.3, None, float('nan')]) == {'mean': 0.3, 'lo': None, 'hi': None, 'n': 1}
  assert seeds.interval([])['mean'] is None
  # Debiased EMA(0.6) of [1, 0, 0]: 0.4/0.4 = 1; 0.24/0.64 = 0.375; 0.144/0.784 = 0.18367…
  assert seeds.ema([1.0, 0.0, 0.0]) == pytest.approx([1.0, 0.375, 0.144 / 0.784])
  curve = [(10, 1.0), (20, 0.0), (30, 0.0)]
  assert seeds.steps_to_loss(curve, 0.375) == 20 and seeds.steps_to_loss(curve, 0.2) == 30
  assert seeds.steps_to_loss(curve, 0.1) is None
  assert seeds.t975(2) == T2 and seeds.t975(500) == pytest.approx(1.96, abs=1e-3)


def test_replicas_group_by_config_but_not_across_configs(tmp_path):
  runs = [compare.load_run(workdir(tmp_path / f's{s}', seed=s, data_dir=f'/data/{s}')) for s in range(3)]
  other = compare.load_run(workdir(tmp_path / 'e4', experts=4))        # same name, another configuration
  groups = seeds.group_runs(runs + [other])
  assert [len(g.runs) for g in groups] == [3, 1]
  assert groups[0].label.startswith('shapes_small_ec [') and groups[0].label != groups[1].label
  assert [r.seed for r in groups[0].runs] == [0, 1, 2]
  assert len(seeds.group_runs(runs + [other], 'none')) == 4
  for r, label in zip(runs + [other], 'aaab'):
    r.label = label
  assert [len(g.runs) for g in seeds.group_runs(runs + [other], 'label')] == [3, 1]
  with pytest.raises(ValueError, match="group_by='seed'; expected one of"):
    seeds.group_runs(runs, 'seed')


def test_summary_numbers_over_three_seeds(tmp_path):
  # Final loss = mean of the last 5 logged: 0.62 + 0.02·s, so mean 0.64, sd 0.02; GenEval 0.5/0.6/0.7.
  runs = [compare.load_run(workdir(tmp_path / f's{s}', seed=s, losses=[v + 0.02 * s for v in (1.0, 0.8, 0.6, 0.5, 0.2)],
                                   overall=0.5 + 0.1 * s, rate=[4.0, 5.0, 2.0][s])) for s in range(3)]
  row = seeds.summarize(seeds.group_runs(runs)[0], target=0.65)
  assert row['final_loss']['mean'] == pytest.approx(0.64)
  assert row['final_loss']['hi'] - 0.64 == pytest.approx(T2 * 0.02 / math.sqrt(3), rel=1e-4)
  assert row['geneval']['mean'] == pytest.approx(0.6)
  assert row['geneval']['lo'] == pytest.approx(0.6 - T2 * 0.1 / math.sqrt(3), rel=1e-4)
  assert row['tags']['single_object']['mean'] == pytest.approx(0.6)
  assert row['step_ms']['mean'] == pytest.approx((250 + 200 + 500) / 3)        # 1000 / steps_per_sec
  # Smoothed seed-0 curve 1, .88, .75, .64, …: below 0.65 first at step 200; seeds 1 and 2 sit 0.02·s higher.
  ema0 = seeds.ema([1.0, 0.8, 0.6, 0.5, 0.2])
  assert ema0[3] <= 0.65 < ema0[2]
  expected = [50 * (1 + next(i for i, v in enumerate(seeds.ema([x + 0.02 * s for x in (1.0, 0.8, 0.6, 0.5, 0.2)]))
                             if v <= 0.65)) for s in range(3)]
  assert expected[0] == 200 and row['steps_to_target']['mean'] == pytest.approx(sum(expected) / 3)
  assert row['not_reached'] == 0 and row['seeds'] == [0, 1, 2]
  # One seed: its own interval over images stays (the binomial over 100 images).
  single = seeds.summarize(seeds.Group('one', runs[:1]), target=0.65)
  lo, hi = runs[0].eval['overall_ci95']
  assert (single['geneval']['lo'], single['geneval']['hi']) == (lo, hi) and lo < 0.5 < hi
  assert seeds.cell(single['final_loss']) == '0.6200'
  assert seeds.cell(row['final_loss']) == f'0.6400 ± {T2 * 0.02 / math.sqrt(3):.4f}'


def test_common_target_is_reached_by_every_run(tmp_path):
  fast = compare.load_run(workdir(tmp_path / 'fast', losses=(1.0, 0.5, 0.3, 0.2, 0.1)))
  slow = compare.load_run(workdir(tmp_path / 'slow', experts=4, losses=(1.0, 0.9, 0.8, 0.75, 0.7)))
  target = seeds.common_target_loss([fast, slow])
  assert target == pytest.approx(seeds.ema([1.0, 0.9, 0.8, 0.75, 0.7]).min())
  assert seeds.steps_to_loss(slow.curve, target) == 250 and seeds.steps_to_loss(fast.curve, target) < 250


def test_command_prints_and_writes_the_seed_table(tmp_path):
  dirs = [workdir(tmp_path / f'ec{s}', seed=s, overall=0.5 + 0.1 * s) for s in range(3)]
  dirs.append(workdir(tmp_path / 'e4', experts=4, name='shapes_small_ec4', overall=0.4))
  out = tmp_path / 'cmp'
  r = run_cli('compare', '--workdirs=' + ','.join(map(str, dirs)), f'--out={out}', timeout=60)
  assert r.returncode == 0, r.stderr
  assert 'over seeds (mean ± 95% interval)' in r.stdout
  line = next(x for x in r.stdout.splitlines() if x.startswith('| shapes_small_ec |'))
  assert '| 3 | 0.8000 ± 0.0000 | 250 ± 0 |' in line and f'60.0% [{100 * (0.6 - T2 * 0.1 / math.sqrt(3)):.1f}' in line
  js = json.loads((out / 'compare.json').read_text())
  assert [g['seeds'] for g in js['groups']] == [[0, 1, 2], [0]] and js['group_by'] == 'config'
  assert '## Over seeds' in (out / 'compare.md').read_text()
  bad = run_cli('compare', f'--workdirs={dirs[0]}', f'--out={out}', '--target_loss=-1', timeout=60)
  assert bad.returncode == 2 and '--target_loss=-1.0; expected a positive finite loss' in bad.stderr
