"""`specialize train` as a pod user runs it: several processes joined by the command's own flags,
preempted by SIGTERM, killed by SIGKILL, and restarted with the same command; then `specialize
eval`, `sweep` and `infer` over the run beside a half-written checkpoint, with 1 and 2 processes.

Every run is processes of the same command (`specialize train ...`, a tiny model on the tiny demo
data, 24 steps, a checkpoint every 4) into a fresh MODEL_DIR, each process forked from a server
that has imported the libraries (`tests/support/forked_commands.py`; it skips 7 s of imports per
process, and is otherwise the command's own process):

Terms:
  one-process run: 1 process with 4 fake CPU devices (the reference).
  two-process run: 2 processes with 2 fake CPU devices each, joined on loopback by
    `--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id i` (gloo collectives):
    one 4-device mesh.
  in-loop evaluation: the uninterrupted one- and two-process runs evaluate at steps 12 and 24
    (two demo tasks, 4 examples, 8 new tokens) and must write the same eval outputs.
  save in flight: `checkpoint_28`, step metadata without a commit and no arrays, as an orbax save
    on an object store looks midway; eval, sweep and infer must skip it (reading it fails), and
    only process 0 lists the run (`process_zero.py`).

The data: the demo's prepared set, unpacked, read with the default layout
(`shard_by_process=True`): each process reads only its data shard's rows of every global batch
(`partitioning.data_layout`), which are the rows one process would feed those devices, so the
global batches do not depend on the process count.

  four-process runs: 4 processes x 2 fake CPU devices against 1 process x 8 devices on the same
    mesh, in the interleaved order of a TPU slice (`partitioning.DEVICE_ORDER_ENV`: each process
    holds data coordinates p and p + 4 of data 8 x model 1, or, as replica pairs across the model
    axis, 0 and 2 / 1 and 3 of data 4 x model 2), also killed and resumed; data 1 x model 8 (every
    process feeds the whole batch) reads its start checkpoint per shard.
"""
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from specialize_jax.checkpoints import directories
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import param_tree
from specialize_jax.checkpoints import t5x_legacy
from specialize_jax.training import partitioning
from tests.support import demo_data
from tests.support import forked_commands
from tests.support import processes
from tests.support import tiny_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 24
CHECKPOINT_PERIOD = 4
TIMEOUT_S = 600  # A hang's limit; on a loaded 2-core machine a run can take minutes.
OVERRIDES = {
    'TRAIN_STEPS': TRAIN_STEPS, 'BATCH_SIZE': 8, 'LOG_PERIOD': 1,
    'CHECKPOINT_PERIOD': CHECKPOINT_PERIOD, 'KEEP_LAST_CHECKPOINTS': 2, 'EVAL_PERIOD': 0,
    'LEARNING_RATE': 3e-3, 'LR_SCHEDULE': "'constant'", 'WARMUP_STEPS': 2,
    **tiny_model.gin_bindings(),
    # Unpacked: packing each shard's examples on its own would change the rows (see the docstring).
    'USE_PACKING': False,
}
PROGRESS_LINE = re.compile(r'step (\d+)/\d+ \| loss ([0-9.naninf]+)')
# The in-loop evaluation of the uninterrupted runs (steps 12 and 24), and what `specialize eval`,
# `sweep` and `infer` decode: 4 examples of two demo tasks, 8 new tokens, batches of 4.
EVAL_TASKS = ('demo_id_cot', 'demo_ood_cot')
EVAL_PERIOD = 12
IN_LOOP_EVAL = {'EVAL_PERIOD': EVAL_PERIOD, 'EVAL_TASKS': repr(EVAL_TASKS), 'EVAL_MAX_EXAMPLES': 4,
                'EVAL_BATCH_SIZE': 4, 'EVAL_MAX_DECODE_LENGTH': 8}
EVAL_FEATURE_LENGTHS = {'inputs': 256, 'targets': 80}  # the demo's


