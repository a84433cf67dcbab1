"""What several command groups share: registering the tasks, flags two groups declare alike, and
the exit of a preempted job.

The command modules import the heavy libraries (JAX, SeqIO, TensorFlow) inside their handlers, so
that building the parser, `--help` and the light commands start in a fraction of a second.
"""
import argparse
import importlib
import logging
from typing import List


def register_tasks() -> None:
  """Registers the SeqIO tasks and mixtures: only the command line does (importing `tasks`)."""
  importlib.import_module("specialize_jax.tasks")


def add_gin_flags(p: argparse.ArgumentParser, gin_file_help: str) -> None:
  p.add_argument("--gin_file", action="append", default=[], help=gin_file_help)
  p.add_argument("--gin_search_paths", default="", help="comma-separated gin include paths")


def search_paths(args: argparse.Namespace) -> List[str]:
  """The `--gin_search_paths` as a list."""
  return [p for p in args.gin_search_paths.split(",") if p]


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
  """The flags that join a multi-host job (`runtime.distributed.join` reads them)."""
  p.add_argument("--multihost", action="store_true",
                 help="join a multi-host job (jax.distributed.initialize() auto-detection, e.g. "
                 "TPU VM slices, SLURM)")
  p.add_argument("--coordinator_address", default=None,
                 help="host:port of process 0 (with --num_processes and --process_id)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)


def report_preempted(error: Exception) -> int:
  """Every process saved the step `error` names: exit 0, so schedulers do not count a failure."""
  logging.warning("%s", error)
  print(str(error), flush=True)
  return 0
