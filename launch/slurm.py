#!/usr/bin/env python3
"""Write an sbatch script that runs an ecdit command on a SLURM GPU cluster, and submit it.

  python launch/slurm.py --job_name=ec-xl --nodes=4 --gpus_per_node=8 --time=24:00:00 \\
      --partition=gpu --account=myproj --venv=/shared/ecdit/.venv \\
      -- ecdit train --config=experiments/paper.py:xl_32e --workdir=/shared/runs/ec-xl

`--dry_run` prints the script instead of writing and submitting it. Otherwise the script is written to
--script (default `<job_name>.sbatch` in the current folder) and passed to `sbatch`.

The job runs one task per GPU (`--ntasks-per-node` = GPUs per node), which is how JAX's SLURM detection
works: `jax.distributed.initialize()` reads SLURM_PROCID / SLURM_NTASKS / SLURM_STEP_NODELIST and gives each
task the GPU numbered SLURM_LOCALID. The script exports ECDIT_DISTRIBUTED=auto so
`ecdit.parallel.distributed.initialize()` hands over to that detection. `srun --kill-on-bad-exit=1` ends the
whole step as soon as one task fails, so a dead task never leaves the others waiting on a collective.
With `--container_image` the step runs inside that image through the pyxis plugin (`srun --container-*`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import sbatch_quote, sh_join, sh_quote  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch/slurm.py', description=__doc__.split('\n\n')[0],
      usage='%(prog)s --job_name=NAME [flags] -- COMMAND [ARGS...]',
      epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--job_name', default='ecdit', help='SLURM job name (default ecdit)')
  parser.add_argument('--nodes', type=int, default=1)
  parser.add_argument('--gpus_per_node', type=int, default=8, help='0 for CPU nodes (one task per node)')
  parser.add_argument('--cpus_per_task', type=int, default=None)
  parser.add_argument('--mem', default=None, help='memory per node, e.g. 200G (default: the partition\'s)')
  parser.add_argument('--time', default='01:00:00', help='wall-clock limit, [D-]HH:MM:SS')
  parser.add_argument('--partition', default=None)
  parser.add_argument('--account', default=None)
  parser.add_argument('--qos', default=None)
  parser.add_argument('--output', default='%x-%j.out', help='log file pattern (default %%x-%%j.out)')
  parser.add_argument('--exclusive', action='store_true', help='whole nodes only')
  parser.add_argument('--chdir', default=None, help='folder the job runs in (default: the current one)')
  parser.add_argument('--module', action='append', default=[], help='`module load` this first (repeatable)')
  parser.add_argument('--venv', default=None, help='virtualenv to activate (its folder)')
  parser.add_argument('--container_image', default=None, help='run srun inside this image (pyxis)')
  parser.add_argument('--container_mounts', default=None, help='pyxis mounts, SRC:DST[,SRC:DST...]')
  parser.add_argument('--script', default=None, help='where to write the script (default <job_name>.sbatch)')
  parser.add_argument('--dry_run', action='store_true', help='print the script; write and submit nothing')
  common.add_env_flag(parser)
  return parser


def render(args) -> str:
  """The sbatch script for parsed arguments (`args.command` is the command to run)."""
  if args.nodes < 1 or args.gpus_per_node < 0:
    raise common.LaunchError('--nodes must be >= 1 and --gpus_per_node >= 0')
  tasks_per_node = max(args.gpus_per_node, 1)
  directives = [('job-name', args.job_name), ('nodes', args.nodes), ('ntasks-per-node', tasks_per_node)]
  if args.gpus_per_node:
    directives.append(('gpus-per-node', args.gpus_per_node))
  for key in ('cpus_per_task', 'mem', 'time', 'partition', 'account', 'qos', 'output'):
    value = getattr(args, key)
    if value is not None:
      directives.append((key.replace('_', '-'), value))

  lines = ['#!/bin/bash']
  lines += [f'#SBATCH --{key}={sbatch_quote(value)}' for key, value in directives]
  if args.exclusive:
    lines.append('#SBATCH --exclusive')
  lines += ['', '# Written by launch/slurm.py.', 'set -eo pipefail', '']
  chdir = args.chdir or os.getcwd()
  lines.append(f'cd {sh_quote(chdir)}')
  for module in args.module:
    lines.append(f'module load {sh_quote(module)}')
  if args.venv:
    lines.append(f'source {sh_quote(os.path.join(args.venv, "bin", "activate"))}')
  for key, value in common.parse_env(args.env):
    lines.append(f'export {key}={sh_quote(value)}')
  if args.nodes * tasks_per_node > 1:
    lines.append(f'export {common.ENV_MODE}=auto   # jax.distributed.initialize() reads the SLURM variables')
  lines.append('')

  srun = ['srun', '--kill-on-bad-exit=1', f'--ntasks-per-node={tasks_per_node}']
  if args.container_image:
    srun += [f'--container-image={args.container_image}', f'--container-workdir={chdir}']
    if args.container_mounts:
      srun.append(f'--container-mounts={args.container_mounts}')
  lines.append(sh_join(srun + list(args.command)))
  return '\n'.join(lines) + '\n'


def default_script_path(job_name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]', '_', job_name) + '.sbatch'


def main(argv=None) -> int:
  args = common.parse_args(build_parser(), argv)
  script = render(args)
  if args.dry_run:
    sys.stdout.write(script)
    return 0
  path = args.script or default_script_path(args.job_name)
  with open(path, 'w') as f:
    f.write(script)
  print(f'[launch] wrote {path}', file=sys.stderr)
  return common.submit(['sbatch', path], dry_run=False)


if __name__ == '__main__':
  sys.exit(common.main_wrapper(main))
