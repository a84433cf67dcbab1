"""Tests for specialize_jax.data.metrics on real GPT-3 GSM8K solutions and real BBH targets and
CoT exemplars."""
import json
import re

import pytest

from specialize_jax.data import metrics
from tests.support import shared_data

SOLUTION_MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
IS_CORRECT_PERCENT = shared_data.GSM8K_SOLUTION_IS_CORRECT_PERCENT
BBH_TASK_COUNT = 27


_read_jsonl = shared_data.read_jsonl


@pytest.fixture(scope="module")
def solution_rows():
  return _read_jsonl("gsm8k/example_model_solutions.jsonl")


@pytest.fixture(scope="module")
def bbh_tasks():
  """{task: [(input, target), ...]} for all 27 BBH tasks."""
  task_dir = shared_data.shared_file("bbh/bbh")
  tasks = {}
  for path in sorted(task_dir.glob("*.json")):
    with open(path, encoding="utf-8") as f:
      tasks[path.stem] = [(ex["input"], ex["target"]) for ex in json.load(f)["examples"]]
  assert len(tasks) == BBH_TASK_COUNT
  return tasks


# --- Math -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", SOLUTION_MODELS)
def test_math_accuracy_reproduces_is_correct_rate(solution_rows, model):
  targets = [row["ground_truth"] for row in solution_rows]
  predictions = [row[model]["solution"] for row in solution_rows]
  result = metrics.math_accuracy(targets, predictions)
  expected = 100 * sum(row[model]["is_correct"] for row in solution_rows) / len(solution_rows)
  assert result["accuracy"] == pytest.approx(expected, abs=1e-9)
  assert result["accuracy"] == pytest.approx(IS_CORRECT_PERCENT[model], abs=0.005)
  assert result["unparsable"] == 0.0
  assert result["unparsable_targets"] == 0.0


def test_math_accuracy_paper_loses_rows_with_commas(solution_rows):
  """175b_verification: thousands separators in the final "A:" lines flip six rows in paper mode.

  Rows 610, 642, 829, 997 and 1009 are right ("A: 65960" vs gold "A: 65,960") but read wrong;
  row 505 is wrong ("A: 600" vs gold "A: 1,600") but both sides read 600.
  """
  targets = [row["ground_truth"] for row in solution_rows]
  predictions = [row["175b_verification"]["solution"] for row in solution_rows]
  default = metrics.math_accuracy(targets, predictions)["accuracy"]
  paper = metrics.math_accuracy_paper(targets, predictions)["accuracy"]
  assert round(default * 1319 / 100) == 742
  assert round(paper * 1319 / 100) == 742 - 5 + 1


def test_math_accuracy_target_forms():
  targets = ["Natalia sold 24 clips.\n#### 72", "#### 1,000", 39.0, 7, "9 (apples)", None, "5:45"]
  predictions = ["The answer is 72.", "The answer is $1,000.", "39", "The answer is 7 cm",
                 "The answer is 8.", "The answer is 3.", "The answer is 5:45"]
  result = metrics.math_accuracy(targets, predictions)
  assert result == {"accuracy": pytest.approx(100 * 4 / 7), "unparsable": 0.0,
                    "unparsable_targets": 2.0}


def test_math_accuracy_reads_run_ons_before_the_new_exemplar():
  targets = ["#### 18", "#### 18", "#### 7"]
  predictions = ["The answer is 18. Q: Tom has 7 pens. The answer is 7",
                 "3 * 6 = 18 pens. Q: Tom has 7 pens. 7 - 0 = 7",
                 "The answer is 18. Q: Tom has 7 pens. The answer is 7"]
  assert metrics.math_accuracy(targets, predictions) == {
      "accuracy": pytest.approx(200 / 3), "unparsable": 0.0, "unparsable_targets": 0.0}
  # Self-consistency votes on the same answers: 18, 18 and 7 -> 18.
  assert metrics.self_consistency_accuracy(["#### 18"], [predictions])["accuracy"] == 100.0
  # The original read the last number of the whole text: paper mode keeps that.
  assert metrics.math_accuracy_paper(targets, predictions)["accuracy"] == pytest.approx(100 / 3)


