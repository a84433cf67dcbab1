"""Writes a teacher file and its aligned file of the paper's size and shape, built from GSM8K gold.

  python tools/make_paper_scale_teacher.py --output_dir DIR [--num_questions 7473]
      [--samples_per_question 28] [--top_k 5] [--seed 0] [--vocab PATH]
      [--data_dir DIR] [--workers 2] [--questions_per_chunk 32]

The paper distilled 207,135 correct code-davinci-002 chains (~28 per GSM8K train question, ~130
teacher tokens each, top-5 log-probabilities at every position, as the paper's Codex teacher). We have only a few
real samples, so this tool makes stand-ins of the same size and shape, to measure and test what runs
on the full data (reading, filtering, feature building, input pipelines, training throughput):

- ``DIR/teacher.jsonl`` (``specialize_jax.teacher/1``): one record per REAL GSM8K train question,
  with the ids, questions and gold answers of ``teacher_sources.records_from_gsm8k_gold``, so the
  held-out exclusion of the 200 dev questions applies to it as to real teacher data. Each record
  holds ``--samples_per_question`` samples, all correct.
- ``DIR/teacher.aligned.jsonl`` (``specialize_jax.aligned/1``): one row per sample, for exactly its
  CoT training target (``formats.teacher_cot_target`` of the sample text), with the T5 SentencePiece
  ids of that target (no EOS) and a top-k row per id.

Terms:
- *chain*: the sample's reasoning: the gold rationale's sentences (calculator notes removed), some
  paraphrased (a lead-in such as "So, ", a word swapped), an adjacent pair sometimes swapped,
  sentences dropped when the chain is too long, and *padding* sentences (the question restated, a
  step repeated, a generic connector) inserted until it reaches the sample's *target length*.
- *target length*: drawn per sample from N(130, 40) teacher tokens, clipped to [40, 256].
- *text*: ``" step\\n"`` (the prompt's trigger tail, as in the paper's stored samples), the chain,
  ``"\\nThe answer is X."`` (X: the gold answer as GSM8K writes it) and sometimes text after the
  answer line (blank lines, a re-check, the start of a next question), which the training cut
  removes.
- *teacher tokens*: the text split into GPT-like word/space pieces (``" sold"``, ``" 48"``,
  ``"\\n"``) that concatenate to it exactly, with their offsets.
- *profile*: one position's log-probabilities: the sampled token's and a sorted top-k. Profiles are
  drawn once per run from a seeded bank (most positions confident, some uncertain; the sampled
  token is in the top-k 95 % of the time, otherwise below all of it); each position picks one at
  random and fills the other slots with distinct plausible tokens (the sample's own, common words).
- *aligned rows*: 15 % of positions are one-hot (``[id]`` / ``[0.0]``, as the real alignment leaves
  unmatched positions); the others get a row of at most ``--top_k`` distinct ids (the target id in
  95 % of them; the rest from the target's own pieces and frequent T5 pieces) with sorted
  log-probs; ``kept`` counts them.

Everything is seeded per (seed, question, sample), so the output is byte-identical for any
``--workers`` and ``--questions_per_chunk``. Workers write each chunk with the project's validating
writers (``teacher_data.write_records``, ``aligned_data.write_aligned``) into a temp folder inside
DIR; the parent appends the chunks in question order to two ``storage.atomic_write`` temp files
and ``os.replace``-s them, so DIR never holds a half-written output.
"""
import argparse
import dataclasses
import math
import multiprocessing
import os
import pathlib
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from specialize_jax.data import answers  # noqa: E402
from specialize_jax.data import data_dir  # noqa: E402
from specialize_jax.data import storage  # noqa: E402
from specialize_jax.data import formats  # noqa: E402
from specialize_jax.data import readers  # noqa: E402
from specialize_jax.align import aligned_data  # noqa: E402
from specialize_jax.teacher import teacher_data  # noqa: E402
from specialize_jax.teacher import teacher_sources  # noqa: E402

