"""Evaluating every checkpoint of a run on a task set, once per (checkpoint, task) pair.

Terms:
  run directory (MODEL_DIR): the trainer's output, `MODEL_DIR/checkpoint_<N>/` per saved step.
  committed checkpoint: a step directory the trainer finished writing (orbax's commit marker or
    commit timestamp; step directories of other writers, e.g. `save_orbax`, count as committed).
  start checkpoint: optionally, the checkpoint training started from (e.g. FlanT5), evaluated as
    step 0 (`START_STEP`) so reports can show what specialization gained and lost.
  pair: one (step, task); its eval output is `MODEL_DIR/eval/<task>/metrics_step<N>.json` (the
    evaluator's files, see `evaluator.py`), shared with the trainer's in-loop evaluation and
    `specialize eval`.
  decode dtype: the compute dtype every checkpoint of a sweep decodes in (`sweep(dtype=...)`;
    the command's default is the dtype of the model the run trained, as its in-loop evaluation).
  eval settings: what changes a pair's result (`evaluator.eval_settings`: `max_examples`,
    `feature_lengths`, `max_decode_length`, `decode_method`, `dtype`; not the batch size),
    recorded in each file. A pair is reused when its file records the same settings (a file
    without a dtype counts as `evaluator.LEGACY_DTYPE`, float32). Files without settings (written
    before the evaluator recorded them) are reused in a float32 sweep when their `num_examples` is
    the number this sweep would evaluate; their lengths cannot be checked. Any other file is
    evaluated again and overwritten, so a `--max_examples 20` smoke sweep never stands in for a
    full one, nor a float32 decode for a bfloat16 one.
  timing: `total_seconds` of the sweep, `decode_seconds` (evaluator calls), `compile_seconds`
    (JAX's compile events during the sweep: tracing, lowering, XLA compilation) and their share.

Multi-process: process 0 lists the committed checkpoints and reads the eval outputs; the other
processes follow its plan (`process_zero.py`), never their own listing, and only process 0
writes eval outputs, the report and BEST.

Speed: one `Evaluator` (eval data built once, decoding compiled once per shape) serves every
checkpoint; only the params change. Every task shares `feature_lengths` and the batch size, so a
whole sweep compiles the decoder once.
"""
import dataclasses
import json
import logging
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
from jax import monitoring
from jax.sharding import Mesh
import seqio

from specialize_jax.data import storage
from specialize_jax.evaluation import evaluator as evaluator_lib
from specialize_jax.evaluation import inference
from specialize_jax.evaluation import process_zero
from specialize_jax.evaluation import reference as reference_lib
from specialize_jax.evaluation import report as report_lib
from specialize_jax.evaluation import selection as selection_lib
from specialize_jax.checkpoints import directories
from specialize_jax.training import partitioning
from specialize_jax.errors import ConfigError

START_STEP = 0
MATH_SPLITS = (('gsm8k', 'dev'), ('gsm8k', 'test'), ('multiarith', 'dev'), ('multiarith', 'test'),
               ('asdiv', 'test'), ('svamp', 'test'))
MATH_FORMATS = ('icl_cot', 'zs_cot')
DEFAULT_MATH_TASKS = tuple(f'{dataset}_{split}_{fmt}' for dataset, split in MATH_SPLITS
                           for fmt in MATH_FORMATS)
# A cheap, varied BBH subset (algorithmic, language, multi-choice); `--bbh_tasks` changes it and
# the 27 task names are `readers.BBH_TASKS` / `specialize tasks --filter bbh_`.
DEFAULT_BBH_SUBTASKS = ('boolean_expressions', 'date_understanding',
                        'logical_deduction_three_objects', 'tracking_shuffled_objects_three_objects')
BBH_FORMATS = ('cot', 'ao')
_COMPILE_EVENT_PREFIX = '/jax/core/compile/'


def bbh_task_names(subtasks: Sequence[str], formats: Sequence[str] = BBH_FORMATS) -> List[str]:
  return [f'bbh_{subtask}_{fmt}' for subtask in subtasks for fmt in formats]


@dataclasses.dataclass
class SweepResult:
  """What a sweep found and did.

  Attributes:
    checkpoints: {step: checkpoint path}, the start checkpoint (if any) at START_STEP.
    metrics: {step: {task: metrics}} read back or computed.
    decoded: the (step, task) pairs decoded by this call.
    reused: how many pairs were read from their files.
    timing: total_seconds, decode_seconds, load_seconds, compile_seconds, compile_share.
    start_step: START_STEP when a start checkpoint was included, else None.
    dtype: the decode dtype of every pair in `metrics`.
  """
  checkpoints: Dict[int, str]
  metrics: Dict[int, Dict[str, Dict[str, float]]]
  decoded: List[Tuple[int, str]]
  reused: int
  timing: Dict[str, float]
  start_step: Optional[int] = None
  dtype: str = evaluator_lib.LEGACY_DTYPE

  def accuracy_table(self) -> Dict[int, Dict[str, Optional[float]]]:
    """{step: {task: accuracy %}} (the selection and report input)."""
    return {step: {task: m.get('accuracy') for task, m in tasks.items()}
            for step, tasks in self.metrics.items()}


