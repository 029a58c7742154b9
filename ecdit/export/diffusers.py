"""A trained run as a diffusers pipeline folder: `export_diffusers(workdir, out_dir)`.

    out/
      model_index.json            ["pipeline_ecdit", "ECDiTPipeline"] + one [module, class] per component
      pipeline_ecdit.py           the pipeline's code (ecdit_torch/pipeline_ecdit.py, copied)
      transformer/                config.json, diffusion_pytorch_model.safetensors (sharded + index above
                                  max_shard_size), transformer_ecdit.py + ecdit_reference.py (the code)
      text_encoder/, tokenizer/   ecdit's text transformer (+ code) and sentencepiece model (+ code), or the
                                  run's pretrained T5 / CLIP folder for transformers (ecdit/export/text_folder.py)
      scheduler/                  FlowMatchEuler- or FlowMatchHeunDiscreteScheduler (the run's sample.sampler), shift 1
                                  (the pipeline sets ecdit's grid)
      vae/                        the run's AutoencoderKL folder, copied (latent runs only)
      ecdit_export.json, README.md  where it came from; the model card

Load it with `ecdit_torch.load_pipeline(out)` (this package's classes), or without ecdit installed through
diffusers' custom-code loading: `DiffusionPipeline.from_pretrained(out, trust_remote_code=True)`.
The transformer's (and ecdit's text encoder's) weights are float32 safetensors; a VAE and a pretrained text
encoder are the run's safetensors, in their own dtype (the pipeline loads every model as float32, as ecdit
computes); nothing is pickled. The folder is written beside `out` and moved into place
at the end, so a failed export leaves no half-written folder.
"""
from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import diffusers
import ecdit_torch
from ecdit import outputs
from ecdit.config import data as data_config
from ecdit.config.model import ModelConfig
from ecdit.export import text_folder, weights
from ecdit.export.weights import ExportError
from ecdit.models.text import text_states_dim
from ecdit.models.vae import WEIGHTS_FILE as VAE_WEIGHTS
from ecdit.train import workdir as workdir_lib
from ecdit_torch.tokenizer_ecdit import ECDiTTokenizer
from ecdit_torch.text_encoder_ecdit import ECDiTTextEncoder
from ecdit_torch.transformer_ecdit import ECDiTTransformer2DModel

CODE_DIR = Path(ecdit_torch.__file__).parent
TEXT_PREFIX = 'text_encoder.'
DEFAULT_SHARD = '5GB'
# sample.sampler → the diffusers scheduler the pipeline integrates with on ecdit's grid (pipeline_ecdit.py).
SCHEDULERS = {'euler': 'FlowMatchEulerDiscreteScheduler', 'heun': 'FlowMatchHeunDiscreteScheduler'}
# What each own component's folder carries as code, for diffusers' custom-code loading.
CODE = {'': ['pipeline_ecdit.py'],
        'transformer': ['transformer_ecdit.py', 'ecdit_reference.py'],
        'text_encoder': ['text_encoder_ecdit.py', 'ecdit_reference.py'],
        'tokenizer': ['tokenizer_ecdit.py']}
# The ModelConfig fields the transformer component's config keeps (its __init__ arguments).
TRANSFORMER_KEYS = tuple(k for k in inspect.signature(ECDiTTransformer2DModel.__init__).parameters if k != 'self')


def reproducible(cfg, mcfg: ModelConfig) -> None:
  """Raises ValueError when the pipeline could not reproduce the run's routing or conditioning."""
  mcfg = mcfg.for_inference()   # the pipeline routes as sampling does
  if mcfg.routing != 'dense' and mcfg.routing_scope == 'batch':
    raise ValueError("model.routing_scope='batch' cannot be exported to a pipeline: each expert's capacity is "
                     'shared by the whole batch, so an image would depend on the batch it is generated in')
  if mcfg.routing != 'dense' and mcfg.routing_scope == 'group' and mcfg.num_tokens % mcfg.group_size:
    raise ValueError(f'model.group_size={mcfg.group_size} does not divide the {mcfg.num_tokens} tokens of an '
                     'image, so routing groups span images and an image would depend on its batch; not exportable')
  _vae_files(cfg.data)   # copied as they are: config.json + safetensors
  if data_config.option(cfg.data, 'text_encoder_dir'):
    text_folder.inspect(cfg.data)   # a transformers folder with safetensors weights and its tokenizer files
  elif mcfg.text_encoder != 'transformer':
    raise ValueError("model.text_encoder='precomputed' without data.text_encoder_dir: the text states' encoder "
                     'is unknown, so a pipeline could not encode prompts')


