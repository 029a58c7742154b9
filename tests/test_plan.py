"""`ecdit plan` (ecdit.bench.plan): collective accounting on hand-written HLO, and on the real compiled step
a scanned stack (whose loop body appears once in the HLO) must account the same collectives as the unrolled
one; memory and roofline numbers are consistent with the chip table."""
from __future__ import annotations

import functools

import jax
import pytest

from ecdit.bench import chips, plan

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


@functools.lru_cache(maxsize=None)
def planned(scan: bool, remat: str = 'none'):
  c = tiny_config(remat=remat)
  c.model.depth, c.model.scan_layers = 4, scan
  c.mesh.data, c.mesh.expert = 2, 4
  return plan.plan(c, devices=jax.devices()[:8], chip='v5e')


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
