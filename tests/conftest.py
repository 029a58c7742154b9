"""Test set-up, before JAX is imported anywhere: 8 simulated CPU devices, fast XLA compiles, one persistent
compilation cache for the session, and the slow modules scheduled first.

- The suite's time is mostly XLA:CPU compiling small programs. `--xla_backend_optimization_level=0` skips
  LLVM's optimisation of the generated code (about a third of each compile); the HLO, and so every sharding,
  collective and fusion the tests inspect, is unchanged. Subprocesses that set their own XLA_FLAGS
  add `ECDIT_TEST_XLA_FLAGS` (tests/cli_util.py). A user's own XLA_FLAGS take precedence.
- The cache lives in a fresh temporary folder per session (removed at exit), so nothing carries over between
  runs; within one, tests and `ecdit` subprocesses (which inherit the environment) that compile the same
  program compile it once. Its key covers the HLO, the devices and the XLA flags.
- With `pytest -n 2` (README) whole modules go to the two workers; the modules marked `slow` go first so that
  the last module to finish is a short one.
"""
import atexit
import os
import shutil
import tempfile

FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ.setdefault('ECDIT_TEST_XLA_FLAGS', FAST_COMPILE)
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {FAST_COMPILE}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='ecdit-test-xla-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'


def pytest_collection_modifyitems(config, items):
  slow_modules = {item.module.__name__ for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)   # stable: file order otherwise