def _check_out(workdir: Path, out: Path, overwrite: bool) -> None:
  if out == workdir or workdir in out.parents:
    raise ExportError(f'--out={out} is inside --workdir={workdir}; choose a folder outside the training run')
  if out.exists() and not out.is_dir():
    raise ExportError(f'--out={out} exists and is not a directory')
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ExportError(f'--out={out} exists and is not empty; pass --overwrite to replace it')


def _copy_code(folder: Path, names) -> None:
  for name in names:
    shutil.copyfile(CODE_DIR / name, folder / name)


def _torch_tensors(tensors, prefix: str = '', keep=lambda name: True) -> dict:
  return {k[len(prefix):]: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()
          if k.startswith(prefix) and keep(k)}


def _save_model(model, state: dict, folder: Path, max_shard_size) -> None:
  model.load_state_dict(state, strict=True)
  model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)


def _own_tokenizer(run, mcfg: ModelConfig, workdir: Path) -> ECDiTTokenizer:
  if run.tokenizer_path is None:
    raise ExportError(f'--workdir={workdir}: the run\'s sentencepiece tokenizer file is missing '
                      '(data.tokenizer_path, or the one beside the prepared dataset)')
  try:
    tokenizer = ECDiTTokenizer(Path(run.tokenizer_path).read_bytes(), mcfg.text_length)
  except (RuntimeError, ValueError) as e:
    raise ExportError(f'{run.tokenizer_path}: not a usable sentencepiece tokenizer ({str(e).splitlines()[0]})') from None
  if tokenizer.vocab_size > mcfg.vocab_size:
    raise ExportError(f'{run.tokenizer_path} has {tokenizer.vocab_size} pieces but model.vocab_size='
                      f'{mcfg.vocab_size}; is it the run\'s tokenizer?')
  return tokenizer


def _vae_files(data_cfg) -> tuple[Path, ...]:
  """The run's AutoencoderKL files to copy (config.json + safetensors weights), () for a pixel run; ExportError
  (one line) for a folder diffusers could not load as ecdit did (no config.json, pickled weights only)."""
  vae_dir = data_config.option(data_cfg, 'vae_dir')
  if not vae_dir:
    return ()
  folder = Path(vae_dir).expanduser().resolve()
  if not (folder / 'config.json').is_file():
    raise ExportError(f'data.vae_dir={folder}: no config.json there (expected a diffusers AutoencoderKL folder)')
  return (folder / 'config.json', *text_folder.weight_files(folder, VAE_WEIGHTS, 'data.vae_dir'))


def _text_card(mcfg: ModelConfig, pretrained) -> tuple[str, str]:
  """(the text_encoder/ + tokenizer/ layout line, what custom-code loading needs besides torch)."""
  if pretrained is None:
    return ("ecdit's text transformer and sentencepiece model (ids end with the end id, padding 0, length "
            f'{mcfg.text_length})', 'diffusers and sentencepiece')
  model, tok = pretrained.classes
  how = ('padding masked out of attention' if pretrained.uses_mask else
         'causal attention only, padding not masked, as Stable Diffusion runs CLIP')
  return (f"the run's frozen pretrained {pretrained.kind.upper()} text encoder (`data.text_encoder_dir`), loaded by "
          f'transformers as `{model}` + `{tok}`; prompts are padded to {mcfg.text_length} tokens, the states are its '
          f'last hidden state after the final layer norm ({how}), and the cross-attention mask is the tokenizer\'s '
          'attention mask. The tokenizer was checked at export to give the run\'s ids on its sample prompts',
          'diffusers, transformers and sentencepiece' if pretrained.kind == 't5' else 'diffusers and transformers')