PAPER_QUESTIONS = 7473
PAPER_CORRECT_CHAINS = 207_135
SAMPLES_PER_QUESTION = 28  # 207,135 / 7,473 = 27.7.
MEAN_TARGET_TOKENS = 130.0
STD_TARGET_TOKENS = 40.0
MIN_TARGET_TOKENS = 40
MAX_TARGET_TOKENS = 256
TRIGGER_TAIL = " step\n"
SAMPLED_IN_TOP_K = 0.95
CONFIDENT_SHARE = 0.7
ONE_HOT_SHARE = 0.15
TARGET_IN_ROW = 0.95
FULL_WIDTH_SHARE = 0.8
PROFILE_BANK_SIZE = 4096
LOGPROB_DECIMALS = 4
FREQUENT_T5_IDS = tuple(range(3, 2003))  # T5's SentencePiece ids rise roughly with rarity.
TEACHER_NAME = "synthetic-paper-scale"
OUTPUT_TEACHER = "teacher.jsonl"
OUTPUT_ALIGNED = "teacher.aligned.jsonl"

# GPT-like pieces: a word or a 1-3 digit group with its leading space, a punctuation run, a newline,
# any other whitespace character. Every character of a text is in exactly one piece.
TOKEN_RE = re.compile(r" ?[A-Za-z]+| ?\d{1,3}| ?[^\sA-Za-z\d]+|\n|\s")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z$\d(])")
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
LEADS = ("So ", "Then ", "This means ", "Therefore, ", "Next, ", "Now, ", "First, ",
         "After that, ", "We get that ")
_NO_LEAD = re.compile(r"^(So|Then|Therefore|Thus|Next|Now|First|After|This means)\b")
LOWERCASE_FIRST_WORDS = frozenset(
    "She He The They It There If In This So We Each Since That Then Her His Their All After At For "
    "When To A An Now First One Every Together Altogether Half Adding Subtracting Multiplying "
    "Dividing Total".split())
SUBSTITUTIONS = tuple((re.compile(a), b) for a, b in (
    (r"\btotal\b", "sum"), (r"\beach\b", "every"), (r"\baltogether\b", "in all"),
    (r"\bneeds\b", "requires"), (r"\bbuys\b", "purchases"), (r"\bearns\b", "makes"),
    (r"\bThus\b", "So"), (r"\bTherefore\b", "So"), (r" x ", " * "), (r"\bhas\b", "now has")))
RESTATE_QUESTION = ("We know that ", "The problem says that ", "Recall that ",
                    "We are told that ")
RESTATE_STEP = ("Again, ", "To double check, ", "In other words, ", "That is, ")
CONNECTORS = (
    "Let's compute this step by step.", "Now we can put these together.",
    "We need to be careful with the units here.", "Let's write down what we know.",
    "We can check this with the numbers in the question.", "This is the key step.",
    "Let's keep track of every quantity.", "Now we combine the results.",
    "We have to read the question carefully.", "That gives us everything we need.")
TRAILERS = (("\n\n", 0.55), ("\n", 0.10), ("", 0.10), ("\n\nLet me check: {step}\n\n", 0.10),
            ("\n\n\nQuestion:", 0.10), ("\nThat is the final result.\n", 0.05))
COMMON_TOKENS = (" the", " of", " is", ",", ".", " and", "\n", " to", " a", " =", " +", " *",
                 " -", " /", " in", " he", " she", " they", " has", " will", " so", " total",
                 " each", " $", " 1", " 2", " 3", " 4", " 5", " 10", " 12", " 20", " 100", "The",
                 "So", "If", "She", "He", " per", " more", " times", " minutes", " hours",
                 " dollars", " x", "0", "00", " answer")


@dataclasses.dataclass(frozen=True)
class Profile:
  """One position's log-probabilities: the sampled token's, the sorted top-k, its rank (-1: out)."""
  sampled_logprob: float
  top_logprobs: Tuple[float, ...]
  sampled_rank: int


@dataclasses.dataclass(frozen=True)
class Settings:
  samples_per_question: int
  top_k: int
  seed: int
  vocab: str
  parts_dir: str


@dataclasses.dataclass
class ChunkStats:
  questions: int = 0
  samples: int = 0
  teacher_tokens: int = 0
  target_teacher_tokens: int = 0
  target_ids: int = 0
  kept_rows: int = 0

  def add(self, other: "ChunkStats") -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


# ----------------------------------------------------------------------------- log-probabilities

def _round_logprob(value: float) -> float:
  return min(0.0, round(value, LOGPROB_DECIMALS)) + 0.0  # + 0.0 turns -0.0 into 0.0.


def _dirichlet(rng: random.Random, alphas: Sequence[float]) -> List[float]:
  draws = [rng.gammavariate(a, 1.0) for a in alphas]
  total = sum(draws)
  return [d / total for d in draws]


