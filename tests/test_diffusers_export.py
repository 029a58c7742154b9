"""`export_diffusers`: the diffusers folder of a run, loaded by ecdit_torch and by diffusers' own custom-code path,
against the JAX model and sampler (velocity, sampled images, expert tensors), and its bad input.

The runs are workdirs as `ecdit train` leaves them (config.json + one checkpoint), with perturbed step-0
params instead of training, so every layer computes something non-trivial; the tokenizer is a real sentencepiece
model trained on a few captions. Skips without torch / diffusers (`pip install -e .[torch]`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch is not installed (pip install -e .[torch])')
pytest.importorskip('diffusers', reason='diffusers is not installed (pip install -e .[torch])')

from _train_util import saved_workdir, tiny_config  # noqa: E402
from ecdit.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from ecdit.diffusion import sampler as sampler_lib  # noqa: E402
from ecdit.export import diffusers as dexport  # noqa: E402
from ecdit.export.weights import ExportError  # noqa: E402

import ecdit_torch  # noqa: E402

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)

ROUTINGS = {
    'ec': dict(routing='expert_choice', capacity_factor=2.0),
    'tc': dict(routing='token_choice', top_k=2, capacity_factor=1.0),
    'dense': dict(routing='dense'),
}
PROMPTS = ['a red circle', 'two blue squares to the left of a green triangle', '']
CAPTIONS = [f'{n} {c} {s}' for n in ('a', 'one', 'two', 'three') for c in ('red', 'green', 'blue', 'yellow')
            for s in ('circle', 'square', 'triangle', 'squares', 'circles')] + ['to the left of', 'above', 'below']


@pytest.fixture(scope='module')
def tokenizer_file(tmp_path_factory):
  return train_sentencepiece(CAPTIONS * 4, 48, tmp_path_factory.mktemp('tok') / 'tok.model')


def make_workdir(root, tokenizer_file, **model):
  """A tiny run's workdir with one checkpoint (step 4) of perturbed step-0 params (EMA = 0.5·params)."""
  cfg = tiny_config()
  for k, v in model.items():
    cfg.model[k] = v
  cfg.data.tokenizer_path = str(tokenizer_file)
  cfg.sample.cfg_scale = 3.0
  saved_workdir(root / 'run', cfg, step=4, seed=7)
  return root / 'run'


@pytest.fixture(scope='module')
def export_of(tmp_path_factory, tokenizer_file):
  """name → (name, restored EMA run, exported folder), each built once per module."""
  from ecdit.train import workdir as workdir_lib
  cache = {}

  def get(name):
    if name not in cache:
      root = tmp_path_factory.mktemp(name)
      workdir = make_workdir(root, tokenizer_file, **ROUTINGS[name])
      run = workdir_lib.restore(workdir, ema=True)
      # A tiny shard limit, so the transformer is written sharded with an index, as a large model would be.
      cache[name] = name, run, dexport.export_diffusers(workdir, root / 'pipe', ema=True, max_shard_size='200KB')
    return cache[name]
  return get


@pytest.fixture(scope='module', params=list(ROUTINGS))
def exported(request, export_of):
  return export_of(request.param)


def jax_text(run, prompts):
  ids, mask = Tokenizer(run.tokenizer_path, run.model_config.text_length).encode_batch(prompts)
  return jnp.asarray(ids), jnp.asarray(mask)


def jax_images(run, prompts, noise_nhwc, steps, scale):
  """`ecdit sample`'s integration (sampler.integrate, Euler + CFG) from given noise → [0, 1] pixels."""
  ids, mask = jax_text(run, prompts)
  null_ids, null_mask = jax_text(run, [''])
  apply_fn = lambda p, x, t, i, m: run.model.apply({'params': p}, x, t, i, m, train=False)  # noqa: E731
  x = sampler_lib.integrate(apply_fn, run.params, jnp.asarray(noise_nhwc), ids, mask, null_ids, null_mask,
                            num_steps=steps, cfg_scale=scale)
  return (np.clip(np.asarray(x), -1.0, 1.0) + 1.0) / 2.0


