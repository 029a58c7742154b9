"""Mutation check: apply each hand-written mutant of tools/mutants.py to a scratch copy of the repository and
run the tests that should catch it. A mutant is *killed* when those tests fail, *survives* when they pass.

  python tools/mutate.py                      # every mutant; prints a table and the kill rate
  python tools/mutate.py --only modulate-swap --only ema-decay-flipped
  python tools/mutate.py --list               # ids, files and why, without running
  python tools/mutate.py --json mutation.json

A tool, not part of the suite: one mutant costs the run time of its tests (seconds to a minute on 2 cores).
The scratch copy is the files git tracks plus untracked ones it does not ignore, so the working tree is never
modified. Run it with the project's venv python (it runs `<this python> -m pytest`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))
from mutants import MUTANTS  # noqa: E402


def copy_repo(dest: Path) -> None:
  files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=REPO,
                         capture_output=True, check=True).stdout.decode().split('\0')
  for name in filter(None, files):
    src = REPO / name
    if src.is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / name)


def run_mutant(m: dict, root: Path, timeout: int) -> dict:
  path = root / m['file']
  original = path.read_text()
  if original.count(m['old']) != 1:
    return dict(id=m['id'], status='stale', seconds=0.0,
                detail=f"`old` occurs {original.count(m['old'])} times in {m['file']} (expected once)")
  mutated = original.replace(m['old'], m['new'])
  try:
    compile(mutated, str(path), 'exec')
  except SyntaxError as e:   # a broken mutant would be "killed" by any test run: say so instead
    return dict(id=m['id'], status='invalid', seconds=0.0, detail=f'the mutated file does not parse: {e}')
  path.write_text(mutated)
  env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE='1')
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *m['tests']],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    status = {0: 'survived', 5: 'no-tests'}.get(proc.returncode, 'killed')
    tail = (proc.stdout.strip().splitlines() or [''])[-1]
  except subprocess.TimeoutExpired:
    status, tail = 'killed', f'timeout after {timeout}s'
  finally:
    path.write_text(original)
  return dict(id=m['id'], status=status, seconds=round(time.perf_counter() - t0, 1), detail=tail)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--only', action='append', default=[], help='run only this mutant id (repeatable)')
  ap.add_argument('--list', action='store_true', help='list the mutants and exit')
  ap.add_argument('--json', help='also write the results to this file')
  ap.add_argument('--timeout', type=int, default=900, help='seconds per mutant (default 900)')
  args = ap.parse_args(argv)
  ids = [m['id'] for m in MUTANTS]
  unknown = [i for i in args.only if i not in ids]
  if unknown:
    print(f'mutate: error: unknown mutant id(s) {unknown}; see --list', file=sys.stderr)
    return 2
  chosen = [m for m in MUTANTS if not args.only or m['id'] in args.only]
  if args.list:
    for m in chosen:
      print(f"{m['id']:28s} {m['file']:34s} {m['why']}")
    return 0
  if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK):
    print(f'mutate: error: --json={args.json}: its folder is not writable', file=sys.stderr)
    return 2
  results = []
  with tempfile.TemporaryDirectory(prefix='ecdit-mutate-') as tmp:
    root = Path(tmp)
    copy_repo(root)
    for m in chosen:
      r = run_mutant(m, root, args.timeout)
      results.append(r)
      print(f"{r['status']:9s} {r['seconds']:7.1f}s  {r['id']:28s} {r['detail']}", flush=True)
  judged = [r for r in results if r['status'] in ('killed', 'survived')]
  killed = sum(r['status'] == 'killed' for r in judged)
  rate = killed / len(judged) if judged else 0.0
  print(f'killed {killed} of {len(judged)} mutants ({100 * rate:.0f}%); '
        f"{sum(r['status'] == 'stale' for r in results)} stale, "
        f"{sum(r['status'] == 'invalid' for r in results)} invalid, "
        f"{sum(r['status'] == 'no-tests' for r in results)} with no tests collected")
  if args.json:
    Path(args.json).write_text(json.dumps(dict(kill_rate=rate, results=results), indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
