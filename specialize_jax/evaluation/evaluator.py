"""Decoding SeqIO eval tasks and scoring them, in the training loop and over saved checkpoints.

Terms:
  eval task: a registered SeqIO task with prediction metrics; its examples are its 'test' split
    (our eval tasks have that one split). A mixture name stands for all of its tasks.
  eval data: per task, built once: the first `max_examples` examples through
    `seqio.EncDecFeatureConverter(pack=False)` at fixed `feature_lengths`, in fixed-size batches
    (see `inference.py`), so decoding compiles once per shape and is reused across evaluations and
    checkpoints. An input longer than `feature_lengths['inputs']` is an error, not truncated.
    Built once per process for each registered task object and shapes (`_task_data`): a job that
    evaluates the same tasks again (`specialize demo`'s sweeps and starts) reads them once. A
    task registered again is a new object and is built again.
  prediction: the decoded text (up to EOS) after the task's `postprocess_fn(text, example=...,
    is_target=False)`; target: `postprocess_fn(None, example=..., is_target=True)` (our tasks'
    gold answer, see `tasks/common.py`). The metrics are the task's `predict_metric_fns` merged.
  decode dtype: the compute dtype of the model that decodes (`T5Config.dtype`). The in-loop
    evaluation decodes in the trained model's; a job restoring a checkpoint resolves one for all
    its checkpoints (`decode_dtype`), so the same checkpoint scores the same in both.
  eval output: `output_dir/{task}/metrics_step{step}.json` (`{"task", "step", "num_examples",
    "metrics", "timing", "eval_settings"}`, the last from `eval_settings`) and
    `output_dir/{task}/predictions_step{step}.jsonl` (every example: `index`, `input`, `target`,
    `prediction`, and `correct` when a metric reports `accuracy`), each
    written atomically by process 0 alone. The JSONL is the file `specialize score` reads, so
    re-scoring it gives the metrics file's values (for tasks whose postprocessor keeps the text).
  committed step: a step directory whose save finished (`directories.is_committed_step_dir`);
    `evaluate_checkpoints` reads only those, and on several processes follows process 0's
    listing (`process_zero.py`).
  timing: returned with the metrics as `timing/seconds` (decode, postprocess, metrics) and
    `timing/examples_per_second`.

Sharding: params may be sharded (the trainer's state as it is, or a checkpoint read straight into
the same shardings by `inference.restore_params`) or host arrays (replicated onto the mesh once
per call); batches are split over the mesh's 'data' axis and the decodes gathered to every process
(`inference.Decoder`). Decoding is traced under the params' logical-axis rules when the caller
gives them (training's in-loop eval, `specialize eval`, `sweep`, `infer`), so the activation
constraints apply as in training; under FSDP that gathers the weights once per decode instead of
reducing activations at every token.
"""
import dataclasses
import difflib
import json
import logging
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import Mesh
import numpy as np
import seqio

from specialize_jax.errors import ConfigError
from specialize_jax.data import feature_converters
from specialize_jax.data import storage
from specialize_jax.evaluation import inference
from specialize_jax.evaluation import process_zero
from specialize_jax.checkpoints import directories
from specialize_jax.checkpoints import param_tree
from specialize_jax.model import config as config_lib
from specialize_jax.model import models
from specialize_jax.training import partitioning

Metrics = Dict[str, float]
FeatureLengths = Union[Tuple[Tuple[str, int], ...], Mapping[str, int]]

