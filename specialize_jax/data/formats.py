"""The four prompt formats (docs/method.md), for training (distillation) and for evaluation.

Terms:
- *answer-only (ao)* targets are `The answer is X`; *chain-of-thought (cot)* targets are a full
  reasoning chain that ends in `The answer is X`.
- *zero-shot (zs)* inputs hold only the question; *in-context (icl)* inputs prepend exemplars: worked
  GSM8K train problems (gold rationale without calculator notes for CoT, gold answer for answer-only).
- *length policy*: when an in-context input would exceed its token budget, whole exemplars are dropped
  (the earliest first), never question text.

Departures from the original, on purpose: exemplars are drawn from a seeded generator keyed by the
example's position (the original drew them unseeded), and never include the target question itself
(the original could draw it, leaking the answer into the input).
"""
import itertools
import re
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from specialize_jax.data.records import MathExample
from specialize_jax.errors import ConfigError

FORMATS = ("zs_ao", "zs_cot", "icl_ao", "icl_cot")
COT_TRIGGER = "Let's think step by step"
NUM_EXEMPLARS = 4

_ANSWER_LINE = re.compile(r"^.*answer is.*$", re.MULTILINE | re.IGNORECASE)


def is_in_context(format_name: str) -> bool:
  return format_name.startswith("icl_")


def is_chain_of_thought(format_name: str) -> bool:
  return format_name.endswith("_cot")


def check_format(format_name: str) -> None:
  if format_name not in FORMATS:
    raise ConfigError(f"Unknown format {format_name!r}; expected one of {', '.join(FORMATS)}.")


# ---------------------------------------------------------------------------------------------------
# Pieces.


def answer_only_target(answer_text: str) -> str:
  return f"The answer is {answer_text}"


def cot_target(example: MathExample) -> str:
  """A gold chain in the CoT target form: rationale, then `The answer is X`."""
  return f"{example.rationale}{answer_only_target(example.answer_text)}"


def cut_after_answer_line(text: str) -> Optional[str]:
  """Teacher text up to the end of its first line that contains `answer is` (the original's cut); None
  when there is no such line (a malformed sample)."""
  match = _ANSWER_LINE.search(text)
  return text[:match.end()].strip() if match else None


def trigger_tail_length(text: str) -> int:
  """Characters to skip at the start of a teacher completion: a first line that only finishes the
  CoT trigger (the paper's Codex samples begin `" step\\n"`, their prompt ending in "Let's think"),
  with its newline; 0 when the completion starts with the chain itself."""
  newline = text.find("\n")
  if newline < 0:
    return 0
  words = text[:newline].split()
  trigger = COT_TRIGGER.split()
  return newline + 1 if words and trigger[-len(words):] == words else 0


def teacher_cot_target(text: str) -> Optional[str]:
  """The CoT training target of a teacher completion: its trigger tail skipped
  (`trigger_tail_length`), then cut after its answer line; None when it has no answer line."""
  return cut_after_answer_line(text[trigger_tail_length(text):]) or None


def cot_exemplar(example: MathExample) -> str:
  return f"Q: {example.question}\n{COT_TRIGGER}\n{cot_target(example)}\n\n"


def answer_only_exemplar(example: MathExample) -> str:
  return f"Q: {example.question}\nA: {answer_only_target(example.answer_text)}\n\n"


def question_suffix(question: str, format_name: str) -> str:
  """The part of the input after the exemplars."""
  check_format(format_name)
  if format_name == "zs_ao":
    return f"Q: {question} A:"
  if format_name == "icl_ao":
    return f"Q: {question}\nA:"
  return f"Q: {question}\n{COT_TRIGGER}"


def build_input(question: str, format_name: str, exemplars: Sequence[MathExample] = ()) -> str:
  """The encoder input of one example in one training format (the original's text, exactly)."""
  check_format(format_name)
  if not is_in_context(format_name):
    return question_suffix(question, format_name)
  render = cot_exemplar if is_chain_of_thought(format_name) else answer_only_exemplar
  return "".join(render(e) for e in exemplars) + question_suffix(question, format_name)


# ---------------------------------------------------------------------------------------------------
# Evaluation prompts: the original's fixed 4-shot test prompt.


def eval_template(format_name: str, cot_prompt: str = "",
                  answer_only_prompt: str = "") -> Tuple[str, str]:
  """`(prefix, suffix)` of the encoder input at evaluation time: input = prefix + question + suffix.

  One template serves the Python sources and the TFDS/TF-op path alike. `cot_prompt` is the text of
  `prompt_simple_4_cases.txt` (the original's in-context CoT test prompt); `answer_only_prompt` the
  same exemplars in answer-only form (`answer_only_prompt_from`).
  """
  check_format(format_name)
  if format_name == "icl_cot":
    return f"{cot_prompt}\nQ: ", f"\n{COT_TRIGGER}\n"
  if format_name == "zs_cot":
    return "Q: ", f"\n{COT_TRIGGER}\n"
  if format_name == "icl_ao":
    return f"{answer_only_prompt}Q: ", "\nA:"
  return "Q: ", " A:"


