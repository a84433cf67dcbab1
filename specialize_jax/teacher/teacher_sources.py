"""Teacher-data sources: builders that turn existing teacher outputs into schema records.

- `records_from_gsm8k_gold`: GSM8K gold rationales, one "sample" per question (a teacher that is
  always right; the default training data until real teacher samples exist).
- `records_from_palm_svamp`: PaLM-540B few-shot CoT rationales on SVAMP (distilling step-by-step).
- `records_from_fu2023_codex`: the paper's code-davinci-002 samples with per-token top-5.
- `records_from_fu2023_pickle`: the paper's released processed data (``processed_data/*.pkl``),
  read with a restricted unpickler that builds plain Python values only.

The schema, validator and writers live in `teacher_data`.
"""
import ast
import glob
import json
import math
import operator
import os
import pathlib
import pickle
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from specialize_jax.data import answers
from specialize_jax.data import readers
from specialize_jax.errors import ConfigError
from specialize_jax.teacher.teacher_data import ROUNDED_ZERO_LOGPROB
from specialize_jax.teacher.teacher_data import TeacherDataError
from specialize_jax.teacher.teacher_data import TeacherInfo
from specialize_jax.teacher.teacher_data import TeacherRecord
from specialize_jax.teacher.teacher_data import TeacherSample
from specialize_jax.teacher.teacher_data import is_correct

# ----------------------------------------------------------------------------- answers

_ARITHMETIC_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                   ast.Div: operator.truediv}


def _evaluate_arithmetic(expression: str) -> Optional[float]:
  """Value of an expression of numbers, + - * / and parentheses; None for anything else.

  Parsed with ``ast`` and walked by hand: nothing is executed (never ``eval``).
  """
  if len(expression) > 1000:
    return None
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None

  def walk(node) -> Optional[float]:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      value = walk(node.operand)
      return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC_OPS:
      left, right = walk(node.left), walk(node.right)
      if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
        return None
      return _ARITHMETIC_OPS[type(node.op)](left, right)
    return None

  try:
    value = walk(tree.body)
  except RecursionError:
    return None
  return value if value is not None and math.isfinite(value) else None


# ----------------------------------------------------------------------------- builders

def _read_jsonl(path: pathlib.Path, required: Sequence[str]) -> List[Dict[str, Any]]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except ValueError as e:
        raise TeacherDataError(f"{path}:{lineno}: not valid JSON ({e}); re-download the file")
      missing = [k for k in required if not isinstance(row, dict) or k not in row]
      if missing:
        raise TeacherDataError(f"{path}:{lineno}: missing field(s) {missing}; expected "
                               f"{list(required)}")
      rows.append(row)
  return rows


def _gsm8k_gold_parts(answer: str, where: str) -> Tuple[str, str]:
  """(rationale without calculator notes, final answer as written) from a GSM8K ``answer``."""
  parts = answer.split("####")
  if len(parts) != 2:
    raise TeacherDataError(f"{where}: field 'answer' must hold exactly one '####' before the final "
                           f"answer, found {len(parts) - 1}")
  # Same rationale form as readers.read_gsm8k, so formats.cot_target gives this very text.
  return readers.strip_calculator_annotations(parts[0]).strip() + "\n", parts[1].strip()


def records_from_gsm8k_gold(train_jsonl_path, split: str = "train") -> List[TeacherRecord]:
  """GSM8K questions with their gold rationale as the one sample, in the ``{cot}`` form.

  The sample text is the rationale (text before ``####``, ``<<...>>`` calculator notes removed,
  ending in one newline) followed by ``The answer is N`` with N as GSM8K writes it (e.g.
  ``1,200``): the training formats' ``{cot}``, equal to ``formats.cot_target`` of the same question. Ids
  match ``readers.read_gsm8k`` (``gsm8k/train/17``).
  """
  path = pathlib.Path(train_jsonl_path)
  records = []
  for i, row in enumerate(_read_jsonl(path, ("question", "answer"))):
    rationale, final = _gsm8k_gold_parts(row["answer"], f"{path}:{i + 1}")
    gold = answers.parse_gold(final)
    text = f"{rationale}The answer is {final}"
    answer = answers.extract_answer(text)
    records.append(TeacherRecord(
        id=f"gsm8k/{split}/{i}", source="gsm8k", split=split, question=row["question"].strip(),
        gold_answer=final, gold_number=gold,
        samples=(TeacherSample(text=text, answer=answer, correct=is_correct(answer, gold)),)))
  return records


