"""The `ecdit` command: `ecdit <command> [--flags]`.

Each command lives in its own module exposing `main(argv)`; its absl flags are defined when that module is
imported, so a command only pays for (and only shows) its own flags.
"""
import importlib
import sys

from absl import app

COMMANDS = {
    'train': ('ecdit.train.main', 'train an experiment (default: shapes_tiny into ./runs/shapes_tiny)'),
    'sample': ('ecdit.diffusion.sample_main', 'write a PNG grid of samples for prompts from a workdir'),
    'prepare': ('ecdit.data.prepare', 'materialise an experiment\'s dataset under its data dir'),
    'params': ('ecdit.models.params', 'total and activated parameter counts, without allocating'),
    'bench': ('ecdit.bench.main', 'benchmarks, e.g. `ecdit bench routing`'),
    'eval': ('ecdit.eval.main', 'GenEval-style scores for a workdir (or --ground_truth) on shapes prompts'),
    'analyze': ('ecdit.eval.analyze_main', 'experts per image token per layer/step: heat maps, fg/bg, text'),
    'compare': ('ecdit.eval.compare_main', 'runs side by side: loss curves PNG, GenEval scores, fg/bg ratio'),
    'export': ('ecdit.export.main', 'a workdir as safetensors (+ PyTorch reference) or StableHLO artefacts'),
    'upcycle': ('ecdit.export.upcycle_main', 'an EC-DiT workdir from a dense one (FFNs copied into experts)'),
}


def fail(msg: str, code: int = 2):
  """Ends a command with one clear error line (no traceback): the commands' shared way to refuse input."""
  print(f'ecdit: error: {msg}', file=sys.stderr, flush=True)
  sys.exit(code)


def usage() -> str:
  lines = ['usage: ecdit <command> [--flags]   (ecdit <command> --help for its flags)', '', 'commands:']
  lines += [f'  {name:<9} {help_}' for name, (_, help_) in COMMANDS.items()]
  return '\n'.join(lines)


def run(argv=None):
  from_command_line = argv is None
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  command = argv[1]
  if command not in COMMANDS:
    print(f'ecdit: unknown command {command!r}; expected one of {sorted(COMMANDS)}\n\n{usage()}',
          file=sys.stderr)
    return 2
  if from_command_line:
    # glibc malloc settings that spare XLA:CPU ~0.6 s of page faults per train step (ecdit/malloc.py); glibc
    # reads them only at start, so the command re-executes itself once (ECDIT_SYSTEM_MALLOC=1 opts out).
    from ecdit import malloc  # pylint: disable=import-outside-toplevel
    malloc.reexec_with_tuned_malloc()
  module = importlib.import_module(COMMANDS[command][0])
  # A command may bring its own flags parser (train: one-line errors for bad --config overrides).
  parser = getattr(module, 'flags_parser', app.parse_flags_with_usage)
  app.run(module.main, argv=[f'ecdit {command}'] + argv[2:], flags_parser=parser)


if __name__ == '__main__':
  sys.exit(run())
