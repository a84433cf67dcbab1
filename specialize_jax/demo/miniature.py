"""`specialize demo`: the paper's experiment in miniature, offline, through the real commands.

The chain (each step the library code of the command named; docs/demo.md has the study behind the
sizes and steps):
  1. world: the generated world (`world.write_world`): math families, the generic suite, the
     pretraining text, two vocabularies.
  2. raw start: a small T5 pretrained with span corruption (`gin/demo/pretrain.gin`).
  3. generalist: the raw start instruction-tuned (`gin/demo/generalist.gin`).
  4. teacher: a larger model with its own vocabulary trained on math CoT (`gin/demo/teacher.gin`).
  5. teacher data: the teacher served on loopback (`specialize serve`) and sampled by
     `specialize teacher` (several chains per question at temperature 0.5 with top-5 logprobs),
     then `teacher_filter`, `align` to the student's vocabulary and `prepare` (four formats, top-6
     teacher rows).
  6. starts: the generalist and the raw start evaluated as they are (dev and test).
  7. specialization, per seed: the four runs of `findings.RUNS` (`gin/demo/specialize*.gin`), dense
     checkpoints swept on dev (`specialize sweep`), selected by OOD dev, the selected checkpoint
     evaluated on test.
  8. report: `OUTPUT_DIR/report/findings.md`, the plots, `OUTPUT_DIR/demo_results.json`.
Stages 2-5 are cached under the world directory, keyed by their settings (`stages`), and rebuilt
only when those change; the runs of stage 7 resume, and their sweeps reuse what they decoded.
"""
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from specialize_jax.data import storage
from specialize_jax.demo import findings as findings_lib
from specialize_jax.demo import stages
from specialize_jax.demo import world

RUN_GIN_FILES = {"distribution": "demo/specialize.gin", "sample": "demo/specialize_sample.gin",
                 "zero_shot": "demo/specialize_zero_shot.gin", "raw": "demo/specialize_raw.gin"}