def test_math_accuracy_counts_unparsable_predictions():
  result = metrics.math_accuracy(["#### 3", "#### 4"], ["I do not know.", "The answer is 4"])
  assert result == {"accuracy": 50.0, "unparsable": 1.0, "unparsable_targets": 0.0}


@pytest.mark.parametrize("target,prediction,default_right,paper_right", [
    ("#### 1,000", "The answer is 1,000.", True, True),  # Both sides read 0 in paper mode.
    ("#### 1000", "The answer is 1,000.", True, False),
    ("#### -3", "The answer is 3.", False, True),  # The paper ignores the minus sign.
    (-3.0, "The answer is -3.", True, True),  # Numbers are read through their text in paper mode.
    ("#### 18", "The answer is 18. Q: Janet has 16 ducks.", True, False),  # Run-on generation.
])
def test_math_accuracy_default_vs_paper(target, prediction, default_right, paper_right):
  assert metrics.math_accuracy([target], [prediction])["accuracy"] == 100.0 * default_right
  assert metrics.math_accuracy_paper([target], [prediction])["accuracy"] == 100.0 * paper_right


@pytest.mark.parametrize("metric", [metrics.math_accuracy, metrics.math_accuracy_paper,
                                    metrics.bbh_cot_accuracy, metrics.bbh_answer_only_accuracy])
def test_metrics_reject_misaligned_or_empty_inputs(metric):
  with pytest.raises(ValueError, match="1 targets but 2 predictions"):
    metric(["#### 1"], ["1", "2"])
  with pytest.raises(ValueError, match="no examples"):
    metric([], [])
  with pytest.raises(ValueError, match="decode model outputs"):
    metric(["#### 1"], [b"1"])


def test_math_accuracy_rejects_unknown_target_types():
  with pytest.raises(ValueError, match="Math target 0 is list"):
    metrics.math_accuracy([[9.0]], ["9"])
  with pytest.raises(ValueError, match="Math target 0 is bool"):
    metrics.math_accuracy([True], ["1"])


# --- Self-consistency -------------------------------------------------------------------------


@pytest.mark.parametrize("samples,gold,right,unparsable", [
    (["The answer is 18.", "The answer is 20.", "The answer is 18.0"], "#### 18", True, 0),
    (["The answer is 20.", "The answer is 18.", "The answer is 18."], "#### 18", True, 0),
    # Ties go to the answer seen first.
    (["The answer is 20.", "The answer is 18.", "The answer is 18.", "The answer is 20."],
     "#### 18", False, 0),
    (["The answer is 18.", "The answer is 20.", "The answer is 20.", "The answer is 18."],
     "#### 18", True, 0),
    # Samples without a number abstain rather than outvote the numbers.
    (["no idea", "still no idea", "The answer is 18."], "#### 18", True, 0),
    (["no idea", "none"], "#### 18", False, 1),
    (["The answer is 1,000", "The answer is 1000.00"], "#### 1,000", True, 0),
    (["\u0130stanbul: the answer is 7", "the answer is 7"], "#### 7", True, 0),
])
def test_self_consistency_accuracy(samples, gold, right, unparsable):
  result = metrics.self_consistency_accuracy([gold], [samples])
  assert result == {"accuracy": 100.0 * right, "unparsable": float(unparsable),
                    "unparsable_targets": 0.0}