class _Progress:
  """'pairs done/total, ETA' lines; the ETA extrapolates the pairs decoded after the first (the
  first includes compilation)."""

  def __init__(self, total: int, write: Callable[[str], None]):
    self.total, self.write, self.done = total, write, 0
    self.seconds: List[float] = []

  def update(self, step: int, task: str, seconds: float, accuracy: Optional[float]) -> None:
    self.done += 1
    self.seconds.append(seconds)
    steady = self.seconds[1:] or self.seconds
    eta = sum(steady) / len(steady) * (self.total - self.done)
    shown = '-' if accuracy is None else f'{accuracy:.1f}%'
    self.write(f'sweep: {self.done}/{self.total} pairs decoded; step {step} {task} = {shown} '
               f'({seconds:.1f} s); ETA {_duration(eta)}')


def _duration(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class _ExampleCounts:
  """Examples a task would evaluate under `max_examples`, counted on demand and cached."""

  def __init__(self, max_examples: Optional[int]):
    self.max_examples = max_examples
    self._counts: Dict[str, int] = {}

  def __call__(self, task_name: str) -> int:
    if task_name not in self._counts:
      task = seqio.get_mixture_or_task(task_name)
      self._counts[task_name] = len(inference.task_examples(task, max_examples=self.max_examples))
    return self._counts[task_name]


def _reusable(path: str, config: evaluator_lib.EvalConfig, counts: _ExampleCounts, task: str,
              dtype: str) -> Optional[Dict[str, float]]:
  """The metrics of a reusable eval output file, or None (absent or other settings)."""
  record = evaluator_lib.read_metrics_record(path)
  if record is None:
    return None
  if evaluator_lib.SETTINGS_KEY in record:
    return evaluator_lib.metrics_if_settings_match(record, config, path, dtype)
  if dtype != evaluator_lib.LEGACY_DTYPE:
    logging.info('%s records no settings (decoded in %s): evaluating again in %s.', path,
                 evaluator_lib.LEGACY_DTYPE, dtype)
    return None
  num = record.get('num_examples')
  expected_max = counts.max_examples
  # A file of max_examples examples is right whatever the task's size; otherwise count.
  if not (expected_max is not None and num == expected_max) and num != counts(task):
    logging.info('%s holds %s examples, not the %d this sweep evaluates: evaluating again.',
                 path, num, counts(task))
    return None
  return evaluator_lib.record_metrics(record)


def _sweep_plan(model_dir: str, config: evaluator_lib.EvalConfig,
                start_checkpoint: Optional[str], task_names: Sequence[str],
                output_dir: str, dtype: str) -> Dict[str, Any]:
  """What `sweep` decodes, read off storage (process 0's decision, JSON-ready): {'steps':
  [[step, path as reported, path to load]], 'metrics': {step: {task: metrics}} of the reusable
  pairs, 'pending': {step: [task]}} (steps as strings: JSON keys)."""
  steps = [(step, path, path)
           for step, path in evaluator_lib.committed_checkpoint_steps(model_dir)]
  if start_checkpoint is not None:
    if any(step == START_STEP for step, _, _ in steps):
      raise ConfigError(f'{model_dir} has a checkpoint at step {START_STEP}, where the start '
                        f'checkpoint {start_checkpoint} would be evaluated; drop --include_start '
                        '(that checkpoint is the start).')
    # The concrete checkpoint (a run directory resolves to its latest step), so every process
    # loads the one process 0 resolved; fails early, naming what it expected.
    _, resolved = directories.resolve_checkpoint(start_checkpoint)
    steps = [(START_STEP, storage.absolute(start_checkpoint), str(resolved))] + steps
  if not steps:
    raise ConfigError(f'No committed checkpoint_<N> directories in {model_dir}; point at a run '
                      'directory (MODEL_DIR) the trainer has saved to.')
  counts = _ExampleCounts(config.max_examples)
  metrics: Dict[str, Dict[str, Dict[str, float]]] = {}
  pending: Dict[str, List[str]] = {}
  for step, _, _ in steps:
    metrics[str(step)] = {}
    for name in task_names:
      found = _reusable(evaluator_lib.metrics_path(output_dir, name, step), config, counts, name,
                        dtype)
      if found is None:
        pending.setdefault(str(step), []).append(name)
      else:
        metrics[str(step)][name] = found
  return {'steps': steps, 'metrics': metrics, 'pending': pending}


def sweep(model_dir: str, config: evaluator_lib.EvalConfig, *,
          start_checkpoint: Optional[str] = None, model_config: Any = None,
          mesh: Optional[Mesh] = None,
          logical_axis_rules: partitioning.LogicalAxisRules = (
              partitioning.STANDARD_LOGICAL_AXIS_RULES),
          progress: Callable[[str], None] = _stderr,
          dtype: Optional[str] = None) -> SweepResult:
  """Evaluates every committed checkpoint of `model_dir` (and `start_checkpoint` as step 0) on
  `config.task_names`, decoding only the pairs without a reusable eval output.

  Process 0 lists the committed checkpoints and reads the eval outputs; every process follows
  that plan (`process_zero`), so all of them load the same checkpoints and decode the same pairs
  in the same order, and a step committed after the listing waits for the next sweep.

  Args:
    model_dir: the run directory.
    config: tasks, shapes and decoding (shared by every checkpoint).
    start_checkpoint: a checkpoint (any format `load_checkpoint` reads) evaluated as START_STEP.
    model_config: architecture overriding what each checkpoint implies (T5Config, preset, dict).
    mesh: params are read straight into their shardings on it under `logical_axis_rules`, each
      process reading only its devices' slices, and decode batches split over its 'data' axis
      (default: this process's first device).
    logical_axis_rules: the logical axis rules (the trainer's) of the params' shardings.
    progress: receives one line per decoded pair (default: stderr).
    dtype: the decode dtype of every checkpoint (`evaluator.decode_dtype`: None means
      `model_config`'s, else float32); pairs recorded in another dtype are decoded again.
  """
  start_time = time.perf_counter()
  dtype = evaluator_lib.decode_dtype(dtype, model_config)
  mesh = mesh if mesh is not None else inference.local_mesh()
  inference.check_batch_size(config.batch_size, mesh, 'EvalConfig.batch_size', '--batch_size')
  model_dir = storage.absolute(model_dir)
  task_names = evaluator_lib.expand_task_names(config.task_names)
  if not task_names:
    raise ConfigError('No eval tasks; give --tasks and/or --bbh_tasks.')
  output_dir = storage.join(model_dir, evaluator_lib.EVAL_SUBDIR)
  plan = process_zero.decided_by_process_zero(
      lambda: _sweep_plan(model_dir, config, start_checkpoint, task_names, output_dir, dtype),
      'the checkpoints and tasks to sweep')
  steps = [(step, load_path) for step, _, load_path in plan['steps']]
  metrics = {step: dict(plan['metrics'][str(step)]) for step, _ in steps}
  pending = {int(step): names for step, names in plan['pending'].items()}
  num_pending = sum(len(v) for v in pending.values())
  reused = len(steps) * len(task_names) - num_pending
  progress(f'sweep: {len(steps)} checkpoints x {len(task_names)} tasks; {reused} pairs done '
           f'before, {num_pending} to decode.')

  compile_seconds = [0.0]

  def on_duration(event: str, duration: float, **kwargs) -> None:  # pylint: disable=unused-argument
    if event.startswith(_COMPILE_EVENT_PREFIX):
      compile_seconds[0] += duration

  decoded: List[Tuple[int, str]] = []
  decode_seconds = load_seconds = 0.0
  tracker = _Progress(num_pending, progress)
  evaluator: Optional[evaluator_lib.Evaluator] = None
  monitoring.register_event_duration_secs_listener(on_duration)
  try:
    for step, path in steps:
      if step not in pending:
        continue
      load_start = time.perf_counter()
      # Once per checkpoint, not once per task; into the shardings the trainer's params have.
      checkpoint_config, params = inference.restore_params(path, mesh, logical_axis_rules,
                                                           model_config, dtype)
      load_seconds += time.perf_counter() - load_start
      if evaluator is None or evaluator.model.config != checkpoint_config:
        # Eval data and the compiled decoder are built once per process (`evaluator._task_data`,
        # `inference.shared_decoder`): once for this sweep and for any later one.
        evaluator = evaluator_lib.Evaluator(inference.checkpoint_model(checkpoint_config), config,
                                            mesh=mesh, logical_axis_rules=logical_axis_rules)
      for name in pending[step]:
        pair_start = time.perf_counter()
        result = evaluator.evaluate(params, step, output_dir, task_names=[name])[name]
        seconds = time.perf_counter() - pair_start
        decode_seconds += seconds
        metrics[step][name] = result
        decoded.append((step, name))
        tracker.update(step, name, seconds, result.get('accuracy'))
      del params
  finally:
    monitoring.unregister_event_duration_listener(on_duration)
  total = time.perf_counter() - start_time
  timing = {'total_seconds': total, 'decode_seconds': decode_seconds,
            'load_seconds': load_seconds, 'compile_seconds': compile_seconds[0],
            'compile_share': compile_seconds[0] / total if total > 0 else 0.0}
  progress(f'sweep: done in {total:.1f} s ({len(decoded)} pairs decoded, {reused} reused; '
           f'compilation {compile_seconds[0]:.1f} s = {100 * timing["compile_share"]:.0f}%).')
  return SweepResult({step: path for step, path, _ in plan['steps']}, metrics, decoded, reused,
                     timing, START_STEP if start_checkpoint is not None else None, dtype)


_METRICS_FILE_RE = re.compile(r'metrics_step(\d+)\.json')


def read_accuracy_table(model_dir: str, dtype: Optional[str] = None
                        ) -> Dict[int, Dict[str, Optional[float]]]:
  """{step: {task: accuracy %}} from the eval outputs under `MODEL_DIR/eval/` (no decoding):
  what the trainer's in-loop evaluation, `specialize eval` and sweeps wrote.

  Results of one decode dtype only (`evaluator.record_dtype`): `dtype`'s, the others left out and
  counted in a warning; with None, outputs in more than one dtype raise.
  """
  eval_dir = storage.join(model_dir, evaluator_lib.EVAL_SUBDIR)
  table: Dict[int, Dict[str, Optional[float]]] = {}
  if not storage.isdir(eval_dir):
    return table
  other_dtypes: Dict[str, int] = {}
  found_dtypes = set()
  for task in storage.listdir(eval_dir):
    task_dir = storage.join(eval_dir, task)
    if not storage.isdir(task_dir):
      continue
    for name in storage.listdir(task_dir):
      match = _METRICS_FILE_RE.fullmatch(name)
      if not match:
        continue
      record = json.loads(storage.read_text(storage.join(task_dir, name)))
      record_dtype = evaluator_lib.record_dtype(record)
      found_dtypes.add(record_dtype)
      if dtype is not None and record_dtype != dtype:
        other_dtypes[record_dtype] = other_dtypes.get(record_dtype, 0) + 1
        continue
      table.setdefault(int(match.group(1)), {})[task] = record['metrics'].get('accuracy')
  if dtype is None and len(found_dtypes) > 1:
    raise ConfigError(f'{eval_dir} holds results decoded in {sorted(found_dtypes)}; they are not '
                      'comparable: choose one (--dtype), or run `specialize sweep` to decode the '
                      'checkpoints again in one dtype.')
  if other_dtypes:
    logging.warning('%s: left out %s results not decoded in %s.', eval_dir,
                    ', '.join(f'{n} {d}' for d, n in sorted(other_dtypes.items())), dtype)
  return dict(sorted(table.items()))


def write_report_and_best(model_dir: str, result: SweepResult,
                          rule: selection_lib.SelectionRule,
                          reference: Optional[reference_lib.Reference] = None
                          ) -> Optional[Dict[str, Any]]:
  """Writes the sweep's report under `model_dir` (with `reference` beside the selected step when
  given) and the `BEST` file of the step `rule` selects (removing a stale one when it selects
  none); returns a summary of what was written.

  The run's report and `BEST` are process 0's to write: on the other processes this writes
  nothing and returns None.
  """
  if jax.process_index() != 0:
    return None
  model_dir = storage.absolute(model_dir)
  table = result.accuracy_table()
  reference_markdown = None
  step, _ = selection_lib.select_or_last(table, rule, result.start_step)
  if reference is not None and step is not None:
    reference_markdown = reference_lib.format_markdown(
        reference_lib.compare(table, step, reference, f'this run (step {step})'))
  written = report_lib.write_run_report(
      model_dir, table, rule=rule, checkpoint_paths=result.checkpoints,
      start_step=result.start_step, timing=result.timing, reference_markdown=reference_markdown)
  chosen = written.chosen
  if chosen.step is not None:
    selection_lib.write_best(model_dir, chosen, result.checkpoints[chosen.step])
  else:
    selection_lib.remove_stale_best(model_dir)
  return {'report': storage.join(model_dir, report_lib.REPORT_SUBDIR),
          'selected_step': chosen.step, 'rule': rule.name, 'score': chosen.score,
          'in_distribution_pick': written.alternative.step,
          'decoded_pairs': len(result.decoded), 'reused_pairs': result.reused,
          'dtype': result.dtype, 'timing': {k: round(v, 3) for k, v in result.timing.items()}}
