"""`ecdit plan` (ecdit.bench.plan): collective accounting on hand-written HLO, and on the real compiled step
a scanned stack (whose loop body appears once in the HLO) must account the same collectives as the unrolled
one; memory and roofline numbers are consistent with the chip table."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from ecdit.bench import chips, mesh_search, plan

from _train_util import tiny_config

pytestmark = pytest.mark.slow   # many compiles: scheduled first (tests/conftest.py)

HLO = """HloModule m

%body.1 (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %ar)
}

%cond.1 (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[4,8]) -> f32[2,8] {
  %w = (s32[], f32[4,8]) while(%init), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"3"}}
  %a2a = bf16[2,8]{1,0} all-to-all(%y), dimensions={0}
  ROOT %r = f32[2,8] convert(%a2a)
}
"""


def test_collectives_count_loop_bodies_by_their_trip_count():
  got = plan.collective_bytes(HLO)
  assert got['all-reduce'] == {'count': 3, 'bytes': 3 * 4 * 8 * 4}   # f32[4,8] three times
  assert got['all-to-all'] == {'count': 1, 'bytes': 2 * 8 * 2}      # bf16[2,8] once
  assert got['all-gather'] == {'count': 0, 'bytes': 0}


def planned_config(scan: bool, remat: str = 'none'):
  c = tiny_config(remat=remat)
  c.model.depth, c.model.scan_layers = 4, scan
  c.mesh.data, c.mesh.expert = 2, 4
  return c


_plan = plan.plan   # the real planner, also when a test stands in for it


@functools.lru_cache(maxsize=None)
def planned(scan: bool, remat: str = 'none'):
  return _plan(planned_config(scan, remat), devices=jax.devices()[:8], chip='v5e')


def test_scanned_and_unrolled_steps_account_the_same_collectives():
  scanned, unrolled = planned(True), planned(False)
  a2a = unrolled['collectives']['all-to-all']
  assert a2a['count'] == 2 * 4   # 2 MoE layers × (dispatch + return) × (forward + backward)
  assert scanned['collectives']['all-to-all'] == a2a
  assert scanned['bytes']['argument'] == unrolled['bytes']['argument']   # the same state, stacked
  for p in (scanned, unrolled):
    b, r = p['bytes'], p['roofline_s']
    assert p['fits'] and b['peak'] == b['argument'] + b['output'] - b['alias'] + b['temp'] > 0
    assert r['overlapped'] == max(r['compute'], r['hbm'], r['collectives']) > 0
    assert r['compute'] >= p['model_flops_per_step'] / 8 / chips.CHIPS['v5e'].bf16_flops
  # remat='save_moe' keeps the expert inputs and outputs: less temporary memory than no remat, and the
  # backward pass runs no all_to_all again
  saved = planned(True, 'save_moe')
  assert saved['collectives']['all-to-all'] == a2a and saved['bytes']['temp'] < scanned['bytes']['temp']
  text = plan.format_plan(scanned)
  assert 'on 8 x v5e (mesh data=2 fsdp=1 expert=4 model=1)' in text and 'fits' in text


def test_bad_chip_and_mesh_fail_with_one_line():
  with pytest.raises(ValueError, match=r"--chip='v9' is unknown: expected one of \['H100', 'H200', 'v4'"):
    plan.plan(tiny_config(), devices=jax.devices()[:8], chip='v9')
  c = tiny_config()
  c.mesh.data, c.mesh.expert = 3, 1
  with pytest.raises(ValueError, match='mesh'):
    plan.plan(c, devices=jax.devices()[:8], chip='v5p')


# ---- --search ------------------------------------------------------------------------------------------------

def test_factorisations_are_every_ordered_split():
  assert mesh_search.factorisations(12, 2) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]
  eight = mesh_search.factorisations(8)
  # 8 = 2³: three 2s into four ordered axes, C(3 + 3, 3) = 20 ways
  assert len(eight) == len(set(eight)) == 20 and all(np.prod(f) == 8 for f in eight)


def test_search_candidates_divide_and_come_experts_first():
  c = planned_config(True)   # 4 experts, 2 heads, width 32, batch 8
  meshes, rejected = mesh_search.candidates(c, jax.devices()[:8])
  # expert | 4 and model | 2 heads: e·m ∈ {1: 4 (data, fsdp) splits of 8, 2 (e=1,m=2 / e=2,m=1): 3 each,
  # 4 (e=2,m=2 / e=4,m=1): 2 each, 8 (e=4,m=2): 1} = 15; the other 5 of the 20 are refused, naming the number
  assert len(meshes) == 15 and len(rejected) == 5
  assert meshes[0] == (2, 1, 4, 1) and meshes[1] == (1, 2, 4, 1) and meshes[-1][2] == 1
  assert rejected[(1, 1, 8, 1)].startswith('model.num_experts=4 is not divisible by mesh expert=8')


def test_search_plans_the_first_candidates_best_first(monkeypatch):
  asked = []

  def cached_plan(c, *, devices, chip):   # the search's (mesh, remat) reach the planner; compiled once per file
    mesh = tuple(c.mesh[a] for a in ('data', 'fsdp', 'expert', 'model'))
    asked.append((mesh, c.train.remat))
    assert mesh == (2, 1, 4, 1) and chip == 'v5e' and len(devices) == 8 and c.model.scan_layers
    return planned(True, c.train.remat)

  monkeypatch.setattr(mesh_search.plan_lib, 'plan', cached_plan)
  s = mesh_search.search(planned_config(True), devices=jax.devices()[:8], chip='v5e', limit=2)
  assert asked == [((2, 1, 4, 1), 'save_moe'), ((2, 1, 4, 1), 'none')]
  assert s['planned'] == 2 and s['candidates'] == 15 * 3
  assert [(tuple(p['mesh'].values()), p['remat']) for p in s['rows']] in (
      [((2, 1, 4, 1), 'save_moe'), ((2, 1, 4, 1), 'none')], [((2, 1, 4, 1), 'none'), ((2, 1, 4, 1), 'save_moe')])
  steps = [p['roofline_s']['overlapped'] for p in s['rows']]
  assert steps == sorted(steps) and s['best'] is s['rows'][0]
  text = mesh_search.format_search(s)
  assert 'planned 2 of 45' in text and 'best: --config.mesh.data=2 --config.mesh.fsdp=1 --config.mesh.expert=4' in text
  with pytest.raises(ValueError, match='--search_limit=0'):
    mesh_search.search(planned_config(True), devices=jax.devices()[:8], chip='v5e', limit=0)


def test_a_device_count_no_mesh_could_use_is_refused_before_devices_exist():
  c = tiny_config()   # batch 8 over data·fsdp·expert, 2 heads over model: at most 16 devices
  plan.check_device_count(c, 16)
  with pytest.raises(ValueError, match=r'^--devices=17 is more than any mesh can use: at most train.batch_size=8 '
                                       r'over data, fsdp and expert times model.num_heads=2 over model = 16$'):
    plan.check_device_count(c, 17)
