"""Multi-process start-up: one call, `initialize()`, before anything else touches JAX.

JAX runs multi-host jobs as one process per host (or per GPU), each driving its local devices; the processes
find each other through a coordinator (process 0). `initialize()` decides how this process joins, in order:

1. **Explicit** — arguments to `initialize`, or the variables `launch/local.py` (and `launch/gke.py` for GPU
   node pools) set: `ECDIT_COORDINATOR` (host:port of process 0), `ECDIT_NUM_PROCESSES`, `ECDIT_PROCESS_ID`,
   optionally `ECDIT_LOCAL_DEVICE_IDS` (comma-separated accelerator ids this process drives). JAX's own
   cluster detection is switched off in this mode, so a loopback run inside a SLURM allocation is not
   mistaken for a SLURM job.
2. **Cluster** — JAX detects the cluster itself; we call `jax.distributed.initialize()` with no arguments
   when any of these is present:
     - `ECDIT_DISTRIBUTED=auto` (set by `launch/slurm.py`, `launch/tpu_vm.py`, `launch/gke.py`);
     - SLURM inside `srun` with more than one task: `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_PROCID`,
       `SLURM_LOCALID` and `SLURM_NTASKS` > 1 (JAX then gives each task the one GPU `SLURM_LOCALID`);
     - GKE TPU pods / multislice: `TPU_WORKER_HOSTNAMES`, `TPU_PROCESS_ADDRESSES` or
       `MEGASCALE_COORDINATOR_ADDRESS` naming more than one host (or `MEGASCALE_NUM_SLICES` > 1);
     - `JAX_COORDINATOR_ADDRESS` (JAX's own variable; the rest comes from JAX's detection).
     - a Cloud TPU VM (libtpu installed and TPU chips present, as JAX decides at import): JAX asks the TPU
       metadata server for the slice's workers, so a slice started by hand (`gcloud ... ssh --worker=all`)
       works too; if the metadata server does not answer, the process runs alone.
3. **Single process** — nothing found: a no-op, JAX runs on the local devices.

`ECDIT_DISTRIBUTED=off` forces 3. The call is idempotent: later calls return the first result. It must run
before any JAX computation or `jax.devices()` call (JAX refuses otherwise; we say so in one line).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

ENV_COORDINATOR = 'ECDIT_COORDINATOR'
ENV_NUM_PROCESSES = 'ECDIT_NUM_PROCESSES'
ENV_PROCESS_ID = 'ECDIT_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'ECDIT_LOCAL_DEVICE_IDS'
ENV_MODE = 'ECDIT_DISTRIBUTED'   # 'auto' | 'off' | unset (detect)

_LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '[::1]')


@dataclasses.dataclass(frozen=True)
class Setup:
  """How this process joined: mode is 'single', 'explicit' or 'cluster'; `reason` says what decided it."""
  mode: str
  reason: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


_SETUP: Setup | None = None
_NOTHING_FOUND = 'no cluster environment found'
_OFF = ('off', '0', 'false', 'no')


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (libtpu installed and TPU chips present), as JAX decides when it is imported."""
  if 'tpu' not in os.environ.get('JAX_PLATFORMS', 'tpu').lower():
    return False   # the run is pinned to CPU/GPU
  try:
    import jax  # noqa: F401  (importing runs JAX's TPU VM check; it does not start a backend)
    from jax._src import cloud_tpu_init
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def _int_env(env, name: str) -> int | None:
  raw = env.get(name)
  if raw is None or raw == '':
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f'{name}={raw!r}: expected an integer') from None


def _host_count(value: str | None) -> int:
  return len([h for h in (value or '').split(',') if h.strip()])


def detect_cluster(env=None) -> str | None:
  """The reason to let JAX auto-detect a multi-process cluster, or None for a plain single process."""
  env = os.environ if env is None else env
  mode = env.get(ENV_MODE, '').strip().lower()
  if mode == 'auto':
    return f'{ENV_MODE}=auto'
  if mode in _OFF:
    return None
  if mode not in ('', 'detect'):
    raise ValueError(f'{ENV_MODE}={env.get(ENV_MODE)!r}: expected auto, off or unset')
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS')
  if all(k in env for k in slurm) and (_int_env(env, 'SLURM_NTASKS') or 0) > 1:
    return f'SLURM job {env["SLURM_JOB_ID"]} with {env["SLURM_NTASKS"]} tasks'
  for name in ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES'):
    if _host_count(env.get(name)) > 1:
      return f'{name} lists {_host_count(env.get(name))} TPU hosts'
  if env.get('MEGASCALE_COORDINATOR_ADDRESS') or (_int_env(env, 'MEGASCALE_NUM_SLICES') or 1) > 1:
    return 'TPU multislice (MEGASCALE_*)'
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  return None