def test_self_consistency_paper_votes_on_strings():
  """The original counted "18" and "18.0" as different answers, and a missing number as a vote."""
  samples = ["The answer is 18.", "The answer is 18.0", "The answer is 20.", "It is 20"]
  assert metrics.self_consistency_accuracy(["#### 18"], [samples])["accuracy"] == 100.0
  assert metrics.self_consistency_accuracy(["#### 18"], [samples], mode="paper")["accuracy"] == 0.0
  no_numbers = ["no idea", "none", "The answer is 18."]
  assert metrics.self_consistency_accuracy(["#### 18"], [no_numbers], mode="paper") == {
      "accuracy": 0.0, "unparsable": 0.0, "unparsable_targets": 0.0}


def test_self_consistency_over_real_solutions(solution_rows):
  """Four models' solutions as four samples of one input: bounds the vote from the labels."""
  targets = [row["ground_truth"] for row in solution_rows]
  samples = [[row[model]["solution"] for model in SOLUTION_MODELS] for row in solution_rows]
  expected = 0
  for row in solution_rows:
    # With 4 samples, 3 or 4 right ones always win; with none right the vote cannot be right.
    right_votes = sum(row[model]["is_correct"] for model in SOLUTION_MODELS)
    expected += right_votes >= 3
  accuracy = metrics.self_consistency_accuracy(targets, samples)["accuracy"]
  assert accuracy >= 100 * expected / len(solution_rows)  # 361 rows
  assert accuracy <= 100 * sum(
      any(row[model]["is_correct"] for model in SOLUTION_MODELS) for row in solution_rows
  ) / len(solution_rows)  # 887 rows
  # Between the bounds, the rows with 1 or 2 right samples are decided by how the wrong ones
  # split: the vote is right on 584 rows (measured; a change of rule moves it).
  assert round(accuracy * len(solution_rows) / 100) == 584


def test_self_consistency_rejects_bad_samples():
  with pytest.raises(ValueError, match="non-empty list of sampled texts"):
    metrics.self_consistency_accuracy(["#### 1"], [[]])
  with pytest.raises(ValueError, match="non-empty list of sampled texts"):
    metrics.self_consistency_accuracy(["#### 1"], ["The answer is 1"])
  with pytest.raises(ValueError, match="one of"):
    metrics.self_consistency_accuracy(["#### 1"], [["1"]], mode="strict")


# --- BBH ------------------------------------------------------------------------------------


def _wrong_target(targets, target):
  """A real target of the same task that differs from `target`."""
  return next(other for other in sorted(set(targets)) if other != target)


def test_bbh_cot_scores_right_answers_100_and_wrong_options_0_on_every_task(bbh_tasks):
  per_task = {}
  for task, examples in bbh_tasks.items():
    targets = [target for _, target in examples]
    right = [f"Let's think step by step.\nSome reasoning.\nSo the answer is {t}." for t in targets]
    # FlanT5 has no newline token: it runs on into a new exemplar after answering.
    run_on = [f"Some reasoning. So the answer is {t}. Q: {inp[:60]}" for inp, t in examples]
    wrong = [f"So the answer is {_wrong_target(targets, t)}." for t in targets]
    per_task[task] = metrics.bbh_cot_accuracy(targets, right)
    assert per_task[task] == {"accuracy": 100.0, "unparsable": 0.0}, task
    assert metrics.bbh_cot_accuracy(targets, run_on)["accuracy"] == 100.0, task
    assert metrics.bbh_cot_accuracy(targets, wrong)["accuracy"] == 0.0, task
    assert metrics.bbh_answer_only_accuracy(targets, targets)["accuracy"] == 100.0, task
    assert metrics.bbh_answer_only_accuracy(targets, [t + ".\nQ: next" for t in targets]) == {
        "accuracy": 100.0}, task
    wrong_only = [_wrong_target(targets, t) for t in targets]
    assert metrics.bbh_answer_only_accuracy(targets, wrong_only)["accuracy"] == 0.0, task
  assert metrics.mean_over_tasks(per_task) == 100.0


