"""Train-step time of shapes_tiny variants, the candidates taking turns in each repeat (issue 19's recipe
search: what a bigger token grid, batch or bfloat16 would cost before training one).

  python tools/shapes_tiny_throughput.py                     # every candidate
  python tools/shapes_tiny_throughput.py b32_f32,p2_b32      # a few; ratios are to the first one

Ratios hold on a shared machine (all candidates slow alike); absolute times only within one run. The step
is the bench's (`ecdit.bench.suite.build_case`: the training code's step, default train settings, one device)
on random inputs of shapes_tiny's batch contract (`suite.random_batch`: token ids for its own text encoder).
"""
import dataclasses
import sys
from pathlib import Path

from ecdit.bench import suite
from ecdit.config import experiment

CANDIDATES = {   # name: (model overrides, batch)
    'b32_f32': ({}, 32),
    'b32_bf16': ({'dtype': 'bfloat16'}, 32),
    'b64_f32': ({}, 64),
    'b16_f32': ({}, 16),
    'w192_b32': ({'width': 192, 'num_heads': 6}, 32),
    'd6_b32': ({'depth': 6}, 32),
    'p2_b32': ({'patch_size': 2}, 32),
    'p2_w96_b32': ({'patch_size': 2, 'width': 96, 'num_heads': 4}, 32),
}


def main(names):
  tiny = experiment.experiment_module(Path(__file__).resolve().parents[1] / 'experiments' / 'shapes_tiny.py')
  base = experiment.validate(tiny.get_config())
  cases = []
  for name in names:
    over, batch = CANDIDATES[name]
    cases.append(suite.build_case(name, dataclasses.replace(base, **over).validate(), batch, with_infer=False))
    print(f'compiled {name} in {cases[-1].compile_s:.1f} s', flush=True)
  ms = suite.time_cases(cases, 2, 8)
  for c in cases:
    batch = CANDIDATES[c.name][1]
    print(f'{c.name:12s} {ms[c.name]:8.1f} ms/step {1000 * batch / ms[c.name]:7.1f} img/s  '
          f'{ms[c.name] / ms[names[0]]:.2f}x the step of {names[0]}')


if __name__ == '__main__':
  main(sys.argv[1].split(',') if len(sys.argv) > 1 else list(CANDIDATES))
