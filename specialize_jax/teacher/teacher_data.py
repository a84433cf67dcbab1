"""Teacher data: a versioned JSON-lines schema for teacher chains of thought, with a validator.

Every teacher source (the GSM8K gold rationales, PaLM's SVAMP rationales, the paper's
code-davinci-002 samples, and later our own teacher client) is turned into this one format, so
filtering, formatting and tokenizer alignment read a single, checked layout. The builders for existing
sources live in `teacher_sources`.

Schema ``specialize_jax.teacher/1``
-----------------------------------
A file is UTF-8 text with one JSON object per line, one line per QUESTION, each line ending in
``\\n``. JSON has no NaN or Infinity: every number below must be finite. Ids are unique in a file.
Fields not listed here are errors (put free-form data under ``meta``).

Record (one per question)::

  {"schema": "specialize_jax.teacher/1",   # required, exactly this string
   "id": "gsm8k/train/0",                  # required, non-empty str, unique in the file
   "source": "gsm8k",                      # required, non-empty str: the dataset
   "split": "train",                       # required, non-empty str
   "question": "Natalia sold ...",         # required, str: the question as the teacher saw it
   "gold_answer": "72",                    # required, str: gold as the source writes it
                                           #   (GSM8K: text after "####"; SVAMP: the equation)
   "gold_number": 72.0,                    # required, number or null (non-numeric gold)
   "teacher": {"name": "code-davinci-002", # optional; omitted for human-written gold
               "api": "openai.completions",  #   optional str
               "params": {"temperature": 0.5}},  # optional object of sampling settings
   "meta": {...},                          # optional object: provenance, free-form
   "samples": [<sample>, ...]}             # required list (may be empty)

Sample (one teacher completion)::

  {"text": " step\\nIf Natalia ... The answer is 72\\n\\n",  # required str: the completion
   "answer": 72.0,                 # required, number or null: the answer extracted from text
   "correct": true,                # required, bool or null (null: gold_number is null)
   "tokens": [" step", "\\n", ...],  # optional list of str: the teacher's tokens, in order
   "logprobs": [0.0, -0.0139, ...],   # optional, one number <= 0 per token: log p(sampled token)
   "top_logprobs": [[[" step", 0.0], ["!", -10.6], ...], ...],
                                   # optional, one list per token of [token, logprob] pairs,
                                   #   at most 20 pairs per position (the API's top-k)
   "offsets": [0, 5, 6, ...],      # optional, one int per token: char offset of it in text,
                                   #   non-decreasing, 0 <= offset <= len(text)
   "finish_reason": "stop",        # optional str, as the API reported it
   "meta": {...}}                  # optional object

Key order is free. ``answer`` is the number read from ``text`` (``answers.extract_answer``
unless a builder documents its own rule); ``correct`` is ``answers.answers_match(answer,
gold_number)``, false when ``answer`` is null. Ids follow ``readers``: ``<source>/<split>/<index>``
(``gsm8k/train/17``), so teacher records join with dataset examples; a source's own split (not the
dataset's) gets its own prefix (``svamp-dsbs/train/3``).

``logprobs``, ``top_logprobs`` and ``offsets`` need ``tokens`` and must have its length. When tokens
are present they should concatenate to ``text``; a mismatch is a warning (byte-level BPE tokens may
split a UTF-8 character) that the alignment stage must handle.

Problems carry a severity: errors make ``read_records(strict=True)`` raise and ``strict=False`` skip
the line; warnings (token/text mismatch, ``correct`` disagreeing with answer vs gold, blank lines, a
truncated last line) are reported and the line is kept (or, if unreadable, ignored).

Crash safety: ``write_records`` writes a temp file beside the target and ``os.replace``-s it, so a
failure leaves the old file untouched. ``append_record`` appends one line with flush + fsync; a
crash can leave only the LAST line cut short, which readers report as a warning and ignore and
which the next ``append_record`` removes. A bad line anywhere else is corruption and an error.
"""
import collections
import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import pathlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from specialize_jax.data import answers
from specialize_jax.data import storage
from specialize_jax.errors import ConfigError
from specialize_jax.errors import UserError

SCHEMA = "specialize_jax.teacher/1"
MAX_TOP_LOGPROBS = 20
MAX_REPORTED_PROBLEMS = 20
ERROR = "error"
WARNING = "warning"
# The paper's codex files print probabilities to 4 decimals, so 0.0 means p < 5e-5; log(0) has no
# JSON form, so we store the log of the middle of that interval.
ROUNDED_ZERO_LOGPROB = math.log(2.5e-5)

