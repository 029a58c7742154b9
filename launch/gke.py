#!/usr/bin/env python3
"""Write a JobSet manifest that runs an ecdit command on a GKE TPU or GPU node pool, and apply it.

  # TPU: a v5e 4x4 slice (4 hosts x 4 chips); hosts are derived from the topology
  python launch/gke.py --name=ec-xl --image=us-docker.pkg.dev/p/r/ecdit:latest \\
      --tpu_accelerator=tpu-v5-lite-podslice --tpu_topology=4x4 \\
      -- ecdit train --config=experiments/paper.py:xl_32e --workdir=gs://bucket/runs/ec-xl

  # GPU: 2 nodes x 8 H100
  python launch/gke.py --name=ec-xl --image=... --num_nodes=2 --gpus_per_node=8 \\
      --gpu_accelerator=nvidia-h100-80gb -- ecdit train ...

`--dry_run` prints the YAML; otherwise it is piped to `kubectl apply -f -`. The JobSet runs one pod per host,
all started together; `backoffLimit: 0` fails the Job when one pod fails and JobSet's failure policy then
restarts the whole set (`--max_restarts`, default 0), so no pod is left waiting for a dead peer.

How the processes find each other: on TPU node pools JAX's own detection reads the variables GKE puts in
every TPU pod (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES, MEGASCALE_* for several slices); the pod gets
ECDIT_DISTRIBUTED=auto. On GPU node pools the pod gets an explicit coordinator instead: pod 0's stable DNS
name `<name>-workers-0-0.<name>:<port>`, the process count, and its own index from the Job completion index.
The command runs without a shell (container `command:`), so its arguments need no shell quoting; every
YAML string is double-quoted with escapes, so values read back exactly.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RJOB = 'workers'
TPU_PORTS = (8471, 8080)   # TPU runtime and multislice (megascale) ports


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch/gke.py', description=__doc__.split('\n\n')[0],
      usage='%(prog)s --name=NAME --image=IMAGE (--tpu_accelerator=A --tpu_topology=T | --gpus_per_node=G) '
            '[flags] -- COMMAND [ARGS...]',
      epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--name', required=True, help='JobSet name (lowercase letters, digits, -)')
  parser.add_argument('--image', required=True, help='container image with ecdit installed')
  parser.add_argument('--namespace', default=None)
  parser.add_argument('--num_nodes', type=int, default=None,
                      help='hosts (pods) per slice; TPU default: chips in the topology / --chips_per_node')
  parser.add_argument('--num_slices', type=int, default=1, help='TPU slices (multislice), default 1')
  tpu = parser.add_argument_group('TPU node pool')
  tpu.add_argument('--tpu_accelerator', default=None, help='e.g. tpu-v5-lite-podslice, tpu-v5p-slice')
  tpu.add_argument('--tpu_topology', default=None, help='e.g. 4x4, 2x2x2')
  tpu.add_argument('--chips_per_node', type=int, default=4, help='TPU chips per host (default 4)')
  gpu = parser.add_argument_group('GPU node pool')
  gpu.add_argument('--gpus_per_node', type=int, default=0, help='nvidia.com/gpu per pod')
  gpu.add_argument('--gpu_accelerator', default=None, help='node selector, e.g. nvidia-h100-80gb')
  gpu.add_argument('--port', type=int, default=8476, help='coordinator port on pod 0 (GPU; default 8476)')
  parser.add_argument('--cpu', default=None, help='CPU request per pod, e.g. 32')
  parser.add_argument('--memory', default=None, help='memory request per pod, e.g. 400Gi')
  parser.add_argument('--workdir', default=None, help='container working directory')
  parser.add_argument('--service_account', default=None, help='Kubernetes service account of the pods')
  parser.add_argument('--max_restarts', type=int, default=0, help='JobSet restarts after a failure')
  parser.add_argument('--privileged', action='store_true', help='privileged containers (older TPU GKE versions)')
  parser.add_argument('--dry_run', action='store_true', help='print the manifest; apply nothing')
  common.add_env_flag(parser)
  return parser


def _hosts_from_topology(topology: str, chips_per_node: int) -> int:
  if not re.match(r'^\d+(x\d+)*$', topology):
    raise common.LaunchError(f'--tpu_topology={topology!r}: expected dimensions like 4x4 or 2x2x2')
  chips = math.prod(int(d) for d in topology.split('x'))
  return max(1, chips // chips_per_node)


def _field_env(name: str, path: str) -> dict:
  return {'name': name, 'valueFrom': {'fieldRef': {'fieldPath': path}}}


def manifest(args) -> dict:
  """The JobSet as plain dicts (rendered by common.yaml_dump)."""
  common.check_dns_label('--name', args.name)
  is_tpu = bool(args.tpu_accelerator or args.tpu_topology)
  if is_tpu and not (args.tpu_accelerator and args.tpu_topology):
    raise common.LaunchError('TPU node pools need both --tpu_accelerator and --tpu_topology')
  if args.gpus_per_node < 0:
    raise common.LaunchError(f'--gpus_per_node={args.gpus_per_node} is invalid: expected an integer >= 0')
  if is_tpu and args.gpus_per_node:
    raise common.LaunchError('choose a TPU (--tpu_*) or a GPU (--gpus_per_node) node pool, not both')
  if args.num_slices < 1 or (args.num_slices > 1 and not is_tpu):
    raise common.LaunchError('--num_slices > 1 is for TPU multislice only')
  nodes = args.num_nodes or (_hosts_from_topology(args.tpu_topology, args.chips_per_node) if is_tpu else 1)
  if nodes < 1:
    raise common.LaunchError('--num_nodes must be >= 1')

  env = [{'name': k, 'value': v} for k, v in common.parse_env(args.env)]
  resources: dict = {}
  node_selector: dict = {}
  container: dict = {'name': 'ecdit', 'image': args.image, 'command': list(args.command)}
  if is_tpu:
    node_selector = {'cloud.google.com/gke-tpu-accelerator': args.tpu_accelerator,
                     'cloud.google.com/gke-tpu-topology': args.tpu_topology}
    resources = {'limits': {'google.com/tpu': args.chips_per_node}}
    container['ports'] = [{'containerPort': p} for p in TPU_PORTS]
    env.append({'name': common.ENV_MODE, 'value': 'auto'})
  else:
    if args.gpu_accelerator:
      node_selector = {'cloud.google.com/gke-accelerator': args.gpu_accelerator}
    if args.gpus_per_node:
      resources = {'limits': {'nvidia.com/gpu': args.gpus_per_node}}
    if nodes > 1:
      container['ports'] = [{'containerPort': args.port}]
      env += [{'name': common.ENV_COORDINATOR, 'value': f'{args.name}-{RJOB}-0-0.{args.name}:{args.port}'},
              {'name': common.ENV_NUM_PROCESSES, 'value': str(nodes)},
              _field_env(common.ENV_PROCESS_ID,
                         "metadata.annotations['batch.kubernetes.io/job-completion-index']")]
  requests = {k: v for k, v in (('cpu', args.cpu), ('memory', args.memory)) if v}
  if requests:
    resources['requests'] = requests
  if args.workdir:
    container['workingDir'] = args.workdir
  if env:
    container['env'] = env
  if resources:
    container['resources'] = resources
  if args.privileged:
    container['securityContext'] = {'privileged': True}

  pod_spec: dict = {'restartPolicy': 'Never'}
  if is_tpu:
    pod_spec.update(hostNetwork=True, dnsPolicy='ClusterFirstWithHostNet')
  if node_selector:
    pod_spec['nodeSelector'] = node_selector
  if args.service_account:
    pod_spec['serviceAccountName'] = args.service_account
  pod_spec['containers'] = [container]

  metadata: dict = {'name': args.name}
  if args.namespace:
    metadata['namespace'] = args.namespace
  if is_tpu:   # one slice per node pool
    metadata['annotations'] = {'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}
  return {
      'apiVersion': 'jobset.x-k8s.io/v1alpha2',
      'kind': 'JobSet',
      'metadata': metadata,
      'spec': {
          'failurePolicy': {'maxRestarts': args.max_restarts},
          'network': {'enableDNSHostnames': True},
          'replicatedJobs': [{
              'name': RJOB,
              'replicas': args.num_slices,
              'template': {'spec': {
                  'parallelism': nodes,
                  'completions': nodes,
                  'completionMode': 'Indexed',
                  'backoffLimit': 0,
                  'template': {'spec': pod_spec},
              }},
          }],
      },
  }


def render(args) -> str:
  return '# Written by launch/gke.py.\n' + common.yaml_dump(manifest(args)) + '\n'


def main(argv=None) -> int:
  args = common.parse_args(build_parser(), argv)
  text = render(args)
  if args.dry_run:
    sys.stdout.write(text)
    return 0
  kubectl = ['kubectl', 'apply', '-f', '-'] + (['--namespace', args.namespace] if args.namespace else [])
  return common.submit(kubectl, dry_run=False, stdin_text=text)


if __name__ == '__main__':
  sys.exit(common.main_wrapper(main))
