"""Orbax checkpoints of the train state, the data-iterator state and the resolved config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config,meta}`. In a multi-process run every process calls save
and restore (each writes its own shards; every leaf of the state is a global jax.Array). Saves are asynchronous (Orbax writes into a
temporary directory and renames it when complete, so a killed save leaves no step directory behind).
Restoring builds the target from the *current* config's abstract state (shapes, dtypes, shardings), so a
checkpoint can be restored onto another mesh; a checkpoint whose leaves or shapes differ from that state
(config.json edited) is refused from its metadata, naming the first leaf. A latest checkpoint that cannot be
read is reported (one line: step, leaf, short reason, the step used instead) and the newest readable one is
used; unreadable ones are moved to `<workdir>/checkpoints_unreadable/` (never deleted) so the run can write
that step again.

A save that fails in the background (a full disk) is found at the next `wait()` — the loop waits at the step
after each save, while that step computes, so nothing later is logged or saved — or `check()` (a flag read;
the loop's other steps), and raised as one CheckpointError line naming the step, the reason (the OS error's
words when there is one: 'No space left on device') and the last good checkpoint; what Orbax logged of that
failure is not shown (`_OrbaxErrors`; all of it with --verbose / ECDIT_VERBOSE=1). Warnings go to stderr. A failed Orbax operation lets its other
reads or writes end before its event loop closes (`_run_in_new_loop_and_drain`), so a damaged checkpoint is
one line, not hundreds of asyncio tracebacks.

Checksums (the `meta` item, JSON): Orbax verifies nothing per array, so every save records a 64-bit
checksum of every leaf of the state, and every restore recomputes it from the arrays it read; a mismatch (a
flipped bit on disk) makes that step unreadable like any other damage: one line naming the step, the first
differing leaf and "checksum", then the previous step. The checksum is taken over the leaf's raw bits (uint32
words; 1- and 2-byte types widened): two lanes of  sum_i f_j(i, w_i)  mod 2**32 over the flat row-major
index i, where f_j(i, ·) is a bijection of the word (murmur3's finaliser keyed by a hash of i). Integer sums
mod 2**32 are exact and order-free, so the value depends only on the array's global contents — not on its
sharding, the mesh, the device count or the number of processes (a checkpoint restored onto another mesh is
still checked; every process gets the same value, process 0 writes it) — and a change of any one element
always changes both lanes. On accelerators it is computed on the devices, on CPU in numpy over the shards each
process holds (`summarize`). Checkpoints from before the item (no `meta`
directory) restore unchecked. The item also keeps the loop's host-side counters (`loop`: the consecutive
skipped steps), restored as `Checkpointer.loop_state`. Data-iterator states are validated through
`restore_latest(check_data=)`: a bad one is damage too.
"""
from __future__ import annotations

import asyncio
import functools
import logging as py_logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils as ocp_asyncio
from jax.sharding import NamedSharding, PartitionSpec as P

from ecdit import errors
from ecdit.train.state import all_finite


META_VERSION = 1
_SEEDS = (0x9E3779B9, 0x7F4A7C15)   # one per fingerprint lane
_MIX = (0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F)
_SUB_BYTE = ('int2', 'uint2', 'int4', 'uint4', 'float4_e2m1fn')


def _fmix(h, xp):
  """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit over the output."""
  h = h ^ (h >> 16)
  h = h * xp.uint32(_MIX[0])
  h = h ^ (h >> 13)
  h = h * xp.uint32(_MIX[1])
  return h ^ (h >> 16)


def _lanes(w, index, xp):
  """The two lane sums (uint32, mod 2**32) of words `w` at flat positions `index`."""
  a = _fmix(w ^ _fmix(index ^ xp.uint32(_SEEDS[0]), xp), xp)
  b = _fmix((w + _fmix(index ^ xp.uint32(_SEEDS[1]), xp)) * xp.uint32(_MIX[2]), xp)
  return a.sum(dtype=xp.uint32), b.sum(dtype=xp.uint32)


