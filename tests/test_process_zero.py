"""`process_zero.decided_by_process_zero`: every process follows process 0's decision.

Single process: the decision is made once, with no collective. Two processes (two
`tests/support/process_zero_worker.py` processes on loopback, gloo collectives), each listing its
own run directory: process 0 has a committed `checkpoint_2` only, process 1 also `checkpoint_4` and
`checkpoint_6` (as if it listed after two more saves), yet both get process 0's listing; an error
on process 0 is raised on both; a large non-ASCII decision arrives whole.
"""
import json
import subprocess
import time

import pytest

from specialize_jax.errors import ConfigError
from specialize_jax.evaluation import process_zero
from tests.support import processes

TIMEOUT_S = 300  # A hang's limit.


def test_one_process_decides_once_without_collectives(monkeypatch):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all',
                      lambda *a, **k: pytest.fail('a single process needs no broadcast'))
  calls = []
  decision = process_zero.decided_by_process_zero(
      lambda: calls.append(1) or {'steps': [(2, 'checkpoint_2')]}, 'the steps')
  # The JSON round trip a multi-process run makes: tuples come back as lists.
  assert decision == {'steps': [[2, 'checkpoint_2']]} and calls == [1]
  with pytest.raises(ConfigError, match='bad value'):
    process_zero.decided_by_process_zero(lambda: (_ for _ in ()).throw(ConfigError('bad value')),
                                         'a value')


@pytest.mark.slow
def test_two_processes_with_different_listings_follow_process_zero(tmp_path):
  steps_seen = {0: (2,), 1: (2, 4, 6)}
  address = f'127.0.0.1:{processes.free_port()}'
  jobs = []
  try:
    for process_id, steps in steps_seen.items():
      run_dir = tmp_path / f'run_{process_id}'
      for step in steps:
        (run_dir / f'checkpoint_{step}').mkdir(parents=True)
      log = open(tmp_path / f'process_{process_id}.log', 'w', encoding='utf-8')
      jobs.append((subprocess.Popen(
          processes.module_argv(
              'tests.support.process_zero_worker', f'--run_dir={run_dir}',
              f'--output={tmp_path / f"process_{process_id}.json"}', '--num_processes=2',
              f'--process_id={process_id}', f'--coordinator_address={address}'),
          stdout=log, stderr=subprocess.STDOUT, env=processes.environment(),
          cwd=processes.REPO_ROOT), log))
    deadline = time.monotonic() + TIMEOUT_S
    for process_id, (process, log) in enumerate(jobs):
      try:
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        code = None
      log.close()
      if code != 0:
        tail = (tmp_path / f'process_{process_id}.log').read_text(errors='replace')[-4000:]
        pytest.fail(f'Process {process_id} {"hung" if code is None else f"exited with {code}"}:'
                    f'\n{tail}')
  finally:
    for process, log in jobs:
      if process.poll() is None:
        process.kill()
        process.wait()
      log.close()

  results = [json.loads((tmp_path / f'process_{i}.json').read_text()) for i in range(2)]
  expected = [[2, str(tmp_path / 'run_0' / 'checkpoint_2')]]
  assert [r['process_index'] for r in results] == [0, 1]
  assert results[0]['listing'] == results[1]['listing'] == expected
  message = f'no committed checkpoint in {tmp_path / "run_0"}'
  assert results[0]['error'] == {'raised': 'ValueError', 'message': message}
  assert results[1]['error'] == {
      'raised': 'ValueError', 'message': f'{message} (process 0, deciding error)'}
  assert results[0]['large'] is True and results[1]['large'] is True