def test_bbh_hedged_answers_score_0_and_run_ons_read_the_first_answer_on_every_task(bbh_tasks):
  """Every task's answer form (options, True/False, Yes/No, valid/invalid, numbers, word lists,
  dyck closings, free text) against its real targets: an answer naming the target and another
  real target is wrong; a run-on into a new exemplar is read before the new question."""
  for task, examples in bbh_tasks.items():
    targets = [target for _, target in examples]
    wrong = [_wrong_target(targets, t) for t in targets]
    for hedge in ("{t} or {w}", "{t}, {w}", "{t} and {w}", "{w} or {t}"):
      cot = [f"So the answer is {hedge.format(t=t, w=w)}." for t, w in zip(targets, wrong)]
      answer_only = [hedge.format(t=t, w=w) for t, w in zip(targets, wrong)]
      assert metrics.bbh_cot_accuracy(targets, cot) == {"accuracy": 0.0, "unparsable": 0.0}, (
          task, hedge)
      assert metrics.bbh_answer_only_accuracy(targets, answer_only) == {"accuracy": 0.0}, (
          task, hedge)
    run_on = [f"So the answer is {t}. Q: {inp[:60]}\nA: Let's think step by step. So the answer "
              f"is {w}." for (inp, t), w in zip(examples, wrong)]
    assert metrics.bbh_cot_accuracy(targets, run_on)["accuracy"] == 100.0, task
    answer_only_run_on = [f"{t} Q: {inp[:60]}\nA: {w}" for (inp, t), w in zip(examples, wrong)]
    assert metrics.bbh_answer_only_accuracy(targets, answer_only_run_on)["accuracy"] == 100.0, task


def _cot_exemplars(prompt_text):
  """(answer text after "A: ", its final answer) for each exemplar of a BBH CoT prompt."""
  exemplars = []
  for block in prompt_text.split("\n\nQ: ")[1:]:
    answer_text = block.split("\nA: ", 1)[1]
    final = re.search(r"So the answer is (.*)\.\s*$", answer_text)
    assert final is not None, answer_text[-80:]
    exemplars.append((answer_text, final.group(1)))
  return exemplars


def test_bbh_cot_reads_the_real_exemplars(bbh_tasks):
  """The 81 CoT exemplars (3 per task) score as right with their own answer, which is a real
  target of the task wherever the task's targets form a closed set."""
  closed_set_tasks = 0
  for task, examples in bbh_tasks.items():
    prompt = shared_data.shared_file(f"bbh/cot-prompts/{task}.txt").read_text(encoding="utf-8")
    exemplars = _cot_exemplars(prompt)
    assert len(exemplars) == 3, task
    targets = {target for _, target in examples}
    for answer_text, answer in exemplars:
      assert metrics.bbh_cot_accuracy([answer], [answer_text])["accuracy"] == 100.0, (task, answer)
      if len(targets) <= 20:
        assert answer in targets or re.fullmatch(r"\([A-Z]\)", answer), (task, answer)
    closed_set_tasks += len(targets) <= 20
  assert closed_set_tasks == 24  # All but dyck_languages, multistep_arithmetic_two, word_sorting.


@pytest.mark.parametrize("prediction,right", [
    ("So the answer is (A).", True),
    # Exact match, the BBH reference rule: the option as the targets write it and nothing else.
    ("So the answer is A.", False),
    ("So the answer is A)", False),
    ("So the answer is (A) 12/14/1937.", False),
    ("So the answer is (A) or (B).", False),  # Hedged.
    ("So the answer is (A), (B).", False),
    ("So the answer is (A) and (C).", False),
    ("So the answer is either (A) or (B).", False),
    ("So the answer is (A). Q: Today is 9/7. A: Let's think step by step. So the answer is (B).",
     True),  # A run-on: the answer before the new exemplar.
    ("So the answer is (B). Q: Today is 9/7. A: Let's think step by step. So the answer is (A).",
     False),
    ("The Answer Is (A)", True),  # Any case.
    ("the answer is (B). Hmm, no: the answer is (A).", True),  # The last marker wins.
    ("the answer is (A). Hmm, no: the answer is (B).", False),
    ("So the answer is (B).", False),
    ("So the answer is Alice.", False),  # Not an option letter.
    ("So the answer is (a).", False),
    ("(A)", False),  # No marker: unparsable in CoT mode.
    ("\u0130stanbul: so the answer is (A).", True),  # "\u0130" lowers to two characters.
])
def test_bbh_cot_option_letters(prediction, right):
  assert metrics.bbh_cot_accuracy(["(A)"], [prediction])["accuracy"] == 100.0 * right


