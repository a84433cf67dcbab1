"""Joining a multi-host job: every process runs the same command, and JAX connects them first.

Two ways to join, as the `specialize` flags name them:
  * `--multihost` alone: `jax.distributed.initialize()` finds its peers itself (TPU VM slices,
    SLURM, managed clusters).
  * `--coordinator_address HOST:PORT --num_processes N --process_id I`: explicit (e.g. GPU hosts,
    or CPU processes that exchange collectives over gloo).

`join` runs before a job touches a JAX backend or writes a file. A job started on several
processes without either way is refused (`check_connected`): the processes could not agree on
checkpoints or preemption steps without a host sync at every step.

This module imports JAX; the command line imports it only for the jobs that take these flags.
"""
import logging
from typing import Optional

import jax

from specialize_jax.errors import ConfigError


def requested(multihost: bool = False, coordinator_address: Optional[str] = None,
              num_processes: Optional[int] = None, process_id: Optional[int] = None) -> bool:
  """Whether the flags ask to join a multi-host job (`--multihost` or any explicit one)."""
  return bool(multihost) or any(
      value is not None for value in (coordinator_address, num_processes, process_id))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Connects the processes of an explicitly configured job; a no-op (returns False) when none of
  the three values is given.

  Call once at program start, before any other JAX call. On CPU hosts the caller must first set
  `jax.config.update('jax_cpu_collectives_implementation', 'gloo')` (a global flag, which `join`
  sets): CPU processes exchange collectives over gloo.
  """
  if coordinator_address is None and num_processes is None and process_id is None:
    return False
  if coordinator_address is None or num_processes is None or process_id is None:
    raise ConfigError(
        f'Multi-process runs need all of coordinator_address ({coordinator_address!r}), '
        f'num_processes ({num_processes!r}) and process_id ({process_id!r}); set the missing ones '
        'or none.')
  if not 0 <= process_id < num_processes:
    raise ConfigError(f'process_id={process_id} must be in [0, num_processes={num_processes}).')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True


def check_connected() -> None:
  """Raises when JAX runs several processes that `jax.distributed` does not connect (a multi-host
  slice started without `--multihost`)."""
  if jax.process_count() > 1 and not jax.distributed.is_initialized():
    raise ConfigError(f'JAX runs {jax.process_count()} processes but jax.distributed is not '
                      'initialized; add --multihost (or --coordinator_address, --num_processes '
                      'and --process_id) to the command on every host.')


def join(multihost: bool = False, coordinator_address: Optional[str] = None,
         num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
  """Joins the multi-host job the flags ask for, else checks that this is not one.

  With explicit values, `initialize` connects; `multihost` alone leaves it to JAX's detection of
  the cluster. Either way this runs before the job touches a backend or writes a file.
  """
  if not requested(multihost, coordinator_address, num_processes, process_id):
    check_connected()
    return
  # CPU processes exchange collectives over gloo; other backends ignore the flag.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if not initialize(coordinator_address, num_processes, process_id):
    jax.distributed.initialize()  # --multihost alone: the cluster's auto-detection.
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
