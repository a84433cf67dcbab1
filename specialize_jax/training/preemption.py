"""Preemption: stop at a step every process agrees on, so that all of them save that same step.

Terms:
  preemption notice: SIGTERM (what spot/preemptible VMs, SLURM and Kubernetes send before killing
    a job), or on TPU VMs the maintenance event JAX's preemption service watches for.
  sync point: the first step at which every process has learnt of a notice. With `jax.distributed`
    initialized, JAX's preemption service (on by default: `jax_enable_preemption_service`) catches
    SIGTERM itself, in C++, tells the other processes through the coordination service and
    `multihost_utils.reached_preemption_sync_point(step)` returns True on all of them at the same
    step (the largest step any process had reached, plus one). Each call is a local check,
    orders of magnitude cheaper than a `process_allgather` of a flag
    (`tools/bench_preemption_check.py`, docs/benchmarks.md).
    Without `jax.distributed` (one process) a Python SIGTERM handler sets a flag instead; with
    `jax.distributed` but the preemption service turned off, the processes allgather their flags
    every `ALLGATHER_PERIOD` steps (never a host sync at every step). Several processes without
    `jax.distributed` cannot agree without one: `PreemptionWatch` refuses them
    (`distributed.check_connected`, which `specialize` runs at start).

`reached(step)` must be called at every step, with the same increasing steps on every process.
"""
import logging
import signal
import threading
from typing import Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from specialize_jax.runtime import distributed

# Steps between the flag allgathers when the preemption service is off (1.3 ms each on CPU).
ALLGATHER_PERIOD = 10


class PreemptionWatch:
  """Says at which step to save and stop; `close()` restores the previous SIGTERM handler."""

  def __init__(self):
    distributed.check_connected()
    self._notified = False
    self._multiprocess = jax.process_count() > 1
    self._previous_handler = None
    self._installed = False
    self._sync_point = (jax.distributed.is_initialized() and
                        bool(jax.config.jax_enable_preemption_service))
    if jax.distributed.is_initialized() and not self._sync_point:
      logging.info('The JAX preemption service is off: processes agree on SIGTERM by allgather.')
    # With the service, JAX's own handler catches SIGTERM; a Python one would replace it.
    if not self._sync_point and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    if not self._notified:
      logging.warning('SIGTERM received: saving at the next step, then stopping.')
    self._notified = True

  def reached(self, step: int) -> bool:
    """Whether every process should save `step` and stop (the same answer on every process)."""
    if self._sync_point:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if self._multiprocess:
      if step % ALLGATHER_PERIOD:
        return False
      return bool(np.any(multihost_utils.process_allgather(np.int32(self._notified))))
    return self._notified

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._installed = False


class Preempted(Exception):
  """Training stopped early at `step` (saved) on a preemption notice; rerunning resumes it."""

  def __init__(self, step: int, model_dir: Optional[str] = None):
    self.step = step
    self.model_dir = model_dir
    super().__init__(f'preempted at step {step}; rerun the same command to resume')
