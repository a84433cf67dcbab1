"""SeqIO metric functions for math word problems and BIG-Bench Hard (BBH).

Each metric is `fn(targets, predictions) -> dict` of floats, as SeqIO calls it; "accuracy" is a
percentage (0-100, SeqIO's convention), counts are plain counts.

Terms:
  target: the gold answer after the task's postprocessing: for math a gold text ("#### 72",
    "9 (apples)", "39.0"), a number, or None when the source's answer is not numeric; for BBH the
    task's target string ("(A)", "True", "] ) }").
  prediction: the model's decoded text.
  unparsable: predictions with no number (math) or no "the answer is" (BBH CoT); scored wrong.
  unparsable_targets: math golds that are not one number (ASDiv "5:45", "Yes"); scored wrong and
    kept in the denominator, as the original did, so accuracies stay comparable over a whole set.
  run-on: a prediction that goes on into a new exemplar after answering ("(A). Q: ..."); math and
    BBH read the answer before it (`answers.before_next_exemplar`).

BBH answers (default metrics), the BBH reference rule: exact match of the answer with the target.
  CoT: the answer is the text after the last "the answer is" (any case) before any new exemplar;
  AO: the whole prediction before any new exemplar (the prompt ends "A:"). The answer is then cut
  at its first line end or sentence end (". "), stripped of whitespace, a leading ":" and one final
  ".", and compared with the target as a string, case included. So every task's answer form must
  appear exactly as its targets write it (checked against the real BBH targets in the tests):
  options "(A)" (not "A", "(A) 12/14/1937", "(A) or (B)"), "True"/"False", "Yes"/"No" and
  sports_understanding's "yes"/"no", "valid"/"invalid", numbers "-11" (not "-11.0"), dyck closings
  "] ) }", word lists "apple banana" (order and spacing as the target), free text "Monsters, Inc".
  An answer naming more than one option, or an option and anything else, is wrong. No BBH target
  holds a period, a line break or "Q:", so the cuts never shorten a right answer.

Where we depart from the original (FranxYao/FlanT5-CoT-Specialization, test_bbh.py): it counted a
BBH answer right when the target was a *substring* of the text after the first "the answer is"
(so target "No" matched "Not", "2" matched "24", "(A)" matched "(B) or (A)"). We compare the answer
exactly; `bbh_cot_accuracy_paper` and `bbh_answer_only_accuracy_paper` keep the original rule
(reported as `accuracy_paper`).
"""
import collections
import numbers
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from specialize_jax.data import answers

BBH_ANSWER_MARKER = "the answer is"
_BBH_ANSWER_MARKER_RE = re.compile(re.escape(BBH_ANSWER_MARKER), re.IGNORECASE)

# FlanT5 has no newline token, so after its answer it may go on on the same line ("(A). Because
# ..."): an answer ends at its first sentence end. No BBH target contains ". ".
_SENTENCE_END_RE = re.compile(r"\.\s")
_PAPER_NUMBER_RE = re.compile(r"(?=[\d.])" + answers.PAPER_NUMBER_PATTERN)


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any], metric: str) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{metric}: {len(targets)} targets but {len(predictions)} predictions; "
                     "they must be aligned one per example (check the task's postprocess_fn).")
  if len(targets) == 0:  # len(), not truthiness: numpy arrays are welcome.
    raise ValueError(f"{metric}: no examples to score; check that the eval split is not empty.")


def _check_text(prediction: Any, index: int, metric: str) -> str:
  if not isinstance(prediction, str):
    raise ValueError(f"{metric}: prediction {index} is {type(prediction).__name__} {prediction!r}, "
                     "expected decoded text (str); decode model outputs before scoring.")
  return prediction


def _gold_value(target: Any, index: int, mode: str) -> Optional[float]:
  """The gold number of a math target, or None when it is not one number."""
  if target is None:
    return None
  if isinstance(target, bool) or not isinstance(target, (str, numbers.Number)):
    raise ValueError(f"Math target {index} is {type(target).__name__} {target!r}; expected the "
                     "gold answer as str, a number, or None for non-numeric golds.")
  if isinstance(target, numbers.Number) and mode == "default":
    value = float(target)
    return None if value != value else value  # NaN marks a missing gold in some readers.
  try:
    # Paper mode reads numbers through their text too: the original wrote golds into a text log
    # and re-read them with its regex (so -3.0 reads 3.0).
    return answers.parse_gold(target if isinstance(target, str) else str(target), mode=mode)
  except ValueError:  # Counted in unparsable_targets by the caller, never silently dropped.
    return None


