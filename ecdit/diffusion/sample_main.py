"""`ecdit sample`: a PNG grid of samples for given prompts from a training workdir's latest checkpoint.

  ecdit sample --workdir=runs/shapes_tiny --prompts="a red circle;two squares" --out=grid.png

The model, tokenizer and data settings come from the workdir's config.json; the weights from its newest
readable checkpoint (EMA weights unless --noema). With data.text_encoder_dir the prompts are encoded by that
pretrained encoder, and with data.vae_dir the sampled latents are decoded to pixels by that VAE.
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from ecdit import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'training run directory (holds config.json and checkpoints/)')
_PROMPTS = flags.DEFINE_string('prompts', None, "';'-separated prompts (default: the config's sample.prompts)")
_OUT = flags.DEFINE_string('out', None, 'output PNG (default <workdir>/samples/sample_<step>.png)')
_STEPS = flags.DEFINE_integer('steps', None, 'ODE steps (default: the config\'s sample.num_steps)')
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, 'classifier-free guidance scale (default: sample.cfg_scale)')
_SAMPLER = flags.DEFINE_enum('sampler', None, ['euler', 'heun'], 'ODE solver (default: sample.sampler)')
_SEED = flags.DEFINE_integer('seed', None, 'noise seed (default: sample.seed)')
_EMA = flags.DEFINE_bool('ema', True, 'use the EMA weights')
_REPEAT = flags.DEFINE_integer('repeat', 1, 'images per prompt (one row per prompt)')


_fail = cli.fail


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}')
  if not _WORKDIR.value:
    _fail('--workdir is required')
  workdir = Path(_WORKDIR.value)
  if _REPEAT.value < 1:
    _fail(f'--repeat={_REPEAT.value} is invalid: expected an integer >= 1')
  if _STEPS.value is not None and _STEPS.value < 1:
    _fail(f'--steps={_STEPS.value} is invalid: expected an integer >= 1')
  from absl import logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from ecdit.diffusion import sampler as sampler_lib
  from ecdit.train import workdir as workdir_lib

  try:
    cfg = workdir_lib.load_run_config(workdir)
    prompts = [p.strip() for p in (_PROMPTS.value or cfg.sample.prompts).split(';') if p.strip()]
    if not prompts:
      _fail('--prompts is empty')
    run = workdir_lib.restore(workdir, ema=_EMA.value)
  except ValueError as e:   # WorkdirError, ConfigError
    _fail(str(e))
  step, mcfg = run.step, run.model_config
  sampler = sampler_lib.make_sampler(
      run.model, image_shape=(mcfg.image_size, mcfg.image_size, mcfg.in_channels),
      num_steps=_STEPS.value or cfg.sample.num_steps,
      cfg_scale=cfg.sample.cfg_scale if _CFG_SCALE.value is None else _CFG_SCALE.value,
      method=_SAMPLER.value or cfg.sample.sampler, clip=run.decode is None)
  batch = [p for p in prompts for _ in range(_REPEAT.value)]
  seed = cfg.sample.seed if _SEED.value is None else _SEED.value
  images = sampler_lib.sample_prompts(sampler, run.params, run.tokenizer, batch, seed, decode=run.decode)
  out = Path(_OUT.value) if _OUT.value else workdir / 'samples' / f'sample_{step:07d}.png'
  scale = max(1, 128 // images.shape[1])
  cols = _REPEAT.value if _REPEAT.value > 1 else None
  sampler_lib.save_png(sampler_lib.make_grid(images, cols=cols, scale=scale), out)
  print(f'wrote {out}: {len(batch)} samples from checkpoint step {step} '
        f'({"one row per prompt: " if cols else ""}{"; ".join(prompts)})', flush=True)


if __name__ == '__main__':
  app.run(main)