def profile_bank(seed: int, width: int, size: int = PROFILE_BANK_SIZE) -> Tuple[Profile, ...]:
  """``size`` seeded profiles of ``width`` top-k entries (see the module docstring)."""
  rng = random.Random(f"profiles/{seed}/{width}")
  bank = []
  floor = 1e-6
  while len(bank) < size:
    if rng.random() < SAMPLED_IN_TOP_K:
      if rng.random() < CONFIDENT_SHARE:
        sampled = 1.0 - min(0.5, rng.expovariate(1 / 0.015))
      else:
        sampled = rng.uniform(0.15, 0.9)
      # The other width-1 entries and the rest of the vocabulary share what is left.
      parts = _dirichlet(rng, [1.0] * (width - 1) + [1.5])
      others = [max(floor, p * (1.0 - sampled)) for p in parts[:-1]]
      probs = sorted([sampled] + others, reverse=True)
      rank = probs.index(sampled)
    else:  # Sampled from the tail: every top-k entry is more likely than the sampled token.
      sampled = rng.uniform(0.0005, 0.01)
      parts = _dirichlet(rng, [1.0] * width + [0.5])
      probs = sorted((p * (1.0 - sampled) for p in parts[:-1]), reverse=True)
      if probs[-1] <= sampled:
        continue
      rank = -1
    bank.append(Profile(_round_logprob(math.log(sampled)),
                        tuple(_round_logprob(math.log(p)) for p in probs), rank))
  return tuple(bank)


# ----------------------------------------------------------------------------- text

def tokenize(text: str) -> List[str]:
  """GPT-like teacher tokens of ``text``; they concatenate to it exactly."""
  return TOKEN_RE.findall(text)


def _sentences(text: str) -> List[str]:
  out = []
  for line in text.split("\n"):
    out.extend(s.strip() for s in _SENTENCE_END.split(line.strip()) if s.strip())
  return [s for s in out if not _ANSWER_IS.search(s)]  # The target is cut at "answer is".


def _lower_first(sentence: str) -> str:
  word = sentence.split(" ", 1)[0]
  return sentence[0].lower() + sentence[1:] if word in LOWERCASE_FIRST_WORDS else sentence


def _paraphrase(rng: random.Random, sentence: str) -> str:
  if rng.random() < 0.5 and not _NO_LEAD.match(sentence):
    sentence = rng.choice(LEADS) + _lower_first(sentence)
  for _ in range(2):
    pattern, replacement = SUBSTITUTIONS[int(rng.random() * len(SUBSTITUTIONS))]
    sentence = pattern.sub(replacement, sentence, count=1)
  return sentence


def _padding(rng: random.Random, steps: Sequence[str], question: Sequence[str]) -> str:
  kind = rng.random()
  if kind < 0.4 and question:
    sentence = rng.choice(question)
    if sentence.endswith("?"):
      return "The question asks: " + sentence
    return rng.choice(RESTATE_QUESTION) + _lower_first(sentence)
  if kind < 0.75 and steps:
    sentence = rng.choice(steps)  # A repeated step; one that opens with "So" etc. gets no lead.
    if _NO_LEAD.match(sentence):
      return sentence
    return rng.choice(RESTATE_STEP) + _lower_first(sentence)
  return rng.choice(CONNECTORS)


def _count(sentence: str) -> int:
  return len(TOKEN_RE.findall(sentence))


def make_text(rng: random.Random, rationale: str, question: str, gold_answer: str
              ) -> Tuple[str, int]:
  """One sample's text and its target length (drawn, in teacher tokens)."""
  target_length = int(min(MAX_TARGET_TOKENS, max(MIN_TARGET_TOKENS, round(
      rng.gauss(MEAN_TARGET_TOKENS, STD_TARGET_TOKENS)))))
  gold_steps = _sentences(rationale) or ["We work through the numbers in the question."]
  question_sentences = _sentences(question)
  steps = [_paraphrase(rng, s) if rng.random() < 0.3 else s for s in gold_steps]
  if len(steps) > 2 and rng.random() < 0.2:  # Swap an adjacent pair, never the final step.
    i = int(rng.random() * (len(steps) - 2))
    steps[i], steps[i + 1] = steps[i + 1], steps[i]
  answer_line = f"The answer is {gold_answer}."
  # Joining by "\n" adds one token per break; by " " none (the space joins the next word).
  budget = target_length - _count(answer_line) - 1
  counts = [_count(s) + 1 for s in steps]
  while sum(counts) > budget and len(steps) > 2:  # Too long: drop steps, keeping the last.
    i = int(rng.random() * (len(steps) - 1))
    del steps[i], counts[i]
  for _ in range(64):  # Too short: pad before the final step, stopping nearest to the budget.
    missing = budget - sum(counts)
    sentence = _padding(rng, gold_steps, question_sentences)
    length = _count(sentence) + 1
    if missing <= 0 or length / 2 > missing:
      break
    i = int(rng.random() * len(steps))
    steps.insert(i, sentence)
    counts.insert(i, length)
  body = steps[0]
  for step in steps[1:]:
    body += ("\n" if rng.random() < 0.75 else " ") + step
  trailer = _choose_weighted(rng, TRAILERS).format(step=rng.choice(gold_steps))
  return f"{TRIGGER_TAIL}{body}\n{answer_line}{trailer}", target_length