_PALM_ANSWER = re.compile(r"The answer is (.*)")


def _palm_answer(text: str) -> Optional[float]:
  """The last "The answer is <expr>" evaluated safely; the last number only if no such phrase."""
  found = _PALM_ANSWER.findall(text)
  if not found:
    return answers.extract_answer(text)
  return _evaluate_arithmetic(found[-1].strip().rstrip("."))


def records_from_palm_svamp(directory) -> List[TeacherRecord]:
  """PaLM-540B CoT rationales for the distilling-step-by-step SVAMP split (train, then test).

  Completions are cut at the first ``"\\n\\nQ:"`` (PaLM goes on with a new question). Gold is the
  ``label`` equation evaluated safely; the answer is the last ``The answer is (<expr>)`` evaluated
  the same way (None if the expression is not plain arithmetic, e.g. ``(2 * x)``), falling back to
  the last number only when the phrase is absent.
  """
  directory = pathlib.Path(directory)
  teacher = TeacherInfo(name="palm-540b", api="distilling-step-by-step release",
                        params={"prompt": "few-shot chain of thought"})
  records = []
  for split in ("train", "test"):
    rows_path = directory / f"svamp_{split}.jsonl"
    rows = _read_jsonl(rows_path, ("input", "label"))
    numbered = {}
    for name in glob.glob(str(directory / f"llm_{split}_CoT_*.json")):
      match = re.search(r"_CoT_(\d+)\.json$", name)
      if match:
        numbered[int(match.group(1))] = name
    completion_paths = [numbered[k] for k in sorted(numbered)]  # _10 after _2, not before.
    completions: List[str] = []
    for completion_path in completion_paths:
      with open(completion_path, encoding="utf-8") as f:
        chunk = json.load(f)
      if not isinstance(chunk, list) or not all(isinstance(c, str) for c in chunk):
        raise TeacherDataError(f"{completion_path}: expected a JSON list of completion strings")
      completions.extend(chunk)
    if len(completions) != len(rows):
      raise TeacherDataError(
          f"{rows_path} has {len(rows)} rows but {[os.path.basename(p) for p in completion_paths]} "
          f"hold {len(completions)} completions; they must align one to one, in order")
    for i, (row, completion) in enumerate(zip(rows, completions)):
      gold = _evaluate_arithmetic(row["label"])
      if gold is None:
        raise TeacherDataError(f"{rows_path}:{i + 1}: label {row['label']!r} is not an arithmetic "
                               "expression of numbers, + - * / and parentheses")
      text = completion.split("\n\nQ:")[0]
      answer = _palm_answer(text)
      records.append(TeacherRecord(
          id=f"svamp-dsbs/{split}/{i}", source="svamp", split=split, question=row["input"],
          gold_answer=row["label"], gold_number=gold, teacher=teacher,
          samples=(TeacherSample(text=text, answer=answer, correct=is_correct(answer, gold)),)))
  return records


def _logprob(prob: float) -> float:
  return math.log(prob) if prob > 0 else ROUNDED_ZERO_LOGPROB


