"""The training input pipeline: grain over a prepared dataset's `as_data_source()`.

The stream is a pure function of (seed, split, position), which is what makes it checkpointable:

  stream[k]     = source[shuffle_epoch(k mod N)], epoch = k div N; each epoch reshuffled from (seed, epoch)
  global batch b = stream[b·G : (b+1)·G]        (G = global batch size)
  process p gets rows p·G/P … (p+1)·G/P − 1 of every global batch (P = process count)

Caption dropout (the empty caption, for classifier-free guidance) is decided per stream position k from a
hash of (seed, k), so it too is the same on every run. The iterator's state is just the number of global
batches consumed; resuming recreates the stream from that position. Because the global batch does not depend
on P, a run may even resume on a different number of processes and see the same global batches.
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Any

import grain
try:   # no public name; see _wait_for_shared_memory_release
  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray as _SharedMemoryArray
except ImportError:
  _SharedMemoryArray = None
from absl import flags
import jax
import numpy as np

from ecdit.config import data as config_lib
from ecdit.data import batch as batch_lib
from ecdit.data import prepare as prepare_lib
from ecdit.data import reader
from ecdit.data import latents

_STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


def _uniform(seed: int, positions: np.ndarray) -> np.ndarray:
  """Uniform [0, 1) numbers, one per stream position, from a splitmix64 hash of (seed, position)."""
  with np.errstate(over='ignore'):
    z = positions.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclasses.dataclass(frozen=True)
class _Collate:
  """Turns a list of stream elements into one host batch of the `ecdit.data.batch` contract (picklable, for
  grain worker processes)."""
  tokenizer: Any
  dropout: float
  dropout_seed: int
  null_text: tuple[np.ndarray, np.ndarray] | None = None   # (states, mask) of '' with precomputed states

  def __call__(self, elements):
    positions = np.array([e['position'] for e in elements], np.uint64)
    keep = _uniform(self.dropout_seed, positions) >= self.dropout
    captions = [e['caption'].decode('utf-8') if k else '' for e, k in zip(elements, keep)]
    image = np.stack([e['image'] for e in elements]).astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    batch = {'image': image, 'caption': captions}
    if 'text_states' in elements[0]:   # precomputed by a frozen encoder; dropped captions get the '' states
      null_states, null_mask = self.null_text
      batch['text'] = np.stack([e['text_states'] if k else null_states
                                for e, k in zip(elements, keep)]).astype(np.float32)
      batch['text_mask'] = np.stack([e['text_mask'] if k else null_mask
                                     for e, k in zip(elements, keep)]).astype(bool)
    else:
      batch['text'], batch['text_mask'] = self.tokenizer.encode_batch(captions)
    if 'latent' in elements[0]:
      batch['x0'] = np.stack([e['latent'] for e in elements]).astype(np.float32)
    else:
      batch['x0'] = image
    return batch


_PASSED_THROUGH = ('latent', 'text_states', 'text_mask')


def _with_position(position: int, record: dict) -> dict:
  out = {'position': position, 'image': record['image'], 'caption': record['caption']}
  for key in _PASSED_THROUGH:
    if key in record:
      out[key] = record[key]
  return out


def _release_frames(error: BaseException) -> None:
  """Clears the locals of the finished frames a worker's error still reaches (its traceback's frames and the
  frames that called them: grain's prefetch threads, holding the batches they last read), so the shared memory
  of those batches is freed now, not leaked at exit. The traceback still prints (--verbose)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    tb = error.__traceback__
    while tb is not None:
      frame = tb.tb_frame
      while frame is not None and id(frame) not in seen:
        seen.add(id(frame))
        try:
          frame.clear()
        except RuntimeError:   # still executing (this thread's own stack): its locals are in use
          pass
        frame = frame.f_back
      tb = tb.tb_next
    error = error.__cause__ or error.__context__


def _wait_for_shared_memory_release(timeout: float = 10.0) -> None:
  """Waits for grain to unlink the shared memory of the batches freed so far: it does so on one background
  thread (grain 0.2's `SharedMemoryArray._del_thread_pool`, in order), so a no-op queued behind them ends
  after them. Without it an exit right after an error may outrun the unlinks and Python warns of leaked
  shared memory. A grain without that pool: nothing to wait for."""
  pool = getattr(_SharedMemoryArray, '_del_thread_pool', None)
  if pool is not None:
    try:
      pool.apply_async(int).wait(timeout)
    except ValueError:   # the pool is already closed (interpreter exit)
      pass