METRICS_FILE = 'metrics_step{step}.json'
SETTINGS_KEY = 'eval_settings'
PREDICTIONS_FILE = 'predictions_step{step}.jsonl'
EVAL_SUBDIR = 'eval'
# Step directories of a run: T5X's `checkpoint_<N>` and orbax CheckpointManager's `<N>` (orbax's
# in-progress `<N>.orbax-checkpoint-tmp-*` directories do not match).
_STEP_DIR_RE = re.compile(r'(?:checkpoint_)?(\d+)')
_ACCURACY = 'accuracy'
# The dtype of a metrics file whose eval settings have none (written before the dtype was
# recorded): `specialize eval` and `sweep` then always decoded in float32, the in-loop evaluation
# in the model's dtype. The jobs default to the dtype of the model the run trained (`runs.py`,
# the `sweep` command), so a run trained in bfloat16 decodes such files again; only forcing float32 on it
# (DECODE_DTYPE, `sweep --dtype`) would take its old in-loop (bfloat16) files for float32 ones.
LEGACY_DTYPE = 'float32'


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and at which fixed shapes.

  Attributes:
    task_names: registered eval tasks or mixtures (mixtures expand to their tasks).
    feature_lengths: {'inputs': N, 'targets': M} (a dict or a tuple of pairs): the fixed padded
      lengths; inputs longer than N are refused.
    batch_size: rows per decode batch (the last batch is padded).
    max_examples: evaluate only the first examples of each task (None: all).
    decode_method: 'greedy', 'sample' or 'beam' (one decode per input).
    max_decode_length: tokens generated at most.
    num_prediction_samples_to_write: predictions logged per task (the JSONL holds all of them).
  """
  task_names: Tuple[str, ...] = ()
  feature_lengths: FeatureLengths = (('inputs', 1024), ('targets', 256))
  batch_size: int = 32
  max_examples: Optional[int] = None
  decode_method: str = 'greedy'
  max_decode_length: int = 256
  num_prediction_samples_to_write: int = 10

  def __post_init__(self):
    # gin hands over lists and dicts; tuples keep the config hashable.
    names = (self.task_names,) if isinstance(self.task_names, str) else tuple(self.task_names)
    object.__setattr__(self, 'task_names', names)
    lengths = self.feature_lengths
    lengths = lengths.items() if isinstance(lengths, Mapping) else lengths
    object.__setattr__(self, 'feature_lengths', tuple(sorted((str(k), int(v)) for k, v in lengths)))
    if set(self.lengths) != {'inputs', 'targets'}:
      raise ConfigError(f'EvalConfig.feature_lengths={self.lengths} must give exactly "inputs" and '
                        '"targets" (e.g. --gin.EVAL_FEATURE_LENGTHS="{\'inputs\': 1024, '
                        '\'targets\': 256}").')
    for name, length in self.feature_lengths:
      if length < 1:
        raise ConfigError(f'EvalConfig.feature_lengths[{name!r}]={length} must be >= 1.')
    if self.batch_size < 1:
      raise ConfigError(f'EvalConfig.batch_size={self.batch_size} must be >= 1 '
                        '(--gin.EVAL_BATCH_SIZE).')
    if self.max_examples is not None and self.max_examples < 1:
      raise ConfigError(f'EvalConfig.max_examples={self.max_examples} must be >= 1, or None for '
                        'every example (--gin.EVAL_MAX_EXAMPLES).')
    if self.decode_method not in models.DECODE_METHODS:
      raise ConfigError(f'EvalConfig.decode_method={self.decode_method!r}; use one of '
                        f'{models.DECODE_METHODS}.')
    if self.max_decode_length < 1:
      raise ConfigError(f'EvalConfig.max_decode_length={self.max_decode_length} must be >= 1.')

  @property
  def lengths(self) -> Dict[str, int]:
    """`feature_lengths` as a dict."""
    return dict(self.feature_lengths)


def eval_settings(config: EvalConfig, dtype: str) -> Dict[str, Any]:
  """The settings that change an evaluation's result (JSON-ready; not the batch size), with the
  decode dtype."""
  return {'max_examples': config.max_examples, 'feature_lengths': config.lengths,
          'max_decode_length': config.max_decode_length, 'decode_method': config.decode_method,
          'dtype': dtype}


def decode_dtype(dtype: Optional[str] = None, model_config: Any = None) -> str:
  """The compute dtype a job decodes its checkpoints in: `dtype`, else `model_config`'s (a
  T5Config, preset name or dict), else T5Config's default (float32)."""
  if dtype is None:
    config = param_tree.as_config(model_config)
    dtype = config.dtype if config is not None else config_lib.T5Config.dtype  # its default
  if dtype not in config_lib.DTYPES:
    raise ConfigError(f'Decode dtype {dtype!r} is not supported; use one of {config_lib.DTYPES} '
                      '(--gin.DECODE_DTYPE, sweep: --dtype).')
  return dtype


