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
diffusers = pytest.importorskip('diffusers', reason='diffusers is not installed (pip install -e .[torch])')

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


def make_workdir(root, tokenizer_file, data=(), sample=(), **model):
  """A tiny run's workdir with one checkpoint (step 4) of perturbed step-0 params (EMA = 0.5·params)."""
  cfg = tiny_config()
  for k, v in model.items():
    cfg.model[k] = v
  cfg.data.tokenizer_path = str(tokenizer_file)
  cfg.sample.cfg_scale = 3.0
  for section, values in (('data', data), ('sample', sample)):
    for k, v in dict(values).items():
      cfg[section][k] = v
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


def sampled_pixels(run, prompts, *, seed, steps, scale, method='euler'):
  """`ecdit sample`'s images as floats in [0, 1] (sampler.from_config + sample_prompts before the uint8
  rounding: the run's prompt encoder, its VAE decoder for latent runs) and the initial noise NCHW."""
  fn = sampler_lib.from_config(run.model, run.cfg.sample, clip=run.decode is None, num_steps=steps, cfg_scale=scale,
                               method=method)

  def as_jax(a):   # ids stay integers, text states floats (sampler._text_array)
    return jnp.asarray(a, jnp.int32 if np.issubdtype(np.asarray(a).dtype, np.integer) else jnp.float32)

  text, mask = run.tokenizer.encode_batch(list(prompts))
  null_text, null_mask = run.tokenizer.encode_batch([''])
  x = fn(run.params, as_jax(text), jnp.asarray(mask), as_jax(null_text), jnp.asarray(null_mask), seed)
  x = run.decode(x) if run.decode is not None else x
  mcfg = run.model_config
  noise = sampler_lib.initial_noise(seed, len(prompts), (mcfg.image_size, mcfg.image_size, mcfg.in_channels))
  pixels = (np.clip(np.asarray(x, np.float32), -1.0, 1.0) + 1.0) / 2.0
  return pixels, torch.from_numpy(np.array(noise)).permute(0, 3, 1, 2)


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


# ---- a run with a pretrained text encoder: CLIP in Stable Diffusion's layout, sampled with Heun ---------------

CLIP_LENGTH = 12   # of the tiny CLIP's 16 positions
CLIP_PROMPTS = ['A red cube left of a blue sphere!', 'two green cats', '', ' '.join(['two green cats'] * 10)]


@pytest.fixture(scope='module')
def clip_export(tmp_path_factory, tokenizer_file):
  """(SD-layout folder with text_encoder/ + tokenizer/, restored EMA run, exported folder) of a perturbed EC run
  that conditions on a tiny random CLIPTextModel's states and samples with Heun."""
  transformers = pytest.importorskip('transformers', reason='transformers is not installed (pip install -e .[torch])')
  from _hf_folders import write_clip_bpe
  from ecdit.train import workdir as workdir_lib
  root = tmp_path_factory.mktemp('clip')
  sd = root / 'sd'
  (sd / 'tokenizer').mkdir(parents=True)
  vocab = write_clip_bpe(sd / 'tokenizer')
  torch.manual_seed(0)
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)).eval()
  with torch.no_grad():
    for p in clip.parameters():   # layer norms start at 1: perturb everything
      p.add_(0.1 * torch.randn_like(p))
  clip.save_pretrained(sd / 'text_encoder')
  workdir = make_workdir(root, tokenizer_file, data={'text_encoder_dir': str(sd / 'text_encoder'),
                                                     'text_length': CLIP_LENGTH},
                         sample={'sampler': 'heun', 'prompts': 'a red cube;two green cats'},
                         text_encoder='precomputed', text_states_dim=32, **ROUTINGS['ec'])
  run = workdir_lib.restore(workdir, ema=True)
  return sd, run, dexport.export_diffusers(workdir, root / 'pipe', ema=True, run=run)


def test_pretrained_text_encoder_folder_layout(clip_export):
  sd, _, out = clip_export
  index = json.loads((out / 'model_index.json').read_text())
  assert index['text_encoder'] == ['transformers', 'CLIPTextModel']
  assert index['tokenizer'] == ['transformers', 'CLIPTokenizer']
  assert index['scheduler'] == ['diffusers', 'FlowMatchHeunDiscreteScheduler']   # the run's sample.sampler
  assert index['text_encoder_uses_mask'] is False and index['text_length'] == CLIP_LENGTH
  assert {p.name for p in (out / 'text_encoder').iterdir()} == {'config.json', 'model.safetensors'}
  for name in ('config.json', 'model.safetensors'):   # the folder the run used, byte for byte
    assert (out / 'text_encoder' / name).read_bytes() == (sd / 'text_encoder' / name).read_bytes()
  assert {p.name for p in (out / 'tokenizer').iterdir()} == {'vocab.json', 'merges.txt'}
  card = (out / 'README.md').read_text()
  assert '`CLIPTextModel` + `CLIPTokenizer`' in card and 'This folder\'s is `FlowMatchHeunDiscreteScheduler`' in card
  assert json.loads((out / 'ecdit_export.json').read_text())['source']['text_encoder_dir'] == str(sd / 'text_encoder')


