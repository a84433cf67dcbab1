"""The `specialize` command: one entry point, one subcommand per job.

  specialize download [--data_dir DIR] [--only gsm8k,bbh] [--force] [--base_url URL]
  specialize score --task TASK --predictions FILE.jsonl [--metric_mode {default,paper}]
  specialize tasks [--filter SUBSTRING]
  specialize prepare_tfds --tfds_data_dir DIR [--source_dir DIR]
  specialize convert --from {hf,t5x,auto} SRC --to {hf,orbax,t5x} DST
  specialize train|eval|infer --gin_file=F [--gin_file=F2] [--gin.X=Y ...] [--gin_search_paths=P,...]
      [--multihost | --coordinator_address HOST:PORT --num_processes N --process_id I]
  specialize plan --gin_file=F [--gin.X=Y ...] [--topology {v4-32,v5e-64,v5p-128,8xH100,...}] [--no_compile]
  specialize demo [--output_dir runs/demo]
  specialize sweep MODEL_DIR [--tasks T ...] [--bbh_tasks B ...] [--max_examples N] [--include_start CKPT]
      [--num_partitions N] [--fsdp] [--dtype {float32,bfloat16}]
      [--multihost | --coordinator_address HOST:PORT --num_processes N --process_id I]
  specialize compare RUN_A RUN_B ... [--labels A B ...] --output DIR [--dtype {float32,bfloat16}]
  specialize prepare --output DIR [--teacher TEACHER.jsonl] [--aligned ALIGNED.jsonl] [--workers N]
  specialize align --input TEACHER.jsonl --output ALIGNED.jsonl --vocab SPM_MODEL [--mode {default,paper}]
  specialize teacher --base_url URL --model NAME --api {completions,chat} --output FILE.jsonl [...]
  specialize teacher_import --from fu2023_pickle SRC --output FILE.jsonl
  specialize teacher_filter --input FILE.jsonl --output FILTERED.jsonl

This module is the only place that reads argv and imports `tasks` (which registers SeqIO tasks).
A user error (a `ConfigError`: a bad flag or gin value; a `FileNotFoundError`: a missing data file,
vocabulary or checkpoint, named with the command that fetches it) prints one line on stderr and
exits 2, before anything compiles where the job can check it; a traceback means a bug.

Multi-host: every process runs the same command (plus its own --process_id); `jax.distributed` is
initialized in `main()` before the job starts, and only process 0 writes the run's own files
(config.gin, metrics, eval outputs, reports); checkpoints are written collectively. A preempted
`train` (SIGTERM, TPU maintenance) saves one step on every process and exits 0 printing
`preempted at step N; rerun the same command to resume`.
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

from specialize_jax.jobs import gin_config
from specialize_jax.runtime import allocator
from specialize_jax.runtime import xla_flags
from specialize_jax.errors import ConfigError
from specialize_jax.data import storage

USER_ERRORS = (ConfigError, FileNotFoundError)


def _quiet_tensorflow() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _registered_task(name: str):
  import difflib  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)
  if name not in seqio.TaskRegistry.names():
    close = difflib.get_close_matches(name, seqio.TaskRegistry.names(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " List them with `specialize tasks`."
    raise ConfigError(f"unknown task {name!r}.{hint}")
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
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import
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
  from specialize_jax.checkpoints import convert  # pylint: disable=g-import-not-at-top
  try:
    result = convert.convert(args.src, args.src_format, args.dst, args.dst_format)
  except (ValueError, FileNotFoundError) as e:
    print(f"specialize convert: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result) if isinstance(result, dict) else f"wrote {args.dst}")
  return 0


def _cmd_teacher(args) -> int:
  from specialize_jax.teacher import teacher_client  # pylint: disable=g-import-not-at-top
  logging.getLogger("httpx").setLevel(logging.WARNING)  # One line per request otherwise.
  logging.getLogger("httpx2").setLevel(logging.WARNING)
  sampling = teacher_client.SamplingConfig(
      model=args.model, api=args.api, num_samples=args.num_samples, temperature=args.temperature,
      max_tokens=args.max_tokens, top_logprobs=args.top_logprobs,
      stop=(teacher_client.SamplingConfig.stop if args.stop is None else
            tuple(s.replace("\\n", "\n") for s in args.stop if s)),
      samples_per_request=args.samples_per_request, prompt_file=args.prompt_file)
  run = teacher_client.RunConfig(
      base_url=args.base_url, concurrency=args.concurrency,
      requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
      timeout_s=args.timeout_s, max_attempts=args.max_attempts,
      initial_backoff_s=args.initial_backoff_s, max_backoff_s=args.max_backoff_s,
      progress_period_s=args.progress_period_s)
  try:
    sampling.check()
    prompt = teacher_client.load_few_shot_prompt(args.prompt_file)
    examples = teacher_client.split_examples(args.split)[:args.limit]
    if args.dry_run:
      todo = teacher_client.pending(examples, args.output, sampling.teacher_info())
      print(json.dumps(dict(teacher_client.dry_run_estimate(
          todo, sampling, prompt, args.price_per_1k_input, args.price_per_1k_output),
          skipped_already_done=len(examples) - len(todo))))
      return 0
    summary = teacher_client.run_teacher(examples, args.output, sampling, run, prompt,
                                         teacher_client.read_api_key(),
                                         write_filtered=args.filter, seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"specialize teacher: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 1 if summary["questions"]["failed"] else 0


def _cmd_teacher_import(args) -> int:
  from specialize_jax.data import readers  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import splits  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_sources  # pylint: disable=g-import-not-at-top
  try:
    train = readers.read_gsm8k("train")
    if args.src_format == "fu2023_codex":
      records = teacher_sources.records_from_fu2023_codex(args.src)
    else:
      records = teacher_sources.records_from_fu2023_pickle(
          args.src, {e.question: e.id for e in train})
    # The paper sampled all of GSM8K train; our dev questions must not become training data.
    dev_ids = {train[i].id for i in splits.gsm8k_dev_indices(len(train))}
    kept = [r for r in records if r.id not in dev_ids]
    count = teacher_data.write_records(args.output, kept)
  except (ValueError, FileNotFoundError) as e:
    print(f"specialize teacher_import: {e}", file=sys.stderr)
    return 2
  stats = teacher_data.summarize(kept)
  print(json.dumps({"output": args.output, "records": count, "samples": stats["samples"],
                    "excluded_dev_questions": len(records) - len(kept),
                    "per_sample_accuracy": stats["per_sample_accuracy"]}))
  return 0


def _cmd_teacher_filter(args) -> int:
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_filter  # pylint: disable=g-import-not-at-top
  try:
    kept, report = teacher_filter.filter_records(
        teacher_data.read_records(args.input, strict=True).records)
    teacher_data.write_records(args.output, kept)
  except (ValueError, FileNotFoundError) as e:
    print(f"specialize teacher_filter: {e}", file=sys.stderr)
    return 2
  print(json.dumps(dict(report.to_json(), output=args.output)))
  return 0


GIN_JOBS = {"train": "train", "eval": "evaluate", "infer": "infer"}
SHIPPED_GIN_DIR = gin_config.SHIPPED_GIN_DIR


def _wants_distributed(args) -> bool:
  return bool(getattr(args, "multihost", False)) or any(
      getattr(args, name, None) is not None
      for name in ("coordinator_address", "num_processes", "process_id"))


def _initialize_distributed(args) -> None:
  """Multi-host jobs: `--multihost` alone on TPU VMs / SLURM / managed clusters (JAX finds its
  peers), or the explicit `--coordinator_address --num_processes --process_id` (e.g. GPU hosts,
  CPU with gloo). Runs before the job touches a JAX backend or writes a file."""
  if not _wants_distributed(args):
    return
  import jax  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import partitioning  # pylint: disable=g-import-not-at-top
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  try:
    if not partitioning.initialize_distributed(*explicit):
      jax.distributed.initialize()  # --multihost alone: the cluster's auto-detection.
  except ValueError as e:
    raise ConfigError(str(e)) from e
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _add_distributed_flags(p) -> None:
  p.add_argument("--multihost", action="store_true",
                 help="join a multi-host job (jax.distributed.initialize() auto-detection, e.g. "
                 "TPU VM slices, SLURM)")
  p.add_argument("--coordinator_address", default=None,
                 help="host:port of process 0 (with --num_processes and --process_id)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)


def _cmd_align(args) -> int:
  from specialize_jax.align import alignment  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  try:
    summary = alignment.align_file(args.input, args.output, args.vocab, mode=args.mode,
                                   workers=args.workers or alignment.default_workers())
  except (FileNotFoundError, ValueError, teacher_data.TeacherDataError) as e:
    print(f"specialize align: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


def _cmd_prepare(args) -> int:
  from specialize_jax.data import vocabulary  # pylint: disable=g-import-not-at-top
  from specialize_jax.prepared import prepare  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  try:
    rates = json.loads(args.rates) if args.rates else dict(prepare.DEFAULT_FORMAT_RATES)
    config = prepare.PrepareConfig(
        output_dir=args.output, vocab_path=args.vocab or vocabulary.vocabulary_path(),
        format_names=tuple(args.formats.split(",")), rates=rates, teacher_k=args.teacher_k,
        max_input_tokens=args.max_input_tokens, exemplar_seed=args.exemplar_seed,
        num_chunks=args.num_chunks, workers=args.workers)
    prepared = prepare.prepare_gsm8k(config, args.teacher, args.aligned)
  except (FileNotFoundError, ValueError, json.JSONDecodeError, teacher_data.TeacherDataError) as e:
    print(f"specialize prepare: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"output": prepared.directory, "formats": prepared.metadata["formats"],
                    "excluded": prepared.metadata["excluded"],
                    "seconds": prepared.metadata["seconds"]}))
  return 0


def _check_gin_job_inputs(command: str) -> None:
  """Fails before anything compiles when a task the job reads is unknown or its data or
  vocabulary is missing (the tasks named by the shipped gin files' bindings)."""
  from specialize_jax.jobs import preflight  # pylint: disable=g-import-not-at-top
  eval_tasks = gin_config.bound_value("evaluator.EvalConfig.task_names") or ()
  eval_tasks = (eval_tasks,) if isinstance(eval_tasks, str) else tuple(eval_tasks)
  checks = []  # (task names, where they are set, whether to read their data here)
  if command == "train":  # The trainer reads its data itself before compiling.
    name = gin_config.bound_value("train/input_pipeline.DatasetConfig.mixture_or_task_name")
    checks.append(([name] if name else [], "MIXTURE_OR_TASK_NAME", False))
    if gin_config.bound_value("runs.train.eval_period"):
      checks.append((eval_tasks, "EVAL_TASKS", True))
  elif command == "eval":
    checks.append((eval_tasks, "EVAL_TASKS", True))
  elif command == "infer":
    inputs = gin_config.bound_value("runs.infer.inputs")
    vocabulary_path = gin_config.bound_value("runs.infer.vocabulary_path")
    if vocabulary_path and not storage.isfile(vocabulary_path):
      raise FileNotFoundError(f"VOCABULARY_PATH={vocabulary_path} does not exist; point "
                              "--gin.VOCABULARY_PATH at a SentencePiece model.")
    if isinstance(inputs, str) and not storage.exists(inputs):
      checks.append(([inputs], "INFER_INPUTS (a task name or a file of inputs)", True))
  for names, where, _ in checks:  # Every name first: a typo is reported before missing data.
    preflight.tasks_of(names, where)
  for names, where, read_data in checks:
    preflight.check_tasks(names, where, read_data)


def _report_preempted(error) -> int:
  """Every process saved step `error.step`: exit 0, so schedulers do not count a failure."""
  logging.warning("%s", error)
  print(str(error), flush=True)
  return 0


def _cmd_gin_job(args, extra: List[str]) -> int:
  import gin  # pylint: disable=g-import-not-at-top
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)
  from specialize_jax.jobs import runs  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import preemption  # pylint: disable=g-import-not-at-top
  if not args.gin_file:
    raise ConfigError("give at least one --gin_file (e.g. gin/experiments/demo_cpu.gin).")
  search_paths = _search_paths(args)
  gin_config.parse_gin(args.gin_file, gin_config.gin_bindings(extra), search_paths)
  _check_gin_job_inputs(args.command)
  gin_config.write_config(gin_config.macro("MODEL_DIR") if args.command == "train" else None)
  job = gin.get_configurable(getattr(runs, GIN_JOBS[args.command]))
  try:
    result = job()
  except preemption.Preempted as e:
    return _report_preempted(e)
  if isinstance(result, dict):
    print(json.dumps(result, default=str))
  return 0


