"""The generated generic reasoning suite: every chain checked by an independent evaluation."""
import re

import pytest

from specialize_jax.demo import generic_tasks

NUM_CHECKED = 200


def _lines(example):
  return example.cot.split("\n")


def _number(text):
  return int(text.rstrip("."))


# --------------------------------------------------------------------------------------------------
# Independent checkers: each recomputes the answer from the question alone and checks the chain.


def _check_boolean_expressions(example):
  tokens = example.question.split()
  assert set(tokens) <= {"True", "False", "not", "and", "or", "(", ")"}
  num_operators = sum(token in ("not", "and", "or") for token in tokens)
  assert 2 <= num_operators <= 3
  assert example.answer == str(eval(example.question))  # pylint: disable=eval-used
  reductions = _lines(example)[:-1]
  assert len(reductions) == num_operators  # One reduction per line.
  for line in reductions:
    left, value = line.rstrip(".").split(" = ")
    assert value == str(eval(left)), line  # pylint: disable=eval-used
  assert reductions[-1].endswith(f"= {example.answer}.")


def _check_dyck_languages(example):
  prefix = "Complete the sequence: "
  assert example.question.startswith(prefix)
  tokens = example.question[len(prefix):].split()
  pairs = {")": "(", "]": "[", ">": "<"}
  stack = []
  for token in tokens:
    if token in pairs:
      assert stack.pop() == pairs[token]
    else:
      assert token in "([<"
      stack.append(token)
  assert 2 <= len(stack) <= 4
  closers = {opener: closer for closer, opener in pairs.items()}
  assert example.answer == " ".join(closers[token] for token in reversed(stack))
  lines = _lines(example)
  assert lines[-3] == f"Open: {' '.join(stack)}."
  assert lines[-2] == f"Close in reverse: {example.answer}."
  assert len(lines) - 3 == (len(tokens) - len(stack)) // 2  # One `Remove` line per matched pair.


def _check_word_sorting(example):
  assert example.question.startswith("List: ")
  chosen = example.question.split()[1:]
  assert 3 <= len(chosen) <= 4 and set(chosen) <= set(generic_tasks.SORT_WORDS)
  assert len({word[0] for word in chosen}) == len(chosen)
  ordered = sorted(chosen)
  assert example.answer == " ".join(ordered)
  assert _lines(example)[:2] == [f"First letters: {' '.join(w[0] for w in chosen)}.",
                                 f"In order: {' '.join(w[0] for w in ordered)}."]


def _check_tracking_objects(example):
  holding = dict(re.findall(r"(\w+) has a (\w+)", example.question))
  assert len(holding) == 3 and len(set(holding.values())) == 3
  people = list(holding)
  swaps = re.findall(r"(\w+) and (\w+) swap\.", example.question)
  assert 2 <= len(swaps) <= 3
  states = []
  for a, b in swaps:
    holding[a], holding[b] = holding[b], holding[a]
    states.append(", ".join(f"{person} {holding[person]}" for person in people) + ".")
  asked = re.search(r"What does (\w+) have\?$", example.question).group(1)
  assert example.answer == holding[asked]
  assert _lines(example)[:-1] == states


def _check_navigate(example):
  sentences = example.question.split(". ")
  assert sentences[0] == "Start at 0" and sentences[-1] == "Are you back at the start?"
  moves = sentences[1:-1]
  assert 2 <= len(moves) <= 4
  position, facing = 0, 1
  positions = []
  for move in moves:
    move = move.rstrip(".")
    if move == "Turn around":
      facing = -facing
    else:
      steps, word = re.fullmatch(r"Take (\d) steps? (forward|backward)", move).groups()
      position += facing * int(steps) * (1 if word == "forward" else -1)
      positions.append(position)
  assert example.answer == ("yes" if position == 0 else "no")
  lines = _lines(example)
  step_lines = [line for line in lines[:-2] if not line.startswith("Turn around")]
  assert [_number(line.split(" = ")[1]) for line in step_lines] == positions
  for line in step_lines:
    left, value = line.rstrip(".").split(" = ")
    assert eval(left) == int(value), line  # pylint: disable=eval-used
  assert lines[-2] == (f"{position} is 0." if position == 0 else f"{position} is not 0.")


