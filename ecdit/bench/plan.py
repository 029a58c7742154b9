"""`ecdit plan`: will this config's train step fit, and how fast could it run, on a mesh of real chips?

The real train step (`ecdit.train.loop.build`, the experiment's mesh, remat and layout) is lowered and
compiled against abstract state for N simulated CPU devices — nothing is allocated — and read back:

  memory     XLA's per-device argument / output / temporary bytes (donated state aliased) vs the chip's HBM
  flops      analytic model FLOPs of the step (ecdit.bench.flops, no token masking: the MFU numerator) and
             XLA's own count of the compiled per-device program (masking, remat recomputation included)
  collectives bytes per kind from the compiled HLO, each instruction counted once per execution (a scanned
             stack's loop body runs `trip count` times)
  roofline   per-device compute at the chip's bf16 peak, HBM traffic at its bandwidth, collectives at its
             interconnect bandwidth: the step can take no less than the largest of the three (perfect
             overlap) and no more than their sum (none); MFU = model FLOPs / (time × peak)

The CPU compiler's fusion and memory plan stand in for the accelerator's: expect the same order of magnitude,
not the same bytes. Data paths are not read (the plan never touches the dataset).
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ecdit import parallel
from ecdit.bench import chips as chips_lib
from ecdit.bench import flops as flops_lib
from ecdit.config import experiment as config_lib
from ecdit.train import loop

COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
                'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


def check_device_count(cfg, devices: int) -> None:
  """ValueError unless some mesh could use `devices`: the batch axes (data, fsdp, expert) split the global
  batch, so their product is at most train.batch_size, and the 'model' axis divides the attention heads, so it
  is at most model.num_heads. Checked before any device is created."""
  mcfg = config_lib.validate(cfg)
  most = cfg.train.batch_size * mcfg.num_heads
  if devices > most:
    raise ValueError(f'--devices={devices} is more than any mesh can use: at most train.batch_size='
                     f'{cfg.train.batch_size} over data, fsdp and expert times model.num_heads={mcfg.num_heads} '
                     f'over model = {most}')


def abstract_batch(mcfg, global_batch: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The `ecdit.data.batch` step arrays as sharded ShapeDtypeStructs."""
  sh = parallel.batch_sharding(mesh)
  b, s, c, length = global_batch, mcfg.image_size, mcfg.in_channels, mcfg.text_length
  text = ((b, length), jnp.int32) if mcfg.text_encoder == 'transformer' else \
      ((b, length, mcfg.text_states_dim), jnp.float32)
  return {'x0': jax.ShapeDtypeStruct((b, s, s, c), jnp.float32, sharding=sh),
          'text': jax.ShapeDtypeStruct(text[0], text[1], sharding=sh),
          'text_mask': jax.ShapeDtypeStruct((b, length), jnp.bool_, sharding=sh)}