def test_pretrained_prompt_states_match_ecdit(clip_export):
  """The pipeline's transformers CLIP gives the states ecdit's JAX CLIP gives `ecdit sample` (every position:
  unmasked CLIP's padding states are defined too), and the same mask."""
  _, run, out = clip_export
  pipe = ecdit_torch.load_pipeline(out)
  want_states, want_mask = run.tokenizer.encode_batch(CLIP_PROMPTS)
  states, mask = pipe.encode_prompt(CLIP_PROMPTS, 'cpu')
  np.testing.assert_array_equal(mask.numpy(), want_mask)
  assert want_mask[3].all() and want_mask[2].sum() == 2   # truncated to the text length; '' is start + end
  assert np.max(np.abs(states.numpy() - want_states)) <= 1e-5


def test_pretrained_images_match_ecdit_sample_with_heun(clip_export):
  """The exported scheduler (Heun, the run's sample.sampler) gives `ecdit sample --sampler=heun`'s images."""
  _, run, out = clip_export
  pipe = ecdit_torch.load_pipeline(out)
  prompts = ['a red cube', 'two green cats']
  ref, noise = sampled_pixels(run, prompts, seed=1, steps=3, scale=3.0, method='heun')
  got = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, latents=noise, output_type='np').images
  assert np.max(np.abs(got - ref)) <= 1e-4, np.max(np.abs(got - ref))
  # Not vacuous: the prompt changes the image, and Heun's differ from Euler's (the scheduler swapped as the
  # model card says; Euler's parity is the tests above), by far more than the tolerance.
  assert np.max(np.abs(ref[0] - ref[1])) > 1e-2
  pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
  euler = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, latents=noise, output_type='np').images
  assert np.max(np.abs(euler - ref)) > 1e-3


def test_a_tokenizer_that_encodes_otherwise_is_refused(clip_export):
  transformers = pytest.importorskip('transformers')
  from ecdit.export import text_folder
  sd, run, _ = clip_export
  tf = text_folder.inspect(run.cfg.data)
  assert tf.tokenizer_dir == (sd / 'tokenizer').resolve()   # Stable Diffusion's sibling tokenizer/ folder
  ours = text_folder.ecdit_tokenizer(tf, CLIP_LENGTH)
  probes = text_folder.probe_texts(run.cfg.sample.prompts, CLIP_LENGTH)
  text_folder.check_tokenizer(transformers.CLIPTokenizer.from_pretrained(sd / 'tokenizer'), ours, probes, sd)
  other_pad = transformers.CLIPTokenizer.from_pretrained(sd / 'tokenizer', pad_token='!')   # as SD 2's is
  with pytest.raises(ExportError, match=r"CLIPTokenizer in .* encodes 'a red cube' as ids \[") as e:
    text_folder.check_tokenizer(other_pad, ours, probes, sd)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('kind', ['clip', 't5'])
def test_text_encoder_of_a_bigger_checkpoint_is_extracted(tmp_path, kind):
  """A whole CLIPModel (vision tower too) or an encoder-decoder T5: text_encoder/ gets the text model alone,
  which transformers loads to the same outputs as the full model's text part."""
  transformers = pytest.importorskip('transformers')
  import ml_collections
  from safetensors import safe_open
  from _hf_folders import write_clip_bpe, write_spiece
  from ecdit.export import text_folder
  src = tmp_path / 'src'
  src.mkdir()
  torch.manual_seed(0)
  if kind == 'clip':
    vocab = write_clip_bpe(src)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=8)).eval()
    ids = torch.tensor([[vocab - 2, 5, 9, vocab - 1]])
    want = full.text_model(input_ids=ids).last_hidden_state
  else:
    full = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=48, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, feed_forward_proj='gated-gelu',
        relative_attention_num_buckets=8, relative_attention_max_distance=20)).eval()
    write_spiece(src)
    ids = torch.tensor([[5, 9, 11, 1]])
    want = full.encoder(input_ids=ids).last_hidden_state
  full.save_pretrained(src)
  tf = text_folder.inspect(ml_collections.ConfigDict({'text_encoder_dir': str(src)}))
  text_folder.write_text_encoder(tf, tmp_path / 'te')
  with safe_open(str(tmp_path / 'te' / 'model.safetensors'), framework='pt') as f:
    names = set(f.keys())
  assert names and all(text_folder.keeps(kind, n) for n in names)
  assert not any(n.startswith(('vision_model', 'decoder', 'lm_head', 'text_projection')) for n in names)
  model = getattr(transformers, tf.classes[0]).from_pretrained(tmp_path / 'te').eval()
  with torch.no_grad():
    np.testing.assert_allclose(model(input_ids=ids).last_hidden_state.numpy(), want.detach().numpy(), atol=1e-6)


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


@pytest.mark.parametrize('key', ['text_encoder_dir', 'vae_dir'])
def test_pickled_weights_are_refused_before_the_checkpoint_is_read(tmp_path, key):
  from ecdit.config import experiment as config_lib
  folder = tmp_path / 'model'
  folder.mkdir()
  text = key == 'text_encoder_dir'
  (folder / 'config.json').write_text(json.dumps({'model_type': 'clip_text_model'} if text else
                                                 {'_class_name': 'AutoencoderKL'}))
  (folder / ('pytorch_model.bin' if text else 'diffusion_pytorch_model.bin')).write_bytes(b'never unpickled')
  cfg = tiny_config()
  mcfg = config_lib.validate(cfg)
  cfg.data[key] = str(folder)   # reproducible() reads the folder, nothing else of the data section
  with pytest.raises(ExportError, match=rf'data\.{key}=.* holds only pickled weights \(\w+\.bin\); ecdit exports '
                     'safetensors only') as e:
    dexport.reproducible(cfg, mcfg)
  assert '\n' not in str(e.value)
