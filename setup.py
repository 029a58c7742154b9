"""ecdit: EC-DiT (expert-choice diffusion transformers) in JAX/Flax."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith('#')]


def _jax_version():
  """The jax pin of requirements.txt (`jax[cpu]==X`): the accelerator extras pin the same release."""
  pins = [r.split('==', 1)[1] for r in _requirements('requirements.txt') if r.startswith('jax[') and '==' in r]
  if len(pins) != 1:
    raise RuntimeError(f'requirements.txt must pin jax exactly once as jax[...]==X, found {pins}')
  return pins[0]


setuptools.setup(
    name='ecdit',
    version='0.1.0',
    description='EC-DiT: text-to-image diffusion transformers with expert-choice MoE, in JAX/Flax.',
    python_requires='>=3.11,<3.12',
    packages=setuptools.find_packages(include=['ecdit', 'ecdit.*', 'ecdit_torch']),
    install_requires=_requirements('requirements.txt'),
    extras_require={'test': _requirements('requirements-test.txt'),
                    # parity tests, the diffusers export and ecdit_torch (PyTorch inference, no JAX import)
                    'torch': _requirements('requirements-torch.txt'),
                    # accelerators: jax's own extras at the pinned release (NVIDIA GPUs with CUDA 12; TPU VMs)
                    'cuda12': [f'jax[cuda12]=={_jax_version()}'],
                    'tpu': [f'jax[tpu]=={_jax_version()}']},
    entry_points={'console_scripts': ['ecdit=ecdit.cli:run']},
)