@pytest.fixture(scope='module')
def commands(tmp_path_factory):
  """What starts the commands' processes (`forked_commands.Server`) and their environment
  (`.env`): the tiny demo data, one compilation cache for all runs."""
  with demo_data.tiny_demo_data(tmp_path_factory) as directory:
    server = forked_commands.Server(processes.environment(
        SPECIALIZE_DATA_DIR=str(directory.parent), JAX_PLATFORMS='cpu',
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0'))
    yield server
    server.close()


@pytest.mark.parametrize('command', [
    ['train', '--gin_file=f.gin'], ['eval', '--gin_file=f.gin'], ['infer', '--gin_file=f.gin'],
    ['sweep', 'runs/x']])
def test_every_job_joins_the_cluster_before_it_starts(monkeypatch, command):
  """`--multihost` alone is JAX's auto-detection (`jax.distributed.initialize()`, no arguments);
  explicit flags go to `distributed.initialize`; both before the job runs."""
  import jax  # pylint: disable=g-import-not-at-top
  from specialize_jax import cli  # pylint: disable=g-import-not-at-top
  from specialize_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  events = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: events.append(('auto', a, k)))
  monkeypatch.setattr(distributed, 'initialize',
                      lambda *a: events.append(('explicit', a)) or a[0] is not None)
  job = lambda args, *extra: events.append(('job', args.command)) or 0
  monkeypatch.setattr(cli.jobs, 'cmd_gin_job', job)
  monkeypatch.setattr(cli.sweep, 'cmd_sweep', job)

  assert cli.main(command + ['--multihost']) == 0
  assert events == [('explicit', (None, None, None)), ('auto', (), {}), ('job', command[0])]
  events.clear()
  assert cli.main(command + ['--coordinator_address=127.0.0.1:1234', '--num_processes=2',
                             '--process_id=1']) == 0
  assert events == [('explicit', ('127.0.0.1:1234', 2, 1)), ('job', command[0])]
  events.clear()
  assert cli.main(command) == 0
  assert events == [('job', command[0])]  # not asked: nothing initialized


def test_incomplete_distributed_flags_fail_naming_the_missing_ones(monkeypatch, capsys):
  from specialize_jax import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cli.jobs, 'cmd_gin_job', lambda *a: pytest.fail('the job must not start'))
  assert cli.main(['train', '--gin_file=f.gin', '--coordinator_address=127.0.0.1:1234']) == 2
  assert capsys.readouterr().err.strip() == (
      "specialize train: Multi-process runs need all of coordinator_address ('127.0.0.1:1234'), "
      "num_processes (None) and process_id (None); set the missing ones or none.")


@pytest.mark.parametrize('command', [['train', '--gin_file=f.gin'], ['sweep', 'runs/x']])
def test_several_processes_without_jax_distributed_fail_naming_the_flag(monkeypatch, capsys,
                                                                      command):
  """A multi-host slice started without `--multihost`: one line, exit 2, the job never starts."""
  import jax  # pylint: disable=g-import-not-at-top
  from specialize_jax import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(cli.jobs, 'cmd_gin_job', lambda *a: pytest.fail('the job must not start'))
  monkeypatch.setattr(cli.sweep, 'cmd_sweep', lambda *a: pytest.fail('the job must not start'))
  assert cli.main(command) == 2
  assert capsys.readouterr().err.strip() == (
      f'specialize {command[0]}: JAX runs 4 processes but jax.distributed is not initialized; add '
      '--multihost (or --coordinator_address, --num_processes and --process_id) to the command '
      'on every host.')


