"""launch/ scripts and ecdit.parallel.distributed: process supervision, rendered job files, quoting."""
from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml   # PyYAML: a pinned test dependency (requirements-test.txt), so these tests never skip

from ecdit.parallel import distributed

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
PY = sys.executable
EVIL = 'x; rm -rf /'
# Everything a shell or YAML could misread: quotes, $, backticks, backslash, newline, tab, non-ASCII.
NASTY = 'it\'s "$HOME" `id` \\n\\ \n\ttab é 😀 \u2028 #c: {a: [b]} - *x &y !z'


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f'ecdit_launch_{name}', LAUNCH / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


local, slurm, tpu_vm, gke = (_load(n) for n in ('local', 'slurm', 'tpu_vm', 'gke'))
common = local.common   # the one `common` module all four scripts share


def run_local(args, child: str, timeout: float = 60):
  """launch/local.py ARGS -- python -c CHILD; returns (CompletedProcess, seconds)."""
  start = time.monotonic()
  proc = subprocess.run([PY, str(LAUNCH / 'local.py'), *args, '--', PY, '-c', textwrap.dedent(child)],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  return proc, time.monotonic() - start


# ---------------------------------------------------------------- local.py

def test_local_both_succeed_prefixed_output_and_env():
  proc, _ = run_local(['--num_processes=2', '--devices_per_process=3', '--env', f'EXTRA={EVIL}'], """
      import os
      e = os.environ
      print('hello', e['ECDIT_PROCESS_ID'], e['ECDIT_NUM_PROCESSES'], e['ECDIT_COORDINATOR'])
      print('flags', e['JAX_PLATFORMS'], e['XLA_FLAGS'].split().count('--xla_force_host_platform_device_count=3'),
            'count=8' in e['XLA_FLAGS'], e['EXTRA'])
      """)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  for i in (0, 1):
    hello = [l for l in lines if l.startswith(f'[p{i}] hello')]
    assert len(hello) == 1 and hello[0].split()[2:4] == [str(i), '2']
    assert hello[0].split()[4].startswith('127.0.0.1:')
    assert f'[p{i}] flags cpu 1 False {EVIL}' in lines   # the inherited 8-device flag was replaced
  assert 'all 2 process(es) exited with code 0' in proc.stderr


def test_local_one_process_fails_others_stopped(tmp_path):
  # p1 exits 3 once p0 is ready; p0 would sleep for 2 minutes and ignores SIGTERM, so it needs the SIGKILL.
  proc, seconds = run_local(['--num_processes=2', '--grace_period=2', '--env', f'READY={tmp_path}/ready'], """
      import os, signal, sys, time
      ready = os.environ['READY']
      if os.environ['ECDIT_PROCESS_ID'] == '1':
        for _ in range(600):
          if os.path.exists(ready):
            break
          time.sleep(0.05)
        print('bye', flush=True)
        sys.exit(3)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      open(ready, 'w').close()
      time.sleep(120)
      """)
  assert proc.returncode == 3
  assert seconds < 60
  assert 'process 1 (pid' in proc.stderr and 'exited with code 3' in proc.stderr
  assert 'FAILED: process 1 exited with code 3' in proc.stderr.splitlines()[-1]
  assert 'still running after 2 s; sending SIGKILL' in proc.stderr
  assert '[p1] bye' in proc.stdout


def test_local_process_killed_by_signal():
  proc, seconds = run_local(['--num_processes=2', '--grace_period=5'], """
      import os, signal, time
      if os.environ['ECDIT_PROCESS_ID'] == '0':
        time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(120)
      """)
  assert proc.returncode == 128 + signal.SIGKILL
  assert seconds < 60
  assert 'FAILED: process 0 was killed by signal 9 (SIGKILL)' in proc.stderr


def test_local_ctrl_c_is_forwarded():
  child = textwrap.dedent("""
      import os, signal, sys, time
      signal.signal(signal.SIGINT, lambda *a: (print('got SIGINT', flush=True), sys.exit(0)))
      print('ready', flush=True)
      time.sleep(120)
      """)
  launcher = subprocess.Popen([PY, str(LAUNCH / 'local.py'), '--num_processes=2', '--', PY, '-c', child],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    ready = set()
    while len(ready) < 2:
      line = launcher.stdout.readline()
      assert line, 'launcher ended early'
      if line.endswith('ready\n'):
        ready.add(line[:4])
    launcher.send_signal(signal.SIGINT)
    out, err = launcher.communicate(timeout=60)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 128 + signal.SIGINT
  assert '[p0] got SIGINT' in out and '[p1] got SIGINT' in out
  assert 'got SIGINT; forwarding it' in err


def test_local_needs_a_command():
  proc = subprocess.run([PY, str(LAUNCH / 'local.py'), '--num_processes=2'], capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode == 2 and 'no command' in proc.stderr


def test_local_env_contract_matches_distributed():
  for name in ('ENV_COORDINATOR', 'ENV_NUM_PROCESSES', 'ENV_PROCESS_ID', 'ENV_LOCAL_DEVICE_IDS', 'ENV_MODE'):
    assert getattr(common, name) == getattr(distributed, name)
  env = local.process_env({'XLA_FLAGS': '--foo --xla_force_host_platform_device_count=8'}, 1, 2, 1234, 2,
                          'gpu', [])
  assert env['ECDIT_LOCAL_DEVICE_IDS'] == '2,3' and 'JAX_PLATFORMS' not in env
  setup, kwargs = distributed.plan(env=env)
  assert setup.mode == 'explicit' and (setup.num_processes, setup.process_id) == (2, 1)
  assert kwargs['local_device_ids'] == [2, 3]
  assert kwargs['coordinator_bind_address'] == '127.0.0.1:1234'
  assert kwargs['cluster_detection_method'] == 'deactivate'


JAX_CHILD = """
    from ecdit.parallel import distributed
    setup = distributed.initialize()
    assert distributed.initialize() is setup   # idempotent
    import os, jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ('d',))
    local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), local, (jax.device_count(),))
    if os.environ.get('DIE') == str(jax.process_index()):
      os.kill(os.getpid(), 9)   # dies; the other process is left waiting in the psum below
    total = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, 'd'), mesh=mesh, in_specs=P('d'),
                                  out_specs=P('d')))(x)
    print(f'mode={setup.mode} process_count={jax.process_count()} device_count={jax.device_count()} '
          f'psum={float(total.addressable_data(0)[0])}', flush=True)
    """


@pytest.mark.slow
def test_local_two_jax_processes():
  proc, seconds = run_local(['--num_processes=2', '--devices_per_process=4'], JAX_CHILD)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for i in (0, 1):   # 4 devices hold 1.0, 4 hold 2.0
    assert f'[p{i}] mode=explicit process_count=2 device_count=8 psum=12.0' in proc.stdout.splitlines()
  assert seconds < 30


@pytest.mark.slow
def test_local_jax_process_dies_survivor_stopped():
  proc, seconds = run_local(['--num_processes=2', '--devices_per_process=4', '--grace_period=2',
                             '--env', 'DIE=1'], JAX_CHILD)
  assert proc.returncode == 128 + signal.SIGKILL
  assert 'FAILED: process 1 was killed by signal 9' in proc.stderr
  assert 'psum=' not in proc.stdout
  assert seconds < 60


# ---------------------------------------------------------------- distributed.plan

def test_distributed_plan_modes():
  assert distributed.plan(env={})[0].mode == 'single'
  assert distributed.plan(env={'ECDIT_DISTRIBUTED': 'auto'}) == (
      distributed.Setup('cluster', 'ECDIT_DISTRIBUTED=auto'), {})
  slurm_env = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0',
               'SLURM_NTASKS': '16'}
  assert distributed.plan(env=slurm_env)[0].mode == 'cluster'
  assert distributed.plan(env={**slurm_env, 'SLURM_NTASKS': '1'})[0].mode == 'single'
  assert distributed.plan(env={**slurm_env, 'ECDIT_DISTRIBUTED': 'off'})[0].mode == 'single'
  assert distributed.plan(env={'TPU_WORKER_HOSTNAMES': 'a,b,c,d'})[0].mode == 'cluster'
  assert distributed.plan(env={'TPU_WORKER_HOSTNAMES': 'a'})[0].mode == 'single'
  # An explicit coordinator wins over the SLURM variables around it (a loopback run inside an allocation).
  setup, kwargs = distributed.plan('10.0.0.1:99', 4, 3, env=slurm_env)
  assert setup.mode == 'explicit' and kwargs['cluster_detection_method'] == 'deactivate'
  assert 'coordinator_bind_address' not in kwargs
  assert distributed.plan('127.0.0.1:9', 1, 0, env={})[0].mode == 'single'
  with pytest.raises(ValueError, match='missing'):
    distributed.plan(env={'ECDIT_COORDINATOR': '127.0.0.1:1'})
  with pytest.raises(ValueError, match='process_id=2'):
    distributed.plan('127.0.0.1:1', 2, 2, env={})
  with pytest.raises(ValueError, match='ECDIT_DISTRIBUTED'):
    distributed.plan(env={'ECDIT_DISTRIBUTED': 'yes please'})


def test_distributed_initialize_single_process_is_noop(monkeypatch):
  for k in list(os.environ):
    if k.startswith(('ECDIT_', 'SLURM_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR')):
      monkeypatch.delenv(k)
  monkeypatch.setattr(distributed, '_SETUP', None)
  setup = distributed.initialize()
  assert setup.mode == 'single' and distributed.initialize() is setup


@pytest.mark.slow
def test_distributed_initialize_after_jax_started_is_a_clear_error():
  code = textwrap.dedent("""
      import jax
      jax.devices()
      from ecdit.parallel import distributed
      try:
        distributed.initialize('127.0.0.1:1', 2, 0)
      except RuntimeError as e:
        print('error:', e)
      """)
  proc = subprocess.run([PY, '-c', code], capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert 'error: ecdit.parallel.distributed.initialize() must run before any JAX computation' in proc.stdout


# ---------------------------------------------------------------- slurm.py

def _slurm_args(tmp_path, **kw):
  args = slurm.build_parser().parse_args([])
  args.__dict__.update(dict(job_name=EVIL, nodes=2, gpus_per_node=4, partition='gpu', account='acct; echo pwned',
                            chdir=str(tmp_path), venv=str(tmp_path / 'venv'), env=[f'A={NASTY}'],
                            command=['ecdit', 'train', f'--workdir=runs/{EVIL}', NASTY]), **kw)
  return args


def test_slurm_script_is_valid_and_quoted(tmp_path):
  script = slurm.render(_slurm_args(tmp_path))
  path = tmp_path / 'job.sbatch'
  path.write_text(script)
  assert subprocess.run(['bash', '-n', str(path)], capture_output=True).returncode == 0
  directives = {l.split('=', 1)[0]: l for l in script.splitlines() if l.startswith('#SBATCH')}
  assert shlex.split(directives['#SBATCH --job-name']) == ['#SBATCH', f'--job-name={EVIL}']
  assert shlex.split(directives['#SBATCH --account']) == ['#SBATCH', '--account=acct; echo pwned']
  assert '#SBATCH --ntasks-per-node=4' in script and '#SBATCH --gpus-per-node=4' in script
  # Bare, `x; rm -rf /` would end the word at ';': every occurrence must read back whole.
  assert script.count(EVIL) == 2
  srun_block = script[script.index('\nsrun ') + 1:]   # NASTY holds a newline, so the srun call spans lines
  assert shlex.split(srun_block) == ['srun', '--kill-on-bad-exit=1', '--ntasks-per-node=4', 'ecdit', 'train',
                                     f'--workdir=runs/{EVIL}', NASTY]

  # Run the script with stand-ins for srun and the venv: srun must get the command word for word.
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  (tmp_path / 'venv' / 'bin' / 'activate').write_text('export ACTIVATED=1\n')
  fake = tmp_path / 'fakebin'
  fake.mkdir()
  (fake / 'srun').write_text('#!/bin/bash\nprintf "%s\\0" "$ACTIVATED" "$ECDIT_DISTRIBUTED" "$A" "$@" > argv.bin\n')
  (fake / 'srun').chmod(0o755)
  env = {**os.environ, 'PATH': f'{fake}:{os.environ["PATH"]}'}
  subprocess.run(['bash', str(path)], check=True, env=env, cwd=tmp_path, timeout=30)
  got = (tmp_path / 'argv.bin').read_bytes().decode().split('\0')[:-1]
  assert got[:3] == ['1', 'auto', NASTY]
  assert got[3:] == ['--kill-on-bad-exit=1', '--ntasks-per-node=4', 'ecdit', 'train', f'--workdir=runs/{EVIL}',
                     NASTY]


def test_slurm_cli_dry_run_and_errors(tmp_path):
  proc = subprocess.run([PY, str(LAUNCH / 'slurm.py'), '--dry_run', f'--job_name={EVIL}', '--gpus_per_node=0',
                         '--nodes=1', '--', 'ecdit', 'train'], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0 and proc.stdout.startswith('#!/bin/bash')
  assert 'ECDIT_DISTRIBUTED' not in proc.stdout   # a single task needs no distributed start-up
  assert not list(tmp_path.iterdir())
  with pytest.raises(common.LaunchError, match='newline'):
    slurm.render(_slurm_args(tmp_path, job_name='a\nrm -rf /'))
  with pytest.raises(common.LaunchError, match='KEY=VALUE'):
    slurm.render(_slurm_args(tmp_path, env=['A B=1']))


# ---------------------------------------------------------------- tpu_vm.py

def test_tpu_vm_commands_round_trip(tmp_path):
  args = tpu_vm.build_parser().parse_args(['--tpu=my-tpu', '--zone=us-west4-a', f'--remote_dir={tmp_path}',
                                           '--copy_repo=.', '--pip_install', '--env', f'A={NASTY}'])
  args.command = ['ecdit', 'train', f'--workdir={EVIL}', NASTY]
  steps = tpu_vm.plan(args, tarball='/tmp/t.tgz')
  assert [label for label, _ in steps] == ['pack the repository', 'copy it to every worker', 'unpack it',
                                           'install on every worker', 'run on every worker']
  for _, argv in steps:
    assert shlex.split(common.sh_join(argv)) == argv
  run = steps[-1][1]
  assert run[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu'] and '--worker=all' in run
  remote = next(a for a in run if a.startswith('--command='))[len('--command='):]
  assert shlex.split(remote)[-6:] == [f'ECDIT_DISTRIBUTED=auto', f'A={NASTY}', 'ecdit', 'train',
                                      f'--workdir={EVIL}', NASTY]
  # What a worker's shell does with it: a stand-in `ecdit` records its arguments.
  (tmp_path / '.venv' / 'bin').mkdir(parents=True)
  (tmp_path / '.venv' / 'bin' / 'activate').write_text(f'export PATH={shlex.quote(str(tmp_path))}:$PATH\n')
  (tmp_path / 'ecdit').write_text('#!/bin/bash\nprintf "%s\\0" "$ECDIT_DISTRIBUTED" "$A" "$@" > argv.bin\n')
  (tmp_path / 'ecdit').chmod(0o755)
  subprocess.run(['bash', '-c', remote], check=True, timeout=30)
  got = (tmp_path / 'argv.bin').read_bytes().decode().split('\0')[:-1]
  assert got == ['auto', NASTY, 'train', f'--workdir={EVIL}', NASTY]


def test_tpu_vm_each_launch_packs_to_its_own_path():
  """Two launches never share a tarball, here or on the workers (a fixed path let them overwrite each other)."""
  args = tpu_vm.build_parser().parse_args(['--tpu=t', '--zone=z', '--copy_repo=.'])
  args.command = ['ecdit', 'train']
  first, second = tpu_vm.launch_tarball(), tpu_vm.launch_tarball()
  assert first != second and os.path.dirname(first) == tempfile.gettempdir()
  steps = dict(tpu_vm.plan(args, first))
  assert steps['pack the repository'][2] == first
  assert f't:{os.path.basename(first)}' in steps['copy it to every worker']
  unpack = next(a for a in steps['unpack it'] if a.startswith('--command='))
  assert f'tar -xzf {os.path.basename(first)}' in unpack and 'ecdit-repo.tar.gz' not in unpack


def test_tpu_vm_cli_dry_run():
  proc = subprocess.run([PY, str(LAUNCH / 'tpu_vm.py'), '--dry_run', '--tpu=t', '--zone=z', '--project=p', '--',
                         'ecdit', 'train', f'--workdir={EVIL}'], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(l) for l in proc.stdout.splitlines() if not l.startswith('#')]
  assert len(commands) == 1 and commands[0][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
  assert {'--zone=z', '--project=p', '--worker=all'} <= set(commands[0])


# ---------------------------------------------------------------- gke.py

def _gke(argv):
  args = gke.build_parser().parse_args(['--name=ec-xl', '--image=img:1', '--env', f'A={NASTY}', *argv])
  args.command = ['ecdit', 'train', f'--workdir={EVIL}', NASTY]
  return args


def test_gke_tpu_jobset_parses_and_carries_values():
  doc = yaml.safe_load(gke.render(_gke(['--tpu_accelerator=tpu-v5-lite-podslice', '--tpu_topology=4x4',
                                        '--num_slices=2'])))
  assert doc['kind'] == 'JobSet' and doc['metadata']['name'] == 'ec-xl'
  rjob = doc['spec']['replicatedJobs'][0]
  assert rjob['replicas'] == 2
  job = rjob['template']['spec']
  assert job['parallelism'] == job['completions'] == 4 and job['backoffLimit'] == 0   # 16 chips / 4 per host
  pod = job['template']['spec']
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                 'cloud.google.com/gke-tpu-topology': '4x4'}
  (container,) = pod['containers']
  assert container['command'] == ['ecdit', 'train', f'--workdir={EVIL}', NASTY]
  assert container['resources']['limits'] == {'google.com/tpu': 4}
  env = {e['name']: e.get('value') for e in container['env']}
  assert env == {'A': NASTY, 'ECDIT_DISTRIBUTED': 'auto'}


def test_gke_gpu_jobset_explicit_coordinator():
  doc = yaml.safe_load(gke.render(_gke(['--num_nodes=2', '--gpus_per_node=8',
                                        '--gpu_accelerator=nvidia-h100-80gb'])))
  pod = doc['spec']['replicatedJobs'][0]['template']['spec']['template']['spec']
  (container,) = pod['containers']
  assert container['resources']['limits'] == {'nvidia.com/gpu': 8}
  env = {e['name']: e for e in container['env']}
  assert env['ECDIT_COORDINATOR']['value'] == 'ec-xl-workers-0-0.ec-xl:8476'
  assert env['ECDIT_NUM_PROCESSES']['value'] == '2'
  assert 'job-completion-index' in env['ECDIT_PROCESS_ID']['valueFrom']['fieldRef']['fieldPath']


def test_gke_rejects_bad_input():
  with pytest.raises(common.LaunchError, match='--name'):
    gke.render(SimpleNamespace(**{**vars(_gke([])), 'name': EVIL}))
  with pytest.raises(common.LaunchError, match='both'):
    gke.render(_gke(['--tpu_topology=4x4']))
  with pytest.raises(common.LaunchError, match=r'^--gpus_per_node=-1 is invalid: expected an integer >= 0$'):
    gke.render(_gke(['--gpus_per_node=-1']))
  proc = subprocess.run([PY, str(LAUNCH / 'gke.py'), '--dry_run', f'--name={EVIL}', '--image=i', '--', 'x'],
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2 and 'error: --name' in proc.stderr


def test_yaml_dump_round_trips_awkward_values():
  obj = {'plain': NASTY, 'yes': 'no', 'n': ['on', 'null', '1', '0x1f', '', '~', '- a', [], {}],
         NASTY: {'nested': [{'a': 1, 'b': True}, ['x', 'y']]}, 'num': 3}
  assert yaml.safe_load(common.yaml_dump(obj)) == obj
