"""Runs of one configuration over several seeds, aggregated (issue 19): mean and 95% interval over seeds.

  groups = group_runs(runs)                      # runs whose config.json differ only in seed / bookkeeping
  target = common_target_loss(runs)              # a loss every run reaches
  rows = [summarize(g, target) for g in groups]  # mean and interval of final loss, steps-to-loss, GenEval…

The interval is Student's t over seeds: mean ± t(0.975, n-1)·s/√n. Each seed's GenEval score carries its own
image-sampling noise, so the spread over seeds covers both sources (seed and images); with one seed the
run's own interval over images is kept. Convergence is compared as steps-to-loss: the first logged step at
which the run's smoothed loss (the same EMA as the plot) is at or below a common target.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np

# Config keys that do not change what a run trains: a seed's replicas differ in these and still form a group.
BOOKKEEPING_KEYS = ('seed', 'name', 'data.dir', 'data.worker_count', 'train.async_checkpoints',
                    'train.checkpoint_every', 'train.keep_checkpoints', 'train.log_every', 'train.sample_every',
                    'train.final_sample', 'train.tensorboard')
GROUP_BY = ('config', 'label', 'none')

# Two-sided 95% Student t quantiles t(0.975, df), df = 1..30 (standard tables); the normal 1.96 beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t975(df: int) -> float:
  return T975[df - 1] if df <= len(T975) else 1.959964


def config_key(cfg: dict) -> str:
  """A short hash of a run's config without its bookkeeping keys (nested sections flattened to `a.b`)."""
  flat = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f'{prefix}{k}'
      if isinstance(v, dict):
        walk(key + '.', v)
      elif key not in BOOKKEEPING_KEYS:
        flat[key] = v

  walk('', cfg if isinstance(cfg, dict) else {})
  return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def interval(values) -> dict:
  """{'mean', 'lo', 'hi', 'n'} over the finite values; lo/hi None with fewer than two (no spread to use)."""
  xs = [float(v) for v in values if v is not None and math.isfinite(v)]
  if not xs:
    return {'mean': None, 'lo': None, 'hi': None, 'n': 0}
  mean = sum(xs) / len(xs)
  if len(xs) < 2:
    return {'mean': mean, 'lo': None, 'hi': None, 'n': 1}
  sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
  half = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
  return {'mean': mean, 'lo': mean - half, 'hi': mean + half, 'n': len(xs)}


def ema(values, smoothing: float = 0.6) -> np.ndarray:
  """Debiased exponential moving average (TensorBoard's smoothing): the first points are not pulled to 0."""
  out, acc = [], 0.0
  for i, v in enumerate(values):
    acc = smoothing * acc + (1 - smoothing) * v
    out.append(acc / (1 - smoothing ** (i + 1)))
  return np.asarray(out)


def smoothed(curve) -> np.ndarray:
  """A curve's losses smoothed as the loss plot draws them."""
  return ema([v for _, v in curve])


def steps_to_loss(curve, target: float) -> int | None:
  """The first logged step whose smoothed loss is ≤ target; None if the run never gets there."""
  for (step, _), v in zip(curve, smoothed(curve)):
    if v <= target:
      return step
  return None


def common_target_loss(runs) -> float:
  """The highest of the runs' lowest smoothed losses: every run reaches it, the slowest last."""
  return max(float(smoothed(r.curve).min()) for r in runs)


@dataclasses.dataclass
class Group:
  label: str
  runs: list


def group_runs(runs, by: str = 'config') -> list[Group]:
  """Runs in groups, first-seen order: by config (`config_key`), by label, or none (one group per run)."""
  if by not in GROUP_BY:
    raise ValueError(f'group_by={by!r}; expected one of {GROUP_BY}')
  groups: dict[str, Group] = {}
  for i, r in enumerate(runs):
    key = {'config': r.config_key, 'label': r.label, 'none': str(i)}[by]
    if key not in groups:
      # A group of seeds is named by the runs' config name (their labels are the workdir names then).
      groups[key] = Group(label=r.label if by != 'config' else r.name, runs=[])
    groups[key].runs.append(r)
  out = list(groups.values())
  names = [g.label for g in out]
  for g in out:   # two configurations with one name (e.g. --config.model.num_experts=…): tell them apart
    if names.count(g.label) > 1:
      g.label = f'{g.label} [{g.runs[0].config_key[:6]}]'
  return out


def summarize(group: Group, target: float) -> dict:
  """The group's numbers: each an interval() dict over its seeds (GenEval tags by name)."""
  runs = group.runs
  evals = [r.eval for r in runs if r.eval]
  tags = list(dict.fromkeys(t for e in evals for t in e['tags']))
  geneval = interval(e['overall'] for e in evals)
  if geneval['n'] == 1:   # one seed: its interval over images
    geneval['lo'], geneval['hi'] = evals[0]['overall_ci95']
  ratios = [r.fg_bg['ratio'] for r in runs if r.fg_bg]
  return {
      'label': group.label, 'seeds': [r.seed for r in runs], 'workdirs': [r.workdir for r in runs],
      'routing': runs[0].routing, 'final_loss': interval(r.final_loss for r in runs),
      'target_loss': target, 'steps_to_target': interval(steps_to_loss(r.curve, target) for r in runs),
      'not_reached': sum(steps_to_loss(r.curve, target) is None for r in runs),
      'step_ms': interval(r.step_ms for r in runs), 'geneval': geneval,
      'tags': {t: interval(e['tags'][t] for e in evals if t in e['tags']) for t in tags},
      'fg_bg_ratio': interval(ratios),
  }


def cell(iv: dict, fmt: str = '{:.4f}', scale: float = 1.0) -> str:
  """`mean ± half-width` (`mean` alone with one value, `n/a` with none)."""
  if iv['mean'] is None:
    return 'n/a'
  text = fmt.format(scale * iv['mean'])
  if iv['lo'] is not None and iv['n'] >= 2:
    text += ' ± ' + fmt.format(scale * (iv['hi'] - iv['lo']) / 2)
  return text


def geneval_cell(iv: dict) -> str:
  if iv['mean'] is None:
    return 'n/a'
  lo, hi = iv['lo'], iv['hi']
  return f'{100 * iv["mean"]:.1f}%' + (f' [{100 * lo:.1f}, {100 * hi:.1f}]' if lo is not None else '')


def markdown_groups(rows) -> str:
  tags = list(dict.fromkeys(t for row in rows for t in row['tags']))
  target = rows[0]['target_loss'] if rows else float('nan')
  head = ['configuration', 'seeds', 'final loss', f'steps to loss {target:.4f}', 'GenEval overall [95% CI]'] \
      + tags + ['fg/bg experts', 'ms/step']
  lines = [head, ['---'] * len(head)]
  for row in rows:
    steps = cell(row['steps_to_target'], '{:.0f}')
    if row['not_reached']:
      steps += f' ({row["not_reached"]} not reached)'
    lines.append([row['label'], str(len(row['seeds'])), cell(row['final_loss']), steps, geneval_cell(row['geneval'])]
                 + [cell(row['tags'][t], '{:.1f}%', 100) if t in row['tags'] else 'n/a' for t in tags]
                 + [cell(row['fg_bg_ratio'], '{:.3f}'), cell(row['step_ms'], '{:.0f}')])
  return '\n'.join('| ' + ' | '.join(r) + ' |' for r in lines)
