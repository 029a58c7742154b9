"""The `ecdit` command line: `train` configuration errors are one line naming the key, before any compile;
every command's `--help` lists its own flags; the error boundary (one line, exit 2 usage / 1 runtime)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ecdit(*args, timeout=120):
  env = dict(os.environ, XLA_FLAGS=os.environ.get('ECDIT_TEST_XLA_FLAGS', ''), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'ecdit.cli', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  """stderr lines other than absl's standard hint after a flag error."""
  return [l for l in stderr.splitlines() if l.strip() and not l.startswith('Pass --helpshort')]


# Through the command line: errors of the flag parser, the config file, a variant, and the mesh against the
# device count (found by the training loop's build, before it compiles).
@pytest.mark.parametrize('args,needle', [
    (['--config.train.bogus=1'], 'train.bogus'),
    (['--config=experiments/shapes_tiny.py', '--config.model.widht=64'], 'model.widht'),
    (['--config.train.num_steps=abc'], 'config.train.num_steps'),
    (['--config.train.optimizer=sgd'], 'train.optimizer'),
    (['--config.mesh.data=3', '--config.mesh.fsdp=1'], 'multiplies to 3 devices'),   # vs the device count
    (['--config=experiments/shapes_small.py:moe'], 'moe'),
    (['--config=experiments/nope.py'], 'nope.py'),
    (['--config.model.capacity_factor=inf'], 'model.capacity_factor=inf is invalid: expected a finite number > 0'),
])
def test_bad_config_is_one_line(args, needle, tmp_path):
  r = ecdit('train', f'--workdir={tmp_path}', *args)
  assert r.returncode != 0
  lines = error_lines(r.stderr)
  assert len(lines) == 1, r.stderr
  assert needle in lines[0], lines[0]
  assert 'Traceback' not in r.stderr
  assert not (tmp_path / 'checkpoints').exists()


# Bad values the same check (`config.experiment.validate`, which `ecdit train` calls first) refuses: in this
# process, one subprocess per case would cost seconds each for the same code path as train.optimizer above.
@pytest.mark.parametrize('changes,needle', [
    ({'train.num_steps': 0}, 'train.num_steps'),
    ({'model.routing': 'random'}, 'model.routing'),
    ({'model.width': 100, 'model.num_heads': 3}, 'model.width'),
    ({'diffusion.mask_ratio': 1.5}, 'diffusion.mask_ratio'),
    ({'mesh.data': 0}, 'mesh.data'),
    ({'train.max_skipped_steps': -1}, 'train.max_skipped_steps'),
    ({'train.learning_rate': 1e39}, 'train.learning_rate=1e+39 is invalid: expected a finite number > 0 and <= 10'),
    ({'train.weight_decay': float('nan')}, 'train.weight_decay=nan is invalid: expected a finite number >= 0'),
    ({'train.grad_clip': float('inf')}, 'train.grad_clip=inf'),
    ({'train.ema_decay': 1.0}, 'train.ema_decay=1.0'),
    ({'sample.cfg_scale': float('inf')}, 'sample.cfg_scale=inf'),
    ({'sample.num_steps': 10**9}, 'sample.num_steps=1000000000 is invalid: expected an integer from 1 to 10000'),
    ({'model.capacity_factor': float('nan')}, 'model.capacity_factor=nan is invalid: expected a finite number > 0'),
    ({'model.eval_capacity_factor': float('inf')}, 'model.eval_capacity_factor=inf'),
    ({'model.router_init_std': float('nan')}, 'model.router_init_std=nan is invalid: expected a finite number >= 0'),
    ({'model.aux_loss_weight': -0.5}, 'model.aux_loss_weight=-0.5 is invalid: expected a finite number >= 0'),
])
def test_bad_config_value_names_the_key(changes, needle):
  from ecdit.config import experiment as config_lib
  from _train_util import load_experiment
  cfg = load_experiment('shapes_tiny')
  for key, value in changes.items():
    section, name = key.split('.')
    cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  assert needle in str(e.value) and '\n' not in str(e.value).strip(), str(e.value)


def test_help_lists_commands():
  r = ecdit('--help')
  assert r.returncode == 0 and 'train' in r.stdout and 'sample' in r.stdout


# ---- per-command help ----------------------------------------------------------------------------------------

