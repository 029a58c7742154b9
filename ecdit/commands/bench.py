"""`ecdit bench <name> [--flags]`: run one benchmark and print its table (`ecdit bench <name> --help`: its
flags).

`--quick` shrinks the work to fit a few minutes on a small CPU machine. Numbers are only comparable within one
run (ratios); the machine may be shared and noisy. Method and numbers: docs/performance.md.
"""
from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Callable

from absl import flags

from ecdit import errors
from ecdit import outputs
from ecdit.bench import data, parts, routing, suite, variants
from ecdit.commands import flags as cflags

_QUICK = flags.DEFINE_bool('quick', False, 'smaller run: 4096 tokens per step instead of 16384')
_TOKENS = flags.DEFINE_integer('tokens', None, 'tokens per step (default 16384, or 4096 with --quick)')
_REPS = flags.DEFINE_integer('reps', None, 'timed repetitions per case (default 5)')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'untimed runs per case after compiling')
_EXPERTS = flags.DEFINE_list('experts', ['8', '64'], 'expert counts E to measure')
_SUITE = flags.DEFINE_enum('suite', 'quick', ['quick', 'full'], 'suite: which sizes (quick fits a few minutes)')
_JSON = flags.DEFINE_string('json', None, 'suite, variants: write the results to this JSON file')
_TORCH = flags.DEFINE_bool('torch', True, 'suite: also train the same model in PyTorch, in a block after the JAX '
                           'steps (needs the [torch] extra; skipped with a note when torch is missing)')
_BATCH = flags.DEFINE_integer('batch', 8, 'profile, parts: images per train step')
_VARIANTS = flags.DEFINE_list('variants', list(variants.GROUPS),
                              f'variants: which groups to measure, of {", ".join(variants.GROUPS)}')
_GROUPS = flags.DEFINE_list('group_sizes', ['256', '1024', '4096'],
                            'routing-group sizes S (multiples of 256 dividing --tokens)')


def _ints(holder) -> list[int]:
  try:
    values = [int(v) for v in holder.value]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise errors.UsageError(f'--{holder.name}={",".join(holder.value)} is invalid: expected positive integers')
  return values


def _routing():
  with cflags.translate():
    routing.run(quick=_QUICK.value, tokens=_TOKENS.value, reps=_REPS.value, warmup=_WARMUP.value,
                experts=_ints(_EXPERTS), groups=_ints(_GROUPS))


def _mesh():
  # Imported here, not above: importing it asks XLA for 8 simulated CPU devices, for this benchmark only.
  from ecdit.bench import mesh  # pylint: disable=import-outside-toplevel
  mesh.run(reps=_REPS.value or 5)


def _suite():
  if _JSON.value:   # before the minutes of measuring
    outputs.check_output(_JSON.value, '--json', ours=outputs.json_with('suite', 'train_ms'))
  suite.run(_SUITE.value, _JSON.value, reps=_REPS.value, torch=_TORCH.value)


def _profile():
  # Imported here, not above: importing it sets the XLA flag that dumps the traced step, for this one only.
  from ecdit.bench import profile  # pylint: disable=import-outside-toplevel
  experts = _ints(_EXPERTS)[:1]
  with cflags.translate():
    suite.check_bench_experts(experts)
  profile.run(batch=_BATCH.value, experts=experts[0])


def _variants():
  unknown = [g for g in _VARIANTS.value if g not in variants.GROUPS]
  if unknown:
    raise errors.UsageError(f'--variants={",".join(_VARIANTS.value)} is invalid: {unknown} are not groups; '
                            f'expected some of {", ".join(variants.GROUPS)}')
  if _JSON.value:   # before the minutes of measuring
    outputs.check_output(_JSON.value, '--json', ours=outputs.json_with('groups', 'e64_over_e8'))
  variants.run(batch=_BATCH.value, reps=_REPS.value or 5, warmup=_WARMUP.value, groups=tuple(_VARIANTS.value),
               json_path=_JSON.value)


def _parts():
  experts = _ints(_EXPERTS)
  with cflags.translate():
    suite.check_bench_experts(experts)
  parts.run(experts, batch=_BATCH.value, reps=_REPS.value or 5)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  run: Callable[[], object]
  about: str                            # what it measures, for --help
  flags: tuple[flags.FlagHolder, ...]   # the flags it reads
  takes_args: bool = False              # its own arguments follow `--` (data: argparse)


