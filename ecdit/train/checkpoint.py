"""Orbax checkpoints of the train state, the data-iterator state and the resolved config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. In a multi-process run every process calls save
and restore (each writes its own shards; every leaf of the state is a global jax.Array). Saves are asynchronous (Orbax writes into a
temporary directory and renames it when complete, so a killed save leaves no step directory behind).
Restoring builds the target from the *current* config's abstract state (shapes, dtypes, shardings), so a
checkpoint can be restored onto another mesh. A latest checkpoint that cannot be read is reported and the
newest readable one is used; unreadable ones are moved to `<workdir>/checkpoints_unreadable/` (never
deleted) so the run can write that step again.

A save that fails in the background (a full disk) is found at the next `check()` — the loop calls it every
step — or wait, and raised as one CheckpointError line naming the step, the reason and the last good
checkpoint; Orbax's own logged tracebacks of it are cut to their message line.
"""
from __future__ import annotations

import logging as py_logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from ecdit import errors
from ecdit.train.state import all_finite


def _is_finite(tree) -> bool:
  """all_finite as one jitted reduction whose result every process can read (replicated on the mesh)."""
  leaves = jax.tree.leaves(tree)
  sharding = getattr(leaves[0], 'sharding', None) if leaves else None
  if isinstance(sharding, NamedSharding):
    return bool(jax.jit(all_finite, out_shardings=NamedSharding(sharding.mesh, P()))(tree))
  return bool(all_finite(tree))


class NonFiniteStateError(errors.RunError, RuntimeError):
  pass


class CheckpointError(errors.RunError, RuntimeError):
  pass


class _NoOrbaxTracebacks(py_logging.Filter):
  """Orbax logs every failure of its background save threads with a full traceback (thousands of lines for a
  full disk); the failure itself is raised here as one line (its cause chained, for --verbose), so the log
  keeps only Orbax's message line."""

  def filter(self, record):
    if record.exc_info and '/orbax/' in record.pathname.replace('\\', '/'):
      record.exc_info, record.exc_text = None, None
    return True


_ORBAX_FILTER = _NoOrbaxTracebacks()
py_logging.getLogger('absl').addFilter(_ORBAX_FILTER)


def _reason(e: BaseException) -> str:
  """One line saying why: an OSError's own words ('No space left on device'), else the message's first line."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _manager(directory: Path, keep: int, use_async: bool) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save killed mid-write leaves only an incomplete temporary directory,
  # which is removed when the next run opens the manager (complete checkpoints are never touched).
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=use_async)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data', 'config'))


class Checkpointer:
  def __init__(self, workdir: str | Path, *, keep: int = 3, use_async: bool = True):
    self.workdir = Path(workdir).absolute()  # Orbax wants absolute paths
    self.directory = self.workdir / 'checkpoints'
    self.keep, self.use_async = keep, use_async
    self.manager = _manager(self.directory, keep, use_async)
    self._saving = None   # the step of the save in flight (asynchronous), until it is known to be done

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: Any, config: dict) -> None:
    """Starts an async save of `state` (refused if anything in it is not finite)."""
    if not _is_finite((state.params, state.ema_params, state.opt_state)):
      raise NonFiniteStateError(f'refusing to checkpoint step {step}: the train state is not finite')
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config))
    self.wait()   # the previous save's failure is reported as its own step, not this one's
    self._saving = step
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 — the synchronous part of a save (or a synchronous save) failed
      self._failed(e)
    if not self.use_async:
      self._saving = None

  def check(self) -> None:
    """Raises CheckpointError if the save in flight has failed; free (a lock read) while it is running."""
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; CheckpointError if it failed."""
    if self._saving is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 — any failure of the background write
      self._failed(e)
    self._saving = None

  def _failed(self, e: BaseException):
    step, self._saving = self._saving, None
    # Orbax re-raises a failed save at every later wait, close() included, which would then stop before
    # shutting its background threads down: the failure is reported here once, so it is forgotten there.
    finalize = getattr(self.manager, '_finalize_thread', None)
    if finalize is not None:
      finalize.set(None)
    # Orbax raises at the first item that failed while the others may still be writing into the step's
    # temporary directory: let them end, so none fails later (at exit, or under a manager that cleans it up).
    for thread in threading.enumerate():
      if type(thread).__module__.startswith('orbax.') and thread is not threading.current_thread():
        thread.join(timeout=60)
    good = [s for s in self.manager.all_steps(read=True) if s != step]
    last = f'step {max(good)}' if good else 'none'
    raise CheckpointError(f'checkpoint of step {step} in {self.directory} failed: {_reason(e)}; '
                          f'the last good checkpoint is {last}') from e

  def close(self) -> None:
    """Waits for the save in flight and closes the manager (always: its background threads must not outlive
    it); CheckpointError if that save failed."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def _restore_step(self, step: int, abstract_state):
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                              config=ocp.args.JsonRestore())
    out = self.manager.restore(step, args=args)
    state = out['state']
    if int(np.asarray(state.step)) != step:
      raise CheckpointError(f'checkpoint {step} holds step {int(np.asarray(state.step))}')
    if not _is_finite((state.params, state.ema_params, state.opt_state)):
      raise CheckpointError(f'checkpoint {step} holds non-finite values')
    return state, out['data']

  def restore_latest(self, abstract_state):
    """Returns (state, data_state, step) from the newest readable checkpoint, or None if there is none.

    Newer unreadable checkpoints are reported and moved aside. If none can be read, nothing is moved and
    the first error is raised (most likely the config no longer matches the checkpoints).
    """
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      try:
        state, data_state = self._restore_step(step, abstract_state)
      except Exception as e:  # noqa: BLE001 — any read failure means "try the previous one".
        msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
        logging.warning('checkpoint step %d is unreadable (%s); trying the previous one', step, msg)
        print(f'warning: checkpoint step {step} in {self.directory} is unreadable ({msg}); '
              'trying the previous one', flush=True)
        failures.append((step, e))
        continue
      if failures:
        self._quarantine([s for s, _ in failures])
      return state, data_state, step
    if failures:
      step, e = failures[0]
      raise CheckpointError(f'no readable checkpoint in {self.directory} (latest step {step}: '
                            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                            'does the config match the run that wrote them?') from e
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable step directories out of the manager's way (keeping them for inspection)."""
    self.manager.close()
    if jax.process_index() == 0:   # one process moves; the others wait for it
      dest_root = self.workdir / 'checkpoints_unreadable'
      dest_root.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.directory / str(step)
        if src.exists():
          dest = dest_root / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
          shutil.move(str(src), str(dest))
          print(f'moved unreadable checkpoint {src} to {dest}', flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('ecdit: unreadable checkpoints moved')
    self.manager = _manager(self.directory, self.keep, self.use_async)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the given shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
