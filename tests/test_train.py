"""Train state, step, optimizer schedules, checkpoints and the NaN policy on a tiny real EC-DiT."""
from __future__ import annotations

import asyncio
import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ecdit import outputs
from ecdit.data import pipeline
from ecdit.train import checkpoint as ckpt_lib
from ecdit.parallel import batch_sharding
from ecdit.train import loop, optim
from ecdit.train import skips
from ecdit.train import state as state_lib
from ecdit.train import update as update_lib

from _train_util import Batches, data_fn, tiny_config

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)


@pytest.fixture(scope='module')
def setup():
  cfg = tiny_config(learning_rate=3e-3)
  return loop.build(cfg)


def _batches(setup, nan_at=None):
  return Batches(setup.cfg, batch_sharding(setup.mesh), nan_at)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_loss_decreases_and_step_compiles_once(setup):
  state = setup.init_state()
  batches = _batches(setup)
  fixed = [next(batches) for _ in range(4)]  # a small fixed set, so progress is visible quickly
  losses = []
  for i in range(48):
    state, m = setup.train_step(state, fixed[i % 4])
    losses.append(float(m['loss']))
    assert set(m) >= {'loss', 'grad_norm', 'lr', 'flow_loss', 'aux_loss', 'skipped'}
  assert setup.train_step._cache_size() == 1, 'the train step recompiled'
  assert int(state.step) == 48 and int(state.skipped) == 0
  first, last = np.mean(losses[:8]), np.mean(losses[-8:])
  assert last < 0.8 * first, (first, last)
  assert any(k.startswith('moe/') for k in m), sorted(m)


def test_ema_update_is_exact():
  ema = {'w': jnp.array([1.0, 2.0, -4.0]), 'b': jnp.array(8.0)}
  p = {'w': jnp.array([3.0, 2.0, 0.0]), 'b': jnp.array(0.0)}
  out = state_lib.ema_update(ema, p, 0.75)
  np.testing.assert_array_equal(out['w'], [1.5, 2.0, -3.0])
  np.testing.assert_array_equal(out['b'], 6.0)


def test_step_ema_and_keys(setup):
  cfg = setup.cfg
  state = setup.init_state()
  p0 = _host(state.params)
  np.testing.assert_array_equal(jax.tree.leaves(_host(state.ema_params))[0], jax.tree.leaves(p0)[0])
  k0 = jax.random.key_data(state_lib.step_key(state))
  state, _ = setup.train_step(state, next(_batches(setup)))
  p1, e1 = _host(state.params), _host(state.ema_params)
  d = min(cfg.train.ema_decay, 1 / 10)  # the warm-up's decay for the first update
  assert float(state_lib.ema_decay_at(0, cfg.train.ema_decay)) == pytest.approx(0.1)
  assert float(state_lib.ema_decay_at(10_000, 0.995)) == pytest.approx(0.995)
  for a, b, e in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(e1)):
    np.testing.assert_allclose(e, d * a + (1 - d) * b, rtol=1e-6, atol=1e-7)
  k1 = jax.random.key_data(state_lib.step_key(state))
  assert not np.array_equal(k0, k1)
  expected = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  np.testing.assert_array_equal(k1, jax.random.key_data(expected))


def test_schedules():
  c = tiny_config(learning_rate=1.0, warmup_steps=10, num_steps=110, schedule='constant')
  lr = optim.schedule(c.train)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
  assert float(lr(100)) == pytest.approx(1.0)
  c.train.schedule, c.train.end_lr_factor = 'cosine', 0.1
  lr = optim.schedule(c.train)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)   # half-way down the cosine: (1 + 0.1) / 2
  assert float(lr(110)) == pytest.approx(0.1, abs=1e-6)
  c.train.warmup_steps = 0
  assert float(optim.schedule(c.train)(0)) == pytest.approx(1.0)


def test_rmsprop_with_momentum_and_clipping():
  c = tiny_config(optimizer='rmsprop', learning_rate=0.1, warmup_steps=0, grad_clip=1.0)
  tx = optim.make_optimizer(c.train)
  params = {'w': jnp.zeros(3)}
  opt = tx.init(params)
  g = {'w': jnp.array([30.0, 40.0, 0.0])}  # norm 50, clipped to 1
  u1, opt = tx.update(g, opt, params)
  u2, opt = tx.update(g, opt, params)
  assert np.all(np.abs(u2['w'][:2]) > np.abs(u1['w'][:2]))  # momentum accumulates
  assert u1['w'][2] == 0