def _shape_bytes(result_type: str) -> int:
  total = 0
  for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', result_type):
    n = 1
    for d in dims.split(','):
      if d:
        n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def collective_bytes(hlo: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} per execution of the compiled module: an instruction's result bytes (per
  device), times the trip counts of the while loops around it (async '-start'/'-done' pairs counted once)."""
  comps, order, name = defaultdict(list), [], None
  for line in hlo.splitlines():
    head = re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if head and not line.startswith(' '):
      name = 'ENTRY' if head.group(1) else head.group(2)
      order.append(name)
    elif name is not None:
      comps[name].append(line)
  times = defaultdict(int)   # executions of each computation per step
  times['ENTRY'] = 1
  for comp in reversed(order):   # HLO text defines callees before their callers: callers are seen first here
    for line in comps[comp]:
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      for key, callee in re.findall(r'\b(body|condition|calls|to_apply|true_computation|false_computation)='
                                    r'%?([\w.\-]+)', line):
        times[callee] += times[comp] * (int(trip.group(1)) if key == 'body' and trip else 1)
  out = {k: {'count': 0, 'bytes': 0} for k in COLLECTIVES}
  for comp, lines in comps.items():
    if not times[comp]:
      continue
    for line in lines:
      for k in COLLECTIVES:
        m = re.search(rf'=\s*(.*?)\s{k}(-start)?\(', line)
        if m:
          out[k]['count'] += times[comp]
          out[k]['bytes'] += times[comp] * _shape_bytes(m.group(1))
  return out


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def plan(cfg, *, devices: Sequence[Any], chip: str) -> dict[str, Any]:
  """Compiles `cfg`'s train step for the mesh `cfg.mesh` over `devices` and returns the plan's numbers."""
  spec = chips_lib.chip(chip)
  cfg = cfg.copy_and_resolve_references()
  if cfg.data.name == 'image_text_folder' and not cfg.data.source_dir:
    cfg.data.source_dir = '/plan/reads/no/data'   # required by validation; the plan never reads it
  mcfg = config_lib.validate(cfg)
  setup = loop.build(cfg, mcfg, devices=list(devices), strict=True)
  batch = abstract_batch(mcfg, cfg.train.batch_size, setup.mesh)
  start = time.perf_counter()
  compiled = setup.train_step.lower(setup.abstract_state, batch).compile()
  compile_s = time.perf_counter() - start

  mem = compiled.memory_analysis()
  argument, output = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  peak_bytes = argument + output - alias + temp
  n = len(devices)
  model_flops = flops_lib.train_step_flops(mcfg, cfg.train.batch_size)
  cost = _cost(compiled)
  xla_flops, hbm_traffic = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  coll = collective_bytes(compiled.as_text())
  coll_total = sum(v['bytes'] for v in coll.values())
  compute_s = max(model_flops / n, xla_flops) / spec.bf16_flops
  hbm_s, comm_s = hbm_traffic / spec.hbm_bandwidth, coll_total / spec.interconnect
  fast, slow = max(compute_s, hbm_s, comm_s), compute_s + hbm_s + comm_s
  return {
      'config': cfg.name, 'chip': spec.name, 'devices': n,
      'mesh': dict(zip(setup.mesh.axis_names, setup.mesh.devices.shape)),
      'global_batch': cfg.train.batch_size, 'scan_layers': mcfg.scan_layers, 'remat': cfg.train.remat,
      'dtype': mcfg.dtype, 'compile_s': compile_s,
      'bytes': {'argument': argument, 'output': output, 'alias': alias, 'temp': temp, 'peak': peak_bytes,
                'hbm': spec.hbm_bytes},
      'fits': peak_bytes <= spec.hbm_bytes,
      'model_flops_per_step': model_flops, 'xla_flops_per_device': xla_flops, 'hbm_traffic_bytes': hbm_traffic,
      'collectives': coll,
      'roofline_s': {'compute': compute_s, 'hbm': hbm_s, 'collectives': comm_s, 'overlapped': fast,
                     'serial': slow},
      'mfu': {'overlapped': model_flops / n / (fast * spec.bf16_flops) if fast else 0.0,
              'serial': model_flops / n / (slow * spec.bf16_flops) if slow else 0.0},
  }


def _gib(b: float) -> str:
  return f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.1f} MiB'


def format_plan(p: dict[str, Any]) -> str:
  b, r = p['bytes'], p['roofline_s']
  mesh = ' '.join(f'{k}={v}' for k, v in p['mesh'].items())
  lines = [
      f"plan: {p['config']} on {p['devices']} x {p['chip']} (mesh {mesh}), global batch {p['global_batch']}, "
      f"scan_layers={p['scan_layers']} remat={p['remat']} dtype={p['dtype']}",
      f"compile: {p['compile_s']:.1f} s (XLA:CPU, simulated devices)",
      f"memory per device: arguments {_gib(b['argument'])}, outputs {_gib(b['output'])} "
      f"({_gib(b['alias'])} aliased), temporaries {_gib(b['temp'])} -> peak {_gib(b['peak'])} of "
      f"{_gib(b['hbm'])} HBM: {'fits' if p['fits'] else 'DOES NOT FIT'}",
      f"flops: model {p['model_flops_per_step']:.3e} per step ({p['model_flops_per_step'] / p['devices']:.3e} "
      f"per device, unmasked); XLA's compiled count {p['xla_flops_per_device']:.3e} per device",
      'collectives per step per device: ' + ', '.join(
          f"{k} {v['count']}x {_gib(v['bytes'])}" for k, v in p['collectives'].items() if v['count']) or 'none',
      f"roofline: compute {r['compute'] * 1e3:.3g} ms, HBM {r['hbm'] * 1e3:.3g} ms, collectives "
      f"{r['collectives'] * 1e3:.3g} ms -> step {r['overlapped'] * 1e3:.3g}-{r['serial'] * 1e3:.3g} ms, "
      f"MFU {p['mfu']['serial']:.2f}-{p['mfu']['overlapped']:.2f}",
  ]
  return '\n'.join(lines)


__all__ = ['abstract_batch', 'collective_bytes', 'format_plan', 'plan']
