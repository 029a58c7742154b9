"""`ecdit bench profile [--batch=8] [--experts=8]`: where one train step of the bench model spends its time.

Traces two compiled train steps of `suite.BENCH_MODEL` (EC f_c=2, per image) with `jax.profiler` and XLA:CPU's
per-op trace events (`--xla_cpu_enable_xprof_traceme`, set here before JAX starts), then sums the events'
durations two ways: by kind of HLO op (YNNPACK matmul fusions, plain dots, loop fusions, ...) and by the
op's `op_name` metadata with the block index stripped (`jvp(ECDiT)/...` is the forward pass,
`transpose(jvp(ECDiT))/...` the backward, a bare `add`/`div` the optimizer update). docs/performance.md reads
these tables. The numbers include the profiler's own overhead; compare rows, not runs.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

_FLAG = '--xla_cpu_enable_xprof_traceme=true'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()

import jax  # noqa: E402  (after the flag)

from ecdit.bench import suite  # noqa: E402

_RUNTIME = ('ThunkExecutor', '$', 'PjitFunction', 'SlinkyThreadPool', 'CommonPjRt', 'ParseArguments')


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name → its `op_name` metadata, block index stripped."""
  names = {}
  for m in re.finditer(r'%([\w.\-]+) = .*?metadata=\{op_name="([^"]+)"', hlo_text):
    name = re.sub(r'^jit\([^)]*\)/', '', m.group(2))
    names[m.group(1)] = '/'.join(w for w in name.split('/') if not w.startswith('block_'))
  return names


def summarize(events: list[dict], names: dict[str, str], steps: int) -> tuple[dict, dict, float]:
  """(ms per step by op kind, ms per step by op name, total op ms per step) from trace events."""
  by_kind, by_name = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e or e['name'].startswith(_RUNTIME):
      continue
    ms = e['dur'] / 1e3 / steps
    by_kind[re.sub(r'\.\d+$', '', e['name'])] += ms
    by_name[names.get(e['name'], '(unnamed)')] += ms
  return dict(by_kind), dict(by_name), sum(by_kind.values())


def run(batch: int = 8, experts: int = 8, top: int = 30, log=print) -> dict:
  case = suite.build_case('profile', suite.bench_config(num_experts=experts), batch, with_infer=False)
  for _ in range(2):
    jax.block_until_ready(case.train())
  steps = 2
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        jax.block_until_ready(case.train())
    files = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)
    if not files:
      raise RuntimeError(f'jax.profiler wrote no trace under {d}')
    with gzip.open(files[0]) as f:
      events = json.load(f)['traceEvents']
  by_kind, by_name, total = summarize(events, op_names(case.hlo_text), steps)
  log(f'bench model, EC E={experts} f_c=2, batch {batch}: {total:.0f} ms of XLA ops per train step (profiler on)')
  for title, table in (('by op kind', by_kind), ('by op name (blocks merged)', by_name)):
    log(f'\n{title}:')
    for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
      log(f'  {v:8.1f} ms  {100 * v / total:5.1f}%  {k[:100]}')
  return dict(total_ms=total, by_kind=by_kind, by_name=by_name)
