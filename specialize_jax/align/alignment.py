"""Cross-tokenizer alignment: the teacher's per-token top-k moved onto the student's pieces.

docs/method.md. The teacher (GPT byte-level BPE) and the student (T5 SentencePiece) cut the same text
into different tokens, so a teacher distribution at teacher position j has to be re-homed onto a
student position i before it can be a distillation target.

Terms:
- *teacher tokens* a_1..a_n: the sampled tokens of one teacher sample that overlap its *target span*.
- *target*: the student's CoT target, ``formats.cut_after_answer_line`` of the completion (stripped)
  after dropping a leading *trigger tail* (a first line such as ``" step"`` that finishes the prompt's
  ``Let's think step by step``; the paper's ``per_step_prob[2:-2]`` dropped it the same way).
- *student pieces* b_1..b_m: ``SentencePiece.encode(target)`` (no EOS).
- *core* of a string: the string without whitespace and without the ``▁`` marker. The DTW cost of a
  pair is the edit distance of their cores (``paper`` mode: only ``' '`` removed from the teacher
  token and ``▁`` from the piece, exactly the original's ``dist_fn``).
- *DTW*: ``D[i][j] = cost(a_i, b_j) + min(D[i-1][j], D[i][j-1], D[i-1][j-1])``, backtracked from
  ``(n, m)`` with ties broken diagonal, then up, then left; each student piece gets the sorted list
  of teacher positions on the path at its column (``aligned[i]``).
- *kept* position: a student position that carries a teacher distribution; every other position is
  *one-hot* on the student's own piece (``topk_ids=[id]``, ``topk_logprobs=[0.0]``).

Mapping modes:
- ``paper`` (the original rule, reproduced exactly): a piece aligned to exactly one teacher token
  with ``piece == token.replace(' ', '▁')`` keeps that position's candidates (sampled token first,
  then the top-k in API order), each ``candidate.replace(' ', '▁')`` looked up in the vocabulary;
  the first occurrence of a piece wins, the rest are dropped.
- ``default`` (fixes the original's misses): whitespace-only teacher tokens (``"\\n"``) carry no
  piece of their own (the student's ``▁`` absorbs them) and are ignored in an aligned set; a 1:1 pair
  is kept when the cores are equal, so a line-initial ``"If"`` after ``"\\n"`` matches ``"▁If"``. At
  a *line-initial* position (the piece has ``▁`` and the teacher token has no leading space) every
  candidate maps to ``"▁" + candidate.lstrip(" ")``; elsewhere ``' '`` becomes ``▁`` as in the paper
  (``" 5"`` -> ``"▁5"``, ``"5"`` -> ``"5"``). Candidates that land on the same piece are summed
  (they are one student event). *Merged tokens* (several teacher tokens whose cores concatenate to
  exactly one piece's core, aligned to nothing else, e.g. ``" $" "12"`` -> ``"▁$12"``,
  ``"/" "2"`` -> ``"/2"``) are kept with the chain rule: the piece gets the sum of the sampled
  tokens' log-probabilities, and the first token's alternatives (disjoint events) map as above; the
  mass of "first token, then some other continuation" has no single piece and is dropped. One
  teacher token split over several pieces stays one-hot (no one-to-one rule exists).
- Both modes: a candidate with no student piece (``" sells"`` when ``▁sells`` is not in the
  vocabulary, byte-level fragments, anything with a newline) is dropped, and the top-k mass is not
  renormalized (as in the original). Teacher tokens that do not concatenate to the text (byte-level
  BPE splitting a UTF-8 character) are located by resynchronizing on the next matching token; they
  never equal a piece, so they only ever produce one-hot positions.

The output schema is `aligned_data` (``specialize_jax.aligned/1``).

Speed: the DTW of a whole batch of samples is one numpy recurrence per teacher position (each row is
a prefix sum plus a cumulative minimum), and the edit distances of all distinct (teacher, student)
string pairs of the batch are computed together, one character row at a time. ``align_records``
spreads batches over worker processes.
"""
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from specialize_jax.align import aligned_data
from specialize_jax.data import storage
from specialize_jax.data import formats
from specialize_jax.errors import ConfigError

