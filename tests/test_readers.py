"""Readers and splits on the real shared data: counts, question joining, gold answers."""
import numpy as np
import pytest

from specialize_jax.data import readers
from specialize_jax.data import splits


def test_gsm8k_counts_and_fields(data_dir):
  train, test = readers.read_gsm8k("train"), readers.read_gsm8k("test")
  assert (len(train), len(test)) == (7473, 1319)
  first = train[0]
  assert first.question.startswith("Natalia sold clips to 48 of her friends")
  assert (first.answer_text, first.answer_number) == ("72", 72.0)
  assert first.rationale == ("Natalia sold 48/2 = 24 clips in May.\n"
                             "Natalia sold 48+24 = 72 clips altogether in April and May.\n")
  assert not any("<<" in e.rationale for e in train + test)


def test_gsm8k_dev_is_the_originals_validation_index_and_excluded(data_dir):
  train, dev = splits.math_split("gsm8k", "train"), splits.math_split("gsm8k", "dev")
  assert (len(train), len(dev)) == (7473 - 200, 200)
  assert not {e.question for e in train} & {e.question for e in dev}
  # The original: gsm8k['train'].select(np.load('lib_prompt/validation_index.npy')), in that order;
  # HF's train split is train.jsonl line by line (7,473 questions, Natalia's clips first).
  index = np.load(data_dir / "gsm8k" / "validation_index.npy")
  assert [e.id for e in dev] == [f"gsm8k/train/{i}" for i in index]
  assert index[:3].tolist() == [4041, 5635, 5961]
  full = readers.read_gsm8k("train")
  assert len(full) == 7473 and full[0].question.startswith("Natalia sold clips to 48")
  assert [e.question for e in dev] == [full[i].question for i in index]


def test_multiarith_dev_test_partition(data_dir):
  dev, test = splits.math_split("multiarith", "dev"), splits.math_split("multiarith", "test")
  assert (len(dev), len(test)) == (200, 400)
  assert not {e.id for e in dev} & {e.id for e in test}
  everything = readers.read_multiarith()
  assert everything[0].question.startswith("For Halloween Debby")
  assert not everything[0].question.endswith(" ")
  assert everything[0].answer_number == 39.0 and everything[0].answer_text == "39"


def test_asdiv_from_original_xml(data_dir):
  examples = readers.read_asdiv()
  assert len(examples) == 2305
  first = examples[0]
  assert first.question == ("Seven red apples and two green apples are in the basket. "
                            "How many apples are in the basket?")
  assert (first.answer_text, first.answer_number) == ("9 (apples)", 9.0)
  # "Yes", "3:30 p.m.", "3:4", "Mrs. Hilt": no single number (PAL keeps 2,096 numeric ones).
  assert sum(e.answer_number is None for e in examples) == 211


def test_svamp_question_joining(data_dir):
  examples = readers.read_svamp()
  assert len(examples) == 1000
  assert examples[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 "
                                  "dollars on each pack. How much do you have to pay to buy each pack?")
  # Only the one upstream body that itself ends in ".." keeps a double period.
  assert sum(".." in e.question for e in examples) == 1


@pytest.mark.parametrize("reader,count", [(readers.read_addsub, 395), (readers.read_singleeq, 508)])
def test_other_math_sets(data_dir, reader, count):
  assert len(reader()) == count


def test_bbh_tasks_and_prompts(data_dir):
  assert len(readers.BBH_TASKS) == 27
  sizes = {task: len(readers.read_bbh(task)) for task in readers.BBH_TASKS}
  assert sizes["causal_judgement"] == 187 and sizes["date_understanding"] == 250
  cot = readers.read_bbh_cot_prompt("date_understanding")
  assert cot.startswith("Infer the date from context.") and "canary" not in cot
  answer_only = readers.bbh_answer_only_prompt(cot)
  assert "Let's think step by step" not in answer_only
  assert answer_only.count("\nA: (") == 3


def test_prompt_exemplars(data_dir):
  exemplars = readers.parse_prompt_exemplars(readers.read_prompt("prompt_simple_4_cases"))
  assert [e.answer for e in exemplars] == ["21", "48", "399", "13"]
  assert exemplars[0].question.startswith("Ivan has a bird feeder")


def test_missing_file_names_path_and_command(tmp_path, monkeypatch):
  monkeypatch.setenv("SPECIALIZE_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"gsm8k/test.jsonl.*specialize download"):
    readers.read_gsm8k("test")


def test_bad_line_names_file_and_line(tmp_path, monkeypatch):
  monkeypatch.setenv("SPECIALIZE_DATA_DIR", str(tmp_path))
  (tmp_path / "gsm8k").mkdir()
  (tmp_path / "gsm8k" / "test.jsonl").write_text(
      '{"question": "q", "answer": "x\\n#### 3"}\n{"question": "q2"}\n')
  with pytest.raises(readers.DataFormatError, match=r"test.jsonl:2: missing field 'answer'"):
    readers.read_gsm8k("test")