_RECORD_REQUIRED = ("schema", "id", "source", "split", "question", "gold_answer", "gold_number",
                    "samples")
_RECORD_OPTIONAL = ("teacher", "meta")
_TEACHER_REQUIRED = ("name",)
_TEACHER_OPTIONAL = ("api", "params")
_SAMPLE_REQUIRED = ("text", "answer", "correct")
_SAMPLE_OPTIONAL = ("tokens", "logprobs", "top_logprobs", "offsets", "finish_reason", "meta")
_PER_TOKEN_FIELDS = ("logprobs", "top_logprobs", "offsets")


class TeacherDataError(UserError, ValueError):
  """Teacher data that breaks the schema; ``problems`` holds every problem found."""

  def __init__(self, message: str, problems: Sequence["Problem"] = ()):
    super().__init__(message)
    self.problems = tuple(problems)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One schema problem. ``line`` is 1-based (0: not tied to a line); ``field`` is a JSON path."""
  path: str
  line: int
  field: str
  message: str
  kind: str  # bad_json, missing_field, unknown_field, type, value, length_mismatch, schema_version,
             # duplicate_id, tokens_text_mismatch, answer_mismatch, blank_line, truncated_last_line
  severity: str = ERROR

  def __str__(self) -> str:
    where = f"{self.path}:{self.line}" if self.line else self.path
    return f"{where}: {self.field or '<line>'}: {self.severity}: {self.message}"


@dataclasses.dataclass(frozen=True)
class TeacherInfo:
  """Which model produced the samples, through which API, with which sampling settings."""
  name: str
  api: Optional[str] = None
  params: Optional[Dict[str, Any]] = None

  def to_json(self) -> Dict[str, Any]:
    out: Dict[str, Any] = {"name": self.name}
    if self.api is not None:
      out["api"] = self.api
    if self.params is not None:
      out["params"] = self.params
    return out


@dataclasses.dataclass(frozen=True)
class TeacherSample:
  """One teacher completion; per-token fields are None or tuples with one entry per token."""
  text: str
  answer: Optional[float]
  correct: Optional[bool]
  tokens: Optional[Tuple[str, ...]] = None
  logprobs: Optional[Tuple[float, ...]] = None
  top_logprobs: Optional[Tuple[Tuple[Tuple[str, float], ...], ...]] = None
  offsets: Optional[Tuple[int, ...]] = None
  finish_reason: Optional[str] = None
  meta: Optional[Dict[str, Any]] = None

  def to_json(self) -> Dict[str, Any]:
    out: Dict[str, Any] = {"text": self.text, "answer": self.answer, "correct": self.correct}
    if self.tokens is not None:
      out["tokens"] = list(self.tokens)
    if self.logprobs is not None:
      out["logprobs"] = list(self.logprobs)
    if self.top_logprobs is not None:
      out["top_logprobs"] = [[[tok, lp] for tok, lp in pos] for pos in self.top_logprobs]
    if self.offsets is not None:
      out["offsets"] = list(self.offsets)
    if self.finish_reason is not None:
      out["finish_reason"] = self.finish_reason
    if self.meta is not None:
      out["meta"] = self.meta
    return out

  @classmethod
  def from_json(cls, obj: Mapping[str, Any]) -> "TeacherSample":
    """Builds a sample from an already validated dict (use ``TeacherRecord.from_json`` to check)."""
    return cls(
        text=obj["text"], answer=_opt_float(obj["answer"]), correct=obj["correct"],
        tokens=_opt_tuple(obj, "tokens", str), logprobs=_opt_tuple(obj, "logprobs", float),
        top_logprobs=_opt_tuple(obj, "top_logprobs", _top_logprob_pairs),
        offsets=_opt_tuple(obj, "offsets", int), finish_reason=obj.get("finish_reason"),
        meta=obj.get("meta"))


def _opt_tuple(obj: Mapping[str, Any], name: str, convert) -> Optional[tuple]:
  value = obj.get(name)
  return None if value is None else tuple(map(convert, value))


def _top_logprob_pairs(position: Sequence[Sequence[Any]]) -> Tuple[Tuple[str, float], ...]:
  return tuple((str(token), float(logprob)) for token, logprob in position)


@dataclasses.dataclass(frozen=True)
class TeacherRecord:
  """One question with all its teacher samples (one line of a teacher-data file)."""
  id: str
  source: str
  split: str
  question: str
  gold_answer: str
  gold_number: Optional[float]
  samples: Tuple[TeacherSample, ...]
  teacher: Optional[TeacherInfo] = None
  meta: Optional[Dict[str, Any]] = None

  def to_json(self) -> Dict[str, Any]:
    out: Dict[str, Any] = {"schema": SCHEMA, "id": self.id, "source": self.source,
                           "split": self.split, "question": self.question,
                           "gold_answer": self.gold_answer, "gold_number": self.gold_number}
    if self.teacher is not None:
      out["teacher"] = self.teacher.to_json()
    if self.meta is not None:
      out["meta"] = self.meta
    out["samples"] = [s.to_json() for s in self.samples]
    return out

  @classmethod
  def from_json(cls, obj: Any) -> "TeacherRecord":
    """Validates ``obj`` against the schema; raises ``TeacherDataError`` naming every bad field."""
    where = f"record {obj.get('id')!r}" if isinstance(obj, dict) else "record"
    problems = [dataclasses.replace(p, path=where) for p in _record_problems(obj)
                if p.severity == ERROR]
    if problems:
      raise TeacherDataError(_format_problems(where, problems), problems)
    return cls._from_valid_json(obj)

  @classmethod
  def _from_valid_json(cls, obj: Mapping[str, Any]) -> "TeacherRecord":
    teacher = obj.get("teacher")
    return cls(
        id=obj["id"], source=obj["source"], split=obj["split"], question=obj["question"],
        gold_answer=obj["gold_answer"], gold_number=_opt_float(obj["gold_number"]),
        samples=tuple(TeacherSample.from_json(s) for s in obj["samples"]),
        teacher=None if teacher is None else TeacherInfo(
            name=teacher["name"], api=teacher.get("api"), params=teacher.get("params")),
        meta=obj.get("meta"))


@dataclasses.dataclass(frozen=True)
class ReadResult:
  """Records read from a file, plus what was not read and why."""
  records: Tuple[TeacherRecord, ...]
  problems: Tuple[Problem, ...]  # warnings always; errors only when strict=False
  skipped_lines: int  # lines that gave no record: bad (strict=False), blank, truncated tail
  truncated_last_line: bool


# ----------------------------------------------------------------------------- validation

def _opt_float(value: Any) -> Optional[float]:
  return None if value is None else float(value)


def _type_name(value: Any) -> str:
  return {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null",
          int: "number", float: "number"}.get(type(value), type(value).__name__)


def is_correct(answer: Optional[float], gold: Optional[float]) -> Optional[bool]:
  """The project's answer comparison (answers.answers_match); None when there is no gold number."""
  return None if gold is None else answers.answers_match(answer, gold)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def _problem(kind: str, field: str, message: str, severity: str = ERROR) -> Problem:
  return Problem(path="", line=0, field=field, message=message, kind=kind, severity=severity)


