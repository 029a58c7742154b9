"""ecdit_torch's loaders on damaged folders: `load_model` (an `ecdit export` folder) and `load_pipeline` (a
diffusers folder).

The folders are written here with torch alone (a tiny model with random weights, in the layouts the exporters
write; no JAX, no training). Each damage must be one ExportError line naming the file and the key, tensor or
folder, raised before a weight is read or a model allocated: the loaders' readers are replaced by ones that
fail the test, so a check that came too late shows. depth=200000 used to hang, width=32768 to allocate ~25 GB.
"""
from __future__ import annotations

import inspect
import io
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is not installed (pip install -e .[torch])')
diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed (pip install -e .[torch])')

import safetensors.torch  # noqa: E402
import sentencepiece as spm  # noqa: E402

from ecdit.config.model import ModelConfig  # noqa: E402
from ecdit_torch import ecdit_reference as ref  # noqa: E402
from ecdit_torch import loading  # noqa: E402
from ecdit_torch.text_encoder_ecdit import ECDiTTextEncoder  # noqa: E402
from ecdit_torch.tokenizer_ecdit import ECDiTTokenizer  # noqa: E402
from ecdit_torch.transformer_ecdit import ECDiTTransformer2DModel  # noqa: E402

TINY = ModelConfig.from_dict({'size': 'tiny'}).for_inference().to_dict()   # width 32, depth 2, 4 experts
TEXT = {k: TINY[k] for k in ('vocab_size', 'text_length', 'text_width', 'text_depth', 'text_heads')}
ARCH = {k: TINY[k] for k in inspect.signature(ECDiTTransformer2DModel.__init__).parameters if k in TINY}


def _not_reached(*args, **kwargs):
  raise AssertionError('weights read or a model allocated before the folder was checked')


# ---- load_model: an `ecdit export` folder ---------------------------------------------------------------

@pytest.fixture(scope='module')
def export_base(tmp_path_factory):
  folder = tmp_path_factory.mktemp('export')
  torch.manual_seed(0)
  model = ref.ECDiT(ref.Config(TINY))
  safetensors.torch.save_file(model.state_dict(), str(folder / 'model.safetensors'))
  (folder / 'config.json').write_text(json.dumps({'format': 'ecdit', 'model': TINY}, indent=2))
  return folder


def _model(**change):
  def damage(folder):
    conf = json.loads((folder / 'config.json').read_text())
    for k, v in change.items():
      if v is None:
        del conf['model'][k]
      else:
        conf['model'][k] = v
    (folder / 'config.json').write_text(json.dumps(conf))
  return damage


def _write(name, text):
  return lambda folder: (folder / name).write_text(text)


def _tensors(edit):
  def damage(folder):
    tensors = safetensors.torch.load_file(str(folder / 'model.safetensors'))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(folder / 'model.safetensors'))
  return damage


def _truncate(name, keep):
  def damage(folder):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:keep if keep > 0 else len(data) + keep])
  return damage


EXPORT_DAMAGE = {
    'depth_200000': (_model(depth=200000), 'config.json says model.depth=200000, but the weights hold depth=2;'),
    'width_32768': (_model(width=32768, text_width=32768),
                    'config.json says model.width=32768, but the weights hold width=32;'),
    'experts': (_model(num_experts=8), 'model.num_experts=8, but the weights hold num_experts=4;'),
    'text_depth': (_model(text_depth=3), 'model.text_depth=3, but the weights hold text_depth=1;'),
    'num_heads_0': (_model(num_heads=0), 'config.json: model.num_heads=0 is invalid: expected a positive integer'),
    'num_heads_3': (_model(num_heads=3), 'model.width=32 is invalid: expected a multiple of model.num_heads=3'),
    'patch_size_5': (_model(patch_size=5), 'model.image_size=8 is invalid: expected a multiple of model.patch_size=5'),
    'huge_image': (_model(image_size=16384, patch_size=1), 'expected at most 65536 patches of 1² per image'),
    'no_depth': (_model(depth=None), 'model.depth is missing: expected a positive integer'),
    'depth_str': (_model(depth='2'), "model.depth='2' is invalid: expected a positive integer"),
    'routing': (_model(routing='moe'), "model.routing='moe' is invalid: expected one of ['dense', "),
    'capacity': (_model(capacity_factor=-1), 'model.capacity_factor=-1 is invalid: expected a number > 0'),
    'kv_heads': (_model(num_kv_heads=3), 'model.num_kv_heads=3 is invalid: expected null or a positive divisor'),
    'mlp_ratio': (_model(mlp_ratio=8), "tensor 'blocks.0.ffn.wi.weight' has shape [128, 32], but config.json "
                                       'implies [256, 32]'),
    'not_object': (_write('config.json', '[1, 2]'), 'config.json: expected a JSON object, got list'),
    'truncated_config': (_truncate('config.json', 40), 'config.json is not a readable JSON file'),
    'no_model': (_write('config.json', '{"format": "ecdit"}'), 'config.json: no "model" section'),
    'model_list': (_write('config.json', '{"model": [1]}'), 'config.json: no "model" section'),
    'extra_tensor': (_tensors(lambda t: t.update(extra=torch.zeros(2))), "unexpected tensor(s) ['extra']"),
    'missing_tensor': (_tensors(lambda t: t.pop('final.proj.bias')), "missing tensor 'final.proj.bias' (shape [12])"),
    'int_tensor': (_tensors(lambda t: t.update({'final.proj.bias': torch.zeros(12, dtype=torch.int32)})),
                   "tensor 'final.proj.bias' has dtype I32, expected one of ['F16', 'BF16', 'F32', 'F64']"),
    'garbage_weights': (_write('model.safetensors', 'not safetensors'), 'model.safetensors is not a readable '
                                                                       'safetensors file'),
    'truncated_weights': (_truncate('model.safetensors', -100), 'model.safetensors is not a readable safetensors'),
}


