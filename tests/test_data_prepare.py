"""The shapes tfds builder and `prepare`: round trip through builder_from_directory, idempotence, errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ecdit.config import data as config_lib
from ecdit.data import pipeline
from ecdit.data import prepare as prepare_lib
from ecdit.data import reader
from ecdit.data import shapes as S


def tiny_cfg(root, **overrides):
  cfg = config_lib.default_data_config()
  cfg.dir = str(root)
  cfg.num_train_examples, cfg.num_validation_examples, cfg.num_eval_prompts = 240, 24, 12
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  cfg = tiny_cfg(tmp_path_factory.mktemp('data'))
  return cfg, prepare_lib.prepare(cfg, verbose=False)


def test_round_trip_through_builder_from_directory(prepared):
  cfg, path = prepared
  builder = tfds.builder_from_directory(str(path))
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      'train': 240, 'validation': 24, 'eval_prompts': 12}
  for split in ('train', 'validation', 'eval_prompts'):
    src = builder.as_data_source(split=split)
    for i in (0, 5, len(src) - 1):
      rec = src[i]
      assert rec['index'] == i   # stored in generation order
      want = S.split_example(cfg.seed, split, i)
      assert rec['image'].shape == (32, 32, 3) and rec['image'].dtype == np.uint8
      assert np.array_equal(rec['image'], S.render_scene(want.scene, 32))
      assert rec['caption'].decode() == want.caption
      assert json.loads(rec['metadata']) == want.metadata
      assert S.Scene.from_json(rec['scene']) == want.scene


def test_stored_train_split_has_no_held_out_pairs(prepared):
  _, path = prepared
  builder = tfds.builder_from_directory(str(path))
  for split in ('train', 'validation'):
    src = builder.as_data_source(split=split)
    for i in range(len(src)):
      scene = S.Scene.from_json(src[i]['scene'])
      assert not {(o.cls, o.color) for o in scene.objects} & S.HELD_OUT
  evals = builder.as_data_source(split='eval_prompts')
  assert any(json.loads(evals[i]['metadata'])['held_out'] for i in range(len(evals)))


def test_prepare_is_idempotent_and_leaves_no_temporaries(prepared, capsys):
  cfg, path = prepared
  before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
  assert prepare_lib.prepare(cfg) == path
  assert 'train 240, validation 24, eval_prompts 12 examples' in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
  assert [p.name for p in path.parent.parent.parent.iterdir()] == ['shapes']   # no .incomplete-* left
  assert (path / 'tokenizer_bpe128.model').is_file()


def test_interrupted_prepare_does_not_touch_existing_dataset(prepared, monkeypatch):
  cfg, path = prepared
  other = tiny_cfg(cfg.dir, num_train_examples=30, num_validation_examples=0, num_eval_prompts=0)

  def boom(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(tfds.core.GeneratorBasedBuilder, 'download_and_prepare', boom)
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare(other, verbose=False)
  assert not prepare_lib.dataset_dir(other).exists()
  assert sorted(p.name for p in (path.parents[2]).iterdir()) == ['shapes']
  assert tfds.builder_from_directory(str(path)).info.splits['train'].num_examples == 240


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
  """A full disk while tfds writes a split (its RuntimeError around the OS error): one PrepareError line naming
  data.dir and the reason, exit status 1, no .incomplete-* folder left."""
  def full(*args, **kwargs):
    raise RuntimeError('Failed to finalize writing of split "train": write() failed: No space left on device; '
                       'writing /x/shapes-train.array_record-00000-of-00001\nmore detail')
  monkeypatch.setattr(tfds.core.GeneratorBasedBuilder, 'download_and_prepare', full)
  with pytest.raises(prepare_lib.PrepareError, match=rf'^writing the dataset under data.dir={tmp_path} failed '
                                                     r'\(Failed to finalize .*No space left on device; writing '
                                                     r'/x/shapes-train.*\); the partial copy was removed') as e:
    prepare_lib.prepare(tiny_cfg(tmp_path), verbose=False)
  assert '\n' not in str(e.value) and e.value.exit_code == 1
  assert list(tmp_path.iterdir()) == []


def test_wrong_feature_shape_in_existing_dataset(prepared, tmp_path):
  cfg, path = prepared
  # Same dataset directory name, but the config now asks for 64x64 images.
  cfg64 = tiny_cfg(tmp_path, image_size=64)
  target = prepare_lib.dataset_dir(cfg64)
  target.parent.mkdir(parents=True)
  os.symlink(path, target)
  with pytest.raises(ValueError, match=r'shape \(32, 32, 3\).*image_size=64'):
    prepare_lib.prepare(cfg64, verbose=False)


def _copy_of(prepared, root):
  """The prepared dataset copied under another data dir: (its config, its folder), to damage."""
  cfg = tiny_cfg(root)
  dst = prepare_lib.dataset_dir(cfg)
  shutil.copytree(prepared[1], dst)
  return cfg, dst


def _cut(f, n):
  f.write_bytes(f.read_bytes()[:n])


@pytest.mark.parametrize('damage,match', [
    (lambda d: _cut(d / 'shapes-train.array_record-00000-of-00001', 5000),
     r"1\.0\.0: the prepared dataset is damaged: a shard file of split 'train' cannot be read \(ArrayRecord file"),
    (lambda d: _cut(d / 'shapes-train.array_record-00000-of-00001',   # records listed, their bytes gone
                    (d / 'shapes-train.array_record-00000-of-00001').stat().st_size // 4),
     r"damaged: a shard file of split 'train' cannot be read \(example should have type"),
    (lambda d: (d / 'shapes-validation.array_record-00000-of-00001').unlink(),
     r"damaged: a shard file of split 'validation' cannot be read \(open\(\) failed: No such file"),
    (lambda d: (d / 'dataset_info.json').write_bytes(b'\xcf\x80\xff{'), r'/dataset_info\.json is not valid JSON'),
    (lambda d: _cut(d / 'features.json', 100), r'/features\.json is not valid JSON \(Unterminated string'),
    (lambda d: (d / 'dataset_info.json').write_text('[1, 2]'), r'1\.0\.0 is not a readable tfds dataset'),
    (lambda d: (d / 'dataset_info.json').unlink(),   # not rebuilt over: tfds would fail on the non-empty folder
     r'/dataset_info\.json is missing but .*1\.0\.0 holds other files: the prepared dataset is damaged'),
    (lambda d: _cut(d / 'tokenizer_bpe128.model', 1000),
     r'/tokenizer_bpe128\.model is not a sentencepiece model \(1000 bytes: .*delete it and run `ecdit prepare'),
], ids=['truncated_records', 'truncated_tail', 'missing_records', 'garbage_info', 'truncated_features', 'wrong_info',
        'deleted_info', 'truncated_tokenizer'])
def test_damaged_dataset_is_one_data_error_naming_the_file(prepared, tmp_path, damage, match):
  from cli_util import snapshot
  cfg, copy = _copy_of(prepared, tmp_path)
  damage(copy)
  before = snapshot(tmp_path)
  with pytest.raises(reader.DataError, match=match) as e:
    prepare_lib.prepare(cfg, verbose=False)
  assert '\n' not in str(e.value) and e.value.exit_code == 1
  if 'tokenizer' not in match:
    assert str(e.value).endswith(f'delete {"that folder" if "shard" in match else copy} and run `ecdit prepare` '
                                 'with the same config to rebuild it')
  assert snapshot(tmp_path) == before   # the error path changed, moved and deleted nothing


def test_records_damaged_mid_file_fail_while_iterating(prepared, tmp_path):
  """The first record of every shard reads (the check at opening passes); a chunk further in is overwritten:
  the pipeline's prefetch thread meets it and the consumer gets the DataError naming the record."""
  cfg, copy = _copy_of(prepared, tmp_path)
  f = copy / 'shapes-train.array_record-00000-of-00001'
  data = bytearray(f.read_bytes())
  data[20000:20064] = bytes(b ^ 0xFF for b in data[20000:20064])
  f.write_bytes(bytes(data))
  tok = prepare_lib.load_or_train_tokenizer(cfg)
  it = pipeline.make_train_iterator(cfg, global_batch_size=8, sharding=None, tokenizer=tok, seed=0, num_epochs=1)
  with pytest.raises(reader.DataError, match=r"damaged: record \d+ of split 'train' cannot be read \(Corrupted "
                                              r'Riegeli/records file: chunk data hash mismatch'):
    for _ in it:
      pass


