"""Choosing the checkpoint to keep from a sweep's accuracies, by a declared rule.

Terms:
  accuracy table: {step: {task: accuracy in percent, or None}} (a missing task and None mean the
    same: not evaluated).
  rule: a name and an explicit tuple of eval tasks; a step's score is the mean accuracy over them.
    The default, `ood_dev`, is the paper's lesson: in-distribution (GSM8K) and out-of-distribution
    accuracy peak at different checkpoints, and a model specialized for multi-step reasoning should
    be chosen for how it generalizes, so it averages the OOD **dev** split (MultiArith dev, both
    CoT formats). `id_dev` (GSM8K dev) is the alternative every report compares against. A rule
    never reads a test split: building one that names a test task raises.
  eligible step: a step with an accuracy for every rule task. A step missing any is not scored
    (averaging what is there would compare means over different sets); reports list why.
  ties: equal scores (after rounding to 1e-9) go to the **earliest** step: the cheaper model to
    have trained, and the one least specialized away from the start checkpoint's generic ability.
  BEST: `MODEL_DIR/BEST`, a JSON pointer {step, path, rule, rule_tasks, score, export_command}
    written atomically; export it with `specialize convert MODEL_DIR/checkpoint_<N> --to hf DST`.
"""
import dataclasses
import json
import logging
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from specialize_jax.data import storage
from specialize_jax.evaluation import task_keys
from specialize_jax.errors import ConfigError

Table = Mapping[int, Mapping[str, Optional[float]]]
BEST_FILE = 'BEST'
_TIE_DIGITS = 9


@dataclasses.dataclass(frozen=True)
class SelectionRule:
  """A step's score is the mean accuracy (%) over `task_names`.

  Attributes:
    name: 'ood_dev', 'id_dev' or 'custom'.
    task_names: the eval tasks averaged; never a test split.
  """
  name: str
  task_names: Tuple[str, ...]

  def __post_init__(self):
    names = (self.task_names,) if isinstance(self.task_names, str) else tuple(self.task_names)
    object.__setattr__(self, 'task_names', names)
    if not names:
      raise ConfigError(f'Selection rule {self.name!r} has no tasks; name at least one dev task '
                        '(e.g. --rule_tasks multiarith_dev_icl_cot).')
    tests = [n for n in names if task_keys.describe_task(n).is_test]
    if tests:
      raise ConfigError(f'Selection rule {self.name!r} names test tasks {tests}: choosing a '
                        'checkpoint on a test split would make its test accuracy optimistic. Use '
                        'dev tasks (e.g. multiarith_dev_icl_cot, gsm8k_dev_icl_cot) in '
                        '--rule_tasks.')

  def describe(self) -> str:
    return f'`{self.name}`: mean accuracy over {", ".join(self.task_names)}'


OOD_DEV_RULE = SelectionRule('ood_dev', ('multiarith_dev_icl_cot', 'multiarith_dev_zs_cot'))
ID_DEV_RULE = SelectionRule('id_dev', ('gsm8k_dev_icl_cot', 'gsm8k_dev_zs_cot'))
RULES = {rule.name: rule for rule in (OOD_DEV_RULE, ID_DEV_RULE)}


def make_rule(name: str = OOD_DEV_RULE.name, task_names: Optional[Sequence[str]] = None
              ) -> SelectionRule:
  """A named rule (`ood_dev`, `id_dev`), or 'custom' over `task_names` (which override a name)."""
  if task_names:
    return SelectionRule('custom' if name in RULES else name, tuple(task_names))
  if name not in RULES:
    raise ConfigError(f'Unknown selection rule {name!r}; use one of {sorted(RULES)} or give '
                      '--rule_tasks.')
  return RULES[name]


@dataclasses.dataclass(frozen=True)
class Selection:
  """The outcome of one rule over a table.

  Attributes:
    rule: the rule applied.
    step: the chosen step (None when no step is eligible).
    score: its score.
    scores: {step: score} of the eligible steps.
    missing: {step: rule tasks it lacks} of the ineligible steps.
    tied_steps: the steps sharing the best score (the earliest was chosen).
  """
  rule: SelectionRule
  step: Optional[int]
  score: Optional[float]
  scores: Dict[int, float]
  missing: Dict[int, Tuple[str, ...]]
  tied_steps: Tuple[int, ...] = ()

  def explain(self) -> str:
    """One sentence on the choice (or why there is none)."""
    if self.step is None:
      return (f'No checkpoint has every task of rule {self.rule.describe()}; nothing selected '
              f'(evaluate them with `specialize sweep`, or choose --rule / --rule_tasks).')
    text = f'Step {self.step} by rule {self.rule.describe()} = {self.score:.2f}%.'
    if len(self.tied_steps) > 1:
      text += f' Tied with steps {list(self.tied_steps)}: the earliest is kept.'
    return text


