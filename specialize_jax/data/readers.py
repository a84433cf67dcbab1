"""Readers for the upstream file formats of every dataset the project uses.

Each math reader returns a list of `MathExample` in the source's own order, with the question built the
way the original paper built it (noted per reader). BIG-Bench Hard has its own record type, since its
answers are strings (option letters, words) rather than numbers.

All paths are relative to the data directory (`data_dir.data_path`), whose layout is that of the shared
data folder: a missing file raises an error that names the path and `specialize download`.
"""
import dataclasses
import json
import pathlib
import re
import xml.etree.ElementTree as ElementTree
from typing import List, Optional, Sequence

import numpy as np

from specialize_jax.data import answers
from specialize_jax.data import data_dir
from specialize_jax.data.records import MathExample
from specialize_jax.errors import UserError

GSM8K_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
GSM8K_DEV_INDEX_FILE = "gsm8k/validation_index.npy"
MULTIARITH_FILE = "multiarith/MultiArith.json"
MULTIARITH_DEV_INDEX_FILE = "multiarith/validation_index.npy"
ASDIV_FILE = "asdiv/ASDiv.xml"
SVAMP_FILE = "svamp/SVAMP.json"
ADDSUB_FILE = "addsub/AddSub.json"
SINGLEEQ_FILE = "singleeq/questions.json"
BBH_TASK_DIR = "bbh/bbh"
BBH_COT_PROMPT_DIR = "bbh/cot-prompts"
PROMPT_DIR = "prompts/fu2023_lib_prompt"
BBH_TASKS = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)  # The 27 tasks of the upstream release.

_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


class DataFormatError(UserError, ValueError):
  """A data file does not have the layout its reader expects (names the file, line and field)."""


def _load_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}). Re-fetch it with "
                          "`specialize download --force`.") from e


def _field(record: dict, name: str, where: str):
  if name not in record:
    raise DataFormatError(f"{where}: missing field {name!r} (has {sorted(record)}).")
  return record[name]


def _number_text(value: float) -> str:
  """`39.0` -> `"39"`, `0.5` -> `"0.5"`: how a gold number is written in targets and prompts."""
  value = float(value)
  return str(int(value)) if value.is_integer() else repr(value)


def strip_calculator_annotations(text: str) -> str:
  """Removes GSM8K's `<<48/2=24>>` calculator notes (the exemplar rationales have none)."""
  return _CALCULATOR_ANNOTATION.sub("", text)


def read_gsm8k(split: str) -> List[MathExample]:
  """GSM8K `train` (7,473) or `test` (1,319) from the upstream JSONL.

  The gold `answer` field is a rationale ending in `#### N`; `rationale` keeps the text before `####`
  without calculator annotations, `answer_text` the text after it (thousands separators kept).
  """
  if split not in GSM8K_FILES:
    raise ValueError(f"Unknown GSM8K split {split!r}; expected one of {sorted(GSM8K_FILES)}.")
  path = data_dir.data_path(GSM8K_FILES[split])
  examples = []
  with open(path, encoding="utf-8") as f:  # local: the data directory
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: not valid JSON ({e.msg}).") from e
      question, solution = _field(record, "question", where), _field(record, "answer", where)
      if "####" not in solution:
        raise DataFormatError(f"{where}: field 'answer' has no '#### <number>' final line.")
      rationale, answer_text = solution.rsplit("####", 1)
      answer_text = answer_text.strip()
      examples.append(MathExample(
          id=f"gsm8k/{split}/{len(examples)}", question=question.strip(), answer_text=answer_text,
          answer_number=answers.parse_gold(answer_text), source="gsm8k",
          rationale=strip_calculator_annotations(rationale).strip() + "\n"))
  return examples


def read_multiarith() -> List[MathExample]:
  """All 600 MultiArith problems in file order (the paper strips `sQuestion`'s padding spaces)."""
  path = data_dir.data_path(MULTIARITH_FILE)
  examples = []
  for i, record in enumerate(_load_json(path)):
    where = f"{path}: record {i}"
    solutions = _field(record, "lSolutions", where)
    examples.append(MathExample(
        id=f"multiarith/{_field(record, 'iIndex', where)}",
        question=_field(record, "sQuestion", where).strip(), answer_text=_number_text(solutions[0]),
        answer_number=float(solutions[0]), source="multiarith"))
  return examples


def multiarith_dev_indices() -> np.ndarray:
  """The paper's 200 MultiArith dev indices; the other 400 problems are the test split."""
  indices = np.load(data_dir.data_path(MULTIARITH_DEV_INDEX_FILE))
  return np.sort(indices.astype(np.int64))