# command (and benchmark) → a flag only it has, with words of that flag's help string.
OWN_FLAG = {
    ('train',): ('--[no]progress', 'show a progress bar'),
    ('sample',): ('--repeat', 'images per prompt'),
    ('prepare',): ('--config', 'its `data` section is used'),
    ('params',): ('--[no]dense', 'count the dense model'),
    ('eval',): ('--[no]ground_truth', 'render the prompts with the shapes world'),
    ('analyze',): ('--min_fg', 'a token is foreground'),
    ('compare',): ('--workdirs', 'comma-separated training run directories'),
    ('export',): ('--platforms', 'platforms to lower for'),
    ('upcycle',): ('--moe_every', 'every n-th block is sparse'),
    ('bench',): ('--group_sizes', 'routing-group sizes'),
    ('bench', 'routing'): ('--group_sizes', 'routing-group sizes'),
    ('bench', 'suite'): ('--json', 'write the results to this JSON file'),
}


@pytest.mark.parametrize('command', sorted(OWN_FLAG), ids=' '.join)
def test_command_help_lists_its_own_flags(command):
  r = ecdit(*command, '--help')
  assert r.returncode == 0, r.stderr
  flag, words = OWN_FLAG[command]
  line = next((l for l in r.stdout.splitlines() if l.strip().startswith(flag + ':')), None)
  assert line is not None and words in line, r.stdout
  assert r.stdout.startswith(f'usage: ecdit {" ".join(command)}')
  assert '--[no]verbose' in r.stdout          # the shared flag
  others = {f for c, (f, _) in OWN_FLAG.items() if c[0] != command[0] and f != '--config'}
  assert not [f for f in others if f'{f}:' in r.stdout], r.stdout   # no other command's flags


def test_bench_help_is_per_benchmark():
  routing, suite = ecdit('bench', 'routing', '--help').stdout, ecdit('bench', 'suite', '--help').stdout
  assert '--json:' not in routing and '--group_sizes:' not in suite
  assert routing.splitlines()[2].startswith('routing: gather vs one-hot')


def test_bench_json_is_checked_before_measuring(tmp_path):
  (tmp_path / 'afile').write_text('x')
  r = ecdit('bench', 'suite', f'--json={tmp_path}/afile/r.json', timeout=60)
  assert r.returncode == 2 and error_lines(r.stderr) == [
      f'ecdit: error: --json={tmp_path}/afile/r.json cannot be created: no writable directory above it'], r.stderr
  assert not r.stdout   # refused before the suite printed (or measured) anything


def test_bench_variants_names_an_unknown_group():
  r = ecdit('bench', 'variants', '--variants=layout,nope', timeout=60)
  assert r.returncode == 2 and error_lines(r.stderr) == [
      "ecdit: error: --variants=layout,nope is invalid: ['nope'] are not groups; expected some of layout, "
      'precision, experts_float32, experts_bf16'], r.stderr
  assert not r.stdout


# ---- the error boundary --------------------------------------------------------------------------------------

BOOM = '''
import sys, types
from ecdit import cli, errors
m = types.ModuleType('boom')
def main(argv):
  kind = argv[1]
  if kind == 'bug':
    raise KeyError('a bug keeps its traceback')
  if kind == 'oserror':   # the filesystem refusing a path no check anticipated
    raise PermissionError(13, 'Permission denied', '/some/run/config.json')
  if kind == 'oserror_no_path':
    raise OSError('a socket went away')
  if kind == 'verbose':   # what library code sees (errors.verbose: Orbax's logs of its failures kept or not)
    print(errors.verbose())
    return
  raise getattr(errors, kind)('the disk\\nis gone')
m.main = main
sys.modules['boom'] = m
cli.COMMANDS['boom'] = ('boom', 'raises what it is told')
sys.exit(cli.run(['ecdit', 'boom', *sys.argv[1:]]))
'''


def boom(*args, env=None):
  full_env = {k: v for k, v in os.environ.items() if k != 'ECDIT_VERBOSE'}
  full_env.update(JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable, '-c', BOOM, *args], cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize('kind,code', [('UsageError', 2), ('RunError', 1), ('EcditError', 1)])
def test_error_boundary_one_line_and_exit_status(kind, code):
  r = boom(kind)
  assert r.returncode == code
  assert r.stderr == 'ecdit: error: the disk is gone\n'   # the message's lines joined: one line
  verbose = boom(kind, '--verbose')
  assert verbose.returncode == code and 'Traceback' in verbose.stderr
  assert verbose.stderr.splitlines()[-1] == 'ecdit: error: the disk is gone'
  env = boom(kind, env={'ECDIT_VERBOSE': '1'})
  assert env.returncode == code and 'Traceback' in env.stderr


def test_verbose_flag_reaches_library_code():
  assert boom('verbose').stdout == 'False\n'
  assert boom('verbose', '--verbose').stdout == 'True\n'