def test_without_the_preemption_service_processes_sync_every_few_steps_only(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import preemption  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  service = jax.config.jax_enable_preemption_service
  jax.config.update('jax_enable_preemption_service', False)
  calls = []
  monkeypatch.setattr(multihost_utils, 'process_allgather',
                      lambda flag: calls.append(int(flag)) or np.array([0, len(calls) == 3]))
  try:
    watch = preemption.PreemptionWatch()
    stops = [step for step in range(1, 36) if watch.reached(step)]
    watch.close()
  finally:
    jax.config.update('jax_enable_preemption_service', service)
  assert len(calls) == 3 and stops == [30]  # Steps 10, 20, 30; process 1's notice at the third.


class Run:
  """The processes of one `specialize` command (by default `train` into `model_dir`), each
  logging to its file."""

  def __init__(self, commands, model_dir, log_dir, num_processes, devices_per_process,
               overrides=None, args=None, interleaved=False):
    """`args`: the command line after `specialize` (default: `train` into `model_dir` with
    OVERRIDES and `overrides`); `interleaved`: the device order of a TPU slice."""
    self.model_dir = str(model_dir)
    self.logs = []
    self.processes = []
    address = f'127.0.0.1:{processes.free_port()}'
    if args is None:
      args = ['train', '--gin_file=experiments/demo_cpu.gin',
              f"--gin.MODEL_DIR='{self.model_dir}'"] + [
                  f'--gin.{name}={value}' for name, value in {**OVERRIDES,
                                                              **(overrides or {})}.items()]
    environ = dict(commands.env,
                   XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')
    if interleaved:
      environ[partitioning.DEVICE_ORDER_ENV] = 'interleaved'
    os.makedirs(log_dir, exist_ok=True)
    for process_id in range(num_processes):
      flags = [] if num_processes == 1 else [
          f'--coordinator_address={address}', f'--num_processes={num_processes}',
          f'--process_id={process_id}']
      log = os.path.join(log_dir, f'process_{process_id}_{len(os.listdir(log_dir))}.log')
      open(log, 'w', encoding='utf-8').close()
      self.processes.append(commands.start(args + flags, environ, REPO_ROOT, log))
      self.logs.append(log)
    self.deadline = time.monotonic() + TIMEOUT_S

  def text(self, process_id: int) -> str:
    with open(self.logs[process_id], encoding='utf-8', errors='replace') as f:
      return f.read()

  def wait_for(self, predicate, what: str, period_s: float = 0.002) -> None:
    """Polls (every `period_s`: 2 ms catches a save in flight) until `predicate()`; fails when the
    run ends or times out first."""
    while not predicate():
      if time.monotonic() > self.deadline or all(p.poll() is not None for p in self.processes):
        self.kill()
        pytest.fail(f'{what} never happened; the first process output ends:\n'
                    f'{self.text(0)[-3000:]}')
      time.sleep(period_s)

  def wait(self, expect_codes=(0,)) -> None:
    for process_id, process in enumerate(self.processes):
      try:
        code = process.wait(timeout=max(self.deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        code = None
      if code not in expect_codes:
        self.kill()
        pytest.fail(f'Process {process_id} of {len(self.processes)} '
                    f'{"timed out" if code is None else f"exited with {code}"}; its output ends:'
                    f'\n{self.text(process_id)[-4000:]}')

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  def logged_losses(self, process_id: int) -> dict:
    """{step: loss as printed} of the process's progress lines."""
    return {int(s): v for s, v in PROGRESS_LINE.findall(self.text(process_id))}


def _records(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['split'] == 'train']


def _params(model_dir, step=TRAIN_STEPS):
  _, params = loading.load_checkpoint(os.path.join(model_dir, f'checkpoint_{step}'))
  return param_tree.flatten_params(params)


def _largest_difference(actual, expected):
  assert actual.keys() == expected.keys()
  return max((float(np.max(np.abs(actual[k] - expected[k]))), k) for k in expected)


@pytest.fixture(scope='module')
def uninterrupted(commands, tmp_path_factory):
  """The one-process and the two-process run, side by side, evaluating in the loop: (one, two)."""
  root = tmp_path_factory.mktemp('uninterrupted')
  one = Run(commands, root / 'one', root / 'logs_one', 1, 4, IN_LOOP_EVAL)
  two = Run(commands, root / 'two', root / 'logs_two', 2, 2, IN_LOOP_EVAL)
  try:
    one.wait()
    two.wait()
  finally:
    one.kill()
    two.kill()
  return one, two


@pytest.mark.slow
def test_two_processes_through_the_command_equal_one_process(uninterrupted):
  one, two = uninterrupted
  for process_id in range(2):
    assert f'Process {process_id} of 2; 2 local / 4 global devices.' in two.text(process_id)
  assert 'Process 0 of' not in one.text(0)  # not distributed without the flags
  # Every process logs the same losses (globally reduced metrics), at every step.
  losses = [two.logged_losses(i) for i in range(2)]
  assert sorted(losses[0]) == list(range(1, TRAIN_STEPS + 1)) and losses[0] == losses[1]
  finals = [json.loads(two.text(i).strip().splitlines()[-1]) for i in range(2)]
  timing = ('steps_per_s', 'target_tokens_per_s')
  assert ({k: v for k, v in finals[0].items() if k not in timing and '/timing/' not in k} ==
          {k: v for k, v in finals[1].items() if k not in timing and '/timing/' not in k})

  # Only process 0 wrote the run's files: one record per step, one config.
  records, reference = _records(two.model_dir), _records(one.model_dir)
  assert [r['step'] for r in records] == list(range(1, TRAIN_STEPS + 1))
  assert os.path.exists(os.path.join(two.model_dir, 'config.gin'))
  np.testing.assert_allclose([r['loss'] for r in records], [r['loss'] for r in reference],
                             rtol=1e-6)
  worst = _largest_difference(_params(two.model_dir), _params(one.model_dir))
  assert worst[0] <= 1e-6, f'largest parameter difference {worst[0]} in {worst[1]}'
  # Updates were applied, so equal params are not frozen ones.
  assert records[-1]['loss'] < 0.8 * records[0]['loss']


def _eval_outputs(eval_dir):
  """{'task/file': content} of an eval output directory: metrics files without their timing,
  predictions files as rows."""
  outputs = {}
  for path in sorted(glob.glob(os.path.join(eval_dir, '*', '*'))):
    with open(path, encoding='utf-8') as f:
      if path.endswith('.jsonl'):
        content = [json.loads(line) for line in f]
      else:
        content = json.load(f)
        del content['timing']
    outputs[os.path.relpath(path, eval_dir)] = content
  return outputs


def _eval_files(steps):
  return sorted(f'{task}/{kind}_step{step}.{ext}' for task in EVAL_TASKS for step in steps
                for kind, ext in (('metrics', 'json'), ('predictions', 'jsonl')))


@pytest.mark.slow
def test_in_loop_evaluation_of_two_processes_equals_one_process(uninterrupted):
  one, two = uninterrupted
  expected = _eval_outputs(os.path.join(one.model_dir, 'eval'))
  assert sorted(expected) == _eval_files((EVAL_PERIOD, TRAIN_STEPS))
  assert all(len(rows) == 4 for name, rows in expected.items() if name.endswith('.jsonl'))
  assert _eval_outputs(os.path.join(two.model_dir, 'eval')) == expected
  for process_id in range(2):
    assert re.search(rf'Evaluation at step {TRAIN_STEPS} took', two.text(process_id))


HALF_WRITTEN_STEP = TRAIN_STEPS + CHECKPOINT_PERIOD


def _copy_with_a_save_in_flight(model_dir, target):
  """`model_dir`'s checkpoints (20 and 24) copied to `target`, plus `checkpoint_28` as a save on
  an object store looks midway (orbax writes in place there): its step metadata without a commit
  timestamp, no commit marker, no arrays. Reading it would fail."""
  shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns('eval', 'tensorboard'))
  in_flight = os.path.join(target, f'checkpoint_{HALF_WRITTEN_STEP}')
  os.makedirs(in_flight)
  metadata = directories.STEP_METADATA_FILE
  with open(os.path.join(target, f'checkpoint_{TRAIN_STEPS}', metadata), encoding='utf-8') as f:
    record = json.load(f)
  record.pop('commit_timestamp_nsecs', None)
  with open(os.path.join(in_flight, metadata), 'w', encoding='utf-8') as f:
    json.dump(record, f)
  return str(target)


def _eval_command(command, run_dir, output=None):
  """`specialize eval`, `sweep` or `infer` over `run_dir`, with the in-loop evaluation's
  settings; `infer` writes `output`."""
  settings = [f'--gin.EVAL_FEATURE_LENGTHS={EVAL_FEATURE_LENGTHS}'] + [
      f'--gin.{k}={v}' for k, v in IN_LOOP_EVAL.items() if k != 'EVAL_PERIOD']
  return {
      'eval': lambda: ['eval', '--gin_file=runs/eval.gin', f"--gin.CHECKPOINT_PATH='{run_dir}'",
                       *settings],
      'sweep': lambda: ['sweep', str(run_dir), '--tasks', *EVAL_TASKS, '--bbh_tasks',
                        '--max_examples', '4', '--batch_size', '4',
                        '--input_length', str(EVAL_FEATURE_LENGTHS['inputs']),
                        '--target_length', str(EVAL_FEATURE_LENGTHS['targets']),
                        '--max_decode_length', '8'],
      'infer': lambda: ['infer', '--gin_file=runs/infer.gin',
                        f"--gin.CHECKPOINT_PATH='{run_dir}'", "--gin.INFER_INPUTS='demo_id_cot'",
                        f"--gin.INFER_OUTPUT='{output}'", '--gin.INFER_BATCH_SIZE=4',
                        '--gin.MAX_DECODE_LENGTH=8']}[command]()


@pytest.fixture(scope='module')
def evaluated(commands, uninterrupted, tmp_path_factory):
  """Copies of the one-process run (checkpoints 20 and 24, and a half-written checkpoint_28)
  evaluated by `specialize eval` with 1 process x 4 devices (the reference, also of the sweep:
  the same settings write the same files) and 2 processes x 2 devices, by `specialize sweep` with
  2 processes, and read by `specialize infer` with 1 and 2 processes: {(command, number of
  processes): Run}; `Run.model_dir` is the copy it evaluated (`infer`: the predictions file)."""
  one, _ = uninterrupted
  root = tmp_path_factory.mktemp('evaluated')
  rounds = ([('eval', 1), ('eval', 2), ('sweep', 2)], [('infer', 1), ('infer', 2)])
  finished = {}
  for jobs in rounds:  # Two rounds of at most 5 processes, not 8 at once, to bound memory.
    started = {}
    for command, num_processes in jobs:
      name = f'{command}_by_{num_processes}'
      run_dir = _copy_with_a_save_in_flight(one.model_dir, root / name)
      output = root / f'{name}.jsonl'
      started[command, num_processes] = Run(
          commands, output if command == 'infer' else run_dir, root / f'logs_{name}', num_processes,
          4 // num_processes, args=_eval_command(command, run_dir, output))
    try:
      for run in started.values():
        run.wait()
    finally:
      for run in started.values():
        run.kill()
    finished.update(started)
  return finished


def _only_process_zero_listed(run):
  """Process 0 alone listed the run (it alone warns about the save in flight); process 1
  followed its decision."""
  skipped = f'checkpoint_{HALF_WRITTEN_STEP}'
  assert 'Skipping uncommitted step directories' in run.text(0) and skipped in run.text(0)
  assert skipped not in run.text(1)
  assert 'Process 1 follows process 0' in run.text(1)


@pytest.mark.slow
@pytest.mark.parametrize('command', ['eval', 'sweep'])
def test_two_processes_evaluate_every_committed_checkpoint_as_one_process_does(
    evaluated, uninterrupted, command):
  """Same metrics files and predictions with 2 processes as `specialize eval` writes with 1; the
  half-written step is skipped (never read: reading it fails); step 24's files equal the in-loop
  evaluation's."""
  one, two = evaluated['eval', 1], evaluated[command, 2]
  expected = _eval_outputs(os.path.join(one.model_dir, 'eval'))
  assert sorted(expected) == _eval_files((TRAIN_STEPS - CHECKPOINT_PERIOD, TRAIN_STEPS))
  assert _eval_outputs(os.path.join(two.model_dir, 'eval')) == expected
  in_loop = _eval_outputs(os.path.join(uninterrupted[0].model_dir, 'eval'))
  last = f'_step{TRAIN_STEPS}.'
  assert ({k: v for k, v in expected.items() if last in k} ==
          {k: v for k, v in in_loop.items() if last in k})
  _only_process_zero_listed(two)
  if command == 'sweep':
    summaries = [json.loads(line) for line in two.text(0).splitlines()
                 if line.startswith('{"report"')]
    assert [s['decoded_pairs'] for s in summaries] == [2 * len(EVAL_TASKS)]
    assert os.path.exists(os.path.join(two.model_dir, 'report', 'report.md'))
    assert '{"report"' not in two.text(1)  # process 0 alone writes the report


@pytest.mark.slow
def test_two_processes_infer_from_a_run_directory_as_one_process_does(evaluated):
  """A run directory is its latest committed step (24, not the half-written 28), as process 0
  resolves it."""
  one, two = evaluated['infer', 1], evaluated['infer', 2]
  rows = []
  for run in (one, two):
    with open(run.model_dir, encoding='utf-8') as f:
      rows.append([json.loads(line) for line in f])
  assert len(rows[0]) == 32 and rows[1] == rows[0]
  latest = f'Using the latest step directory {one.model_dir[:-len(".jsonl")]}/checkpoint_'
  assert f'{latest}{TRAIN_STEPS}' in one.text(0)
  assert 'Using the latest step directory' in two.text(0)
  assert 'Using the latest step directory' not in two.text(1)
  assert 'Process 1 follows process 0 on the checkpoint to read' in two.text(1)


# Heads, MLP and vocabulary (384) divide a model axis of 8; 4 steps each, a checkpoint every 2.
MODEL_PARALLEL = {'TRAIN_STEPS': 4, 'CHECKPOINT_PERIOD': 2, 'model_config.T5Config.num_heads': 8,
                  'model_config.T5Config.head_dim': 4}


def _model_axis_overrides(num_partitions):
  overrides = {**MODEL_PARALLEL, 'partitioning.PartitioningConfig.num_partitions': num_partitions}
  if num_partitions == 2:  # Data 4 x model 2 also decodes: the in-loop evaluation at step 4.
    overrides.update(IN_LOOP_EVAL, EVAL_PERIOD=MODEL_PARALLEL['TRAIN_STEPS'])
  return overrides


@pytest.fixture(scope='module')
def one_process_reference(commands, tmp_path_factory):
  """`reference(num_partitions)`: the one-process run (8 devices, data 8/num_partitions x model
  num_partitions, 4 steps), run once per mesh: the reference of the four-process runs; the
  model-2 one's params are also the start checkpoint of the per-shard read below."""
  runs = {}

  def reference(num_partitions):
    if num_partitions not in runs:
      root = tmp_path_factory.mktemp(f'model_axis_{num_partitions}')
      run = Run(commands, root / 'one', root / 'logs_one', 1, 8, _model_axis_overrides(num_partitions))
      try:
        run.wait()
      finally:
        run.kill()
      runs[num_partitions] = run  # Kept once it finished; a failed run fails (again) in each test.
    return runs[num_partitions]
  return reference


def _check_four_equal_one(four, one, layouts):
  for process_id, layout in enumerate(layouts):
    text = four.text(process_id)
    assert f'Process {process_id} of 4; 2 local / 8 global devices.' in text
    assert f'Data layout: this process feeds {layout} per step.' in text, text[-3000:]
  losses = [four.logged_losses(i) for i in range(4)]
  assert sorted(losses[0]) == [1, 2, 3, 4] and all(l == losses[0] for l in losses)
  np.testing.assert_allclose([r['loss'] for r in _records(four.model_dir)],
                             [r['loss'] for r in _records(one.model_dir)], rtol=1e-6)
  worst = _largest_difference(_params(four.model_dir, 4), _params(one.model_dir, 4))
  assert worst[0] <= 1e-6, f'largest parameter difference {worst[0]} in {worst[1]}'


# Interleaved (`SPECIALIZE_TEST_DEVICE_ORDER`): mesh position i belongs to process i % 4, as a TPU
# slice interleaves hosts along `data`; batches of 8 rows.
INTERLEAVED_LAYOUTS = {
    # data 8 x model 1: process p holds data coordinates p and p + 4.
    1: [f'rows {p}, {p + 4} of 8 (data coordinates [{p}, {p + 4}] of 8)' for p in range(4)],
    # data 4 x model 2: processes 0 and 1 are replicas holding coordinates 0 and 2, 2 and 3 hold
    # 1 and 3.
    2: ['rows 0-1, 4-5 of 8 (data coordinates [0, 2] of 4)'] * 2 +
       ['rows 2-3, 6-7 of 8 (data coordinates [1, 3] of 4)'] * 2,
}


@pytest.fixture(scope='module')
def interleaved_runs(commands, tmp_path_factory):
  """`run(num_partitions)`: 4 processes x 2 devices in the interleaved order, run once per mesh."""
  runs = {}

  def run(num_partitions):
    if num_partitions not in runs:
      root = tmp_path_factory.mktemp(f'interleaved_{num_partitions}')
      four = Run(commands, root / 'four', root / 'logs_four', 4, 2,
                 _model_axis_overrides(num_partitions), interleaved=True)
      try:
        four.wait()
      finally:
        four.kill()
      runs[num_partitions] = four
    return runs[num_partitions]
  return run


@pytest.mark.slow
@pytest.mark.parametrize('num_partitions', [1, 2])
def test_four_processes_in_a_tpu_like_interleaved_order_equal_one_process(
    one_process_reference, interleaved_runs, num_partitions):
  four, one = interleaved_runs(num_partitions), one_process_reference(num_partitions)
  _check_four_equal_one(four, one, INTERLEAVED_LAYOUTS[num_partitions])
  if num_partitions == 2:
    # Decoding feeds each process's interleaved rows too; the gathered predictions are the same.
    expected = _eval_outputs(os.path.join(one.model_dir, 'eval'))
    assert sorted(expected) == _eval_files((MODEL_PARALLEL['TRAIN_STEPS'],))
    assert _eval_outputs(os.path.join(four.model_dir, 'eval')) == expected


@pytest.mark.slow
def test_interleaved_processes_killed_after_a_checkpoint_resume_bit_identical(
    commands, interleaved_runs, tmp_path):
  """The whole interleaved job SIGKILLed once step 2 is committed (a slice's preemption), then
  the same command: parameters and logged losses equal the uninterrupted interleaved run's."""
  reference = interleaved_runs(1)
  overrides = _model_axis_overrides(1)
  run = Run(commands, tmp_path / 'run', tmp_path / 'logs', 4, 2, overrides, interleaved=True)
  committed = os.path.join(run.model_dir, 'checkpoint_2', 'commit_success.txt')
  run.wait_for(lambda: os.path.exists(committed), 'the commit of checkpoint 2')
  for process in run.processes:
    process.send_signal(signal.SIGKILL)
  run.wait(expect_codes=(-signal.SIGKILL, 0))
  rerun = Run(commands, tmp_path / 'run', tmp_path / 'logs', 4, 2, overrides, interleaved=True)
  rerun.wait()
  resumed = re.search(r'Starting at step (\d+) from resume', rerun.text(0))
  assert resumed and int(resumed.group(1)) >= 2, rerun.text(0)[-3000:]
  worst = _largest_difference(_params(run.model_dir, 4), _params(reference.model_dir, 4))
  assert worst[0] == 0.0, f'largest parameter difference {worst[0]} in {worst[1]}'
  losses = {r['step']: r['loss'] for r in _records(reference.model_dir)}
  assert all(r['loss'] == losses[r['step']] for r in _records(run.model_dir))


def _preempted_step(text: str) -> int:
  steps = re.findall(r'^preempted at step (\d+); rerun the same command to resume$', text,
                     re.MULTILINE)
  assert len(steps) == 1, text[-3000:]
  return int(steps[0])


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_everywhere_and_resumes(
    commands, uninterrupted, tmp_path):
  """SIGTERM to process 1 only: both processes save one step, print it and exit 0; the same
  command then resumes and ends with the uninterrupted two-process run's params, bit for bit."""
  _, two = uninterrupted
  run = Run(commands, tmp_path / 'run', tmp_path / 'logs', 2, 2)
  run.wait_for(lambda: 'First step' in run.text(1), 'the first step of process 1', period_s=0.05)
  os.kill(run.processes[1].pid, signal.SIGTERM)
  run.wait()
  steps = [_preempted_step(run.text(i)) for i in range(2)]
  assert steps[0] == steps[1] < TRAIN_STEPS, steps
  step = steps[0]
  committed = os.path.join(run.model_dir, f'checkpoint_{step}', 'commit_success.txt')
  assert os.path.exists(committed)
  # Metrics were flushed up to the saved step.
  assert [r['step'] for r in _records(run.model_dir)][-1] == step

  rerun = Run(commands, tmp_path / 'run', tmp_path / 'logs', 2, 2)
  rerun.wait()
  for process_id in range(2):
    assert f'Starting at step {step} from resume' in rerun.text(process_id)
  worst = _largest_difference(_params(run.model_dir), _params(two.model_dir))
  assert worst[0] <= 1e-12, f'largest parameter difference {worst[0]} in {worst[1]}'
  losses = {r['step']: r['loss'] for r in _records(two.model_dir)}
  assert all(r['loss'] == losses[r['step']] for r in _records(run.model_dir))


@pytest.mark.slow
def test_sigkill_at_any_moment_then_the_same_command_ends_identical(commands, uninterrupted, tmp_path):
  """One process killed mid-save (an orbax temporary step directory exists), then at a random
  moment, then run to the end: params and every logged loss equal the uninterrupted run's."""
  one, _ = uninterrupted
  model_dir = tmp_path / 'run'
  seed = random.randrange(1 << 30)
  delay_s = random.Random(seed).uniform(0.0, 1.5)

  run = Run(commands, model_dir, tmp_path / 'logs', 1, 4)
  in_flight = os.path.join(str(model_dir), 'checkpoint_*.orbax-checkpoint-tmp*')
  # Mid-save of a step after the first, so the restart has a committed step to resume from.
  run.wait_for(lambda: any(int(os.path.basename(p).split('_')[1].split('.')[0]) > CHECKPOINT_PERIOD
                           for p in glob.glob(in_flight)), 'a save in flight')
  run.processes[0].send_signal(signal.SIGKILL)
  run.wait(expect_codes=(-signal.SIGKILL,))

  run = Run(commands, model_dir, tmp_path / 'logs', 1, 4)
  run.wait_for(lambda: 'First step' in run.text(0), 'the first step after the restart',
               period_s=0.05)  # A log read 500 times a second would compete with the run.
  resumed = re.search(r'Starting at step (\d+) from resume', run.text(0))
  assert resumed and int(resumed.group(1)) >= CHECKPOINT_PERIOD, run.text(0)[-3000:]
  time.sleep(delay_s)
  run.processes[0].send_signal(signal.SIGKILL)
  run.wait(expect_codes=(-signal.SIGKILL, 0))  # it may have finished first

  run = Run(commands, model_dir, tmp_path / 'logs', 1, 4)
  run.wait()
  worst = _largest_difference(_params(model_dir), _params(one.model_dir))
  assert worst[0] == 0.0, f'kill delay seed {seed}: parameter difference {worst[0]} in {worst[1]}'
  # Steps redone after a kill are logged again, with the same losses.
  losses = {r['step']: r['loss'] for r in _records(one.model_dir)}
  records = _records(model_dir)
  assert {r['step'] for r in records} == set(losses)
  assert all(r['loss'] == losses[r['step']] for r in records), f'kill delay seed {seed}'


FETCHED = re.compile(r'INITIAL_CHECKPOINT_PATH: fetched ([0-9.]+) MB from storage for this '
                     r"process's shards \(([0-9.]+) MB of the ([0-9.]+) MB of parameters\)")


@pytest.mark.slow
def test_four_processes_read_only_their_shards_of_the_start_checkpoint(
    commands, one_process_reference, tmp_path):
  """INITIAL_CHECKPOINT_PATH in T5X's legacy layout (zarr, small chunks; the trained parameters
  of the one-process data 4 x model 2 run), data 1 x model 8 over 4 processes: each process
  fetches less than half of the checkpoint, and the run starts from it (learning rate 1e-30:
  the saved parameters are the checkpoint's)."""
  overrides = {**_model_axis_overrides(8), 'TRAIN_STEPS': 1, 'CHECKPOINT_PERIOD': 1}
  _, start_params = loading.load_checkpoint(
      os.path.join(one_process_reference(2).model_dir, 'checkpoint_4'))
  start = t5x_legacy.save_t5x(start_params, tmp_path / 'start' / 'checkpoint_0',
                              optimizer_state=False, chunk_bytes=1024)
  four = Run(commands, tmp_path / 'four', tmp_path / 'logs_four', 4, 2,
             {**overrides, 'LEARNING_RATE': 1e-30, 'INITIAL_CHECKPOINT_PATH': f"'{start}'"})
  try:
    four.wait()
  finally:
    four.kill()
  for process_id in range(4):
    match = FETCHED.search(four.text(process_id))
    assert match, four.text(process_id)[-3000:]
    fetched, shard, total = map(float, match.groups())
    assert shard < total / 2 and fetched < total / 2, match.group(0)
  worst = _largest_difference(_params(four.model_dir, 1),
                              param_tree.flatten_params(start_params))
  assert worst[0] <= 1e-12, f'largest parameter difference {worst[0]} in {worst[1]}'