def test_folder_layout(exported):
  _, run, out = exported
  index = json.loads((out / 'model_index.json').read_text())
  assert index['_class_name'] == ['pipeline_ecdit', 'ECDiTPipeline']
  assert index['scheduler'] == ['diffusers', 'FlowMatchEulerDiscreteScheduler'] and index['vae'] == [None, None]
  assert index['default_num_inference_steps'] == run.cfg.sample.num_steps
  t = out / 'transformer'
  shards = sorted(p.name for p in t.glob('*.safetensors'))
  assert len(shards) > 1 and (t / 'diffusion_pytorch_model.safetensors.index.json').is_file()
  assert not list(out.rglob('*.bin')) and not list(out.rglob('*.pt')) and not list(out.rglob('*.pkl'))
  card = (out / 'README.md').read_text()
  assert 'trust_remote_code=True' in card and 'ecdit_torch.load_pipeline' in card
  assert json.loads((out / 'ecdit_export.json').read_text())['source']['step'] == 4
  umask = os.umask(0)
  os.umask(umask)   # readable like any file the user writes (mkdtemp would leave 0700, safetensors 0600)
  assert {p.stat().st_mode & 0o777 for p in [out, *out.rglob('*')]} == {0o777 & ~umask, 0o666 & ~umask}


def _transformer_tensors(folder):
  from safetensors.numpy import load_file
  tensors = {}
  for shard in sorted((folder / 'transformer').glob('*.safetensors')):
    tensors.update(load_file(str(shard)))
  return tensors


def test_every_expert_is_present_distinct_and_equal_to_jax(exported):
  name, run, out = exported
  mcfg = run.model_config
  tensors = _transformer_tensors(out)
  sparse = [i for i in range(mcfg.depth) if mcfg.is_sparse_block(i)]
  assert bool(sparse) == (name != 'dense')
  for i in range(mcfg.depth):
    jp = run.params[f'block_{i}']
    if i not in sparse:
      assert f'blocks.{i}.ffn.wi.weight' in tensors and not any(k.startswith(f'blocks.{i}.moe') for k in tensors)
      continue
    moe = jp['moe']
    e, d, h = mcfg.num_experts, mcfg.width, mcfg.mlp_ratio * mcfg.width
    wi, wo = tensors[f'blocks.{i}.moe.wi.weight'], tensors[f'blocks.{i}.moe.wo.weight']
    assert wi.shape == (e, h, d) and wo.shape == (e, d, h)
    assert tensors[f'blocks.{i}.moe.wi.bias'].shape == (e, h) and tensors[f'blocks.{i}.moe.wo.bias'].shape == (e, d)
    np.testing.assert_array_equal(tensors[f'blocks.{i}.moe.router.weight'], np.asarray(moe['router']).T)
    for x in range(e):   # Flax stores [E, in, out]; the file [E, out, in].
      np.testing.assert_array_equal(wi[x], np.asarray(moe['wi'][x]).T)
      np.testing.assert_array_equal(wo[x], np.asarray(moe['wo'][x]).T)
      np.testing.assert_array_equal(tensors[f'blocks.{i}.moe.wi.bias'][x], np.asarray(moe['bi'][x]))
      for y in range(x):
        assert not np.array_equal(wi[x], wi[y]) and not np.array_equal(wo[x], wo[y])


def test_velocity_parity_with_jax(exported):
  _, run, out = exported
  mcfg = run.model_config
  pipe = ecdit_torch.load_pipeline(out)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, mcfg.image_size, mcfg.image_size, mcfg.in_channels)).astype(np.float32)
  t = np.array([0.9, 0.5, 0.1], np.float32)
  ids, mask = jax_text(run, PROMPTS)
  ref = np.asarray(run.model.apply({'params': run.params}, jnp.asarray(x), jnp.asarray(t), ids, mask, train=False))
  assert np.max(np.abs(ref)) > 1e-2
  with torch.no_grad():
    states, tmask = pipe.encode_prompt(PROMPTS, 'cpu')
    np.testing.assert_array_equal(tmask.numpy(), np.asarray(mask))
    v = pipe.transformer(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), states, tmask).sample
  got = v.permute(0, 2, 3, 1).numpy()
  assert np.max(np.abs(got - ref)) <= 1e-4, np.max(np.abs(got - ref))


