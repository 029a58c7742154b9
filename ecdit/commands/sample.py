"""`ecdit sample`: a PNG grid of samples for given prompts from a training workdir's latest checkpoint.

  ecdit sample --workdir=runs/shapes_tiny --prompts="a red circle;two squares" --out=grid.png

The model, tokenizer and data settings come from the workdir's config.json; the weights from its newest
readable checkpoint (EMA weights unless --noema). With data.text_encoder_dir the prompts are encoded by that
pretrained encoder, and with data.vae_dir the sampled latents are decoded to pixels by that VAE.
"""
from __future__ import annotations

import functools
from pathlib import Path

from absl import flags

from ecdit import outputs
from ecdit.commands import flags as cflags
from ecdit.diffusion import sampler as sampler_lib
from ecdit.train import workdir as workdir_lib

_WORKDIR = cflags.define_workdir('training run directory (holds config.json and checkpoints/)')
_PROMPTS = flags.DEFINE_string('prompts', None, "';'-separated prompts (default: the config's sample.prompts)")
_OUT = flags.DEFINE_string('out', None, 'output PNG (default <workdir>/samples/sample_<step>.png)')
_STEPS = flags.DEFINE_integer('steps', None, 'ODE steps (default: the config\'s sample.num_steps)')
_CFG_SCALE = flags.DEFINE_float('cfg_scale', None, 'classifier-free guidance scale (default: sample.cfg_scale)')
_SAMPLER = flags.DEFINE_enum('sampler', None, ['euler', 'heun'], 'ODE solver (default: sample.sampler)')
_SEED = flags.DEFINE_integer('seed', None, 'noise seed (default: sample.seed)')
_EMA = flags.DEFINE_bool('ema', True, 'use the EMA weights')
_STEP = flags.DEFINE_integer('step', None, 'the checkpoint step to sample (default: the newest readable one)')
_REPEAT = flags.DEFINE_integer('repeat', 1, 'images per prompt (one row per prompt); at most '
                               f'{sampler_lib.MAX_IMAGES} images (prompts x repeat) per call')


def main(argv):
  cflags.no_arguments(argv)
  cflags.require(_WORKDIR)
  workdir = Path(_WORKDIR.value)
  cflags.at_least(_REPEAT, 1)
  cflags.ode_steps(_STEPS)
  cflags.at_least(_STEP, 1)
  cflags.at_least(_CFG_SCALE, 0.0)
  given = cflags.prompt_list(_PROMPTS) if _PROMPTS.value is not None else None   # an empty one: an error
  cflags.quiet_logging()
  # Checked before the restore; the default <workdir>/samples/ is the run's own output folder.
  check_out = functools.partial(outputs.check_output, flag='--out', ours=outputs.png_from_ecdit,
                                run_subdir='samples')
  if _OUT.value:
    check_out(_OUT.value)
  with cflags.translate():   # WorkdirError, ConfigError
    cfg = workdir_lib.load_run_config(workdir)
    prompts = given or cflags.prompt_list(_PROMPTS, cfg.sample.prompts)
    sampler_lib.check_image_count(len(prompts), _REPEAT.value)   # before the checkpoint is read
    run = workdir_lib.restore(workdir, ema=_EMA.value, step=_STEP.value)
  step, seed = run.step, cfg.sample.seed if _SEED.value is None else _SEED.value
  out = check_out(Path(_OUT.value) if _OUT.value else workdir / 'samples' / f'sample_{step:07d}.png')
  generate = sampler_lib.sampler_for_run(run, num_steps=_STEPS.value, cfg_scale=_CFG_SCALE.value,
                                         method=_SAMPLER.value)
  batch = [p for p in prompts for _ in range(_REPEAT.value)]
  images = generate(batch, seed)
  scale = max(1, 128 // images.shape[1])
  cols = _REPEAT.value if _REPEAT.value > 1 else None
  sampler_lib.save_png(sampler_lib.make_grid(images, cols=cols, scale=scale), out)
  print(f'wrote {out}: {len(batch)} samples from checkpoint step {step} '
        f'({"one row per prompt: " if cols else ""}{"; ".join(prompts)})', flush=True)
