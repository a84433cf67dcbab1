"""Tests for specialize_jax.data.answers: real GPT-3 GSM8K solutions with correctness labels,
real gold answers (GSM8K, ASDiv), and one table per normalization rule."""
import re

import pytest

from specialize_jax.data import answers
from tests.support import shared_data

SOLUTION_MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
IS_CORRECT_PERCENT = shared_data.GSM8K_SOLUTION_IS_CORRECT_PERCENT


_read_jsonl = shared_data.read_jsonl


@pytest.fixture(scope="module")
def solution_rows():
  rows = _read_jsonl("gsm8k/example_model_solutions.jsonl")
  assert len(rows) == 1319
  return rows


# --- Real model outputs ----------------------------------------------------------------------


@pytest.mark.parametrize("model", SOLUTION_MODELS)
def test_default_mode_agrees_with_is_correct_on_every_row(solution_rows, model):
  disagreements = []
  for index, row in enumerate(solution_rows):
    gold = answers.parse_gold(row["ground_truth"])
    solution = row[model]["solution"]
    predicted_correct = answers.answers_match(answers.extract_answer(solution), gold)
    if predicted_correct != row[model]["is_correct"]:
      disagreements.append((index, row[model]["is_correct"], solution[-80:], gold))
  assert not disagreements, disagreements[:10]
  percent = 100 * sum(row[model]["is_correct"] for row in solution_rows) / len(solution_rows)
  assert percent == pytest.approx(IS_CORRECT_PERCENT[model], abs=0.005)


def test_paper_mode_disagrees_only_where_commas_or_minus_signs_are(solution_rows):
  """The original regex misreads "3,000" and "-200"; every row it gets wrong shows one of them."""
  disagreements = []
  for index, row in enumerate(solution_rows):
    gold = answers.parse_gold(row["ground_truth"], mode="paper")
    for model in SOLUTION_MODELS:
      solution = row[model]["solution"]
      pred = answers.extract_answer(solution, mode="paper")
      if answers.answers_match(pred, gold, mode="paper") != row[model]["is_correct"]:
        final_lines = solution.splitlines()[-1] + row["ground_truth"].splitlines()[-1]
        disagreements.append((index, model, final_lines))
  for index, model, final_lines in disagreements:
    assert "," in final_lines or "-" in final_lines, (index, model, final_lines)
  with_minus = sum("-" in final_lines for _, _, final_lines in disagreements)
  assert (len(disagreements), with_minus) == (24, 8)
  # Row 419: "A: 3,000" is right (gold "A: 3000") but the original read it as 0.
  assert any(index == 419 for index, _, _ in disagreements)


def test_paper_mode_is_the_original_findall_on_real_text(solution_rows):
  """Our token-wise scan from the end equals re.findall(...)[-1] of the original."""
  texts = [row["ground_truth"] for row in solution_rows]
  texts += [row[model]["solution"] for row in solution_rows for model in SOLUTION_MODELS]
  for text in texts:
    matches = re.findall(answers.PAPER_NUMBER_PATTERN, text)
    expected = float(matches[-1]) if matches else None
    assert answers.extract_answer(text, mode="paper") == expected, text[-80:]


def test_gsm8k_gold_answers_parse_with_thousands_separators():
  rows = _read_jsonl("gsm8k/train.jsonl") + _read_jsonl("gsm8k/test.jsonl")
  assert len(rows) == 7473 + 1319
  with_commas = 0
  for row in rows:
    tail = row["answer"].rsplit("####", 1)[1].strip()
    with_commas += "," in tail
    assert answers.parse_gold(row["answer"]) == float(tail.replace(",", "")), row["answer"][-40:]
  assert with_commas == 93  # "#### 1,000"-style golds the paper regex reads wrong.


def test_asdiv_gold_answers_match_pal_numeric_targets():
  """PAL kept 2096 ASDiv problems with a numeric target; parse_gold reads every single-part one.

  The 74 multi-part golds PAL kept ("5 (years old); 15 (years old)") are ambiguous: PAL scores the
  first part, the original's regex the last. parse_gold refuses them (not one number).
  """
  by_question = {row["body"] + " " + row["question"]: row["answer"]
                 for row in _read_jsonl("asdiv/ASDiv.jsonl")}
  pal_rows = _read_jsonl("asdiv/pal_asdiv.jsonl")
  assert len(pal_rows) == 2096
  multi_part = 0
  for row in pal_rows:
    gold_text = by_question[row["input"]]
    if ";" in gold_text:
      multi_part += 1
      assert answers.parse_gold(gold_text.split(";")[0]) == float(row["target"]), gold_text
      with pytest.raises(ValueError, match="not a single number"):
        answers.parse_gold(gold_text)
      continue
    assert answers.parse_gold(gold_text) == float(row["target"]), gold_text
  assert multi_part == 74


