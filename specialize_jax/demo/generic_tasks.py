"""A small generated reasoning suite in the spirit of BIG-Bench Hard: the demo's generic ability.

`specialize demo` instruction-tunes a tiny T5 on these tasks, measures it, specializes it on
arithmetic word problems (`synthetic`) and measures it again: what it loses here is the generic
ability the specialization costs. Everything is generated (no download) and every text is short and
regular, since the students are tiny (d_model 128, a ~600-piece vocabulary trained on these texts).

Terms:
  task: one of TASKS; each has a generator that makes one example from random draws, and a one-line
    instruction that starts every input so the model can tell the tasks apart zero-shot.
  example (`GenericExample`): a question (one line, at most 30 words, no `Q:`), a gold chain of
    thought (CoT: at most 6 short lines, the last exactly `So the answer is {answer}.`) and the
    exact answer string.
  answer-only (ao) target: `So the answer is {answer}.`; CoT target: the chain of thought.
  exemplars: fixed few-shot examples of a task (`exemplars`: seed 12345, stream 99). Callers keep
    them out of their evaluation sets with `exclude_questions`.

The tasks, each with one question, its chain of thought and its answer:
  boolean_expressions: 2-3 operators of `not`, `and`, `or` over `True`/`False`, Python's precedence,
    parentheses around every nested `and`/`or`; the chain reduces the innermost operator first::

      not True and False
      not True = False.
      False and False = False.
      So the answer is False.

  dyck_languages: a bracket prefix over `( ) [ ] < >` with 2-4 brackets left open and 0-2 matched
    pairs inside; the chain removes the matched pairs, lists the open ones, closes them in reverse::

      Complete the sequence: ( [ ] <
      Remove [ ].
      Open: ( <.
      Close in reverse: > ).
      So the answer is > ).

  word_sorting: 3-4 words of SORT_WORDS with distinct first letters, so first letters decide::

      List: moon apple cat
      First letters: m a c.
      In order: a c m.
      So the answer is apple cat moon.

  tracking_objects: three of NAMES each hold one of ITEMS, 2-3 swaps; one line per swap::

      Ava has a ball, Ben has a hat, Cal has a key. Ava and Ben swap. Ben and Cal swap. What does
      Cal have?
      Ava hat, Ben ball, Cal key.
      Ava hat, Ben key, Cal ball.
      So the answer is ball.

  navigate: 2-4 moves from 0 (`Take n steps forward/backward.`, `Turn around.`, which flips the
    facing; never first, never twice in a row, never last); one line per move, then the check.
    Example i ends at the start iff i is even, so yes and no are balanced by construction::

      Start at 0. Take 3 steps forward. Turn around. Take 2 steps forward. Are you back at the
      start?
      0 + 3 = 3.
      Turn around: at 3, facing back.
      3 - 2 = 1.
      1 is not 0.
      So the answer is no.

  multistep_arithmetic: 2-3 operators of `+ - *` over one-digit operands 1-9, Python's precedence,
    every intermediate value in [0, 100) (no `- -6` in a chain) and the result in (-100, 100); one
    operation per line::

      ( 3 + 4 ) * 2 - 5
      3 + 4 = 7.
      7 * 2 = 14.
      14 - 5 = 9.
      So the answer is 9.

Input forms (`build_input`; `{instruction}` is the task's line, e.g. `Evaluate the boolean
expression.`):
  zero-shot: `{instruction}\\n\\nQ: {question}\\nA:`, then ` Let's think step by step.` for CoT.
  few-shot: `{instruction}\\n\\n`, then each exemplar as `Q: {q}\\nA: {cot or ao target}` joined by
    `\\n\\n`, then `\\n\\nQ: {question}\\nA:` (and the trigger for CoT).

Sizes: distinct questions per task are about 1,100 for boolean_expressions (90 with 2 operators),
8,600 for navigate (its yes half is the small one), 20,000 for dyck_languages and far more for the
others; `generate` raises a ValueError when it cannot find as many distinct ones as asked for.

Randomness: each (task, seed, stream) draws uniforms from its own
`numpy.random.default_rng([seed, stream, task index])` and maps them to choices by `int(u * n)`, so
the same arguments give the same examples on every platform.
"""
import dataclasses
import functools
import itertools
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

