"""Precomputing VAE latents and text states into a new dataset beside a prepared one (no torch needed)."""
import hashlib
import pathlib

import numpy as np
import pytest

from ecdit.data import latents
from ecdit.data import prepare as prepare_lib
from ecdit.data import reader
from ecdit.models import text_pretrained as tp
from ecdit.models import vae as vae_lib
from test_data_folder import folder_cfg, make_folder
from _hf_folders import write_clip

TINY_VAE = vae_lib.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def _tree_hash(path: pathlib.Path) -> str:
  h = hashlib.sha1()
  for p in sorted(path.rglob('*')):
    if p.is_file():
      h.update(p.name.encode() + p.read_bytes())
  return h.hexdigest()


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('lat')
  src = make_folder(root / 'src', n=5)
  cfg = folder_cfg(root / 'data', src, image_size=16, num_validation_examples=1)
  return prepare_lib.prepare(cfg, verbose=False), root


def test_round_trip_resume_and_old_untouched(prepared, tmp_path, monkeypatch):
  src, root = prepared
  before = _tree_hash(src)
  vae = vae_lib.VAE.random(TINY_VAE)
  enc = tp.load_text_encoder(write_clip(tmp_path / 'clip'))

  # First run: dies after one batch of two; the finished batch is kept.
  real_encode, calls = vae.encode, []

  def failing(images, rng=None):
    if calls:
      raise KeyboardInterrupt
    calls.append(len(images))
    return real_encode(images, rng)
  monkeypatch.setattr(vae, 'encode', failing)
  with pytest.raises(KeyboardInterrupt):
    latents.precompute(src, vae=vae, text_encoder=enc, batch_size=2, progress=False)
  dst = latents.encoded_dataset_dir(src, vae=vae, text_encoder=enc)
  assert dst == latents.encoded_dataset_dir(src, vae=vae, text_encoder=tp.load_text_encoder(tmp_path / 'clip'))
  assert dst.parent.parent == src.parent.parent and not (dst / 'dataset_info.json').exists()

  # Second run: only the remaining batches are encoded (train: 4 images, validation: 1).
  counted = []
  monkeypatch.setattr(vae, 'encode', lambda images, rng=None: counted.append(len(images)) or
                      real_encode(images, rng))
  assert latents.precompute(src, vae=vae, text_encoder=enc, batch_size=2, progress=False) == dst
  assert counted == [2, 1]
  assert _tree_hash(src) == before   # the old dataset is only read
  assert not list(dst.parent.glob('.partial*'))

  for split in ('train', 'validation'):
    old, new = reader.data_source(src, split, 16), reader.data_source(dst, split, 16)
    assert len(old) == len(new)
    for i in range(len(old)):
      a, b = old[i], new[i]
      np.testing.assert_array_equal(a['image'], b['image'])
      assert a['caption'] == b['caption'] and a['index'] == b['index']
      z = real_encode(a['image'][None].astype(np.float32) / 127.5 - 1)
      np.testing.assert_allclose(b['latent'], np.asarray(z)[0], rtol=1e-5, atol=1e-6)
      states, mask = enc.encode_texts([a['caption'].decode()])
      assert b['text_states'].dtype == np.float16 and b['text_states'].shape == (12, 16)
      np.testing.assert_allclose(b['text_states'].astype(np.float32), states[0], rtol=2e-3, atol=2e-3)
      np.testing.assert_array_equal(b['text_mask'], mask[0])
  # A loaded VAE's dataset can be found from the folder paths alone (what the training pipeline needs).
  (tmp_path / 'vae').mkdir()
  (tmp_path / 'vae' / 'config.json').write_text('{}')
  loaded = vae_lib.VAE(vae.cfg, vae.params, folder=tmp_path / 'vae')
  assert latents.encoded_dataset_dir(src, vae=loaded, text_encoder=enc) == latents.encoded_dataset_dir_from_paths(
      src, vae_dir=str(tmp_path / 'vae'), text_encoder_dir=str(tmp_path / 'clip'))
  null_states, null_mask = latents.read_null_text(dst)
  assert null_mask.sum() == 2 and null_states.shape == (12, 16)   # start + end tokens

  # Idempotent: an existing result is returned without work.
  monkeypatch.setattr(vae, 'encode', None)
  assert latents.precompute(src, vae=vae, text_encoder=enc, batch_size=2, progress=False) == dst


def test_bad_inputs(prepared):
  src, root = prepared
  with pytest.raises(ValueError, match='needs a vae, a text_encoder'):
    latents.precompute(src)
  # The checks come before any weight is read, so these VAEs have none (a random 6-level one takes 15 s).
  with pytest.raises(ValueError, match=r'multiple of 32'):
    latents.precompute(src, vae=vae_lib.VAE(vae_lib.VAEConfig(
        block_out_channels=(4, 4, 4, 4, 4, 4), layers_per_block=1, norm_num_groups=4), params=None))
  with pytest.raises(reader.DataError, match='no prepared dataset'):
    latents.precompute(root / 'nowhere', vae=vae_lib.VAE(TINY_VAE, params=None))
  with pytest.raises(reader.DataError, match='null_text.npz is missing'):
    latents.read_null_text(src)


def test_a_damaged_null_text_file_is_one_data_error(tmp_path):
  (tmp_path / latents.NULL_TEXT_FILE).write_bytes(b'PK\x03\x04 not a zip')
  with pytest.raises(reader.DataError, match=r'null_text\.npz is not the empty caption\'s text states \(.*\): the '
                                             r'prepared dataset is damaged; delete .* run `ecdit prepare`'):
    latents.read_null_text(tmp_path)
  np.savez(tmp_path / latents.NULL_TEXT_FILE, states=np.zeros((2, 3)))   # no mask
  with pytest.raises(reader.DataError, match=r'KeyError'):
    latents.read_null_text(tmp_path)