def test_sampled_images_match_jax_sampler(exported):
  _, run, out = exported
  mcfg = run.model_config
  pipe = ecdit_torch.load_pipeline(out)
  noise = np.array(jax.random.normal(jax.random.key(3), (2, mcfg.image_size, mcfg.image_size, mcfg.in_channels)))
  ref = jax_images(run, PROMPTS[:2], noise, steps=3, scale=3.0)
  got = pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=3.0,
             latents=torch.from_numpy(noise).permute(0, 3, 1, 2), output_type='np').images
  assert got.shape == ref.shape
  assert np.std(ref) > 1e-3
  assert np.max(np.abs(got - ref)) <= 1e-4, np.max(np.abs(got - ref))
  # PIL output, the seeded generator and the defaults (the run's sample.num_steps / cfg_scale) work too.
  pil = pipe('a red circle', generator=torch.Generator().manual_seed(0)).images
  assert len(pil) == 1 and pil[0].size == (mcfg.image_size, mcfg.image_size)


def test_tokenizer_matches_ecdit(exported):
  _, run, out = exported
  tok = ecdit_torch.ECDiTTokenizer.from_pretrained(out / 'tokenizer')
  long = ' '.join(['two red circles above'] * 20)   # longer than text_length: cut, then the end id
  ids, mask = Tokenizer(run.tokenizer_path, run.model_config.text_length).encode_batch(PROMPTS + [long])
  enc = tok(PROMPTS + [long])
  np.testing.assert_array_equal(enc['input_ids'].numpy(), ids)
  np.testing.assert_array_equal(enc['attention_mask'].numpy(), mask)


def test_diffusers_custom_code_loading_without_ecdit(export_of, tmp_path):
  """DiffusionPipeline.from_pretrained(trust_remote_code=True) in a process where ecdit and ecdit_torch cannot
  be imported gives the same images as ecdit_torch.load_pipeline."""
  _, run, out = export_of('ec')
  mcfg = run.model_config
  noise = np.array(jax.random.normal(jax.random.key(5), (1, mcfg.in_channels, mcfg.image_size, mcfg.image_size)))
  np.save(tmp_path / 'noise.npy', noise)
  code = f'''
import sys
sys.modules["ecdit"] = sys.modules["ecdit_torch"] = None   # importing either now fails
import numpy as np, torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(pipe).__name__ == "ECDiTPipeline", type(pipe)
noise = torch.from_numpy(np.load({str(tmp_path / "noise.npy")!r}))
img = pipe(["a red circle"], num_inference_steps=2, guidance_scale=2.0, latents=noise, output_type="np").images
np.save({str(tmp_path / "img.npy")!r}, img)
'''
  env = {'HF_MODULES_CACHE': str(tmp_path / 'modules'), 'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1',
         'HOME': str(tmp_path), 'PATH': '/usr/bin:/bin'}
  subprocess.run([sys.executable, '-c', code], check=True, timeout=300, env=env, cwd=tmp_path)
  pipe = ecdit_torch.load_pipeline(out)
  want = pipe(['a red circle'], num_inference_steps=2, guidance_scale=2.0, latents=torch.from_numpy(noise),
              output_type='np').images
  np.testing.assert_array_equal(np.load(tmp_path / 'img.npy'), want)