@pytest.mark.parametrize('kind', list(EXPORT_DAMAGE))
def test_damaged_export_is_one_line_before_loading(export_base, tmp_path, kind, monkeypatch):
  damage, message = EXPORT_DAMAGE[kind]
  export_dir = shutil.copytree(export_base, tmp_path / 'export')
  damage(export_dir)
  monkeypatch.setattr(safetensors.torch, 'load_file', _not_reached)   # load_model reads the weights with it
  with pytest.raises(ref.ExportError) as e:
    ref.load_model(export_dir)
  assert message in str(e.value) and str(export_dir) in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_missing_export_folder(tmp_path):
  with pytest.raises(ref.ExportError, match=f'export directory {tmp_path / "nope"} does not exist'):
    ref.load_model(tmp_path / 'nope')


# ---- load_pipeline: a diffusers folder ------------------------------------------------------------------

@pytest.fixture(scope='module')
def pipeline_base(tmp_path_factory):
  """The layout export_diffusers writes, the transformer sharded (with an index) as a large model's would be."""
  folder = tmp_path_factory.mktemp('pipe')
  torch.manual_seed(0)
  ECDiTTransformer2DModel(**ARCH).save_pretrained(folder / 'transformer', max_shard_size='40KB')
  ECDiTTextEncoder(**TEXT).save_pretrained(folder / 'text_encoder')
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(['a red circle', 'two blue squares', 'one green triangle'] * 8),
                                 model_writer=buf, vocab_size=32, model_type='bpe', pad_id=0, unk_id=1, eos_id=2,
                                 bos_id=-1, minloglevel=2)
  ECDiTTokenizer(buf.getvalue(), TINY['text_length']).save_pretrained(folder / 'tokenizer')
  diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(folder / 'scheduler')
  index = {'_class_name': ['pipeline_ecdit', 'ECDiTPipeline'], '_diffusers_version': diffusers.__version__,
           'transformer': ['transformer_ecdit', 'ECDiTTransformer2DModel'],
           'text_encoder': ['text_encoder_ecdit', 'ECDiTTextEncoder'],
           'tokenizer': ['tokenizer_ecdit', 'ECDiTTokenizer'],
           'scheduler': ['diffusers', 'FlowMatchEulerDiscreteScheduler'], 'vae': [None, None],
           'text_length': TINY['text_length']}
  (folder / 'model_index.json').write_text(json.dumps(index, indent=2))
  assert len(list((folder / 'transformer').glob('*.safetensors'))) > 1
  return folder


def test_good_folders_load(export_base, pipeline_base):
  model = ref.load_model(export_base)
  x, t = torch.zeros(1, 8, 8, 3), torch.full((1,), 0.5)
  assert model(x, t, torch.ones(1, 8, dtype=torch.long)).shape == (1, 8, 8, 3)
  pipe = loading.load_pipeline(pipeline_base)
  images = pipe(['a red circle'], num_inference_steps=1, output_type='np').images
  assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()


def _json(name, **change):
  def damage(folder):
    conf = json.loads((folder / name).read_text())
    conf.update(change)
    (folder / name).write_text(json.dumps(conf))
  return damage


def _remove(name):
  return lambda folder: (shutil.rmtree if (folder / name).is_dir() else (folder / name).unlink)(folder / name)


def _first_shard(folder):
  return sorted((folder / 'transformer').glob('*.safetensors'))[0].name


