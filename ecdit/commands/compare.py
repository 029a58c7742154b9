"""`ecdit compare`: training runs side by side — loss curves, GenEval-style scores, fg/bg expert ratio.

  ecdit compare --workdirs=runs/shapes_small_dense,runs/shapes_small_ec,runs/shapes_small_tc --out=runs/compare
  ecdit compare --workdirs=a,b --labels=dense,ec --out=cmp
  ecdit compare --workdirs=runs/ec_s0,runs/ec_s1,runs/ec_s2,runs/tc_s0,runs/tc_s1,runs/tc_s2 --out=cmp

Runs whose config.json differ only in `seed` (and bookkeeping keys such as the data dir or log interval) are
seeds of one configuration: a second table gives their means and 95% intervals over seeds, and steps to a
common loss (convergence); `--group_by=label` groups by equal --labels instead, `--group_by=none` not at all.

Each workdir is an `ecdit train` run; run `ecdit eval --workdir=W` and `ecdit analyze --workdir=W` on it
first for the scores and the fg/bg ratio (missing ones show as n/a). Writes `--out`/loss_curves.png,
compare.md and compare.json, and prints the table. The library is `ecdit.eval.compare`.
"""
from __future__ import annotations

import math
from pathlib import Path

from absl import flags

from ecdit import errors, outputs
from ecdit.commands import flags as cflags
from ecdit.eval import compare, seeds

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'comma-separated training run directories')
_LABELS = flags.DEFINE_list('labels', None, "comma-separated names, one per workdir (default: each run's "
                            'config name, or the workdir name where two runs share one)')
_OUT = flags.DEFINE_string('out', None, 'output directory for loss_curves.png, compare.md, compare.json')
_GROUP_BY = flags.DEFINE_enum('group_by', 'config', list(seeds.GROUP_BY),
                              'which runs are seeds of one another, aggregated as mean and 95% interval: '
                              "'config' (config.json equal but for the seed and bookkeeping keys), 'label' "
                              "(equal --labels), 'none'")
_TARGET_LOSS = flags.DEFINE_float('target_loss', None, 'the loss for the steps-to-loss column (default: the '
                                  "highest of the runs' lowest smoothed losses, which every run reaches)")


def main(argv):
  cflags.no_arguments(argv)
  workdirs = [w for w in (_WORKDIRS.value or []) if w]
  if not workdirs:
    raise errors.UsageError('--workdirs is required: comma-separated training run directories')
  cflags.require(_OUT, why=': the directory for loss_curves.png, compare.md and compare.json')
  # Before reading the runs: never inside a run, never over a folder an earlier `ecdit compare` did not write.
  outputs.check_output(_OUT.value, '--out', folder=True,
                       ours=outputs.folder_with('compare.json', outputs.json_with('final_loss_window', 'runs')))
  labels = _LABELS.value
  if labels is not None and len(labels) != len(workdirs):
    raise errors.UsageError(f'--labels has {len(labels)} name(s) but --workdirs has {len(workdirs)} workdir(s); '
                            'give one label per workdir')
  if _TARGET_LOSS.value is not None and not (math.isfinite(_TARGET_LOSS.value) and _TARGET_LOSS.value > 0):
    raise errors.UsageError(f'--target_loss={_TARGET_LOSS.value}; expected a positive finite loss')
  # CompareError (a missing workdir or one that is not a run) reaches the boundary as one line.
  runs = [compare.load_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
  names = [r.label for r in runs]
  if not labels and len(set(names)) < len(names):   # e.g. two seeds of one config: tell them apart
    for r in runs:
      r.label = Path(r.workdir).name
  report = compare.write_report(runs, _OUT.value, group_by=_GROUP_BY.value, target_loss=_TARGET_LOSS.value)
  print(report['table'], flush=True)
  if report['seeds_table']:
    print('\nover seeds (mean ± 95% interval):\n' + report['seeds_table'], flush=True)
  print(f'wrote {report["png"]}, {report["md"]} and {report["json"]}', flush=True)
