"""The `ecdit` command's glibc malloc settings (ecdit/malloc.py): when they apply, and that they do what they
are there for — memory freed and allocated again is not faulted in from the kernel a second time."""
import os
import platform
import subprocess
import sys

import pytest

from ecdit import malloc

_PROBE = '''
import os, resource, numpy as np
from ecdit import malloc
malloc.reexec_with_tuned_malloc()
a = np.ones(1 << 26); del a                              # 512 MiB written, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(1 << 26)
print(os.environ.get('GLIBC_TUNABLES'), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def test_tuned_environ_applies_only_to_linux_glibc_without_user_settings():
  env = {'PATH': '/bin'}
  assert malloc.tuned_environ(env, 'Linux', 'glibc') == {'PATH': '/bin', 'GLIBC_TUNABLES': malloc.TUNABLES}
  assert malloc.tuned_environ(env, 'Darwin', '') is None
  assert malloc.tuned_environ(env, 'Linux', '') is None              # musl and others: not glibc
  assert malloc.tuned_environ({**env, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'Linux', 'glibc') is None
  assert malloc.tuned_environ({**env, 'ECDIT_SYSTEM_MALLOC': '1'}, 'Linux', 'glibc') is None
  assert malloc.tuned_environ({**env, 'ECDIT_SYSTEM_MALLOC': '0'}, 'Linux', 'glibc') is not None
  assert 'glibc.malloc.mmap_max=0' in malloc.TUNABLES.split(':')


def _probe(**env):
  base = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', malloc.OPT_OUT)}
  out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True, check=True, timeout=120,
                       env={**base, **env}).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_reexec_sets_tunables_and_reused_memory_is_not_faulted_again():
  tunables, faults = _probe()
  assert tunables == malloc.TUNABLES
  system_tunables, system_faults = _probe(ECDIT_SYSTEM_MALLOC='1')
  assert system_tunables == 'None'
  # glibc's default unmaps the freed 512 MiB and faults every page in again (256 faults at least, with numpy's
  # 2 MiB transparent huge pages; 131072 with 4 KiB pages); the tuned heap hands the same pages back.
  assert system_faults >= 256 and faults * 10 < system_faults, (faults, system_faults)