def _search_paths(args) -> List[str]:
  return [p for p in args.gin_search_paths.split(",") if p]


def plan_request(gin_files: List[str], overrides: List[str], search_paths: List[str], topology):
  """The `runs.train` bindings of the gin files (and `--gin.X=Y` `overrides`) as a
  `memory_plan.PlanRequest` on `topology`; no task, data or MODEL_DIR is touched."""
  import gin  # pylint: disable=g-import-not-at-top
  from specialize_jax.planning import memory_plan  # pylint: disable=g-import-not-at-top
  # The plan writes nothing: a placeholder satisfies a required MODEL_DIR (a given one wins).
  gin_config.parse_gin(gin_files, ["MODEL_DIR = 'unused-by-plan'"] +
                       gin_config.gin_bindings(overrides), search_paths)
  try:
    bindings = gin.get_bindings("runs.train")
  except (ValueError, TypeError) as e:
    raise ConfigError(f"gin configuration error: {e}") from e
  missing = [name for name in ("model", "dataset", "num_train_steps") if name not in bindings]
  if missing:
    raise ConfigError(f"the gin files bind no runs.train.{missing[0]}; include runs/specialize.gin "
                      "(a training config) as `specialize train` would.")
  from specialize_jax.training import optimizers  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import partitioning  # pylint: disable=g-import-not-at-top
  return memory_plan.PlanRequest(
      model=bindings["model"], dataset=bindings["dataset"],
      num_train_steps=bindings["num_train_steps"],
      optimizer=bindings.get("optimizer", optimizers.OptimizerConfig()),
      partitioner=bindings.get("partitioner", partitioning.PartitioningConfig()),
      num_microbatches=bindings.get("num_microbatches", 1), topology=topology)