TASKS = ("boolean_expressions", "dyck_languages", "word_sorting", "tracking_objects", "navigate",
         "multistep_arithmetic")
INSTRUCTIONS = {
    "boolean_expressions": "Evaluate the boolean expression.",
    "dyck_languages": "Close the open brackets in the right order.",
    "word_sorting": "Sort the words alphabetically.",
    "tracking_objects": "Track the items through the swaps.",
    "navigate": "Follow the moves and say if you end at the start.",
    "multistep_arithmetic": "Calculate the value of the expression.",
}
SHOTS = ("zero", "few")
COT_TRIGGER = "Let's think step by step."
EXEMPLAR_SEED, EXEMPLAR_STREAM = 12345, 99

# Closed word lists.
BOOLEANS = ("True", "False")
BOOLEAN_OPERATORS = ("not", "and", "or")
CLOSER = {"(": ")", "[": "]", "<": ">"}
OPENERS = tuple(CLOSER)
SORT_WORDS = ("apple", "bird", "book", "cat", "cup", "door", "dog", "egg", "fish", "game", "hat",
              "ice", "jam", "kite", "lamp", "moon", "nest", "owl", "pig", "queen", "rain", "ring",
              "sun", "sea", "tree", "tea", "van", "web", "yard", "zoo")
NAMES = ("Ava", "Ben", "Cal", "Dan", "Eve", "Fay", "Gus", "Ivy")
ITEMS = ("ball", "hat", "key", "book", "cup", "pen", "kite", "bell", "lamp", "coin", "doll", "drum")
NAVIGATE_WORDS = ("step", "steps", "forward", "backward", "yes", "no")
ARITHMETIC_OPERATORS = ("+", "-", "*")

_BLOCK = 1024  # Uniforms drawn per numpy call.
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
_ANSWER_END = re.compile(r"\.|\n| Q:")


@dataclasses.dataclass(frozen=True)
class GenericExample:
  task: str
  question: str  # The problem, no "Q:" prefix, one line.
  cot: str  # Chain of thought lines joined by "\n"; the last is f"So the answer is {answer}.".
  answer: str  # The exact answer string.


class _Draws:
  """Uniforms in [0, 1) from one numpy generator, fetched in blocks, and choices made from them."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self._block: List[float] = []
    self._next = 0

  def uniform(self) -> float:
    if self._next == len(self._block):
      self._block, self._next = self._rng.random(_BLOCK).tolist(), 0
    self._next += 1
    return self._block[self._next - 1]

  def integer(self, low: int, high: int) -> int:
    """An integer in [low, high], both included."""
    return low + int(self.uniform() * (high - low + 1))

  def choice(self, options: Sequence):
    return options[int(self.uniform() * len(options))]

  def sample(self, options: Sequence, k: int) -> list:
    """k distinct options in random order."""
    remaining = list(options)
    return [remaining.pop(int(self.uniform() * len(remaining))) for _ in range(k)]


# A generator returns (question, chain lines before the answer line, answer).
_Generated = Tuple[str, List[str], str]


# --------------------------------------------------------------------------------------------------
# Expression trees (boolean_expressions, multistep_arithmetic): a leaf is a string, a node is
# (operator, operand) for `not` or (operator, left, right).


def _random_tree(draw: _Draws, num_operators: int, leaf: Callable[[], str],
                 operators: Sequence[str]):
  if num_operators == 0:
    return leaf()
  operator = draw.choice(operators)
  if operator == "not":
    return (operator, _random_tree(draw, num_operators - 1, leaf, operators))
  left = draw.integer(0, num_operators - 1)
  return (operator, _random_tree(draw, left, leaf, operators),
          _random_tree(draw, num_operators - 1 - left, leaf, operators))


_PRECEDENCE = {"or": 0, "and": 1, "not": 2, "+": 0, "-": 0, "*": 1}


def _render(tree) -> str:
  """The tree as a Python expression that parses back into the same tree: an operand in parentheses
  when it binds more loosely than its operator, or as tightly on the right (or any and/or)."""
  if isinstance(tree, str):
    return tree
  if tree[0] == "not":
    operand = tree[1]
    text = _render(operand)
    return f"not ( {text} )" if isinstance(operand, tuple) and len(operand) == 3 else f"not {text}"
  operator, left, right = tree
  parts = []
  for side, operand in (("left", left), ("right", right)):
    text = _render(operand)
    if isinstance(operand, tuple) and len(operand) == 3 and (
        operator in ("and", "or") or _PRECEDENCE[operand[0]] < _PRECEDENCE[operator]
        or (side == "right" and _PRECEDENCE[operand[0]] == _PRECEDENCE[operator])):
      text = f"( {text} )"
    parts.append(text)
  return f"{parts[0]} {operator} {parts[1]}"


def _reduce(tree, apply: Callable[..., str], lines: List[str]) -> str:
  """The tree's value; appends one `operation = value.` line per operator, operands first."""
  if isinstance(tree, str):
    return tree
  values = [_reduce(operand, apply, lines) for operand in tree[1:]]
  value = apply(tree[0], *values)
  if len(values) == 1:
    lines.append(f"{tree[0]} {values[0]} = {value}.")
  else:
    lines.append(f"{values[0]} {tree[0]} {values[1]} = {value}.")
  return value