def _choose_weighted(rng: random.Random, options: Sequence[Tuple[str, float]]) -> str:
  x = rng.random() * sum(w for _, w in options)
  for value, weight in options:
    x -= weight
    if x < 0:
      return value
  return options[-1][0]


# ----------------------------------------------------------------------------- per-token fields

def _distinct_picks(rng: random.Random, pool: Sequence[Any], count: int, exclude: Any) -> List[Any]:
  picked: List[Any] = []
  n = len(pool)
  while len(picked) < count:
    value = pool[int(rng.random() * n)]
    if value != exclude and value not in picked:
      picked.append(value)
  return picked


def teacher_top_logprobs(rng: random.Random, tokens: Sequence[str], bank: Sequence[Profile]
                         ) -> Tuple[List[float], List[List[Tuple[str, float]]]]:
  """Per token: the sampled log-prob and the sorted top-k ``(token, logprob)`` pairs."""
  pool = sorted(set(tokens).union(COMMON_TOKENS))
  logprobs, tops = [], []
  size = len(bank)
  for token in tokens:
    profile = bank[int(rng.random() * size)]
    width = len(profile.top_logprobs)
    alternatives = iter(_distinct_picks(rng, pool, width - (profile.sampled_rank >= 0), token))
    tops.append([(token, lp) if r == profile.sampled_rank else (next(alternatives), lp)
                 for r, lp in enumerate(profile.top_logprobs)])
    logprobs.append(profile.sampled_logprob)
  return logprobs, tops


def aligned_rows(rng: random.Random, target_ids: Sequence[int], banks: Dict[int, Sequence[Profile]],
                 top_k: int) -> Tuple[List[List[int]], List[List[float]], int]:
  """``(topk_ids, topk_logprobs, kept)`` of one target (see the module docstring)."""
  pool = sorted(set(target_ids).union(FREQUENT_T5_IDS))
  rows_ids, rows_lps, kept = [], [], 0
  narrow = list(range(max(1, top_k - 2), top_k))
  for target_id in target_ids:
    if rng.random() < ONE_HOT_SHARE:
      rows_ids.append([target_id])
      rows_lps.append([0.0])
      continue
    width = top_k if not narrow or rng.random() < FULL_WIDTH_SHARE else rng.choice(narrow)
    bank = banks[width]
    profile = bank[int(rng.random() * len(bank))]
    # The profile decides the target's rank; a kept row misses the target 5 % of the time.
    rank = profile.sampled_rank if profile.sampled_rank >= 0 else int(rng.random() * width)
    include_target = rng.random() < TARGET_IN_ROW
    others = iter(_distinct_picks(rng, pool, width - include_target, target_id))
    rows_ids.append([target_id if include_target and r == rank else next(others)
                     for r in range(width)])
    rows_lps.append(list(profile.top_logprobs))
    kept += 1
  return rows_ids, rows_lps, kept


# ----------------------------------------------------------------------------- one chunk

_WORKER: Dict[str, Any] = {}


def _worker_init(settings: Settings) -> None:
  import sentencepiece  # pylint: disable=g-import-not-at-top
  _WORKER["settings"] = settings
  _WORKER["processor"] = sentencepiece.SentencePieceProcessor(model_file=settings.vocab)
  _WORKER["teacher_bank"] = profile_bank(settings.seed, settings.top_k)
  _WORKER["aligned_banks"] = {w: profile_bank(settings.seed, w)
                              for w in range(1, settings.top_k + 1)}


def _rationale(gold: teacher_data.TeacherRecord) -> str:
  text = gold.samples[0].text
  suffix = formats.answer_only_target(gold.gold_answer)
  return text[:-len(suffix)] if text.endswith(suffix) else text


