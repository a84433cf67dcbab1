"""Teacher-data sources: builders that turn existing teacher outputs into schema records.

- `records_from_gsm8k_gold`: GSM8K gold rationales, one "sample" per question (a teacher that is
  always right; the default training data until real teacher samples exist).
- `records_from_palm_svamp`: PaLM-540B few-shot CoT rationales on SVAMP (distilling step-by-step).
- `records_from_fu2023_codex`: the paper's code-davinci-002 samples with per-token top-5.

The schema, validator and writers live in `teacher_data`.
"""
import ast
import glob
import json
import math
import operator
import os
import pathlib
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from specialize_jax.data import answers
from specialize_jax.data import readers
from specialize_jax.data.teacher_data import ROUNDED_ZERO_LOGPROB
from specialize_jax.data.teacher_data import TeacherDataError
from specialize_jax.data.teacher_data import TeacherInfo
from specialize_jax.data.teacher_data import TeacherRecord
from specialize_jax.data.teacher_data import TeacherSample
from specialize_jax.data.teacher_data import is_correct

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
  ``1,200``): METHOD.md §2's ``{cot}``, equal to ``formats.cot_target`` of the same question. Ids
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

