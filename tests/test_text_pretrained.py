"""The Flax T5 encoder and CLIP text model against transformers on tiny random weights; tokenizers; errors."""
import json
import pickle
import shutil

import numpy as np
import pytest

from ecdit.models import clip_text
from ecdit.models import text_pretrained as tp
from ecdit.models.hf_loading import LoadError
from _hf_folders import write_clip, write_clip_bpe, write_spiece, write_t5

TEXTS = ['A red  cube,\tleft of the sphere!!', "it's 2024 — Café naïve ÅB", "dog's   toys'll", '', 'x' * 40]


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope='module')
def torch_mods():
  torch = pytest.importorskip('torch', reason='parity tests need the torch extra (requirements-torch.txt)')
  transformers = pytest.importorskip('transformers', reason='parity tests need transformers '
                                     '(requirements-torch.txt)')
  torch.manual_seed(0)
  return torch, transformers


@pytest.fixture(scope='module')
def t5_folder(torch_mods, tmp_path_factory):
  torch, transformers = torch_mods
  folder = tmp_path_factory.mktemp('t5')
  cfg = transformers.T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                              feed_forward_proj='gated-gelu', relative_attention_num_buckets=8,
                              relative_attention_max_distance=20)
  model = transformers.T5EncoderModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():   # layer norms start at 1: perturb them too
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  write_spiece(folder)
  return model, folder


@pytest.fixture(scope='module')
def clip_folder(torch_mods, tmp_path_factory):
  torch, transformers = torch_mods
  folder = tmp_path_factory.mktemp('clip')
  vocab_size = write_clip_bpe(folder)
  cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                    bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                    pad_token_id=vocab_size - 1)
  model = transformers.CLIPTextModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model, folder


def test_t5_parity(torch_mods, t5_folder):
  torch, transformers = torch_mods
  model, folder = t5_folder
  enc = tp.load_text_encoder(folder, length=24)
  assert (enc.kind, enc.states_dim, enc.length) == ('t5', 32, 24)
  states, mask = enc.encode_texts(TEXTS)
  hf_tok = transformers.T5Tokenizer.from_pretrained(str(folder), local_files_only=True, extra_ids=0)
  ref_ids = hf_tok(TEXTS, padding='max_length', max_length=24, truncation=True, return_tensors='np')
  ids, _ = enc.tokenizer.encode_batch(TEXTS)
  np.testing.assert_array_equal(ids, ref_ids['input_ids'])
  np.testing.assert_array_equal(mask, ref_ids['attention_mask'].astype(bool))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  assert _rel(states[mask], ref[mask]) <= 1e-4   # padded positions are never attended to; not compared
  tok = pickle.loads(pickle.dumps(enc.tokenizer))   # grain workers get a pickled copy
  np.testing.assert_array_equal(tok.encode_batch(TEXTS)[0], ids)


def test_clip_parity(torch_mods, clip_folder):
  torch, transformers = torch_mods
  model, folder = clip_folder
  enc = tp.load_text_encoder(folder)
  assert (enc.kind, enc.states_dim, enc.length) == ('clip', 32, 16)
  hf_tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
  ref = hf_tok(TEXTS + ['<|endoftext|> hi'], padding='max_length', max_length=16, truncation=True,
               return_tensors='np')
  ids, mask = enc.tokenizer.encode_batch(TEXTS + ['<|endoftext|> hi'])
  np.testing.assert_array_equal(ids, ref['input_ids'])
  np.testing.assert_array_equal(mask, ref['attention_mask'].astype(bool))
  ids, mask = ids[:len(TEXTS)], mask[:len(TEXTS)]
  states, _ = enc.encode_texts(TEXTS)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long())
    masked = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  assert _rel(states, out.last_hidden_state.numpy()) <= 1e-4
  module = clip_text.CLIPTextTransformer(enc.cfg)
  hidden, pooled = module.apply(enc.params, ids, mask)
  assert _rel(pooled, masked.pooler_output.numpy()) <= 1e-4
  assert _rel(np.asarray(hidden)[mask], masked.last_hidden_state.numpy()[mask]) <= 1e-4