def make_chunk(job: Tuple[int, int, Sequence[teacher_data.TeacherRecord]]
               ) -> Tuple[int, str, str, ChunkStats]:
  """Writes one chunk's teacher and aligned part files; returns (chunk, paths, stats)."""
  chunk_index, first_question, golds = job
  settings: Settings = _WORKER["settings"]
  processor = _WORKER["processor"]
  stats = ChunkStats()
  records, rows = [], []
  for offset, gold in enumerate(golds):
    question_index = first_question + offset
    rationale = _rationale(gold)
    samples = []
    for sample_index in range(settings.samples_per_question):
      rng = random.Random(f"{settings.seed}/{question_index}/{sample_index}")
      text, target_length = make_text(rng, rationale, gold.question, gold.gold_answer)
      answer = answers.extract_answer(text)
      correct = teacher_data.is_correct(answer, gold.gold_number)
      if correct is not True:
        raise RuntimeError(f"{gold.id} sample {sample_index}: the generated text reads answer "
                           f"{answer} but gold is {gold.gold_number} ({text[-60:]!r}); this is a "
                           "bug in make_text")
      tokens = tokenize(text)
      logprobs, tops = teacher_top_logprobs(rng, tokens, _WORKER["teacher_bank"])
      offsets, at = [], 0
      for token in tokens:
        offsets.append(at)
        at += len(token)
      samples.append(teacher_data.TeacherSample(
          text=text, answer=answer, correct=True, tokens=tuple(tokens), logprobs=tuple(logprobs),
          top_logprobs=tuple(tuple(pos) for pos in tops), offsets=tuple(offsets),
          finish_reason="stop", meta={"target_length": target_length}))
      target = formats.teacher_cot_target(text)
      target_ids = processor.encode(target)
      topk_ids, topk_logprobs, kept = aligned_rows(rng, target_ids, _WORKER["aligned_banks"],
                                                   settings.top_k)
      rows.append(aligned_data.AlignedRow(
          id=gold.id, sample_index=sample_index, question=gold.question,
          gold_answer=gold.gold_answer, target=target, target_ids=tuple(target_ids),
          topk_ids=tuple(map(tuple, topk_ids)), topk_logprobs=tuple(map(tuple, topk_logprobs)),
          kept=kept, meta={"mode": "synthetic"}))
      stats.samples += 1
      stats.teacher_tokens += len(tokens)
      stats.target_teacher_tokens += len(tokenize(target))
      stats.target_ids += len(target_ids)
      stats.kept_rows += kept
    records.append(teacher_data.TeacherRecord(
        id=gold.id, source=gold.source, split=gold.split, question=gold.question,
        gold_answer=gold.gold_answer, gold_number=gold.gold_number, samples=tuple(samples),
        teacher=teacher_data.TeacherInfo(
            name=TEACHER_NAME, api="tools/make_paper_scale_teacher.py",
            params={"seed": settings.seed, "samples_per_question": settings.samples_per_question,
                    "top_k": settings.top_k}),
        meta={"origin": "synthetic stand-in for the paper's code-davinci-002 samples, built from "
                        "the GSM8K gold rationale"}))
    stats.questions += 1
  teacher_part = os.path.join(settings.parts_dir, f"teacher.{chunk_index:06d}.jsonl")
  aligned_part = os.path.join(settings.parts_dir, f"aligned.{chunk_index:06d}.jsonl")
  teacher_data.write_records(teacher_part, records)  # Both writers validate every line.
  aligned_data.write_aligned(aligned_part, rows)
  return chunk_index, teacher_part, aligned_part, stats


# ----------------------------------------------------------------------------- the run

