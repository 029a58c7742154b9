"""End to end through the real-data path: `ecdit prepare` (VAE latents + T5 text states), `ecdit train` and
`ecdit sample` on a tiny image folder, with tiny random-weight AutoencoderKL / T5 folders written with numpy
(tests/_hf_folders.py: no torch needed); then the run exported to diffusers against `ecdit sample` (with torch).

Every command runs in its own process (tests/cli_util.py), the export check in this one.
"""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from cli_util import run_cli
from ecdit.models.vae import VAEConfig
from test_data_folder import write_image
from _hf_folders import write_t5, write_vae

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('e2e')
  # 4 levels: 8× down, so 64 px → 8×8×4 latents
  write_vae(root / 'vae', VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                                    norm_num_groups=4))
  write_t5(root / 't5', vocab=48, d_model=16, d_kv=8, d_ff=32, layers=1, heads=2)
  images = root / 'images'
  images.mkdir()
  words = ['red', 'green', 'blue', 'big', 'small']
  for i in range(5):
    write_image(images / f'img{i}.png', size=(64, 64), color=(50 * i, 100, 200 - 40 * i))
    (images / f'img{i}.txt').write_text(f'a {words[i]} thing')
  exp = root / 'tiny_itl.py'
  exp.write_text(f'''
import importlib.util
_spec = importlib.util.spec_from_file_location('itl', {str(REPO / 'experiments' / 'image_text_latent.py')!r})
_itl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_itl)


def get_config():
  c = _itl.get_config('t5')
  c.name = 'tiny_itl'
  m = c.model
  m.size, m.num_experts, m.dtype = 'tiny', 4, 'float32'
  m.image_size, m.in_channels, m.patch_size, m.text_states_dim, m.text_length = 8, 4, 2, 16, 8
  d = c.data
  d.dir, d.source_dir = {str(root / 'data')!r}, {str(images)!r}
  d.vae_dir, d.text_encoder_dir = {str(root / 'vae')!r}, {str(root / 't5')!r}
  d.image_size, d.num_validation_examples, d.text_length, d.worker_count = 64, 1, 8, 0
  d.caption_dropout = 0.5
  t = c.train
  t.num_steps, t.batch_size, t.warmup_steps, t.log_every, t.checkpoint_every = 2, 2, 0, 1, 2
  t.sample_every, t.async_checkpoints = 0, False
  c.sample.num_steps, c.sample.prompts = 2, 'a red thing;a blue thing'
  c.mesh.data = 1
  return c
''')
  return root, exp


def _png_size(path):
  with Image.open(path) as im:
    return im.size


@pytest.mark.slow
def test_prepare_train_sample_with_vae_and_t5(setup):
  root, exp = setup
  proc = run_cli('prepare', f'--config={exp}', check=True)
  encoded = [p for p in (root / 'data' / 'image_text_folder').iterdir() if '_enc_' in p.name]
  assert len(encoded) == 1, proc.stdout
  info = json.loads((encoded[0] / '1.0.0' / 'features.json').read_text())
  text = json.dumps(info)
  assert 'latent' in text and 'text_states' in text
  assert (encoded[0] / '1.0.0' / 'null_text.npz').is_file()
  assert not list((encoded[0] / '1.0.0').glob('tokenizer_*.model'))   # the T5 folder brings its own

  wd = root / 'run'
  proc = run_cli('train', f'--config={exp}', f'--workdir={wd}', '--noprogress', check=True)
  assert 'trained to step 2' in proc.stdout
  preview = sorted((wd / 'samples').glob('step_*.png'))
  assert preview and _png_size(preview[-1])[0] > 64 * 2   # decoded to 64 px (scaled 2×), two prompts

  out = root / 'sample.png'
  proc = run_cli('sample', f'--workdir={wd}', '--prompts=a green thing', '--steps=2', f'--out={out}',
                 check=True)
  img = np.asarray(Image.open(out))
  assert img.dtype == np.uint8 and img.shape[0] == 64 * 2 + 4   # one 64 px image (2×) in the grid padding

  # `ecdit eval` scores the VAE-decoded RGB images of the latent run.
  res = root / 'eval.json'
  run_cli('eval', f'--workdir={wd}', '--num_prompts=2', '--images_per_prompt=1', '--steps=2',
          '--max_failures=0', f'--out={res}', check=True)
  assert json.loads(res.read_text())['image_size'] == 64

  # The model config must agree with the frozen encoder: a clear one-line error before anything compiles.
  bad = run_cli('train', f'--config={exp}', f'--workdir={root / "bad"}', '--config.model.text_states_dim=24')
  assert bad.returncode != 0 and 'model.text_states_dim=24' in bad.stderr and 'Traceback' not in bad.stderr

  # Exported to diffusers, the run samples as `ecdit sample` does (here, not in a test of its own: with
  # `pytest -n 2` another worker would repeat the prepare + train).
  _check_diffusers_export(root, wd)