def test_config_validation_names_the_key(tmp_path):
  for key, value in [('name', 'imagenet'), ('image_size', 3), ('caption_dropout', 1.5), ('vocab_size', 2),
                     ('on_bad_image', 'ignore'), ('num_train_examples', 0)]:
    cfg = tiny_cfg(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=f'data.{key}'):
      config_lib.validate_data_config(cfg)
  cfg = tiny_cfg(tmp_path, name='image_text_folder')
  with pytest.raises(ValueError, match='data.source_dir'):
    config_lib.validate_data_config(cfg)
  # The optional keys may be left out; the required ones may not.
  cfg = tiny_cfg(tmp_path)
  for key in config_lib.OPTIONAL_DEFAULTS:
    del cfg[key]
  config_lib.validate_data_config(cfg)
  del cfg['text_length']
  with pytest.raises(ValueError, match='data.text_length'):
    config_lib.validate_data_config(cfg)


def test_cli_prepare_command(tmp_path):
  exp = tmp_path / 'exp.py'
  exp.write_text(
      'from ecdit.data import default_data_config\n'
      'import ml_collections\n'
      'def get_config():\n'
      '  cfg = ml_collections.ConfigDict()\n'
      '  cfg.data = default_data_config()\n'
      f'  cfg.data.dir = {str(tmp_path / "data")!r}\n'
      '  cfg.data.num_train_examples, cfg.data.num_validation_examples, cfg.data.num_eval_prompts = 30, 6, 6\n'
      '  return cfg\n')
  cmd = [sys.executable, '-m', 'ecdit.cli', 'prepare', f'--config={exp}']
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert 'train 30, validation 6, eval_prompts 6 examples' in run.stdout
  # Overrides apply to the default experiment too (no --config given).
  bad = subprocess.run(cmd[:-1] + ['--config.data.name=image_text_folder', f'--config.data.source_dir={tmp_path}/nope',
                                   f'--config.data.dir={tmp_path / "data2"}'],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and 'nope' in bad.stderr and 'does not exist' in bad.stderr
