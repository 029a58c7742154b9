"""`ecdit plan --search`: which mesh and remat policy should this config train with on N chips?

Every (data, fsdp, expert, model) factorisation of N is checked against the model and the global batch
(`models.ecdit.check_fits`: cheap, abstract parameters only); the ones that divide are ordered by a prior —
experts spread as far as they go (the all-to-all is the cheapest way to split the MoE), then the least tensor
parallelism (its reductions sit on every layer's critical path), then the least FSDP — and the first
`limit` (mesh, remat) pairs are compiled by `ecdit.bench.plan.plan`. Remat policies are tried only for a
scanned stack (`model.scan_layers`; the unrolled stack takes none). The result ranks what fits by the
roofline step time (overlapped bound), then what does not by peak memory.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from ecdit import parallel
from ecdit.bench import plan as plan_lib
from ecdit.config import experiment as config_lib
from ecdit.diffusion import flow
from ecdit.models import ecdit as ecdit_model

# For a scanned stack, in the order tried: keep the MoE outputs (no all_to_all recomputed), keep everything
# (no recomputation: fastest when it fits), keep nothing (least memory).
SEARCH_REMATS = ('save_moe', 'none', 'full')


def factorisations(n: int, axes: int = len(parallel.AXES)) -> list[tuple[int, ...]]:
  """Every ordered tuple of `axes` positive integers whose product is n."""
  if axes == 1:
    return [(n,)]
  return [(d,) + rest for d in range(1, n + 1) if n % d == 0 for rest in factorisations(n // d, axes - 1)]


def _prior(shape: tuple[int, ...]) -> tuple[int, ...]:
  data, fsdp, expert, model = shape
  return (-expert, model, fsdp)


def candidates(cfg, devices: Sequence[Any], mcfg=None) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], str]]:
  """(meshes that divide the model and batch, in the order to try; {mesh: why not} for the rest)."""
  mcfg = mcfg or config_lib.validate(cfg)
  fit, rejected = [], {}
  for shape in factorisations(len(devices)):
    mesh = parallel.make_mesh(dict(zip(parallel.AXES, shape)), list(devices))
    try:
      ecdit_model.check_fits(mcfg, mesh, cfg.train.batch_size, flow.routed_tokens(cfg, mcfg))
    except ValueError as e:
      rejected[shape] = str(e).splitlines()[0]
      continue
    fit.append(shape)
  return sorted(fit, key=_prior), rejected


def search(cfg, *, devices: Sequence[Any], chip: str, limit: int = 6) -> dict[str, Any]:
  """Plans the first `limit` (mesh, remat) candidates; returns {'rows': plans best first, 'best', counts}."""
  if limit < 1:
    raise ValueError(f'--search_limit={limit} is invalid: expected an integer >= 1')
  mcfg = config_lib.validate(cfg)
  meshes, rejected = candidates(cfg, devices, mcfg)
  remats = SEARCH_REMATS if mcfg.scan_layers else ('none',)
  pairs = list(itertools.islice(itertools.product(meshes, remats), limit))
  rows = []
  for shape, remat in pairs:
    c = cfg.copy_and_resolve_references()
    for axis, size in zip(parallel.AXES, shape):
      c.mesh[axis] = size
    c.train.remat = remat
    rows.append(plan_lib.plan(c, devices=devices, chip=chip))
  rows.sort(key=lambda p: (not p['fits'], p['roofline_s']['overlapped'] if p['fits'] else p['bytes']['peak']))
  return {'config': cfg.name, 'chip': rows[0]['chip'] if rows else chip, 'devices': len(devices),
          'global_batch': cfg.train.batch_size, 'meshes_divide': len(meshes), 'meshes_rejected': len(rejected),
          'candidates': len(meshes) * len(remats), 'planned': len(rows), 'rows': rows,
          'best': rows[0] if rows and rows[0]['fits'] else None}


def format_search(s: dict[str, Any]) -> str:
  lines = [f"search: {s['config']} on {s['devices']} x {s['chip']}, global batch {s['global_batch']}: "
           f"{s['meshes_divide']} meshes divide the model and batch ({s['meshes_rejected']} do not); "
           f"planned {s['planned']} of {s['candidates']} (mesh, remat) candidates (--search_limit)",
           f"  {'data':>4} {'fsdp':>4} {'expert':>6} {'model':>5}  {'remat':8} {'peak GiB':>9} {'fits':>4} "
           f"{'step ms':>15} {'MFU':>9} {'compile s':>9}"]
  for p in s['rows']:
    m, r = p['mesh'], p['roofline_s']
    lines.append(f"  {m['data']:>4} {m['fsdp']:>4} {m['expert']:>6} {m['model']:>5}  {p['remat']:8} "
                 f"{p['bytes']['peak'] / 2**30:>9.2f} {'yes' if p['fits'] else 'no':>4} "
                 f"{r['overlapped'] * 1e3:>7.3g}-{r['serial'] * 1e3:<7.3g} "
                 f"{p['mfu']['serial']:.2f}-{p['mfu']['overlapped']:.2f} {p['compile_s']:>9.1f}")
  b = s['best']
  lines.append('best: ' + (' '.join(f'--config.mesh.{k}={v}' for k, v in b['mesh'].items())
                           + f" --config.train.remat={b['remat']}" if b else 'nothing planned fits the chip'))
  return '\n'.join(lines)


__all__ = ['SEARCH_REMATS', 'candidates', 'factorisations', 'format_search', 'search']