def eval_input(question: str, format_name: str, cot_prompt: str = "",
               answer_only_prompt: str = "") -> str:
  """The encoder input at evaluation time."""
  prefix, suffix = eval_template(format_name, cot_prompt, answer_only_prompt)
  return f"{prefix}{question}{suffix}"


def answer_only_prompt_from(exemplars: Sequence) -> str:
  """Answer-only exemplars (`Q: q\\nA: The answer is a\\n\\n` each) from parsed prompt exemplars."""
  return "".join(f"Q: {e.question}\nA: {answer_only_target(e.answer)}\n\n" for e in exemplars)


# ---------------------------------------------------------------------------------------------------
# Exemplar choice and the length policy.


class ExemplarSampler:
  """Draws in-context exemplars from a pool, reproducibly and never the target question."""

  def __init__(self, pool: Sequence[MathExample], num_exemplars: int = NUM_EXEMPLARS, seed: int = 0):
    if len(pool) <= num_exemplars:
      raise ValueError(f"Exemplar pool has {len(pool)} problems; need more than {num_exemplars}.")
    self._pool = list(pool)
    self._num = num_exemplars
    self._seed = seed

  def choose(self, key: Union[int, Sequence[int]], question: str) -> List[MathExample]:
    """Exemplars for the example with key `key` (e.g. its question's position and sample index):
    same key, same exemplars. Any pool entry with the target's question text is skipped."""
    key = [key] if isinstance(key, int) else list(key)
    rng = np.random.default_rng([self._seed, *key])
    candidates = rng.choice(len(self._pool), size=self._num + 1, replace=False)
    chosen = [self._pool[i] for i in candidates if self._pool[i].question != question]
    return chosen[:self._num]


def fit_exemplars(question: str, format_name: str, exemplars: Sequence[MathExample],
                  max_tokens: Optional[int], count_tokens: Callable[[str], int]) -> str:
  """`build_input` with as many exemplars as fit in `max_tokens` (earliest dropped first)."""
  exemplars = list(exemplars)
  text = build_input(question, format_name, exemplars)
  while max_tokens is not None and exemplars and count_tokens(text) > max_tokens:
    exemplars.pop(0)
    text = build_input(question, format_name, exemplars)
  return text


class SentencePieceCounter:
  """Counts tokens the way the model's SentencePiece vocabulary will (plus EOS)."""

  def __init__(self, vocab_path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gs:// paths)
    with tf.io.gfile.GFile(vocab_path, "rb") as f:
      self._processor = sentencepiece.SentencePieceProcessor(model_proto=f.read())

  def __call__(self, text: str) -> int:
    return len(self._processor.encode(text)) + 1


# ---------------------------------------------------------------------------------------------------
# Training examples from teacher data.


def distillation_examples(records: Sequence, format_name: str, sampler: ExemplarSampler,
                          max_input_tokens: Optional[int] = None,
                          count_tokens: Optional[Callable[[str], int]] = None,
                          exclude_questions: frozenset = frozenset(),
                          stats: Optional[dict] = None,
                          positions: Optional[Iterable[int]] = None) -> Iterator[dict]:
  """Training examples of one format from teacher records (`teacher_data.TeacherRecord`).

  Answer-only formats give one example per question (target from the gold answer); CoT formats give
  one per correct teacher sample (target = `teacher_cot_target` of the sample). Questions in
  `exclude_questions` (the dev and test splits) are skipped. Yields dicts with `id`, `inputs`,
  `targets`, `answer`, `sample_index` (-1 for answer-only). `stats`, when given, counts what was
  skipped and why. `positions` are the records' positions in their file (default 0, 1, ...), which
  key the exemplar draws: a chunk of a file gets the exemplars the whole file would.
  """
  check_format(format_name)
  if is_in_context(format_name) and max_input_tokens is not None and count_tokens is None:
    raise ValueError("The length policy needs `count_tokens` when `max_input_tokens` is set.")
  stats = {} if stats is None else stats
  for key in ("excluded_questions", "incorrect_samples", "malformed_samples"):
    stats.setdefault(key, 0)
  for position, record in zip(itertools.count() if positions is None else positions, records):
    if record.question in exclude_questions:
      stats["excluded_questions"] += 1
      continue

    def make_input(key):
      if not is_in_context(format_name):
        return build_input(record.question, format_name)
      exemplars = sampler.choose(key, record.question)
      return fit_exemplars(record.question, format_name, exemplars, max_input_tokens, count_tokens)

    if not is_chain_of_thought(format_name):
      yield {"id": record.id, "inputs": make_input(position),
             "targets": answer_only_target(record.gold_answer), "answer": record.gold_answer,
             "sample_index": -1}
      continue
    for sample_index, sample in enumerate(record.samples):
      if not sample.correct:
        stats["incorrect_samples"] += 1
        continue
      target = teacher_cot_target(sample.text)
      if target is None:
        stats["malformed_samples"] += 1
        continue
      # Each chain gets its own exemplars (keyed by question and sample), as the original's per-batch
      # draw did; a question's chains therefore do not all share one context.
      yield {"id": record.id, "inputs": make_input((position, sample_index)), "targets": target,
             "answer": record.gold_answer, "sample_index": sample_index}
