"""Sentencepiece tokenizer: round trip, fixed length + mask, reuse, and its errors."""
import os
import pickle

import numpy as np

import pytest

from ecdit.config import data as config_lib
from ecdit.config.experiment import ConfigError
from ecdit.data import prepare as prepare_lib
from ecdit.data import reader
from ecdit.data import shapes as S
from ecdit.data import tokenizer as T

CAPTIONS = [S.split_example(0, 'train', i).caption for i in range(600)]


@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
  return T.train_sentencepiece(CAPTIONS, 96, tmp_path_factory.mktemp('tok') / 'tok.model')


def test_round_trip_fixed_length_and_mask(model_path):
  tok = T.load_tokenizer(model_path, 96, length=12)
  assert tok.vocab_size == 96 and tok.model_path == model_path
  batch = CAPTIONS[:20] + ['']
  ids, mask = tok.encode_batch(batch)
  assert ids.shape == mask.shape == (21, 12) and ids.dtype == np.int32 and mask.dtype == bool
  assert tok.decode(ids) == batch
  assert tok.decode(ids[3]) == batch[3]
  assert (ids[~mask] == T.PAD_ID).all() and (ids[mask] != T.PAD_ID).all()
  assert mask[:, 0].all()                              # every caption, even the empty one, has a token
  assert (mask[:, :-1] >= mask[:, 1:]).all()           # real tokens first, then padding
  assert ids[-1, 0] == tok.eos_id and mask[-1].sum() == 1
  assert 0 < ids.max() < 96


def test_truncation_keeps_end_marker(model_path):
  tok = T.load_tokenizer(model_path, 96, length=4)
  ids, mask = tok.encode_batch(['a red circle and a green square'])
  assert mask.all() and ids[0, -1] == tok.eos_id
  assert tok.decode(ids[0]) == 'a red circle'


def test_pickles_for_worker_processes(model_path):
  tok = T.load_tokenizer(model_path, 96, length=8)
  clone = pickle.loads(pickle.dumps(tok))
  assert np.array_equal(clone.encode_batch(CAPTIONS[:5])[0], tok.encode_batch(CAPTIONS[:5])[0])


def test_errors(model_path, tmp_path):
  # Every bad tokenizer file is one DataError line naming it and the fix (a ValueError too, as before).
  with pytest.raises(reader.DataError, match=r'missing\.model does not exist; .*data\.tokenizer_path$'):
    T.load_tokenizer(tmp_path / 'missing.model', 96, 8)
  with pytest.raises(reader.DataError, match=r'has 96 pieces but data.vocab_size=128; set data.vocab_size=96, '
                                             r'or point data.tokenizer_path at a sentencepiece \.model of 128 '
                                             r'pieces$'):
    T.load_tokenizer(model_path, 128, 8)
  with pytest.raises(reader.DataError, match=r'has 96 pieces but data.vocab_size=128; it is the tokenizer trained '
                                             r'beside the dataset: delete it'):
    T.load_tokenizer(model_path, 128, 8, T.DATASET_FIX)
  (tmp_path / 'junk.model').write_bytes(b'not a model')
  with pytest.raises(reader.DataError, match=r'junk\.model is not a sentencepiece model \(11 bytes: .*\); point '
                                             'data.tokenizer_path at a sentencepiece .model file$'):
    T.load_tokenizer(tmp_path / 'junk.model', 96, 8)
  with pytest.raises(ConfigError, match=r'data.vocab_size=5000 is too large .* at most \d+'):
    T.train_sentencepiece(CAPTIONS, 5000, tmp_path / 'big.model')
  assert not (tmp_path / 'big.model').exists()


def test_explicit_tokenizer_path_in_config(model_path, tmp_path):
  cfg = config_lib.default_data_config()
  cfg.dir, cfg.tokenizer_path, cfg.vocab_size, cfg.text_length = str(tmp_path), str(model_path), 96, 10
  tok = prepare_lib.load_or_train_tokenizer(cfg)   # no dataset needed with an explicit tokenizer
  assert tok.length == 10 and tok.vocab_size == 96
  cfg.vocab_size = 64
  with pytest.raises(ValueError, match='data.vocab_size=64'):
    prepare_lib.load_or_train_tokenizer(cfg)


def test_trained_next_to_dataset_and_reused(tmp_path):
  cfg = config_lib.default_data_config()
  cfg.dir, cfg.num_train_examples, cfg.num_validation_examples, cfg.num_eval_prompts = str(tmp_path), 120, 0, 0
  cfg.vocab_size = 80
  tok = prepare_lib.load_or_train_tokenizer(cfg)
  assert tok.model_path.parent == tok.model_path.parent.parent / '1.0.0'   # inside the dataset's directory
  assert tok.model_path.name == 'tokenizer_bpe80.model' and tok.vocab_size == 80
  umask = os.umask(0)
  os.umask(umask)
  assert tok.model_path.stat().st_mode & 0o777 == 0o666 & ~umask   # readable like any file, not mkstemp's 0600
  stamp = tok.model_path.stat().st_mtime_ns
  assert prepare_lib.load_or_train_tokenizer(cfg).model_path.stat().st_mtime_ns == stamp
  cfg.vocab_size = 4000
  with pytest.raises(ValueError, match='data.vocab_size=4000 is too large'):
    prepare_lib.load_or_train_tokenizer(cfg)


@pytest.mark.parametrize('explicit', [False, True])
def test_a_trained_runs_wrong_tokenizer_is_one_line(model_path, tmp_path, explicit):
  """`ecdit sample / eval / analyze` load a run's tokenizer through workdir.Restored: one of another size is a
  DataError naming the file; the fix never says to change data.vocab_size (the model was trained with it)."""
  from ecdit.train import workdir
  from _train_util import load_experiment
  cfg = load_experiment('shapes_tiny')
  cfg.data.vocab_size = 128
  if explicit:
    cfg.data.tokenizer_path = str(model_path)
  run = workdir.Restored(tmp_path, cfg, None, None, None, 4, None, model_path)
  fix = (rf'point data.tokenizer_path in {tmp_path}/config.json at the sentencepiece .model the run was trained '
         'with$' if explicit else 'it is the tokenizer trained beside the dataset: delete it')
  with pytest.raises(reader.DataError, match=rf'^tokenizer {model_path} has 96 pieces but data.vocab_size=128; '
                                             rf'{fix}'):
    run.tokenizer