def records_from_fu2023_codex(json_path) -> List[TeacherRecord]:
  """The paper's code-davinci-002 samples with per-token top-5, one record per GSM8K question.

  The whole step list is kept: the first two steps (``" step"``, ``"\\n"``, the end of the trigger
  "Let's think step by step\\n") and the trailing newlines are part of the API output, so text is
  the concatenation of all step tokens. The alignment stage drops them, as the paper's
  ``per_step_prob[2:-2]`` did. Probabilities are printed to 4 decimals; 0.0 becomes
  ``ROUNDED_ZERO_LOGPROB``.
  """
  path = pathlib.Path(json_path)
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  teacher = TeacherInfo(name="code-davinci-002", api="openai.completions",
                        params={"temperature": 0.5, "max_tokens": 256, "logprobs": 5,
                                "prompt": "prompt_complex.txt + Question: {q}\\nLet's think "
                                          "step by step"})
  if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
    raise TeacherDataError(f"{path}: expected a JSON object with a 'samples' list (the layout in "
                           "shared data SOURCES.md §4a)")
  grouped: Dict[Tuple[str, int], Dict[str, Any]] = {}
  for n, raw in enumerate(data["samples"]):
    where = f"{path}: samples[{n}]"
    context = {k: raw.get(k, data.get(k)) for k in ("gsm8k_split", "gsm8k_index", "question",
                                                     "gold_answer")}
    missing = [k for k, v in context.items() if v is None] + [
        k for k in ("text", "steps") if k not in raw]
    if missing:
      raise TeacherDataError(f"{where}: missing {missing} (neither in the sample nor top level)")
    steps = raw["steps"]
    bad = [j for j, step in enumerate(steps) if not (
        isinstance(step, dict) and isinstance(step.get("token"), str) and
        _is_finite_number(step.get("prob")) and isinstance(step.get("top5"), list))]
    if bad:
      raise TeacherDataError(f"{where}.steps[{bad[0]}]: expected {{token: str, prob: number, "
                             f"top5: [[token, prob], ...]}} ({len(bad)} bad steps)")
    tokens = tuple(step["token"] for step in steps)
    if "".join(tokens) != raw["text"]:
      raise TeacherDataError(f"{where}.text is not the concatenation of its step tokens")
    offsets, at = [], 0
    for token in tokens:
      offsets.append(at)
      at += len(token)
    gold_answer = _gsm8k_gold_parts(context["gold_answer"], f"{where}.gold_answer")[1]
    gold = answers.parse_gold(gold_answer)
    answer = answers.extract_answer(raw["text"])
    meta = {"sample_index": raw.get("sample_index")}
    if "notebook_cell" in raw:
      meta["notebook_cell"] = raw["notebook_cell"]
    sample = TeacherSample(
        text=raw["text"], answer=answer, correct=is_correct(answer, gold), tokens=tokens,
        logprobs=tuple(_logprob(step["prob"]) for step in steps),
        top_logprobs=tuple(tuple((tok, _logprob(p)) for tok, p in step["top5"])
                           for step in steps),
        offsets=tuple(offsets), meta=meta)
    key = (context["gsm8k_split"], int(context["gsm8k_index"]))
    entry = grouped.setdefault(key, {"context": context, "gold_answer": gold_answer,
                                     "gold": gold, "samples": []})
    entry["samples"].append(sample)
  return [TeacherRecord(
      id=f"gsm8k/{split}/{index}", source="gsm8k", split=split,
      question=entry["context"]["question"], gold_answer=entry["gold_answer"],
      gold_number=entry["gold"], samples=tuple(entry["samples"]), teacher=teacher,
      meta={"origin": f"FranxYao/FlanT5-CoT-Specialization notebooks via {path.name}",
            "probability_decimals": 4})
      for (split, index), entry in grouped.items()]



def _is_finite_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- the paper's pickles

FU2023_PICKLE_KEYS = ("question", "answer", "answer_gold", "answer_label", "type")
_PICKLE_LAST_QUESTION = re.compile(
    r"(?:^|\n)(?:Q|Question):\s*(?P<q>(?:(?!\n(?:Q|Question):).)*)\Z", re.DOTALL)