def _apply_boolean(operator: str, *values: str) -> str:
  truth = [value == "True" for value in values]
  if operator == "not":
    return str(not truth[0])
  return str(all(truth) if operator == "and" else any(truth))


def _apply_arithmetic(operator: str, left: str, right: str) -> str:
  a, b = int(left), int(right)
  return str(a + b if operator == "+" else a - b if operator == "-" else a * b)


# --------------------------------------------------------------------------------------------------
# One generator per task.


def _boolean_expressions(draw: _Draws, index: int) -> _Generated:
  del index  # Unused.
  tree = _random_tree(draw, draw.integer(2, 3), lambda: draw.choice(BOOLEANS), BOOLEAN_OPERATORS)
  lines: List[str] = []
  answer = _reduce(tree, _apply_boolean, lines)
  return _render(tree), lines, answer


def _dyck_languages(draw: _Draws, index: int) -> _Generated:
  del index  # Unused.
  tokens = [draw.choice(OPENERS) for _ in range(draw.integer(2, 4))]
  for _ in range(draw.integer(0, 2)):  # Matched pairs, inserted anywhere (they may nest).
    opener = draw.choice(OPENERS)
    at = draw.integer(0, len(tokens))
    tokens[at:at] = [opener, CLOSER[opener]]
  lines = []
  remaining = list(tokens)
  while True:  # Remove the leftmost adjacent matched pair until none is left.
    pair = next((i for i in range(len(remaining) - 1)
                 if CLOSER.get(remaining[i]) == remaining[i + 1]), None)
    if pair is None:
      break
    lines.append(f"Remove {remaining[pair]} {remaining[pair + 1]}.")
    del remaining[pair:pair + 2]
  answer = " ".join(CLOSER[token] for token in reversed(remaining))
  lines += [f"Open: {' '.join(remaining)}.", f"Close in reverse: {answer}."]
  return f"Complete the sequence: {' '.join(tokens)}", lines, answer


def _word_sorting(draw: _Draws, index: int) -> _Generated:
  del index  # Unused.
  count = draw.integer(3, 4)
  chosen: List[str] = []
  while len(chosen) < count:
    word = draw.choice(SORT_WORDS)
    if word[0] not in {w[0] for w in chosen}:
      chosen.append(word)
  ordered = sorted(chosen)
  lines = [f"First letters: {' '.join(w[0] for w in chosen)}.",
           f"In order: {' '.join(w[0] for w in ordered)}."]
  return f"List: {' '.join(chosen)}", lines, " ".join(ordered)