def plan(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
         local_device_ids: Sequence[int] | None = None, env=None) -> tuple[Setup, dict]:
  """Decides the mode without touching JAX: (Setup, keyword arguments for jax.distributed.initialize)."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
  if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
    raw = env[ENV_LOCAL_DEVICE_IDS]
    try:
      local_device_ids = [int(x) for x in raw.split(',') if x.strip()]
    except ValueError:
      raise ValueError(f'{ENV_LOCAL_DEVICE_IDS}={raw!r}: expected comma-separated integers') from None

  explicit = {'coordinator': coordinator, 'num_processes': num_processes, 'process_id': process_id}
  given = {k for k, v in explicit.items() if v is not None}
  if given:
    if given != set(explicit):
      missing = sorted(set(explicit) - given)
      raise ValueError(f'distributed: {sorted(given)} given but {missing} missing; set all three '
                       f'(arguments or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}) or none')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'distributed: process_id={process_id} must be in [0, num_processes={num_processes})')
    if ':' not in coordinator:
      raise ValueError(f'distributed: coordinator {coordinator!r} must be host:port')
    if num_processes == 1:
      return Setup('single', 'num_processes=1'), {}
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                  local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
                  cluster_detection_method='deactivate')
    host, port = coordinator.rsplit(':', 1)
    if host in _LOOPBACK_HOSTS:   # a local run: listen on loopback only, not on every interface
      kwargs['coordinator_bind_address'] = f'{host}:{port}'
    return Setup('explicit', 'coordinator given', coordinator, num_processes, process_id), kwargs

  reason = detect_cluster(env)
  if reason is None:
    off = env.get(ENV_MODE, '').strip().lower() in _OFF
    return Setup('single', f'{ENV_MODE}=off' if off else _NOTHING_FOUND), {}
  kwargs = {}
  if local_device_ids is not None:
    kwargs['local_device_ids'] = list(local_device_ids)
  return Setup('cluster', reason), kwargs


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> Setup:
  """Joins this process to its multi-process job (or does nothing for a single process); see the module doc.

  Returns a `Setup`; a second call returns the first call's result without doing anything.
  """
  global _SETUP
  if _SETUP is not None:
    return _SETUP
  setup, kwargs = plan(coordinator, num_processes, process_id, local_device_ids)
  if setup.mode == 'single' and not (setup.reason == _NOTHING_FOUND and _on_cloud_tpu_vm()):
    _SETUP = setup
    return setup

  import jax
  from jax._src import xla_bridge   # private, but the only way to name the real problem before JAX does

  if jax.distributed.is_initialized():   # someone (a test harness, user code) already did it
    _SETUP = dataclasses.replace(setup, reason=setup.reason + ' (already initialized)')
    return _SETUP
  if xla_bridge.backends_are_initialized():
    raise RuntimeError('ecdit.parallel.distributed.initialize() must run before any JAX computation or '
                       'jax.devices() call; call it first thing in the program')
  if setup.mode == 'single':   # a Cloud TPU VM: JAX asks the metadata server how many workers the slice has
    try:
      jax.distributed.initialize()
    except ValueError:   # metadata not reachable: run as the single process we are
      _SETUP = dataclasses.replace(setup, reason='Cloud TPU VM, but JAX found no worker list')
      return _SETUP
    setup = Setup('cluster', 'Cloud TPU VM')
  else:
    jax.distributed.initialize(**kwargs)
  if setup.mode == 'cluster':
    setup = dataclasses.replace(setup, num_processes=jax.process_count(), process_id=jax.process_index())
  _SETUP = setup
  return setup


def shutdown() -> None:
  """Leaves the distributed job (optional: JAX also does it at exit); initialize() may be called again."""
  global _SETUP
  if _SETUP is not None and _SETUP.mode != 'single':
    import jax
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()
  _SETUP = None