def expand_task_names(names: Sequence[str]) -> List[str]:
  """Task names in order, mixtures replaced by their tasks, duplicates dropped; unknown names raise
  listing the closest registered ones."""
  registered = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
  result: List[str] = []
  for name in names:
    if name in seqio.MixtureRegistry.names():
      members = [t.name for t in seqio.get_mixture_or_task(name).tasks]
    elif name in seqio.TaskRegistry.names():
      members = [name]
    else:
      close = difflib.get_close_matches(name, registered, n=5, cutoff=0.5)
      raise ConfigError(f'Unknown eval task or mixture {name!r} in EvalConfig.task_names '
                        f'(--gin.EVAL_TASKS); closest registered names: {close}. '
                        '`specialize tasks` lists them.')
    result.extend(m for m in members if m not in result)
  return result


def metrics_path(output_dir: str, task_name: str, step: int) -> str:
  return storage.join(output_dir, task_name, METRICS_FILE.format(step=step))


def predictions_path(output_dir: str, task_name: str, step: int) -> str:
  return storage.join(output_dir, task_name, PREDICTIONS_FILE.format(step=step))


@dataclasses.dataclass(frozen=True)
class _TaskData:
  """One task's eval data, built once."""
  task: seqio.Task
  vocabulary: seqio.Vocabulary
  examples: List[Dict[str, Any]]  # the preprocessed examples (for postprocess_fn and the inputs)
  features: Dict[str, np.ndarray]  # converted features, each [num_examples, length]
  targets: List[Any]  # postprocessed golds


def _build_task_data(task: seqio.Task, config: EvalConfig,
                     vocabulary: seqio.Vocabulary) -> _TaskData:
  lengths = config.lengths
  examples = inference.task_examples(task, inference.EVAL_SPLIT, config.max_examples)
  for index, example in enumerate(examples):
    if len(example['inputs']) > lengths['inputs']:
      raise ConfigError(
          f'Task {task.name} example {index} has {len(example["inputs"])} input tokens, more than '
          f'EvalConfig.feature_lengths["inputs"]={lengths["inputs"]}; raise it (e.g. '
          f'--gin.EVAL_FEATURE_LENGTHS="{{\'inputs\': {_round_up(len(example["inputs"]), 128)}, '
          f'\'targets\': {lengths["targets"]}}}") rather than cut the prompt.')
  # Only the gold text is scored, so targets longer than their length are cut (with EOS kept) to
  # fit the converter; the inputs were checked above.
  rows = [{'inputs': e['inputs'], 'targets': _fit(e['targets'], lengths['targets'])}
          for e in examples]
  dataset = seqio.EncDecFeatureConverter(pack=False)(
      _as_dataset(rows), {'inputs': lengths['inputs'], 'targets': lengths['targets']})
  converted = list(dataset.as_numpy_iterator())
  features = {name: np.stack([c[name] for c in converted]).astype(np.int32)
              for name in converted[0]}  # each [num_examples, length]
  targets = [inference.gold_target(task, e) for e in examples]
  return _TaskData(task, vocabulary, examples, features, targets)


# (task name, id(task), lengths, max_examples) -> (task, its eval data); the task is held so that
# its id names it for as long as the entry lives. Oldest entries go first past the bound.
_TASK_DATA: Dict[Tuple[Any, ...], Tuple[seqio.Task, _TaskData]] = {}
_MAX_TASK_DATA = 256


