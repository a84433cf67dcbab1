"""Multi-process training: two processes on loopback equal one process with the same devices.

Terms:
  2-process run: two `tests/support/multiprocess_worker.py` processes, each with 2 fake CPU
    devices, joined by `jax.distributed` (CPU collectives over gloo) into one 4-device mesh; each
    process reads its rows of every global batch (`input_pipeline`'s docstring).
  reference run: the same training in this (single) process, on a mesh of 4 of its fake devices,
    run while the pair runs.

The input pipeline makes the global batches identical by construction (every process reads the
global stream and keeps its rows), so the two runs must give the same losses and parameters; the
in-process test below checks that construction directly.
"""
import json
import os
import subprocess
import time

import jax
import numpy as np
import pytest


from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import param_tree
from specialize_jax.training import input_pipeline
from specialize_jax.training import metric_writers
from specialize_jax.training import partitioning
from tests.support import demo_data
from tests.support import multiprocess_worker
from tests.support import processes

TIMEOUT_S = 600  # A hang's limit; on a loaded 2-core machine a run can take minutes.


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  """The demo data at tiny sizes, with the demo tasks registered over it."""
  with demo_data.tiny_demo_data(tmp_path_factory) as directory:
    yield directory


@pytest.mark.slow
def test_processes_read_their_rows_of_the_same_global_batches(demo_dir):
  """Shuffled, the two processes' rows of batch k put together are batch k of one process
  (`shard_by_process=False`); with SeqIO shards (the default) they read disjoint examples."""
  sharded = input_pipeline.DatasetConfig('demo_train_cot', {'inputs': 128, 'targets': 64},
                                         batch_size=8, shuffle=False)
  shards = [input_pipeline.TrainIterator(sharded, shards=[(i, 2)])
            for i in range(2)]
  seen = [{row.tobytes() for _ in range(3) for row in next(s)['decoder_target_tokens']}
          for s in shards]
  assert len(seen[0]) > 1 and not seen[0] & seen[1]
  config = input_pipeline.DatasetConfig('demo_train_cot', {'inputs': 128, 'targets': 64},
                                        batch_size=8, shard_by_process=False)
  one = input_pipeline.TrainIterator(config, shards=[(0, 1)])
  halves = [input_pipeline.TrainIterator(config, shards=[(i, 2)])
            for i in range(2)]
  for _ in range(3):
    expected = next(one)
    parts = [next(h) for h in halves]
    assert expected['encoder_input_tokens'].shape == (8, 128)
    for name, value in expected.items():
      assert parts[0][name].shape[0] == 4
      np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), value, err_msg=name)
  # A resumed process continues with its rows of the next global batch.
  resumed = input_pipeline.TrainIterator(config, position=halves[1].position(), shards=[(1, 2)])
  expected = next(one)
  np.testing.assert_array_equal(next(resumed)['decoder_target_tokens'],
                                expected['decoder_target_tokens'][4:])
  with pytest.raises(ValueError, match='BATCH_SIZE=8 is not divisible by the number of data shards'):
    input_pipeline.TrainIterator(config, shards=[(0, 3)])


def _launch(demo_dir, model_dir, output, log, process_id, address):
  env = processes.environment(SPECIALIZE_DATA_DIR=str(demo_dir.parent))
  argv = processes.module_argv(
      'tests.support.multiprocess_worker', f'--demo_dir={demo_dir}', f'--model_dir={model_dir}',
      f'--output={output}', '--num_devices=2', '--num_processes=2', f'--process_id={process_id}',
      f'--coordinator_address={address}')
  return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                          cwd=processes.REPO_ROOT)


def _wait_all(jobs, deadline):
  """Waits for every (process, log path) until `deadline`; fails with the first bad one's log."""
  for process_id, (process, log_path) in enumerate(jobs):
    try:
      code = process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      code = None
    if code != 0:
      with open(log_path, encoding='utf-8', errors='replace') as f:
        tail = f.read()[-4000:]
      pytest.fail(f'Process {process_id} of 2 '
                  f'{"timed out" if code is None else f"exited with {code}"}; its output ends:\n'
                  f'{tail}')


def _train_records(model_dir):
  return {r['step']: r for r in metric_writers.read_metrics(str(model_dir))
          if r['split'] == 'train'}


def _final_params(model_dir):
  step_dir = os.path.join(model_dir, f'checkpoint_{multiprocess_worker.TRAIN_STEPS}')
  _, params = loading.load_checkpoint(step_dir)
  return param_tree.flatten_params(params)


@pytest.mark.slow
def test_two_processes_equal_one_process(demo_dir, tmp_path, monkeypatch):
  """Per-step losses and gradient norms within 1e-5 (relative), final params within 1e-5."""
  address = f'127.0.0.1:{processes.free_port()}'
  two = tmp_path / 'two_processes'
  jobs, logs = [], []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for process_id in range(2):
      log_path = tmp_path / f'process_{process_id}.log'
      logs.append(open(log_path, 'w', encoding='utf-8'))
      jobs.append((_launch(demo_dir, two, tmp_path / f'process_{process_id}.json', logs[-1],
                           process_id, address), log_path))
    # Meanwhile, the reference here: one process, a mesh of 4 of its 8 devices.
    make_mesh = partitioning.make_mesh
    monkeypatch.setattr(partitioning, 'make_mesh',
                        lambda config, devices=None: make_mesh(config, jax.devices()[:4]))
    reference_metrics = multiprocess_worker.train(str(tmp_path / 'reference'), log=lambda _: None)
    _wait_all(jobs, deadline)
  finally:
    for process, _ in jobs:
      if process.poll() is None:
        process.kill()
        process.wait()
    for log in logs:
      log.close()

  results = [json.loads((tmp_path / f'process_{i}.json').read_text()) for i in range(2)]
  assert [(r['process_index'], r['process_count'], r['num_devices'], r['num_local_devices'])
          for r in results] == [(0, 2, 4, 2), (1, 2, 4, 2)]
  # Both processes report the same (globally reduced) metrics, equal to the reference's.
  timing = ('steps_per_s', 'target_tokens_per_s')
  metrics = [{k: v for k, v in r['metrics'].items() if k not in timing} for r in results]
  assert metrics[0] == metrics[1]
  np.testing.assert_allclose(results[0]['metrics']['loss'], reference_metrics['loss'], rtol=1e-5)

  records, reference = _train_records(two), _train_records(tmp_path / 'reference')
  steps = list(range(1, multiprocess_worker.TRAIN_STEPS + 1))
  assert sorted(records) == sorted(reference) == steps
  for name in ('loss', 'grad_norm', 'num_target_tokens'):
    np.testing.assert_allclose([records[s][name] for s in steps],
                               [reference[s][name] for s in steps], rtol=1e-5, err_msg=name)
  # Updates were applied (rate > 0, gradient != 0), so equal params are not frozen ones.
  assert all(records[s]['learning_rate'] > 0 and records[s]['grad_norm'] > 0 for s in steps[1:])

  params, reference_params = _final_params(two), _final_params(tmp_path / 'reference')
  assert params.keys() == reference_params.keys()
  worst = max((float(np.max(np.abs(params[k] - reference_params[k]))), k) for k in params)
  assert worst[0] <= 1e-5, f'largest parameter difference {worst[0]} in {worst[1]}'
