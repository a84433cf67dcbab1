"""The `specialize` command: one entry point, one subcommand per job.

  specialize download [--data_dir DIR] [--only gsm8k,bbh] [--force] [--base_url URL]
  specialize score --task TASK --predictions FILE.jsonl [--metric_mode {default,paper}]
  specialize tasks [--filter SUBSTRING]
  specialize prepare_tfds --tfds_data_dir DIR [--source_dir DIR]
  specialize convert --from {hf,t5x,auto} SRC --to {hf,orbax} DST
  specialize train|eval|infer --gin_file=F [--gin_file=F2] [--gin.X=Y ...] [--gin_search_paths=P,...]
  specialize demo [--output_dir runs/demo]

This module is the only place that reads argv and imports `tasks` (which registers SeqIO tasks).
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

from specialize_jax import gin_config


def _quiet_tensorflow() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _registered_task(name: str):
  import difflib  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)
  if name not in seqio.TaskRegistry.names():
    close = difflib.get_close_matches(name, seqio.TaskRegistry.names(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " List them with `specialize tasks`."
    raise SystemExit(f"specialize: unknown task {name!r}.{hint}")
  return seqio.get_mixture_or_task(name)


def _cmd_score(args) -> int:
  from specialize_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  task = _registered_task(args.task)
  start = time.perf_counter()
  try:
    result = scoring.score(task, args.predictions, metric_mode=args.metric_mode,
                           prediction_field=args.prediction_field)
  except (scoring.PredictionsError, FileNotFoundError) as e:
    print(f"specialize score: {e}", file=sys.stderr)
    return 2
  output = result.to_json()
  output["seconds"] = round(time.perf_counter() - start, 3)
  print(json.dumps(output))
  return 0


def _cmd_download(args) -> int:
  from specialize_jax.data import data_dir as data_dir_lib  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import download  # pylint: disable=g-import-not-at-top
  target = args.data_dir or str(data_dir_lib.data_dir())
  try:
    summary = download.download(target, only=args.only, force=args.force,
                                base_url_override=args.base_url, timeout_s=args.timeout_s,
                                retries=args.retries)
  except ValueError as e:
    print(f"specialize download: {e}", file=sys.stderr)
    return 2
  print(download.format_summary(summary))
  return summary.exit_code


def _cmd_tasks(args) -> int:
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top,unused-import
  for name in sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names()):
    if args.filter in name:
      print(name)
  return 0


def _cmd_prepare_tfds(args) -> int:
  from specialize_jax.data import tfds_gsm8k  # pylint: disable=g-import-not-at-top
  try:
    path = tfds_gsm8k.prepare_gsm8k_tfds(args.tfds_data_dir, args.source_dir)
  except FileNotFoundError as e:
    print(f"specialize prepare_tfds: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"dataset": tfds_gsm8k.GSM8K_TFDS_NAME, "path": path}))
  return 0


def _cmd_convert(args) -> int:
  from specialize_jax.model import convert  # pylint: disable=g-import-not-at-top
  try:
    result = convert.convert(args.src, args.src_format, args.dst, args.dst_format)
  except (ValueError, FileNotFoundError) as e:
    print(f"specialize convert: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result) if isinstance(result, dict) else f"wrote {args.dst}")
  return 0


GIN_JOBS = {"train": "train", "eval": "evaluate", "infer": "infer"}
REPO_GIN_DIR = gin_config.REPO_GIN_DIR


def _initialize_distributed(args) -> None:
  """Multi-host jobs: `--multihost` on TPU VMs / managed clusters (JAX finds its peers), or the
  explicit `--coordinator_address --num_processes --process_id` (e.g. GPU hosts, CPU with gloo)."""
  import jax  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import partitioning  # pylint: disable=g-import-not-at-top
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in explicit):
    if os.environ.get("JAX_PLATFORMS") == "cpu":  # CPU clusters need a collectives backend.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    partitioning.initialize_distributed(*explicit)
  elif args.multihost:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _cmd_gin_job(args, extra: List[str]) -> int:
  import gin  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)
  from specialize_jax import runs  # pylint: disable=g-import-not-at-top
  if not args.gin_file:
    raise SystemExit(f"specialize {args.command}: give at least one --gin_file "
                     f"(e.g. gin/experiments/demo_cpu.gin).")
  search_paths = [p for p in args.gin_search_paths.split(",") if p]
  gin_config.parse_gin(args.gin_file, gin_config.gin_bindings(extra), search_paths)
  gin_config.write_config(gin_config.macro("MODEL_DIR") if args.command == "train" else None)
  job = gin.get_configurable(getattr(runs, GIN_JOBS[args.command]))
  result = job()
  if isinstance(result, dict):
    print(json.dumps(result, default=str))
  return 0


def _cmd_demo(args, extra: List[str]) -> int:
  import tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the demo tasks)
  from specialize_jax import demo  # pylint: disable=g-import-not-at-top
  from tasks import demo as demo_tasks  # pylint: disable=g-import-not-at-top
  if extra:
    raise SystemExit(f"specialize demo: unrecognized arguments {extra}.")
  return demo.run_demo(args.output_dir, str(demo_tasks.default_demo_dir()),
                       only_data=args.only_data, train_steps=args.train_steps)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="specialize", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("score", help="score a predictions JSONL against an eval task")
  p.add_argument("--task", required=True, help="registered eval task, e.g. gsm8k_test_icl_cot")
  p.add_argument("--predictions", required=True, help="JSONL with a 'prediction' string per line")
  p.add_argument("--metric_mode", choices=("default", "paper"), default="default")
  p.add_argument("--prediction_field", default="prediction",
                 help="dotted path of the text field (e.g. 175b_verification.solution)")
  p.set_defaults(fn=_cmd_score)

  p = sub.add_parser("download", help="fetch the public datasets, prompts and vocabulary")
  p.add_argument("--data_dir", default=None, help="default: $SPECIALIZE_DATA_DIR or ~/.cache/...")
  p.add_argument("--only", default=None, help="comma-separated groups, e.g. gsm8k,bbh")
  p.add_argument("--force", action="store_true", help="download even files that verify")
  p.add_argument("--base_url", default=None, help="mirror serving the data-dir layout")
  p.add_argument("--timeout_s", type=float, default=60.0)
  p.add_argument("--retries", type=int, default=3)
  p.set_defaults(fn=_cmd_download)

  p = sub.add_parser("tasks", help="list registered SeqIO tasks and mixtures")
  p.add_argument("--filter", default="", help="only names containing this substring")
  p.set_defaults(fn=_cmd_tasks)

  p = sub.add_parser("prepare_tfds", help="build the TFDS gsm8k:1.0.0 dataset from local files")
  p.add_argument("--tfds_data_dir", required=True)
  p.add_argument("--source_dir", default=None, help="holds train.jsonl/test.jsonl (default: data dir)")
  p.set_defaults(fn=_cmd_prepare_tfds)

  p = sub.add_parser("convert", help="convert a checkpoint between HF, T5X and orbax formats")
  p.add_argument("--from", dest="src_format", choices=("hf", "t5x", "auto"), default="auto")
  p.add_argument("src")
  p.add_argument("--to", dest="dst_format", choices=("hf", "orbax"), required=True)
  p.add_argument("dst")
  p.set_defaults(fn=_cmd_convert)

  for job, help_text in (("train", "train with gin configs (T5X-style flags)"),
                         ("eval", "evaluate a checkpoint or every checkpoint of a run"),
                         ("infer", "write predictions JSONL for a task or a text file")):
    p = sub.add_parser(job, help=help_text)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable; later files override earlier)")
    p.add_argument("--gin_search_paths", default="", help="comma-separated gin include paths")
    p.add_argument("--multihost", action="store_true",
                   help="join a multi-host job (jax.distributed.initialize() auto-detection)")
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.set_defaults(fn=_cmd_gin_job, takes_extra=True)

  p = sub.add_parser("demo", help="train a CoT and an answer-only tiny student on generated "
                     "arithmetic problems and compare them (no download)")
  p.add_argument("--output_dir", default="runs/demo")
  p.add_argument("--only_data", action="store_true", help="write the demo data and stop")
  p.add_argument("--train_steps", type=int, default=None, help="override TRAIN_STEPS")
  p.set_defaults(fn=_cmd_demo, takes_extra=True)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  _quiet_tensorflow()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # Orbax and absl log every save at INFO; keep the console for the run's own progress.
  for name in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(logging.WARNING)
  args, extra = build_parser().parse_known_args(argv)
  if getattr(args, "takes_extra", False):
    return args.fn(args, extra)
  if extra:
    raise SystemExit(f"specialize {args.command}: unrecognized arguments {extra}.")
  return args.fn(args)


if __name__ == "__main__":
  sys.exit(main())
