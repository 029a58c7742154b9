"""The Flax AutoencoderKL against diffusers' on tiny random weights; loading errors."""
import json
import shutil

import jax
import numpy as np
import pytest

from ecdit.models import vae as vae_lib
from ecdit.models.hf_loading import LoadError
from _hf_folders import write_vae

TINY = vae_lib.VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                         scaling_factor=0.5, shift_factor=0.1)


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_random_vae_shapes_without_torch():
  v = vae_lib.VAE.random(TINY)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = v.encode(x)
  assert z.shape == (2, 4, 4, 4) == (2,) + v.latent_shape(16)
  assert v.decode(z).shape == x.shape
  z1, z2 = v.encode(x, jax.random.PRNGKey(1)), v.encode(x, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(z1, z2)
  assert not np.allclose(z1, z)   # a posterior sample, not the mean
  with pytest.raises(ValueError, match=r'multiples of 4'):
    v.encode(np.zeros((1, 10, 10, 3), np.float32))
  with pytest.raises(ValueError, match=r'\[B, h, w, 4\]'):
    v.decode(np.zeros((1, 4, 4, 3), np.float32))


@pytest.fixture(scope='module')
def torch_vae(tmp_path_factory):
  torch = pytest.importorskip('torch', reason='parity tests need the torch extra (requirements-torch.txt)')
  diffusers = pytest.importorskip('diffusers', reason='parity tests need diffusers (requirements-torch.txt)')
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 3,
      up_block_types=('UpDecoderBlock2D',) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
      latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1).eval()
  with torch.no_grad():   # norms start at 1/0; perturb every parameter so the mapping is really tested
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp('vae')
  model.save_pretrained(folder)
  return torch, model, folder


def test_parity_with_diffusers(torch_vae):
  torch, model, folder = torch_vae
  v = vae_lib.load_vae(folder)
  assert v.cfg == TINY
  x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    z_ref = ((dist.mean - 0.1) * 0.5).permute(0, 2, 3, 1).numpy()
    img_ref = model.decode(torch.from_numpy(z_ref).permute(0, 3, 1, 2) / 0.5 + 0.1).sample
  z = v.encode(x)
  assert _rel(z, z_ref) <= 1e-4
  assert _rel(v.decode(z_ref), img_ref.permute(0, 2, 3, 1).numpy()) <= 1e-4


@pytest.fixture(scope='module')
def vae_files(tmp_path_factory):
  """A TINY folder written with numpy (no torch): loading and its errors need only the files."""
  return write_vae(tmp_path_factory.mktemp('np') / 'vae', TINY)


def test_legacy_attention_names_load(vae_files, tmp_path):
  folder = vae_files
  assert vae_lib.load_vae(folder).cfg == TINY
  from safetensors.numpy import load_file, save_file   # pylint: disable=import-outside-toplevel
  tensors = load_file(str(folder / vae_lib.WEIGHTS_FILE))
  legacy = {}
  for k, val in tensors.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
      k = k.replace(f'.attentions.0.{new}.', f'.attentions.0.{old}.')
    legacy[k] = val
  shutil.copy(folder / 'config.json', tmp_path / 'config.json')
  save_file(legacy, str(tmp_path / vae_lib.WEIGHTS_FILE))
  x = np.random.RandomState(1).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(vae_lib.load_vae(tmp_path).encode(x), vae_lib.load_vae(folder).encode(x))


def _copy_with_config(src, dst, **changes):
  shutil.copy(src / vae_lib.WEIGHTS_FILE, dst / vae_lib.WEIGHTS_FILE)
  cfg = json.loads((src / 'config.json').read_text())
  cfg.update(changes)
  (dst / 'config.json').write_text(json.dumps(cfg))
  return dst


def test_loading_errors(vae_files, tmp_path):
  folder = vae_files
  with pytest.raises(LoadError, match='does not exist'):
    vae_lib.load_vae(tmp_path / 'nowhere')
  (tmp_path / 'a').mkdir()
  shutil.copy(folder / 'config.json', tmp_path / 'a' / 'config.json')
  with pytest.raises(LoadError, match='diffusion_pytorch_model.safetensors is missing'):
    vae_lib.load_vae(tmp_path / 'a')
  (tmp_path / 'b').mkdir()
  shutil.copy(folder / vae_lib.WEIGHTS_FILE, tmp_path / 'b')
  with pytest.raises(LoadError, match='config.json is missing'):
    vae_lib.load_vae(tmp_path / 'b')
  (tmp_path / 'c').mkdir()
  with pytest.raises(LoadError, match=r'tensor encoder\.down_blocks\.0\.resnets\.1\.norm1\.weight is missing'):
    vae_lib.load_vae(_copy_with_config(folder, tmp_path / 'c', layers_per_block=2))
  (tmp_path / 'd').mkdir()
  with pytest.raises(LoadError, match=r'tensor encoder\.conv_in\.weight .* has shape \(8, 3, 3, 3\)'):
    vae_lib.load_vae(_copy_with_config(folder, tmp_path / 'd', block_out_channels=[16, 16, 16]))
  (tmp_path / 'e').mkdir()
  with pytest.raises(LoadError, match=r'tensor decoder\.mid_block\.attentions\.0\..* is not part of the model'):
    vae_lib.load_vae(_copy_with_config(folder, tmp_path / 'e', mid_block_add_attention=False))
  (tmp_path / 'f').mkdir()
  with pytest.raises(LoadError, match='act_fn'):
    vae_lib.load_vae(_copy_with_config(folder, tmp_path / 'f', act_fn='relu'))
