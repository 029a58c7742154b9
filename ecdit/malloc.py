"""glibc malloc settings for XLA:CPU, applied by the `ecdit` command re-executing itself once at start.

XLA:CPU mallocs each step's temporary buffers and frees them when the step ends, and glibc gives that memory
back to the kernel (large blocks are mmap'ed and unmapped, per-thread arenas are trimmed), so the next step
faults it in again, page by page, zero-filled: ~400k minor page faults and ~0.6 s of kernel time per train step
of the bench model on 2 cores. Keeping freed memory in one arena (no per-thread arenas, no mmap for large
blocks, no trimming) on transparent huge pages removes the faults: train step 0.90 (EC) to 0.93 (dense) of before
(docs/performance.md). The cost: the process keeps its peak heap, which is what the next step needs anyway.

Opt out with `ECDIT_SYSTEM_MALLOC=1`, or by setting `GLIBC_TUNABLES` yourself (it is then left alone). Other C
libraries ignore the variable; non-Linux systems are left alone.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLES = ':'.join((
    'glibc.malloc.arena_max=1',                   # one arena: the worker threads' frees stay reusable
    'glibc.malloc.mmap_max=0',                    # large blocks from the heap, not per-call mmap/munmap
    f'glibc.malloc.trim_threshold={64 << 30}',    # never hand the heap's top back to the kernel
    'glibc.malloc.hugetlb=1',                     # back the heap with transparent huge pages (glibc >= 2.35)
))
OPT_OUT = 'ECDIT_SYSTEM_MALLOC'


def tuned_environ(environ: Mapping[str, str], system: str | None = None, libc: str | None = None
                  ) -> dict[str, str] | None:
  """The environment to re-execute with, or None when nothing should change (not Linux/glibc, opted out, or
  `GLIBC_TUNABLES` already set — by the user, or by an earlier re-execution)."""
  system = platform.system() if system is None else system
  libc = platform.libc_ver()[0] if libc is None else libc
  if system != 'Linux' or libc != 'glibc' or 'GLIBC_TUNABLES' in environ:
    return None
  if environ.get(OPT_OUT, '').strip().lower() not in ('', '0', 'false', 'no'):
    return None
  return {**environ, 'GLIBC_TUNABLES': TUNABLES}


def reexec_with_tuned_malloc() -> None:
  """Replaces this process by the same command line under `tuned_environ` (glibc reads its tunables only at
  start); returns without doing anything when no change is needed. Call it before any heavy import."""
  env = tuned_environ(os.environ)
  if env is None or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