def _check_diffusers_export(root, wd):
  """The trained latent T5 run as a diffusers folder: T5EncoderModel + T5TokenizerFast from its T5 folder and its
  VAE, copied; the pipeline's prompt states and images (Euler, CFG, VAE-decoded) equal `ecdit sample`'s."""
  pytest.importorskip('torch')   # the steps above ran without it
  import ecdit_torch
  from test_diffusers_export import sampled_pixels
  from ecdit.export import diffusers as dexport
  from ecdit.train import workdir as workdir_lib
  run = workdir_lib.restore(wd)   # raw weights: the EMA of 2 steps is still near the init
  out = dexport.export_diffusers(wd, root / 'pipe', run=run)
  index = json.loads((out / 'model_index.json').read_text())
  assert index['text_encoder'] == ['transformers', 'T5EncoderModel']
  assert index['tokenizer'] == ['transformers', 'T5TokenizerFast']
  assert index['vae'] == ['diffusers', 'AutoencoderKL'] and index['text_encoder_uses_mask'] is True
  for sub, src, names in (('vae', 'vae', ('config.json', 'diffusion_pytorch_model.safetensors')),
                          ('text_encoder', 't5', ('config.json', 'model.safetensors'))):
    assert sorted(p.name for p in (out / sub).iterdir()) == sorted(names)
    assert all((out / sub / n).read_bytes() == (root / src / n).read_bytes() for n in names)
  assert (out / 'tokenizer' / 'spiece.model').read_bytes() == (root / 't5' / 'spiece.model').read_bytes()

  pipe = ecdit_torch.load_pipeline(out)
  prompts = ['a red thing', 'a blue thing', '']
  want_states, want_mask = run.tokenizer.encode_batch(prompts)   # ecdit's JAX T5, as `ecdit sample` encodes
  states, mask = pipe.encode_prompt(prompts, 'cpu')
  np.testing.assert_array_equal(mask.numpy(), want_mask)
  assert np.max(np.abs(states.numpy() - want_states)[want_mask]) <= 1e-5   # padding is masked: never read

  ref, noise = sampled_pixels(run, prompts[:2], seed=2, steps=2, scale=3.0)
  got = pipe(prompts[:2], num_inference_steps=2, guidance_scale=3.0, latents=noise, output_type='np').images
  assert got.shape == ref.shape == (2, 64, 64, 3)
  assert np.max(np.abs(ref[0] - ref[1])) > 1e-2   # the prompt matters: the check is not vacuous
  assert np.max(np.abs(got - ref)) <= 1e-4, np.max(np.abs(got - ref))


@pytest.mark.slow
def test_train_with_text_encoded_per_step(setup):
  root, exp = setup
  wd = root / 'run_otf'
  proc = run_cli('train', f'--config={exp}', f'--workdir={wd}', '--noprogress', '--config.train.num_steps=1',
                 '--config.train.final_sample=False', '--config.data.precompute_text=False', check=True)
  assert 'trained to step 1' in proc.stdout