def _check_multistep_arithmetic(example):
  tokens = example.question.split()
  assert all(len(t) == 1 and (t.isdigit() and t != "0" or t in "+-*()") for t in tokens)
  num_operators = sum(token in "+-*" for token in tokens)
  assert 2 <= num_operators <= 3
  value = eval(example.question)  # pylint: disable=eval-used
  assert example.answer == str(value) and abs(value) < 100
  steps = _lines(example)[:-1]
  assert len(steps) == num_operators
  for line in steps:
    left, result = line.rstrip(".").split(" = ")
    assert eval(left) == int(result) and abs(int(result)) < 100, line  # pylint: disable=eval-used
  assert steps[-1].endswith(f"= {example.answer}.")


CHECKERS = {
    "boolean_expressions": _check_boolean_expressions,
    "dyck_languages": _check_dyck_languages,
    "word_sorting": _check_word_sorting,
    "tracking_objects": _check_tracking_objects,
    "navigate": _check_navigate,
    "multistep_arithmetic": _check_multistep_arithmetic,
}


# --------------------------------------------------------------------------------------------------
# Every task.


def test_tasks_are_the_six_in_order():
  assert generic_tasks.TASKS == ("boolean_expressions", "dyck_languages", "word_sorting",
                                 "tracking_objects", "navigate", "multistep_arithmetic")
  assert set(CHECKERS) == set(generic_tasks.TASKS)


@pytest.mark.parametrize("task", generic_tasks.TASKS)
def test_every_chain_is_correct(task):
  examples = generic_tasks.generate(task, NUM_CHECKED, seed=3)
  assert len(examples) == NUM_CHECKED
  for example in examples:
    assert example.task == task
    CHECKERS[task](example)
    assert _lines(example)[-1] == f"So the answer is {example.answer}."


@pytest.mark.parametrize("task", generic_tasks.TASKS)
def test_texts_are_short_and_one_line(task):
  for example in generic_tasks.generate(task, NUM_CHECKED, seed=4):
    assert "\n" not in example.question and len(example.question.split()) <= 30
    assert len(_lines(example)) <= 6
    assert "answer is" not in example.question


@pytest.mark.parametrize("task", generic_tasks.TASKS)
def test_generation_is_deterministic_per_seed_and_differs_across_streams(task):
  first = generic_tasks.generate(task, 50, seed=7)
  assert generic_tasks.generate(task, 50, seed=7) == first
  assert generic_tasks.generate(task, 50, seed=7, stream=1) != first
  assert generic_tasks.generate(task, 50, seed=8) != first


@pytest.mark.parametrize("task", generic_tasks.TASKS)
def test_questions_are_distinct_and_exclusions_honored(task):
  held_out = generic_tasks.generate(task, 100, seed=0, stream=1)
  assert len({e.question for e in held_out}) == len(held_out)
  excluded = {e.question for e in held_out}
  train = generic_tasks.generate(task, 300, seed=0, stream=1, exclude_questions=excluded)
  assert len({e.question for e in train}) == len(train)
  assert not excluded & {e.question for e in train}


def test_exhausted_question_space_raises():
  with pytest.raises(ValueError, match="distinct"):
    generic_tasks.generate("boolean_expressions", 5000, seed=0)


@pytest.mark.parametrize("task", generic_tasks.TASKS)
def test_is_correct_on_targets_and_not_on_a_wrong_answer(task):
  example = generic_tasks.generate(task, 1, seed=5)[0]
  other = next(e for e in generic_tasks.generate(task, 50, seed=6) if e.answer != example.answer)
  for cot in (True, False):
    text = generic_tasks.target(example, cot)
    assert generic_tasks.extract_answer(text) == example.answer
    assert generic_tasks.is_correct(text, example.answer)
    assert not generic_tasks.is_correct(text, other.answer)
  assert generic_tasks.target(example, cot=True) == example.cot
  assert generic_tasks.target(example, cot=False) == f"So the answer is {example.answer}."


def test_every_closed_list_word_is_in_words():
  vocabulary = set(generic_tasks.words())
  for task in generic_tasks.TASKS:
    for example in generic_tasks.generate(task, 100, seed=9):
      if task != "multistep_arithmetic":
        assert set(example.answer.split()) <= vocabulary, example
  tracking = generic_tasks.generate("tracking_objects", 100, seed=9)
  assert {w for e in tracking for w in re.findall(r"\w+", e.question) if w[0].isupper()} - {
      "What"} <= vocabulary
  assert {"True", "False", "not", "and", "or", "(", ">", "yes", "no"} <= vocabulary


def test_navigate_answers_are_balanced():
  answers = [e.answer for e in generic_tasks.generate("navigate", 400, seed=11)]
  assert set(answers) == {"yes", "no"}
  assert 0.4 <= answers.count("yes") / len(answers) <= 0.6


