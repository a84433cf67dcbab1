"""Aligned teacher data: the `specialize_jax.aligned/1` JSON-lines schema, its reader and writer.

`specialize align` (module `alignment`) writes these files; the top-k distillation tasks read them
(`teacher_features`). One line per CoT training sample.

Schema ``specialize_jax.aligned/1`` (JSONL, one line per CoT training sample: correct, with an answer
line; written atomically)::

  {"schema": "specialize_jax.aligned/1", "id": "gsm8k/train/0", "sample_index": 0,
   "question": str, "gold_answer": str, "target": str, "target_ids": [int, ...],   # no EOS
   "topk_ids": [[int, ...], ...],       # one row per target id, 1..k ids, row t predicts target_ids[t]
   "topk_logprobs": [[float, ...], ...],  # same shape, natural log, finite, <= 0
   "kept": int,                         # rows carrying a teacher distribution
   "meta": {...}}                       # optional object
"""
import dataclasses
import itertools
import json
import math
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from specialize_jax.data import storage
from specialize_jax.errors import UserError

SCHEMA = "specialize_jax.aligned/1"
_REQUIRED = ("schema", "id", "sample_index", "question", "gold_answer", "target", "target_ids",
             "topk_ids", "topk_logprobs", "kept")
_OPTIONAL = ("meta",)


class AlignedDataError(UserError, ValueError):
  """An aligned file or row that breaks ``specialize_jax.aligned/1``."""


@dataclasses.dataclass(frozen=True)
class AlignedRow:
  """One CoT training sample with its per-target-token teacher distribution."""
  id: str
  sample_index: int
  question: str
  gold_answer: str
  target: str
  target_ids: Tuple[int, ...]
  topk_ids: Tuple[Tuple[int, ...], ...]
  topk_logprobs: Tuple[Tuple[float, ...], ...]
  kept: int
  meta: Optional[Dict[str, Any]] = None

  def to_json(self) -> Dict[str, Any]:
    out = {"schema": SCHEMA, "id": self.id, "sample_index": self.sample_index,
           "question": self.question, "gold_answer": self.gold_answer, "target": self.target,
           "target_ids": list(self.target_ids), "topk_ids": [list(r) for r in self.topk_ids],
           "topk_logprobs": [list(r) for r in self.topk_logprobs], "kept": self.kept}
    if self.meta is not None:
      out["meta"] = self.meta
    return out


def row_line(row: AlignedRow) -> str:
  return json.dumps(row.to_json(), ensure_ascii=False, allow_nan=False) + "\n"


def write_aligned(path, rows: Iterable[AlignedRow]) -> int:
  """Writes rows atomically (temp file + ``os.replace``) after validating each; returns the count."""
  count = 0
  with storage.atomic_write(path) as f:
    for count, row in enumerate(rows, 1):
      obj = row.to_json()
      problem = _row_problem(obj)
      if problem:
        raise AlignedDataError(f"{path} (row {count}, id {row.id!r}): {problem[0]}: {problem[1]}")
      f.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
  return count


def read_aligned(path) -> List[AlignedRow]:
  """Reads and validates an aligned file; a bad line raises naming ``file:line: field``."""
  return list(iter_aligned(path))


def iter_aligned(path) -> Iterator[AlignedRow]:
  """`read_aligned` one row at a time, so a large file can be converted while it is read."""
  path = os.fspath(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f"aligned file {path} does not exist; write it with `specialize align`")
  with storage.open_file(path) as f:
    for lineno, line in enumerate(f, 1):
      try:
        obj = json.loads(line, parse_constant=_reject_constant)
      except ValueError as e:
        raise AlignedDataError(f"{path}:{lineno}: <line>: not valid JSON ({e}); rewrite the file "
                               "with `specialize align`") from e
      problem = _row_problem(obj)
      if problem:
        raise AlignedDataError(f"{path}:{lineno}: {problem[0]}: {problem[1]}")
      yield AlignedRow(
          id=obj["id"], sample_index=obj["sample_index"], question=obj["question"],
          gold_answer=obj["gold_answer"], target=obj["target"],
          target_ids=tuple(obj["target_ids"]), topk_ids=tuple(tuple(r) for r in obj["topk_ids"]),
          topk_logprobs=tuple(tuple(float(x) for x in r) for r in obj["topk_logprobs"]),
          kept=obj["kept"], meta=obj.get("meta"))


