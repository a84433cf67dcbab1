"""Filtering teacher samples into training chains, reporting what was dropped.

Terms:
  kept sample: a sample whose text has an answer line (a line containing ``answer is``), whose
    number read from the text cut after that line equals the gold number, and whose per-token
    fields (when present) still describe the cut text.
  cut: as the original, the text up to the end of its first ``answer is`` line, stripped
    (``formats.cut_after_answer_line``). Per-token fields are cut with it: tokens wholly outside
    the cut are dropped and the (whitespace-only) parts of the first and last tokens that fall
    outside it are trimmed, keeping those tokens' log-probabilities ("trimmed boundary tokens").
  drop reasons (checked in this order, one per dropped sample):
    ``empty`` (blank text), ``no_answer_line``, ``no_answer`` (answer line without a number),
    ``no_gold`` (the record has no gold number), ``incorrect``, ``tokens_text_mismatch`` (the
    tokens do not join to the text, e.g. byte-level pieces of a UTF-8 character, so the cut
    cannot be mapped onto them; such a sample would feed wrong distributions to the alignment).

A record with no kept sample is left out of the filtered output and counted in
``questions_without_kept_sample``.
"""
import collections
import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Tuple

from specialize_jax.data import answers
from specialize_jax.data import formats
from specialize_jax.teacher.teacher_data import TeacherRecord
from specialize_jax.teacher.teacher_data import TeacherSample
from specialize_jax.teacher.teacher_data import is_correct

DROP_REASONS = ("empty", "no_answer_line", "no_answer", "no_gold", "incorrect",
                "tokens_text_mismatch")


def _cut_span(text: str) -> Optional[Tuple[int, int]]:
  """``(start, end)`` with ``text[start:end] == formats.cut_after_answer_line(text)``, or None."""
  cut = formats.cut_after_answer_line(text)
  if cut is None:
    return None
  start = len(text) - len(text.lstrip())
  return start, start + len(cut)


def _cut_tokens(sample: TeacherSample, start: int,
                end: int) -> Tuple[Dict[str, Any], int]:
  """Per-token fields restricted to ``text[start:end]`` and how many boundary tokens were trimmed.

  Requires ``"".join(sample.tokens) == sample.text``.
  """
  keep, trimmed, new_tokens, new_offsets = [], 0, [], []
  at = 0
  for i, token in enumerate(sample.tokens):
    lo, hi = at, at + len(token)
    at = hi
    if hi <= start or lo >= end or not token:
      continue
    piece = token[max(start, lo) - lo:min(end, hi) - lo]
    trimmed += piece != token
    keep.append(i)
    new_tokens.append(piece)
    new_offsets.append(max(start, lo) - start)
  fields: Dict[str, Any] = {"tokens": tuple(new_tokens)}
  if sample.logprobs is not None:
    fields["logprobs"] = tuple(sample.logprobs[i] for i in keep)
  if sample.top_logprobs is not None:
    fields["top_logprobs"] = tuple(sample.top_logprobs[i] for i in keep)
  if sample.offsets is not None:
    fields["offsets"] = tuple(new_offsets)
  return fields, trimmed


def filter_sample(sample: TeacherSample, gold: Optional[float]
                  ) -> Tuple[Optional[TeacherSample], Optional[str], int]:
  """``(kept sample or None, drop reason or None, trimmed boundary tokens)`` for one sample."""
  if not sample.text.strip():
    return None, "empty", 0
  span = _cut_span(sample.text)
  if span is None:
    return None, "no_answer_line", 0
  text = sample.text[span[0]:span[1]]
  answer = answers.extract_answer(text)
  if answer is None:
    return None, "no_answer", 0
  if gold is None:
    return None, "no_gold", 0
  if not is_correct(answer, gold):
    return None, "incorrect", 0
  fields: Dict[str, Any] = {}
  trimmed = 0
  if sample.tokens is not None:
    if "".join(sample.tokens) != sample.text:
      return None, "tokens_text_mismatch", 0
    fields, trimmed = _cut_tokens(sample, *span)
  kept = dataclasses.replace(sample, text=text, answer=answer, correct=True, **fields)
  return kept, None, trimmed


@dataclasses.dataclass
class FilterReport:
  """Counts of a filtering pass; ``dropped`` has one count per reason in ``DROP_REASONS``."""
  questions_in: int = 0
  questions_kept: int = 0
  questions_without_kept_sample: int = 0
  samples_in: int = 0
  samples_kept: int = 0
  trimmed_boundary_tokens: int = 0
  dropped: Dict[str, int] = dataclasses.field(
      default_factory=lambda: {reason: 0 for reason in DROP_REASONS})

  def to_json(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    out["kept_share"] = self.samples_kept / self.samples_in if self.samples_in else None
    return out


def filter_records(records: Iterable[TeacherRecord]
                   ) -> Tuple[List[TeacherRecord], FilterReport]:
  """Keeps the correct, cut samples of every record (see the module docstring) and reports why
  the others were dropped. Records keep their order; records with no kept sample are left out."""
  report = FilterReport()
  reasons: collections.Counter = collections.Counter()
  kept_records = []
  for record in records:
    report.questions_in += 1
    kept = []
    for sample in record.samples:
      report.samples_in += 1
      new_sample, reason, trimmed = filter_sample(sample, record.gold_number)
      report.trimmed_boundary_tokens += trimmed
      if new_sample is None:
        reasons[reason] += 1
      else:
        kept.append(new_sample)
    report.samples_kept += len(kept)
    if kept:
      report.questions_kept += 1
      kept_records.append(dataclasses.replace(record, samples=tuple(kept)))
    else:
      report.questions_without_kept_sample += 1
  report.dropped.update(reasons)
  return kept_records, report