def test_nan_batch_skips_update(setup):
  state = setup.init_state()
  p0 = _host(state.params)
  batch = next(_batches(setup, nan_at=1))
  state, m = setup.train_step(state, batch)
  assert not bool(m['finite']) and int(state.skipped) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(_host(state.params))):
    np.testing.assert_array_equal(a, b)
  assert bool(state_lib.all_finite((state.params, state.opt_state, state.ema_params)))


def test_overflowing_update_is_skipped(setup):
  # A crafted, finite state whose first Adam moment is near float32's max: the loss and gradients stay
  # finite, but m̂/(√v̂ + eps) overflows, so the step would write inf into the parameters.
  state = setup.init_state()
  adam = update_lib._find(state.opt_state, optax.ScaleByAdamState)
  mu = jax.tree.map(lambda m: jnp.full_like(m, 3e38), adam.mu)
  state = state.replace(opt_state=update_lib._replace(state.opt_state, optax.ScaleByAdamState, adam._replace(mu=mu)))
  before = _host(state)
  state, m = setup.train_step(state, next(_batches(setup)))
  assert np.isfinite(float(m['loss'])) and np.isfinite(float(m['grad_norm']))
  assert not bool(m['finite']) and int(state.skipped) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.ema_params)),
                  jax.tree.leaves(_host((state.params, state.opt_state, state.ema_params)))):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_and_corrupt_latest(setup, tmp_path, capsys):
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, use_async=True)
  state = setup.init_state()
  batches = _batches(setup)
  saved = {}
  for step in (1, 2):
    state, _ = setup.train_step(state, next(batches))
    saved[step] = _host(state)
    ck.save(step, state, batches.get_state(), {'note': 'test'})
  ck.wait()
  ck.close()
  # A save killed mid-write leaves an incomplete temporary directory: it is not a checkpoint.
  partial = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1700000000000000'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'manifest.ocdbt').write_bytes(b'half')
  ckpt_lib.Checkpointer(tmp_path, keep=5, use_async=False, read_only=True).close()
  assert partial.is_dir()   # a reader leaves it: the run may still be writing it
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, use_async=True)
  assert ck.steps() == [1, 2]
  restored, data_state, step = ck.restore_latest(setup.abstract_state)
  assert step == 2 and data_state == {'i': 2}
  for a, b in zip(jax.tree.leaves(saved[2]), jax.tree.leaves(_host(restored))):
    np.testing.assert_array_equal(a, b)
  assert all(l.sharding == s for l, s in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.state_shardings)))
  ck.close()

  # Corrupt step 2: truncate every file of its state item. The restore falls back to step 1, says so,
  # and keeps the unreadable files (moved aside).
  for f in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'')
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, use_async=True)
  # A reader (sample, eval, export: workdir.restore) falls back the same way but moves nothing.
  _, _, step = ck.restore_latest(setup.abstract_state, move_unreadable=False)
  assert step == 1 and ck.steps() == [1, 2] and not (tmp_path / 'checkpoints_unreadable').exists()
  out, err = capsys.readouterr()   # warnings go to stderr, one line naming the step used instead
  assert out == '' and err.startswith('warning: checkpoint step 2 in ') and err.endswith('; using step 1 instead\n')
  assert len(err.splitlines()) == 1 and 'pybind11' not in err
  restored, data_state, step = ck.restore_latest(setup.abstract_state)
  assert step == 1 and data_state == {'i': 1}
  assert 'checkpoint step 2' in capsys.readouterr().err
  assert ck.steps() == [1]
  assert list((tmp_path / 'checkpoints_unreadable').iterdir())
  for a, b in zip(jax.tree.leaves(saved[1]), jax.tree.leaves(_host(restored))):
    np.testing.assert_array_equal(a, b)

  bad = restored.replace(params=jax.tree.map(lambda x: x * jnp.nan, restored.params))
  with pytest.raises(ckpt_lib.NonFiniteStateError, match='step 3'):
    ck.save(3, bad, {'i': 3}, {})
  ck.close()
  assert ck.steps() == [1]


