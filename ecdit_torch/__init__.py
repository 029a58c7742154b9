"""ecdit_torch: EC-DiT inference in PyTorch and diffusers, without JAX (`pip install ecdit[torch]`).

    import ecdit_torch
    pipe = ecdit_torch.load_pipeline('export/diffusers')        # a folder written by `ecdit export --format=diffusers`
    images = pipe(['a red circle'], num_inference_steps=25, guidance_scale=3.0).images

    model = ecdit_torch.load_model('export/safetensors')          # the bare reference model (`ecdit export`)

Modules (each also copied verbatim into exported diffusers folders, so the folder loads through diffusers'
custom-code path without this package): ecdit_reference.py (the model math, torch + safetensors only),
transformer_ecdit.py / text_encoder_ecdit.py / tokenizer_ecdit.py / pipeline_ecdit.py (the diffusers
components). loading.py builds a pipeline from a folder with these classes, no remote code.

Names resolve on first use, so importing the reference model never imports diffusers.
"""
_LAZY = {
    'load_model': 'ecdit_reference',
    'ECDiT': 'ecdit_reference',
    'ExportError': 'ecdit_reference',
    'ECDiTTransformer2DModel': 'transformer_ecdit',
    'ECDiTTextEncoder': 'text_encoder_ecdit',
    'ECDiTTokenizer': 'tokenizer_ecdit',
    'ECDiTPipeline': 'pipeline_ecdit',
    'load_pipeline': 'loading',
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