def test_a_bug_keeps_its_traceback():
  r = boom('bug')
  assert r.returncode == 1 and 'Traceback' in r.stderr and 'ecdit: error' not in r.stderr
  r = boom('oserror_no_path')   # an OSError about no path is not a filesystem refusal
  assert r.returncode == 1 and 'Traceback' in r.stderr and 'ecdit: error' not in r.stderr


def test_a_filesystem_refusal_is_one_line_naming_the_path():
  r = boom('oserror')
  assert r.returncode == 1 and r.stderr == 'ecdit: error: Permission denied: /some/run/config.json\n', r.stderr
  verbose = boom('oserror', '--verbose')
  assert 'Traceback' in verbose.stderr and 'PermissionError' in verbose.stderr


def test_error_classes_keep_their_bases_and_exit_status():
  from ecdit import errors
  from ecdit.config.experiment import ConfigError
  from ecdit.eval.compare import CompareError
  from ecdit.export.weights import ExportError
  from ecdit.models.hf_loading import LoadError
  from ecdit.train.checkpoint import CheckpointError, NonFiniteStateError
  from ecdit.train.loop import NonFiniteLossError
  from ecdit.train.workdir import WorkdirError
  for cls in (ConfigError, WorkdirError, ExportError, LoadError, CompareError):
    assert issubclass(cls, ValueError) and issubclass(cls, errors.UsageError) and cls('x').exit_code == 2
  for cls in (CheckpointError, NonFiniteStateError, NonFiniteLossError):
    assert issubclass(cls, RuntimeError) and issubclass(cls, errors.RunError) and cls('x').exit_code == 1
  from ecdit.data.reader import DataError   # a damaged dataset or tokenizer; a ValueError, as it was
  assert issubclass(DataError, ValueError) and issubclass(DataError, errors.RunError) and DataError('x').exit_code == 1


def test_library_defines_no_flags_and_never_imports_commands():
  import ast
  for path in sorted((REPO / 'ecdit').rglob('*.py')):
    rel = path.relative_to(REPO).as_posix()
    if rel.startswith('ecdit/commands/') or rel == 'ecdit/cli.py':
      continue
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr.startswith('DEFINE_'):
        raise AssertionError(f'{rel}:{node.lineno} defines a flag; flags belong in ecdit/commands/')
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith(('ecdit.commands', 'ecdit.cli')):
        raise AssertionError(f'{rel}:{node.lineno} imports {node.module}')
      if isinstance(node, ast.Import) and any(a.name.startswith(('ecdit.commands', 'ecdit.cli'))
                                              for a in node.names):
        raise AssertionError(f'{rel}:{node.lineno} imports ecdit.commands or ecdit.cli')
      if isinstance(node, ast.ImportFrom) and node.module == 'ecdit' and any(
          a.name in ('commands', 'cli') for a in node.names):
        raise AssertionError(f'{rel}:{node.lineno} imports ecdit.{node.names[0].name}')


# ---- accepted nonsense: the shared flag checks, in this process; two commands end to end ------------------

def test_unknown_key_names_the_typo_not_a_valid_key():
  from ml_collections.config_flags import config_path
  from ecdit.commands import flags as cflags
  from ecdit.config.experiment import base_config
  for typo, hint in [('train.num_stepz', ''), ('trian.num_steps', " (did you mean 'train'?)")]:
    with pytest.raises((KeyError, AttributeError)) as e:
      config_path.set_value(typo, base_config(), 3)
    argv = ['ecdit', '--config.train.num_steps=2', f'--config.{typo}=3', '--config.sample.num_steps=2']
    assert cflags._unknown_key_message(e.value, argv) == f'--config.{typo}: unknown config key {typo!r}{hint}'


def test_number_and_prompt_flag_checks():
  from types import SimpleNamespace as Flag
  from ecdit import errors
  from ecdit.commands import flags as cflags
  for bad in (-3.0, float('nan'), float('inf')):   # nan passes a plain `< 0` test; inf is no guidance scale
    with pytest.raises(errors.UsageError, match=rf'^--cfg_scale={bad} is invalid: expected a finite number >= 0$'):
      cflags.at_least(Flag(name='cfg_scale', value=bad), 0.0)
  cflags.at_least(Flag(name='cfg_scale', value=0.0), 0.0)
  with pytest.raises(errors.UsageError, match=r'^--experts=-3 is invalid: expected an integer >= 1$'):
    cflags.at_least(Flag(name='experts', value=-3), 1)
  cflags.at_least(Flag(name='cfg_scale', value=None), 0.0)   # not given: the run's value
  assert cflags.prompt_list(Flag(name='prompts', value=' a ;; b;'), 'c') == ['a', 'b']
  assert cflags.prompt_list(Flag(name='prompts', value=None), 'c;d') == ['c', 'd']
  for empty in ('', ' ; '):   # given but empty: an error, not the default
    with pytest.raises(errors.UsageError, match='^--prompts=.* holds no prompt'):
      cflags.prompt_list(Flag(name='prompts', value=empty), 'c')
  for ok in (None, 1, 10_000):
    cflags.ode_steps(Flag(name='steps', value=ok))
  for bad in (0, 10_001, 10**9):   # 1e9 ODE steps would run for days
    with pytest.raises(errors.UsageError, match=rf'^--steps={bad} is invalid: expected an integer from 1 to 10000'):
      cflags.ode_steps(Flag(name='steps', value=bad))


