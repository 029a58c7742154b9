"""The package's import graph: one-way, layer by layer (WORKSPACE "Layers"), no cycle, no hidden imports.

Parses every module under ecdit/ (nothing is imported), so it fails on the edit that adds a bad import.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'ecdit'

# Lowest first: a package may import its own layer's modules and any lower layer, never a higher one. Packages
# on one line are siblings and may not import each other.
LAYERS = [
    ('ecdit', 'ecdit.malloc', 'ecdit.errors'),   # stdlib only
    ('ecdit.outputs',),                          # stdlib + errors: the workdir and output guard
    ('ecdit.config',),                           # config keys, defaults, validation: no JAX
    ('ecdit.parallel',),                         # meshes, the logical-axis rules table: no models
    ('ecdit.layers',),                           # routing, MoE, attention, DiT blocks
    ('ecdit.models',),                           # EC-DiT, text encoders, VAE, parameter counts
    ('ecdit.data',),                             # datasets, tokenizer, pipeline (latents use models' VAE)
    ('ecdit.diffusion',),                        # rectified flow, sampler
    ('ecdit.train',),                            # step, loop, checkpoints, restoring a run
    ('ecdit.eval', 'ecdit.export'),              # read trained runs; not each other
    ('ecdit.bench',),
    ('ecdit.commands',),                         # `ecdit <command>` mains: flags live only here
    ('ecdit.cli',),
]

# Function-level imports of ecdit modules, each with why it cannot be at the top: (module, imported) -> reason.
ALLOWED_LOCAL = {
    ('ecdit.commands.bench', 'ecdit.bench.mesh'): 'importing it asks XLA for simulated devices (that bench only)',
    ('ecdit.commands.bench', 'ecdit.bench.profile'): 'importing it sets the XLA dump flag (that bench only)',
    ('ecdit.commands.export', 'ecdit.export.diffusers'): 'needs torch + diffusers (the torch extra)',
    ('ecdit.bench.torch_calibration', 'ecdit.export.torch_reference'): 'imports torch, an optional extra',
    ('ecdit.export.weights', 'ecdit.models.ecdit'): 'the name table and files serve PyTorch-only code: no JAX',
    ('ecdit.export.weights', 'ecdit.models.stack'): 'the name table and files serve PyTorch-only code: no JAX',
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix('').parts)
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob('*.py'))}


def _owner(name: str) -> str:
  """The module that `import name` loads (a function or class imported from a module names its module)."""
  while name and name not in MODULES:
    name = name.rpartition('.')[0]
  return name


def _imports(module: str):
  """(imported module, line, inside a function?) for every ecdit import of `module`."""
  tree = ast.parse(MODULES[module].read_text())
  found = []

  def visit(node, local):
    for child in ast.iter_child_nodes(node):
      inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        assert child.level == 0, f'{module}:{child.lineno}: relative import; write the absolute ecdit path'
        names = [f'{child.module}.{a.name}' for a in child.names]
      for n in names:
        if n == 'ecdit' or n.startswith('ecdit.'):
          found.append((_owner(n), child.lineno, inner))
      visit(child, inner)
  visit(tree, False)
  return found


EDGES = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
  best = None
  for i, group in enumerate(LAYERS):
    for pkg in group:
      if (module == pkg or module.startswith(pkg + '.')) and (best is None or len(pkg) > len(best[1])):
        best = (i, pkg)
  assert best is not None, f'{module} is in no layer: add its package to LAYERS (and to WORKSPACE)'
  return best


def test_every_module_has_a_layer():
  for m in MODULES:
    _layer(m)


def _layer_violations(edges):
  bad = []
  for m, found in edges.items():
    lm, pm = _layer(m)
    for target, line, _ in found:
      lt, pt = _layer(target)
      if lt > lm or (lt == lm and pt != pm and pt != 'ecdit'):
        bad.append(f'{m}:{line} imports {target} ({LAYERS[lt]} is not below {LAYERS[lm]})')
  return bad


def test_imports_follow_the_layer_order():
  bad = _layer_violations(EDGES)
  assert not bad, '\n'.join(bad)


def test_no_function_level_imports_but_the_listed_ones():
  bad = [f'{m}:{line} imports {t} inside a function' for m, edges in EDGES.items() for t, line, local in edges
         if local and (m, t) not in ALLOWED_LOCAL]
  assert not bad, '\n'.join(bad)
  used = {(m, t) for m, edges in EDGES.items() for t, _, local in edges if local}
  assert not set(ALLOWED_LOCAL) - used, f'stale ALLOWED_LOCAL entries: {set(ALLOWED_LOCAL) - used}'


def _find_cycle(graph):
  """One import cycle of `graph` {module: [imported modules]} as a list (first == last), or None."""
  state, stack = {}, []

  def dfs(m):
    state[m] = 'open'
    stack.append(m)
    for t in graph.get(m, ()):
      if state.get(t) == 'open':
        return stack[stack.index(t):] + [t]
      if t not in state and (cycle := dfs(t)):
        return cycle
    stack.pop()
    state[m] = 'done'
    return None
  for m in graph:
    if m not in state and (cycle := dfs(m)):
      return cycle
  return None


def test_no_import_cycle():
  cycle = _find_cycle({m: sorted({t for t, _, _ in edges if t != m}) for m, edges in EDGES.items()})
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_checks_catch_a_cycle_and_an_upward_import():
  assert _find_cycle({'a': ['b'], 'b': ['c'], 'c': ['a'], 'd': []}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': ['b'], 'b': [], 'c': ['a', 'b']}) is None
  assert _layer_violations({'ecdit.layers.dit': [('ecdit.models.ecdit', 3, False)]})
  assert _layer_violations({'ecdit.eval.compare': [('ecdit.export.weights', 3, False)]})   # siblings
  assert not _layer_violations({'ecdit.models.ecdit': [('ecdit.layers.dit', 3, False), ('ecdit', 1, False)]})


def test_no_library_module_defines_a_flag():
  bad = [f'{m}: defines absl flags' for m, p in MODULES.items()
         if not m.startswith('ecdit.commands') and m != 'ecdit.cli'
         and any(tok in p.read_text() for tok in ('flags.DEFINE_', 'config_flags.DEFINE_'))]
  assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('source, want', [
    ('from ecdit.train import loop\n', 'ecdit.train.loop'),
    ('import ecdit.layers.moe\n', 'ecdit.layers.moe'),
    ('from ecdit.models.ecdit import init_params\n', 'ecdit.models.ecdit'),
])
def test_the_parser_sees_imports(tmp_path, monkeypatch, source, want):
  """The checks above are only as good as the parser: it must resolve each import form to its module."""
  monkeypatch.setitem(MODULES, 'ecdit.config.probe', tmp_path / 'probe.py')
  (tmp_path / 'probe.py').write_text('def f():\n  ' + source.replace('\n', '\n  ') + '\n' + source)
  got = _imports('ecdit.config.probe')
  assert [(t, local) for t, _, local in got] == [(want, True), (want, False)]