def test_asdiv_golds_that_are_not_one_number_raise():
  golds = [row["answer"] for row in _read_jsonl("asdiv/ASDiv.jsonl")]
  assert len(golds) == 2305
  rejected = []
  for gold in golds:
    try:
      answers.parse_gold(gold)
    except ValueError:
      rejected.append(gold)
  no_digits = [gold for gold in rejected if not re.search(r"\d", gold)]  # "Yes", "Mrs. Hilt"
  multi_part = [gold for gold in rejected if ";" in gold]  # "8; 40", "6 (cm); 15 (cm)"
  times_and_ratios = [gold for gold in rejected if ":" in gold and ";" not in gold]  # "5:45"
  others = [gold for gold in rejected if gold not in no_digits + multi_part + times_and_ratios]
  counts = (len(rejected), len(no_digits), len(multi_part), len(times_and_ratios))
  assert counts == (211, 56, 90, 61)
  assert sorted(others) == ["-(1/3)", "February 3rd", "The 60th caller.", "Vendor 2"]


# --- Default extraction, one rule per table --------------------------------------------------

MARKER_CASES = [
    ("So she makes 9 * 2 = $18 every day.\nThe answer is 18.", 18.0),
    ("The answer is 18. Q: Janet has 16 ducks.", 18.0),  # FlanT5 runs on into a new question.
    ("THE ANSWER IS 7", 7.0),
    ("The answer is 5. Wait, 2 + 4 = 6, so the answer is 6.", 6.0),  # The last marker wins.
    ("The answer is:\n42\nNext 3 questions", 42.0),  # Number on the next line.
    ("The answer is unknown.\nBut 3 + 4 = 7", 7.0),  # No number on the marker's line: last number.
    ("The answer is unknown, but 3 + 4 = 7", 3.0),  # The first number on the marker's line.
    ("2 + 3 = <<2+3=5>>5 apples\nA: 5", 5.0),
    ("It takes 2 x 0.5 = 1.0 bolts.\nA: 3\n\n", 3.0),  # Trailing blank lines.
    ("A: Roger had 5 balls, buys 6 more.\nSo 11 in all.", 11.0),  # "A:" not on the last line.
    ("The answer is 4.\nA: 6", 6.0),  # The final "A:" line comes later.
    ("A: the answer is 8", 8.0),
    ("A: 10+John's age", 10.0),
    ("No numbers at all.", None),
    ("", None),
    ("The theanswer isn't 5 but 9", 9.0),  # Not a whole-word marker: last number.
    ("The answer is 5, as the answer isn't 7", 5.0),  # The last whole-word marker.
    ("\u0130\u0130: the answer is 57, not 9", 57.0),  # "\u0130" lowers to two characters.
]
# Run-ons: the answer is the one before the model starts a new exemplar, whatever it invents next.
RUN_ON_CASES = [
    ("The answer is 18. Q: Janet has 16 ducks. Let's think step by step. The answer is 7", 18.0),
    ("The answer is 18.\n\nQ: Janet has 16 ducks.\nA: The answer is 7", 18.0),
    ("So the answer is 18 Question: Tom has 3 pens. The answer is 3", 18.0),  # Teacher layout.
    ("9 * 2 = 18 apples. Q: Tom has 5 pens and 2 more. 5 + 2 = 7", 18.0),  # No marker: before Q:.
    ("The answer is 5. Wait, the answer is 6. Q: Then the answer is 9", 6.0),  # Last, before Q:.
    ("Q: 2 + 2? The answer is 4", 4.0),  # A "Q:" opening the text starts no new exemplar.
    ("The FAQ: the answer is 12", 12.0),  # "FAQ:" is no "Q:".
]
THOUSANDS_CASES = [
    ("A: 1,000", 1000.0),
    ("It costs $1,450,000 in total.", 1450000.0),
    ("1,000.50", 1000.5),
    ("Pick from 1, 2", 2.0),  # A list, not a thousands group.
    ("1,2", 2.0),
    ("12,34", 34.0),
]
SIGN_CASES = [
    ("A: -3", -3.0),
    ("x = -3", -3.0),
    ("20 - 21 = <<20-21=-1>>-1", -1.0),
    ("5-3=2", 2.0),  # Subtraction, not a negative 3.
    ("5 - 3", 3.0),
    ("ages 3-4", 4.0),  # A range.
    ("He lost -$5", -5.0),
    ("He lost $-5", -5.0),
    ("\u22127 degrees", -7.0),  # Unicode minus.
    ("A: -28,800", -28800.0),
]
SYMBOL_AND_UNIT_CASES = [
    ("She makes $18.", 18.0),
    ("A: 50%", 50.0),
    ("The answer is 9 (apples).", 9.0),
    ("The answer is 5 cm", 5.0),
    ("The answer is 12 feet long", 12.0),
    ("The answer is -1.8 billion", -1.8),  # Scale words are not applied.
    ("He finished 3rd", 3.0),
]
DECIMAL_AND_FRACTION_CASES = [
    ("The answer is 2.50.", 2.5),
    ("The answer is .5", 0.5),
    ("A: 3/4", 0.75),
    ("A: 7/14", 0.5),
    ("The answer is 1 1/2", 1.0),  # Mixed numbers are not supported: the first number is read.
    ("born 12/14/1937", 12.0),  # A date reads its first field only.
    ("3/0", 3.0),  # A zero denominator is ignored.
    ("version 1.2.3", 1.2),
    ("H2O", None),  # Digits inside a word are not numbers.
]


