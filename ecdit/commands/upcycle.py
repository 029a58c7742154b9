"""`ecdit upcycle`: a new workdir holding an EC-DiT (MoE) checkpoint upcycled from a dense run.

  ecdit upcycle --workdir=runs/dense --out=runs/upcycled --num_experts=8 [--routing=expert_choice]

Every dense FFN of a block that is sparse in the new model is copied into all its experts; routers are freshly
initialised (--seed). The new workdir gets `config.json` (the dense run's config with the model's routing
fields changed), `upcycled_from.json` (provenance) and a step-0 checkpoint: fresh optimizer state, params =
EMA params = the upcycled ones, the dense run's input-pipeline position reset to 0. Continue training it with
the same experiment config plus the printed `--config.model.*` overrides and `--workdir=<out>`. The library
is `ecdit.export.upcycle`.
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

from ecdit import errors
from ecdit import outputs
from ecdit.commands import flags as cflags
from ecdit.export import upcycle
from ecdit.train import workdir as workdir_lib

_WORKDIR = cflags.define_workdir('the dense training run directory')
_OUT = flags.DEFINE_string('out', None, 'the new workdir (a new or empty directory)')
_ROUTING = flags.DEFINE_enum('routing', 'expert_choice', ['expert_choice', 'token_choice'], 'MoE routing')
_EXPERTS = flags.DEFINE_integer('num_experts', 8, 'experts per MoE layer')
_MOE_EVERY = flags.DEFINE_integer('moe_every', None, 'every n-th block is sparse (default: the run\'s)')
_CAPACITY = flags.DEFINE_float('capacity_factor', None, 'capacity factor (default: the run\'s)')
_SEED = flags.DEFINE_integer('seed', 0, 'router initialisation seed')
_EMA = flags.DEFINE_bool('ema', True, 'upcycle the dense run\'s EMA weights (else its raw parameters)')


def main(argv):
  cflags.quiet_logging()
  cflags.no_arguments(argv)
  if not _WORKDIR.value or not _OUT.value:
    raise errors.UsageError('--workdir and --out are required')
  # The new workdir: absent or empty, outside every run, writable; checked before the dense run is read.
  out = outputs.check_output(_OUT.value, '--out', folder=True)
  overrides = {'routing': _ROUTING.value, 'num_experts': _EXPERTS.value}
  if _MOE_EVERY.value is not None:
    overrides['moe_every'] = _MOE_EVERY.value
  if _CAPACITY.value is not None:
    overrides['capacity_factor'] = _CAPACITY.value
  with cflags.translate(first_line=True):   # WorkdirError, ConfigError; a source or target refused by value
    run = workdir_lib.restore(_WORKDIR.value, ema=_EMA.value,
                              require=lambda cfg, mcfg: upcycle.check_source(cfg, mcfg, overrides))
  source = {'workdir': str(Path(_WORKDIR.value).resolve()), 'step': run.step, 'ema': bool(_EMA.value)}
  with cflags.translate(first_line=True):   # a target model the dense run cannot become
    mcfg = upcycle.upcycle_workdir(run, out, overrides, seed=_SEED.value, source=source)
  flags_hint = ' '.join(f'--config.model.{k}={v}' for k, v in overrides.items())
  print(f'wrote {out}: step-0 {mcfg.routing} checkpoint with {mcfg.num_experts} experts upcycled from '
        f'{_WORKDIR.value} step {run.step}; continue with `ecdit train --config=<experiment> {flags_hint} '
        f'--workdir={out}`', flush=True)