def _np_fingerprint(x):
  """The checksum of ecdit.train.checkpoint written again in numpy, whole array at once (the reference)."""
  x = np.asarray(x)
  w = x.astype(np.uint32) if x.dtype == bool else x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.itemsize])
  w = w.astype(np.uint32).reshape(-1)
  i = np.arange(w.size, dtype=np.uint32)

  def fmix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))
  a = fmix(w ^ fmix(i ^ np.uint32(0x9E3779B9)))
  b = fmix((w + fmix(i ^ np.uint32(0x7F4A7C15))) * np.uint32(0x27D4EB2F))
  return [int(a.sum(dtype=np.uint32)), int(b.sum(dtype=np.uint32))]


def test_fingerprint_is_exact_whatever_the_sharding():
  # The same value from the reference (numpy, whole array), the device path (jitted, as on accelerators: XLA
  # combines partial sums) and the host path (numpy per shard, as on CPU), on one device and on 8 in two
  # layouts (one replicated over 'a'): integer sums mod 2**32 do not depend on the order or the blocks.
  # One ulp anywhere changes both lanes; so does moving values.
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  r = np.random.RandomState(0)
  x = r.randn(16, 12).astype(np.float32)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('a', 'b'))
  fp = jax.jit(ckpt_lib.fingerprint)
  want = _np_fingerprint(x)
  for sh in (None, NamedSharding(mesh, P('a', 'b')), NamedSharding(mesh, P('b', None))):
    arr = jnp.asarray(x) if sh is None else jax.device_put(x, sh)
    assert [int(v) for v in fp(arr)] == want
    assert ckpt_lib._host_fingerprints([arr]).tolist() == [want]
  for y in (x.astype(jnp.bfloat16), r.randint(-9, 9, (5, 3)).astype(np.int32), np.array(7, np.int32),
            np.array([1, 2], np.uint32), r.rand(4) > 0.5):
    assert [int(v) for v in fp(jnp.asarray(y))] == _np_fingerprint(y)
    assert ckpt_lib._host_fingerprints([jnp.asarray(y)]).tolist() == [_np_fingerprint(y)]
  y = jax.device_put(x.astype(jnp.bfloat16), NamedSharding(mesh, P(None, 'b')))
  assert ckpt_lib._host_fingerprints([y]).tolist() == [[int(v) for v in fp(y)]]
  bumped = x.copy()
  bumped[9, 4] = np.nextafter(bumped[9, 4], np.float32(np.inf))
  a, b = want, [int(v) for v in fp(jnp.asarray(bumped))]
  assert a[0] != b[0] and a[1] != b[1]
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]   # the same values elsewhere: positions count
  assert [int(v) for v in fp(jnp.asarray(swapped))] != want


