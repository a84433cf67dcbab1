"""The `specialize` command: one entry point, one subcommand per job.

  specialize download [--data_dir DIR] [--only gsm8k,bbh] [--force] [--base_url URL]
  specialize score --task TASK --predictions FILE.jsonl [--metric_mode {default,paper}]
  specialize tasks [--filter SUBSTRING]
  specialize prepare_tfds --tfds_data_dir DIR [--source_dir DIR]
  specialize convert --from {hf,t5x,auto} SRC --to {hf,orbax,t5x} DST
  specialize train|eval|infer --gin_file=F [--gin_file=F2] [--gin.X=Y ...]
      [--gin_search_paths=P,...]
      [--multihost | --coordinator_address HOST:PORT --num_processes N --process_id I]
  specialize plan --gin_file=F [--gin.X=Y ...] [--topology {v4-32,v5e-64,v5p-128,8xH100,...}]
      [--no_compile]
  specialize demo [--output_dir runs/demo]
  specialize sweep MODEL_DIR [--tasks T ...] [--bbh_tasks B ...] [--max_examples N]
      [--include_start CKPT] [--num_partitions N] [--fsdp] [--dtype {float32,bfloat16}]
      [--reference FILE|RUN_DIR|NAME]
      [--multihost | --coordinator_address HOST:PORT --num_processes N --process_id I]
  specialize report MODEL_DIR [--reference FILE.json|FILE.csv|RUN_DIR|NAME] [--write]
      [--rule {ood_dev,id_dev}] [--dtype {float32,bfloat16}]
  specialize compare RUN_A RUN_B ... [--labels A B ...] --output DIR [--dtype {float32,bfloat16}]
  specialize prepare --output DIR [--teacher TEACHER.jsonl] [--aligned ALIGNED.jsonl] [--workers N]
  specialize align --input TEACHER.jsonl --output ALIGNED.jsonl --vocab SPM_MODEL
      [--mode {default,paper}]
  specialize teacher --base_url URL --model NAME --api {completions,chat} --output FILE.jsonl [...]
  specialize teacher_import --from fu2023_pickle SRC --output FILE.jsonl
  specialize teacher_filter --input FILE.jsonl --output FILTERED.jsonl
  specialize serve CHECKPOINT --vocab SPM_MODEL [--port 8000] [--host 127.0.0.1] [--api_key KEY]

This package is the only place that reads argv and imports `tasks` (which registers SeqIO tasks).
Each module of it is one group of commands, declaring its flags (`add_arguments`) beside its
handlers, which parse flags and call the library. `main` builds the parser from the groups and
dispatches.

A user error (the `errors.UserError` family, e.g. a `ConfigError`: a bad flag or gin value; or a
`FileNotFoundError`: a missing data file, vocabulary or checkpoint, named with the command that
fetches it) prints one line on stderr and exits 2, before anything compiles where the job can check
it; anything else is a bug and ends in a traceback.

Multi-host: every process runs the same command (plus its own --process_id); `main()` joins the
job (`runtime.distributed.join`) before it starts, and only process 0 writes the run's own files
(config.gin, metrics, eval outputs, reports); checkpoints are written collectively. A preempted
`train` (SIGTERM, TPU maintenance) saves one step on every process and exits 0 printing
`preempted at step N; rerun the same command to resume`.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional

from specialize_jax.cli import convert
from specialize_jax.cli import data
from specialize_jax.cli import demo
from specialize_jax.cli import jobs
from specialize_jax.cli import plan
from specialize_jax.cli import serve
from specialize_jax.cli import sweep
from specialize_jax.cli import teacher
from specialize_jax.errors import ConfigError
from specialize_jax.errors import UserError
from specialize_jax.runtime import allocator
from specialize_jax.runtime import xla_flags

# What a user can fix: one line and exit code 2. A missing file the library names (data,
# vocabulary, teacher file) is a `FileNotFoundError` with the command that fetches it.
USER_ERRORS = (UserError, FileNotFoundError)

# The command groups, in the order `specialize --help` lists their commands.
COMMAND_GROUPS = (data, convert, jobs, plan, demo, sweep, teacher, serve)


def build_parser() -> argparse.ArgumentParser:
  """The `specialize` parser: every group's commands, each with its handler as `fn`."""
  parser = argparse.ArgumentParser(prog="specialize", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for group in COMMAND_GROUPS:
    group.add_arguments(sub)
  return parser


def _one_line(error: Exception) -> str:
  # gin appends the configurable's call site ("In call to configurable ...") on further lines.
  return " ".join(str(error).split("\n  In call to configurable")[0].split())


def _join_distributed(args: argparse.Namespace) -> None:
  """Joins the multi-host job a job's flags ask for (else checks it is not one), first: before
  the job touches a JAX backend or writes a file."""
  # JAX is imported only for the jobs that take the multi-host flags.
  from specialize_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  distributed.join(args.multihost, args.coordinator_address, args.num_processes, args.process_id)


def main(argv: Optional[List[str]] = None) -> int:
  """Runs the command `argv` (default: the program's arguments); returns its exit code."""
  if argv is None and sys.argv[1:2] in (["train"], ["demo"]):
    # Run as a training program (not called from Python): CPU step buffers stay for reuse.
    allocator.reexec_with_tunables()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  xla_flags.apply()  # Before anything starts JAX; a no-op once a backend is running.
  # `force`: a library imported before this call (in a notebook, a script calling `main`) may have
  # given the root logger a WARNING-level handler, which would hide the run's progress.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  # Orbax and absl log every save at INFO; keep the console for the run's own progress.
  for name in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(logging.WARNING)
  args, extra = build_parser().parse_known_args(argv)
  try:
    if hasattr(args, "multihost"):
      _join_distributed(args)
    if getattr(args, "takes_extra", False):
      return args.fn(args, extra)
    if extra:
      raise ConfigError(f"unrecognized arguments {extra}.")
    return args.fn(args)
  except USER_ERRORS as e:
    print(f"specialize {args.command}: {_one_line(e)}", file=sys.stderr)
    return 2