def test_ecdit_torch_imports_no_jax(export_of):
  _, _, out = export_of('ec')
  code = (f'import sys, ecdit_torch; ecdit_torch.load_pipeline({str(out)!r}); '
          'bad = [m for m in sys.modules if m == "jax" or m.startswith(("jax.", "flax", "ecdit."))]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=300)


def test_transformer_config_keys_are_model_config_fields():
  from ecdit.config.model import ModelConfig
  assert set(dexport.TRANSFORMER_KEYS) <= set(ModelConfig.__dataclass_fields__)
  assert {'routing', 'num_experts', 'capacity_factor', 'eval_capacity_factor', 'routing_scope', 'group_size',
          'top_k', 'moe_every', 'num_kv_heads'} <= set(dexport.TRANSFORMER_KEYS)


# ---- bad input ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def ec_workdir(export_of):
  return export_of('ec')[1].workdir


def test_missing_checkpoint_is_one_line(tmp_path, ec_workdir):
  empty = tmp_path / 'run'
  empty.mkdir()
  (empty / 'config.json').write_text((ec_workdir / 'config.json').read_text())
  with pytest.raises(ExportError, match='no checkpoint in') as e:
    dexport.export_diffusers(empty, tmp_path / 'out')
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'out').exists()


def test_existing_out_needs_overwrite(tmp_path, ec_workdir):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(ExportError, match='exists and is not empty; pass --overwrite'):
    dexport.export_diffusers(ec_workdir, out)
  assert (out / 'keep.txt').read_text() == 'mine'
  dexport.export_diffusers(ec_workdir, out, overwrite=True)
  assert not (out / 'keep.txt').exists() and (out / 'model_index.json').is_file()


def test_out_inside_workdir_is_refused(ec_workdir):
  with pytest.raises(ExportError, match='is inside --workdir'):
    dexport.export_diffusers(ec_workdir, ec_workdir / 'pipe')
  assert not (ec_workdir / 'pipe').exists()


def test_batch_scope_is_refused_before_the_checkpoint_is_read(tmp_path, tokenizer_file):
  workdir = make_workdir(tmp_path, tokenizer_file, routing='expert_choice', routing_scope='batch')
  with pytest.raises(ExportError, match="routing_scope='batch' cannot be exported") as e:
    dexport.export_diffusers(workdir, tmp_path / 'out')
  assert '\n' not in str(e.value)


def test_groups_spanning_images_are_refused():
  import dataclasses
  from ecdit.config import experiment as config_lib
  cfg = tiny_config()
  base = config_lib.validate(cfg)   # 16 tokens per image
  dexport.reproducible(cfg, dataclasses.replace(base, routing_scope='group', group_size=8))
  with pytest.raises(ValueError, match='group_size=32 does not divide the 16 tokens'):
    dexport.reproducible(cfg, dataclasses.replace(base, routing_scope='group', group_size=32))
  # The pipeline routes as sampling does: training groups spanning images are fine when the inference ones
  # do not (and the reverse is refused).
  dexport.reproducible(cfg, dataclasses.replace(base, routing_scope='group', group_size=32, inference_group_size=8))
  with pytest.raises(ValueError, match='group_size=32 does not divide the 16 tokens'):
    dexport.reproducible(cfg, dataclasses.replace(base, routing_scope='group', group_size=8,
                                                  inference_group_size=32))


@pytest.mark.parametrize('key,value', [('depth', 200000), ('width', 32768), ('num_experts', 3)])
def test_inconsistent_transformer_config_is_refused_before_allocating(export_of, tmp_path, key, value):
  """A config.json whose sizes disagree with the (sharded) weights: one ValueError naming the key, from the
  safetensors headers alone (width=32768 would otherwise allocate ~25 GB first)."""
  import shutil
  _, _, out = export_of('ec')
  bad = tmp_path / 'pipe'
  shutil.copytree(out, bad)
  conf_path = bad / 'transformer' / 'config.json'
  conf = json.loads(conf_path.read_text())
  right = conf[key]
  conf[key] = value
  conf_path.write_text(json.dumps(conf))
  with pytest.raises(ValueError, match=rf'{key}={value}, but the weights hold {key}={right};'):
    ecdit_torch.load_pipeline(bad)