def test_image_counts_are_bounded_before_a_checkpoint_is_read():
  from ecdit import errors
  from ecdit.diffusion import sampler
  from ecdit.eval import shapes_eval
  sampler.check_image_count(4, 1024)
  with pytest.raises(errors.UsageError, match=r'^--repeat=100000000 with 4 prompt\(s\) asks for 400000000 images: '
                                              r'expected at most 4096 per call \(1024 per prompt here\)$'):
    sampler.check_image_count(4, 10**8)
  shapes_eval.check_image_count(16384, 4)
  with pytest.raises(ValueError, match=r'^3 records in --prompts=p.jsonl with --images_per_prompt=30000 asks for '
                                       r'90000 images: expected at most 65536'):
    shapes_eval.check_image_count(3, 30000, '3 records in --prompts=p.jsonl')


@pytest.mark.parametrize('args,line', [
    (['params', '--size=XL', '--experts=-3'], '--experts=-3 is invalid: expected an integer >= 1'),
    (['bench', 'profile', '--batch=0'], '--batch=0 is invalid: expected an integer >= 1'),
    (['bench', 'data', '--batch=0'], '--batch is not a flag of the data benchmark (its own flags follow `--`, '
                                     'e.g. `ecdit bench data -- --batch_size=64`)'),
    # checked before the workdir (which does not exist) is read
    (['sample', '--workdir=/nonexistent/run', '--prompts='],
     "--prompts='' holds no prompt: expected a ';'-separated list"),
    (['eval', '--workdir=/nonexistent/run', '--num_prompts=100000000'],   # not even a prompt generated
     '--num_prompts=100000000 with --images_per_prompt=4 asks for 400000000 images: expected at most 65536 per '
     'evaluation'),
])
def test_nonsense_flags_are_one_line_before_any_work(args, line):
  r = ecdit(*args)
  assert r.returncode == 2 and error_lines(r.stderr) == [f'ecdit: error: {line}'], r.stderr


def test_bench_data_arguments_are_checked():
  from ecdit import errors
  from ecdit.bench import data
  for argv, line in [(['--batch_size=0'], '--batch_size=0 is invalid: expected an integer >= 1'),
                     (['--num_examples=-5'], '--num_examples=-5 is invalid: expected an integer >= 1'),
                     (['--batch=3'], 'ecdit bench data: unrecognized arguments: --batch=3')]:
    with pytest.raises(errors.UsageError) as e:
      data.run(argv)
    assert str(e.value) == line


# ---- experiment files from any directory ---------------------------------------------------------------------

def test_relative_experiment_paths_resolve_in_the_checkout(tmp_path, monkeypatch):
  from ecdit.config import experiment as config_lib
  monkeypatch.chdir(tmp_path)
  assert config_lib.experiment_path('experiments/paper.py:xl_32e') == f'{REPO}/experiments/paper.py:xl_32e'
  assert config_lib.experiment_module('experiments/shapes_tiny.py').get_config().name == 'shapes_tiny'
  (tmp_path / 'experiments').mkdir()
  (tmp_path / 'experiments' / 'paper.py').write_text('')
  assert config_lib.experiment_path('experiments/paper.py:a') == 'experiments/paper.py:a'   # the cwd's first
  for kept in ('experiments/nope.py', '/abs/experiments/shapes_tiny.py', ''):
    assert config_lib.experiment_path(kept) == kept


def test_default_and_missing_configs_from_another_directory(tmp_path):
  from cli_util import run_cli
  r = run_cli('plan', '--help', cwd=tmp_path, timeout=120)
  assert r.returncode == 0 and f"(default: '{REPO}/experiments/shapes_tiny.py')" in r.stdout, r.stdout
  r = run_cli('params', '--config=experiments/nope.py:x', cwd=tmp_path, timeout=120)
  assert r.returncode == 2 and error_lines(r.stderr) == [
      f'ecdit: error: --config=experiments/nope.py:x: no experiment file at experiments/nope.py (looked in '
      f'{tmp_path} and {REPO})'], r.stderr