@pytest.mark.parametrize("text,expected", (MARKER_CASES + THOUSANDS_CASES + SIGN_CASES +
                                           SYMBOL_AND_UNIT_CASES + DECIMAL_AND_FRACTION_CASES))
def test_extract_answer_default(text, expected):
  assert answers.extract_answer(text) == expected


def test_extract_answer_survives_huge_numbers():
  assert answers.extract_answer("3" * 5000) == float("inf")
  assert answers.extract_answer("1/" + "3" * 500) == 0.0


# --- Paper mode: the original rule, flaws included --------------------------------------------

PAPER_CASES = [
    ("A: 1,000", 0.0),  # findall gives "1", "000".
    ("A: -3", 3.0),  # Minus signs are ignored.
    ("$1,000.50.", 0.5),
    ("The answer is 18. Q: Janet has 16 ducks.", 16.0),  # No marker: always the last number.
    ("A: 3/4", 4.0),
    ("2.50", 2.5),
    (".5", 0.5),
    ("H2O", 2.0),
    ("no digits", None),
]


@pytest.mark.parametrize("text,expected", PAPER_CASES)
def test_extract_answer_paper(text, expected):
  assert answers.extract_answer(text, mode="paper") == expected


@pytest.mark.parametrize("text,expected", [
    ("#### 1,000", 0.0),
    ("Natalia sold 48/2 = 24 clips.\n#### -72", 72.0),
    ("9 (apples)", 9.0),
    ("[9.0]", 9.0),
])
def test_parse_gold_paper(text, expected):
  assert answers.parse_gold(text, mode="paper") == expected


# --- Gold answers and comparison --------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),
    ("#### 1,000", 1000.0),
    ("#### -5", -5.0),
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nA: 18", 18.0),
    ("She sold 48/2 = 24 clips in May.\nThe answer is 1,200", 1200.0),  # Our CoT target form.
    ("9 (apples)", 9.0),
    ("14  (seats)", 14.0),
    ("0.46 (dollars)", 0.46),
    ("39.0", 39.0),
    ("$1,000", 1000.0),
    ("50%", 50.0),
    ("5/2", 2.5),
    ("6th", 6.0),
    ("12 cm.", 12.0),
])
def test_parse_gold_default(text, expected):
  assert answers.parse_gold(text) == expected


@pytest.mark.parametrize("text", [
    "Yes", "5:45", "8; 40", "February 3rd", "The 60th caller.", "-(1/3)", "3:30 p.m.",
    "Vendor 2", "", "She had 5 then 7", "The answer is 5 or 7",
])
def test_parse_gold_rejects_what_is_not_one_number(text):
  with pytest.raises(ValueError, match="not a single number"):
    answers.parse_gold(text)


def test_parse_gold_paper_without_number_raises():
  with pytest.raises(ValueError, match="has no number"):
    answers.parse_gold("They are equal", mode="paper")


@pytest.mark.parametrize("pred,gold,mode,expected", [
    (18.0, 18.0, "default", True),
    (1000.0, 1000.0, "default", True),
    (0.1 + 0.2, 0.3, "default", True),  # Float noise is absorbed...
    (0.1 + 0.2, 0.3, "paper", False),  # ...but not by the original's float equality.
    (0.33, 1 / 3, "default", False),  # Rounding by the model is not.
    (1e9 + 1, 1e9, "default", False),  # Large integers stay distinct.
    (-3.0, 3.0, "default", False),
    (None, 3.0, "default", False),
    (None, 3.0, "paper", False),
    (3, 3.0, "paper", True),
])
def test_answers_match(pred, gold, mode, expected):
  assert answers.answers_match(pred, gold, mode=mode) is expected


def test_answers_match_rejects_missing_gold():
  with pytest.raises(ValueError, match="parse the gold answer"):
    answers.answers_match(3.0, None)


@pytest.mark.parametrize("call", [
    lambda: answers.extract_answer("3", mode="Paper"),
    lambda: answers.parse_gold("3", mode="strict"),
    lambda: answers.answers_match(3.0, 3.0, mode=""),
])
def test_unknown_mode_raises_with_the_known_modes(call):
  with pytest.raises(ValueError, match=r"one of \('default', 'paper'\)"):
    call()


def test_non_text_input_raises():
  with pytest.raises(ValueError, match="decode bytes first"):
    answers.extract_answer(b"18")
  with pytest.raises(ValueError, match="expects the gold answer as str"):
    answers.parse_gold(18.0)


@pytest.mark.parametrize("text,expected", RUN_ON_CASES)
def test_extract_answer_reads_run_ons_before_the_new_exemplar(text, expected):
  assert answers.extract_answer(text) == expected