def _size(num_bytes: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if num_bytes < 1000 or unit == "GB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
    num_bytes /= 1000
  return ""


def _append_and_remove(part: str, out) -> None:
  with open(part, encoding="utf-8", newline="") as f:
    shutil.copyfileobj(f, out, 1 << 20)
  os.remove(part)


def run(output_dir: pathlib.Path, golds: Sequence[teacher_data.TeacherRecord], settings: Settings,
        workers: int, questions_per_chunk: int) -> ChunkStats:
  jobs = [(k, start, list(golds[start:start + questions_per_chunk]))
          for k, start in enumerate(range(0, len(golds), questions_per_chunk))]
  total = ChunkStats()
  begin = time.perf_counter()
  next_report = 0.1
  with storage.atomic_write(output_dir / OUTPUT_TEACHER) as teacher_out, \
       storage.atomic_write(output_dir / OUTPUT_ALIGNED) as aligned_out:
    if workers <= 1:
      _worker_init(settings)
      results = map(make_chunk, jobs)
      pool = None
    else:
      # Fork when it is safe (JAX not loaded), as `alignment.align_records` does.
      method = ("fork" if "fork" in multiprocessing.get_all_start_methods()
                and "jax" not in sys.modules else "spawn")
      pool = multiprocessing.get_context(method).Pool(workers, _worker_init, (settings,))
      results = pool.imap(make_chunk, jobs)  # In job order, whatever finishes first.
    try:
      for _, teacher_part, aligned_part, stats in results:
        _append_and_remove(teacher_part, teacher_out)
        _append_and_remove(aligned_part, aligned_out)
        total.add(stats)
        done = total.questions / len(golds)
        if done >= next_report or total.questions == len(golds):
          elapsed = time.perf_counter() - begin
          rate = total.samples / elapsed
          eta = (len(golds) - total.questions) * (elapsed / total.questions)
          print(f"[make_paper_scale_teacher] {total.questions}/{len(golds)} questions "
                f"({100 * done:.0f} %), {total.samples} samples, {rate:.0f} samples/s, "
                f"ETA {eta:.0f} s", file=sys.stderr, flush=True)
          while next_report <= done:
            next_report += 0.1
    finally:
      if pool is not None:
        pool.terminate()
        pool.join()
  return total


def main(argv: Optional[Sequence[str]] = None) -> None:
  default_data = data_dir.data_dir()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_questions", type=int, default=PAPER_QUESTIONS,
                      help="the first N GSM8K train questions (default: all 7,473)")
  parser.add_argument("--samples_per_question", type=int, default=SAMPLES_PER_QUESTION)
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=str(default_data))
  parser.add_argument("--vocab", default=None,
                      help="T5 SentencePiece model (default: DATA_DIR/tokenizer/t5_spiece.model)")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--questions_per_chunk", type=int, default=32,
                      help="questions per worker task; does not change the output")
  args = parser.parse_args(argv)
  for name in ("num_questions", "samples_per_question", "top_k", "workers", "questions_per_chunk"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.top_k > teacher_data.MAX_TOP_LOGPROBS:
    parser.error(f"--top_k={args.top_k} exceeds the schema's {teacher_data.MAX_TOP_LOGPROBS}")
  if args.seed < 0:
    parser.error(f"--seed={args.seed} must be >= 0")
  data_root = pathlib.Path(args.data_dir)
  train_path = data_root / readers.GSM8K_FILES["train"]
  vocab = pathlib.Path(args.vocab) if args.vocab else data_root / "tokenizer" / "t5_spiece.model"
  for path, flag in ((train_path, "--data_dir"), (vocab, "--vocab")):
    if not path.is_file():
      parser.error(f"{path} does not exist; pass {flag} (`specialize download` fills the data directory)")
  begin = time.perf_counter()
  golds = teacher_sources.records_from_gsm8k_gold(train_path)
  if args.num_questions > len(golds):
    parser.error(f"--num_questions={args.num_questions} but {train_path} has {len(golds)}")
  golds = golds[:args.num_questions]
  output_dir = pathlib.Path(args.output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  parts_dir = tempfile.mkdtemp(dir=output_dir, prefix=".make_paper_scale_teacher.")
  settings = Settings(samples_per_question=args.samples_per_question, top_k=args.top_k,
                      seed=args.seed, vocab=str(vocab), parts_dir=parts_dir)
  try:
    total = run(output_dir, golds, settings, args.workers, args.questions_per_chunk)
  finally:
    shutil.rmtree(parts_dir, ignore_errors=True)
  seconds = time.perf_counter() - begin
  print(f"make_paper_scale_teacher: {total.questions} questions, {total.samples} samples, "
        f"mean target {total.target_teacher_tokens / total.samples:.1f} teacher tokens / "
        f"{total.target_ids / total.samples:.1f} T5 ids, "
        f"mean sample {total.teacher_tokens / total.samples:.1f} teacher tokens, "
        f"kept rows {100 * total.kept_rows / max(1, total.target_ids):.1f} %, "
        f"{OUTPUT_TEACHER} {_size(os.path.getsize(output_dir / OUTPUT_TEACHER))}, "
        f"{OUTPUT_ALIGNED} {_size(os.path.getsize(output_dir / OUTPUT_ALIGNED))}, "
        f"{seconds:.1f} s", flush=True)


if __name__ == "__main__":
  main()