_PICKLE_QUESTION_TAILS = ("Let's think step by step", "A:")  # The CoT and answer-only endings.


class UnsafePickleError(TeacherDataError):
  """A pickle that references a class or function: refused before anything in it runs."""


class _PlainValuesUnpickler(pickle.Unpickler):
  """Builds only what pickle opcodes make directly (dict, list, tuple, str, bytes, int, float,
  bool, None); any global (a class, a function such as ``os.system``) is refused by name."""

  def __init__(self, file, where: str):
    super().__init__(file)
    self._where = where

  def find_class(self, module, name):
    raise UnsafePickleError(
        f"{self._where}: refused to load {module}.{name}: this reader accepts plain Python "
        "values only (dict, list, tuple, str, int, float, bool, None); the file is not the "
        "paper's processed data or was tampered with. Nothing in it was executed.")

  def persistent_load(self, pid):
    raise UnsafePickleError(f"{self._where}: refused a persistent id; plain values only.")


def load_plain_pickle(path) -> Any:
  """The value in a pickle file, built by ``_PlainValuesUnpickler`` (never runs code from it)."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    try:
      return _PlainValuesUnpickler(f, str(path)).load()
    except UnsafePickleError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError, MemoryError) as e:
      raise TeacherDataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _pickle_bare_question(student_input: str, where: str) -> str:
  """The target question of a record's student input (its last ``Q:`` block, trigger removed)."""
  match = _PICKLE_LAST_QUESTION.search(student_input.rstrip())
  if match is None:
    raise TeacherDataError(f"{where}.question: no 'Q: ...' block in {student_input[-80:]!r}")
  question = match.group("q").strip()
  for tail in _PICKLE_QUESTION_TAILS:
    if question.endswith(tail):
      return question[:-len(tail)].rstrip()
  return question


def _pickle_per_step_probs(value: Any, where: str) -> Optional[List[List[List[Any]]]]:
  """``per_step_probs`` as JSON lists: one list of [piece, prob] pairs per student piece."""
  if value is None:
    return None
  ok = isinstance(value, (list, tuple)) and all(
      isinstance(step, (list, tuple)) and all(
          isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str) and
          _is_finite_number(pair[1]) for pair in step) for step in value)
  if not ok:
    raise TeacherDataError(f"{where}.per_step_probs: expected a list of [[piece, prob], ...] "
                           "lists with finite probabilities")
  return [[[piece, float(prob)] for piece, prob in step] for step in value]