BENCHMARKS = {
    'routing': Benchmark(_routing, 'gather vs one-hot MoE dispatch, per expert count and routing-group size',
                         (_QUICK, _TOKENS, _REPS, _WARMUP, _EXPERTS, _GROUPS)),
    'data': Benchmark(data.run, 'dataset generation and input pipeline throughput; its own flags follow `--`, '
                      'e.g. `ecdit bench data -- --num_examples=5000` (`ecdit bench data -- --help` lists them)',
                      (), takes_args=True),
    'mesh': Benchmark(_mesh, 'the train step on 1 vs 8 simulated devices', (_REPS,)),
    'suite': Benchmark(_suite, 'peak matmul GFLOP/s, MFU, EC vs dense, E=64 vs 8, gather vs one-hot, token vs '
                       'expert choice, and the same model trained in PyTorch beside it (`--notorch` skips that), '
                       'in one process; see ecdit/bench/suite.py', (_SUITE, _JSON, _REPS, _TORCH)),
    'variants': Benchmark(_variants, "the suite's model trained unrolled and scanned with each remat policy, and "
                          'in float32 / bfloat16 compute, moments and parameters, and E=64 over E=8 per precision: '
                          "step time in turns and XLA's memory analysis; see ecdit/bench/variants.py",
                          (_VARIANTS, _BATCH, _REPS, _WARMUP, _JSON)),
    'profile': Benchmark(_profile, "one traced train step of the suite's model: time by HLO op kind and by model "
                         'op, `--batch`, first of `--experts`', (_BATCH, _EXPERTS)),
    'parts': Benchmark(_parts, "the update alone on dense/EC parameter trees and the expert matmuls alone at each "
                       "of `--experts`: where EC's and E=64's extra step time goes", (_EXPERTS, _BATCH, _REPS)),
}


def usage(args) -> str:
  """`ecdit bench --help` (every benchmark, every flag) or `ecdit bench <name> --help` (that one's)."""
  name = next((a for a in args if a in BENCHMARKS), None)
  if name is not None:
    b = BENCHMARKS[name]
    note = __doc__.split('\n\n', 1)[1]   # the paragraph on --quick and noise
    return cflags.render(f'ecdit bench {name}', f'{textwrap.fill(f"{name}: {b.about}.", 110)}\n\n{note}',
                         b.flags)
  listing = '\n'.join(textwrap.fill(f'{n:<8} {b.about}', 110, initial_indent='  ', subsequent_indent=' ' * 11)
                      for n, b in BENCHMARKS.items())
  return cflags.render('ecdit bench <name>', f'{__doc__}\nbenchmarks:\n{listing}',
                       cflags.holders(sys.modules[__name__]))


def _check_flags(name: str, b: Benchmark) -> None:
  """Only the benchmark's own flags may be given (another's would be ignored), and their numbers are sane."""
  own = {h.name for h in b.flags}
  for h in cflags.holders(sys.modules[__name__]):
    if flags.FLAGS[h.name].present and h.name not in own:
      where = ('its own flags follow `--`, e.g. `ecdit bench data -- --batch_size=64`' if b.takes_args else
               f'its flags are {", ".join("--" + n for n in sorted(own)) or "none"}')
      raise errors.UsageError(f'--{h.name} is not a flag of the {name} benchmark ({where})')
  for holder, minimum in ((_BATCH, 1), (_REPS, 1), (_TOKENS, 1), (_WARMUP, 0)):
    cflags.at_least(holder, minimum)


def main(argv):
  if len(argv) < 2 or argv[1] not in BENCHMARKS:
    raise errors.UsageError(f'expected one benchmark name, one of {sorted(BENCHMARKS)}; got {argv[1:]}')
  b, extra = BENCHMARKS[argv[1]], argv[2:]
  _check_flags(argv[1], b)
  if b.takes_args:
    b.run(extra)
    return
  if extra:
    raise errors.UsageError(f'unexpected arguments {extra} for the {argv[1]} benchmark')
  b.run()
