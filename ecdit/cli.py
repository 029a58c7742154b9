"""The `ecdit` command: `ecdit <command> [--flags]`, `ecdit <command> --help` for that command's flags.

Each command is a module of `ecdit.commands` exposing `main(argv)`; its absl flags are defined when that
module is imported, so a command only pays for (and only shows) its own flags. This is also the one error
boundary: an `ecdit.errors.EcditError` from any command ends it with `ecdit: error: <message>` on one line and
the error's exit status (2: usage, 1: runtime); `--verbose` or ECDIT_VERBOSE=1 prints the traceback too.
"""
import importlib
import os
import sys
import traceback

from absl import app

from ecdit import errors, malloc
from ecdit.commands import flags as cflags

COMMANDS = {
    'train': ('ecdit.commands.train', 'train an experiment (default: shapes_tiny into ./runs/shapes_tiny)'),
    'sample': ('ecdit.commands.sample', 'write a PNG grid of samples for prompts from a workdir'),
    'prepare': ('ecdit.commands.prepare', 'materialise an experiment\'s dataset under its data dir'),
    'params': ('ecdit.commands.params', 'total and activated parameter counts, without allocating'),
    'bench': ('ecdit.commands.bench', 'benchmarks, e.g. `ecdit bench routing` (`ecdit bench --help`: all)'),
    'eval': ('ecdit.commands.eval', 'GenEval-style scores for a workdir (or --ground_truth) on shapes prompts'),
    'analyze': ('ecdit.commands.analyze', 'experts per image token per layer/step: heat maps, fg/bg, text'),
    'compare': ('ecdit.commands.compare', 'runs side by side: loss curves PNG, GenEval scores, fg/bg ratio'),
    'export': ('ecdit.commands.export', 'a workdir as safetensors (+ PyTorch reference) or StableHLO artefacts'),
    'plan': ('ecdit.commands.plan', 'compile the train step for N simulated chips: memory, FLOPs, roofline'),
    'upcycle': ('ecdit.commands.upcycle', 'an EC-DiT workdir from a dense one (FFNs copied into experts)'),
}
VERBOSE_ENV = errors.VERBOSE_ENV


def usage() -> str:
  lines = ['usage: ecdit <command> [--flags]   (ecdit <command> --help for its flags)', '', 'commands:']
  lines += [f'  {name:<9} {help_}' for name, (_, help_) in COMMANDS.items()]
  return '\n'.join(lines)


def _wants_help(args) -> bool:
  """--help among the command's own arguments (not after `--`, which belongs to e.g. `bench data`)."""
  own = args[:args.index('--')] if '--' in args else args
  return any(a in cflags.HELP_ARGS for a in own)


def _report(e: errors.EcditError, argv) -> int:
  verbose = errors.verbose() or '--verbose' in argv \
      or cflags.FLAGS['verbose'].value   # a flag error may come before --verbose is parsed
  if verbose:
    traceback.print_exception(e)
  message = ' '.join(str(e).split()) or type(e).__name__   # one line, whatever the library wrote
  print(f'ecdit: error: {message}', file=sys.stderr, flush=True)
  return e.exit_code


def run(argv=None):
  from_command_line = argv is None
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  command, args = argv[1], argv[2:]
  if command not in COMMANDS:
    print(f'ecdit: unknown command {command!r}; expected one of {sorted(COMMANDS)}\n\n{usage()}',
          file=sys.stderr)
    return 2
  wants_help = _wants_help(args)
  if from_command_line and not wants_help:
    # glibc malloc settings that spare XLA:CPU ~0.6 s of page faults per train step (ecdit/malloc.py); glibc
    # reads them only at start, so the command re-executes itself once (ECDIT_SYSTEM_MALLOC=1 opts out).
    malloc.reexec_with_tuned_malloc()
  own = args[:args.index('--')] if '--' in args else args
  if any(a.lower() in ('--verbose', '--verbose=true', '--verbose=1') for a in own):
    os.environ[VERBOSE_ENV] = '1'   # before any work: library code reads it too (errors.verbose)
  try:
    module = importlib.import_module(COMMANDS[command][0])   # may fail on a bad --config.<key> already
    if wants_help:
      print(cflags.usage(module, command, args))
      return 0
    # A command may bring its own flags parser; the shared one makes every flag error one line.
    parser = getattr(module, 'flags_parser', cflags.flags_parser)
    app.run(module.main, argv=[f'ecdit {command}'] + args, flags_parser=parser)
  except errors.EcditError as e:
    return _report(e, args)
  except OSError as e:
    if e.filename is None:   # not a filesystem error about a path: a bug, keep its traceback
      raise
    # The filesystem refused a path no check anticipated (permissions, a full disk, a file where a folder
    # should be): still one line naming the path.
    failure = errors.RunError(f'{e.strerror or type(e).__name__}: {e.filename}')
    failure.__cause__ = e
    return _report(failure, args)
  return 0


if __name__ == '__main__':
  sys.exit(run())
