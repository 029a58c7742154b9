"""Grain input pipeline: determinism, exact resumption, per-process shards, global arrays, caption dropout."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ecdit.config import data as config_lib
from ecdit.data import pipeline
from ecdit.data import prepare as prepare_lib
from ecdit.data import reader
from ecdit.data import tokenizer as tokenizer_lib

N_TRAIN = 200
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg = config_lib.default_data_config()
  cfg.dir = str(tmp_path_factory.mktemp('data'))
  cfg.num_train_examples, cfg.num_validation_examples, cfg.num_eval_prompts = N_TRAIN, 40, 0
  cfg.text_length = 12
  prepare_lib.prepare(cfg, verbose=False)
  return cfg, prepare_lib.load_or_train_tokenizer(cfg)


def make(setup, gbs=32, sharding=None, seed=0, **kwargs):
  cfg, tok = setup
  return pipeline.make_train_iterator(cfg, global_batch_size=gbs, sharding=sharding, tokenizer=tok, seed=seed,
                                      **kwargs)


def take(it, n):
  return [next(it) for _ in range(n)]


def row_keys(batch):
  """One hashable key per example row: its pixels (captions may be dropped, differently per epoch)."""
  return [np.asarray(img).tobytes() for img in batch['image']]


def assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if key == 'caption':
      assert a[key] == b[key]
    else:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_batches_have_the_contract_shapes(setup):
  batch = next(make(setup))
  assert batch['image'].shape == (32, 32, 32, 3) and batch['image'].dtype == np.float32
  assert -1.0 <= batch['image'].min() < 0.0 < batch['image'].max() <= 1.0
  assert batch['text'].shape == (32, 12) and batch['text'].dtype == np.int32
  assert batch['text_mask'].shape == (32, 12) and batch['text_mask'].dtype == bool
  assert len(batch['caption']) == 32
  assert set(batch) == {'x0', 'text', 'text_mask', 'image', 'caption'}
  assert batch['x0'] is batch['image']   # pixel space: the flow diffuses the pixels


def test_deterministic_and_seeded(setup):
  a, b = take(make(setup), 3), take(make(setup), 3)
  for x, y in zip(a, b):
    assert_same(x, y)
  other = next(make(setup, seed=5))
  assert row_keys(other) != row_keys(a[0])


def test_epochs_cover_the_data_and_reshuffle(setup):
  it = make(setup, gbs=40)   # N_TRAIN = 5 batches of 40 per epoch
  epoch1 = [k for b in take(it, 5) for k in row_keys(b)]
  epoch2 = [k for b in take(it, 5) for k in row_keys(b)]
  assert len(set(epoch1)) == N_TRAIN
  assert set(epoch2) == set(epoch1) and epoch2 != epoch1


def test_resume_from_saved_state_gives_identical_batches(setup):
  it = make(setup)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))   # what a checkpoint stores
  assert state['step'] == 4
  expected = take(it, 5)                            # crosses the epoch boundary (200 / 32)
  resumed = make(setup)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 5)):
    assert_same(x, y)
  assert resumed.get_state() == it.get_state()


def test_set_state_on_a_running_iterator_jumps_to_the_saved_position(setup):
  it = make(setup)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  running = make(setup)
  take(running, 6)              # already streaming (and prefetching) past the saved position
  running.set_state(state)
  for x, y in zip(expected, take(running, 4)):
    assert_same(x, y)


def test_worker_processes_give_the_same_stream_and_resume(setup):
  """data.worker_count > 0 (8 in the paper and latent configs): grain's worker processes make the batches."""
  cfg, tok = setup
  with_workers = cfg.copy_and_resolve_references()
  with_workers.worker_count = 2
  it = make((with_workers, tok))
  first = take(it, 3)
  state = it.get_state()
  for x, y in zip(first + take(it, 2), take(make(setup), 5)):
    assert_same(x, y)
  resumed = make((with_workers, tok))
  resumed.set_state(state)
  assert_same(next(resumed), take(make(setup), 4)[3])


def test_state_from_another_stream_is_refused(setup):
  state = make(setup).get_state()
  with pytest.raises(ValueError, match='seed=0 .* seed=3'):
    make(setup, seed=3).set_state(state)
  with pytest.raises(ValueError, match='global_batch_size'):
    make(setup, gbs=16).set_state(state)


def test_malformed_states_are_refused_in_one_line(setup):
  # Valid JSON with a wrong value (what a damaged checkpoint's data item may hold): each refused by name,
  # before anything moves; the good state still resumes afterwards.
  it = make(setup, num_epochs=1)   # 200 // 32 = 6 batches
  good = it.get_state()
  cases = [({'step': -1}, 'step=-1: expected an integer in \\[0, 6\\]'), ({'step': 7}, 'step=7'),
           ({'step': 2.5}, 'step=2.5'), ({'step': True}, 'step=True'), ({'step': '3'}, "step='3'"),
           ({'version': True}, 'version 1'), ({'version': 2}, 'version 1'),
           ({'extra': 1}, "keys .*'extra'"), ({'seed': 4}, 'seed=4 but this pipeline has seed=0')]
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      it.set_state({**good, **change})
  gone = {k: v for k, v in good.items() if k != 'text_length'}
  with pytest.raises(ValueError, match='keys'):
    it.set_state(gone)
  with pytest.raises(ValueError, match='version 1'):
    it.set_state([1, 2])
  with pytest.raises(ValueError, match='step=-2: expected a non-negative integer'):
    make(setup).set_state({**good, 'step': -2})   # endless stream: no upper bound
  it.set_state({**good, 'step': 6})
  assert it.step == 6