def _plan_topology(args):
  """`--topology`, else the one the first gin file with a `# Topology:` header line names."""
  from specialize_jax.data import storage  # pylint: disable=g-import-not-at-top
  from specialize_jax.planning import topologies  # pylint: disable=g-import-not-at-top
  name = args.topology
  if name is None:
    texts = [storage.read_text(gin_config.find_file(f, _search_paths(args)))
             for f in args.gin_file]
    name = topologies.named_topology(texts)
    if name is None:
      raise ConfigError("give --topology (e.g. v4-32, v5e-64, 8xH100): no --gin_file names one in "
                        "a `# Topology:` header line.")
  return topologies.topology(name)


def _cmd_plan(args, extra: List[str]) -> int:
  from specialize_jax.planning import memory_plan  # pylint: disable=g-import-not-at-top
  if not args.gin_file:
    raise ConfigError("give at least one --gin_file (e.g. gin/experiments/flan_t5_xl_gsm8k.gin).")
  topology = _plan_topology(args)
  import jax  # pylint: disable=g-import-not-at-top
  # Fake CPU devices, as many as the topology has chips, whatever this machine has: set before
  # anything starts a backend (main() starts none for this command).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", topology.num_devices)
  request = plan_request(args.gin_file, extra, _search_paths(args), topology)
  result = memory_plan.plan(request, compile_step=not args.no_compile,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
  print(memory_plan.format_plan(result))
  return 0 if result.fits else 1


def _cmd_demo(args, extra: List[str]) -> int:
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the demo tasks)
  from specialize_jax.demo import miniature as demo  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import preemption  # pylint: disable=g-import-not-at-top
  from specialize_jax.tasks import demo as demo_tasks  # pylint: disable=g-import-not-at-top
  if extra:
    raise ConfigError(f"unrecognized arguments {extra}.")
  try:
    return demo.run_demo(args.output_dir, str(demo_tasks.default_demo_dir()),
                         only_data=args.only_data, train_steps=args.train_steps)
  except preemption.Preempted as e:
    return _report_preempted(e)


