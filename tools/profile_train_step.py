"""Where a training step's device time goes: profiles `bench_train.py`'s step and prints the ops.

  python tools/profile_train_step.py --preset base --dtype bfloat16 --batch 64   # on a GPU/TPU

Builds the same model, optimizer and random batch as `bench_train.py`, runs a few steps, traces
one with `jax.profiler` (Perfetto JSON; the trace directory is printed, for Perfetto or
TensorBoard), and prints the device ops by total time with their HLO module. This is how the
relative-position-bias scatter (1.57 s of a 1.7 s t5-base step on an H200) was found. On CPU,
XLA's ops run on its host threads (`tf_XLA...`); their totals are thread time, summed over the
threads, so they can exceed the step's wall time.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time
from typing import Tuple

import bench_train  # tools/, beside this script


def op_times(trace_path: str) -> Tuple[str, collections.Counter]:
  """(where, `{op name: total microseconds}`) from a Perfetto JSON trace of one step.

  The ops on the device lines when there are any (GPU, TPU), else those on XLA's CPU threads.
  """
  with gzip.open(trace_path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  metadata = [e for e in events if e.get("ph") == "M"]
  processes = {e["pid"]: e["args"]["name"] for e in metadata if e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in metadata
             if e.get("name") == "thread_name"}
  device, cpu = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") != "X":
      continue
    if processes.get(event["pid"], "").startswith("/device"):
      device[event["name"]] += event.get("dur", 0)
    elif (threads.get((event["pid"], event.get("tid")), "").startswith("tf_XLA") and
          not event["name"].startswith("ThunkExecutor")):  # the executor spans its ops
      cpu[event["name"]] += event.get("dur", 0)
  return ("device", device) if device else ("XLA CPU threads", cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  bench_train.add_step_arguments(parser)
  parser.add_argument("--top", type=int, default=30, help="ops to list")
  parser.add_argument("--trace_dir", default=None, help="default: a new temporary directory")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from specialize_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  vocab = model_config.get_config(args.preset).vocab_size
  batch = bench_train.random_batch(np, args.batch, args.inputs, args.targets, vocab)
  step, info = bench_train.our_step(args, batch)
  for _ in range(2):  # past the first call's compilation and any re-layout of the donated state
    step()
  start = time.perf_counter()
  step()
  step_s = time.perf_counter() - start
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_train_step_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  step()
  jax.profiler.stop_trace()
  print(f"{info['device']} ({info['backend']}): step {step_s * 1e3:.1f} ms untraced, "
        f"first step {info['first_step_s']:.1f} s; trace in {trace_dir}")
  traces = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                            recursive=True), key=os.path.getmtime)
  where, totals = op_times(traces[-1]) if traces else ("trace", collections.Counter())
  if not totals:
    print(f"No XLA ops found in the {where}: open it in a viewer.")
    return
  busy = sum(totals.values())
  print(f"ops on the {where}: {busy / 1e3:.1f} ms in all")
  for name, microseconds in totals.most_common(args.top):
    print(f"{microseconds / 1e3:9.3f} ms {100 * microseconds / busy:5.1f} %  {name}")

if __name__ == "__main__":
  main()
