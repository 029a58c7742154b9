"""`ecdit bench variants`: the bench model's train step in each stack layout, remat policy and precision —
its time and XLA's memory analysis, measured in one run.

Cases are compared within a group, whose steps take turns in each rep (`ecdit.bench.timing`), so a ratio
holds on a shared machine; absolute times are only comparable within one run. The model is the suite's
(`ecdit.bench.suite.BENCH_MODEL`: EC, E=8, f_c=2, 12 blocks of width 384, per-image routing), trained by
the training code's own step on one device, no token masking.

  layout     unrolled, and scanned (`model.scan_layers`) with each `train.remat` policy, float32
  precision  float32; bfloat16 compute (router and master weights stay float32); that with bfloat16
             optimizer moments (`train.moment_dtype`); bfloat16 parameters and compute (unrolled)
  experts    E=64 over E=8 at float32 and at bfloat16 compute: `e64_over_e8` per precision

Memory is XLA's own analysis of each compiled step: temporaries (activations kept for the backward pass
and working buffers) and arguments (the train state and the batch).
"""
from __future__ import annotations

import json
import os
import time

import jax

from ecdit.bench import suite

REMATS = ('none', 'full', 'dots', 'save_moe')

# group -> case -> (model overrides, train overrides)
GROUPS = {
    'layout': {'unrolled': ({}, {}),
               **{f'scan_{r}': ({'scan_layers': True}, {'remat': r}) for r in REMATS}},
    'precision': {'float32': ({}, {}),
                  'bf16_compute': ({'dtype': 'bfloat16'}, {}),
                  'bf16_compute_moments': ({'dtype': 'bfloat16'}, {'moment_dtype': 'bfloat16'}),
                  'bf16_params': ({'dtype': 'bfloat16', 'param_dtype': 'bfloat16'}, {})},
    # Two pairs, one after the other: an E=64 state is several GB.
    'experts_float32': {'e8': ({}, {}), 'e64': ({'num_experts': 64}, {})},
    'experts_bf16': {'e8': ({'dtype': 'bfloat16'}, {}), 'e64': ({'dtype': 'bfloat16', 'num_experts': 64}, {})},
}


def measure_group(cases: dict, batch: int, warmup: int, reps: int, log=print, base: dict | None = None) -> dict:
  """{case: {ms, temp_mib, argument_mib, compile_s}} of one group, its steps timed in turns; `base` overrides
  the bench model for every case (tests use a tiny one)."""
  built = []
  for name, (model_over, train_over) in cases.items():
    cfg = suite.bench_config(**{**(base or {}), **model_over})
    built.append(suite.build_case(name, cfg, batch, with_infer=False, **train_over))
    log(f'  compiled {name}: {built[-1].compile_s:.1f} s')
  ms = suite.time_cases(built, warmup, reps)
  return {c.name: dict(ms=ms[c.name], temp_mib=c.temp_bytes / 2 ** 20, argument_mib=c.argument_bytes / 2 ** 20,
                       compile_s=c.compile_s) for c in built}


def run(batch: int = 8, reps: int = 5, warmup: int = 1, groups=tuple(GROUPS), json_path: str | None = None,
        log=print) -> dict:
  """Measures the given groups; prints one table per group through `log`, writes `json_path` if given."""
  t0 = time.perf_counter()
  log(f'bench variants: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
      f'{os.cpu_count()} CPU cores; batch {batch}, median of {reps} after {warmup} warm-up')
  result = dict(batch=batch, reps=reps, warmup=warmup, jax=jax.__version__, model=suite.bench_config().to_dict(),
                groups={})
  for g in groups:
    log(f'{g}:')
    rows = measure_group(GROUPS[g], batch, warmup, reps, log)
    result['groups'][g] = rows
    log(format_group(g, rows))
  result['e64_over_e8'] = {p: result['groups'][f'experts_{p}']['e64']['ms'] / result['groups'][f'experts_{p}']['e8']['ms']
                           for p in ('float32', 'bf16') if f'experts_{p}' in result['groups']}
  for p, r in result['e64_over_e8'].items():
    log(f'e64_over_e8 at {p}: {r:.3f}')
  result['wall_s'] = time.perf_counter() - t0
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    log(f'wrote {json_path}')
  return result


def format_group(group: str, rows: dict) -> str:
  """A markdown table of one group: each case's time and memory over the group's first case."""
  base = next(iter(rows.values()))
  lines = [f'| {group} | ms / step | × first | temporaries MiB | × first | arguments MiB | compile s |',
           '|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    lines.append(f'| {name} | {r["ms"]:.0f} | {r["ms"] / base["ms"]:.2f} | {r["temp_mib"]:.0f} | '
                 f'{r["temp_mib"] / base["temp_mib"]:.2f} | {r["argument_mib"]:.0f} | {r["compile_s"]:.1f} |')
  return '\n'.join(lines)