def _tracking_objects(draw: _Draws, index: int) -> _Generated:
  del index  # Unused.
  people = draw.sample(NAMES, 3)
  holding = dict(zip(people, draw.sample(ITEMS, 3)))
  sentences = [", ".join(f"{person} has a {holding[person]}" for person in people) + "."]
  lines = []
  previous = None
  for _ in range(draw.integer(2, 3)):
    pair = draw.choice([p for p in itertools.combinations(people, 2) if p != previous])
    previous = pair
    a, b = pair if draw.uniform() < 0.5 else pair[::-1]
    holding[a], holding[b] = holding[b], holding[a]
    sentences.append(f"{a} and {b} swap.")
    lines.append(", ".join(f"{person} {holding[person]}" for person in people) + ".")
  asked = draw.choice(people)
  sentences.append(f"What does {asked} have?")
  return " ".join(sentences), lines, holding[asked]


def _navigate(draw: _Draws, index: int) -> _Generated:
  """Example `index` ends at the start iff `index` is even (half yes, half no)."""
  back_at_start = index % 2 == 0
  num_moves = draw.integer(2, 4)
  while True:  # Draw the moves before the last until the last can return to 0 (when it must).
    moves = []  # (steps, word) or None for a turn.
    position, facing = 0, 1
    for i in range(num_moves - 1):
      if i > 0 and moves[-1] is not None and draw.uniform() < 1 / 3:
        moves.append(None)
        facing = -facing
      else:
        moves.append((draw.integer(1, 9), draw.choice(("forward", "backward"))))
        position += facing * moves[-1][0] * (1 if moves[-1][1] == "forward" else -1)
    if not back_at_start or 0 < abs(position) <= 9:
      break
  if back_at_start:
    last = (abs(position), "forward" if -position * facing > 0 else "backward")
  else:
    last = (draw.integer(1, 9), draw.choice(("forward", "backward")))
    if position + facing * last[0] * (1 if last[1] == "forward" else -1) == 0:
      last = (last[0], "backward" if last[1] == "forward" else "forward")
  moves.append(last)

  sentences, lines = ["Start at 0."], []
  position, facing = 0, 1
  for move in moves:
    if move is None:
      facing = -facing
      sentences.append("Turn around.")
      lines.append(f"Turn around: at {position}, facing {'forward' if facing > 0 else 'back'}.")
      continue
    steps, word = move
    sentences.append(f"Take {steps} step{'' if steps == 1 else 's'} {word}.")
    delta = facing * steps * (1 if word == "forward" else -1)
    lines.append(f"{position} {'+' if delta > 0 else '-'} {steps} = {position + delta}.")
    position += delta
  sentences.append("Are you back at the start?")
  lines.append(f"{position} is 0." if position == 0 else f"{position} is not 0.")
  return " ".join(sentences), lines, "yes" if position == 0 else "no"


def _multistep_arithmetic(draw: _Draws, index: int) -> _Generated:
  del index  # Unused.
  num_operators = draw.integer(2, 3)
  while True:  # Redraw until the values lie in range (see the module docstring).
    tree = _random_tree(draw, num_operators, lambda: str(draw.integer(1, 9)),
                        ARITHMETIC_OPERATORS)
    lines: List[str] = []
    answer = _reduce(tree, _apply_arithmetic, lines)
    values = [int(line.split("= ")[1].rstrip(".")) for line in lines]
    if all(0 <= value < 100 for value in values[:-1]) and abs(values[-1]) < 100:
      return _render(tree), lines, answer


_GENERATORS: Dict[str, Callable[[_Draws, int], _Generated]] = {
    "boolean_expressions": _boolean_expressions,
    "dyck_languages": _dyck_languages,
    "word_sorting": _word_sorting,
    "tracking_objects": _tracking_objects,
    "navigate": _navigate,
    "multistep_arithmetic": _multistep_arithmetic,
}


# --------------------------------------------------------------------------------------------------
# Public API.


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"Unknown generic task {task!r}; expected one of {', '.join(TASKS)}.")