def _selection_rule(args):
  from specialize_jax.evaluation import selection  # pylint: disable=g-import-not-at-top
  return selection.make_rule(args.rule, args.rule_tasks)


def _cmd_sweep(args) -> int:
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)
  from specialize_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import selection  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import sweep  # pylint: disable=g-import-not-at-top
  from specialize_jax.jobs import preflight  # pylint: disable=g-import-not-at-top
  try:
    rule = _selection_rule(args)
    config = evaluator.EvalConfig(
        task_names=(tuple(sweep.DEFAULT_MATH_TASKS if args.tasks is None else args.tasks) +
                    tuple(sweep.bbh_task_names(sweep.DEFAULT_BBH_SUBTASKS if args.bbh_tasks is None
                                               else args.bbh_tasks))),
        feature_lengths={"inputs": args.input_length, "targets": args.target_length},
        batch_size=args.batch_size, max_examples=args.max_examples,
        max_decode_length=args.max_decode_length)
    preflight.check_tasks(config.task_names, "--tasks / --bbh_tasks")
    from specialize_jax.training import partitioning  # pylint: disable=g-import-not-at-top
    partitioner = partitioning.PartitioningConfig(
        num_partitions=args.num_partitions,
        logical_axis_rules=(partitioning.fsdp_logical_axis_rules() if args.fsdp
                            else partitioning.STANDARD_LOGICAL_AXIS_RULES))
    result = sweep.sweep(args.model_dir, config, start_checkpoint=args.include_start,
                         mesh=partitioning.make_mesh(partitioner),
                         logical_axis_rules=partitioner.logical_axis_rules,
                         dtype=args.dtype or gin_config.recorded_model_dtype(args.model_dir))
  except (ValueError, FileNotFoundError) as e:
    print(f"specialize sweep: {e}", file=sys.stderr)
    return 2
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:  # The run's report and BEST are process 0's to write.
    return 0
  model_dir = storage.absolute(args.model_dir)
  written = report.write_run_report(
      model_dir, result.accuracy_table(), rule=rule, checkpoint_paths=result.checkpoints,
      start_step=result.start_step, timing=result.timing)
  chosen = written.chosen
  if chosen.step is not None:
    selection.write_best(model_dir, chosen, result.checkpoints[chosen.step])
  else:
    selection.remove_stale_best(model_dir)
  print(json.dumps({"report": storage.join(model_dir, report.REPORT_SUBDIR),
                    "selected_step": chosen.step, "rule": rule.name, "score": chosen.score,
                    "in_distribution_pick": written.alternative.step,
                    "decoded_pairs": len(result.decoded), "reused_pairs": result.reused,
                    "dtype": result.dtype,
                    "timing": {k: round(v, 3) for k, v in result.timing.items()}}))
  return 0