def model_card(mcfg: ModelConfig, source: dict, sample, latent: bool, pretrained=None) -> str:
  kind = {'expert_choice': f'expert-choice MoE ({mcfg.num_experts} experts, capacity factor '
                           f'{mcfg.eval_capacity_factor or mcfg.capacity_factor}, every {mcfg.moe_every}. block)',
          'token_choice': f'token-choice top-{mcfg.top_k} MoE ({mcfg.num_experts} experts, every '
                          f'{mcfg.moe_every}. block)',
          'dense': 'dense (no experts)'}[mcfg.routing]
  scheduler = SCHEDULERS[sample.sampler]
  other = SCHEDULERS['euler' if sample.sampler == 'heun' else 'heun']
  vae = ("the run's AutoencoderKL (config.json + safetensors as ecdit read them); the pipeline decodes "
         'latents / scaling_factor + shift_factor' if latent else 'none (pixel-space model)')
  text, needs = _text_card(mcfg, pretrained)
  return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [ecdit, ec-dit, mixture-of-experts, rectified-flow]
---
# EC-DiT text-to-image pipeline

Exported by `ecdit export --format=diffusers` from `{source['workdir']}` at step {source['step']}
({'EMA' if source['ema'] else 'raw'} weights). Backbone: {mcfg.depth} blocks, width {mcfg.width}, {kind};
{'VAE latents' if latent else 'pixels'} {mcfg.image_size}×{mcfg.image_size}×{mcfg.in_channels}, patch {mcfg.patch_size}.

## Use

With `ecdit_torch` installed (`pip install ecdit[torch]`; no JAX needed, no code from this folder runs):

```python
import torch, ecdit_torch
pipe = ecdit_torch.load_pipeline('THIS_FOLDER')
images = pipe(['a red circle'], num_inference_steps={sample.num_steps}, guidance_scale={sample.cfg_scale},
              generator=torch.Generator().manual_seed(0)).images
```

