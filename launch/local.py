#!/usr/bin/env python3
"""Run N copies of a command as one multi-process JAX job on this machine (loopback coordinator).

  python launch/local.py --num_processes=2 --devices_per_process=4 -- ecdit train --workdir=runs/x

Each process i gets ECDIT_COORDINATOR=127.0.0.1:<free port>, ECDIT_NUM_PROCESSES=N, ECDIT_PROCESS_ID=i,
which `ecdit.parallel.distributed.initialize()` reads. With `--devices_per_process=K` on CPU (the default
platform) each process simulates K CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K,
JAX_PLATFORMS=cpu), so 2 x 4 gives an 8-device global mesh. With `--platform=gpu`, process i drives GPUs
i*K .. i*K+K-1 instead.

Output of process i is printed line by line as `[p<i>] ...`. If any process exits non-zero or is killed by
a signal, the launcher names it, stops the others (SIGTERM, SIGKILL after --grace_period seconds) and exits
with that process's status (128+signal for a signal). A process that has called jax.distributed.initialize
catches SIGTERM (JAX's preemption notifier) and keeps waiting on its dead peer, so expect the SIGKILL.
Ctrl-C (or SIGTERM to the launcher) is forwarded to
every process; a second Ctrl-C kills them at once. `--timeout` bounds the whole run (exit 124).
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (launch/ is a folder of scripts, not a package)

POLL_S = 0.05


def free_port(host: str = '127.0.0.1') -> int:
  """A port nobody listens on right now (the OS picks it; process 0 binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def _with_device_count(xla_flags: str, count: int) -> str:
  kept = [f for f in xla_flags.split() if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={count}'])


def process_env(base: dict, i: int, n: int, port: int, devices_per_process: int | None, platform: str,
                extra: list[tuple[str, str]]) -> dict:
  """The environment of process i: the launcher's own, plus --env, plus the distributed variables."""
  env = dict(base)
  env.update(extra)
  env.pop(common.ENV_MODE, None)
  env.pop(common.ENV_LOCAL_DEVICE_IDS, None)
  env[common.ENV_COORDINATOR] = f'127.0.0.1:{port}'
  env[common.ENV_NUM_PROCESSES] = str(n)
  env[common.ENV_PROCESS_ID] = str(i)
  env['PYTHONUNBUFFERED'] = '1'   # live, line-by-line logs from Python children
  if devices_per_process:
    if platform == 'cpu':
      env['JAX_PLATFORMS'] = 'cpu'
      env['XLA_FLAGS'] = _with_device_count(env.get('XLA_FLAGS', ''), devices_per_process)
    else:
      first = i * devices_per_process
      env[common.ENV_LOCAL_DEVICE_IDS] = ','.join(str(d) for d in range(first, first + devices_per_process))
  return env


def describe_status(rc: int) -> str:
  if rc < 0:
    try:
      name = signal.Signals(-rc).name
    except ValueError:
      name = 'unknown'
    return f'was killed by signal {-rc} ({name})'
  return f'exited with code {rc}'


def exit_code(rc: int) -> int:
  return 128 - rc if rc < 0 else rc


def _die_with_parent():
  """In the child: get SIGTERM if the launcher itself dies (Linux), so no orphan keeps a port or a core."""
  try:
    import ctypes
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
  except Exception:  # noqa: BLE001 — best effort only
    pass


class Launcher:

  def __init__(self, command, envs, grace_period: float, timeout: float | None, out=None, err=None):
    self.command = command
    self.envs = envs
    self.grace = grace_period
    self.timeout = timeout
    self.out = out or sys.stdout
    self.err = err or sys.stderr
    self.lock = threading.Lock()
    self.procs: list[subprocess.Popen] = []
    self.readers: list[threading.Thread] = []
    self.exits: queue.Queue = queue.Queue()
    self.interrupt: int | None = None   # the signal the launcher got (SIGINT/SIGTERM)
    self.interrupt_count = 0

  # ---- output ----
  def say(self, msg: str):
    with self.lock:
      try:
        self.err.write(f'[launch] {msg}\n')
        self.err.flush()
      except (BrokenPipeError, ValueError):
        pass

  def _pump(self, i: int, stream):
    prefix = f'[p{i}] '
    for raw in iter(stream.readline, b''):
      line = raw.decode('utf-8', errors='replace')
      if not line.endswith('\n'):
        line += '\n'
      with self.lock:
        try:
          self.out.write(prefix + line)
          self.out.flush()
        except (BrokenPipeError, ValueError):
          pass
    stream.close()

  # ---- signals ----
  def _signal_all(self, sig: int):
    for p in self.procs:
      try:
        os.killpg(p.pid, sig)   # the child's whole group: it and anything it started
      except (ProcessLookupError, PermissionError):
        pass

  def _on_signal(self, signum, frame):
    self.interrupt_count += 1
    if self.interrupt is None:
      self.interrupt = signum
    if self.interrupt_count > 1:   # impatient second Ctrl-C: no more grace
      self._signal_all(signal.SIGKILL)

  def stop_all(self, sig: int):
    """Sends `sig` to every process group, waits up to the grace period, then SIGKILLs what is left."""
    self._signal_all(sig)
    deadline = time.monotonic() + self.grace
    while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(POLL_S)
    alive = [i for i, p in enumerate(self.procs) if p.poll() is None]
    if alive:
      self.say(f'process(es) {alive} still running after {self.grace:g} s; sending SIGKILL')
    self._signal_all(signal.SIGKILL)
    for p in self.procs:
      p.wait()

  # ---- main ----
  def run(self) -> int:
    old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      return self._run()
    finally:
      for s, handler in old.items():
        signal.signal(s, handler)

  def _run(self) -> int:
    preexec = _die_with_parent if sys.platform.startswith('linux') else None
    try:
      for env in self.envs:
        self.procs.append(subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           start_new_session=True, preexec_fn=preexec))
    except OSError as e:
      self.say(f'cannot start {self.command[0]!r}: {e}')
      self._signal_all(signal.SIGKILL)
      return 127
    for i, p in enumerate(self.procs):
      t = threading.Thread(target=self._pump, args=(i, p.stdout), daemon=True)
      t.start()
      self.readers.append(t)
      # Exits arrive on a queue in the order they happen, so the first process to die is the one named.
      threading.Thread(target=lambda i=i, p=p: self.exits.put((i, p.wait())), daemon=True).start()

    deadline = time.monotonic() + self.timeout if self.timeout else None
    code, finished = 0, 0
    while True:
      if self.interrupt is not None:
        name = signal.Signals(self.interrupt).name
        self.say(f'got {name}; forwarding it to all processes')
        self.stop_all(self.interrupt)
        code = 128 + self.interrupt
        break
      try:
        i, rc = self.exits.get(timeout=POLL_S)
      except queue.Empty:
        i, rc = None, None
      if i is not None:
        finished += 1
        if rc != 0:
          self.readers[i].join(timeout=2)   # let its last lines (a traceback) print before our message
          others = sum(p.poll() is None for p in self.procs)
          self.say(f'process {i} (pid {self.procs[i].pid}) {describe_status(rc)}'
                   + (f'; stopping the other {others} process(es)' if others else ''))
          self.stop_all(signal.SIGTERM)
          self.say(f'FAILED: process {i} {describe_status(rc)}')
          code = exit_code(rc)
          break
        if finished == len(self.procs):
          break
        continue
      if deadline is not None and time.monotonic() > deadline:
        self.say(f'--timeout={self.timeout:g} s reached; stopping all processes')
        self.stop_all(signal.SIGTERM)
        code = 124
        break
    for t in self.readers:
      t.join(timeout=5)
    if code == 0:
      self.say(f'all {len(self.procs)} process(es) exited with code 0')
    return code


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch/local.py', description=__doc__.split('\n\n')[0],
      usage='%(prog)s --num_processes=N [--devices_per_process=K] [flags] -- COMMAND [ARGS...]',
      epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', type=int, required=True, help='processes to start (>= 1)')
  parser.add_argument('--devices_per_process', type=int, default=None,
                      help='CPU: simulated devices per process; GPU: GPUs per process (default: leave as is)')
  parser.add_argument('--platform', choices=('cpu', 'gpu'), default='cpu',
                      help='what --devices_per_process counts (default cpu)')
  parser.add_argument('--port', type=int, default=0, help='coordinator port on 127.0.0.1 (default: a free one)')
  parser.add_argument('--grace_period', type=float, default=10.0,
                      help='seconds between SIGTERM and SIGKILL when stopping processes (default 10)')
  parser.add_argument('--timeout', type=float, default=0.0,
                      help='stop everything after this many seconds, exit 124 (default: no limit)')
  common.add_env_flag(parser)
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = common.parse_args(parser, argv)
  if args.num_processes < 1:
    parser.error('--num_processes must be >= 1')
  if args.devices_per_process is not None and args.devices_per_process < 1:
    parser.error('--devices_per_process must be >= 1')
  if not 0 < args.grace_period <= 45:
    parser.error('--grace_period must be in (0, 45] seconds (a failed run must end within 60 s)')
  extra = common.parse_env(args.env)
  port = args.port or free_port()
  command = common.resolve_ecdit(args.command)
  envs = [process_env(dict(os.environ), i, args.num_processes, port, args.devices_per_process, args.platform,
                      extra) for i in range(args.num_processes)]
  launcher = Launcher(command, envs, args.grace_period, args.timeout or None)
  devices = (f', {args.devices_per_process} {args.platform.upper()} device(s) each'
             if args.devices_per_process else '')
  launcher.say(f'{args.num_processes} process(es), coordinator 127.0.0.1:{port}{devices}: {common.sh_join(command)}')
  return launcher.run()


if __name__ == '__main__':
  sys.exit(common.main_wrapper(main))
