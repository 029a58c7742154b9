"""`ecdit compare`: training runs side by side — loss curves, GenEval-style scores, fg/bg expert ratio.

  ecdit compare --workdirs=runs/shapes_small_dense,runs/shapes_small_ec,runs/shapes_small_tc --out=runs/compare
  ecdit compare --workdirs=a,b --labels=dense,ec --out=cmp

Each workdir is an `ecdit train` run; run `ecdit eval --workdir=W` and `ecdit analyze --workdir=W` on it
first for the scores and the fg/bg ratio (missing ones show as n/a). Writes `--out`/loss_curves.png,
compare.md and compare.json, and prints the table. The library is `ecdit.eval.compare`.
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

from ecdit import errors, outputs
from ecdit.commands import flags as cflags
from ecdit.eval import compare

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'comma-separated training run directories')
_LABELS = flags.DEFINE_list('labels', None, "comma-separated names, one per workdir (default: each run's "
                            'config name, or the workdir name where two runs share one)')
_OUT = flags.DEFINE_string('out', None, 'output directory for loss_curves.png, compare.md, compare.json')


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
  # CompareError (a missing workdir or one that is not a run) reaches the boundary as one line.
  runs = [compare.load_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
  names = [r.label for r in runs]
  if not labels and len(set(names)) < len(names):   # e.g. two seeds of one config: tell them apart
    for r in runs:
      r.label = Path(r.workdir).name
  report = compare.write_report(runs, _OUT.value)
  print(report['table'], flush=True)
  print(f'wrote {report["png"]}, {report["md"]} and {report["json"]}', flush=True)
