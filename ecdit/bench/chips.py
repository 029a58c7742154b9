"""Accelerator specs for `ecdit plan`: one row per chip, per chip (not per host or pod).

Sources: Cloud TPU system-architecture pages (v4, v5e, v5p, v6e: peak bf16, HBM capacity and bandwidth, ICI
bandwidth per chip) and NVIDIA's H100 / H200 SXM datasheets (dense bf16 without sparsity, HBM, NVLink).
`interconnect` is the per-chip bandwidth a collective can use, bytes/s: TPU ICI (bidirectional, as published)
and NVLink 4 within a node — a plan whose collectives cross nodes is optimistic by the node-to-node ratio.
"""
from __future__ import annotations

import dataclasses

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float      # peak dense bfloat16 FLOP/s
  hbm_bytes: float       # memory per chip
  hbm_bandwidth: float   # bytes/s
  interconnect: float    # bytes/s per chip for collectives


CHIPS = {c.name: c for c in (
    Chip('v4', 275e12, 32 * GB, 1200 * GB, 300 * GB),       # ICI 2400 Gbps
    Chip('v5e', 197e12, 16 * GB, 819 * GB, 400 * GB),
    Chip('v5p', 459e12, 95 * GB, 2765 * GB, 600 * GB),      # ICI 4800 Gbps
    Chip('v6e', 918e12, 32 * GB, 1638 * GB, 800 * GB),
    Chip('H100', 989e12, 80 * GB, 3350 * GB, 900 * GB),
    Chip('H200', 989e12, 141 * GB, 4800 * GB, 900 * GB),
)}


def chip(name: str) -> Chip:
  if name not in CHIPS:
    raise ValueError(f'--chip={name!r} is unknown: expected one of {sorted(CHIPS)}')
  return CHIPS[name]