def _percent(correct: int, total: int) -> float:
  return 100.0 * correct / total


def _math_accuracy(targets: Sequence[Any], predictions: Sequence[str], mode: str,
                   metric: str) -> Dict[str, float]:
  _check_lengths(targets, predictions, metric)
  correct = unparsable = unparsable_targets = 0
  for index, (target, prediction) in enumerate(zip(targets, predictions)):
    pred = answers.extract_answer(_check_text(prediction, index, metric), mode=mode)
    gold = _gold_value(target, index, mode)
    unparsable += pred is None
    if gold is None:
      unparsable_targets += 1
      continue
    correct += answers.answers_match(pred, gold, mode=mode)
  return {"accuracy": _percent(correct, len(targets)), "unparsable": float(unparsable),
          "unparsable_targets": float(unparsable_targets)}


def math_accuracy(targets: Sequence[Any], predictions: Sequence[str]) -> Dict[str, float]:
  """Percent of predictions whose answer equals the gold number (normalizing, default mode)."""
  return _math_accuracy(targets, predictions, "default", "math_accuracy")


def math_accuracy_paper(targets: Sequence[Any], predictions: Sequence[str]) -> Dict[str, float]:
  """As `math_accuracy` with the original regex on prediction and gold, to reproduce its numbers."""
  return _math_accuracy(targets, predictions, "paper", "math_accuracy_paper")


def _majority_vote(samples: Sequence[str], index: int, mode: str) -> Tuple[Optional[float], bool]:
  """The winning answer among `samples` and whether any sample had a number.

  Ties go to the answer that appeared first (Counter keeps insertion order, `max` keeps the first
  maximum: the original's `Counter.most_common(1)` breaks ties the same way).
  """
  if isinstance(samples, str) or len(samples) == 0:
    raise ValueError(f"self_consistency_accuracy: input {index} has {samples!r}; expected a "
                     "non-empty list of sampled texts per input.")
  metric = "self_consistency_accuracy"
  if mode == "paper":
    # The original voted on the matched strings, so "18" and "18.0" split the vote, and a sample
    # without a number voted None. (If None won, its scorer crashed; we score it wrong.)
    votes = collections.Counter(
        (_PAPER_NUMBER_RE.findall(_check_text(s, index, metric)) or [None])[-1] for s in samples)
    winner = max(votes.items(), key=lambda item: item[1])[0]
    return (None if winner is None else float(winner)), any(v is not None for v in votes)
  # Default: samples without a number abstain instead of voting None; equal floats are one answer.
  values = [answers.extract_answer(_check_text(s, index, metric)) for s in samples]
  votes = collections.Counter(v for v in values if v is not None)
  if not votes:
    return None, False
  return max(votes.items(), key=lambda item: item[1])[0], True


def self_consistency_accuracy(targets: Sequence[Any],
                              predictions_per_input: Sequence[Sequence[str]],
                              mode: str = "default") -> Dict[str, float]:
  """Percent of inputs whose majority-vote answer over sampled chains equals the gold.

  `unparsable` counts inputs where no sample held a number.
  """
  answers.check_mode(mode)
  _check_lengths(targets, predictions_per_input, "self_consistency_accuracy")
  correct = unparsable = unparsable_targets = 0
  for index, (target, samples) in enumerate(zip(targets, predictions_per_input)):
    winner, any_parsed = _majority_vote(samples, index, mode)
    unparsable += not any_parsed
    gold = _gold_value(target, index, mode)
    if gold is None:
      unparsable_targets += 1
      continue
    correct += answers.answers_match(winner, gold, mode=mode)
  return {"accuracy": _percent(correct, len(targets)), "unparsable": float(unparsable),
          "unparsable_targets": float(unparsable_targets)}


def _clean_bbh_answer(text: str) -> str:
  """First line and first sentence of `text`, stripped, without its final period."""
  text = text.lstrip(" \t\n:")
  text = text.split("\n", 1)[0]
  text = _SENTENCE_END_RE.split(text, 1)[0].strip()
  return text[:-1].rstrip() if text.endswith(".") else text


def _bbh_answer_matches(answer: Optional[str], target: str) -> bool:
  """Exact match (the BBH reference rule): "(A) or (B)" and "A" do not answer "(A)"."""
  return answer is not None and answer == target.strip()


