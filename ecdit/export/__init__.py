"""Export of EC-DiT checkpoints: safetensors + PyTorch reference, JAX re-import, StableHLO, upcycling.

    ecdit.export.load_jax(export_dir)        # JAX velocity callable from an `ecdit export` directory
    ecdit.export.torch_reference.load_model  # the same model in plain PyTorch (no JAX import)

This package file imports nothing heavy: `load_jax` and friends are resolved on first use, so importing
`ecdit.export.torch_reference` never pulls in JAX.
"""
_LAZY = {
    'load_jax': 'ecdit.export.jax_model',
    'load_params': 'ecdit.export.weights',
    'write_export': 'ecdit.export.weights',
    'ExportError': 'ecdit.export.weights',
    'load_stablehlo': 'ecdit.export.stablehlo',
    'upcycle_params': 'ecdit.export.upcycle',
    'export_diffusers': 'ecdit.export.diffusers',
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