def test_two_processes_get_disjoint_halves_of_each_global_batch(setup):
  whole = take(make(setup, gbs=32, process_index=0, process_count=1), 4)
  p0 = take(make(setup, gbs=32, process_index=0, process_count=2), 4)
  p1 = take(make(setup, gbs=32, process_index=1, process_count=2), 4)
  for w, a, b in zip(whole, p0, p1):
    ka, kb = row_keys(a), row_keys(b)
    assert len(ka) == len(kb) == 16
    assert not set(ka) & set(kb)
    assert ka + kb == row_keys(w)   # together: exactly the single-process global batch
  # So a run may resume on another process count: state carries no process layout.
  state = make(setup, process_index=1, process_count=2).get_state()
  make(setup, process_index=0, process_count=4).set_state(state)


def test_global_arrays_with_sharding(setup):
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  batch = next(make(setup, sharding=sharding))
  host = next(make(setup))
  for key in ('x0', 'text', 'text_mask'):
    assert isinstance(batch[key], jax.Array)
    assert batch[key].sharding == sharding and batch[key].shape == host[key].shape
    np.testing.assert_array_equal(np.asarray(batch[key]), host[key])
  assert batch['caption'] == host['caption']


def test_caption_dropout_is_seeded_and_gives_the_empty_caption(setup):
  cfg, tok = setup
  drop = cfg.copy_and_resolve_references()
  drop.caption_dropout = 0.5
  batches = take(pipeline.make_train_iterator(drop, global_batch_size=50, sharding=None, tokenizer=tok, seed=0), 4)
  again = take(pipeline.make_train_iterator(drop, global_batch_size=50, sharding=None, tokenizer=tok, seed=0), 4)
  captions = [c for b in batches for c in b['caption']]
  assert [c for b in again for c in b['caption']] == captions
  dropped = sum(c == '' for c in captions)
  assert 60 <= dropped <= 140   # 200 draws at p = 0.5
  for b in batches:
    empty = np.array([c == '' for c in b['caption']])
    assert (b['text_mask'][empty].sum(1) == 1).all() and (b['text'][empty, 0] == tok.eos_id).all()
    assert (b['text_mask'][~empty].sum(1) > 1).all()
  none = cfg.copy_and_resolve_references()
  none.caption_dropout = 0.0
  b = next(pipeline.make_train_iterator(none, global_batch_size=50, sharding=None, tokenizer=tok, seed=0))
  assert '' not in b['caption']


def test_finite_epochs_and_validation_split(setup):
  it = make(setup, gbs=16, split='validation', num_epochs=2)
  assert len(list(it)) == 40 * 2 // 16


def test_bad_arguments(setup, tmp_path):
  cfg, tok = setup
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    make(setup, gbs=32, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='process_index=2'):
    make(setup, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="no split 'eval_prompts'"):
    make(setup, split='eval_prompts')
  missing = cfg.copy_and_resolve_references()
  missing.dir = str(tmp_path / 'nowhere')
  with pytest.raises(reader.DataError, match=r'no prepared dataset at .*nowhere.*ecdit prepare'):
    pipeline.make_train_iterator(missing, global_batch_size=8, sharding=None, tokenizer=tok, seed=0)


WORKER_ERROR_SCRIPT = '''
import json
import sys
import ml_collections
from ecdit.data import pipeline, reader, tokenizer

if __name__ == '__main__':
  cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
  it = pipeline.make_train_iterator(cfg, global_batch_size=32, sharding=None, seed=0,
                                    tokenizer=tokenizer.Tokenizer(sys.argv[2], cfg.text_length))
  try:
    for _ in range(20):
      next(it)   # nothing of a batch kept: what still holds one after the error is the pipeline's
  except reader.DataError as e:
    print('DataError:', str(e).split(': ')[1])
'''


def _damage_one_record(dataset: Path) -> None:
  """Overwrites 64 bytes inside one record of the train split's file, where `Source.check` (a record of every
  shard, and the last) does not look: the damage shows only when a worker reads that record."""
  path = next(dataset.glob('*-train.array_record-*'))
  data = path.read_bytes()
  for at in range(2000, len(data) // 2, 1500):
    path.write_bytes(data[:at] + b'\xff' * 64 + data[at + 64:])
    reader._CHECKED.clear()   # pylint: disable=protected-access
    try:
      source = reader.data_source(dataset, 'train')
    except reader.DataError:
      continue
    try:
      for i in range(len(source)):
        source[i]
    except reader.DataError:
      return
  raise AssertionError(f'no place in {path} whose damage only a record read finds')


def test_a_data_error_in_a_worker_frees_the_workers_shared_memory(setup, tmp_path):
  """data.worker_count > 0: the batches grain's worker processes hand over live in shared memory. A damaged
  record read in a worker is one DataError in the main process, and the workers and every batch's shared
  memory are gone before exit: no resource_tracker warning about leaked shared_memory objects."""
  cfg, tok = setup
  cfg = cfg.copy_and_resolve_references()
  src = prepare_lib.dataset_dir(cfg)
  shutil.copytree(cfg.dir, tmp_path / 'data')
  cfg.dir, cfg.worker_count = str(tmp_path / 'data'), 2
  damaged = prepare_lib.dataset_dir(cfg)
  assert damaged != src and damaged.is_dir()
  _damage_one_record(damaged)
  (tmp_path / 'script.py').write_text(WORKER_ERROR_SCRIPT)
  proc = subprocess.run([sys.executable, str(tmp_path / 'script.py'), cfg.to_json(), str(tok.model_path)],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == 'DataError: the prepared dataset is damaged\n', proc.stdout + proc.stderr[-3000:]
  assert 'leaked' not in proc.stderr and 'resource_tracker' not in proc.stderr, proc.stderr[-3000:]