def _task_data(task: seqio.Task, config: EvalConfig, vocabulary: seqio.Vocabulary) -> _TaskData:
  """`_build_task_data`, once per registered task object and shapes in this process."""
  key = (task.name, id(task), tuple(sorted(config.lengths.items())), config.max_examples)
  cached = _TASK_DATA.get(key)
  if cached is not None and cached[0] is task:
    return dataclasses.replace(cached[1], vocabulary=vocabulary)
  start = time.perf_counter()
  data = _build_task_data(task, config, vocabulary)
  logging.info('Eval task %s: %d examples built in %.1f s.', task.name, len(data.examples),
               time.perf_counter() - start)
  while len(_TASK_DATA) >= _MAX_TASK_DATA:
    del _TASK_DATA[next(iter(_TASK_DATA))]
  _TASK_DATA[key] = (task, data)
  return data


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _fit(tokens: np.ndarray, length: int) -> np.ndarray:
  if len(tokens) <= length:
    return tokens
  return np.concatenate([tokens[:length - 1], tokens[-1:]])


def _as_dataset(rows: List[Dict[str, np.ndarray]]):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.data.Dataset.from_generator(
      lambda: iter(rows),
      output_signature={name: tf.TensorSpec([None], tf.int32) for name in ('inputs', 'targets')})


def _merged_metrics(task: seqio.Task, targets: Sequence[Any],
                    predictions: Sequence[Any]) -> Metrics:
  results: Metrics = {}
  for fn in task.predict_metric_fns:
    for name, value in fn(list(targets), list(predictions)).items():
      results[name] = float(getattr(value, 'value', value))  # seqio.metrics.Scalar or a number
  return results


def _is_correct(task: seqio.Task, target: Any, prediction: Any) -> Optional[bool]:
  """Whether one example scores 100 on the first metric that reports `accuracy` (None if none)."""
  for fn in task.predict_metric_fns:
    result = fn([target], [prediction])
    if _ACCURACY in result:
      return float(result[_ACCURACY]) == 100.0
  return None