def _cmd_compare(args) -> int:
  from specialize_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import sweep  # pylint: disable=g-import-not-at-top
  labels = args.labels or [storage.basename(r.rstrip('/')) for r in args.runs]
  if len(labels) != len(args.runs):
    print(f"specialize compare: {len(labels)} --labels for {len(args.runs)} runs; give one per run.",
          file=sys.stderr)
    return 2
  try:
    runs = [(label, storage.absolute(run), sweep.read_accuracy_table(
        run, args.dtype or gin_config.recorded_model_dtype(run)))
            for label, run in zip(labels, args.runs)]
    files = report.write_comparison(runs, args.output, rule=_selection_rule(args),
                                    start_step=None if args.no_start else sweep.START_STEP)
  except (ValueError, FileNotFoundError) as e:
    print(f"specialize compare: {e}", file=sys.stderr)
    return 2
  print(json.dumps(files))
  return 0


def _add_rule_flags(p) -> None:
  p.add_argument("--rule", default="ood_dev", choices=("ood_dev", "id_dev"),
                 help="ood_dev: mean of multiarith_dev_{icl,zs}_cot (default); id_dev: the same "
                 "over gsm8k_dev")
  p.add_argument("--rule_tasks", nargs="+", default=None,
                 help="custom rule: mean accuracy over these dev tasks (test splits are refused)")


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
  p.add_argument("--to", dest="dst_format", choices=("hf", "orbax", "t5x"), required=True,
                 help="t5x: T5X's legacy layout; name DST checkpoint_<step>")
  p.add_argument("dst")
  p.set_defaults(fn=_cmd_convert)

  for job, help_text in (("train", "train with gin configs (T5X-style flags)"),
                         ("eval", "evaluate a checkpoint or every checkpoint of a run, in the "
                          "dtype of the model the run trained (--gin.DECODE_DTYPE overrides)"),
                         ("infer", "write predictions JSONL for a task or a text file, in the "
                          "dtype of the model the run trained (--gin.DECODE_DTYPE overrides)")):
    p = sub.add_parser(job, help=help_text)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable; later files override earlier)")
    p.add_argument("--gin_search_paths", default="", help="comma-separated gin include paths")
    _add_distributed_flags(p)
    p.set_defaults(fn=_cmd_gin_job, takes_extra=True)

  p = sub.add_parser("plan", help="per-device memory of the train step on a target topology "
                     "(compiled abstractly on fake CPU devices) and a verdict with the fix; exit 1 "
                     "when it does not fit")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin file (repeatable; as `specialize train`)")
  p.add_argument("--gin_search_paths", default="", help="comma-separated gin include paths")
  p.add_argument("--topology", default=None,
                 help="e.g. v4-32 (16 chips), v5e-64, v5p-128, 8xH100, 8xA100-40 (default: the "
                 "one the gin file's `# Topology:` header line names)")
  p.add_argument("--no_compile", action="store_true",
                 help="analytic rows only (params, optimizer state, gradients): no XLA "
                 "temporaries, seconds instead of minutes")
  p.set_defaults(fn=_cmd_plan, takes_extra=True)

  p = sub.add_parser("demo", help="train a CoT and an answer-only tiny student on generated "
                     "arithmetic problems and compare them (no download)")
  p.add_argument("--output_dir", default="runs/demo")
  p.add_argument("--only_data", action="store_true", help="write the demo data and stop")
  p.add_argument("--train_steps", type=int, default=None, help="override TRAIN_STEPS")
  p.set_defaults(fn=_cmd_demo, takes_extra=True)

  p = sub.add_parser("sweep", help="evaluate every checkpoint of a run (resumable), select one "
                     "by OOD dev accuracy, write MODEL_DIR/report/ and MODEL_DIR/BEST")
  p.add_argument("model_dir")
  p.add_argument("--tasks", nargs="*", default=None,
                 help="eval tasks or mixtures (default: GSM8K and MultiArith dev+test, ASDiv, "
                 "SVAMP, in icl_cot and zs_cot)")
  p.add_argument("--bbh_tasks", nargs="*", default=None,
                 help="BBH task names, each evaluated in cot and ao (default: boolean_expressions "
                 "date_understanding logical_deduction_three_objects "
                 "tracking_shuffled_objects_three_objects; the flag alone: no BBH)")
  p.add_argument("--max_examples", type=int, default=None, help="first N examples of each task")
  p.add_argument("--include_start", default=None, metavar="CHECKPOINT",
                 help="also evaluate the start checkpoint (e.g. FlanT5) as step 0")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--input_length", type=int, default=1024, help="padded input tokens")
  p.add_argument("--target_length", type=int, default=256, help="padded target tokens")
  p.add_argument("--max_decode_length", type=int, default=256)
  p.add_argument("--num_partitions", type=int, default=1,
                 help="devices on the model axis (as the training's NUM_PARTITIONS); the batch "
                 "size must be a multiple of devices / num_partitions")
  p.add_argument("--fsdp", action="store_true",
                 help="shard the params' embed dimension on the data axis too (as "
                 "gin/partitioning/fsdp.gin)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype of decoding (default: that of the model the run trained, "
                 "from MODEL_DIR/config.gin, as its in-loop evaluation; else float32); pairs "
                 "recorded in another dtype are decoded again")
  _add_rule_flags(p)
  _add_distributed_flags(p)
  p.set_defaults(fn=_cmd_sweep)

  p = sub.add_parser("compare", help="one table and plot comparing runs at their selected "
                     "(or last) checkpoints, from their eval results")
  p.add_argument("runs", nargs="+", metavar="RUN")
  p.add_argument("--labels", nargs="+", default=None)
  p.add_argument("--output", required=True)
  p.add_argument("--no_start", action="store_true",
                 help="step 0 is a real checkpoint of the runs, not a start checkpoint")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="use only results decoded in this dtype (default: each run's model dtype, "
                 "from its config.gin; without one, a run's results must share one dtype)")
  _add_rule_flags(p)
  p.set_defaults(fn=_cmd_compare)

  p = sub.add_parser("teacher", help="sample teacher chains of thought from an OpenAI-compatible "
                     "server (key from $OPENAI_API_KEY); resumable; writes X.jsonl, "
                     "X.filtered.jsonl and, on failures, X.failures.jsonl")
  p.add_argument("--base_url", default=None, help="e.g. http://localhost:8000/v1 (default: OpenAI)")
  p.add_argument("--model", required=True)
  p.add_argument("--api", choices=("completions", "chat"), default="completions")
  p.add_argument("--split", default="gsm8k_train", help="training split to sample (gsm8k_train)")
  p.add_argument("--num_samples", type=int, default=40, help="samples per question")
  p.add_argument("--temperature", type=float, default=0.5)
  p.add_argument("--top_logprobs", type=int, default=5,
                 help="per-token alternatives: completions up to 5, chat up to 20; 0 for none")
  p.add_argument("--max_tokens", type=int, default=256)
  p.add_argument("--stop", action="append", default=None,
                 help="stop sequence, backslash escapes allowed (repeatable; default \\nQuestion:)")
  p.add_argument("--prompt_file", default="prompt_complex",
                 help="name in prompts/fu2023_lib_prompt/ or a path to a .txt file")
  p.add_argument("--output", required=True, help="records JSONL (appended to; reruns resume)")
  p.add_argument("--limit", type=int, default=None, help="only the first Q questions of the split")
  p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
  p.add_argument("--samples_per_request", type=int, default=None,
                 help="split a question's samples over requests of this n (default: one request)")
  p.add_argument("--requests_per_minute", type=float, default=None)
  p.add_argument("--tokens_per_minute", type=float, default=None,
                 help="limit on estimated tokens (prompt chars/4 + max_tokens x n per request)")
  p.add_argument("--timeout_s", type=float, default=120.0, help="per request")
  p.add_argument("--max_attempts", type=int, default=8, help="per request, then the question "
                 "is recorded as failed")
  p.add_argument("--initial_backoff_s", type=float, default=1.0)
  p.add_argument("--max_backoff_s", type=float, default=60.0)
  p.add_argument("--progress_period_s", type=float, default=10.0)
  p.add_argument("--seed", type=int, default=None, help="seed of the backoff jitter")
  p.add_argument("--dry_run", action="store_true",
                 help="print estimated tokens and cost of what is left to do; send nothing")
  p.add_argument("--price_per_1k_input", type=float, default=0.0, help="for --dry_run's cost")
  p.add_argument("--price_per_1k_output", type=float, default=0.0, help="for --dry_run's cost")
  p.add_argument("--filter", action=argparse.BooleanOptionalAction, default=True,
                 help="write X.filtered.jsonl: correct samples cut after the answer line")
  p.set_defaults(fn=_cmd_teacher)

  p = sub.add_parser("teacher_import", help="convert released teacher data into our schema")
  p.add_argument("--from", dest="src_format", choices=("fu2023_pickle", "fu2023_codex"),
                 required=True, help="fu2023_pickle: the paper's processed_data/*.pkl (loaded "
                 "with a restricted unpickler); fu2023_codex: its notebook JSON samples")
  p.add_argument("src")
  p.add_argument("--output", required=True)
  p.set_defaults(fn=_cmd_teacher_import)

  p = sub.add_parser("teacher_filter",
                     help="keep correct teacher samples, cut after the answer line")
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True)
  p.set_defaults(fn=_cmd_teacher_filter)

  p = sub.add_parser("prepare", help="teacher (+ aligned) file -> the prepared training set the "
                     "distillation tasks read (ArrayRecord shards, seeded global order)")
  p.add_argument("--teacher", default=None, help="teacher JSONL (specialize_jax.teacher/1); "
                 "default: the GSM8K gold rationales")
  p.add_argument("--aligned", default=None, help="its `specialize align` output: adds the top-k "
                 "teacher rows (for the gsm8k_distill_top{k} tasks)")
  p.add_argument("--output", required=True, help="directory (local or gs://); point "
                 "$SPECIALIZE_PREPARED_DATA at it")
  p.add_argument("--vocab", default=None, help="student SentencePiece model (default: the tasks' "
                 "vocabulary)")
  p.add_argument("--teacher_k", type=int, default=None, help="top-k width (default 5 with "
                 "--aligned)")
  p.add_argument("--formats", default="zs_ao,zs_cot,icl_ao,icl_cot")
  p.add_argument("--rates", default=None, help='mixture rates as JSON, default the original\'s '
                 '{"icl_cot": 0.79, "zs_cot": 0.2, "icl_ao": 0.005, "zs_ao": 0.005}')
  p.add_argument("--max_input_tokens", type=int, default=1024)
  p.add_argument("--exemplar_seed", type=int, default=0)
  p.add_argument("--num_chunks", type=int, default=16, help="files per format")
  p.add_argument("--workers", type=int, default=1, help="processes")
  p.set_defaults(fn=_cmd_prepare)

  p = sub.add_parser("align", help="move teacher top-k onto student SentencePiece pieces (DTW)")
  p.add_argument("--input", required=True, help="teacher data JSONL (specialize_jax.teacher/1)")
  p.add_argument("--output", required=True, help="aligned JSONL (specialize_jax.aligned/1)")
  p.add_argument("--vocab", required=True, help="student SentencePiece model file")
  p.add_argument("--mode", choices=("default", "paper"), default="default")
  p.add_argument("--workers", type=int, default=None, help="processes (default: usable CPUs)")
  p.set_defaults(fn=_cmd_align)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  if argv is None and sys.argv[1:2] in (["train"], ["demo"]):
    # Run as a training program (not called from Python): CPU step buffers stay for reuse.
    allocator.reexec_with_tunables()
  _quiet_tensorflow()
  xla_flags.apply()  # Before anything starts JAX; a no-op once a backend is running.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # Orbax and absl log every save at INFO; keep the console for the run's own progress.
  for name in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(logging.WARNING)
  args, extra = build_parser().parse_known_args(argv)
  try:
    if _wants_distributed(args):
      import jax  # pylint: disable=g-import-not-at-top
      # CPU processes exchange collectives over gloo (NOTES.md); other backends ignore the flag.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      _initialize_distributed(args)  # First: before the job touches a backend or writes a file.
    elif hasattr(args, "multihost"):
      from specialize_jax.training import partitioning  # pylint: disable=g-import-not-at-top
      partitioning.check_distributed()
    if getattr(args, "takes_extra", False):
      return args.fn(args, extra)
    if extra:
      raise ConfigError(f"unrecognized arguments {extra}.")
    return args.fn(args)
  except USER_ERRORS as e:
    # One line: gin appends the configurable's call site ("In call to configurable ...").
    message = " ".join(str(e).split("\n  In call to configurable")[0].split())
    print(f"specialize {args.command}: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