MODES = ("default", "paper")
SPACE_MARKER = "\u2581"
DEFAULT_BATCH_SIZE = 64
# How far (in chars and tokens) to look for the next token that matches the text after a token that
# does not (a byte-level BPE fragment of a UTF-8 character).
_RESYNC_CHARS = 8
_RESYNC_TOKENS = 4


# ----------------------------------------------------------------------------- strings

def core(text: str) -> str:
  """``text`` without whitespace and without the ``▁`` marker (the default comparison form)."""
  return "".join(text.replace(SPACE_MARKER, " ").split())


def _paper_teacher_norm(token: str) -> str:
  return token.replace(" ", "")


def _paper_student_norm(piece: str) -> str:
  return piece.replace(SPACE_MARKER, "")


def target_span(text: str) -> Optional[Tuple[int, int]]:
  """``(start, end)`` of the student target in a completion; None without an answer line.

  ``text[start:end]`` is ``formats.cut_after_answer_line`` of the completion after its trigger
  tail (see the module docstring).
  """
  body = formats.trigger_tail_length(text)
  target = formats.cut_after_answer_line(text[body:])
  if not target:
    return None
  start = text.index(target, body)
  return start, start + len(target)


def student_target(text: str) -> Optional[str]:
  """The CoT target string of a completion (``target_span`` applied), or None."""
  span = target_span(text)
  return None if span is None else text[span[0]:span[1]]


def token_offsets(text: str, tokens: Sequence[str]) -> List[Tuple[int, int]]:
  """Character extent ``(begin, end)`` of every token in ``text``, tolerating tokens that do not
  match it (byte-level BPE fragments): a run of such tokens covers the text up to where the next
  matching token is found (within a few chars), or nothing."""
  extents: List[Tuple[int, int]] = []
  pos, i = 0, 0
  while i < len(tokens):
    token = tokens[i]
    if token and text.startswith(token, pos):
      extents.append((pos, pos + len(token)))
      pos += len(token)
      i += 1
      continue
    if not token:
      extents.append((pos, pos))
      i += 1
      continue
    resync = None
    for k in range(i + 1, min(len(tokens), i + 1 + _RESYNC_TOKENS)):
      if not tokens[k]:
        continue
      found = text.find(tokens[k], pos, pos + _RESYNC_CHARS + len(tokens[k]))
      if found >= 0:
        resync = (k, found)
        break
    if resync is None:  # Nothing matches nearby: this token covers nothing.
      extents.append((pos, pos))
      i += 1
      continue
    k, found = resync
    for _ in range(i, k):
      extents.append((pos, found))
    pos, i = found, k
  return extents


def _offsets_are_exact(text: str, tokens: Sequence[str], offsets: Sequence[int]) -> bool:
  return all(text.startswith(t, o) for t, o in zip(tokens, offsets))


# ----------------------------------------------------------------------------- edit distance, DTW

