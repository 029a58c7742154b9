#!/usr/bin/env python3
"""Run an ecdit command on every host of a Cloud TPU VM slice through `gcloud ... tpu-vm ssh --worker=all`.

  python launch/tpu_vm.py --tpu=my-v5e-32 --zone=us-west4-a --copy_repo=. --pip_install \\
      -- ecdit train --config=experiments/paper.py:xl_32e --workdir=gs://bucket/runs/ec-xl

Steps, in order (each one `gcloud` call; `--dry_run` prints them, shell-quoted, one per line):
  --copy_repo=PATH  pack PATH (without .git, .venv, runs/) into a tarball, copy it to every worker and
                    unpack it into --remote_dir (default `ecdit`, relative to the remote home folder);
  --pip_install     create --remote_dir/.venv on every worker and `pip install -e . <--jax_spec>`;
  always            on every worker: cd --remote_dir, activate the venv (if --pip_install or --venv),
                    set ECDIT_DISTRIBUTED=auto plus --env values, run the command.

JAX finds the other workers of the slice by itself (TPU metadata server), so every worker runs the same
command. The ssh session lasts as long as the job: run this from tmux/screen for long trainings.
"""
from __future__ import annotations

import argparse
import os
import sys
import secrets
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import sh_join, sh_quote  # noqa: E402

TARBALL = 'ecdit-repo.tar.gz'
EXCLUDES = ('./.git', './.venv', './runs', '*/__pycache__')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch/tpu_vm.py', description=__doc__.split('\n\n')[0],
      usage='%(prog)s --tpu=NAME --zone=ZONE [flags] -- COMMAND [ARGS...]',
      epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tpu', required=True, help='TPU VM (slice) name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default=None)
  parser.add_argument('--worker', default='all', help='workers to run on (default all)')
  parser.add_argument('--internal_ip', action='store_true', help='ssh over internal IPs')
  parser.add_argument('--remote_dir', default='ecdit', help='repository folder on the workers (default ecdit)')
  parser.add_argument('--copy_repo', default=None, metavar='PATH', help='copy this local checkout first')
  parser.add_argument('--pip_install', action='store_true', help='make a venv and install the repo first')
  parser.add_argument('--jax_spec', default='jax[tpu]==0.10.2', help='extra pip requirement for TPUs')
  parser.add_argument('--venv', default=None, help='remote venv to activate (default: .venv if --pip_install)')
  parser.add_argument('--dry_run', action='store_true', help='print the gcloud commands; run nothing')
  common.add_env_flag(parser)
  return parser


def _gcloud(args, verb: str, *rest: str) -> list[str]:
  argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *rest, f'--zone={args.zone}']
  if args.project:
    argv.append(f'--project={args.project}')
  return argv


def ssh(args, remote_command: str) -> list[str]:
  argv = _gcloud(args, 'ssh', args.tpu, f'--worker={args.worker}', f'--command={remote_command}')
  if args.internal_ip:
    argv.append('--internal-ip')
  return argv


def remote_run_command(args) -> str:
  """The shell line every worker runs: cd, activate, environment, command; each value quoted."""
  parts = [f'cd {sh_quote(args.remote_dir)}']
  venv = args.venv or ('.venv' if args.pip_install else None)
  if venv:
    parts.append(f'. {sh_quote(venv + "/bin/activate")}')
  env = [f'{common.ENV_MODE}=auto'] + [f'{k}={v}' for k, v in common.parse_env(args.env)]
  parts.append('exec env ' + sh_join(env + list(args.command)))
  return ' && '.join(parts)


def launch_tarball() -> str:
  """A temporary path of this launch's own (`ecdit-repo-<pid>-<random>.tar.gz`): concurrent launches from one
  machine, or to one TPU, do not overwrite each other's repository copy."""
  name = TARBALL.replace('.tar.gz', f'-{os.getpid()}-{secrets.token_hex(4)}.tar.gz')
  return os.path.join(tempfile.gettempdir(), name)


def plan(args, tarball: str | None = None) -> list[tuple[str, list[str]]]:
  """(label, argv) for each step. `tarball` is the local path the repository is packed into."""
  steps = []
  if args.copy_repo:
    tarball = tarball or launch_tarball()
    remote = os.path.basename(tarball)   # per launch on the workers too: two launches never share one
    tar = ['tar', '-czf', tarball, '-C', args.copy_repo] + [f'--exclude={e}' for e in EXCLUDES] + ['.']
    steps.append(('pack the repository', tar))
    steps.append(('copy it to every worker', _gcloud(args, 'scp', tarball, f'{args.tpu}:{remote}',
                                                     f'--worker={args.worker}')))
    unpack = (f'mkdir -p {sh_quote(args.remote_dir)} && tar -xzf {sh_quote(remote)} -C {sh_quote(args.remote_dir)}'
              f' && rm -f {sh_quote(remote)}')
    steps.append(('unpack it', ssh(args, unpack)))
  if args.pip_install:
    install = (f'cd {sh_quote(args.remote_dir)} && python3 -m venv .venv && '
               f'.venv/bin/pip install -e . {sh_quote(args.jax_spec)}')
    steps.append(('install on every worker', ssh(args, install)))
  steps.append(('run on every worker', ssh(args, remote_run_command(args))))
  return steps


def main(argv=None) -> int:
  args = common.parse_args(build_parser(), argv)
  tarball = launch_tarball() if args.copy_repo else None
  try:
    for label, step in plan(args, tarball):
      rc = common.submit(step, args.dry_run, label=label)
      if rc:
        print(f'[launch] step "{label}" failed with exit code {rc}', file=sys.stderr)
        return rc
    return 0
  finally:
    if tarball and os.path.exists(tarball):
      os.remove(tarball)


if __name__ == '__main__':
  sys.exit(common.main_wrapper(main))
