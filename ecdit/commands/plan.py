"""`ecdit plan`: compile an experiment's real train step for N simulated devices and say whether it fits.

  ecdit plan --config=experiments/paper.py:xl_32e --devices=8 --config.mesh.expert=8 --config.mesh.data=1
  ecdit plan --config=experiments/shapes_tiny.py --devices=8 --chip=H100 --json
  ecdit plan --config=experiments/paper.py:xl_32e --devices=8 --search   # which mesh and remat to use

Nothing is allocated: the step is lowered against abstract state on N CPU devices and XLA's compiled program
is read (memory per device vs the chip's HBM, FLOPs, collective bytes, a roofline step time and MFU). The
mesh and batch are the config's (`--config.mesh.*`, `--config.train.batch_size`). Method and caveats:
`ecdit.bench.plan`; the chip table: `ecdit.bench.chips`.
"""
from __future__ import annotations

import json

import jax
from absl import flags

from ecdit import errors
from ecdit.bench import chips, mesh_search, plan
from ecdit.commands import flags as cflags

_CONFIG = cflags.define_config('experiments/shapes_tiny.py', 'experiment config file[:variant] to plan')
_DEVICES = flags.DEFINE_integer('devices', 8, 'simulated devices (the mesh product must equal it)')
_CHIP = flags.DEFINE_string('chip', 'v5p', f'accelerator to plan for: one of {sorted(chips.CHIPS)}')
_JSON = flags.DEFINE_bool('json', False, 'print the plan as one JSON object')
_SEARCH = flags.DEFINE_bool('search', False, 'plan every mesh (and, for a scanned stack, remat policy) that '
                            'divides the model and batch, best first, instead of the config\'s mesh')
_SEARCH_LIMIT = flags.DEFINE_integer('search_limit', 6, 'with --search: (mesh, remat) candidates to compile')


def main(argv):
  cflags.no_arguments(argv)
  cflags.quiet_logging()
  cflags.at_least(_DEVICES, 1)
  cflags.at_least(_SEARCH_LIMIT, 1)
  with cflags.translate():
    chips.chip(_CHIP.value)   # an unknown chip fails before anything is built
  cfg = cflags.config_value(_CONFIG)
  with cflags.translate():   # a count no mesh of this model and batch could use, before devices are created
    plan.check_device_count(cfg, _DEVICES.value)
  # Before the CPU backend starts (nothing above touched a device): N simulated devices.
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  devices = jax.devices('cpu')
  if len(devices) < _DEVICES.value:
    raise errors.UsageError(f'--devices={_DEVICES.value}: only {len(devices)} CPU devices can be simulated in '
                            'this process (XLA_FLAGS fixes the count); unset XLA_FLAGS or plan fewer')
  with cflags.translate():   # a mesh that does not match --devices or does not divide the model, by value
    if _SEARCH.value:
      result = mesh_search.search(cfg, devices=devices[:_DEVICES.value], chip=_CHIP.value,
                                  limit=_SEARCH_LIMIT.value)
      text = mesh_search.format_search(result)
    else:
      result = plan.plan(cfg, devices=devices[:_DEVICES.value], chip=_CHIP.value)
      text = plan.format_plan(result)
  print(json.dumps(result, indent=1) if _JSON.value else text)
  return 0