def edit_distances(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
  """Levenshtein distance of every pair ``(a[p], b[p])``, computed for all pairs at once.

  Returns int32 ``[len(a)]``; see ``edit_distances_indexed``.
  """
  if len(a) != len(b):
    raise ValueError(f"edit_distances needs equal-length lists, got {len(a)} and {len(b)}")
  index = np.arange(len(a))
  return edit_distances_indexed(list(a), list(b), index, index)


def edit_distances_indexed(strings_a: Sequence[str], strings_b: Sequence[str],
                           index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
  """Levenshtein distance of the pairs ``(strings_a[index_a[p]], strings_b[index_b[p]])``.

  One numpy step per character of the longest ``a``: the row recurrence
  ``R[j] = min(X[j], R[j-1] + 1)`` is ``cummin(X[k] - k) + j``. Pairs are bucketed by length so
  a few long strings do not pad the rest. Returns int32 ``[len(index_a)]``.
  """
  num = len(index_a)
  out = np.zeros(num, np.int32)
  if not num:
    return out
  codes_a, lens_a = _codes(strings_a, -1)
  codes_b, lens_b = _codes(strings_b, -2)
  len_a, len_b = lens_a[index_a], lens_b[index_b]
  bucket = (np.minimum(np.ceil(np.log2(np.maximum(len_a, 1))), 6).astype(np.int32) * 8 +
            np.minimum(np.ceil(np.log2(np.maximum(len_b, 1))), 6).astype(np.int32))
  order = np.argsort(bucket, kind="stable")
  bounds = np.flatnonzero(np.diff(bucket[order])) + 1
  for idx in np.split(order, bounds):
    width_a, width_b = int(len_a[idx].max()), int(len_b[idx].max())
    out[idx] = _edit_distances_padded(codes_a[index_a[idx], :max(width_a, 1)],
                                      codes_b[index_b[idx], :max(width_b, 1)],
                                      len_a[idx], len_b[idx])
  return out


def _codes(strings: Sequence[str], pad: int) -> Tuple[np.ndarray, np.ndarray]:
  """Code points of ``strings`` as a padded int32 matrix ``[len(strings), max_len]``, and lengths."""
  lens = np.fromiter(map(len, strings), np.int32, len(strings))
  width = max(int(lens.max()) if len(strings) else 0, 1)
  flat = np.frombuffer("".join(strings).encode("utf-32-le"), np.int32)
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
  cols = np.arange(width)
  inside = cols[None, :] < lens[:, None]
  gather = np.where(inside, starts[:, None] + cols[None, :], 0)
  codes = np.where(inside, flat[gather] if len(flat) else pad, pad).astype(np.int32)
  return codes, lens


def _edit_distances_padded(codes_a, codes_b, len_a, len_b) -> np.ndarray:
  width_a, width_b = int(len_a.max()), int(len_b.max())
  codes_b = codes_b[:, :max(width_b, 1)]
  steps = np.arange(width_b + 1, dtype=np.int32)
  row = np.broadcast_to(steps, (len(codes_a), width_b + 1)).copy()  # distance of a[:0] to b[:j]
  rows = np.arange(len(codes_a))
  out = row[rows, len_b].copy()  # pairs with an empty a
  for i in range(1, width_a + 1):
    substitute = (codes_a[:, i - 1:i] != codes_b[:, :width_b]).astype(np.int32)  # [pairs, width_b]
    best = np.empty_like(row)
    best[:, 0] = i
    best[:, 1:] = np.minimum(row[:, 1:] + 1, row[:, :-1] + substitute)
    row = np.minimum.accumulate(best - steps, axis=1) + steps
    done = len_a == i
    out[done] = row[rows[done], len_b[done]]
  return out


def dtw_matrix_batch(costs: Sequence[np.ndarray]) -> List[np.ndarray]:
  """Accumulated DTW matrices ``D`` (``[n, m]`` each, the original's trimmed ``matrix``).

  All samples advance together one teacher position at a time; with ``M_j = min(D[i-1][j],
  D[i-1][j-1])`` and prefix sums ``S_j`` of row i's costs, ``D[i][j] = S_j + min_{k<=j}(M_k -
  S_{k-1})``, a cumulative minimum. Padding never reaches the ``[:n, :m]`` corner it depends on.
  """
  if not costs:
    return []
  num = len(costs)
  rows = max(c.shape[0] for c in costs)
  cols = max(c.shape[1] for c in costs)
  padded = np.zeros((num, rows, cols), np.float64)  # [batch, n, m]
  for b, c in enumerate(costs):
    padded[b, :c.shape[0], :c.shape[1]] = c
  full = np.full((num, rows + 1, cols + 1), np.inf)  # [batch, n + 1, m + 1], row/col 0 = border
  full[:, 0, 0] = 0.0
  zero = np.zeros((num, 1))
  for i in range(1, rows + 1):
    prev = full[:, i - 1]
    reach = np.minimum(prev[:, 1:], prev[:, :-1])  # M_j, j = 1..m
    prefix = np.concatenate([zero, np.cumsum(padded[:, i - 1], axis=1)], axis=1)  # S_0..S_m
    full[:, i, 1:] = prefix[:, 1:] + np.minimum.accumulate(reach - prefix[:, :-1], axis=1)
  return [full[b, 1:c.shape[0] + 1, 1:c.shape[1] + 1] for b, c in enumerate(costs)]


def backtrack(matrix: np.ndarray) -> List[List[int]]:
  """Teacher positions aligned to each student piece (columns), from an accumulated DTW matrix.

  Walks from the last cell to ``(0, 0)``; ties go diagonal, then up (previous teacher token), then
  left (previous student piece), as the original's ``np.argmin([diag, up, left])``.
  """
  n, m = matrix.shape
  aligned: List[List[int]] = [[] for _ in range(m)]
  if n == 0 or m == 0:
    return aligned
  d = matrix.tolist()
  inf = math.inf
  i, j = n - 1, m - 1
  while i > 0 or j > 0:
    aligned[j].append(i)
    diag = d[i - 1][j - 1] if i > 0 and j > 0 else inf
    up = d[i - 1][j] if i > 0 else inf
    left = d[i][j - 1] if j > 0 else inf
    if diag <= up and diag <= left:
      i, j = i - 1, j - 1
    elif up <= left:
      i -= 1
    else:
      j -= 1
  aligned[0].append(0)
  for positions in aligned:
    positions.reverse()
  return aligned


def dtw_align(teacher: Sequence[str], student: Sequence[str], mode: str = "default"
              ) -> List[List[int]]:
  """For each student piece, the teacher positions DTW aligns to it (``mode`` picks the cost)."""
  _check_mode(mode)
  return _align_batch([(list(teacher), list(student))], mode)[0]


def reference_edit_distance(x: str, y: str) -> int:
  """Levenshtein distance, one plain-Python row at a time: the oracle for `edit_distances`."""
  row = list(range(len(y) + 1))
  for i, cx in enumerate(x, 1):
    new = [i]
    for j, cy in enumerate(y, 1):
      new.append(min(row[j] + 1, new[j - 1] + 1, row[j - 1] + (cx != cy)))
    row = new
  return row[-1]


def reference_dtw(teacher: Sequence[str], student: Sequence[str], mode: str = "default"
                  ) -> List[List[int]]:
  """Straightforward pure-Python DTW (the original's loops); the oracle for tests and the bench."""
  _check_mode(mode)
  norm_a, norm_b = _normalizers(mode)
  a = [norm_a(t) for t in teacher]
  b = [norm_b(p) for p in student]
  lev = reference_edit_distance

  n, m = len(a), len(b)
  full = [[math.inf] * (m + 1) for _ in range(n + 1)]
  full[0][0] = 0
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      full[i][j] = lev(a[i - 1], b[j - 1]) + min(full[i - 1][j], full[i][j - 1], full[i - 1][j - 1])
  return backtrack(np.array([r[1:] for r in full[1:]], np.float64).reshape(n, m))


def _normalizers(mode: str):
  if mode == "paper":
    return _paper_teacher_norm, _paper_student_norm
  return core, core


def _align_batch(pairs: Sequence[Tuple[List[str], List[str]]], mode: str,
                 normalize=None) -> List[List[List[int]]]:
  """DTW alignments of many (teacher tokens, student pieces) pairs, costs computed jointly.

  ``normalize`` (default mode only) replaces ``core`` by a cached equivalent.
  """
  norm_a, norm_b = _normalizers(mode)
  if normalize is not None and mode == "default":
    norm_a = norm_b = normalize
  index_a: Dict[str, int] = {}
  index_b: Dict[str, int] = {}
  ids = []
  for teacher, student in pairs:
    ids_a = np.array([index_a.setdefault(norm_a(t), len(index_a)) for t in teacher], np.int64)
    ids_b = np.array([index_b.setdefault(norm_b(p), len(index_b)) for p in student], np.int64)
    ids.append((ids_a, ids_b))
  strings_a = list(index_a)
  strings_b = list(index_b)
  width = max(len(strings_b), 1)
  keys = [(ia[:, None] * width + ib[None, :]).ravel() for ia, ib in ids]
  all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
  unique, inverse = np.unique(all_keys, return_inverse=True)
  distances = edit_distances_indexed(strings_a, strings_b, unique // width, unique % width)
  pair_costs = distances[inverse]
  costs, at = [], 0
  for ia, ib in ids:
    size = len(ia) * len(ib)
    costs.append(pair_costs[at:at + size].reshape(len(ia), len(ib)).astype(np.float64))
    at += size
  return [backtrack(mat) for mat in dtw_matrix_batch(costs)]


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ConfigError(f"alignment mode {mode!r} is unknown; use one of {', '.join(MODES)}")


# ----------------------------------------------------------------------------- mapping

@dataclasses.dataclass
class AlignStats:
  """Counts over a run; ``share_kept`` is the headline coverage number."""
  records: int = 0
  samples: int = 0
  written: int = 0
  positions: int = 0
  kept_positions: int = 0
  skipped: Dict[str, int] = dataclasses.field(default_factory=lambda: {
      "incorrect": 0, "no_answer_line": 0})
  without_top_logprobs: int = 0

  def add(self, other: "AlignStats") -> None:
    for name in ("records", "samples", "written", "positions", "kept_positions",
                 "without_top_logprobs"):
      setattr(self, name, getattr(self, name) + getattr(other, name))
    for key, value in other.skipped.items():
      self.skipped[key] = self.skipped.get(key, 0) + value

  def to_json(self) -> Dict[str, Any]:
    return {"records": self.records, "samples": self.samples, "written": self.written,
            "skipped": dict(self.skipped),
            "samples_without_top_logprobs": self.without_top_logprobs,
            "positions": self.positions, "kept_positions": self.kept_positions,
            "share_kept": round(self.kept_positions / self.positions, 6) if self.positions else None}


class Aligner:
  """Aligns teacher samples to one SentencePiece vocabulary in one mode (``default``/``paper``)."""

  def __init__(self, spm_model_path, mode: str = "default"):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    _check_mode(mode)
    path = os.fspath(spm_model_path)
    if not storage.isfile(path):
      raise FileNotFoundError(f"SentencePiece model {path} does not exist; pass --vocab (`specialize "
                              "download --only tokenizer` fetches the T5 vocabulary)")
    self.mode = mode
    self.spm_model_path = path
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=storage.read_bytes(path))
    self._pieces = [self._processor.id_to_piece(i) for i in range(self._processor.get_piece_size())]
    self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
    self._unk_id = self._processor.unk_id()
    self._piece_ids.pop(self._pieces[self._unk_id], None)  # "<unk>" is not a usable candidate.
    self._candidate_cache: Dict[Tuple[str, bool], Optional[int]] = {}
    self._core_cache: Dict[str, str] = {}

  def _core(self, text: str) -> str:
    value = self._core_cache.get(text)
    if value is None:
      value = self._core_cache[text] = core(text)
    return value

  def __getstate__(self):  # Workers rebuild the processor from the path.
    return {"spm_model_path": self.spm_model_path, "mode": self.mode}

  def __setstate__(self, state):
    self.__init__(state["spm_model_path"], state["mode"])

  def encode(self, text: str) -> List[int]:
    return self._processor.encode(text)

  # --------------------------------------------------------------------------- records

  def align_records(self, records: Sequence[Any], stats: Optional[AlignStats] = None,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> List[aligned_data.AlignedRow]:
    """Aligned rows of every usable sample of ``records`` (``teacher_data.TeacherRecord``)."""
    stats = AlignStats() if stats is None else stats
    jobs = []  # (record, sample index, target, teacher positions or None)
    for record in records:
      stats.records += 1
      for index, sample in enumerate(record.samples):
        stats.samples += 1
        if not sample.correct:
          stats.skipped["incorrect"] += 1
          continue
        span = target_span(sample.text)
        if span is None:
          stats.skipped["no_answer_line"] += 1
          continue
        jobs.append((record, index, sample, span))
    rows: List[aligned_data.AlignedRow] = []
    for start in range(0, len(jobs), batch_size):
      rows.extend(self._align_jobs(jobs[start:start + batch_size], stats))
    return rows

  def _align_jobs(self, jobs, stats: AlignStats) -> List[aligned_data.AlignedRow]:
    prepared = []
    for record, index, sample, (start, end) in jobs:
      target = sample.text[start:end]
      ids = self.encode(target)
      pieces = [self._pieces[i] for i in ids]
      positions = None
      if sample.tokens is not None and sample.top_logprobs is not None:
        positions = self._teacher_positions(sample, start, end)
      else:
        stats.without_top_logprobs += 1
      prepared.append((record, index, sample, target, ids, pieces, positions))
    pairs = [([p.tokens[j] for j in pos], pieces) for _, _, p, _, _, pieces, pos in prepared
             if pos]
    alignments = iter(_align_batch(pairs, self.mode, self._core))
    rows = []
    for record, index, sample, target, ids, pieces, positions in prepared:
      aligned = next(alignments) if positions else None
      topk_ids, topk_logprobs, kept = self._map(sample, positions, aligned, ids, pieces)
      stats.written += 1
      stats.positions += len(ids)
      stats.kept_positions += kept
      rows.append(aligned_data.AlignedRow(
          id=record.id, sample_index=index, question=record.question,
          gold_answer=record.gold_answer, target=target, target_ids=tuple(ids),
          topk_ids=topk_ids, topk_logprobs=topk_logprobs, kept=kept, meta={"mode": self.mode}))
    return rows

  @staticmethod
  def _teacher_positions(sample, start: int, end: int) -> List[int]:
    """Indices of the teacher tokens overlapping ``text[start:end]``."""
    text, tokens = sample.text, sample.tokens
    offsets = sample.offsets
    if offsets is not None and _offsets_are_exact(text, tokens, offsets):
      extents = [(o, o + len(t)) for o, t in zip(offsets, tokens)]
    else:
      extents = token_offsets(text, tokens)
    return [j for j, (b, e) in enumerate(extents)
            if (b < end and e > start) or (b == e and start <= b < end)]

  # --------------------------------------------------------------------------- one sample

  def _map(self, sample, positions, aligned, ids, pieces):
    """``(topk_ids, topk_logprobs, kept)`` rows for one sample."""
    rows_ids: List[Tuple[int, ...]] = []
    rows_lps: List[Tuple[float, ...]] = []
    kept = 0
    owners: Dict[int, int] = {}
    if aligned is not None and self.mode == "default":
      for i, teacher in enumerate(aligned):
        for j in teacher:
          owners[j] = -1 if j in owners and owners[j] != i else i
    for i, (piece_id, piece) in enumerate(zip(ids, pieces)):
      row = None
      if aligned is not None:
        teacher = [positions[j] for j in aligned[i]]
        if self.mode == "paper":
          row = self._paper_row(sample, teacher, piece)
        else:
          row = self._default_row(sample, teacher, piece, piece_id,
                                  lambda i=i: all(owners.get(j) == i for j in aligned[i]))
      if row is None:
        rows_ids.append((piece_id,))
        rows_lps.append((0.0,))
      else:
        kept += 1
        rows_ids.append(tuple(row))
        rows_lps.append(tuple(row.values()))
    return tuple(rows_ids), tuple(rows_lps), kept

  @staticmethod
  def _candidates(sample, j: int) -> List[Tuple[str, float]]:
    """The sampled token (when its log-prob is known) first, then the API's top-k in order."""
    first = [(sample.tokens[j], sample.logprobs[j])] if sample.logprobs is not None else []
    return first + list(sample.top_logprobs[j])

  def _paper_row(self, sample, teacher: List[int], piece: str) -> Optional[Dict[int, float]]:
    if len(teacher) != 1 or sample.tokens[teacher[0]].replace(" ", SPACE_MARKER) != piece:
      return None
    row: Dict[int, float] = {}
    for token, logprob in self._candidates(sample, teacher[0]):
      piece_id = self._piece_ids.get(token.replace(" ", SPACE_MARKER))
      if piece_id is not None and piece_id not in row:
        row[piece_id] = logprob
    return row

  def _map_candidate(self, token: str, line_initial: bool) -> Optional[int]:
    key = (token, line_initial)
    if key not in self._candidate_cache:
      if "\n" in token or not token.strip(" "):
        mapped = self._piece_ids.get(SPACE_MARKER) if token == " " and not line_initial else None
      elif line_initial:
        mapped = self._piece_ids.get(SPACE_MARKER + token.lstrip(" ").replace(" ", SPACE_MARKER))
      else:
        mapped = self._piece_ids.get(token.replace(" ", SPACE_MARKER))
      self._candidate_cache[key] = mapped
    return self._candidate_cache[key]

  def _default_row(self, sample, teacher: List[int], piece: str, piece_id: int,
                   is_exclusive) -> Optional[Dict[int, float]]:
    """The default rule; ``is_exclusive()`` says whether this piece's teacher tokens are aligned to
    no other piece (checked only for merged tokens)."""
    tokens = sample.tokens
    cores = self._core
    content = [j for j in teacher if cores(tokens[j])]
    if not content:
      return None
    if len(content) == 1:
      if cores(tokens[content[0]]) != cores(piece):
        return None
    elif "".join(cores(tokens[j]) for j in content) != cores(piece):
      return None
    if len(content) > 1 and (not is_exclusive() or content != list(range(content[0],
                                                                    content[-1] + 1))):
      return None
    first = content[0]
    line_initial = piece.startswith(SPACE_MARKER) and not tokens[first].startswith(" ")
    if len(content) == 1:
      if self._map_candidate(tokens[first], line_initial) != piece_id:
        return None
      candidates = self._candidates(sample, first)
    else:
      # Merged tokens: the chain rule gives the piece's own probability; only the first token's
      # alternatives are events with a piece of their own.
      if sample.logprobs is None:
        return None
      joint = sum(sample.logprobs[j] for j in content)
      candidates = [(None, joint)] + [(t, lp) for t, lp in sample.top_logprobs[first]
                                      if t != tokens[first]]
    row: Dict[int, float] = {}
    seen_sampled = False
    for token, logprob in candidates:
      if token is None:
        mapped = piece_id
      elif token == tokens[first] and len(content) == 1:
        if seen_sampled:  # The sampled token again in the top-k list: one event, not two.
          continue
        seen_sampled = True
        mapped = piece_id
      else:
        mapped = self._map_candidate(token, line_initial)
      if mapped is None:
        continue
      row[mapped] = logprob if mapped not in row else min(0.0, float(np.logaddexp(row[mapped],
                                                                                   logprob)))
    return row


# ----------------------------------------------------------------------------- running

_WORKER_ALIGNER: Optional[Aligner] = None
_WORKER_RECORDS: Sequence[Any] = ()


def _worker_init(spm_model_path: str, mode: str, records: Optional[Sequence[Any]]) -> None:
  global _WORKER_ALIGNER, _WORKER_RECORDS  # pylint: disable=global-statement  (per worker process)
  _WORKER_ALIGNER = Aligner(spm_model_path, mode)
  if records is not None:
    _WORKER_RECORDS = records


def _worker_align(chunk: Tuple[int, int, Optional[List[Any]]]) -> Tuple[List[str], AlignStats]:
  """Aligns ``chunk = (start, stop, records)``: the records themselves (spawn), or when they are
  None the ``[start, stop)`` range of the inherited records (fork)."""
  start, stop, records = chunk
  chunk = _WORKER_RECORDS[start:stop] if records is None else records
  stats = AlignStats()
  rows = _WORKER_ALIGNER.align_records(chunk, stats)
  return [aligned_data.row_line(r) for r in rows], stats


def align_records(records: Sequence[Any], spm_model_path, mode: str = "default",
                  workers: int = 1, records_per_chunk: int = 16
                  ) -> Tuple[List[str], AlignStats]:
  """JSONL lines (in input order) of every usable sample, and the counts.

  ``workers > 1`` spreads chunks of records over that many processes. Where ``fork`` exists and JAX
  is not loaded (forking a process with JAX's threads is unsafe), workers inherit ``records`` and
  receive only index ranges: pickling 10k samples of per-token top-k costs more than aligning them.
  Otherwise workers are spawned and get pickled records.
  """
  _check_mode(mode)
  stats = AlignStats()
  lines: List[str] = []
  if workers <= 1:
    aligner = Aligner(spm_model_path, mode)
    for start in range(0, len(records), records_per_chunk):
      chunk_stats = AlignStats()
      rows = aligner.align_records(records[start:start + records_per_chunk], chunk_stats)
      lines.extend(aligned_data.row_line(r) for r in rows)
      stats.add(chunk_stats)
    return lines, stats
  Aligner(spm_model_path, mode)  # Fail here, not in a worker, on a bad path.
  ranges = [(s, min(len(records), s + records_per_chunk))
            for s in range(0, len(records), records_per_chunk)]
  use_fork = "fork" in multiprocessing.get_all_start_methods() and "jax" not in sys.modules
  if use_fork:
    context, chunks, inherited = (multiprocessing.get_context("fork"),
                                  [(a, b, None) for a, b in ranges], records)
  else:
    context, chunks, inherited = (multiprocessing.get_context("spawn"),
                                  [(a, b, list(records[a:b])) for a, b in ranges], None)
  global _WORKER_RECORDS  # pylint: disable=global-statement  (read by forked workers only)
  _WORKER_RECORDS = inherited if use_fork else ()
  try:
    with context.Pool(workers, initializer=_worker_init,
                      initargs=(str(spm_model_path), mode, None)) as pool:
      for chunk_lines, chunk_stats in pool.imap(_worker_align, chunks):
        lines.extend(chunk_lines)
        stats.add(chunk_stats)
  finally:
    _WORKER_RECORDS = ()
  return lines, stats


def align_file(input_path, output_path, spm_model_path, mode: str = "default",
               workers: int = 1) -> Dict[str, Any]:
  """``specialize align``: reads teacher data, writes the aligned file atomically, returns a summary."""
  from specialize_jax.teacher import teacher_data  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  read = teacher_data.read_records(input_path, strict=True)
  read_s = time.perf_counter() - start
  lines, stats = align_records(read.records, spm_model_path, mode, workers)
  with storage.atomic_write(output_path) as f:
    f.writelines(lines)
  summary = {"input": str(input_path), "output": str(output_path), "mode": mode}
  summary.update(stats.to_json())
  summary["read_seconds"] = round(read_s, 3)
  summary["seconds"] = round(time.perf_counter() - start, 3)
  return summary


def default_workers() -> int:
  """Worker processes for ``specialize align``: the CPUs this process may use."""
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
             (os.cpu_count() or 1))

