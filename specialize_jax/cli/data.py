"""The data commands: `download`, `tasks`, `score` and `prepare_tfds`."""
# Each handler imports the libraries it uses (SeqIO and TensorFlow take seconds), so that
# `specialize --help` and the light commands start at once.
# pylint: disable=g-import-not-at-top
import argparse
import difflib
import json
import time

from specialize_jax.cli import common
from specialize_jax.errors import ConfigError


def add_arguments(sub) -> None:
  """Declares the data commands on the `specialize` subparsers `sub`."""
  p = sub.add_parser("score", help="score a predictions JSONL against an eval task")
  p.add_argument("--task", required=True, help="registered eval task, e.g. gsm8k_test_icl_cot")
  p.add_argument("--predictions", required=True, help="JSONL with a 'prediction' string per line")
  p.add_argument("--metric_mode", choices=("default", "paper"), default="default")
  p.add_argument("--prediction_field", default="prediction",
                 help="dotted path of the text field (e.g. 175b_verification.solution)")
  p.set_defaults(fn=cmd_score)

  p = sub.add_parser("download", help="fetch the public datasets, prompts and vocabulary")
  p.add_argument("--data_dir", default=None, help="default: $SPECIALIZE_DATA_DIR or ~/.cache/...")
  p.add_argument("--only", default=None, help="comma-separated groups, e.g. gsm8k,bbh")
  p.add_argument("--force", action="store_true", help="download even files that verify")
  p.add_argument("--base_url", default=None, help="mirror serving the data-dir layout")
  p.add_argument("--timeout_s", type=float, default=60.0)
  p.add_argument("--retries", type=int, default=3)
  p.set_defaults(fn=cmd_download)

  p = sub.add_parser("tasks", help="list registered SeqIO tasks and mixtures")
  p.add_argument("--filter", default="", help="only names containing this substring")
  p.set_defaults(fn=cmd_tasks)

  p = sub.add_parser("prepare_tfds", help="build the TFDS gsm8k:1.0.0 dataset from local files")
  p.add_argument("--tfds_data_dir", required=True)
  p.add_argument("--source_dir", default=None,
                 help="holds train.jsonl/test.jsonl (default: data dir)")
  p.set_defaults(fn=cmd_prepare_tfds)


def _registered_task(name: str):
  """The registered task `--task` names; a `ConfigError` with close names otherwise."""
  import seqio
  common.register_tasks()
  if name not in seqio.TaskRegistry.names():
    close = difflib.get_close_matches(name, seqio.TaskRegistry.names(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " List them with `specialize tasks`."
    raise ConfigError(f"unknown task {name!r}.{hint}")
  return seqio.get_mixture_or_task(name)


def cmd_score(args: argparse.Namespace) -> int:
  from specialize_jax.evaluation import scoring
  task = _registered_task(args.task)
  start = time.perf_counter()
  result = scoring.score(task, args.predictions, metric_mode=args.metric_mode,
                         prediction_field=args.prediction_field)
  output = result.to_json()
  output["seconds"] = round(time.perf_counter() - start, 3)
  print(json.dumps(output))
  return 0


def cmd_download(args: argparse.Namespace) -> int:
  from specialize_jax.data import data_dir as data_dir_lib
  from specialize_jax.data import download
  target = args.data_dir or str(data_dir_lib.data_dir())
  summary = download.download(target, only=args.only, force=args.force,
                              base_url_override=args.base_url, timeout_s=args.timeout_s,
                              retries=args.retries)
  print(download.format_summary(summary))
  return summary.exit_code


def cmd_tasks(args: argparse.Namespace) -> int:
  import seqio
  common.register_tasks()
  for name in sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names()):
    if args.filter in name:
      print(name)
  return 0


def cmd_prepare_tfds(args: argparse.Namespace) -> int:
  from specialize_jax.data import tfds_gsm8k
  path = tfds_gsm8k.prepare_gsm8k_tfds(args.tfds_data_dir, args.source_dir)
  print(json.dumps({"dataset": tfds_gsm8k.GSM8K_TFDS_NAME, "path": path}))
  return 0