def gsm8k_dev_indices(num_train_questions: int) -> np.ndarray:
  """The original's 200 GSM8K dev indices into GSM8K train, in its order.

  The original selects its dev questions as `gsm8k['train'].select(validation_index)` from the
  Hugging Face dataset, whose train split is `train.jsonl` line by line (7,473 questions), so
  index i is line i of our file. The order is kept because `select` keeps it: a truncated eval
  (`EVAL_MAX_EXAMPLES`) then sees the same first questions as the original.
  """
  path = data_dir.data_path(GSM8K_DEV_INDEX_FILE)
  indices = np.load(path).astype(np.int64)
  if (indices.ndim != 1 or len(np.unique(indices)) != len(indices) or indices.min() < 0
      or indices.max() >= num_train_questions):
    raise DataFormatError(
        f"{path}: expected distinct indices into the {num_train_questions} GSM8K train questions; "
        "re-fetch it with `specialize download --only gsm8k --force`.")
  return indices


def read_asdiv() -> List[MathExample]:
  """All 2,305 ASDiv problems from the original XML; question = body + ' ' + question (as the paper).

  Gold answers keep their unit (`9 (apples)`); 211 are not one number (`Yes`, `3:30 p.m.`) and get
  `answer_number=None`, so a numeric metric can never count them correct — kept for comparability
  with the paper, which evaluated on all 2,305.
  """
  path = data_dir.data_path(ASDIV_FILE)
  try:
    root = ElementTree.parse(path).getroot()
  except ElementTree.ParseError as e:
    raise DataFormatError(f"{path}:{e.position[0]}: not valid XML ({e}).") from e
  examples = []
  for problem in root.iter("Problem"):
    where = f"{path}: Problem {problem.get('ID')}"
    texts = {}
    for tag in ("Body", "Question", "Answer"):
      node = problem.find(tag)
      if node is None or node.text is None:
        raise DataFormatError(f"{where}: missing <{tag}>.")
      texts[tag] = node.text.strip()
    examples.append(MathExample(
        id=f"asdiv/{problem.get('ID')}", question=f"{texts['Body']} {texts['Question']}",
        answer_text=texts["Answer"], answer_number=_try_parse_gold(texts["Answer"]), source="asdiv"))
  return examples


def _try_parse_gold(text: str) -> Optional[float]:
  try:
    return answers.parse_gold(text)
  except ValueError:
    return None


def read_svamp() -> List[MathExample]:
  """All 1,000 SVAMP problems; question = Body + '. ' + Question.

  Departure: the paper joined with '. ' even when Body already ends in a period (642 of 1,000),
  producing '..'; we join those with a single space.
  """
  path = data_dir.data_path(SVAMP_FILE)
  examples = []
  for i, record in enumerate(_load_json(path)):
    where = f"{path}: record {i}"
    body = _field(record, "Body", where).strip()
    question = _field(record, "Question", where).strip()
    joined = f"{body} {question}" if body.endswith(".") else f"{body}. {question}"
    answer = float(_field(record, "Answer", where))
    examples.append(MathExample(id=f"svamp/{_field(record, 'ID', where)}", question=joined,
                                answer_text=_number_text(answer), answer_number=answer,
                                source="svamp"))
  return examples


def _read_kojima_style(relative_path: str, source: str) -> List[MathExample]:
  path = data_dir.data_path(relative_path)
  examples = []
  for i, record in enumerate(_load_json(path)):
    where = f"{path}: record {i}"
    answer = float(_field(record, "lSolutions", where)[0])
    examples.append(MathExample(id=f"{source}/{_field(record, 'iIndex', where)}",
                                question=_field(record, "sQuestion", where).strip(),
                                answer_text=_number_text(answer), answer_number=answer,
                                source=source))
  return examples


def read_addsub() -> List[MathExample]:
  """All 395 AddSub problems."""
  return _read_kojima_style(ADDSUB_FILE, "addsub")


def read_singleeq() -> List[MathExample]:
  """All 508 SingleEq problems."""
  return _read_kojima_style(SINGLEEQ_FILE, "singleeq")


# ---------------------------------------------------------------------------------------------------
# Prompt files.


@dataclasses.dataclass(frozen=True)
class PromptExemplar:
  """One worked example parsed from a prompt file: question, rationale (may be empty), answer."""
  question: str
  rationale: str
  answer: str


