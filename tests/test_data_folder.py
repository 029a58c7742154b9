"""Importing a folder of images + captions (image_text_folder), including the bad inputs."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ecdit.config import data as config_lib
from ecdit.data import pipeline
from ecdit.data import prepare as prepare_lib
from ecdit.data import tokenizer as tokenizer_lib


def folder_cfg(root, source, **overrides):
  cfg = config_lib.default_data_config()
  cfg.name, cfg.dir, cfg.source_dir = 'image_text_folder', str(root), str(source)
  cfg.num_validation_examples = 0
  cfg.vocab_size = 40
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def write_image(path, size=(48, 40), color=(200, 30, 30)):
  Image.new('RGB', size, color).save(path)


def make_folder(root, n=6, sidecar=True):
  root.mkdir(parents=True, exist_ok=True)
  words = ['red', 'green', 'blue', 'big', 'small', 'round']
  for i in range(n):
    write_image(root / f'img{i}.png', color=(40 * i, 100, 200 - 30 * i))
    caption = f'a {words[i % 6]} thing number {i}'
    if sidecar:
      (root / f'img{i}.txt').write_text(caption)
  return root


def splits_of(path):
  info = tfds.builder_from_directory(str(path)).info
  return {s: info.splits[s].num_examples for s in info.splits}


def test_sidecar_import_skips_and_counts_a_corrupt_image(tmp_path, capsys):
  src = make_folder(tmp_path / 'src')
  (src / 'broken.png').write_bytes(b'this is not a png')
  (src / 'broken.txt').write_text('a broken picture')
  (src / 'notes.md').write_text('ignored: not an image extension')
  # A wide image whose left and right thirds differ: the centre crop keeps only the middle.
  wide = np.zeros((40, 120, 3), np.uint8)
  wide[:, :40], wide[:, 40:80], wide[:, 80:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  Image.fromarray(wide).save(src / 'wide.png')
  (src / 'wide.txt').write_text('three stripes')
  path = prepare_lib.prepare(folder_cfg(tmp_path / 'data', src))
  out = capsys.readouterr().out
  assert 'skipped 1 unusable image' in out and 'broken.png' in out
  assert splits_of(path) == {'train': 7}
  src_ds = tfds.builder_from_directory(str(path)).as_data_source(split='train')
  recs = [src_ds[i] for i in range(len(src_ds))]
  by_caption = {r['caption'].decode(): r for r in recs}
  assert by_caption['a red thing number 0']['image'].shape == (32, 32, 3)
  stripes = by_caption['three stripes']['image']
  assert (stripes[:, 8:24, 1] > 200).all() and (stripes[:, 8:24, 0] < 50).all()   # only green survives
  assert json.loads(recs[0]['metadata']) == {}


def test_fail_mode_names_the_corrupt_file(tmp_path):
  src = make_folder(tmp_path / 'src', n=2)
  (src / 'broken.png').write_bytes(b'\x89PNG not really')
  (src / 'broken.txt').write_text('x')
  with pytest.raises(ValueError, match=r'broken\.png: not a readable image'):
    prepare_lib.prepare(folder_cfg(tmp_path / 'data', src, on_bad_image='fail'), verbose=False)
  assert not list((tmp_path / 'data').glob('image_text_folder/*/*'))   # nothing half-written


def test_captions_jsonl_with_validation_split(tmp_path):
  src = make_folder(tmp_path / 'src', n=8, sidecar=False)
  with open(src / 'captions.jsonl', 'w') as f:
    for i in range(8):
      f.write(json.dumps({'file': f'img{i}.png', 'caption': f'picture {i} of a thing'}) + '\n')
  path = prepare_lib.prepare(folder_cfg(tmp_path / 'data', src, num_validation_examples=2), verbose=False)
  assert splits_of(path) == {'train': 6, 'validation': 2}
  # Re-running with the same folder reuses it; changing the folder makes a new import.
  assert prepare_lib.prepare(folder_cfg(tmp_path / 'data', src, num_validation_examples=2), verbose=False) == path
  write_image(src / 'img0.png', color=(0, 0, 0))
  assert prepare_lib.dataset_dir(folder_cfg(tmp_path / 'data', src, num_validation_examples=2)) != path


def test_image_smaller_than_target(tmp_path, capsys):
  src = make_folder(tmp_path / 'src', n=2)
  write_image(src / 'tiny.png', size=(20, 64))
  (src / 'tiny.txt').write_text('a tiny picture')
  with pytest.raises(ValueError, match=r'tiny\.png: 20x64 is smaller than the target size 32x32'):
    prepare_lib.prepare(folder_cfg(tmp_path / 'data', src, on_bad_image='fail'), verbose=False)
  path = prepare_lib.prepare(folder_cfg(tmp_path / 'data', src), verbose=False)
  assert splits_of(path) == {'train': 2}
  assert 'smaller than the target size' in capsys.readouterr().out


@pytest.mark.parametrize('case, error, match', [
    ('missing', FileNotFoundError, 'does not exist'),
    ('empty', ValueError, 'no images in'),
    ('only_text', ValueError, 'no images in'),
    ('uncaptioned', ValueError, r'img1\.png'),
    ('jsonl_missing_image', ValueError, r'captions\.jsonl:2: image .ghost\.png. .*does not exist'),
    ('jsonl_unlisted_image', ValueError, r'does not match the images.*img1\.png'),
    ('jsonl_bad_json', ValueError, r'captions\.jsonl:1: not valid JSON'),
])
def test_bad_folders(tmp_path, case, error, match):
  src = tmp_path / 'src'
  if case != 'missing':
    src.mkdir()
  if case == 'only_text':
    (src / 'readme.txt').write_text('hello')
  if case == 'uncaptioned':
    make_folder(src, n=2)
    (src / 'img1.txt').unlink()
  if case.startswith('jsonl'):
    make_folder(src, n=2, sidecar=False)
    lines = {'jsonl_missing_image': ['{"file": "img0.png", "caption": "a"}', '{"file": "ghost.png", "caption": "b"}'],
             'jsonl_unlisted_image': ['{"file": "img0.png", "caption": "a"}'],
             'jsonl_bad_json': ['{"file": img0.png}']}[case]
    (src / 'captions.jsonl').write_text('\n'.join(lines) + '\n')
  with pytest.raises(error, match=match):
    prepare_lib.prepare(folder_cfg(tmp_path / 'data', src), verbose=False)


def test_non_image_file_named_in_captions(tmp_path):
  src = make_folder(tmp_path / 'src', n=2, sidecar=False)
  (src / 'notes.md').write_text('# not an image')
  (src / 'captions.jsonl').write_text(
      '{"file": "img0.png", "caption": "a"}\n{"file": "img1.png", "caption": "b"}\n'
      '{"file": "notes.md", "caption": "c"}\n')
  with pytest.raises(ValueError, match=r'notes\.md: not a readable image'):
    prepare_lib.prepare(folder_cfg(tmp_path / 'data', src, on_bad_image='fail'), verbose=False)


def test_optional_latent_feature(tmp_path):
  src = make_folder(tmp_path / 'src', n=3)
  for i in range(3):
    np.save(src / f'img{i}.npy', np.full((4, 4, 2), i, np.float32))
  path = prepare_lib.prepare(folder_cfg(tmp_path / 'data', src, latent_shape=(4, 4, 2)), verbose=False)
  ds = tfds.builder_from_directory(str(path)).as_data_source(split='train')
  rec = ds[0]
  assert rec['latent'].shape == (4, 4, 2) and rec['latent'].dtype == np.float32
  assert sorted(float(ds[i]['latent'][0, 0, 0]) for i in range(3)) == [0.0, 1.0, 2.0]
  # The batch contract: with stored latents the flow diffuses the latent (x0), the pixels stay on the host.
  cfg = folder_cfg(tmp_path / 'data', src, latent_shape=(4, 4, 2))
  batch = next(pipeline.make_train_iterator(cfg, global_batch_size=3, sharding=None,
                                            tokenizer=prepare_lib.load_or_train_tokenizer(cfg), seed=0))
  assert batch['x0'].shape == (3, 4, 4, 2) and sorted(batch['x0'][:, 0, 0, 0]) == [0.0, 1.0, 2.0]
  assert batch['image'].shape[0] == 3 and batch['image'].shape[-1] == 3
  np.save(src / 'img0.npy', np.zeros((3,), np.float32))
  with pytest.raises(ValueError, match=r'img0\.npy: latent has shape \(3,\)'):
    prepare_lib.prepare(folder_cfg(tmp_path / 'data2', src, latent_shape=(4, 4, 2)), verbose=False)