def test_checksum_mismatch_and_bad_data_state_fall_back(setup, tmp_path, capsys):
  # Steps 1-3 of a tiny state. Step 3's state item is replaced by one whose ema kernel differs by one ulp in
  # one element (written by Orbax, so it reads back without error; step 3 keeps its own meta item); step 2's
  # data-iterator state is valid JSON with a negative position. Both are caught, one line each, and the
  # restore lands on step 1 with its loop counters.
  it = pipeline.TrainIterator(grain.MapDataset.range(4), sharding=None, global_batch_size=8, worker_count=0,
                              identity={'seed': 0}, num_batches=4)
  base = setup.init_state()
  states = {k: base.replace(step=jax.device_put(np.int32(k), setup.state_shardings.step)) for k in (1, 2, 3)}
  run = tmp_path / 'run'
  ck = ckpt_lib.Checkpointer(run, keep=5, use_async=False)
  for k, state in states.items():
    ck.save(k, state, {'version': 1, 'step': k, 'seed': 0}, {}, loop={'consecutive_skips': k})
  ck.close()

  paths = jax.tree_util.tree_leaves_with_path(states[3])
  pick = next(i for i, (p, l) in enumerate(paths) if jax.tree_util.keystr(p).startswith('.ema_params')
              and l.ndim == 2 and np.abs(np.asarray(l)).max() > 0)
  name, leaf = jax.tree_util.keystr(paths[pick][0]), paths[pick][1]
  host = np.array(leaf)
  k = np.unravel_index(np.argmax(np.abs(host)), host.shape)
  host[k] = np.nextafter(host[k], np.float32(np.inf))
  leaves = [l for _, l in paths]
  leaves[pick] = jax.device_put(host, leaf.sharding)
  damaged = jax.tree.unflatten(jax.tree.structure(states[3]), leaves)
  scratch = ckpt_lib.Checkpointer(tmp_path / 'scratch', use_async=False)
  scratch.save(3, damaged, {'version': 1, 'step': 3, 'seed': 0}, {})
  scratch.close()
  shutil.rmtree(run / 'checkpoints' / '3' / 'state')
  shutil.copytree(tmp_path / 'scratch' / 'checkpoints' / '3' / 'state', run / 'checkpoints' / '3' / 'state')
  (run / 'checkpoints' / '2' / 'data' / 'metadata').write_text(json.dumps({'version': 1, 'step': -3, 'seed': 0}))

  ck = ckpt_lib.Checkpointer(run, keep=5, use_async=False)
  restored, data_state, step = ck.restore_latest(setup.abstract_state, check_data=lambda d, s: it.set_state(d))
  ck.close()
  assert step == 1 and data_state['step'] == 1 and ck.loop_state == {'consecutive_skips': 1}
  out, err = capsys.readouterr()
  lines = err.splitlines()
  assert out == '' and len(lines) == 4 and all(l.startswith('moved unreadable checkpoint') for l in lines[2:])
  assert lines[0].startswith(f'warning: checkpoint step 3 in {run.absolute()}/checkpoints is unreadable '
                             f'(checksum mismatch in {name} (saved ')
  assert lines[0].endswith('); using step 1 instead')
  assert 'step 2' in lines[1] and 'step=-3: expected an integer in [0, 4]' in lines[1]
  assert sorted(p.name.split('-')[0] for p in (run / 'checkpoints_unreadable').iterdir()) == ['2', '3']
  for a, b in zip(jax.tree.leaves(states[1]), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A checkpoint from before the meta item (none written) restores unchecked, silently, without counters.
  shutil.rmtree(run / 'checkpoints' / '1' / 'meta')
  ck = ckpt_lib.Checkpointer(run, keep=5, use_async=False)
  restored, _, step = ck.restore_latest(setup.abstract_state)
  assert step == 1 and ck.loop_state == {} and capsys.readouterr() == ('', '')
  # A data state no checkpoint can satisfy (another stream): one CheckpointError line, nothing moved.
  other = pipeline.TrainIterator(grain.MapDataset.range(4), sharding=None, global_batch_size=8, worker_count=0,
                                 identity={'seed': 5})
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r'^no checkpoint in .* fits the config \(latest step 1: '
                     r'data-iterator state: .*seed=0 but this pipeline has seed=5.*; does the config match'):
    ck.restore_latest(setup.abstract_state, check_data=lambda d, s: other.set_state(d))
  assert ck.steps() == [1]
  ck.close()


def test_a_checkpoint_that_lost_its_meta_item_is_damage(setup, tmp_path, capsys):
  """Among checkpoints that carry checksums, one without them lost its meta item (damage or a partial copy): it
  is skipped like any other damage, not trusted as a checkpoint from before checksums."""
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, use_async=False)
  state = setup.init_state()
  for step in (1, 2):
    ck.save(step, state.replace(step=jnp.asarray(step, state.step.dtype)), {'i': step}, {})
  ck.close()
  shutil.rmtree(tmp_path / 'checkpoints' / '2' / 'meta')
  ck = ckpt_lib.Checkpointer(tmp_path, keep=5, use_async=False, read_only=True)
  _, _, step = ck.restore_latest(setup.abstract_state)
  ck.close()
  err = capsys.readouterr().err
  assert step == 1 and err.startswith('warning: checkpoint step 2 in ') and \
      'is unreadable (its meta item (checksums) is missing while other checkpoints' in err
  assert (tmp_path / 'checkpoints' / '2').is_dir()   # read-only: skipped, not moved


