"""The errors a command turns into one `ecdit: error: <message>` line and an exit status (stdlib only).

Library code raises a specific subclass (ConfigError, WorkdirError, CheckpointError, ...); the one boundary in
`ecdit.cli` prints its message and exits with its `exit_code`. Anything else is a bug and keeps its traceback.

  EcditError          base; exit 1
  ├── UsageError      bad flags, config values or input paths the user gave: exit 2
  └── RunError        the work itself failed (checkpoint, non-finite loss, damaged data): exit 1
"""


class EcditError(Exception):
  """An anticipated failure; its message is one line naming the bad value and what was expected."""
  exit_code = 1


class UsageError(EcditError):
  """The command was asked for something it cannot do: a bad flag, config value or input path."""
  exit_code = 2


class RunError(EcditError):
  """The command started its work and that work failed."""
  exit_code = 1