@functools.lru_cache(maxsize=None)
def _key_sets(required: Tuple[str, ...], optional: Tuple[str, ...]) -> Tuple[frozenset, frozenset]:
  return frozenset(required), frozenset(required + optional)


def _check_keys(obj: Mapping[str, Any], required: Tuple[str, ...], optional: Tuple[str, ...],
                prefix: str, out: List[Problem]) -> None:
  required_set, allowed_set = _key_sets(required, optional)
  if required_set <= obj.keys() <= allowed_set:  # The common case: nothing to report.
    return
  allowed = required + optional
  for name in required:
    if name not in obj:
      out.append(_problem("missing_field", _join(prefix, name),
                          f"missing required field {name!r}; add it (see the schema in "
                          "specialize_jax/teacher/teacher_data.py)"))
  for name in obj:
    if name not in allowed:
      close = difflib.get_close_matches(str(name), allowed, n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      out.append(_problem("unknown_field", _join(prefix, str(name)),
                          f"unknown field {name!r} in {SCHEMA}; {hint}allowed: "
                          f"{', '.join(allowed)}; put free-form data under 'meta'"))


def _check_value(obj: Mapping[str, Any], name: str, prefix: str, out: List[Problem], ok,
                 expected: str) -> bool:
  """Appends a type problem when ``obj[name]`` is present and ``ok`` rejects it."""
  if name not in obj or ok(obj[name]):
    return name in obj
  out.append(_problem("type", _join(prefix, name),
                      f"expected {expected}, got {_type_name(obj[name])} {_short(obj[name])}"))
  return False


def _short(value: Any) -> str:
  text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _check_list(values: Sequence[Any], field: str, ok, expected: str, out: List[Problem]) -> None:
  """Reports the first bad element of a list (and how many more), not one problem per element."""
  bad = [i for i, v in enumerate(values) if not ok(v)]
  if bad:
    more = f" ({len(bad) - 1} more bad entries)" if len(bad) > 1 else ""
    out.append(_problem("type", f"{field}[{bad[0]}]", f"expected {expected}, got "
                        f"{_type_name(values[bad[0]])} {_short(values[bad[0]])}{more}"))


def _is_top_logprob_position(pos: Any) -> bool:
  return (isinstance(pos, list) and len(pos) <= MAX_TOP_LOGPROBS and
          all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and
              _is_number(pair[1]) and pair[1] <= 0 for pair in pos))