@pytest.mark.parametrize("target,prediction,right", [
    ("True", "So the answer is True.", True),
    ("True", "So the answer is true.", False),  # Exact match, case included.
    ("No", "So the answer is Not sure.", False),
    ("24", "So the answer is 2.", False),
    ("-11", "So the answer is -11.", True),
    ("] ) }", "So the answer is ] ) }.", True),
    ("Monsters, Inc", "So the answer is Monsters, Inc.", True),
    ("valid", "So the answer is: valid", True),
])
def test_bbh_cot_exact_match(target, prediction, right):
  assert metrics.bbh_cot_accuracy([target], [prediction])["accuracy"] == 100.0 * right


def test_bbh_cot_counts_predictions_without_marker():
  result = metrics.bbh_cot_accuracy(["True", "False"], ["True", "So the answer is False."])
  assert result == {"accuracy": 50.0, "unparsable": 1.0}


@pytest.mark.parametrize("target,prediction,right", [
    ("(B)", "(B)", True),
    ("(B)", "B", False),  # Exact match.
    ("(B)", "(B) 11/11/2018\nQ: next", False),  # An option and something else.
    ("(B)", "(B) or (C)", False),
    ("(B)", "(B) Q: Today is 9/7.\nA: (C)", True),  # A run-on.
    ("(B)", "(C)", False),
    ("Yes", "Yes.", True),
    ("Yes", "No\nYes", False),  # Only the first line counts.
])
def test_bbh_answer_only(target, prediction, right):
  assert metrics.bbh_answer_only_accuracy([target], [prediction])["accuracy"] == 100.0 * right


@pytest.mark.parametrize("target,prediction,cot_right,answer_only_right", [
    # The original's substring rule accepts these; our exact rule does not.
    ("No", "So the answer is Not sure.", True, True),
    ("(A)", "So the answer is (B) or (A).", True, True),
    ("2", "So the answer is 24.", True, True),
    # It reads the text between the first and second marker, case-sensitively.
    ("(A)", "So the answer is (B). Hmm, the answer is (A).", False, True),
    ("True", "The Answer Is True.", False, True),
])
def test_bbh_paper_rules(target, prediction, cot_right, answer_only_right):
  assert metrics.bbh_cot_accuracy_paper([target], [prediction])["accuracy"] == 100.0 * cot_right
  assert (metrics.bbh_answer_only_accuracy_paper([target], [prediction])["accuracy"] ==
          100.0 * answer_only_right)


def test_bbh_rejects_non_string_targets():
  with pytest.raises(ValueError, match="BBH targets are the task's target strings"):
    metrics.bbh_cot_accuracy([1], ["So the answer is 1."])


# --- Mean over tasks --------------------------------------------------------------------------


def test_mean_over_tasks_is_unweighted():
  per_task = {"snarks": 50.0, "navigate": {"accuracy": 100.0, "unparsable": 3.0}, "dyck": 0}
  assert metrics.mean_over_tasks(per_task) == pytest.approx(50.0)


@pytest.mark.parametrize("per_task,message", [
    ({}, "no tasks"),
    ({"snarks": {"unparsable": 1.0}}, "without 'accuracy'"),
    ({"snarks": "50"}, "expected a number"),
])
def test_mean_over_tasks_rejects_bad_input(per_task, message):
  with pytest.raises(ValueError, match=message):
    metrics.mean_over_tasks(per_task)