def read_prompt(name: str) -> str:
  """The raw text of a prompt file in `prompts/fu2023_lib_prompt/` (e.g. `prompt_simple_4_cases`)."""
  return data_dir.data_path(f"{PROMPT_DIR}/{name}.txt").read_text(encoding="utf-8")


_EXEMPLAR = re.compile(
    r"(?:Question|Q):\s*(?P<question>.*?)\n(?:Let's think step by step\n)?(?P<rationale>.*?)"
    r"The answer is (?P<answer>[^\n]*?)\.?\s*(?=\n\s*\n|\Z)", re.DOTALL)


def parse_prompt_exemplars(prompt_text: str) -> List[PromptExemplar]:
  """Splits a `Q: ...\\nLet's think step by step\\n...The answer is N` prompt into exemplars."""
  exemplars = [PromptExemplar(m["question"].strip(), m["rationale"], m["answer"].strip())
               for m in _EXEMPLAR.finditer(prompt_text)]
  if not exemplars:
    raise DataFormatError("Prompt text has no 'Q: ... The answer is N' exemplars.")
  return exemplars


# ---------------------------------------------------------------------------------------------------
# BIG-Bench Hard.


@dataclasses.dataclass(frozen=True)
class BbhExample:
  id: str
  input: str
  target: str
  task: str


def read_bbh(task: str) -> List[BbhExample]:
  if task not in BBH_TASKS:
    raise ValueError(f"Unknown BBH task {task!r}; known: {', '.join(BBH_TASKS)}.")
  path = data_dir.data_path(f"{BBH_TASK_DIR}/{task}.json")
  examples = _field(_load_json(path), "examples", str(path))
  return [BbhExample(id=f"bbh/{task}/{i}", input=_field(e, "input", f"{path}: example {i}"),
                     target=_field(e, "target", f"{path}: example {i}"), task=task)
          for i, e in enumerate(examples)]


def read_bbh_prompt_file(task: str) -> str:
  """The task's CoT prompt file as it is, canary header included (what the original prompts with)."""
  return data_dir.data_path(f"{BBH_COT_PROMPT_DIR}/{task}.txt").read_text(encoding="utf-8")


def read_bbh_cot_prompt(task: str) -> str:
  """The task's 3-shot CoT prompt: the description and exemplars, without the canary header."""
  path = data_dir.data_path(f"{BBH_COT_PROMPT_DIR}/{task}.txt")
  text = read_bbh_prompt_file(task)
  if "-----" not in text:
    raise DataFormatError(f"{path}: expected a canary header ending in a '-----' line.")
  return text.split("-----", 1)[1].strip()


def bbh_answer_only_prompt(cot_prompt: str) -> str:
  """The answer-only form of a BBH CoT prompt: each `A: Let's think step by step. ... So the answer
  is X.` becomes `A: X` (the standard BBH answer-only prompting)."""
  pattern = re.compile(r"A: Let's think step by step\..*?So the answer is (.*?)\.?(?=\n\nQ:|\Z)",
                       re.DOTALL)
  converted, count = pattern.subn(lambda m: f"A: {m.group(1).strip()}", cot_prompt)
  if count == 0:
    raise DataFormatError("BBH CoT prompt has no 'A: Let's think step by step. ... So the answer "
                          "is X.' exemplars.")
  return converted


BBH_PAPER_ANSWER_TRIGGER = "the answer is "


def bbh_answer_only_prompt_paper(prompt_file_text: str) -> str:
  """The original's answer-only BBH prompt (its `modify_prompt`), from the raw prompt file.

  The original keeps the text before the file's first `A:` (canary header, description, first
  question), appends `A: the answer is `, then the text between the file's first and second
  `the answer is `. So only the first exemplar becomes answer-only (`A: the answer is (D).`); the
  second follows with its chain of thought cut just before its answer (`... So `), and the third is
  dropped. That is not what its comment intends, but it is the prompt its BBH answer-only numbers
  were measured with, so it is reproduced as it is; `bbh_answer_only_prompt` is the clean form.
  """
  if BBH_PAPER_ANSWER_TRIGGER not in prompt_file_text or "A:" not in prompt_file_text:
    raise DataFormatError(f"BBH prompt file has no 'A:' or no {BBH_PAPER_ANSWER_TRIGGER!r}; "
                          "re-fetch it with `specialize download --only bbh --force`.")
  question = prompt_file_text.split("A:")[0]
  answer = prompt_file_text.split(BBH_PAPER_ANSWER_TRIGGER)[1]
  return f"{question}A: {BBH_PAPER_ANSWER_TRIGGER}{answer}"


def select(examples: Sequence, indices) -> list:
  return [examples[int(i)] for i in indices]