Without ecdit, through diffusers' custom-code loading (the `*.py` files here are the code it runs; needs
torch, {needs}):

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained('THIS_FOLDER', trust_remote_code=True)
```

## Sampling

On ecdit's grid t_i = 1 − i/n from t = 1 (noise) to t = 0, classifier-free guidance against the empty
caption: v = v_u + s·(v_c − v_u). The scheduler picks the rule, as `ecdit sample --sampler` does:
`FlowMatchEulerDiscreteScheduler` Euler, `FlowMatchHeunDiscreteScheduler` Heun (slopes of both interval ends
averaged, the last interval Euler). This folder's is `{scheduler}` (the run's `sample.sampler`); switch with
`pipe.scheduler = diffusers.{other}.from_config(pipe.scheduler.config)`.
With the same initial noise (`latents=`, NCHW) the images equal `ecdit sample`'s to 1e-4 on [0, 1] pixels.
Defaults: {sample.num_steps} steps, guidance {sample.cfg_scale} (the run's `sample.*`).

## Layout

- `transformer/`: `ECDiTTransformer2DModel`; call `transformer(x [B,C,H,W], t [B] in [0,1], text_states, mask)
  .sample` → velocity dx/dt. Tensor names follow `ecdit export`'s table; every linear weight is `[out, in]`.
- Experts are **stacked** along a leading expert axis: `blocks.i.moe.wi.weight [E, {mcfg.mlp_ratio}·d, d]`,
  `blocks.i.moe.wi.bias [E, {mcfg.mlp_ratio}·d]`, `blocks.i.moe.wo.weight [E, d, {mcfg.mlp_ratio}·d]`,
  `blocks.i.moe.wo.bias [E, d]`; slice `[e]` is expert e. `blocks.i.moe.router.weight [E, d]` (float32 softmax).
  Expert choice: each expert takes its top-C tokens per image, C = clip(floor(S·f/E), 1, S).
- `text_encoder/` + `tokenizer/`: {text}.
- `scheduler/`: `{scheduler}` (shift 1); the pipeline sets ecdit's grid itself.
- `vae/`: {vae}.
- `ecdit_export.json`: the run's full model config and the source checkpoint.
"""


def export_diffusers(workdir: str | Path, out_dir: str | Path, *, ema: bool = False, overwrite: bool = False,
                     max_shard_size: int | str = DEFAULT_SHARD, run=None) -> Path:
  """Writes the diffusers folder for a training run's newest checkpoint. `run`: an already restored
  workdir_lib.Restored (skips the restore). Raises ExportError (one line) for every bad input."""
  workdir, out = Path(workdir).resolve(), Path(out_dir).resolve()
  _check_out(workdir, out, overwrite)
  if run is None:
    try:
      run = workdir_lib.restore(workdir, ema=ema, require=reproducible)
    except ValueError as e:   # WorkdirError, ConfigError, reproducible()
      raise ExportError(str(e).splitlines()[0]) from None
  else:
    try:
      reproducible(run.cfg, run.model_config)
    except ValueError as e:
      raise ExportError(str(e)) from None
  mcfg = run.model_config.for_inference()   # the pipeline's transformer routes as sampling does
  pretrained = text_folder.inspect(run.cfg.data) if data_config.option(run.cfg.data, 'text_encoder_dir') else None
  tokenizer = None if pretrained else _own_tokenizer(run, mcfg, workdir)
  vae_files = _vae_files(run.cfg.data)
  source = {'workdir': str(workdir), 'step': run.step, 'ema': bool(ema)}
  if pretrained:
    source['text_encoder_dir'] = str(pretrained.folder)
  if vae_files:
    source['vae_dir'] = str(vae_files[0].parent)
  tensors = weights.export_params(run.params, mcfg)

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
  try:
    arch = {k: getattr(mcfg, k) for k in TRANSFORMER_KEYS}
    arch['text_states_dim'] = text_states_dim(mcfg)
    _save_model(ECDiTTransformer2DModel(**arch), _torch_tensors(tensors, keep=lambda k: not k.startswith(TEXT_PREFIX)),
                tmp / 'transformer', max_shard_size)
    if pretrained:
      text_folder.write(pretrained, tmp / 'text_encoder', tmp / 'tokenizer', mcfg.text_length,
                        text_folder.probe_texts(run.cfg.sample.prompts, mcfg.text_length))
      text_classes = [['transformers', c] for c in pretrained.classes]
    else:
      _save_model(ECDiTTextEncoder(vocab_size=mcfg.vocab_size, text_length=mcfg.text_length,
                                   text_width=mcfg.text_width, text_depth=mcfg.text_depth,
                                   text_heads=mcfg.text_heads),
                  _torch_tensors(tensors, TEXT_PREFIX), tmp / 'text_encoder', max_shard_size)
      tokenizer.save_pretrained(tmp / 'tokenizer')
      text_classes = [['text_encoder_ecdit', 'ECDiTTextEncoder'], ['tokenizer_ecdit', 'ECDiTTokenizer']]
    scheduler = SCHEDULERS[run.cfg.sample.sampler]
    getattr(diffusers, scheduler)(num_train_timesteps=1000, shift=1.0).save_pretrained(tmp / 'scheduler')
    if vae_files:
      (tmp / 'vae').mkdir()
      for f in vae_files:
        shutil.copyfile(f, tmp / 'vae' / f.name)
    for sub, names in CODE.items():
      if not (pretrained and sub in ('text_encoder', 'tokenizer')):
        _copy_code(tmp / sub, names)
    index = {'_class_name': ['pipeline_ecdit', 'ECDiTPipeline'], '_diffusers_version': diffusers.__version__,
             'transformer': ['transformer_ecdit', 'ECDiTTransformer2DModel'],
             'text_encoder': text_classes[0], 'tokenizer': text_classes[1],
             'scheduler': ['diffusers', scheduler],
             'vae': ['diffusers', 'AutoencoderKL'] if vae_files else [None, None],
             'text_length': mcfg.text_length,
             'text_encoder_uses_mask': pretrained.uses_mask if pretrained else True,
             'default_num_inference_steps': int(run.cfg.sample.num_steps),
             'default_guidance_scale': float(run.cfg.sample.cfg_scale)}
    (tmp / 'model_index.json').write_text(json.dumps(index, indent=2) + '\n')
    (tmp / 'ecdit_export.json').write_text(json.dumps({'source': source, 'model': mcfg.to_dict()}, indent=2,
                                                      sort_keys=True) + '\n')
    (tmp / 'README.md').write_text(model_card(mcfg, source, run.cfg.sample, bool(vae_files), pretrained))
    outputs.follow_umask(tmp)   # mkdtemp's folder is 0700, the safetensors files 0600
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return out