def test_loop_resumes_and_nan_stop(tmp_path):
  cfg = tiny_config(num_steps=6, checkpoint_every=3)
  s = loop.train(cfg, tmp_path / 'a', progress=False, data_fn=data_fn(), devices=jax.devices()[:1])
  assert s['last_checkpoint'] == 6 and s['skipped'] == 0
  full = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in full] == list(range(1, 7))
  assert json.loads((tmp_path / 'a' / 'config.json').read_text())['train']['num_steps'] == 6
  # A run from before the marker (config.json + checkpoints only) is still recognised and resumes below.
  (tmp_path / 'a' / outputs.RUN_MARKER).unlink()

  # nan_policy=stop: stops at the bad step with its number, nothing non-finite is saved.
  cfg.train.nan_policy = 'stop'
  cfg.train.num_steps = 9
  with pytest.raises(loop.NonFiniteLossError, match='step 8'):
    loop.train(cfg, tmp_path / 'a', progress=False, data_fn=data_fn(nan_at=8), devices=jax.devices()[:1])
  ck = ckpt_lib.Checkpointer(tmp_path / 'a')
  assert ck.steps()[-1] == 6
  ck.close()
  log = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in log] == list(range(1, 8))   # resumed at 6; step 7 logged; 8 stopped the run
  assert [r['loss'] for r in log[:6]] == [r['loss'] for r in full]
  assert outputs.is_run(tmp_path / 'a') and (tmp_path / 'a' / outputs.RUN_MARKER).is_file()


def test_failed_async_save_stops_the_run_in_one_line(tmp_path, monkeypatch, caplog, capfd):
  # A full disk while the step-8 checkpoint is written in the background, found a second later: the run stops
  # at step 9, before it is logged (not at a later step, nor at the next save, step 12), with one line naming
  # the step, the reason and the last good checkpoint, which still restores.
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  write = json_handler.JsonCheckpointHandler._save_fn

  async def disk_full_at_8(self, x, directory):
    if isinstance(x, dict) and x.get('i') == 8:   # the data-iterator state of step 8, on a slow disk
      await asyncio.sleep(1.0)
      raise OSError(28, 'No space left on device')
    return await write(self, x, directory)
  monkeypatch.setattr(json_handler.JsonCheckpointHandler, '_save_fn', disk_full_at_8)
  cfg = tiny_config(num_steps=16, checkpoint_every=4)
  cfg.train.async_checkpoints = True   # as `ecdit train` saves (the tiny config saves synchronously)
  workdir = tmp_path / 'a'
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    loop.train(cfg, workdir, progress=False, data_fn=data_fn(), devices=jax.devices()[:1])
  assert str(e.value) == (f'checkpoint of step 8 in {workdir.absolute()}/checkpoints failed: No space left '
                          'on device; the last good checkpoint is step 4')
  logged = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert logged[-1] == 8, logged   # the step after a save waits for it: step 9 is neither logged nor saved
  # Orbax logged the failure from its threads and at the wait; ecdit's line says it, so none of that is shown.
  orbax = [r.getMessage() for r in caplog.records if '/orbax/' in r.pathname and r.levelname == 'ERROR']
  assert not orbax, orbax
  assert 'ERROR' not in capfd.readouterr().err
  monkeypatch.undo()
  ck = ckpt_lib.Checkpointer(workdir)
  assert ck.steps() == [4]
  _, data_state, step = ck.restore_latest(loop.build(cfg).abstract_state)
  assert (step, data_state) == (4, {'i': 4})
  ck.close()


def test_check_never_blocks_a_running_save_and_reports_a_finished_failed_one(tmp_path):
  """check() runs every step: while Orbax is still writing it only reads the flag (no wait); once the save has
  ended, a failure is one CheckpointError line, raised once. On a stand-in manager, so the timing is fixed."""
  class Manager:
    in_progress, waits = True, 0

    def is_saving_in_progress(self):
      return self.in_progress

    def wait_until_finished(self):
      self.waits += 1
      raise OSError(28, 'No space left on device')

    def reload(self):
      pass

    def all_steps(self):
      return [4]
  ck = ckpt_lib.Checkpointer(tmp_path)
  real, fake = ck.manager, Manager()
  ck.manager, ck._saving = fake, 8   # pylint: disable=protected-access  (the step-8 save is in flight)
  try:
    ck.check()
    assert fake.waits == 0
    fake.in_progress = False
    with pytest.raises(ckpt_lib.CheckpointError, match=r'^checkpoint of step 8 in .*checkpoints failed: No space '
                       r'left on device; the last good checkpoint is step 4$'):
      ck.check()
    ck.check()   # reported once, not at every later check
    assert fake.waits == 1
  finally:
    ck.manager = real
    ck.close()