def _words(x, xp):
  """The raw bits as uint32 words: 4-byte types bitcast, 1- and 2-byte ones widened, 8-byte ones split (a
  trailing axis of 2, low word first); sub-byte types through their exact float32 values."""
  if xp is jnp and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == np.bool_:
    return x.astype(xp.uint32)
  if np.dtype(x.dtype).name in _SUB_BYTE:
    x = x.astype(xp.float32)
  size = np.dtype(x.dtype).itemsize
  unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32, 8: xp.uint32}[size]
  if xp is jnp:
    return jax.lax.bitcast_convert_type(x, unsigned).astype(xp.uint32)
  w = np.ascontiguousarray(x).view(unsigned).astype(np.uint32, copy=False)
  return w.reshape(x.shape + (2,)) if size == 8 else w


def fingerprint(x) -> jax.Array:
  """uint32[2], the checksum of one array (module docstring), on the device: jit it; sharded inputs are fine."""
  w = _words(jnp.asarray(x), jnp)
  index, stride = jnp.zeros(w.shape, jnp.uint32), 1
  for axis in reversed(range(w.ndim)):   # the flat row-major index, from per-axis iotas (shards stay local)
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  return jnp.stack(_lanes(w, index, jnp))


def _block_fingerprint(block: np.ndarray, where: tuple, shape: tuple) -> np.ndarray:
  """fingerprint()'s lane sums over one block of an array of `shape`, at `where` (a shard's slices): the
  same numbers in numpy, so the blocks of a sharded array add up to the whole array's value."""
  w = _words(block, np)
  full = tuple(shape) + w.shape[block.ndim:]   # the words' global shape (8-byte types: a trailing 2)
  where = tuple(where) + (slice(None),) * (len(full) - len(where))
  index, stride = np.zeros(w.shape, np.uint64), 1
  for axis in reversed(range(len(full))):
    coords = np.arange(*where[axis].indices(full[axis]), dtype=np.uint64) * np.uint64(stride % 2**32)
    index += coords.reshape((-1,) + (1,) * (len(full) - axis - 1))
    stride *= full[axis]
  with np.errstate(over='ignore'):
    return np.array(_lanes(w, (index % np.uint64(2**32)).astype(np.uint32), np), np.uint32)


def _host_fingerprints(leaves) -> np.ndarray:
  """uint32[len(leaves), 2] from the host copies of the shards this process holds (one replica of each),
  summed over the processes."""
  out = np.zeros((len(leaves), 2), np.uint32)
  with np.errstate(over='ignore'):
    for k, leaf in enumerate(leaves):
      if isinstance(leaf, jax.Array):
        blocks = [(np.asarray(sh.data), sh.index) for sh in leaf.addressable_shards if sh.replica_id == 0]
      else:
        blocks = [(np.asarray(leaf), ())]
      for block, where in blocks:
        out[k] += _block_fingerprint(block, where, np.shape(leaf))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      out = np.asarray(multihost_utils.process_allgather(out)).sum(axis=0, dtype=np.uint32)
  return out


@functools.lru_cache(maxsize=8)
def _jitted(mesh):
  """The finite check and the per-leaf fingerprint, jitted with their results replicated on the mesh, so that
  every process can read them (a multi-process state spans processes)."""
  out = None if mesh is None else NamedSharding(mesh, P())
  return (jax.jit(lambda s: all_finite((s.params, s.ema_params, s.opt_state)), out_shardings=out),
          jax.jit(fingerprint, out_shardings=out))


def summarize(state) -> tuple[bool, dict[str, str]]:
  """(params, EMA and optimizer state all finite, {leaf path: 16 hex digits of its checksum}).

  On accelerators each leaf is hashed on its devices by the jitted `fingerprint` (a few integer ops per
  element; one small program per distinct shape, dtype and sharding, so compiling does not grow with the
  depth). On CPU the arrays already lie in host memory, and XLA:CPU would spend seconds compiling those
  programs for milliseconds of work, so numpy hashes each shard there. Both give the same numbers, bit for
  bit, so a checkpoint written by either verifies under the other."""
  leaves = jax.tree_util.tree_leaves_with_path(state)
  first = leaves[0][1] if leaves else None
  sharding = getattr(first, 'sharding', None)
  finite_fn, fingerprint_fn = _jitted(sharding.mesh if isinstance(sharding, NamedSharding) else None)
  finite = bool(finite_fn(state))
  if isinstance(first, jax.Array) and next(iter(first.devices())).platform != 'cpu':
    sums = np.stack(jax.device_get([fingerprint_fn(leaf) for _, leaf in leaves]))
  else:
    sums = _host_fingerprints([leaf for _, leaf in leaves])
  return finite, {jax.tree_util.keystr(path): f'{int(a):08x}{int(b):08x}' for (path, _), (a, b) in zip(leaves, sums)}


