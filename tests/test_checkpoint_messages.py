"""What a damaged, mismatched or failed checkpoint says (ecdit/train/checkpoint.py): one short line on stderr,
no asyncio noise, the reason kept. On a tiny hand-made train state: nothing here builds or compiles a model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ecdit.train import checkpoint as ckpt_lib
from ecdit.train import state as state_lib

REPO = Path(__file__).resolve().parents[1]

# Eight 64x64 leaves per tree: each is a data file entry of its own, read concurrently at restore.
TINY = '''
import jax, jax.numpy as jnp, numpy as np
from ecdit.train import state as state_lib

def tiny_state(step, width=64):
  r = np.random.RandomState(0)
  params = {f'w{i}': jnp.asarray(r.randn(width, 64).astype(np.float32)) for i in range(8)}
  return state_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state={'mu': params},
                              ema_params=params, rng=jnp.zeros(2, jnp.uint32), skipped=jnp.asarray(0, jnp.int32))

def abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
'''
exec(TINY)   # tiny_state, abstract: the same in this process and in the subprocess below


def _save(workdir: Path, steps, width=64) -> None:
  ck = ckpt_lib.Checkpointer(workdir, keep=5, use_async=False)
  try:
    for step in steps:
      ck.save(step, tiny_state(step, width), {'step': step}, {'note': 'test'})
  finally:
    ck.close()


def _truncate_data(workdir: Path, step: int) -> None:
  """Truncates every array data file of a step's state item (OCDBT keeps the arrays in `d/` files)."""
  for p in (workdir / 'checkpoints' / str(step) / 'state').rglob('*'):
    if p.is_file() and p.parent.name == 'd':
      with open(p, 'r+b') as f:
        f.truncate(p.stat().st_size // 3)


def test_damaged_latest_step_is_one_line_without_asyncio_noise(tmp_path):
  """The restore runs in a fresh process, as `ecdit export` / `sample` would. Orbax reads the arrays
  concurrently and closed its event loop at the first failure, with the other reads still running: they then
  ended onto the closed loop (hundreds of 'Event loop is closed' tracebacks from TensorStore's threads, 'Exception
  ignored' at collection). Whether reads are still in flight then depends on the machine's load, so here every
  read but the first starts a little later (staggered), as on a busy machine: the first fails while the others
  are pending."""
  _save(tmp_path, (1, 2))
  _truncate_data(tmp_path, 2)
  script = TINY + textwrap.dedent(f'''
      import asyncio
      from orbax.checkpoint._src.serialization import serialization
      from ecdit.train import checkpoint as ckpt_lib
      read, started = serialization._read_shard, []

      async def staggered_read(*args, **kwargs):
        started.append(None)
        await asyncio.sleep(0.02 * (len(started) - 1))
        return await read(*args, **kwargs)
      serialization._read_shard = staggered_read
      ck = ckpt_lib.Checkpointer({str(tmp_path)!r}, use_async=False, read_only=True)
      try:
        _, _, step = ck.restore_latest(abstract(tiny_state(0)))
      finally:
        ck.close()
      print('restored', step)
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ['restored 1']   # the warning is not on stdout
  lines = proc.stderr.splitlines()
  assert 'Event loop is closed' not in proc.stderr and 'Traceback' not in proc.stderr
  assert 'Exception ignored' not in proc.stderr and 'destroyed' not in proc.stderr and 'pybind11' not in proc.stderr
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f'warning: checkpoint step 2 in {tmp_path}/checkpoints is unreadable (')
  assert lines[0].endswith('); using step 1 instead') and len(lines[0]) < 400
  leaf = lines[0].split(' is unreadable (')[1].split(':')[0]   # the array Orbax failed on, by name
  assert leaf in ckpt_lib._shapes(tiny_state(0)), lines[0]
  assert (tmp_path / 'checkpoints' / '2').is_dir()   # a reader moves nothing


def test_all_steps_damaged_names_the_steps_tried_not_the_config(tmp_path, capsys):
  _save(tmp_path, (1, 2))
  for step in (1, 2):
    _truncate_data(tmp_path, step)
  ck = ckpt_lib.Checkpointer(tmp_path, use_async=False, read_only=True)
  try:
    with pytest.raises(ckpt_lib.CheckpointError) as e:
      ck.restore_latest(abstract(tiny_state(0)))
  finally:
    ck.close()
  assert not isinstance(e.value, ckpt_lib.CheckpointMismatchError)
  message = str(e.value)
  assert message.startswith(f'the checkpoints in {tmp_path}/checkpoints are unreadable (tried steps 2, 1; step 2: ')
  assert message.endswith('); the last good checkpoint is none')
  assert 'does the config match' not in message and '\n' not in message and 'TensorStore' not in message
  assert capsys.readouterr().out == ''


def test_checkpoints_of_another_width_name_the_first_leaf_and_both_shapes(tmp_path, capsys):
  # Checked from the state item's metadata, before an array is read: one line, and the config hint.
  _save(tmp_path, (1, 2), width=32)
  ck = ckpt_lib.Checkpointer(tmp_path, use_async=False, read_only=True)
  try:
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
      ck.restore_latest(abstract(tiny_state(0, width=64)))
  finally:
    ck.close()
  assert str(e.value) == (f'no checkpoint in {tmp_path}/checkpoints fits the config (latest step 2: params.w0 has '
                          'shape (32, 64) in the checkpoint, (64, 64) in the config); does the config match the '
                          'run that wrote them?')
  assert (e.value.step, e.value.reason) == (2, 'params.w0 has shape (32, 64) in the checkpoint, (64, 64) in the config')
  assert capsys.readouterr() == ('', '')   # no per-step warnings when none fits


def test_workdir_restore_says_the_checkpoint_does_not_match_config_json(tmp_path):
  """`ecdit sample` / `export` on a run whose config.json was edited to another width: one WorkdirError line
  naming the first parameter and both shapes (the checkpoint here holds zeros of the run's real shapes)."""
  from _train_util import tiny_config
  from ecdit import outputs
  from ecdit.config import experiment as config_lib
  from ecdit.train import loop, workdir as workdir_lib
  cfg = tiny_config()
  mcfg = config_lib.validate(cfg)
  resolved = loop.resolved_config(cfg, mcfg)
  run = tmp_path / 'run'
  loop.write_run_config(run, resolved)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), loop.build(cfg, mcfg).abstract_state)
  ck = ckpt_lib.Checkpointer(run, use_async=False)
  ck.save(3, zeros.replace(step=jnp.asarray(3, jnp.int32)), {'step': 3}, resolved)
  ck.close()
  edited = json.loads((run / 'config.json').read_text())
  edited['model']['width'] = edited['resolved_model']['width'] = 2 * mcfg.width
  (run / 'config.json').write_text(json.dumps(edited))
  with pytest.raises(outputs.WorkdirError) as e:
    workdir_lib.restore(run)
  match = re.fullmatch(rf'--workdir={run}: the checkpoints in {run}/checkpoints do not match the run\'s config.json '
                       r'\(latest step 3: params\.[\w.]+ has shape \((\d+),\) in the checkpoint, \((\d+),\) in the '
                       r'config\); was config.json edited after training\?', str(e.value))
  assert match and 2 * int(match.group(1)) == int(match.group(2)), str(e.value)   # a bias of the edited width


def test_failure_reasons_keep_the_os_error_and_drop_orbax_wrappers():
  # TensorStore's disk-full status, as Orbax re-raised it from a save: the OS words, not the 300-char head.
  written = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.nu.t_embed.fc2.kernel/0.0" in OCDBT '
                       'database at local file "/r/checkpoints/8.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/'
                       'ocdbt.process_0/": Failed writing: "/r/checkpoints/8.orbax-checkpoint-tmp/state.orbax-'
                       'checkpoint-tmp/ocdbt.process_0/d/2c53e1df2f449e7d9b0ca002c4a985e7": Failed to write 52322 '
                       "bytes to file 4: No space left on device [os_error_code='28']")
  assert ckpt_lib._reason(written, with_leaf=False) == 'No space left on device'   # as a failed save says it
  assert ckpt_lib._reason(written) == 'opt_state.1.0.nu.t_embed.fc2.kernel: No space left on device'
  try:
    try:
      raise OSError(28, 'No space left on device')
    except OSError as e:
      raise RuntimeError('Save Finalize thread (save_finalize) failed.') from e
  except RuntimeError as e:
    assert ckpt_lib._reason(e) == 'No space left on device'   # found down the chain
  # A read: Orbax's wrapper (index, the store's pybind11 spec) over TensorStore's error with the array's key.
  read = ValueError('OUT_OF_RANGE: Error reading "params.block_0.attn.query.kernel/0.0" in OCDBT database at local '
                    'file "/r/checkpoints/6/state/": Requested byte range [75971, 79782) is not valid for value of '
                    'size 1000 [tensorstore_spec=\'{"context":{"cache_pool":{}}}\']')
  wrapper = Exception('Encountered error while reading array index: (slice(0, 32, 1),). See full TensorStore '
                      'details: <bound method pybind11_detail_function_record_v1_system.spec of TensorStore({\n'
                      "  'base': {\n")
  wrapper.__cause__ = read
  assert ckpt_lib._reason(wrapper) == ('params.block_0.attn.query.kernel: Requested byte range [75971, 79782) is '
                                       'not valid for value of size 1000')
  wrapper.__cause__ = None   # the wrapper alone: its first words and the array's key from the spec
  wrapper = Exception(str(wrapper) + "    'path': '/r/checkpoints/6/state/',\n  },\n  'path': 'params.w0/',\n")
  assert ckpt_lib._reason(wrapper) == ('params.w0: Encountered error while reading array index: '
                                       '(slice(0, 32, 1),).')
  assert ckpt_lib._reason(ValueError('x' * 500)) == 'x' * 199 + '…'
  assert ckpt_lib._reason(ckpt_lib.CheckpointError('checksum mismatch in .params')) == 'checksum mismatch in .params'


def test_orbax_errors_during_an_operation_are_held_then_dropped_or_logged(monkeypatch, caplog):
  """Orbax's ERROR logs while a save or read is under way: dropped when it fails (ecdit's own line says it),
  logged when it succeeds (they were about something else); outside one, their tracebacks are cut; with
  ECDIT_VERBOSE=1 all of it is left as Orbax wrote it."""
  import logging
  try:
    raise OSError(28, 'No space left on device')
  except OSError:
    exc_info = sys.exc_info()

  def record(message):
    return logging.LogRecord('ecdit_test_orbax', logging.ERROR, '/site-packages/orbax/checkpoint/x.py', 1,
                             message, None, exc_info)
  monkeypatch.delenv('ECDIT_VERBOSE', raising=False)
  f = ckpt_lib._OrbaxErrors()   # pylint: disable=protected-access
  logging.getLogger('ecdit_test_orbax').addFilter(f)
  with caplog.at_level(logging.ERROR, 'ecdit_test_orbax'):
    r = record('outside')
    assert f.filter(r) and r.exc_info is None   # no operation: the message line, no traceback
    f.hold()
    assert not f.filter(record('of the failed save'))
    f.release(failed=True)
    f.hold()
    assert not f.filter(record('of another thing'))
    f.release(failed=False)
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [('of another thing', None)]
    monkeypatch.setenv('ECDIT_VERBOSE', '1')
    f.hold()
    r = record('verbose')
    assert f.filter(r) and r.exc_info is exc_info
    f.release(failed=True)