class TrainIterator:
  """Iterator of batch dicts; `get_state()` / `set_state()` checkpoint it (a small JSON-serialisable dict)."""

  def __init__(self, batches: grain.MapDataset, *, sharding, global_batch_size: int, worker_count: int,
               identity: dict[str, Any], num_batches: int | None = None):
    self._batches = batches
    self._num_batches = num_batches   # this process's batches in the stream; None: endless
    self._sharding = sharding
    self._global_batch_size = global_batch_size
    self._worker_count = worker_count
    self._identity = identity
    self._step = 0
    self._iter = None

  def _start(self):
    ds = self._batches[self._step:].to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if self._worker_count > 0:
      # grain's workers read its absl flags; outside an absl app (a notebook, a test) nothing parsed them,
      # and the first access raises. Their defaults are what we want.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    self._iter = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    if self._iter is None:
      self._start()
    try:
      batch = next(self._iter)   # StopIteration ends a finite (num_epochs) stream
    except StopIteration:
      raise
    except Exception as e:   # a worker's error (a damaged record: reader.DataError)
      if self._worker_count > 0:
        _release_frames(e)
        self.close()
      raise
    self._step += 1
    if self._sharding is None:
      return batch
    out = {key: batch[key] for key in batch_lib.HOST_KEYS}
    for key in batch_lib.STEP_KEYS:
      shape = (self._global_batch_size,) + batch[key].shape[1:]
      out[key] = jax.make_array_from_process_local_data(self._sharding, batch[key], shape)
    return out

  def close(self) -> None:
    """Stops the grain iterator: with `worker_count > 0` its worker processes end and the batches they
    left in shared memory are freed (else an error that ends the run leaks them, and Python warns at exit).
    A later `next()` starts a new one."""
    it, self._iter = self._iter, None
    if it is not None and hasattr(it, 'close'):
      it.close()
    if self._worker_count > 0:
      gc.collect()   # batches grain let go of sit in reference cycles: freed now, not leaked at exit
      _wait_for_shared_memory_release()

  @property
  def step(self) -> int:
    """Global batches consumed so far."""
    return self._step

  def get_state(self) -> dict[str, Any]:
    return {'version': _STATE_VERSION, 'step': self._step, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at a `get_state()`; ValueError (one line, naming the value) for anything else: wrong type,
    version or keys, a position that is not an integer in [0, batches in the stream], another stream."""
    version = state.get('version') if isinstance(state, dict) else None
    if type(version) is not int or version != _STATE_VERSION:
      raise ValueError(f'not an input-pipeline state of version {_STATE_VERSION}: {str(state)[:200]}')
    expected = {'version', 'step', *self._identity}
    if set(state) != expected:
      raise ValueError(f'input-pipeline state has keys {sorted(state)}; expected {sorted(expected)}')
    step, end = state['step'], self._num_batches
    if type(step) is not int or step < 0 or (end is not None and step > end):
      expected = 'a non-negative integer' if end is None else f'an integer in [0, {end}]'
      raise ValueError(f'input-pipeline state step={step!r}: expected {expected} (global batches consumed)')
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(f'input-pipeline state was saved with {key}={state.get(key)!r} but this pipeline has '
                         f'{key}={value!r}; the stream would differ, so it cannot resume')
    self._step = int(state['step'])
    self.close()   # restarted lazily from the new position


def make_train_iterator(data_cfg, *, global_batch_size: int, sharding, tokenizer, seed: int,
                        split: str = 'train', process_index: int | None = None,
                        process_count: int | None = None, num_epochs: int | None = None) -> TrainIterator:
  """Batches of the `ecdit.data.batch` contract: 'x0', 'text', 'text_mask' for the step, 'image' and
  'caption' for the host. A dataset with precomputed text states (ecdit.data.latents) needs no tokenizer
  (`tokenizer=None`).

  With a `jax.sharding.Sharding` the step arrays are global `jax.Array`s of batch size `global_batch_size`
  (the sharding must only split the leading, batch axis); with `sharding=None` they are this process's
  numpy rows. The host values are always this process's rows. `seed` (the experiment's top-level `seed`)
  decides the order and the caption dropout; `data.seed` only decides what a generated dataset holds. `process_index`/`process_count` default to JAX's; tests pass them to simulate several hosts.
  `num_epochs=None` repeats forever; otherwise the stream stops after that many epochs (whole batches only).
  The dataset must already be prepared (`ecdit.data.prepare.prepare`).
  """
  config_lib.validate_data_config(data_cfg)
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  if n < 1 or not 0 <= p < n:
    raise ValueError(f'process_index={p} / process_count={n}: need 0 <= process_index < process_count')
  if global_batch_size < 1 or global_batch_size % n:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of the process '
                     f'count {n}')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs={num_epochs}: expected None (repeat forever) or >= 1')
  if not isinstance(seed, int) or not 0 <= seed < 2**31:
    raise ValueError(f'seed={seed}: expected an integer in [0, 2**31)')
  local = global_batch_size // n

  path = prepare_lib.dataset_dir(data_cfg)
  source = reader.data_source(path, split, data_cfg.image_size)
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f'split {split!r} of {path} is empty')
  features = reader.open_builder(path).info.features
  null_text = None
  if 'text_states' in features.keys():
    null_text = latents.read_null_text(path)
    text_length = int(features['text_states'].shape[0])
  elif tokenizer is None:
    raise ValueError(f'the dataset at {path} has no precomputed text states: a tokenizer is needed')
  else:
    text_length = int(tokenizer.length)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map_with_index(_with_position)
  collate = _Collate(tokenizer, float(data_cfg.caption_dropout), seed + 1, null_text)
  ds = ds.batch(local, drop_remainder=True, batch_fn=collate)
  if num_epochs is not None:
    ds = ds[:(num_examples * num_epochs // global_batch_size) * n]   # whole global batches only
  ds = ds[p::n]
  identity = {'split': split, 'seed': seed, 'global_batch_size': global_batch_size,
              'num_examples': num_examples, 'caption_dropout': float(data_cfg.caption_dropout),
              'text_length': text_length}
  if len(ds):
    ds[0]   # one batch read and collated here, not first in a worker thread after the compile: fails early
  return TrainIterator(ds, sharding=sharding, global_batch_size=global_batch_size,
                       worker_count=data_cfg.worker_count, identity=identity,
                       num_batches=None if num_epochs is None else len(ds))
