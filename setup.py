"""ecdit: EC-DiT (expert-choice diffusion transformers) in JAX/Flax."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith('#')]


setuptools.setup(
    name='ecdit',
    version='0.1.0',
    description='EC-DiT: text-to-image diffusion transformers with expert-choice MoE, in JAX/Flax.',
    python_requires='>=3.11,<3.12',
    packages=setuptools.find_packages(include=['ecdit', 'ecdit.*']),
    install_requires=_requirements('requirements.txt'),
    extras_require={'test': _requirements('requirements-test.txt'),
                    'torch': _requirements('requirements-torch.txt')},   # parity tests only
    entry_points={'console_scripts': ['ecdit=ecdit.cli:run']},
)