RESULTS_FILE = "demo_results.json"
REPORT_SUBDIR = "report"
TEACHER_MODEL_NAME = "world-teacher"
COMPILATION_CACHE_SUBDIR = "xla_cache"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """What one `specialize demo` runs: the world's size, the seeds, and each stage's overrides."""
  world_size: world.WorldSize = world.WorldSize()
  seeds: Sequence[int] = (0,)
  stage_bindings: Dict[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  # Chains per question: 2 over 2,000 questions costs what 4 over 1,000 did (docs/demo.md).
  teacher_samples: int = 2
  teacher_questions: Optional[int] = None  # None: every `gsm` train question.
  eval_batch_size: int = 64
  eval_max_decode_length: int = 80

  @classmethod
  def quick(cls, seeds: Sequence[int] = (0,)) -> "DemoSettings":
    """Every stage, a few steps each: the chain end to end in minutes (tests)."""
    short = ("TRAIN_STEPS = 6", "CHECKPOINT_PERIOD = 6", "WARMUP_STEPS = 2", "LOG_PERIOD = 3",
             "BATCH_SIZE = 4")
    specialize = ("TRAIN_STEPS = 2", "CHECKPOINT_PERIOD = 2", "WARMUP_STEPS = 1", "LOG_PERIOD = 1",
                  "BATCH_SIZE = 4")
    # The quick teacher memorizes its 16 questions (`WorldSize.teacher_memorizes_train`).
    teacher = ("TRAIN_STEPS = 100", "CHECKPOINT_PERIOD = 100", "WARMUP_STEPS = 5",
               "LOG_PERIOD = 50", "BATCH_SIZE = 4", "LEARNING_RATE = 3e-3", "USE_PACKING = False")
    return cls(world_size=world.WorldSize.quick(), seeds=seeds,
               teacher_questions=16, eval_batch_size=8, eval_max_decode_length=24,
               stage_bindings={"pretrain": short, "generalist": short, "teacher": teacher,
                               **{run: specialize for run in RUN_GIN_FILES}})


class _Progress:
  """One line per stage on stderr: which stage, the elapsed time and an ETA from the expected
  shares of the stages still to run (a reused stage leaves the expected total)."""

  # Rough shares of a first run per stage (docs/demo.md), for the ETA: full and `--quick`.
  SHARES = {"world": 0.01, "pretrain": 0.07, "generalist": 0.12, "teacher": 0.19,
            "teacher data": 0.09, "starts": 0.04, "specialize": 0.47, "report": 0.01}
  QUICK_SHARES = {"world": 0.01, "pretrain": 0.15, "generalist": 0.06, "teacher": 0.20,
                  "teacher data": 0.15, "starts": 0.14, "specialize": 0.27, "report": 0.03}

  def __init__(self, shares: Dict[str, float]):
    self._start = time.perf_counter()
    self._shares = shares
    self._done = 0.0  # Shares of the stages this run did.
    self._total = sum(shares.values())  # Shares this run does in all.

  def elapsed(self) -> float:
    return time.perf_counter() - self._start

  def stage(self, name: str, detail: str = "") -> None:
    elapsed = self.elapsed()
    eta = (elapsed / self._done * (self._total - self._done) if self._done > 0.05 else None)
    print(f"[demo {elapsed / 60:5.1f} min{'' if eta is None else f', ETA {eta / 60:.1f} min'}] "
          f"{name}{': ' + detail if detail else ''}", file=sys.stderr, flush=True)

  def finish(self, name: str, reused: bool = False, fraction: float = 1.0) -> None:
    share = self._shares.get(name, 0.0) * fraction
    if reused:
      self._total -= share
    else:
      self._done += share


def _cache_compiled_programs(directory: pathlib.Path) -> None:
  """JAX's persistent compilation cache in `directory`, unless one is configured: the runs of
  stage 7 share programs (three train the same step) and a rerun compiles nothing it did before."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(directory))


def _eval_config(settings: DemoSettings, task_names: Sequence[str]):
  from specialize_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  return evaluator.EvalConfig(task_names=tuple(task_names),
                              feature_lengths={"inputs": 320, "targets": 80},
                              batch_size=settings.eval_batch_size,
                              max_decode_length=settings.eval_max_decode_length)


def _accuracies(metrics_by_step: Dict[int, Dict[str, Dict]], step: int) -> Dict[str, float]:
  return {task: m.get("accuracy") for task, m in metrics_by_step[step].items()}


def _evaluate_checkpoint(checkpoint: str, settings: DemoSettings, task_names: Sequence[str],
                         output_dir: Optional[str] = None) -> Dict[str, float]:
  """Accuracies of one checkpoint (reusing what an earlier call wrote)."""
  from specialize_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  results = evaluator.evaluate_checkpoints(checkpoint, _eval_config(settings, task_names),
                                           output_dir=output_dir)
  (step,) = results
  return _accuracies(results, step)


def _teacher_data(teacher: stages.StageResult, world_dir: pathlib.Path,
                  settings: DemoSettings) -> Tuple[str, bool]:
  """Samples the served teacher, filters, aligns and prepares; returns the prepared directory and
  whether all of it was reused. Each file is reused when its inputs are unchanged (the teacher
  client resumes by question)."""
  from specialize_jax.align import alignment  # pylint: disable=g-import-not-at-top
  from specialize_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  from specialize_jax.prepared import prepare  # pylint: disable=g-import-not-at-top
  from specialize_jax.prepared import prepared_data  # pylint: disable=g-import-not-at-top
  from specialize_jax.serving import completions  # pylint: disable=g-import-not-at-top
  from specialize_jax.serving import server as server_lib  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_client  # pylint: disable=g-import-not-at-top
  out_dir = world_dir / "teacher_data" / teacher.key
  out_dir.mkdir(parents=True, exist_ok=True)
  samples = out_dir / "samples.jsonl"
  filtered = teacher_client.sibling_path(samples, "filtered")
  examples = teacher_client.file_examples(world.math_path(world_dir, world.ID_FAMILY, "train"))
  examples = examples[:settings.teacher_questions]
  sampling = teacher_client.SamplingConfig(
      model=TEACHER_MODEL_NAME, num_samples=settings.teacher_samples, temperature=0.5,
      max_tokens=80, top_logprobs=5, stop=(), prompt_file=str(world_dir / world.TEACHER_PROMPT_FILE))
  sampled = bool(teacher_client.pending(examples, samples, sampling.teacher_info())
                 or not filtered.exists())
  if sampled:
    model = pretrained.load_pretrained(teacher.checkpoint,
                                       vocabulary=str(world_dir / world.TEACHER_VOCAB_FILE))
    limits = completions.Limits(max_prompt_tokens=320, max_tokens=80, max_n=8, max_logprobs=5,
                                max_prompts=64, max_rows=64)
    engine = completions.CompletionEngine(model, TEACHER_MODEL_NAME, limits, seed=0)
    server = server_lib.CompletionServer(
        engine, server_lib.ServeConfig(port=0, batch_window_s=0.05, max_batch_rows=64)).start()
    try:
      run = teacher_client.RunConfig(base_url=server.url, concurrency=16,
                                     progress_period_s=15.0)
      summary = teacher_client.run_teacher(
          examples, samples, sampling, run,
          teacher_client.load_few_shot_prompt(sampling.prompt_file), "EMPTY", seed=0)
    finally:
      server.stop()
    if summary["questions"]["failed"]:
      raise RuntimeError(f"The served teacher failed {summary['questions']['failed']} questions; "
                         f"see {teacher_client.sibling_path(samples, 'failures')}.")
  aligned = out_dir / "aligned.jsonl"
  if not aligned.exists() or aligned.stat().st_mtime < filtered.stat().st_mtime:
    alignment.align_file(str(filtered), str(aligned), str(world_dir / world.STUDENT_VOCAB_FILE),
                         workers=1)
  output = str(world_dir / "prepared")
  sources = {"teacher": str(filtered), "teacher_sha256": prepared_data.file_sha256(str(filtered)),
             "aligned_sha256": prepared_data.file_sha256(str(aligned))}
  try:
    if prepared_data.PreparedSet.open(output).metadata["sources"] == sources:
      return output, not sampled
  except prepared_data.PreparedDataError:
    pass
  if os.path.isdir(output):
    storage.rmtree(output)  # Another teacher's set: the tasks read this fixed path.
  from specialize_jax.align import teacher_features  # pylint: disable=g-import-not-at-top
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  config = prepare.PrepareConfig(
      output_dir=output, vocab_path=str(world_dir / world.STUDENT_VOCAB_FILE),
      rates=dict(prepare.DEFAULT_FORMAT_RATES),
      teacher_k=prepare.DEFAULT_TEACHER_K, max_input_tokens=320,
      num_exemplars=world.NUM_EXEMPLARS, num_chunks=2)
  prepare.prepare(lambda: teacher_data.iter_records(filtered), config,
                  aligned=teacher_features.load_dense_rows(str(aligned), config.teacher_k),
                  exemplar_pool=world.read_math(world_dir, world.ID_FAMILY, "train"),
                  sources=sources)
  return output, False


def _specialize(run: str, seed: int, start: stages.StageResult, world_digest: str,
                output_dir: str, settings: DemoSettings) -> Dict[str, Any]:
  """One specialization run: train, sweep dev, select by OOD dev, evaluate test at the pick."""
  from specialize_jax.evaluation import selection  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import sweep  # pylint: disable=g-import-not-at-top
  trained = stages.run_stage(stages.Stage(
      name=f"{run} (seed {seed})", gin_file=RUN_GIN_FILES[run],
      model_dir=os.path.join(output_dir, run, f"seed_{seed}"),
      bindings=(f"INITIAL_CHECKPOINT_PATH = '{start.checkpoint}'", f"SEED = {seed}",
                *settings.stage_bindings.get(run, ())),
      upstream_keys=(start.key,)), world_digest)
  result = sweep.sweep(trained.model_dir, _eval_config(settings, findings_lib.eval_tasks("dev")))
  rule = selection.make_rule("custom", findings_lib.ood_dev_tasks())
  sweep.write_report_and_best(trained.model_dir, result, rule)
  table = result.accuracy_table()
  ood_pick = selection.select(table, rule)
  id_pick = selection.select(table, selection.make_rule("custom", findings_lib.id_dev_tasks()))
  test = _evaluate_checkpoint(result.checkpoints[ood_pick.step], settings,
                              findings_lib.eval_tasks("test"),
                              output_dir=os.path.join(trained.model_dir, "eval"))
  return {"seed": seed, "model_dir": trained.model_dir, "selected_step": ood_pick.step,
          "ood_best_step": ood_pick.step, "id_best_step": id_pick.step,
          "scores": findings_lib.scores(test), "test": test,
          "dev": {str(step): scores for step, scores in table.items()},
          "train_seconds": round(trained.seconds, 1)}


def run_demo(output_dir: str, world_dir: str, register_tasks: Callable[[str], Any],
             settings: DemoSettings = DemoSettings(), only_data: bool = False) -> int:
  """Runs the chain (module docstring); `register_tasks(world_dir)` registers the world's SeqIO
  tasks (the CLI passes `tasks.world.register_world_tasks`)."""
  progress = _Progress(_Progress.QUICK_SHARES if settings.world_size == world.WorldSize.quick()
                       else _Progress.SHARES)
  world_path = pathlib.Path(world_dir)
  output_dir = os.path.abspath(output_dir)
  _cache_compiled_programs(world_path / COMPILATION_CACHE_SUBDIR)
  progress.stage("world", str(world_path))
  world.write_world(world_path, settings.world_size)
  register_tasks(str(world_path))
  digest = world.manifest_digest(world_path)
  progress.finish("world")
  if only_data:
    print(json.dumps({"world": str(world_path)}))
    return 0
  models_dir = world_path / "models"

  def stage(name, gin_file, bindings=(), upstream=()):
    progress.stage(name, f"training ({gin_file})")
    result = stages.run_stage(stages.Stage(
        name, gin_file, str(models_dir / name),
        (*bindings, *settings.stage_bindings.get(name, ())), tuple(u.key for u in upstream)),
        digest)
    progress.finish(name, result.reused)  # First, so that the line's ETA counts this stage done.
    progress.stage(name, f"{'reused' if result.reused else 'trained'} {result.checkpoint}")
    return result

  raw_start = stage("pretrain", "demo/pretrain.gin")
  generalist = stage("generalist", "demo/generalist.gin",
                     [f"INITIAL_CHECKPOINT_PATH = '{raw_start.checkpoint}'"], [raw_start])
  teacher = stage("teacher", "demo/teacher.gin")
  progress.stage("teacher data", "serve, sample, filter, align, prepare")
  prepared, reused = _teacher_data(teacher, world_path, settings)
  progress.finish("teacher data", reused)
  progress.stage("starts", "evaluating the generalist and the raw start")
  results: Dict[str, List[Dict[str, Any]]] = {}
  for name, start in (("generalist", generalist), ("raw_start", raw_start)):
    # Written beside the start's checkpoint (`eval/`), so a rerun reuses them.
    test = _evaluate_checkpoint(start.checkpoint, settings,
                                findings_lib.eval_tasks("dev") + findings_lib.eval_tasks("test"))
    entry = {"checkpoint": start.checkpoint, "scores": findings_lib.scores(test), "test": test}
    results[name] = [dict(entry, seed=seed) for seed in settings.seeds]
  progress.finish("starts")
  for run in findings_lib.RUNS:
    results[run] = []
    for seed in settings.seeds:
      progress.stage("specialize", f"{run}, seed {seed}")
      start = raw_start if run == "raw" else generalist
      results[run].append(_specialize(run, seed, start, digest, output_dir, settings))
      progress.finish("specialize", fraction=1 / (len(findings_lib.RUNS) * len(settings.seeds)))
  progress.stage("report")
  found = findings_lib.findings(results)
  summary = {"findings": found, "seeds": list(settings.seeds), "runs": results,
             "world": {"directory": str(world_path), "digest": digest,
                       "size": dataclasses.asdict(settings.world_size)},
             "stages": {"pretrain": raw_start.checkpoint, "generalist": generalist.checkpoint,
                        "teacher": teacher.checkpoint, "prepared": prepared},
             "seconds": round(progress.elapsed(), 1)}
  from specialize_jax.demo import demo_report  # pylint: disable=g-import-not-at-top
  files = demo_report.write_report(os.path.join(output_dir, REPORT_SUBDIR), summary)
  storage.write_text(os.path.join(output_dir, RESULTS_FILE), json.dumps(summary, indent=2) + "\n")
  print(findings_lib.markdown(found, settings.seeds))
  print(f"Report: {files['findings.md']}; results: {os.path.join(output_dir, RESULTS_FILE)}")
  progress.finish("report")
  return 0