def _check_meta(meta, checksums: dict[str, str]) -> dict:
  """The restored arrays' checksums against the saved ones; returns the loop counters. CheckpointError names
  the first leaf (in tree order) that differs."""
  if not isinstance(meta, dict) or meta.get('version') != META_VERSION or not isinstance(meta.get('checksums'), dict):
    raise CheckpointError(f'its meta item is not an ecdit meta record of version {META_VERSION}')
  saved = meta['checksums']
  for name, value in checksums.items():
    if saved.get(name) != value:
      raise CheckpointError(f'checksum mismatch in {name} (saved {saved.get(name)}, read {value})')
  extra = [name for name in saved if name not in checksums]
  if extra:
    raise CheckpointError(f'checksum of {extra[0]}, a leaf the restored state does not have')
  counters = meta.get('loop', {})
  if not isinstance(counters, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in counters.values()):
    raise CheckpointError(f'loop counters {counters!r}: expected non-negative integers')
  return counters


class NonFiniteStateError(errors.RunError, RuntimeError):
  pass


class CheckpointError(errors.RunError, RuntimeError):
  pass


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's leaves or shapes are not those of the state the config builds (`name`: the first leaf that
  differs, `saved` / `wanted`: its shapes there and here, None where it is absent), or no checkpoint fits it
  (`step`, `reason`)."""

  def __init__(self, message: str, *, name=None, saved=None, wanted=None, step=None, reason=None):
    super().__init__(message)
    self.name, self.saved, self.wanted, self.step, self.reason = name, saved, wanted, step, reason


def _shapes(tree) -> dict[str, tuple]:
  """{dotted leaf name ('params.block_0.mlp.kernel', as Orbax names the arrays): shape} of a state or of a
  checkpoint's metadata tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '.'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))) for k in path)
    out[name] = tuple(getattr(leaf, 'shape', np.shape(leaf)))
  return out


