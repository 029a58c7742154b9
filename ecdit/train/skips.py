"""The non-finite policy, applied on the host: stop at a skipped step (nan_policy='stop'), or after
train.max_skipped_steps consecutive ones (nan_policy='skip'), with one line naming the steps.

The jitted step has already skipped the update (ecdit.train.step), so the state is finite either way; this
only decides whether the run goes on. Under 'skip' a step's flag is read once the loop has waited for that
step anyway (it keeps one step in flight), so the check costs no device sync of its own. The count of
consecutive skips survives a resume (each checkpoint's meta item keeps it).
"""
from __future__ import annotations

from typing import Callable

from ecdit import errors


class NonFiniteLossError(errors.RunError, RuntimeError):
  """The non-finite policy stopped the run (one line: the steps, the policy, the last checkpoint)."""


class SkipGuard:
  def __init__(self, nan_policy: str, max_skipped: int, last_checkpoint: Callable[[], int | None], run: int = 0):
    self.stop_at_first = nan_policy == 'stop'
    self.limit = 1 if self.stop_at_first else max_skipped   # 0: never stop
    self.last_checkpoint = last_checkpoint
    # Consecutive skipped steps up to the last one seen. Checkpoints keep it (their meta item), and a resumed
    # run continues the count: a job that is requeued after every stop cannot creep on from checkpoint to
    # checkpoint with nothing but skipped steps.
    self.run = run

  def __call__(self, step: int, finite: bool) -> None:
    """Records whether `step` applied its update; raises NonFiniteLossError when the policy says stop."""
    self.run = 0 if finite else self.run + 1
    if not self.limit or self.run < self.limit:
      return
    last = self.last_checkpoint()
    last = 'none' if last is None else last
    if self.stop_at_first:
      raise NonFiniteLossError(
          f'non-finite loss, gradients or update at step {step} (train.nan_policy=stop); the update was not '
          f'applied. Last checkpoint: {last}')
    raise NonFiniteLossError(
        f'{self.run} consecutive steps skipped for a non-finite loss, gradients or update (steps '
        f'{step - self.run + 1}-{step}; train.max_skipped_steps={self.limit}, 0 never stops); their updates were '
        f'not applied. Last checkpoint: {last}')
