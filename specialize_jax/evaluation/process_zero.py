"""Decisions that process 0 makes from the file system and every process follows.

Terms:
  decision: a JSON-ready value read off storage that decides which collectives a job runs: which
    checkpoint steps are committed, which (step, task) pairs still need decoding, which step
    directory a run directory resolves to. Made by every process on its own, two processes can
    decide differently (a step committed between their listings, an object store's eventually
    consistent listing), run different collectives and hang. So only process 0 decides, and the
    others receive its decision: one broadcast of its length, one of its UTF-8 JSON bytes.
  single process: the decision is made and returned with no collective (its JSON round trip
    costs microseconds and gives the same types as a multi-process run: lists, string keys).
"""
import json
import logging
from typing import Any, Callable, Tuple, Type

import jax
from jax.experimental import multihost_utils
import numpy as np

from specialize_jax.errors import ConfigError

# A failure on process 0 is raised on every process, as the first of these classes it is an
# instance of (so every process of a CLI job exits with the same code), else as RuntimeError.
_FORWARDED_ERRORS: Tuple[Type[Exception], ...] = (ConfigError, FileNotFoundError, ValueError)


def decided_by_process_zero(decide: Callable[[], Any], what: str) -> Any:
  """`decide()` as process 0 computes it, on every process (processes other than 0 never call it).

  Args:
    decide: reads storage and returns a JSON-ready value (dicts with string keys, lists, strings,
      numbers, bools, None).
    what: the decision, for logs and errors (e.g. 'the checkpoints to evaluate').

  Returns:
    The decision after a JSON round trip (tuples come back as lists).

  Raises:
    What `decide` raised on process 0, on every process: the original exception there, an
    exception of the first `_FORWARDED_ERRORS` class it is an instance of (else RuntimeError)
    with the same message elsewhere. Every process gets the decision or the error, so none waits
    on a broadcast that never comes.
  """
  if jax.process_count() == 1:
    return json.loads(json.dumps(decide()))
  error = None
  payload = b''
  if jax.process_index() == 0:
    try:
      payload = json.dumps({'decision': decide()}).encode('utf-8')
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, on every process)
      error = e
      kind = next((c.__name__ for c in _FORWARDED_ERRORS if isinstance(e, c)), 'RuntimeError')
      payload = json.dumps({'error': str(e), 'kind': kind}).encode('utf-8')
  received_bytes = _broadcast_bytes(payload)
  received = json.loads(received_bytes.decode('utf-8'))
  if 'error' in received:
    if error is not None:
      raise error
    kind = {c.__name__: c for c in _FORWARDED_ERRORS}.get(received['kind'], RuntimeError)
    raise kind(f'{received["error"]} (process 0, deciding {what})')
  if jax.process_index() == 0:
    logging.info('Process 0 decided %s for all %d processes (%d bytes).', what,
                 jax.process_count(), len(received_bytes))
  else:
    logging.info('Process %d follows process 0 on %s (%d bytes).', jax.process_index(), what,
                 len(received_bytes))
  return received['decision']


def _broadcast_bytes(payload: bytes) -> bytes:
  """Process 0's `payload` on every process (the others pass b''): its length first, so every
  process knows the shape of the second broadcast. int32 elements: the broadcast sums them."""
  length = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  values = np.zeros(length, np.int32)  # [length]
  values[:len(payload)] = np.frombuffer(payload, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(values), np.uint8).tobytes()
