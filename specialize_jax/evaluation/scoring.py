"""Scores a file of model outputs against a registered SeqIO eval task (`specialize score`).

Predictions file: JSON lines, each an object with a `prediction` string (the model's decoded text).
Either every line has an integer `index` (position in the task's examples; a subset may be scored),
or none has one and the lines are in task order, one per example. A `--prediction_field` dotted path
(e.g. `175b_verification.solution`) reads the text from another field instead.

The gold answers come from the task itself (its source examples through its postprocessor), so a
score means exactly what the task's metric means in training-time evaluation.
"""
import dataclasses
import json
from typing import Dict, List, Optional

import seqio

from specialize_jax.data import storage
from specialize_jax.errors import ConfigError
from specialize_jax.errors import UserError

METRIC_MODES = ("default", "paper")
PAPER_SUFFIX = "_paper"  # Paper-rule metrics report `accuracy_paper` (see tasks/common.py).


class PredictionsError(UserError, ValueError):
  """A predictions file is malformed; the message names file:line and the fix."""


@dataclasses.dataclass(frozen=True)
class Score:
  task: str
  n: int
  accuracy: float
  unparsable: int
  metric_mode: str
  num_task_examples: int
  metrics: Dict[str, float]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _lookup(obj, dotted: str, where: str):
  value = obj
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      raise PredictionsError(f"{where}: no field {dotted!r} (missing {part!r}). Pass the field that "
                             "holds the text with --prediction_field.")
    value = value[part]
  return value


def read_predictions(path: str, num_examples: int,
                     prediction_field: str = "prediction") -> Dict[int, str]:
  """{example index: prediction text}; raises `PredictionsError` naming file:line on bad input."""
  predictions: Dict[int, str] = {}
  with_index: Optional[bool] = None
  with storage.open_file(path) as f:
    for line_number, line in enumerate(f, start=1):
      where = f"{path}:{line_number}"
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise PredictionsError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from e
      if not isinstance(obj, dict):
        raise PredictionsError(f"{where}: expected a JSON object with a {prediction_field!r} field.")
      text = _lookup(obj, prediction_field, where)
      if not isinstance(text, str):
        raise PredictionsError(f"{where}: field {prediction_field!r} is "
                               f"{type(text).__name__}, expected a string.")
      has_index = "index" in obj
      if with_index is None:
        with_index = has_index
      elif has_index != with_index:
        raise PredictionsError(f"{where}: {'has' if has_index else 'lacks'} an 'index' field "
                               "unlike the first line; give every line an index or none.")
      index = obj["index"] if has_index else len(predictions)
      if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_examples:
        raise PredictionsError(f"{where}: index {index!r} is not an integer in [0, {num_examples})"
                               f" (the task has {num_examples} examples).")
      if index in predictions:
        raise PredictionsError(f"{where}: duplicate prediction for index {index}.")
      predictions[index] = text
  if not with_index and predictions and len(predictions) != num_examples:
    raise PredictionsError(f"{path}: {len(predictions)} predictions without 'index' fields, but the "
                           f"task has {num_examples} examples; give one line per example in task "
                           "order, or add an 'index' to each line to score a subset.")
  if not predictions:
    raise PredictionsError(f"{path}: no predictions.")
  return predictions


def task_targets(task: seqio.Task, split: str = "test") -> List:
  """The task's gold targets in order, as its metric functions receive them (read from the
  source and postprocessed; no tokenization, so thousands of rows take a fraction of a second)."""
  dataset = task.source.get_dataset(split=split, shuffle=False)
  return [task.postprocess_fn(None, example=example, is_target=True)
          for example in dataset.as_numpy_iterator()]


def score(task: seqio.Task, predictions_path: str, metric_mode: str = "default",
          prediction_field: str = "prediction", split: str = "test") -> Score:
  """Runs the task's metric functions on the predictions and reports the `metric_mode` figures
  (`paper` reads the `*_paper` keys of the task's paper-rule metrics)."""
  if metric_mode not in METRIC_MODES:
    raise ConfigError(f"Unknown metric mode {metric_mode!r}; expected one of {METRIC_MODES}.")
  if not task.predict_metric_fns:
    raise ConfigError(f"Task {task.name} has no prediction metrics; score an eval task "
                      "(`specialize tasks` lists them).")
  if not storage.exists(predictions_path):  # Before the task's data is read.
    raise PredictionsError(f"{predictions_path} does not exist; give the predictions JSONL "
                           "(`specialize infer` and `eval` write one per task).")
  targets = task_targets(task, split)
  predictions = read_predictions(predictions_path, len(targets), prediction_field)
  indices = sorted(predictions)
  chosen_targets = [targets[i] for i in indices]
  chosen_predictions = [predictions[i] for i in indices]
  results: Dict[str, float] = {}
  for fn in task.predict_metric_fns:
    results.update(fn(chosen_targets, chosen_predictions))
  suffix = PAPER_SUFFIX if metric_mode == "paper" else ""
  if f"accuracy{suffix}" not in results:
    raise ConfigError(f"Task {task.name} reports no 'accuracy{suffix}' metric "
                      f"(it reports {sorted(results)}).")
  return Score(task=task.name, n=len(indices), accuracy=results[f"accuracy{suffix}"],
               unparsable=int(results.get(f"unparsable{suffix}", 0)), metric_mode=metric_mode,
               num_task_examples=len(targets), metrics=results)