def _bbh_cot_answer(prediction: str) -> Optional[str]:
  """The text after the last "the answer is" (any case) before any new exemplar, cleaned; None
  without the marker."""
  prediction = answers.before_next_exemplar(prediction)
  lowered = prediction.lower()
  if len(lowered) == len(prediction):
    position = lowered.rfind(BBH_ANSWER_MARKER)
  else:  # A few characters change length when lowered, so indices would shift: use the regex.
    position = -1
    for match in _BBH_ANSWER_MARKER_RE.finditer(prediction):
      position = match.start()
  if position < 0:
    return None
  return _clean_bbh_answer(prediction[position + len(BBH_ANSWER_MARKER):])


def _bbh_accuracy(targets: Sequence[str], predictions: Sequence[str], cot: bool,
                  metric: str) -> Dict[str, float]:
  _check_lengths(targets, predictions, metric)
  correct = unparsable = 0
  for index, (target, prediction) in enumerate(zip(targets, predictions)):
    if not isinstance(target, str):
      raise ValueError(f"{metric}: target {index} is {type(target).__name__} {target!r}; BBH "
                       "targets are the task's target strings such as '(A)' or 'True'.")
    prediction = _check_text(prediction, index, metric)
    answer = (_bbh_cot_answer(prediction) if cot else
              _clean_bbh_answer(answers.before_next_exemplar(prediction)))
    unparsable += answer is None
    correct += _bbh_answer_matches(answer, target)
  result = {"accuracy": _percent(correct, len(targets))}
  if cot:
    result["unparsable"] = float(unparsable)
  return result


def bbh_cot_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  """Percent of CoT predictions whose answer after the last "the answer is" equals the target
  exactly (module docstring: BBH answers)."""
  return _bbh_accuracy(targets, predictions, cot=True, metric="bbh_cot_accuracy")


def bbh_answer_only_accuracy(targets: Sequence[str],
                             predictions: Sequence[str]) -> Dict[str, float]:
  """Percent of answer-only predictions (the prompt ends "A:") whose first line or sentence
  equals the target exactly (module docstring: BBH answers)."""
  return _bbh_accuracy(targets, predictions, cot=False, metric="bbh_answer_only_accuracy")


def _bbh_paper_accuracy(targets: Sequence[str], predictions: Sequence[str], cot: bool,
                        metric: str) -> Dict[str, float]:
  _check_lengths(targets, predictions, metric)
  correct = 0
  for index, (target, prediction) in enumerate(zip(targets, predictions)):
    prediction = _check_text(prediction, index, metric)
    if cot:
      # Original: ans.split('the answer is')[1], case-sensitive: the text between the first
      # and the second marker.
      if BBH_ANSWER_MARKER not in prediction:
        continue
      prediction = prediction.split(BBH_ANSWER_MARKER)[1]
    correct += target in prediction
  return {"accuracy": _percent(correct, len(targets))}


def bbh_cot_accuracy_paper(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  """The original's lenient CoT rule: target is a substring of the text after the first marker."""
  return _bbh_paper_accuracy(targets, predictions, cot=True, metric="bbh_cot_accuracy_paper")


def bbh_answer_only_accuracy_paper(targets: Sequence[str],
                                   predictions: Sequence[str]) -> Dict[str, float]:
  """The original's answer-only rule: target is a substring of the whole prediction."""
  return _bbh_paper_accuracy(targets, predictions, cot=False,
                             metric="bbh_answer_only_accuracy_paper")


def mean_over_tasks(per_task: Mapping[str, Union[float, Mapping[str, float]]]) -> float:
  """Unweighted mean of per-task accuracies, as BBH reports it (each task counts once).

  Values are accuracies or metric dicts holding "accuracy".
  """
  if not per_task:
    raise ValueError("mean_over_tasks got no tasks; pass {task_name: accuracy} for every task.")
  values = []
  for task, value in per_task.items():
    if isinstance(value, Mapping):
      if "accuracy" not in value:
        raise ValueError(f"mean_over_tasks: task {task!r} has metrics {sorted(value)} without "
                         "'accuracy'; pass the accuracy itself or a metric dict holding it.")
      value = value["accuracy"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ValueError(f"mean_over_tasks: task {task!r} has accuracy {value!r}; expected a number.")
    values.append(float(value))
  return sum(values) / len(values)