def score_steps(table: Table, rule: SelectionRule,
                steps: Optional[Iterable[int]] = None) -> Tuple[Dict[int, float],
                                                                Dict[int, Tuple[str, ...]]]:
  """({step: mean accuracy over the rule's tasks}, {ineligible step: missing tasks})."""
  scores: Dict[int, float] = {}
  missing: Dict[int, Tuple[str, ...]] = {}
  for step in sorted(table if steps is None else steps):
    row = table.get(step, {})
    lacking = tuple(n for n in rule.task_names if _finite(row.get(n)) is None)
    if lacking:
      missing[step] = lacking
    else:
      scores[step] = sum(float(row[n]) for n in rule.task_names) / len(rule.task_names)
  return scores, missing


def _finite(value: Optional[float]) -> Optional[float]:
  if value is None or not math.isfinite(float(value)):
    return None
  return float(value)


def select(table: Table, rule: SelectionRule = OOD_DEV_RULE,
           steps: Optional[Iterable[int]] = None) -> Selection:
  """The step with the highest score under `rule` among `steps` (default: every step of `table`);
  ties go to the earliest step, steps missing a rule task are not eligible."""
  scores, missing = score_steps(table, rule, steps)
  if not scores:
    return Selection(rule, None, None, scores, missing)
  best = max(round(s, _TIE_DIGITS) for s in scores.values())
  tied = tuple(sorted(s for s, v in scores.items() if round(v, _TIE_DIGITS) == best))
  return Selection(rule, tied[0], scores[tied[0]], scores, missing, tied)


def select_or_last(table: Table, rule: SelectionRule = OOD_DEV_RULE,
                   start_step: Optional[int] = None) -> Tuple[Optional[int], str]:
  """(the step `rule` selects, else the last step; how it was chosen), never `start_step` (a
  start checkpoint is a reference row, not a candidate): the step that stands for a run when runs
  are compared, so a run no rule can score still shows its latest numbers."""
  steps = [s for s in table if s != start_step]
  if not steps:
    return None, 'no checkpoint evaluated'
  chosen = select(table, rule, steps)
  if chosen.step is not None:
    return chosen.step, f'selected ({rule.name})'
  return max(steps), 'last step (no step eligible)'


def pick_difference(table: Table, chosen: Selection, other: Selection,
                    task_names: Sequence[str]) -> Dict[str, Optional[float]]:
  """{task: accuracy at `chosen`'s step minus at `other`'s} (None when either is missing)."""
  result: Dict[str, Optional[float]] = {}
  for name in task_names:
    if chosen.step is None or other.step is None:
      result[name] = None
      continue
    a = _finite(table.get(chosen.step, {}).get(name))
    b = _finite(table.get(other.step, {}).get(name))
    result[name] = None if a is None or b is None else a - b
  return result


def export_command(checkpoint_path: str) -> str:
  return f'specialize convert {checkpoint_path} --to hf EXPORT_DIR'


def write_best(model_dir: str, selection: Selection, checkpoint_path: str) -> str:
  """Writes `MODEL_DIR/BEST` (atomically) for a selection with a step; returns its path."""
  if selection.step is None:
    raise ValueError('write_best needs a selection with a step; ' + selection.explain())
  path = storage.join(model_dir, BEST_FILE)
  record = {'step': selection.step, 'path': checkpoint_path, 'rule': selection.rule.name,
            'rule_tasks': list(selection.rule.task_names), 'score': selection.score,
            'tied_steps': list(selection.tied_steps),
            'export_command': export_command(checkpoint_path)}
  with storage.atomic_write(path) as f:
    json.dump(record, f, indent=2)
    f.write('\n')
  logging.info('Wrote %s: step %d (%s).', path, selection.step, selection.rule.name)
  return path


def remove_stale_best(model_dir: str) -> bool:
  """Deletes `MODEL_DIR/BEST` (when this rule selects nothing it would point at an old choice)."""
  path = storage.join(model_dir, BEST_FILE)
  if storage.exists(path):
    storage.remove(path)
    logging.warning('Removed %s: the current rule selects no checkpoint.', path)
    return True
  return False


def read_best(model_dir: str) -> Optional[Dict]:
  path = storage.join(model_dir, BEST_FILE)
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))


def eligible_steps(selection: Selection) -> List[int]:
  return sorted(selection.scores)