class Evaluator:
  """Decodes and scores `config.task_names`; eval data and compiled decoding are reused.

  Args:
    model: the model whose `predict_batch` decodes.
    config: tasks, lengths, batch size and decoding.
    vocabulary_for_task: `task -> vocabulary` that decodes predictions (default: the task's
      targets vocabulary).
    mesh: with a mesh, batches are split over its 'data' axis (batch_size must divide it).
    logical_axis_rules: the rules the params are sharded under; decoding is traced under them
      (`inference.Decoder`). None: no activation constraints.
  """

  def __init__(self, model: models.EncoderDecoderModel, config: EvalConfig,
               vocabulary_for_task: Optional[Callable[[seqio.Task], seqio.Vocabulary]] = None,
               mesh: Optional[Mesh] = None,
               logical_axis_rules: Optional[partitioning.LogicalAxisRules] = None):
    if not config.task_names:
      raise ConfigError('EvalConfig.task_names is empty; name the eval tasks (e.g. '
                        '--gin.EVAL_TASKS="(\'gsm8k_dev_zs_cot\',)").')
    inference.check_batch_size(config.batch_size, mesh, 'EvalConfig.batch_size',
                               '--gin.EVAL_BATCH_SIZE')
    self.model = model
    self.config = config
    self.mesh = mesh
    # One decoder for every task, evaluation and evaluator of this model object in the process
    # (`inference.shared_decoder`): decoding compiles once per params sharding.
    self._decoder = inference.shared_decoder(
        model, mesh, config.max_decode_length, setting='EvalConfig.batch_size',
        flag='--gin.EVAL_BATCH_SIZE', logical_axis_rules=logical_axis_rules,
        decode_method=config.decode_method)
    self._data: Dict[str, _TaskData] = {}
    for name in expand_task_names(config.task_names):
      task = seqio.get_mixture_or_task(name)
      feature_converters.check_vocabulary_fits(task, model.config.vocab_size)
      if not task.predict_metric_fns:
        raise ConfigError(f'Task {name} has no prediction metrics, so it cannot be an eval task; '
                          'remove it from EvalConfig.task_names (--gin.EVAL_TASKS).')
      vocabulary = (vocabulary_for_task(task) if vocabulary_for_task is not None
                    else task.output_features['targets'].vocabulary)
      self._data[name] = _task_data(task, config, vocabulary)

  @property
  def task_names(self) -> List[str]:
    """The tasks evaluated, mixtures expanded."""
    return list(self._data)

  def num_examples(self, task_name: str) -> int:
    return len(self._data[task_name].examples)

  def evaluate(self, params: Any, step: int, output_dir: Optional[str] = None, *,
               task_names: Optional[Sequence[str]] = None,
               rng: Optional[jax.Array] = None) -> Dict[str, Metrics]:
    """{task: metrics + timing} for `params` at `step`; with `output_dir`, also writes the eval
    output. `task_names` restricts to some of the tasks; `rng` (sampling only) defaults to
    `fold_in(key(0), step)`."""
    names = list(self._data) if task_names is None else list(task_names)
    unknown = [n for n in names if n not in self._data]
    if unknown:
      raise ValueError(f'Tasks {unknown} are not in this evaluator ({self.task_names}).')
    if self.config.decode_method == 'sample' and rng is None:
      rng = jax.random.fold_in(jax.random.key(0), step)
    params = inference.place_params(params, inference.decode_mesh(self.mesh, params))
    results: Dict[str, Metrics] = {}
    for name in names:
      results[name] = self._evaluate_task(self._data[name], params, step, output_dir, rng)
    return results

  def _evaluate_task(self, data: _TaskData, params: Any, step: int, output_dir: Optional[str],
                     rng: Optional[jax.Array]) -> Metrics:
    task, config = data.task, self.config
    start = time.perf_counter()
    outputs = self._decoder(params, data.features, config.batch_size, rng)
    texts = [inference.decode_ids(data.vocabulary, ids) for ids in outputs]
    predictions = [task.postprocess_fn(t, example=e, is_target=False)
                   for t, e in zip(texts, data.examples, strict=True)]
    metrics = _merged_metrics(task, data.targets, predictions)
    seconds = time.perf_counter() - start
    num_examples = len(predictions)
    timing = {'seconds': seconds, 'examples_per_second': num_examples / max(seconds, 1e-9)}
    logging.info('Eval %s step %d: %s (%d examples, %.1f s, %.1f examples/s)', task.name, step,
                 ', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items())), num_examples,
                 seconds, timing['examples_per_second'])
    for index in range(min(config.num_prediction_samples_to_write, num_examples)):
      logging.info('  %s [%d] target=%r prediction=%r', task.name, index, data.targets[index],
                   texts[index])
    if output_dir is not None and jax.process_index() == 0:
      rows = []
      for index, (example, text, target, prediction) in enumerate(
          zip(data.examples, texts, data.targets, predictions, strict=True)):
        row = {'index': index, 'input': inference.text(example['inputs_pretokenized']),
               'target': target, 'prediction': text}
        correct = _is_correct(task, target, prediction)
        if correct is not None:
          row['correct'] = correct
        rows.append(row)
      inference.write_jsonl(predictions_path(output_dir, task.name, step), rows)
      inference.write_json(metrics_path(output_dir, task.name, step), {
          'task': task.name, 'step': int(step), 'num_examples': num_examples,
          'metrics': metrics, 'timing': timing,
          SETTINGS_KEY: eval_settings(config, self.model.config.dtype)})
    return {**metrics, **{f'timing/{k}': v for k, v in timing.items()}}


# ---------------------------------------------------------------------------------------------
# Checkpoint sweeps


def list_checkpoint_steps(directory: str) -> List[Tuple[int, str]]:
  """(step, path) of the step directories (`checkpoint_<N>` or `<N>`) in `directory`, by step,
  committed or not (see `committed_checkpoint_steps`).

  Listed here rather than by the checkpoint layer, which resolves only the latest step.
  """
  if not storage.isdir(directory):
    return []
  steps = []
  for name in storage.listdir(directory):
    match = _STEP_DIR_RE.fullmatch(name)
    if match and storage.isdir(storage.join(directory, name)):
      steps.append((int(match.group(1)), storage.join(directory, name)))
  return sorted(steps)