def _warn(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class _OrbaxErrors(py_logging.Filter):
  """Orbax logs every failure of a save or read from its threads, with a full traceback (thousands of lines
  for a full disk), and ecdit then reports the same failure itself in one line (its cause chained, for
  --verbose). So while a checkpoint operation is under way (`hold`), Orbax's ERROR records are held back;
  when it ends (`release`) they are dropped if it failed (ecdit's line says it) and logged as they were if it
  succeeded (about something else). Outside an operation only their tracebacks are cut. With
  `errors.verbose()` everything is logged as Orbax wrote it."""

  def __init__(self):
    super().__init__()
    self._lock = threading.Lock()
    self._holds = 0
    self._held: list[py_logging.LogRecord] = []

  def filter(self, record):
    if '/orbax/' not in record.pathname.replace('\\', '/') or getattr(record, 'ecdit_released', False) \
        or errors.verbose():
      return True
    if record.levelno >= py_logging.ERROR:
      with self._lock:
        if self._holds:
          self._held.append(record)
          return False
    if record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True

  def hold(self) -> None:
    with self._lock:
      self._holds += 1

  def release(self, failed: bool) -> None:
    """Ends one `hold`; `failed`: the operation failed and ecdit reports it, so what it held is dropped."""
    with self._lock:
      self._holds = max(0, self._holds - 1)
      if failed:
        self._held.clear()
      if self._holds:
        return
      records, self._held = self._held, []
    for record in records:
      record.ecdit_released = True
      if record.exc_info:
        record.exc_info, record.exc_text = None, None
      py_logging.getLogger(record.name).handle(record)


_ORBAX_FILTER = _OrbaxErrors()
py_logging.getLogger('absl').addFilter(_ORBAX_FILTER)

_DRAIN_S = 120.0   # how long a failed Orbax operation's other reads or writes may take to end


def _run_in_new_loop_and_drain(coro):
  """Orbax's `asyncio_utils._run_sync_via_new_loop`, which closes its event loop as soon as the coroutine
  raises, though `asyncio.gather` leaves the coroutine's other tasks running: every TensorStore read still in
  flight then completes onto the closed loop ('RuntimeError: Event loop is closed' from TensorStore's threads,
  and 'Exception ignored in <coroutine ...>' when the abandoned tasks are collected) — hundreds of tracebacks
  for one damaged checkpoint. Here the loop, on failure, first lets those tasks end (their own failures are
  consumed: the first one is what is raised), then closes."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    try:
      return loop.run_until_complete(coro)
    except Exception:   # not on Ctrl-C: that stops at once, as before
      pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
      if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_S))
        stuck = [t for t in pending if not t.done()]
        for task in stuck:
          task.cancel()
        if stuck:
          loop.run_until_complete(asyncio.wait(stuck, timeout=5))
      for task in pending:
        if task.done() and not task.cancelled():
          task.exception()   # retrieved: no 'Task exception was never retrieved' at collection
      raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


if hasattr(ocp_asyncio, '_run_sync_via_new_loop'):   # the Orbax version requirements.txt pins
  ocp_asyncio._run_sync_via_new_loop = _run_in_new_loop_and_drain   # pylint: disable=protected-access


def _chain(e: BaseException) -> list[BaseException]:
  """`e` and the exceptions behind it, as a traceback shows them (the cause, else the unsuppressed context)."""
  out = []
  while e is not None and all(e is not x for x in out):
    out.append(e)
    e = e.__cause__ if e.__cause__ is not None else None if e.__suppress_context__ else e.__context__
  return out


_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]|\[OS error (\d+)")
_STATUS = re.compile(r'^[A-Z][A-Z_]{2,}: ')   # absl status codes TensorStore puts first (DATA_LOSS: ...)
# Where TensorStore was, each a prefix of its message: 'Error opening "zarr" driver: ', 'Error reading "params.x/0.0"
# in OCDBT database at local file "/run/checkpoints/6/state/": ', 'Error reading Byte range [0, 520) of local file
# "/run/.../d/b0ce": '.
_TS_WHERE = re.compile(r'(?:Error|Failed) [a-z]+ing\b(?:[^":]|"[^"]*")*?: ')
_TS_KEY = re.compile(r'"([^"]*)" in OCDBT')
_SPEC_KEY = re.compile(r"'path': '([^'/]+)/'")   # the array's key in the store spec Orbax's wrapper prints
_TS_DETAILS = re.compile(r"\s*See full TensorStore details:.*$|\s*\[\w+='.*$")   # the spec; status payloads


def _os_reason(e: BaseException) -> str | None:
  """The operating system's words for the first OS error in `e`'s chain ('No space left on device'), whether
  raised as an OSError or carried in the text of a TensorStore status ([os_error_code='28'])."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.strerror:
      return x.strerror
    match = _OS_ERROR_CODE.search(str(x))
    if match:
      return os.strerror(int(match.group(1) or match.group(2)))
  return None


def _reason(e: BaseException, limit: int = 200, with_leaf: bool = True) -> str:
  """One short line saying why a save or restore failed: the OS error's words if there is one, else the first
  line of the underlying error (Orbax's wrappers, TensorStore's spec dump and file paths dropped); `with_leaf`:
  led by the array it concerns, when the error names it ('params.x.kernel: ...')."""
  chain = _chain(e)
  k = 0   # Orbax re-raises TensorStore's error under its own words and the store's spec: go below those
  while k + 1 < len(chain) and 'TensorStore details' in str(chain[k]):
    k += 1
  leaf = next((key for x in chain[:k + 1] for key in _SPEC_KEY.findall(str(x))), None)
  line = (str(chain[k]).strip().splitlines() or [type(chain[k]).__name__])[0]
  line = _STATUS.sub('', _TS_DETAILS.sub('', line))
  while (where := _TS_WHERE.match(line)) is not None:
    key = _TS_KEY.search(where.group(0))
    leaf = key.group(1).rsplit('/', 1)[0] if key else leaf   # 'params.x.kernel/0.0': the leaf, then the chunk
    line = line[where.end():]
  line = _os_reason(e) or line
  line = f'{leaf}: {line}' if leaf and with_leaf else line
  return line if len(line) <= limit else line[:limit - 1] + '…'


def _manager(directory: Path, keep: int, use_async: bool, read_only: bool = False) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save killed mid-write leaves only an incomplete temporary directory,
  # which is removed when the next training run opens the manager (complete checkpoints are never touched).
  # A reader leaves it: the run may still be training and writing it.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         cleanup_tmp_directories=not read_only,
                                         enable_async_checkpointing=use_async)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data', 'config', 'meta'))


