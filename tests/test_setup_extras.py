"""setup.py: the accelerator extras pin jax to requirements.txt's release; ecdit_torch is packaged."""
from __future__ import annotations

import runpy
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[1]


def setup_kwargs(monkeypatch) -> dict:
  """The keyword arguments setup.py passes to setuptools.setup (captured, nothing built)."""
  seen = {}
  monkeypatch.setattr(setuptools, 'setup', lambda **kw: seen.update(kw))
  monkeypatch.chdir(REPO)
  runpy.run_path(str(REPO / 'setup.py'), run_name='__main__')
  return seen


def test_accelerator_extras_pin_the_required_jax(monkeypatch):
  kw = setup_kwargs(monkeypatch)
  pins = [l.strip() for l in (REPO / 'requirements.txt').read_text().splitlines() if l.startswith('jax[')]
  assert pins == ['jax[cpu]==0.10.2']
  extras = kw['extras_require']
  assert extras['cuda12'] == ['jax[cuda12]==0.10.2']
  assert extras['tpu'] == ['jax[tpu]==0.10.2']
  assert 'jaxlib==0.10.2' in kw['install_requires']   # the accelerator plugins require this same jaxlib
  assert set(extras) >= {'test', 'torch', 'cuda12', 'tpu'}


def test_ecdit_torch_is_packaged(monkeypatch):
  kw = setup_kwargs(monkeypatch)
  assert 'ecdit_torch' in kw['packages'] and 'ecdit' in kw['packages'] and 'ecdit.export' in kw['packages']


def test_test_extra_pins_pyyaml(monkeypatch):
  """tests/test_launch.py parses the rendered GKE manifests back with PyYAML and imports it unconditionally."""
  import importlib.metadata   # pylint: disable=import-outside-toplevel
  kw = setup_kwargs(monkeypatch)
  pins = [r for r in kw['extras_require']['test'] if r.lower().startswith('pyyaml')]
  assert pins == ['PyYAML==6.0.4']
  assert importlib.metadata.version('PyYAML') == '6.0.4'