def test_unknown_task_error_names_the_choices():
  with pytest.raises(ValueError, match="sports_understanding") as error:
    generic_tasks.generate("sports_understanding", 3, seed=0)
  for task in generic_tasks.TASKS:
    assert task in str(error.value)
  with pytest.raises(ValueError, match="word_sorting"):
    generic_tasks.build_input("x", "sports_understanding", "zero", cot=False)


# --------------------------------------------------------------------------------------------------
# Inputs and answer extraction.


EXAMPLE = generic_tasks.GenericExample(
    task="boolean_expressions", question="not True and False",
    cot="not True = False.\nFalse and False = False.\nSo the answer is False.", answer="False")


def test_zero_shot_inputs():
  assert (generic_tasks.build_input(EXAMPLE, "boolean_expressions", "zero", cot=False) ==
          "Evaluate the boolean expression.\n\nQ: not True and False\nA:")
  assert (generic_tasks.build_input("not True and False", "boolean_expressions", "zero", cot=True)
          == "Evaluate the boolean expression.\n\nQ: not True and False\nA: Let's think step by "
          "step.")


def test_few_shot_inputs_and_pinned_exemplars():
  """The exemplars are pinned: they (and the random stream) are the same on every platform."""
  assert generic_tasks.build_input(EXAMPLE, "boolean_expressions", "few", cot=True) == (
      "Evaluate the boolean expression.\n\n"
      "Q: not not ( False or True )\n"
      "A: False or True = True.\nnot True = False.\nnot False = True.\nSo the answer is True.\n\n"
      "Q: True and ( False or True )\n"
      "A: False or True = True.\nTrue and True = True.\nSo the answer is True.\n\n"
      "Q: not True and False\nA: Let's think step by step.")
  assert generic_tasks.build_input(EXAMPLE, "boolean_expressions", "few", cot=False) == (
      "Evaluate the boolean expression.\n\n"
      "Q: not not ( False or True )\nA: So the answer is True.\n\n"
      "Q: True and ( False or True )\nA: So the answer is True.\n\n"
      "Q: not True and False\nA:")


@pytest.mark.parametrize("task", generic_tasks.TASKS)
def test_inputs_of_every_task(task):
  example = generic_tasks.generate(task, 1, seed=2)[0]
  instruction = generic_tasks.INSTRUCTIONS[task]
  shots = generic_tasks.exemplars(task)
  assert shots == generic_tasks.generate(task, 2, seed=12345, stream=99)
  assert len(instruction.split("\n")) == 1
  assert (generic_tasks.build_input(example, task, "zero", cot=False) ==
          f"{instruction}\n\nQ: {example.question}\nA:")
  few_cot = generic_tasks.build_input(example, task, "few", cot=True)
  assert few_cot == (f"{instruction}\n\n"
                     + "\n\n".join(f"Q: {e.question}\nA: {e.cot}" for e in shots)
                     + f"\n\nQ: {example.question}\nA: Let's think step by step.")
  # The last `answer is` of an input is an exemplar's: a model's output is scored on its own.
  assert generic_tasks.extract_answer(few_cot) == shots[-1].answer


def test_build_input_rejects_bad_shots_and_a_mismatched_example():
  with pytest.raises(ValueError, match="zero"):
    generic_tasks.build_input(EXAMPLE, "boolean_expressions", "one", cot=False)
  with pytest.raises(ValueError):
    generic_tasks.build_input(EXAMPLE, "navigate", "zero", cot=False)


@pytest.mark.parametrize("prediction, expected", [
    ("So the answer is False.", "False"),
    ("the Answer is yes", "yes"),
    ("The answer is 3. No, the answer is  > ] ) .", "> ] )"),
    ("So the answer is -12\nQ: 2 + 2", "-12"),
    ("So the answer is apple cat Q: List: dog", "apple cat"),
    ("So the answer is .", ""),
    ("False and False = False.", None),
    ("", None),
])
def test_extract_answer(prediction, expected):
  assert generic_tasks.extract_answer(prediction) == expected


def test_is_correct_normalizes_whitespace_only():
  assert generic_tasks.is_correct("So the answer is  apple   cat moon .", "apple cat moon")
  assert not generic_tasks.is_correct("So the answer is false.", "False")
  assert not generic_tasks.is_correct("no answer here", "yes")
  assert not generic_tasks.is_correct("So the answer is.", "yes")
