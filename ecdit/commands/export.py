"""`ecdit export`: a training workdir's weights in a framework-neutral form.

  ecdit export --workdir=runs/shapes_tiny --out=export/ [--ema]                 # safetensors + config + README
  ecdit export --workdir=runs/shapes_tiny --out=hlo/ --format=stablehlo [--steps=25 --cfg_scale=3]
  ecdit export --workdir=runs/shapes_tiny --out=pipe/ --format=diffusers [--ema --overwrite]   # torch extra

safetensors: `model.safetensors`, `config.json`, `README.md` (tensor table) and `tokenizer.model` when the run
has one; load with `ecdit.export.torch_reference.load_model(dir)` (PyTorch) or `ecdit.export.load_jax(dir)`.
stablehlo: `velocity.jax_exported` and `sampler.jax_exported` (symbolic batch; see ecdit/export/stablehlo.py);
load with `ecdit.export.load_stablehlo(dir)`.
diffusers: a DiffusionPipeline folder (model_index.json, transformer/, text_encoder/ + tokenizer/ (ecdit's, or
the run's pretrained T5 / CLIP for transformers), scheduler/, vae/ for latent runs, model card); load with `ecdit_torch.load_pipeline(dir)` or `DiffusionPipeline.from_pretrained(dir,
trust_remote_code=True)`. See ecdit/export/diffusers.py.
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

from ecdit import outputs
from ecdit.commands import flags as cflags
from ecdit.data.tokenizer import Tokenizer
from ecdit.export import stablehlo, weights
from ecdit.train import workdir as workdir_lib

_WORKDIR = cflags.define_workdir('training run directory (config.json + checkpoints/)')
_OUT = flags.DEFINE_string('out', None, 'output directory')
_FORMAT = flags.DEFINE_enum('format', 'safetensors', ['safetensors', 'stablehlo', 'diffusers'], 'export format')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'diffusers: replace an earlier diffusers export at --out '
                               '(written aside, then moved)')
_EMA = flags.DEFINE_bool('ema', False, 'export the EMA weights instead of the raw parameters')
_STEPS = flags.DEFINE_integer('steps', None, 'stablehlo sampler: Euler steps (default: the run\'s sample.num_steps)')
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, 'stablehlo sampler: guidance scale (default: sample.cfg_scale)')
_PLATFORMS = flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'stablehlo: platforms to lower for')


_EXPORT_OF = {   # how an earlier export of each format is recognised (by the file that names its format)
    'safetensors': outputs.folder_with(weights.CONFIG_FILE, outputs.json_with('format', 'weights')),
    'stablehlo': outputs.folder_with(weights.CONFIG_FILE, outputs.json_with('format', 'stablehlo')),
    'diffusers': outputs.folder_with('model_index.json', outputs.json_with('_class_name', 'transformer')),
}


def _null_caption(run):
  """The tokenized empty prompt the sampler artefact bakes in for guidance (None: given at call time)."""
  if run.tokenizer_path is None:
    return None
  try:
    return Tokenizer(run.tokenizer_path, run.model_config.text_length).encode_batch([''])
  except ValueError as e:
    print(f'warning: {e}; the sampler artefact will need null_ids/null_mask at call time', flush=True)
    return None


def main(argv):
  cflags.quiet_logging()
  cflags.no_arguments(argv)
  cflags.require(_WORKDIR)
  cflags.require(_OUT)
  cflags.ode_steps(_STEPS)
  cflags.at_least(_CFG_SCALE, 0.0)
  stablehlo.check_platforms(_PLATFORMS.value)
  # Before the restore: not into a run, not over a folder that is not an earlier export of this format.
  outputs.check_output(_OUT.value, '--out', folder=True, ours=_EXPORT_OF[_FORMAT.value])
  if _FORMAT.value == 'diffusers':
    # Imported here: it needs torch and diffusers (the torch extra), which the other formats do not.
    from ecdit.export import diffusers  # pylint: disable=import-outside-toplevel
    out = diffusers.export_diffusers(_WORKDIR.value, _OUT.value, ema=_EMA.value, overwrite=_OVERWRITE.value)
    print(f'wrote {out}: {", ".join(sorted(p.name for p in out.iterdir()))} (diffusers)', flush=True)
    return 0
  with cflags.translate(first_line=True):   # WorkdirError, ConfigError
    run = workdir_lib.restore(_WORKDIR.value, ema=_EMA.value)
  source = {'workdir': str(Path(_WORKDIR.value).resolve()), 'step': run.step, 'ema': bool(_EMA.value)}
  out = Path(_OUT.value)
  # ExportError (a bad output directory, names or shapes) reaches the boundary as one line.
  if _FORMAT.value == 'safetensors':
    weights.write_export(out, run.params, run.model_config, tokenizer_path=run.tokenizer_path,
                         extra_config={'source': source})
  else:
    steps = _STEPS.value or run.cfg.sample.num_steps
    scale = run.cfg.sample.cfg_scale if _CFG_SCALE.value is None else _CFG_SCALE.value
    stablehlo.write_stablehlo(out, run.params, run.model_config, num_steps=steps, cfg_scale=scale,
                              platforms=tuple(_PLATFORMS.value), null_caption=_null_caption(run),
                              extra_config={'source': source})
  files = sorted(p.name for p in out.iterdir())
  print(f'wrote {out}: {", ".join(files)} ({_FORMAT.value}, step {run.step}, '
        f'{"EMA" if _EMA.value else "raw"} weights)', flush=True)
