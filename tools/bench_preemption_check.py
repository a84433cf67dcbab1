"""What the trainer's per-step preemption check costs (`specialize_jax/training/preemption.py`).

  python tools/bench_preemption_check.py [--calls 2000] [--allgathers 200]

Starts 2 processes (2 fake CPU devices each) joined by `jax.distributed` on loopback and times, per
call, in each: `PreemptionWatch.reached` with JAX's preemption service (what multi-process runs
use), the allgather of a flag (the fallback with the service turned off), and the single-process
flag check. Then sends SIGTERM to process 1 only and checks that both processes stop at the same
step. Prints one JSON line per process.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


def _worker(process_id: int, address: str, calls: int, allgathers: int, ready: str) -> None:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from specialize_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import preemption  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  distributed.initialize(address, 2, process_id)
  watch = preemption.PreemptionWatch()
  start = time.perf_counter()
  for step in range(calls):
    watch.reached(step)
  sync_point_us = (time.perf_counter() - start) / calls * 1e6
  multihost_utils.process_allgather(np.int32(0))  # compile
  start = time.perf_counter()
  for _ in range(allgathers):
    multihost_utils.process_allgather(np.int32(0))
  allgather_ms = (time.perf_counter() - start) / allgathers * 1e3
  open(f'{ready}.{process_id}', 'w').close()
  step = calls
  while not watch.reached(step):  # one "training step" every 10 ms until the notice
    time.sleep(0.01)
    step += 1
  print(json.dumps({'process': process_id, 'sync_point_check_us': round(sync_point_us, 3),
                    'allgather_check_ms': round(allgather_ms, 3), 'stopped_at_step': step}),
        flush=True)
  watch.close()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--calls', type=int, default=2000)
  parser.add_argument('--allgathers', type=int, default=200)
  parser.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--address', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--ready', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if args.worker is not None:
    _worker(args.worker, args.address, args.calls, args.allgathers, args.ready)
    return

  from specialize_jax.training import preemption  # pylint: disable=g-import-not-at-top
  watch = preemption.PreemptionWatch()  # one process: a Python flag
  start = time.perf_counter()
  for step in range(args.calls):
    watch.reached(step)
  single_us = (time.perf_counter() - start) / args.calls * 1e6
  watch.close()
  print(json.dumps({'process': 'single', 'flag_check_us': round(single_us, 3)}), flush=True)

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  ready = f'/tmp/bench_preemption_{os.getpid()}'
  workers = [subprocess.Popen([sys.executable, __file__, f'--worker={i}', f'--address={address}',
                               f'--ready={ready}', f'--calls={args.calls}',
                               f'--allgathers={args.allgathers}'], stderr=subprocess.DEVNULL)
             for i in range(2)]
  while not all(os.path.exists(f'{ready}.{i}') for i in range(2)):
    time.sleep(0.05)
  workers[1].send_signal(signal.SIGTERM)
  codes = [w.wait(timeout=120) for w in workers]
  for i in range(2):
    os.remove(f'{ready}.{i}')
  print(json.dumps({'exit_codes': codes}))


if __name__ == '__main__':
  main()
