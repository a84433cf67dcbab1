"""The commands over a run's checkpoints: `sweep` (evaluate every checkpoint, select one, write the
report and `BEST`), `report` (a run's selected checkpoint from its eval results, optionally beside
reference numbers) and `compare` (several runs at their selected checkpoints)."""
# Each handler imports the libraries it uses (sweeping decodes with JAX and reads SeqIO tasks),
# so that `specialize --help` and the other commands start at once.
# pylint: disable=g-import-not-at-top
import argparse
import json

from specialize_jax.cli import common
from specialize_jax.data import storage
from specialize_jax.errors import ConfigError
from specialize_jax.jobs import gin_config
from specialize_jax.jobs import reference_source



def _add_rule_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--rule", default="ood_dev", choices=("ood_dev", "id_dev"),
                 help="ood_dev: mean of multiarith_dev_{icl,zs}_cot (default); id_dev: the same "
                 "over gsm8k_dev")
  p.add_argument("--rule_tasks", nargs="+", default=None,
                 help="custom rule: mean accuracy over these dev tasks (test splits are refused)")


def _add_reference_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--reference", default=None, metavar="FILE|RUN|NAME",
                 help="reference numbers to print beside the selected checkpoint: a .json or "
                 ".csv file (docs/evaluation.md#reference-numbers), another run directory (its "
                 f"selected checkpoint), or a shipped name ({', '.join(reference_source.shipped_references())})")


def add_arguments(sub) -> None:
  """Declares `sweep`, `report` and `compare` on the `specialize` subparsers `sub`."""
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
  _add_reference_flag(p)
  _add_rule_flags(p)
  common.add_distributed_flags(p)
  p.set_defaults(fn=cmd_sweep)

  p = sub.add_parser("report", help="a run's selected checkpoint and its accuracies, from its "
                     "eval results (no decoding); with --reference, beside reference numbers")
  p.add_argument("model_dir")
  _add_reference_flag(p)
  p.add_argument("--write", action="store_true",
                 help="also rewrite MODEL_DIR/report/ (with the reference section); BEST is left "
                 "as the sweep wrote it")
  p.add_argument("--no_start", action="store_true",
                 help="step 0 is a real checkpoint of the run, not a start checkpoint")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="use only results decoded in this dtype (default: the run's model dtype, "
                 "from its config.gin)")
  _add_rule_flags(p)
  p.set_defaults(fn=cmd_report)

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
  p.set_defaults(fn=cmd_compare)


def cmd_sweep(args: argparse.Namespace) -> int:
  from specialize_jax.evaluation import evaluator
  from specialize_jax.evaluation import selection
  from specialize_jax.evaluation import sweep
  from specialize_jax.jobs import preflight
  from specialize_jax.training import partitioning
  common.register_tasks()
  rule = selection.make_rule(args.rule, args.rule_tasks)
  config = evaluator.EvalConfig(
      task_names=(tuple(sweep.DEFAULT_MATH_TASKS if args.tasks is None else args.tasks) +
                  tuple(sweep.bbh_task_names(sweep.DEFAULT_BBH_SUBTASKS if args.bbh_tasks is None
                                             else args.bbh_tasks))),
      feature_lengths={"inputs": args.input_length, "targets": args.target_length},
      batch_size=args.batch_size, max_examples=args.max_examples,
      max_decode_length=args.max_decode_length)
  preflight.check_tasks(config.task_names, "--tasks / --bbh_tasks")
  # Read before decoding, so a bad reference fails in a second, not after the sweep.
  ref = (reference_source.load_reference(args.reference, rule, None, sweep.START_STEP) if args.reference
         else None)
  partitioner = partitioning.PartitioningConfig(
      num_partitions=args.num_partitions,
      logical_axis_rules=(partitioning.fsdp_logical_axis_rules() if args.fsdp
                          else partitioning.STANDARD_LOGICAL_AXIS_RULES))
  result = sweep.sweep(args.model_dir, config, start_checkpoint=args.include_start,
                       mesh=partitioning.make_mesh(partitioner),
                       logical_axis_rules=partitioner.logical_axis_rules,
                       dtype=args.dtype or gin_config.recorded_model_dtype(args.model_dir))
  summary = sweep.write_report_and_best(args.model_dir, result, rule, reference=ref)
  if summary is not None:  # Process 0 wrote the report.
    print(json.dumps(summary))
  return 0


def cmd_report(args: argparse.Namespace) -> int:
  from specialize_jax.evaluation import reference
  from specialize_jax.evaluation import report
  from specialize_jax.evaluation import selection
  from specialize_jax.evaluation import sweep
  model_dir = storage.absolute(args.model_dir)
  rule = selection.make_rule(args.rule, args.rule_tasks)
  start_step = None if args.no_start else sweep.START_STEP
  table = sweep.read_accuracy_table(model_dir, args.dtype or
                                    gin_config.recorded_model_dtype(model_dir))
  step, how = selection.select_or_last(table, rule, start_step)
  if step is None:
    raise ConfigError(f"Run {model_dir} has no eval results under "
                      f"{storage.join(model_dir, 'eval')}; run `specialize sweep {model_dir}`.")
  ref = (reference_source.load_reference(args.reference, rule, args.dtype, start_step) if args.reference
         else reference.Reference(model_dir, ()))
  chosen = selection.select(table, rule, [s for s in table if s != start_step])
  print(f"Run: {model_dir}")
  print(f"Selected: {chosen.explain()}" if chosen.step is not None else
        f"{chosen.explain()} Shown: step {step}, {how}.")
  print(f"Checkpoint: {storage.join(model_dir, f'checkpoint_{step}')}")
  print()
  comparison = reference.compare(table, step, ref, f"this run (step {step})")
  print(reference.format_text(comparison))
  if args.write:
    previous = storage.join(model_dir, report.REPORT_SUBDIR, "results.json")
    timing = (json.loads(storage.read_text(previous)).get("timing")
              if storage.exists(previous) else None)
    written = report.write_run_report(
        model_dir, table, rule=rule, start_step=start_step, timing=timing,
        reference_markdown=reference.format_markdown(comparison) if args.reference else None)
    print(f"\nWrote {written.files['report.md']}")
  return 0


def cmd_compare(args: argparse.Namespace) -> int:
  from specialize_jax.evaluation import report
  from specialize_jax.evaluation import selection
  from specialize_jax.evaluation import sweep
  labels = args.labels or [storage.basename(r.rstrip("/")) for r in args.runs]
  if len(labels) != len(args.runs):
    raise ConfigError(f"{len(labels)} --labels for {len(args.runs)} runs; give one per run.")
  runs = [(label, storage.absolute(run), sweep.read_accuracy_table(
      run, args.dtype or gin_config.recorded_model_dtype(run)))
          for label, run in zip(labels, args.runs)]
  rule = selection.make_rule(args.rule, args.rule_tasks)
  files = report.write_comparison(runs, args.output, rule=rule,
                                  start_step=None if args.no_start else sweep.START_STEP)
  print(json.dumps(files))
  return 0