def _is_str(value: Any) -> bool:
  return isinstance(value, str)


def _is_nonempty_str(value: Any) -> bool:
  return isinstance(value, str) and bool(value)


def _is_dict(value: Any) -> bool:
  return isinstance(value, dict)


def _is_list(value: Any) -> bool:
  return isinstance(value, list)


def _is_number_or_none(value: Any) -> bool:
  return value is None or _is_number(value)


def _is_bool_or_none(value: Any) -> bool:
  return value is None or isinstance(value, bool)


def _is_logprob(value: Any) -> bool:
  return _is_number(value) and value <= 0


def _is_offset(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# A sample's optional lists: (field, element check, what an element must be).
_SAMPLE_LISTS = (
    ("tokens", _is_str, "a string"),
    ("logprobs", _is_logprob, "a finite number <= 0"),
    ("top_logprobs", _is_top_logprob_position,
     f"an array of at most {MAX_TOP_LOGPROBS} [token, logprob <= 0] pairs"),
    ("offsets", _is_offset, "an int >= 0"))


def _record_problems(obj: Any) -> List[Problem]:
  """Every schema problem of one parsed line (paths relative to the record, line left 0)."""
  out: List[Problem] = []
  if not isinstance(obj, dict):
    return [_problem("type", "", f"a record must be a JSON object, got {_type_name(obj)}")]
  if "schema" not in obj:
    return [_problem("missing_field", "schema",
                     f"missing field 'schema'; add \"schema\": \"{SCHEMA}\" to every line")]
  if obj["schema"] != SCHEMA:
    return [_problem("schema_version", "schema",
                     f"schema {_short(obj['schema'])} is not supported; this reader supports only "
                     f"{SCHEMA!r}: convert the file, or read it with the version that wrote it")]
  _check_keys(obj, _RECORD_REQUIRED, _RECORD_OPTIONAL, "", out)
  for name in ("id", "source", "split"):
    _check_value(obj, name, "", out, _is_nonempty_str, "a non-empty string")
  for name in ("question", "gold_answer"):
    _check_value(obj, name, "", out, _is_str, "a string")
  _check_value(obj, "gold_number", "", out, _is_number_or_none, "a finite number or null")
  _check_value(obj, "meta", "", out, _is_dict, "an object")
  if _check_value(obj, "teacher", "", out, _is_dict, "an object"):
    teacher = obj["teacher"]
    _check_keys(teacher, _TEACHER_REQUIRED, _TEACHER_OPTIONAL, "teacher", out)
    _check_value(teacher, "name", "teacher", out, _is_nonempty_str, "a non-empty string")
    _check_value(teacher, "api", "teacher", out, _is_str, "a string")
    _check_value(teacher, "params", "teacher", out, _is_dict, "an object")
  gold = obj.get("gold_number") if _is_number(obj.get("gold_number")) else None
  if _check_value(obj, "samples", "", out, _is_list, "an array"):
    for i, sample in enumerate(obj["samples"]):
      _sample_problems(sample, f"samples[{i}]", gold, out)
  return out


def _sample_problems(sample: Any, p: str, gold: Optional[float], out: List[Problem]) -> None:
  if not isinstance(sample, dict):
    out.append(_problem("type", p, f"a sample must be a JSON object, got {_type_name(sample)}"))
    return
  _check_keys(sample, _SAMPLE_REQUIRED, _SAMPLE_OPTIONAL, p, out)
  has_text = _check_value(sample, "text", p, out, _is_str, "a string")
  text = sample["text"] if has_text else None
  _check_value(sample, "answer", p, out, _is_number_or_none, "a finite number or null")
  _check_value(sample, "correct", p, out, _is_bool_or_none, "true, false or null")
  _check_value(sample, "finish_reason", p, out, _is_str, "a string")
  _check_value(sample, "meta", p, out, _is_dict, "an object")
  answer, correct = sample.get("answer"), sample.get("correct")
  if gold is not None and _is_number(answer) and isinstance(correct, bool):
    if correct != is_correct(answer, gold):
      out.append(_problem("answer_mismatch", f"{p}.correct",
                          f"correct={json.dumps(correct)} but answer {answer} vs gold_number "
                          f"{gold}; recompute 'correct' or check the scoring rule", WARNING))
  lists = {}
  for name, ok, expected in _SAMPLE_LISTS:
    if name in sample and _check_value(sample, name, p, out, _is_list, "an array"):
      _check_list(sample[name], f"{p}.{name}", ok, expected, out)
      lists[name] = sample[name]
  tokens = lists.get("tokens")
  for name in _PER_TOKEN_FIELDS:
    if name not in lists:
      continue
    if tokens is None and "tokens" not in sample:
      out.append(_problem("missing_field", f"{p}.tokens",
                          f"{p}.{name} is per token but {p}.tokens is missing; add the tokens"))
    elif tokens is not None and len(lists[name]) != len(tokens):
      out.append(_problem("length_mismatch", f"{p}.{name}",
                          f"has {len(lists[name])} entries but {p}.tokens has {len(tokens)}; "
                          "per-token fields need exactly one entry per token"))
  if text is None or tokens is None or not all(isinstance(t, str) for t in tokens):
    return
  joined = "".join(tokens)
  if joined != text:
    at = next((i for i, (a, b) in enumerate(zip(joined, text)) if a != b),
              min(len(joined), len(text)))
    out.append(_problem("tokens_text_mismatch", f"{p}.tokens",
                        f"tokens join to {len(joined)} chars but text has {len(text)}; first "
                        f"difference at char {at}: {joined[at:at + 12]!r} vs {text[at:at + 12]!r}",
                        WARNING))
  offsets = lists.get("offsets")
  if offsets is not None and len(offsets) == len(tokens) and all(
      isinstance(o, int) for o in offsets):
    if any(b < a for a, b in zip(offsets, offsets[1:])) or any(o > len(text) for o in offsets):
      out.append(_problem("value", f"{p}.offsets",
                          f"offsets must be non-decreasing and <= len(text)={len(text)}"))
    else:
      bad = [j for j, (o, t) in enumerate(zip(offsets, tokens)) if text[o:o + len(t)] != t]
      if bad:
        out.append(_problem("tokens_text_mismatch", f"{p}.offsets[{bad[0]}]",
                            f"text at offset {offsets[bad[0]]} is not token "
                            f"{tokens[bad[0]]!r} ({len(bad)} such tokens)", WARNING))


def _reject_constant(name: str) -> Any:
  raise ValueError(f"non-finite number {name}; JSON has no NaN/Infinity, write null or a "
                   "finite value")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _parse_line(text: str) -> Any:
  """`json.loads(text, parse_constant=_reject_constant)` without building a decoder per line."""
  if text.startswith("\ufeff"):
    raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
  return _DECODER.decode(text)


def _scan(path: str) -> Iterator[Tuple[int, Optional[Dict[str, Any]], List[Problem]]]:
  """Yields (line number, parsed record or None, problems with file and line filled in)."""
  first_line_of_id: Dict[str, int] = {}
  where = str(path)
  with storage.open_file(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      locate = lambda p: dataclasses.replace(p, path=where, line=lineno)
      complete = raw.endswith(b"\n")
      body = raw.rstrip(b"\r\n")
      if not body.strip():
        yield lineno, None, [locate(_problem("blank_line", "", "blank line ignored", WARNING))]
        continue
      try:
        obj = _parse_line(body.decode("utf-8"))
      except (UnicodeDecodeError, ValueError) as e:
        if not complete:  # Only the last line can lack "\n": a crash cut the final append short.
          problem = _problem("truncated_last_line", "",
                             f"last line is cut short ({len(body)} bytes, no newline; {e}), as "
                             "after a crash mid-append; ignored (append_record removes it)",
                             WARNING)
        else:
          problem = _problem("bad_json", "", f"not valid JSON: {e}; fix or delete this line")
        yield lineno, None, [locate(problem)]
        continue
      problems = [locate(p) for p in _record_problems(obj)]
      record_id = obj.get("id") if isinstance(obj, dict) else None
      if isinstance(record_id, str):
        if record_id in first_line_of_id:
          problems.append(locate(_problem(
              "duplicate_id", "id", f"duplicate id {record_id!r} (first on line "
              f"{first_line_of_id[record_id]}); ids must be unique in a file: drop or rename one")))
        else:
          first_line_of_id[record_id] = lineno
      yield lineno, obj, problems


def _format_problems(where: str, problems: Sequence[Problem],
                     num_lines: Optional[int] = None) -> str:
  """One message for many problems: totals, counts per kind, then the first few, one per line."""
  counts = collections.Counter(p.kind for p in problems)
  kinds = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
  if num_lines is None:  # One in-memory record.
    head = (f"{where}: {len(problems)} schema errors ({kinds}); fix the record (schema "
            f"{SCHEMA} is documented in specialize_jax/teacher/teacher_data.py).")
  else:
    head = (f"{where}: {len(problems)} schema errors on {len({p.line for p in problems})} of "
            f"{num_lines} lines ({kinds}); fix them, or read with strict=False to skip bad "
            f"lines. Schema {SCHEMA} is documented in specialize_jax/teacher/teacher_data.py.")
  shown = [f"  {p}" for p in problems[:MAX_REPORTED_PROBLEMS]]
  if len(problems) > MAX_REPORTED_PROBLEMS:
    shown.append(f"  ... and {len(problems) - MAX_REPORTED_PROBLEMS} more")
  return "\n".join([head] + shown)


def validate_file(path) -> List[Problem]:
  """Every problem in a teacher-data file (errors and warnings), in line order."""
  path = _existing(path)
  problems: List[Problem] = []
  for _, _, line_problems in _scan(path):
    problems.extend(line_problems)
  return problems


def _existing(path) -> str:
  path = os.fspath(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f"Teacher-data file {path} does not exist; check the path (write one "
                            "with write_records or a records_from_* builder).")
  return path


def read_records(path, strict: bool = True) -> ReadResult:
  """Reads a file. strict: raise ``TeacherDataError`` listing all errors; else skip bad lines."""
  path = _existing(path)
  records: List[TeacherRecord] = []
  kept: List[Problem] = []
  errors: List[Problem] = []
  skipped = 0
  truncated = False
  num_lines = 0
  for num_lines, obj, problems in _scan(path):
    line_errors = [p for p in problems if p.severity == ERROR]
    errors.extend(line_errors)
    kept.extend(p for p in problems if p.severity == WARNING or not strict)
    truncated = truncated or any(p.kind == "truncated_last_line" for p in problems)
    if obj is None or line_errors:
      skipped += 1
    elif not (strict and errors):  # Strict mode stops building records at the first error.
      records.append(TeacherRecord._from_valid_json(obj))  # pylint: disable=protected-access
  if strict and errors:
    raise TeacherDataError(_format_problems(str(path), errors, num_lines), errors)
  if kept:
    logging.getLogger(__name__).warning("%s: %d problems, %d lines skipped, first: %s", path,
                                        len(kept), skipped, kept[0])
  return ReadResult(records=tuple(records), problems=tuple(kept), skipped_lines=skipped,
                    truncated_last_line=truncated)


def iter_records(path) -> Iterator[TeacherRecord]:
  """The records of a file one at a time (memory: one record), for files too big to hold; raises
  ``TeacherDataError`` naming file and line at the first invalid line (warnings are logged)."""
  path = _existing(path)
  for lineno, obj, problems in _scan(path):
    errors = [p for p in problems if p.severity == ERROR]
    if errors:
      raise TeacherDataError(_format_problems(str(path), errors), errors)
    for problem in problems:
      logging.getLogger(__name__).warning("%s", problem)
    if obj is not None:
      yield TeacherRecord._from_valid_json(obj)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- writing

def _record_line(record: TeacherRecord, where: str) -> str:
  obj = record.to_json()
  errors = [dataclasses.replace(p, path=where) for p in _record_problems(obj)
            if p.severity == ERROR]
  if errors:
    raise TeacherDataError(_format_problems(where, errors), errors)
  return json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"


def write_records(path, records: Iterable[TeacherRecord]) -> int:
  """Writes all records atomically (temp file + ``os.replace``); returns how many were written.

  If validation or the ``records`` iterator fails, the temp file is removed and ``path`` keeps its
  old content (or stays absent).
  """
  path = os.fspath(path)
  count = 0
  seen: Dict[str, int] = {}
  with storage.atomic_write(path) as f:
    for count, record in enumerate(records, 1):
      where = f"{path} (record {count}, id {record.id!r})"
      if record.id in seen:
        raise TeacherDataError(f"{where}: duplicate id, already record {seen[record.id]}; ids "
                               "must be unique in a file")
      seen[record.id] = count
      f.write(_record_line(record, where))
  return count


def append_record(path, record: TeacherRecord) -> None:
  """Appends one record durably (flush + fsync), first removing a crash-truncated last line.

  Does not check id uniqueness (that would re-read the file each time): a resumable writer reads
  the file once with ``read_records(path, strict=False)`` and skips ids it already has.
  """
  if storage.is_url(path):
    raise ConfigError(f"{path}: appending (one durable line per teacher response) needs a local "
                      "file; write the teacher file locally and copy it to the bucket when done.")
  path = pathlib.Path(path)  # local: not a URL (above)
  line = _record_line(record, f"{path} (appending id {record.id!r})").encode("utf-8")
  created = not path.exists()
  with open(path, "ab") as f:  # local: not a URL (above)
    _drop_unterminated_tail(path, f)
    f.write(line)
    f.flush()
    os.fsync(f.fileno())
  if created:
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def _drop_unterminated_tail(path: pathlib.Path, f) -> None:
  """Makes the file end in a newline: terminates a complete last record, truncates a partial one."""
  size = f.seek(0, os.SEEK_END)
  if size == 0:
    return
  with open(path, "rb") as reader:  # local: append_record's file
    reader.seek(max(0, size - 1))
    if reader.read(1) == b"\n":
      return
    # Find the start of the unterminated tail, reading backwards in blocks.
    start, block = size, 1 << 16
    while start > 0:
      lo = max(0, start - block)
      reader.seek(lo)
      chunk = reader.read(start - lo)
      cut = chunk.rfind(b"\n")
      if cut >= 0:
        start = lo + cut + 1
        break
      start = lo
    reader.seek(start)
    tail = reader.read()
  try:
    _parse_line(tail.decode("utf-8"))
    f.write(b"\n")
  except (UnicodeDecodeError, ValueError):
    logging.getLogger(__name__).warning(
        "%s: removing a truncated last line (%d bytes) left by an interrupted append", path,
        len(tail))
    f.truncate(start)


# ----------------------------------------------------------------------------- summary

def summarize(records: Iterable[TeacherRecord]) -> Dict[str, Any]:
  """Counts and accuracies; majority vote over each question's extracted answers (ties: first)."""
  questions = samples = scored = correct = per_token = top = with_correct = 0
  votable = majority_correct = 0
  for record in records:
    questions += 1
    samples += len(record.samples)
    scored += sum(s.correct is not None for s in record.samples)
    num_correct = sum(s.correct is True for s in record.samples)
    correct += num_correct
    with_correct += num_correct > 0
    per_token += sum(s.tokens is not None and s.logprobs is not None for s in record.samples)
    top += sum(s.top_logprobs is not None for s in record.samples)
    if record.gold_number is not None:
      votable += 1
      votes = collections.Counter(round(s.answer, 6) for s in record.samples
                                  if s.answer is not None)
      if votes:
        majority_correct += bool(is_correct(votes.most_common(1)[0][0], record.gold_number))
  return {
      "questions": questions, "samples": samples, "scored_samples": scored,
      "correct_samples": correct,
      "per_sample_accuracy": correct / scored if scored else None,
      "majority_vote_accuracy": majority_correct / votable if votable else None,
      "questions_with_a_correct_sample": with_correct,
      "samples_with_per_token_data": per_token, "samples_with_top_logprobs": top,
  }