def records_from_fu2023_pickle(path, question_ids: Optional[Mapping[str, str]] = None
                               ) -> List[TeacherRecord]:
  """The paper's processed data: one pickle record per correct chain, grouped by question.

  Each pickle record is a dict with ``question`` (the student's whole input: exemplars, then
  ``Q: {q}\nLet's think step by step``), ``answer`` (the teacher chain, already cut after the
  answer line), ``answer_gold`` (``Answer: <GSM8K solution> #### N``), ``per_step_probs`` (the
  original's DTW output: per FlanT5 piece of ``answer``, ``[piece, prob]`` pairs), ``answer_label``
  (1: correct) and ``type`` (the format, e.g. ``in_context_chain_of_thought``).

  Each becomes one sample: text = ``answer``; answer and correct recomputed with the project's
  rule; ``meta`` keeps ``type``, ``answer_label`` and ``per_step_probs`` (under that name: they
  are on STUDENT pieces, already aligned by the paper's rule, so they are not the schema's
  teacher-token fields). Records are keyed by the bare question; ``question_ids`` maps it to a
  dataset id (``gsm8k/train/17``), and every question must be found there. Without it, ids are
  ``fu2023-pkl/train/<k>`` in order of first appearance. A pickle holding several formats of the
  same chain gives one sample per format (``meta.type`` tells them apart).
  """
  path = pathlib.Path(path)
  data = load_plain_pickle(path)
  if not isinstance(data, list):
    raise TeacherDataError(f"{path}: expected a pickled list of dicts, got {type(data).__name__}")
  teacher = TeacherInfo(name="code-davinci-002", api="openai.completions",
                        params={"temperature": 0.5, "max_tokens": 256, "logprobs": 5,
                                "prompt": "prompt_complex.txt + Question: {q}\\nLet's think "
                                          "step by step"})
  grouped: Dict[str, Dict[str, Any]] = {}
  for n, row in enumerate(data):
    where = f"{path}: record {n}"
    if not isinstance(row, dict):
      raise TeacherDataError(f"{where}: expected a dict, got {type(row).__name__}")
    missing = [k for k in FU2023_PICKLE_KEYS if k not in row]
    bad = [k for k in ("question", "answer", "answer_gold", "type")
           if k in row and not isinstance(row[k], str)]
    if missing or bad:
      raise TeacherDataError(f"{where}: missing {missing} / not strings {bad}; expected keys "
                             f"{list(FU2023_PICKLE_KEYS) + ['per_step_probs']}")
    question = _pickle_bare_question(row["question"], where)
    gold_answer = _gsm8k_gold_parts(row["answer_gold"], f"{where}.answer_gold")[1]
    gold = answers.parse_gold(gold_answer)
    answer = answers.extract_answer(row["answer"])
    meta = {"type": row["type"], "answer_label": row["answer_label"]}
    per_step_probs = _pickle_per_step_probs(row.get("per_step_probs"), where)
    if per_step_probs is not None:
      meta["per_step_probs"] = per_step_probs
    entry = grouped.setdefault(question, {"gold_answer": gold_answer, "gold": gold,
                                          "samples": []})
    entry["samples"].append(TeacherSample(text=row["answer"], answer=answer,
                                          correct=is_correct(answer, gold), meta=meta))
  records = []
  for k, (question, entry) in enumerate(grouped.items()):
    if question_ids is None:
      record_id = f"fu2023-pkl/train/{k}"
    elif question in question_ids:
      record_id = question_ids[question]
    else:
      raise TeacherDataError(f"{path}: question {question[:80]!r} is not among the "
                             f"{len(question_ids)} known questions; check the dataset, or import "
                             "without ids")
    records.append(TeacherRecord(
        id=record_id, source="gsm8k", split="train", question=question,
        gold_answer=entry["gold_answer"], gold_number=entry["gold"],
        samples=tuple(entry["samples"]), teacher=teacher,
        meta={"origin": f"FranxYao/FlanT5-CoT-Specialization processed data via {path.name}"}))
  return records


# The released teacher data the `specialize teacher_import` command reads, by its --from name.
RELEASED_FORMATS = ("fu2023_pickle", "fu2023_codex")


def import_released(src_format: str, src) -> Tuple[List[TeacherRecord], int]:
  """The records of released teacher data `src` in `src_format` (one of `RELEASED_FORMATS`) that
  may become training data, and how many records were dropped for being dev questions.

  The paper sampled all of GSM8K train; our dev split is carved out of it
  (`readers.gsm8k_dev_indices`, the original's own dev questions), and its questions must never become training data.
  """
  if src_format not in RELEASED_FORMATS:
    raise ConfigError(f"--from {src_format!r} is not a released teacher format; use one of "
                      f"{', '.join(RELEASED_FORMATS)}.")
  train = readers.read_gsm8k("train")
  if src_format == "fu2023_codex":
    records = records_from_fu2023_codex(src)
  else:
    records = records_from_fu2023_pickle(src, {e.question: e.id for e in train})
  dev_ids = {train[i].id for i in readers.gsm8k_dev_indices(len(train))}
  kept = [r for r in records if r.id not in dev_ids]
  return kept, len(records) - len(kept)
