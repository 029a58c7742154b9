"""The shapes tfds builder and `prepare`: round trip through builder_from_directory, idempotence, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ecdit.config import data as config_lib
from ecdit.data import prepare as prepare_lib
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


def test_wrong_feature_shape_in_existing_dataset(prepared, tmp_path):
  cfg, path = prepared
  # Same dataset directory name, but the config now asks for 64x64 images.
  cfg64 = tiny_cfg(tmp_path, image_size=64)
  target = prepare_lib.dataset_dir(cfg64)
  target.parent.mkdir(parents=True)
  os.symlink(path, target)
  with pytest.raises(ValueError, match=r'shape \(32, 32, 3\).*image_size=64'):
    prepare_lib.prepare(cfg64, verbose=False)


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
  bad = subprocess.run(cmd + ['--config.data.name=image_text_folder', f'--config.data.source_dir={tmp_path}/nope'],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and 'nope' in bad.stderr and 'does not exist' in bad.stderr
