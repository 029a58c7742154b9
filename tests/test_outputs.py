"""The workdir and output guard (ecdit/outputs.py): refusals leave every file byte-identical, runs (old-style
too) are recognised, outputs are checked before any work."""
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from ecdit import errors, outputs
from _train_util import tiny_config
from cli_util import snapshot


def legacy_run(path: Path, resolved: dict) -> Path:
  """A run as `ecdit train` left it before the marker existed: config.json with resolved_model, checkpoints/."""
  (path / 'checkpoints' / '5').mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps(resolved, indent=2, sort_keys=True) + '\n')
  (path / 'metrics.jsonl').write_text('{"step": 5, "loss": 1.0}\n')
  return path


def test_train_refuses_a_foreign_dir_and_another_model_before_writing(tmp_path):
  from ecdit.config import experiment as config_lib
  from ecdit.train import loop
  cfg = tiny_config()
  resolved = loop.resolved_config(cfg, config_lib.validate(cfg))

  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'config.json').write_text('{"mine": true}\n')
  (foreign / 'metrics.jsonl').write_text('a\nb\n')
  w = resolved['resolved_model']['width']
  other = dict(resolved, resolved_model=dict(resolved['resolved_model'], width=2 * w))
  run = legacy_run(tmp_path / 'run', other)
  before = snapshot(tmp_path)
  with pytest.raises(outputs.WorkdirError, match=r'foreign is not empty and is not an ecdit run'):
    loop.train(cfg, foreign, progress=False)
  with pytest.raises(outputs.WorkdirError, match=rf'a different model: model.width={2 * w} there, {w} now; '
                                                 rf'resume with --config.model.width={2 * w}'):
    loop.train(cfg, run, progress=False)
  assert snapshot(tmp_path) == before

  # An old-style run of the same model resumes, also when its resolved_model predates a key (its default).
  old = dict(resolved['resolved_model'])
  old.pop('scan_layers')
  same = legacy_run(tmp_path / 'same', dict(resolved, resolved_model=old))
  assert outputs.is_run(same) and not (same / outputs.RUN_MARKER).exists()
  outputs.check_train_workdir(same, resolved['resolved_model'])
  outputs.check_train_workdir(tmp_path / 'new', resolved['resolved_model'])   # not there yet: fine
  with pytest.raises(outputs.WorkdirError, match='inside the ecdit run'):
    outputs.check_train_workdir(same / 'nested', resolved['resolved_model'])


def test_train_refuses_a_resume_past_num_steps_and_damaged_data_before_writing(tmp_path):
  from ecdit.config import experiment as config_lib
  from ecdit.data import reader
  from ecdit.train import loop
  cfg = tiny_config(num_steps=4)
  run = tmp_path / 'run'
  loop.write_run_config(run, loop.resolved_config(cfg, config_lib.validate(cfg)))
  (run / 'checkpoints' / '4').mkdir(parents=True)
  (run / 'checkpoints' / '6.orbax-checkpoint-tmp-1').mkdir()   # an unfinished save is no step
  before = snapshot(tmp_path)
  cfg.train.num_steps = 2
  with pytest.raises(config_lib.ConfigError, match=r'^train.num_steps=2 is below the latest checkpoint step 4 in '
                                                   r'.*/run/checkpoints; resume with --config.train.num_steps=4 or '
                                                   r'more, or use a new workdir$'):
    loop.train(cfg, run, progress=False)
  assert snapshot(tmp_path) == before   # config.json still says 4 steps

  def damaged(cfg, mesh):
    raise reader.DataError('the dataset is damaged')
  cfg.train.num_steps = 4
  for workdir in (run, tmp_path / 'new'):   # the data is opened before the run's files are written
    with pytest.raises(reader.DataError):
      loop.train(cfg, workdir, progress=False, data_fn=damaged, devices=jax.devices()[:1])
  assert snapshot(tmp_path) == before

  # Every checkpoint unreadable: the one-line CheckpointError comes before config.json is rewritten (it would
  # say train.num_steps=6); the damaged step is moved aside, as training does.
  from _train_util import data_fn
  from ecdit.train import checkpoint as ckpt_lib
  config = (run / 'config.json').read_text()
  cfg.train.num_steps = 6
  with pytest.raises(ckpt_lib.CheckpointError, match=r'unreadable \(tried steps 4'):
    loop.train(cfg, run, progress=False, data_fn=data_fn(), devices=jax.devices()[:1])
  assert (run / 'config.json').read_text() == config