# Loading and its errors need only a folder, not transformers: written with numpy (no torch).
@pytest.fixture(scope='module')
def t5_files(tmp_path_factory):
  return write_t5(tmp_path_factory.mktemp('np') / 't5')


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
  return write_clip(tmp_path_factory.mktemp('np') / 'clip', hidden=32, intermediate=48, layers=2, heads=4,
                    positions=16)


def test_sd_layout_tokenizer_sibling(clip_files, tmp_path):
  folder = clip_files
  (tmp_path / 'text_encoder').mkdir()
  (tmp_path / 'tokenizer').mkdir()
  for name in ('config.json', 'model.safetensors'):
    shutil.copy(folder / name, tmp_path / 'text_encoder' / name)
  for name in ('vocab.json', 'merges.txt'):
    shutil.copy(folder / name, tmp_path / 'tokenizer' / name)
  enc = tp.load_text_encoder(tmp_path / 'text_encoder', length=8)
  assert enc.tokenizer.encode_batch(['a cube'])[0].shape == (1, 8)


def _copy(src, dst, skip=(), **config_changes):
  dst.mkdir()
  for p in src.iterdir():
    if p.name not in skip:
      shutil.copy(p, dst / p.name)
  if config_changes:
    cfg = json.loads((src / 'config.json').read_text())
    cfg.update(config_changes)
    (dst / 'config.json').write_text(json.dumps(cfg))
  return dst


def test_t5_loading_errors(t5_files, tmp_path):
  folder = t5_files
  assert tp.load_text_encoder(folder).states_dim == 32   # the folder itself loads
  with pytest.raises(LoadError, match=r'spiece\.model is missing'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'a', skip=('spiece.model',)))
  with pytest.raises(LoadError, match=r'model\.safetensors is missing'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'b', skip=('model.safetensors',)))
  with pytest.raises(LoadError, match=r'tensor encoder\.block\.2\.layer\.0\.layer_norm\.weight is missing'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'c', num_layers=3))
  with pytest.raises(LoadError, match=r'tensor encoder\.block\.1\..* is not part of the model'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'd', num_layers=1))
  with pytest.raises(LoadError, match=r'tensor shared\.weight .* has shape \(48, 32\)'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'e', vocab_size=50))
  d = _copy(folder, tmp_path / 'f', skip=('spiece.model',))
  write_spiece(d, vocab_size=60)
  with pytest.raises(LoadError, match=r'spiece\.model has \d+ pieces but .* vocab_size=48'):
    tp.load_text_encoder(d)
  with pytest.raises(LoadError, match=r'model_type=.bert.'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'g', model_type='bert'))


def test_clip_loading_errors(clip_files, tmp_path):
  folder = clip_files
  assert tp.load_text_encoder(folder).states_dim == 32
  with pytest.raises(LoadError, match=r'merges\.txt is missing'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'a', skip=('merges.txt',)))
  with pytest.raises(LoadError, match=r'config\.json is missing'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'b', skip=('config.json',)))
  vocab = json.loads((folder / 'vocab.json').read_text())
  d = _copy(folder, tmp_path / 'c')
  (d / 'vocab.json').write_text(json.dumps({**vocab, 'zebra</w>': len(vocab)}))   # another model's tokenizer
  with pytest.raises(LoadError, match=rf'vocab\.json has ids up to {len(vocab)} but .* vocab_size={len(vocab)}'):
    tp.load_text_encoder(d)
  with pytest.raises(LoadError, match=r'tensor embeddings\.position_embedding\.weight .* has shape'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'd', max_position_embeddings=20))
  with pytest.raises(LoadError, match=r'tensor encoder\.layers\.0\.mlp\.fc1\.weight .* has shape'):
    tp.load_text_encoder(_copy(folder, tmp_path / 'e', intermediate_size=64))