class Checkpointer:
  def __init__(self, workdir: str | Path, *, keep: int = 3, use_async: bool = True, read_only: bool = False):
    """`read_only` (sample, eval, export…): opening the run deletes no temporary directory, and an unreadable
    checkpoint is skipped but not moved (`restore_latest`)."""
    self.workdir = Path(workdir).absolute()  # Orbax wants absolute paths
    self.directory = self.workdir / 'checkpoints'
    self.keep, self.use_async, self.read_only = keep, use_async, read_only
    self.manager = _manager(self.directory, keep, use_async, read_only)
    self._saving = None   # the step of the save in flight (asynchronous), until it is known to be done
    self.loop_state: dict[str, int] = {}   # the restored step's loop counters (restore_latest)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: Any, config: dict, loop: dict[str, int] | None = None) -> None:
    """Starts an async save of `state` (refused if anything in it is not finite), with its checksums and the
    loop's counters `loop` (e.g. {'consecutive_skips': 2}) in the meta item."""
    finite, checksums = summarize(state)
    if not finite:
      raise NonFiniteStateError(f'refusing to checkpoint step {step}: the train state is not finite')
    meta = {'version': META_VERSION, 'checksums': checksums, 'loop': dict(loop or {})}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta))
    self.wait()   # the previous save's failure is reported as its own step, not this one's
    self._saving = step
    _ORBAX_FILTER.hold()   # Orbax's logs of this save are held until it is known to have failed or not
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 — the synchronous part of a save (or a synchronous save) failed
      self._failed(e)
    if not self.use_async:
      self._saving = None
      _ORBAX_FILTER.release(failed=False)

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
    _ORBAX_FILTER.release(failed=False)

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
    _ORBAX_FILTER.release(failed=True)   # what Orbax logged of it: the line below says it
    self.manager.reload()   # the steps on disk now
    good = [s for s in self.manager.all_steps() if s != step]
    last = f'step {max(good)}' if good else 'none'
    raise CheckpointError(f'checkpoint of step {step} in {self.directory} failed: {_reason(e, with_leaf=False)}; '
                          f'the last good checkpoint is {last}') from e

  def close(self) -> None:
    """Waits for the save in flight and closes the manager (always: its background threads must not outlive
    it); CheckpointError if that save failed."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def _check_layout(self, step: int, abstract_state) -> None:
    """CheckpointMismatchError if the step's saved state has other leaves or shapes than `abstract_state` (from
    the state item's metadata, before any array is read)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      saved = handler.metadata(self.directory / str(step) / 'state')
    except Exception:  # noqa: BLE001 — unreadable metadata: the restore itself reports what is wrong
      return
    finally:
      handler.close()
    saved = _shapes(getattr(saved, 'tree', saved))
    wanted = _shapes(abstract_state)
    for name, shape in wanted.items():
      if name not in saved:
        raise CheckpointMismatchError(f'{name} {shape} is in the config but not in the checkpoint', name=name,
                                      wanted=shape)
      if saved[name] != shape:
        raise CheckpointMismatchError(f'{name} has shape {saved[name]} in the checkpoint, {shape} in the config',
                                      name=name, saved=saved[name], wanted=shape)
    extra = next((n for n in saved if n not in wanted), None)
    if extra is not None:
      raise CheckpointMismatchError(f'the checkpoint holds {extra} {saved[extra]}, which the config does not have',
                                    name=extra, saved=saved[extra])

  def _restore_step(self, step: int, abstract_state):
    """(state, data state, loop counters) of one step; CheckpointError (its message: the reason only) if the
    step is damaged, CheckpointMismatchError if it does not fit `abstract_state`."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                 config=ocp.args.JsonRestore())
    checked = (self.directory / str(step) / 'meta').is_dir()   # no meta item: a checkpoint from before it,
    if not checked and any((self.directory / str(s) / 'meta').is_dir() for s in self.steps()):
      # unless another checkpoint of the same run has one: then this one lost it (damage, or a partial copy).
      raise CheckpointError('its meta item (checksums) is missing while other checkpoints of this run have one')
    if checked:
      items['meta'] = ocp.args.JsonRestore()
    self._check_layout(step, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = out['state']
    if int(np.asarray(state.step)) != step:
      raise CheckpointError(f'it holds step {int(np.asarray(state.step))}')
    finite, checksums = summarize(state)
    counters = _check_meta(out['meta'], checksums) if checked else {}
    if not finite:
      raise CheckpointError('it holds non-finite values')
    return state, out['data'], counters

  def restore_latest(self, abstract_state, check_data: Callable[[Any, int], None] | None = None,
                     move_unreadable: bool | None = None, step: int | None = None):
    """Returns (state, data_state, step) from the newest readable checkpoint, or None if there is none;
    with `step`, that checkpoint only (one of `steps()`: the caller checks), never an older one.

    Readable means its leaves and shapes are those of `abstract_state`, Orbax reads it, it holds its own step,
    finite values matching their saved checksums, and `check_data(data_state, step)` (the caller's validation
    of the data-iterator state) does not raise. Newer unreadable checkpoints are reported on stderr, one line
    each naming the step used instead, and moved aside — unless `move_unreadable` is False, as for the
    read-only commands (a run still training may be writing them). If none can be read, nothing is moved and
    one CheckpointError says why: CheckpointMismatchError when none fits the config (shapes, leaves or the
    data-iterator state), else that the checkpoints are unreadable. The step's loop counters are left in
    `self.loop_state` ({} for a checkpoint from before them).
    """
    if move_unreadable is None:
      move_unreadable = not self.read_only
    steps = self.steps() if step is None else [step]
    failures = []   # (step, reason, kind, error); kind: 'damage', 'layout' (not the config's) or 'data' (refused)
    for step in reversed(steps):
      _ORBAX_FILTER.hold()   # a failed read is reported below (a warning line or the error): not by Orbax too
      failed = True
      try:
        state, data_state, counters = self._restore_step(step, abstract_state)
        failed = False
      except CheckpointMismatchError as e:
        failures.append((step, str(e), 'layout', e))
        continue
      except Exception as e:  # noqa: BLE001 — any read failure means "try the previous one".
        failures.append((step, _reason(e), 'damage', e))
        continue
      finally:
        _ORBAX_FILTER.release(failed)
      if check_data is not None:
        try:
          check_data(data_state, step)
        except Exception as e:  # noqa: BLE001 — the caller's refusal of the data-iterator state
          reason = _reason(e)
          reason = reason if 'data-iterator' in reason else f'data-iterator state: {reason}'
          failures.append((step, reason, 'data', e))
          continue
      for bad, reason, kind, _ in failures:
        what = 'does not fit the config' if kind == 'layout' else 'is unreadable'
        _warn(f'warning: checkpoint step {bad} in {self.directory} {what} ({reason}); using step {step} instead')
      if failures and move_unreadable:
        self._quarantine([s for s, _, _, _ in failures])
      self.loop_state = dict(counters)
      return state, data_state, step
    if not failures:
      return None
    step, reason, _, first = failures[0]
    if all(kind != 'damage' for _, _, kind, _ in failures):   # read, but not this config's: the hint helps
      raise CheckpointMismatchError(f'no checkpoint in {self.directory} fits the config (latest step {step}: '
                                    f'{reason}); does the config match the run that wrote them?', step=step,
                                    reason=reason) from first
    tried = ', '.join(str(s) for s, _, _, _ in failures)
    raise CheckpointError(f'the checkpoints in {self.directory} are unreadable (tried steps {tried}; step {step}: '
                          f'{reason}); the last good checkpoint is none') from first

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
          _warn(f'moved unreadable checkpoint {src} to {dest}')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('ecdit: unreadable checkpoints moved')
    self.manager = _manager(self.directory, self.keep, self.use_async, self.read_only)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the given shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