def test_run_marker_written_first_makes_a_run(tmp_path):
  from ecdit.train import loop
  resolved = {'name': 'x', 'resolved_model': {'width': 8, 'depth': (2, 3)}}
  loop.write_run_config(tmp_path / 'r', resolved)
  marker = json.loads((tmp_path / 'r' / outputs.RUN_MARKER).read_text())
  assert marker['format'] == 'ecdit-run' and marker['format_version'] == 1
  (tmp_path / 'r' / 'config.json').unlink()   # killed between the two writes: still a run, so it resumes
  assert outputs.is_run(tmp_path / 'r')
  outputs.check_train_workdir(tmp_path / 'r', {'width': 8, 'depth': (2, 3)})
  # config.json gone or damaged, another model asked for: the marker's hash refuses it before training would
  # rewrite the marker and config.json for that model (and only then find the checkpoints do not fit).
  for damage in (lambda p: None, lambda p: p.write_text('{"name": "x", "resol')):
    damage(tmp_path / 'r' / 'config.json')
    before = snapshot(tmp_path)
    with pytest.raises(outputs.WorkdirError, match=r'/r is a run of a different model: its ecdit_run.json records '
                                                   r'another model than this config\'s'):
      outputs.check_train_workdir(tmp_path / 'r', {'width': 16, 'depth': (2, 3)})
    assert snapshot(tmp_path) == before


def test_default_workdir_name_must_be_a_plain_name():
  for bad in ('..', '.', '', 'a/b', '../x'):
    with pytest.raises(errors.UsageError, match='expected a plain directory name'):
      outputs.check_run_name(bad)
  outputs.check_run_name('shapes_tiny')


def test_output_guard(tmp_path):
  from ecdit.diffusion import sampler
  run = legacy_run(tmp_path / 'run', {'resolved_model': {'width': 8}})
  ours_png = sampler.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / 'grid.png')
  assert outputs.png_from_ecdit(ours_png)
  (tmp_path / 'photo.png').write_bytes(b'\x89PNG\r\n\x1a\n not ours')
  (tmp_path / 'afile').write_text('x')
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'notes.txt').write_text('keep me')
  (tmp_path / 'old_export').mkdir()
  (tmp_path / 'old_export' / 'config.json').write_text('{"format": "ecdit-export", "weights": "m"}')
  before = snapshot(tmp_path)
  png, export = outputs.png_from_ecdit, outputs.folder_with('config.json', outputs.json_with('format', 'weights'))
  refused = [
      (run / 'config.json', {}, 'inside the ecdit run'),
      (run, dict(folder=True), 'inside the ecdit run'),                        # export --out=<workdir>
      (run / 'eval' / 'r.json', dict(run_subdir='samples'), 'inside the ecdit run'),
      (tmp_path / 'full', {}, 'is a directory; expected a file path'),         # sample --out=<dir>
      (tmp_path / 'photo.png', dict(ours=png), 'was not written by this command'),
      (tmp_path / 'full', dict(folder=True, ours=export), 'was not written by this command'),
      (tmp_path / 'afile', dict(folder=True), 'exists and is not a directory'),
      (tmp_path / 'afile' / 'r.json', {}, 'cannot be created: no writable directory above it'),
  ]
  for path, kw, msg in refused:
    with pytest.raises(outputs.OutputError, match=msg):
      outputs.check_output(path, '--out', **kw)
  assert snapshot(tmp_path) == before
  for path, kw in [(run / 'samples' / 'sample_5.png', dict(run_subdir='samples')), (ours_png, dict(ours=png)),
                   (tmp_path / 'old_export', dict(folder=True, ours=export)), (tmp_path / 'new' / 'x', {})]:
    assert outputs.check_output(path, '--out', **kw) == path


def test_save_png_leaves_no_tmp_when_it_fails(tmp_path):
  from ecdit.diffusion import sampler
  (tmp_path / 'd').mkdir()
  with pytest.raises(OSError):
    sampler.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / 'd')
  assert [p.name for p in tmp_path.iterdir()] == ['d']


