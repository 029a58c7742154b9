"""`ecdit upcycle`: a new workdir holding an EC-DiT (MoE) checkpoint upcycled from a dense run.

  ecdit upcycle --workdir=runs/dense --out=runs/upcycled --num_experts=8 [--routing=expert_choice]

Every dense FFN of a block that is sparse in the new model is copied into all its experts; routers are freshly
initialised (--seed). The new workdir gets `config.json` (the dense run's config with the model's routing
fields changed), `upcycled_from.json` (provenance) and a step-0 checkpoint: fresh optimizer state, params =
EMA params = the upcycled ones, the dense run's input-pipeline position reset to 0. Continue training it with
the same experiment config plus the printed `--config.model.*` overrides and `--workdir=<out>`.
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from ecdit import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'the dense training run directory')
_OUT = flags.DEFINE_string('out', None, 'the new workdir (must not hold checkpoints yet)')
_ROUTING = flags.DEFINE_enum('routing', 'expert_choice', ['expert_choice', 'token_choice'], 'MoE routing')
_EXPERTS = flags.DEFINE_integer('num_experts', 8, 'experts per MoE layer')
_MOE_EVERY = flags.DEFINE_integer('moe_every', None, 'every n-th block is sparse (default: the run\'s)')
_CAPACITY = flags.DEFINE_float('capacity_factor', None, 'capacity factor (default: the run\'s)')
_SEED = flags.DEFINE_integer('seed', 0, 'router initialisation seed')
_EMA = flags.DEFINE_bool('ema', True, 'upcycle the dense run\'s EMA weights (else its raw parameters)')


_fail = cli.fail


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}')
  if not _WORKDIR.value or not _OUT.value:
    _fail('--workdir and --out are required')
  out = Path(_OUT.value)
  if (out / 'checkpoints').exists() and any((out / 'checkpoints').iterdir()):
    _fail(f'--out={out} already holds checkpoints; choose a new directory')
  import json

  import jax

  from ecdit.export import upcycle
  from ecdit.train import workdir as workdir_lib
  from ecdit.train import checkpoint as ckpt_lib
  from ecdit.config import experiment as config_lib
  from ecdit.train import loop

  try:
    run = workdir_lib.restore(_WORKDIR.value, ema=_EMA.value)
  except ValueError as e:   # WorkdirError, ConfigError
    _fail(str(e).splitlines()[0])
  overrides = {'routing': _ROUTING.value, 'num_experts': _EXPERTS.value}
  if _MOE_EVERY.value is not None:
    overrides['moe_every'] = _MOE_EVERY.value
  if _CAPACITY.value is not None:
    overrides['capacity_factor'] = _CAPACITY.value
  cfg = run.cfg
  for k, v in overrides.items():
    cfg.model[k] = v
  try:
    mcfg = config_lib.validate(cfg)
    params = upcycle.upcycle_params(run.params, run.model_config, mcfg, jax.random.key(_SEED.value))
  except ValueError as e:
    _fail(str(e).splitlines()[0])

  setup = loop.build(cfg, mcfg)
  state = setup.init_state()
  boxed = jax.tree_util.tree_structure(state.params)
  new = jax.tree_util.tree_unflatten(boxed, jax.tree_util.tree_leaves(params))
  state = state.replace(params=new, ema_params=jax.tree.map(lambda x: x, new))
  data_state = dict(run.data_state) if isinstance(run.data_state, dict) else run.data_state
  if isinstance(data_state, dict) and 'step' in data_state:
    data_state['step'] = 0
  out.mkdir(parents=True, exist_ok=True)
  resolved = loop.resolved_config(cfg, mcfg)
  (out / 'config.json').write_text(json.dumps(resolved, indent=2, sort_keys=True) + '\n')
  # Provenance beside the config (config.json itself only holds schema keys).
  source = {'workdir': str(Path(_WORKDIR.value).resolve()), 'step': run.step, 'ema': bool(_EMA.value),
            'seed': _SEED.value, 'overrides': overrides}
  (out / 'upcycled_from.json').write_text(json.dumps(source, indent=2, sort_keys=True) + '\n')
  ck = ckpt_lib.Checkpointer(out, keep=cfg.train.keep_checkpoints, use_async=False)
  ck.save(0, state, data_state, resolved)
  ck.close()
  flags_hint = ' '.join(f'--config.model.{k}={v}' for k, v in overrides.items())
  print(f'wrote {out}: step-0 {mcfg.routing} checkpoint with {mcfg.num_experts} experts upcycled from '
        f'{_WORKDIR.value} step {run.step}; continue with `ecdit train --config=<experiment> {flags_hint} '
        f'--workdir={out}`', flush=True)


if __name__ == '__main__':
  app.run(main)
