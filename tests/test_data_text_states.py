"""`ecdit prepare` with a pretrained text encoder (data.text_encoder_dir) and the pipeline over its states."""
import numpy as np
import pytest

from ecdit.data import latents
from ecdit.data import pipeline
from ecdit.data import prepare as prepare_lib
from ecdit.models import text_pretrained as tp
from test_data_folder import folder_cfg, make_folder
from _hf_folders import write_clip


def test_prepare_and_pipeline_with_precomputed_text_states(tmp_path):
  src = make_folder(tmp_path / 'src', n=4)
  clip = write_clip(tmp_path / 'clip')
  cfg = folder_cfg(tmp_path / 'data', src, image_size=16, text_encoder_dir=str(clip), text_length=10,
                   caption_dropout=0.5, text_states_dtype='float32')
  path = prepare_lib.prepare(cfg, verbose=False)
  assert path == prepare_lib.dataset_dir(cfg) != prepare_lib.imported_dataset_dir(cfg)
  assert not list(path.glob('tokenizer_*.model'))
  assert prepare_lib.prepare(cfg, verbose=False) == path   # idempotent

  it = pipeline.make_train_iterator(cfg, global_batch_size=4, sharding=None, tokenizer=None, seed=0)
  for _ in range(20):   # until a batch mixes kept and dropped captions
    batch = next(it)
    if 0 < sum(c == '' for c in batch['caption']) < 4:
      break
  assert batch['text'].dtype == np.float32 and batch['text'].shape == (4, 10, 16)
  assert it.get_state()['text_length'] == 10
  enc = tp.load_text_encoder(clip, length=10)
  null_states, null_mask = latents.read_null_text(path)
  dropped = [i for i, c in enumerate(batch['caption']) if c == '']
  kept = [i for i, c in enumerate(batch['caption']) if c]
  assert dropped and kept
  for i in dropped:
    np.testing.assert_array_equal(batch['text'][i], null_states)
    np.testing.assert_array_equal(batch['text_mask'][i], null_mask)
  states, mask = enc.encode_texts([batch['caption'][i] for i in kept])
  np.testing.assert_allclose(batch['text'][kept], states, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batch['text_mask'][kept], mask)

  # Encoding per step instead: the imported dataset, the encoder's own tokenizer.
  cfg.precompute_text = False
  assert prepare_lib.dataset_dir(cfg) == prepare_lib.imported_dataset_dir(cfg)


def test_bad_values():
  from ecdit.config import data as config_lib
  for key, value, match in (('text_states_dtype', 'bfloat16', 'text_states_dtype'),):
    cfg = config_lib.default_data_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate_data_config(cfg)
  cfg = config_lib.default_data_config()
  cfg.vae_dir = '/somewhere'
  with pytest.raises(ValueError, match="data.vae_dir.*'shapes'"):
    config_lib.validate_data_config(cfg)