@pytest.mark.parametrize('text, got', [('[1, 2, 3]', ''), ('{"name": "x", "model": 5, "train": "fast"}', '; got model, train')])
def test_a_foreign_run_config_is_one_workdir_error(tmp_path, text, got):
  """sample / eval / export read `config.json` through workdir.load_run_config: a JSON file that is not a run's
  config is named in one line, not a traceback from deep in the config code."""
  from ecdit.train import workdir
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(outputs.WorkdirError) as e:
    workdir.load_run_config(tmp_path)
  assert str(e.value) == (f'{tmp_path}/config.json is not an ecdit run config (expected a JSON object whose model, '
                          f'train and data entries are objects{got})')


def test_a_workdir_that_is_a_file_is_named_as_one(tmp_path):
  from ecdit.train import workdir
  (tmp_path / 'f').write_text('x')
  with pytest.raises(outputs.WorkdirError, match=rf'^--workdir={tmp_path}/f is a file, not a training run '
                                                 r'directory$'):
    workdir.load_run_config(tmp_path / 'f')


def test_train_workdir_and_data_dir_must_be_creatable(tmp_path):
  """Checked before anything is written or built: a workdir or data dir under a file, a data dir that is a
  file, a workdir that exists but cannot be written."""
  (tmp_path / 'afile').write_text('x')
  with pytest.raises(outputs.WorkdirError, match=r'^--workdir=.*/afile/wd cannot be created: no writable directory'):
    outputs.check_train_workdir(tmp_path / 'afile' / 'wd', {})
  with pytest.raises(outputs.OutputError, match=r'^--config.data.dir=.*/afile exists and is not a directory$'):
    outputs.check_data_dir(tmp_path / 'afile')
  with pytest.raises(outputs.OutputError, match=r'^--config.data.dir=.*/afile/d cannot be created'):
    outputs.check_data_dir(tmp_path / 'afile' / 'd')
  outputs.check_data_dir(tmp_path / 'new' / 'data')      # creatable: fine
  outputs.check_data_dir('gs://bucket/data')              # a URL is the dataset code's to check


def test_writability_is_tried_not_assumed(tmp_path, monkeypatch):
  """os.access says yes to root everywhere, /sys included, so `--out=/sys/x` used to pass the guard and fail after
  the work. The guard creates (and removes at once) a probe file in the directory the command would write into.
  As root /sys is such a directory; otherwise a folder without write permission is."""
  if os.geteuid() == 0 and Path('/sys').is_dir():
    locked = Path('/sys')
  else:
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
  monkeypatch.setattr(os, 'access', lambda *args, **kwargs: True)   # what root is told
  with pytest.raises(outputs.OutputError, match=rf'^--out={locked}/grid.png cannot be created: no writable'):
    outputs.check_output(locked / 'grid.png', '--out')
  with pytest.raises(outputs.OutputError, match=rf'^--out={locked}/new/export cannot be created'):
    outputs.check_output(locked / 'new' / 'export', '--out', folder=True)
  with pytest.raises(outputs.WorkdirError, match=rf'^--workdir={locked}/wd cannot be created'):
    outputs.check_train_workdir(locked / 'wd', {})
  with pytest.raises(outputs.OutputError, match=rf'^--config.data.dir={locked}/data cannot be created'):
    outputs.check_data_dir(locked / 'data')
  # Writable places pass, and the probe leaves nothing behind.
  (tmp_path / 'out').mkdir()
  before = snapshot(tmp_path)
  outputs.check_output(tmp_path / 'out', '--out', folder=True)
  outputs.check_output(tmp_path / 'new' / 'grid.png', '--out')
  outputs.check_train_workdir(tmp_path / 'out', {})
  assert snapshot(tmp_path) == before


def test_train_refuses_a_batch_larger_than_host_memory_before_anything(tmp_path):
  from ecdit.config import experiment as config_lib
  from ecdit.train import loop
  cfg = tiny_config()
  cfg.train.batch_size = 10**12
  with pytest.raises(config_lib.ConfigError, match=r'^train.batch_size=1000000000000 is too large: one batch of '
                                                   r'1000000000000 examples per process needs .* GiB of host memory'):
    loop.train(cfg, tmp_path / 'run', progress=False)
  assert list(tmp_path.iterdir()) == []
  mcfg = config_lib.validate(cfg)   # 16x16x3 float32 pixels + 32 int32 ids and mask bytes: 3232 bytes
  loop.check_batch_fits_host(cfg, mcfg, processes=1000, memory=3232 * 10**9)   # a share per process
  with pytest.raises(config_lib.ConfigError, match=r'expected at most 1000 per process$'):
    loop.check_batch_fits_host(cfg, mcfg, memory=3232 * 1000)