PIPE_DAMAGE = {
    'num_heads_0': (_json('transformer/config.json', num_heads=0),
                    'transformer/config.json: num_heads=0 is invalid: expected a positive integer'),
    'patch_size_5': (_json('transformer/config.json', patch_size=5),
                     'transformer/config.json: image_size=8 is invalid: expected a multiple of patch_size=5'),
    'depth_200000': (_json('transformer/config.json', depth=200000), 'depth=200000, but the weights hold depth=2;'),
    'width_32768': (_json('transformer/config.json', width=32768), 'width=32768, but the weights hold width=32;'),
    'text_states_dim': (_json('transformer/config.json', text_states_dim=64),
                        "tensor 'text_proj.weight' has shape [32, 32], but config.json implies [32, 64]"),
    'transformer_truncated': (_truncate('transformer/config.json', 30), 'transformer/config.json is not a readable '
                                                                        'JSON file'),
    'text_depth': (_json('text_encoder/config.json', text_depth=3), 'text_depth=3, but the weights hold text_depth=1;'),
    'text_heads': (_json('text_encoder/config.json', text_heads=5),
                   'text_encoder/config.json: text_width=32 is invalid: expected a multiple of text_heads=5'),
    'no_scheduler': (_remove('scheduler'), "scheduler is missing: model_index.json lists scheduler=['diffusers', "
                                           "'FlowMatchEulerDiscreteScheduler'], so the export is incomplete"),
    'no_tokenizer': (_remove('tokenizer'), 'tokenizer is missing: model_index.json lists tokenizer='),
    'no_transformer': (_remove('transformer'), 'transformer is missing: model_index.json lists transformer='),
    'no_text_encoder': (_remove('text_encoder'), 'text_encoder is missing: model_index.json lists text_encoder='),
    'no_shard': (lambda f: (f / 'transformer' / _first_shard(f)).unlink(), 'which is not a file in'),
    'no_index': (_remove('transformer/diffusion_pytorch_model.safetensors.index.json'),
                 'diffusion_pytorch_model.safetensors is missing (and no diffusion_pytorch_model.safetensors.index'
                 '.json): the export is incomplete'),
    'no_scheduler_entry': (_json('model_index.json', scheduler=None), 'model_index.json: no "scheduler" component'),
    'bad_class': (_json('model_index.json', scheduler=['diffusers', 'NoSuchScheduler']),
                  "component scheduler=['diffusers', 'NoSuchScheduler'] is neither"),
    'class_list': (_json('model_index.json', tokenizer=['tokenizer_ecdit', ['ECDiTTokenizer']]),
                   "component tokenizer=['tokenizer_ecdit', ['ECDiTTokenizer']] is neither"),
    'index_list': (_write('model_index.json', '[1, 2]'), 'model_index.json: expected a JSON object, got list'),
}


@pytest.mark.parametrize('kind', list(PIPE_DAMAGE))
def test_damaged_pipeline_is_one_line_before_loading(pipeline_base, tmp_path, kind, monkeypatch):
  damage, message = PIPE_DAMAGE[kind]
  pipe_dir = shutil.copytree(pipeline_base, tmp_path / 'pipe')
  damage(pipe_dir)
  for cls in (ECDiTTransformer2DModel, ECDiTTextEncoder, ECDiTTokenizer, diffusers.FlowMatchEulerDiscreteScheduler):
    monkeypatch.setattr(cls, 'from_pretrained', _not_reached)
  with pytest.raises(ref.ExportError) as e:
    loading.load_pipeline(pipe_dir)
  text = str(e.value)
  assert message in text and str(pipe_dir) in text and '\n' not in text and 'huggingface' not in text, text


@pytest.mark.parametrize('damage, message', [
    (_remove('scheduler/scheduler_config.json'), 'scheduler: cannot load it as FlowMatchEulerDiscreteScheduler'),
    (_write('tokenizer/tokenizer_config.json', '{}'), 'expected "model_max_length" to be a positive integer'),
    (_write('tokenizer/tokenizer.model', 'not a model'), 'tokenizer.model is not a sentencepiece model'),
])
def test_damaged_component_files_are_one_line_and_local(pipeline_base, tmp_path, damage, message):
  """Past the weight checks, a component's own loader (diffusers', ecdit_torch's tokenizer) fails: one line
  naming the folder, and no word of the Hub (the loaders are called with local_files_only)."""
  pipe_dir = shutil.copytree(pipeline_base, tmp_path / 'pipe')
  damage(pipe_dir)
  with pytest.raises(ref.ExportError) as e:
    loading.load_pipeline(pipe_dir)
  text = str(e.value)
  assert message in text and str(pipe_dir) in text and '\n' not in text and 'huggingface' not in text, text