def _strict_json(text):
  def refuse(name):
    raise ValueError(f'not JSON: {name}')
  return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_consecutive_skips_stop_the_run(tmp_path):
  # Steps 3 and 4 get NaN batches; with max_skipped_steps=2 the second skip stops the run, and step 4 (a
  # checkpoint step) is counted before it is saved. The skipped step is logged as strict JSON, loss null.
  cfg = tiny_config(num_steps=6, checkpoint_every=4, max_skipped_steps=2)
  with pytest.raises(loop.NonFiniteLossError, match=r'^2 consecutive steps skipped .*steps 3-4; '
                     r'train.max_skipped_steps=2.*Last checkpoint: none$'):
    loop.train(cfg, tmp_path / 'a', progress=False, data_fn=data_fn(nan_at=range(3, 7)),
               devices=jax.devices()[:1])
  log = _strict_json((tmp_path / 'a' / 'metrics.jsonl').read_text())
  assert [r['step'] for r in log] == [1, 2, 3]   # step 4 stopped the run before it was logged or saved
  assert [r['loss'] is None for r in log] == [False, False, True]
  assert [r['skipped'] for r in log] == [0, 0, 1]
  assert log[0]['steps_per_sec'] is None   # no rate before the second step: null, not NaN
  ck = ckpt_lib.Checkpointer(tmp_path / 'a')
  assert ck.steps() == []
  ck.close()


def test_consecutive_skips_survive_a_resume(tmp_path, capsys):
  # Batches 4 on are NaN; max_skipped_steps=3, a checkpoint every step. The first run saves step 4 with one
  # skip counted and step 5 with two, and stops at step 6 (steps 4-6), its last, before saving it. Step 5's
  # data-iterator state is then damaged (valid JSON, a position that is not step 5's): the restore, which
  # validates it, skips step 5 with one line and resumes from step 4, where the count goes on from one and
  # stops the run at step 6 again. Had it restarted at 0, the run would have saved steps 5 and 6 and ended
  # well: a job requeued after every stop would creep on from checkpoint to checkpoint, skipping every step.
  # (num_steps as in the tests above: the step, and its learning-rate schedule, compile once.)
  cfg = tiny_config(num_steps=6, checkpoint_every=1, max_skipped_steps=3)
  nan = data_fn(nan_at=range(4, 20))
  stop = r'^3 consecutive steps skipped .*steps 4-6;.*Last checkpoint: 5$'
  with pytest.raises(loop.NonFiniteLossError, match=stop):
    loop.train(cfg, tmp_path / 'a', progress=False, data_fn=nan, devices=jax.devices()[:1])
  (tmp_path / 'a' / 'checkpoints' / '5' / 'data' / 'metadata').write_text('{"i": 3}')
  capsys.readouterr()
  with pytest.raises(loop.NonFiniteLossError, match=stop):
    loop.train(cfg, tmp_path / 'a', progress=False, data_fn=nan, devices=jax.devices()[:1])
  out, err = capsys.readouterr()
  assert 'checkpoint step 5 in' in err and ('is unreadable (the data-iterator state is at batch 3, '
                                            'the checkpoint at step 5); using step 4 instead') in err
  assert 'from checkpoint step 4 in' in out


def test_skip_guard_counts_consecutive_skips():
  guard = skips.SkipGuard('skip', 2, lambda: 6)
  for step, finite in [(1, False), (2, True), (3, False)]:   # 1 and 3 are not consecutive
    guard(step, finite)
  with pytest.raises(skips.NonFiniteLossError, match='^2 consecutive steps skipped .*steps 3-4;.*checkpoint: 6$'):
    guard(4, False)
  resumed = skips.SkipGuard('skip', 3, lambda: 2, run=2)   # two skipped steps before the checkpoint
  with pytest.raises(skips.NonFiniteLossError, match=r'^3 consecutive steps skipped .*steps 3-5;'):
    resumed(5, False)
  never = skips.SkipGuard('skip', 0, lambda: None)
  for step in range(1, 100):
    never(step, False)
  with pytest.raises(skips.NonFiniteLossError, match='at step 5 .*nan_policy=stop.*checkpoint: none$'):
    skips.SkipGuard('stop', 0, lambda: None)(5, False)
