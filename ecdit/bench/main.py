"""`ecdit bench <name> [--flags]`: run one benchmark and print its table.

Benchmarks: routing (gather vs one-hot MoE dispatch), mesh (train step on 1 vs 8 simulated devices),
suite (`--suite=quick|full --json=FILE`: peak matmul GFLOP/s, MFU, EC vs dense, E=64 vs 8, gather vs one-hot,
token vs expert choice, and the same model trained in PyTorch beside it (`--notorch` skips that), in one
process; see ecdit/bench/suite.py), profile (one traced train step of the
suite's model: time by HLO op kind and by model op, `--batch`, first of `--experts`), parts (the update alone
on dense/EC parameter trees and the expert matmuls alone at each of `--experts`: where EC's and E=64's extra
step time goes),
data (dataset generation and input pipeline throughput; its own flags follow `--`, e.g. `ecdit bench data -- --num_examples=5000`). `--quick` shrinks the work to fit a few minutes on a
small CPU machine. Numbers are only comparable within one run (ratios); the machine may be shared and noisy.
"""
from __future__ import annotations

from absl import app
from absl import flags

_QUICK = flags.DEFINE_bool('quick', False, 'smaller run: 4096 tokens per step instead of 16384')
_TOKENS = flags.DEFINE_integer('tokens', None, 'tokens per step (default 16384, or 4096 with --quick)')
_REPS = flags.DEFINE_integer('reps', None, 'timed repetitions per case (default 5)')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'untimed runs per case after compiling')
_EXPERTS = flags.DEFINE_list('experts', ['8', '64'], 'expert counts E to measure')
_SUITE = flags.DEFINE_enum('suite', 'quick', ['quick', 'full'], 'suite: which sizes (quick fits a few minutes)')
_JSON = flags.DEFINE_string('json', None, 'suite: write the results to this JSON file')
_TORCH = flags.DEFINE_bool('torch', True, 'suite: also train the same model in PyTorch, in a block after the JAX '
                           'steps (needs the [torch] extra; skipped with a note when torch is missing)')
_BATCH = flags.DEFINE_integer('batch', 8, 'profile, parts: images per train step')
_GROUPS = flags.DEFINE_list('group_sizes', ['256', '1024', '4096'],
                            'routing-group sizes S (multiples of 256 dividing --tokens)')


def _routing(extra_args):
  from ecdit.bench import routing  # pylint: disable=import-outside-toplevel
  if extra_args:
    raise app.UsageError(f'unexpected arguments {extra_args} for the routing benchmark')
  def ints(flag):
    try:
      return [int(v) for v in flag.value]
    except ValueError:
      raise app.UsageError(f'--{flag.name}={",".join(flag.value)} is invalid: expected integers') from None
  try:
    routing.run(quick=_QUICK.value, tokens=_TOKENS.value, reps=_REPS.value, warmup=_WARMUP.value,
                experts=ints(_EXPERTS), groups=ints(_GROUPS))
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def _data(extra_args):
  from ecdit.bench import data  # pylint: disable=import-outside-toplevel
  data.run(extra_args)  # argparse flags of its own, passed after `--`


def _mesh(extra_args):
  from ecdit.bench import mesh  # pylint: disable=import-outside-toplevel  (sets 8 CPU devices first)
  if extra_args:
    raise app.UsageError(f'unexpected arguments {extra_args} for the mesh benchmark')
  mesh.run(reps=_REPS.value or 5)


def _suite(extra_args):
  from ecdit.bench import suite  # pylint: disable=import-outside-toplevel
  if extra_args:
    raise app.UsageError(f'unexpected arguments {extra_args} for the suite benchmark')
  suite.run(_SUITE.value, _JSON.value, reps=_REPS.value, torch=_TORCH.value)


def _profile(extra_args):
  from ecdit.bench import profile  # pylint: disable=import-outside-toplevel  (sets its XLA flag first)
  if extra_args:
    raise app.UsageError(f'unexpected arguments {extra_args} for the profile benchmark')
  profile.run(batch=_BATCH.value, experts=int(_EXPERTS.value[0]))


def _parts(extra_args):
  from ecdit.bench import parts  # pylint: disable=import-outside-toplevel
  if extra_args:
    raise app.UsageError(f'unexpected arguments {extra_args} for the parts benchmark')
  try:
    experts = [int(v) for v in _EXPERTS.value]
  except ValueError:
    raise app.UsageError(f'--experts={",".join(_EXPERTS.value)} is invalid: expected integers') from None
  parts.run(experts, batch=_BATCH.value, reps=_REPS.value or 5)


BENCHMARKS = {'routing': _routing, 'data': _data, 'mesh': _mesh, 'suite': _suite, 'profile': _profile,
              'parts': _parts}


def main(argv):
  if len(argv) < 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(f'expected one benchmark name, one of {sorted(BENCHMARKS)}; got {argv[1:]}')
  BENCHMARKS[argv[1]](argv[2:])
