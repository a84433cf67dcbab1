"""The gin-configured jobs: `train`, `eval` and `infer`, with T5X's flags (`--gin_file`,
`--gin.X=Y`, `--gin_search_paths`) and the multi-host ones."""
# The jobs import JAX, SeqIO and the model: the handler imports them when it runs.
# pylint: disable=g-import-not-at-top
import argparse
import json
from typing import List

from specialize_jax.cli import common
from specialize_jax.errors import ConfigError
from specialize_jax.jobs import gin_config

# Command -> the function of `jobs.runs` it configures with gin and calls.
GIN_JOBS = {"train": "train", "eval": "evaluate", "infer": "infer"}


def add_arguments(sub) -> None:
  """Declares `train`, `eval` and `infer` on the `specialize` subparsers `sub`."""
  for job, help_text in (("train", "train with gin configs (T5X-style flags)"),
                         ("eval", "evaluate a checkpoint or every checkpoint of a run, in the "
                          "dtype of the model the run trained (--gin.DECODE_DTYPE overrides)"),
                         ("infer", "write predictions JSONL for a task or a text file, in the "
                          "dtype of the model the run trained (--gin.DECODE_DTYPE overrides)")):
    p = sub.add_parser(job, help=help_text)
    common.add_gin_flags(p, "gin file (repeatable; later files override earlier)")
    common.add_distributed_flags(p)
    p.set_defaults(fn=cmd_gin_job, takes_extra=True)


def cmd_gin_job(args: argparse.Namespace, extra: List[str]) -> int:
  """Parses the gin files and `--gin.X=Y` bindings (`extra`), checks the tasks and data the job
  reads, records the configuration and runs the job."""
  import gin
  from specialize_jax.jobs import preflight
  from specialize_jax.jobs import runs
  from specialize_jax.training import preemption
  common.register_tasks()
  if not args.gin_file:
    raise ConfigError("give at least one --gin_file (e.g. gin/experiments/demo_cpu.gin).")
  gin_config.parse_gin(args.gin_file, gin_config.gin_bindings(extra), common.search_paths(args))
  preflight.check_job_inputs(args.command)
  gin_config.write_config(gin_config.macro("MODEL_DIR") if args.command == "train" else None)
  job = gin.get_configurable(getattr(runs, GIN_JOBS[args.command]))
  try:
    result = job()
  except preemption.Preempted as e:
    return common.report_preempted(e)
  if isinstance(result, dict):
    print(json.dumps(result, default=str))
  return 0