def generate(task: str, num_examples: int, seed: int, stream: int = 0,
             exclude_questions: Iterable[str] = ()) -> List[GenericExample]:
  """`num_examples` examples of `task` with distinct questions, none in `exclude_questions`.

  Deterministic for (task, seed, stream); `stream` separates the random streams of sets that share a
  seed. Raises ValueError for an unknown task, or when distinct questions run out.
  """
  _check_task(task)
  if num_examples < 0:
    raise ValueError(f"num_examples={num_examples} must be >= 0.")
  draw = _Draws(np.random.default_rng([seed, stream, TASKS.index(task)]))
  make = _GENERATORS[task]
  seen = set(exclude_questions)
  examples: List[GenericExample] = []
  max_draws = 20 * num_examples + 1000  # Only stops a loop over an exhausted question space.
  draws = 0
  while len(examples) < num_examples:
    if draws == max_draws:
      raise ValueError(f"Drew {draws} {task} questions but found only {len(examples)} distinct "
                       f"ones of the {num_examples} asked for; ask for fewer examples.")
    draws += 1
    question, lines, answer = make(draw, len(examples))
    if question not in seen:
      seen.add(question)
      examples.append(GenericExample(task=task, question=question, answer=answer,
                                     cot="\n".join(lines + [f"So the answer is {answer}."])))
  return examples


def exemplars(task: str, num: int = 2) -> List[GenericExample]:
  """The task's fixed few-shot exemplars."""
  return list(_exemplars(task, num))


@functools.lru_cache(maxsize=None)
def _exemplars(task: str, num: int) -> Tuple[GenericExample, ...]:
  """Made once per (task, num): `build_input` needs them for every few-shot input."""
  return tuple(generate(task, num, seed=EXEMPLAR_SEED, stream=EXEMPLAR_STREAM))


def target(example: GenericExample, cot: bool) -> str:
  """The training target: the chain of thought, or the answer-only line."""
  return example.cot if cot else f"So the answer is {example.answer}."


def build_input(example_or_question: Union[GenericExample, str], task: str, shots: str,
                cot: bool) -> str:
  """The input text of one question (see the module docstring for the forms)."""
  _check_task(task)
  if shots not in SHOTS:
    raise ValueError(f"Unknown shots {shots!r}; expected one of {', '.join(SHOTS)}.")
  question = example_or_question
  if isinstance(example_or_question, GenericExample):
    if example_or_question.task != task:
      raise ValueError(f"A {example_or_question.task} example cannot take a {task} input.")
    question = example_or_question.question
  parts = [INSTRUCTIONS[task]]
  if shots == "few":
    parts += [f"Q: {e.question}\nA: {target(e, cot)}" for e in exemplars(task)]
  parts.append(f"Q: {question}\nA:" + (f" {COT_TRIGGER}" if cot else ""))
  return "\n\n".join(parts)


def extract_answer(prediction: str) -> Optional[str]:
  """The text after the last `answer is` (any case) up to the first `.`, newline or ` Q:`,
  stripped; None when the prediction has no `answer is`."""
  matches = list(_ANSWER_IS.finditer(prediction))
  if not matches:
    return None
  rest = prediction[matches[-1].end():]
  end = _ANSWER_END.search(rest)
  return (rest[:end.start()] if end else rest).strip()


def is_correct(prediction: str, answer: str) -> bool:
  """Whether the extracted answer equals `answer`, runs of whitespace counting as one space."""
  extracted = extract_answer(prediction)
  return extracted is not None and extracted.split() == answer.split()


def words() -> List[str]:
  """Every word of the tasks' closed lists (booleans and operators, brackets, sort words, names,
  items, navigate words), sorted: for vocabulary training. Numbers and the fixed template wording
  (instructions, `Start at`, ...) are not listed."""
  return sorted(set(BOOLEANS + BOOLEAN_OPERATORS + OPENERS + tuple(CLOSER.values()) + SORT_WORDS
                    + NAMES + ITEMS + NAVIGATE_WORDS))
