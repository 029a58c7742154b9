"""The errors a command turns into one `ecdit: error: <message>` line and an exit status (stdlib only).

Library code raises a specific subclass (ConfigError, WorkdirError, CheckpointError, ...); the one boundary in
`ecdit.cli` prints its message and exits with its `exit_code`. Anything else is a bug and keeps its traceback.

  EcditError          base; exit 1
  ├── UsageError      bad flags, config values or input paths the user gave: exit 2
  └── RunError        the work itself failed (checkpoint, non-finite loss, damaged data): exit 1
"""
import os

VERBOSE_ENV = 'ECDIT_VERBOSE'   # '1': tracebacks and the libraries' own error logs too (`--verbose` sets it)


def verbose() -> bool:
  """Whether the user asked for tracebacks (ECDIT_VERBOSE=1, or `--verbose`, which the command line turns into
  it): library code then leaves the logs of failures it reports itself as they are."""
  return os.environ.get(VERBOSE_ENV, '') not in ('', '0')


class EcditError(Exception):
  """An anticipated failure; its message is one line naming the bad value and what was expected."""
  exit_code = 1


class UsageError(EcditError):
  """The command was asked for something it cannot do: a bad flag, config value or input path."""
  exit_code = 2


class RunError(EcditError):
  """The command started its work and that work failed."""
  exit_code = 1