def _reject_constant(name: str):
  raise ValueError(f"non-finite number {name}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_logprob(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and value <= 0)


def _row_problem(obj: Any) -> Optional[Tuple[str, str]]:
  """``(field, message)`` of the first schema problem of one parsed row, or None."""
  if not isinstance(obj, Mapping):
    return "<line>", f"a row must be a JSON object (schema {SCHEMA})"
  if obj.get("schema") != SCHEMA:
    return "schema", f"expected {SCHEMA!r}, got {obj.get('schema')!r}"
  for name in _REQUIRED:
    if name not in obj:
      return name, "missing required field"
  for name in obj:
    if name not in _REQUIRED + _OPTIONAL:
      return name, f"unknown field; allowed: {', '.join(_REQUIRED + _OPTIONAL)}"
  for name in ("id", "question", "gold_answer", "target"):
    if not isinstance(obj[name], str):
      return name, "expected a string"
  if not obj["id"]:
    return "id", "expected a non-empty string"
  if not _is_int(obj["sample_index"]) or obj["sample_index"] < 0:
    return "sample_index", "expected an int >= 0"
  target_ids = obj["target_ids"]
  if not isinstance(target_ids, list) or not all(_is_int(t) and t >= 0 for t in target_ids):
    return "target_ids", "expected a list of ints >= 0"
  if not _rows_look_valid(obj["topk_ids"], obj["topk_logprobs"], len(target_ids)):
    return _rows_problem(obj, target_ids)
  return _tail_problem(obj, target_ids)


def _rows_look_valid(topk_ids: Any, topk_logprobs: Any, num_targets: int) -> bool:
  """The rows' checks of `_rows_problem` in bulk (C-level passes over the flattened rows, ~5x
  faster on paper-size files); False sends the row to `_rows_problem` for the exact message."""
  for rows in (topk_ids, topk_logprobs):
    if type(rows) is not list or len(rows) != num_targets:  # pylint: disable=unidiomatic-typecheck
      return False
    if set(map(type, rows)) - {list} or not all(rows):
      return False
  if list(map(len, topk_ids)) != list(map(len, topk_logprobs)):
    return False
  ids = list(itertools.chain.from_iterable(topk_ids))
  logprobs = list(itertools.chain.from_iterable(topk_logprobs))
  if not ids:
    return True
  return (not set(map(type, ids)) - {int} and min(ids) >= 0 and
          not set(map(type, logprobs)) - {int, float} and max(logprobs) <= 0 and
          min(logprobs) > -math.inf)


def _rows_problem(obj: Mapping[str, Any], target_ids: list) -> Optional[Tuple[str, str]]:
  for name, ok, what in (("topk_ids", lambda v: _is_int(v) and v >= 0, "ints >= 0"),
                         ("topk_logprobs", _is_logprob, "finite numbers <= 0")):
    value = obj[name]
    if not isinstance(value, list) or len(value) != len(target_ids):
      return name, f"expected one row per target id ({len(target_ids)} rows)"
    for t, row in enumerate(value):
      if not isinstance(row, list) or not row or not all(ok(v) for v in row):
        return f"{name}[{t}]", f"expected a non-empty list of {what}"
  for t, (ids, lps) in enumerate(zip(obj["topk_ids"], obj["topk_logprobs"])):
    if len(ids) != len(lps):
      return f"topk_logprobs[{t}]", f"has {len(lps)} entries but topk_ids[{t}] has {len(ids)}"
  return _tail_problem(obj, target_ids)


def _tail_problem(obj: Mapping[str, Any], target_ids: list) -> Optional[Tuple[str, str]]:
  kept = obj["kept"]
  if not _is_int(kept) or not 0 <= kept <= len(target_ids):
    return "kept", f"expected an int in [0, {len(target_ids)}]"
  if "meta" in obj and not isinstance(obj["meta"], dict):
    return "meta", "expected an object"
  return None