def committed_checkpoint_steps(directory: str) -> List[Tuple[int, str]]:
  """(step, path) of the committed step directories in `directory`, by step.

  A step directory without orbax's commit (`directories.is_committed_step_dir`: a save in flight
  beside a running trainer, or one cut short) is skipped with a warning, never read half-written;
  a later sweep or `specialize eval` picks it up once committed.
  """
  committed, skipped = [], []
  for step, path in list_checkpoint_steps(directory):
    if directories.is_committed_step_dir(path):
      committed.append((step, path))
    else:
      skipped.append(path)
  if skipped:
    logging.warning('Skipping uncommitted step directories (saves in flight or cut short): %s',
                    skipped)
  return committed


def read_metrics_record(path: str) -> Optional[Dict[str, Any]]:
  """The JSON of an eval metrics file, or None when there is none."""
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))


def record_metrics(record: Mapping[str, Any]) -> Metrics:
  """A metrics file's metrics and timing, as `Evaluator.evaluate` returns them."""
  return {**record['metrics'], **{f'timing/{k}': v for k, v in record.get('timing', {}).items()}}


def recorded_settings(record: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
  """A metrics file's eval settings (None if it has none), a missing dtype read as
  `LEGACY_DTYPE`."""
  settings = record.get(SETTINGS_KEY)
  return None if settings is None else {'dtype': LEGACY_DTYPE, **settings}


def record_dtype(record: Mapping[str, Any]) -> str:
  """The dtype a metrics file was decoded in (`LEGACY_DTYPE` when it records none)."""
  return (recorded_settings(record) or {}).get('dtype', LEGACY_DTYPE)


def metrics_if_settings_match(record: Mapping[str, Any], config: EvalConfig, path: str,
                              dtype: str) -> Optional[Metrics]:
  """A metrics file's metrics if the file (read from `path`) records `config`'s eval settings
  and the decode dtype `dtype`.

  A file with other settings (a `max_examples=20` smoke run, other lengths, decoding or dtype) or
  none (written before settings were recorded) is not reused: it is evaluated again and
  overwritten.
  """
  recorded, wanted = recorded_settings(record), eval_settings(config, dtype)
  if recorded != wanted:
    logging.info('%s was computed with eval settings %s, not %s: evaluating again.', path,
                 recorded, wanted)
    return None
  return record_metrics(record)


def reusable_metrics(path: str, config: EvalConfig, dtype: str) -> Optional[Metrics]:
  """The metrics in `path` if it exists and records `config`'s eval settings and `dtype`, else
  None."""
  record = read_metrics_record(path)
  return None if record is None else metrics_if_settings_match(record, config, path, dtype)


def _evaluation_plan(path: str, config: EvalConfig, output_dir: Optional[str],
                     task_names: Sequence[str], dtype: str) -> Dict[str, Any]:
  """What `evaluate_checkpoints` does, read off storage (process 0's decision, JSON-ready):
  {'output_dir', 'steps': [{'step', 'path' (what to load), 'pending': [task], 'done': {task:
  metrics}}]}."""
  if list_checkpoint_steps(path):
    run_dir = path
    steps = committed_checkpoint_steps(path)
    if not steps:
      raise ConfigError(f'{path} holds no committed checkpoint_<N> directory yet (every one is a '
                        'save in flight or cut short); evaluate again once the trainer has saved.')
  else:
    match = _STEP_DIR_RE.fullmatch(storage.basename(path))
    if match and not directories.is_committed_step_dir(path):
      raise ConfigError(f'{path} is not committed (a save in flight or cut short: no '
                        f'{directories.COMMIT_MARKER}); evaluate it once the trainer has '
                        'finished saving it, or pick a committed step.')
    # The concrete checkpoint directory, so every process reads the one process 0 resolved.
    _, resolved = directories.resolve_checkpoint(path)  # fails early, naming what it expected
    steps = [(int(match.group(1)) if match else 0, str(resolved))]
    run_dir = storage.dirname(path) if match else path
  output_dir = output_dir or storage.join(run_dir, EVAL_SUBDIR)
  plan_steps = []
  for step, step_path in steps:
    entry = {'step': step, 'path': step_path, 'pending': [], 'done': {}}
    for name in task_names:
      found = reusable_metrics(metrics_path(output_dir, name, step), config, dtype)
      if found is None:
        entry['pending'].append(name)
      else:
        entry['done'][name] = found
    plan_steps.append(entry)
  return {'output_dir': output_dir, 'steps': plan_steps}


def evaluate_checkpoints(model_dir_or_checkpoint: str, config: EvalConfig,
                         model_config: Any = None, output_dir: Optional[str] = None,
                         mesh: Optional[Mesh] = None,
                         logical_axis_rules: partitioning.LogicalAxisRules = (
                             partitioning.STANDARD_LOGICAL_AXIS_RULES),
                         dtype: Optional[str] = None) -> Dict[int, Dict[str, Metrics]]:
  """{step: {task: metrics}} for every committed checkpoint of a run directory, or for one
  checkpoint.

  A directory holding step directories (`checkpoint_<N>` or `<N>`) is swept step by step, its
  uncommitted steps skipped (`committed_checkpoint_steps`); any other path is one checkpoint (any
  format `load_checkpoint` reads; an uncommitted step directory is refused), at the step its
  directory name gives (0 if none). Results go to `output_dir`, by default `eval/` beside the step
  directories (or inside a standalone checkpoint's directory). A (step, task) pair whose metrics
  file records the same eval settings and dtype (`reusable_metrics`) is not evaluated again: its
  metrics are read back, and a step whose tasks are all done is not even loaded. Process 0 lists
  the steps and reads the metrics files; every process follows that plan (`process_zero`), so a
  step committed meanwhile is left for the next call. `model_config` (T5Config, preset name or
  dict) replaces the architecture the checkpoint describes or implies. Every checkpoint decodes in
  `decode_dtype(dtype, model_config)` (default float32). Params are read straight into their
  shardings on `mesh` (default: this process's first device) under `logical_axis_rules`, each
  process reading only its devices' slices (`restore_params`).
  """
  path = storage.absolute(model_dir_or_checkpoint)
  task_names = expand_task_names(config.task_names)
  if not task_names:
    raise ConfigError('EvalConfig.task_names is empty; name the eval tasks (--gin.EVAL_TASKS).')
  dtype = decode_dtype(dtype, model_config)
  mesh = mesh if mesh is not None else inference.local_mesh()
  inference.check_batch_size(config.batch_size, mesh, 'EvalConfig.batch_size',
                             '--gin.EVAL_BATCH_SIZE')
  plan = process_zero.decided_by_process_zero(
      lambda: _evaluation_plan(path, config, output_dir, task_names, dtype),
      'the checkpoints and tasks to evaluate')
  output_dir = plan['output_dir']
  results: Dict[int, Dict[str, Metrics]] = {}
  evaluator: Optional[Evaluator] = None
  for entry in plan['steps']:
    step, step_path, pending = entry['step'], entry['path'], entry['pending']
    results[step] = dict(entry['done'])
    if not pending:
      logging.info('Step %d: every task already evaluated in %s; skipped.', step, output_dir)
      continue
    checkpoint_config, params = inference.restore_params(step_path, mesh, logical_axis_rules,
                                                         model_config, dtype)
    if evaluator is None or evaluator.model.config != checkpoint_config:
      evaluator = Evaluator(inference.checkpoint_model(checkpoint_config), config, mesh=mesh,
                            logical_axis_rules=logical_axis_rules)
    logging.info('Evaluating %s (step %d, %s) on %s.', step_path, step, dtype, pending)
    results[step].update(evaluator.evaluate(params, step, output_dir, task_names=pending))
  return results
