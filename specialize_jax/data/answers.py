"""Reading a numeric answer out of model text, and comparing it with the gold answer.

Terms:
  prediction text: what the model generated, usually a chain of thought ending in
    "The answer is 18." (our formats) or a final line "A: 18" (GSM8K-style solutions).
  gold text: a dataset's answer as written: GSM8K "... #### 1,000", the GSM8K-style "...\\nA: 72",
    ASDiv "9 (apples)", SVAMP/MultiArith "39.0".
  answer marker: "answer is" (any case), or "A:" opening the last non-empty line. The later of the
    two in the text wins.
  mode: "default" normalizes numbers (below); "paper" reproduces the original code's rule
    (FranxYao/FlanT5-CoT-Specialization, src/utils.py `test_answer`) so its numbers can be matched.

Default mode, prediction: first the text is cut where it starts a new exemplar (a run-on: "Q:" or
"Question:" after whitespace, as the eval prompts and the teacher prompts open each exemplar), then
the first number after the last answer marker, on the marker's line; if there is no marker, or no
number on its line, the last number of the text before the cut. A number is
  * optionally negative: "-3", "=-2880", "-$3", "$-3" (a "-" right after a digit or letter is
    subtraction or a range: "5-3=2" and "3-4" read 5, 3, 2 and 3, 4);
  * optionally preceded by "$" and followed by "%" or a unit, which are ignored ("50%" is 50,
    "5 cm" is 5, "9 (apples)" is 9);
  * digits with optional thousands groups of exactly three ("1,000" is 1000, "1,000.5" is 1000.5;
    "1, 2" and "1,2" are two numbers);
  * an optional decimal part ("2.50", ".5"); a sentence's final period is not part of it;
  * optionally a simple fraction "a/b" with no spaces ("3/4" is 0.75). Mixed numbers ("1 1/2")
    read as two numbers, dates ("12/14/1937") read only their first field, "a/0" reads as a.
Not supported (read as their digits only): scientific notation, scale words ("1.5 million" is 1.5),
number words ("seven").

Paper mode, prediction and gold: the last match of `\\d*\\.?\\d+` in the whole text, as a float.
It ignores minus signs ("-3" reads 3) and splits thousands ("1,000" reads 0: its last match is
"000"). Answers are equal when the floats are equal.
"""
import math
import re
from typing import Optional

MODES = ("default", "paper")

# Tolerances of the default comparison. Equal decimal strings parse to equal floats, so these only
# absorb float noise (a fraction computed two ways). rel 1e-12 keeps integers distinct up to 1e12.
REL_TOL = 1e-12
ABS_TOL = 1e-6

# One number (see the module docstring). The lookbehind keeps us out of words ("H2O", "x2"),
# decimals and dotted versions ("1.2.3" reads 1.2), and date or fraction tails ("12/14/1937").
_NUMBER_RE = re.compile(
    r"""
    (?=[-\u2212$.\d])  # Redundant first-character check: lets the engine skip ahead fast.
    (?<![\w./])
    (?P<sign>[-\u2212](?=\$?\.?\d))?
    \$?
    (?P<sign_after_dollar>-(?=\.?\d))?
    (?=\.?\d)
    (?P<integer>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?
    (?P<decimal>\.\d+)?
    (?:/(?P<denominator>\d+)(?![\d/]))?
    """, re.VERBOSE)

# The original's rule, verbatim (src/utils.py `test_answer` / `find_answer`).
PAPER_NUMBER_PATTERN = r"\d*\.?\d+"
# Every match starts with a digit or ".", so the lookahead changes no match; it lets the engine skip
# ahead fast (about twice as fast on GSM8K solutions).
_PAPER_NUMBER_RE = re.compile(r"(?=[\d.])" + PAPER_NUMBER_PATTERN)

# A new exemplar starts: students run on into one after answering ("The answer is 18. Q: ...
# The answer is 7"). The eval prompts join exemplars with "\n\nQ: ", the teacher's with
# "\n\nQuestion: "; FlanT5 has no newline token, so a run-on writes " Q: ". A "Q:" opening the text
# is the model's own, not a new exemplar.
_NEXT_EXEMPLAR_RE = re.compile(r"\s(?:Q|Question):")

_ANSWER_IS = "answer is"
_ANSWER_IS_RE = re.compile(r"\banswer is\b", re.IGNORECASE)
# "A:" opening the last non-empty line; group `rest` is the remainder of that line.
_FINAL_A_LINE_RE = re.compile(r"^[ \t]*A:(?P<rest>[^\n]*)\s*\Z", re.MULTILINE)
_GSM8K_GOLD_MARKER = "####"


def check_mode(mode: str) -> None:
  """Raises ValueError unless `mode` is one of MODES."""
  if mode not in MODES:
    raise ValueError(f"Unknown answer mode {mode!r}; use one of {MODES} ('default' normalizes "
                     "numbers, 'paper' reproduces the original regex).")


def _number_value(match: "re.Match[str]") -> float:
  """The float a `_NUMBER_RE` match denotes (inf for absurdly long digit runs, never an error)."""
  integer = match.group("integer")
  text = (integer.replace(",", "") if integer else "0") + (match.group("decimal") or "")
  value = float(text)
  denominator = match.group("denominator")
  if denominator is not None:
    # float(), not int(): a 400-digit denominator must not overflow or hit int's digit limit.
    denominator_value = float(denominator)
    if denominator_value != 0:
      value /= denominator_value
  if match.group("sign") or match.group("sign_after_dollar"):
    value = -value
  return value


def _first_number(text: str) -> Optional[float]:
  match = _NUMBER_RE.search(text)
  return _number_value(match) if match else None


def _last_match(pattern: "re.Pattern[str]", text: str) -> Optional["re.Match[str]"]:
  """The last match of `pattern` in `text`, scanning whitespace-separated tokens from the end.

  Same result as the last of `pattern.finditer(text)` for our two number patterns, because their
  matches hold no whitespace and their lookarounds treat whitespace like the string's ends; about
  10x faster on a chain of thought, whose answer is near its end.
  """
  for token in reversed(text.split()):
    last = None
    for last in pattern.finditer(token):
      pass
    if last is not None:
      return last
  return None


def _last_number(text: str) -> Optional[float]:
  match = _last_match(_NUMBER_RE, text)
  return _number_value(match) if match else None


def _last_answer_is(text: str) -> Optional[int]:
  """Where the last whole-word "answer is" (any case) ends in `text`, or None."""
  lowered = text.lower()
  if len(lowered) != len(text):  # A few characters change length when lowered: use the regex.
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
      pass
    return last.end() if last else None
  # rfind is several times faster than scanning with the case-insensitive regex.
  end = len(lowered)
  while True:
    start = lowered.rfind(_ANSWER_IS, 0, end)
    if start < 0:
      return None
    stop = start + len(_ANSWER_IS)
    if not (start > 0 and _is_word_char(lowered[start - 1]) or
            stop < len(lowered) and _is_word_char(lowered[stop])):
      return stop
    end = stop - 1


def _is_word_char(char: str) -> bool:
  return char.isalnum() or char == "_"


def _marker_span(text: str) -> Optional[str]:
  """The text after the last answer marker, to the end of its line; None without a marker."""
  answer_is_end = _last_answer_is(text)
  final_a = _FINAL_A_LINE_RE.search(text) if "A:" in text else None
  if final_a is not None and (answer_is_end is None or final_a.start() > answer_is_end):
    return final_a.group("rest")
  if answer_is_end is None:
    return None
  # "The answer is:\n18" puts the number on the next line: skip blanks and a colon first.
  rest = text[answer_is_end:].lstrip(" \t\n:")
  return rest.split("\n", 1)[0]


def before_next_exemplar(text: str) -> str:
  """`text` up to where it runs on into a new exemplar (see `_NEXT_EXEMPLAR_RE`); all of it if
  it does not. The answer of a run-on is the one before the new question, never the one the model
  invents for it."""
  match = _NEXT_EXEMPLAR_RE.search(text)
  return text if match is None else text[:match.start()]


def extract_answer(text: str, mode: str = "default") -> Optional[float]:
  """The model's numeric answer in `text`, or None when it holds no number.

  Never raises on odd text: a generation is scored, not validated.
  """
  check_mode(mode)
  if not isinstance(text, str):
    raise ValueError(f"extract_answer expects the model's text as str, got {type(text).__name__}: "
                     f"{text!r}; decode bytes first.")
  if mode == "paper":
    match = _last_match(_PAPER_NUMBER_RE, text)
    return float(match.group()) if match else None
  # Departure from the original, which always took the last number of the whole text: FlanT5 has
  # no newline token and often runs on into a new exemplar after answering ("The answer is 18. Q:
  # Janet has 16 ducks ... The answer is 7"), so the answer is read before the new exemplar, after
  # its answer marker. (The original's log parser started a new record at a line opening "Q: ",
  # which cut run-ons only where the model wrote a newline.)
  text = before_next_exemplar(text)
  span = _marker_span(text)
  if span is not None:
    value = _first_number(span)
    if value is not None:
      return value
  # No marker, or a marker with no number on its line ("The answer is unknown"): like the
  # original, fall back to the last number (before any new exemplar).
  return _last_number(text)


def _gold_tail(text: str) -> str:
  """The part of a gold text that holds the answer: after "####", else after the last answer
  marker (our CoT targets end "The answer is 1,200"), else all of it."""
  if _GSM8K_GOLD_MARKER in text:
    return text.rsplit(_GSM8K_GOLD_MARKER, 1)[1]
  span = _marker_span(text)
  return text if span is None else span


def parse_gold(text: str, mode: str = "default") -> float:
  """The gold answer as a float; raises ValueError when `text` is not one number.

  Default mode is strict, because a gold answer must be unambiguous: after the "####" or answer
  marker ("answer is", a final "A:" line; else in the whole text) there must be exactly one
  number, optionally with "$" before it, and after it only text without digits ("%", "(apples)",
  " cm", "th", a period). ASDiv answers such as "5:45",
  "8; 40", "February 3rd", "-(1/3)" or "Yes" raise. Paper mode reads the last `\\d*\\.?\\d+` of the
  whole text, as the original did (it counted golds without a number as wrong; so do the metrics).
  """
  check_mode(mode)
  if not isinstance(text, str):
    raise ValueError(f"parse_gold expects the gold answer as str, got {type(text).__name__}: "
                     f"{text!r}; pass numbers to the metrics directly.")
  if mode == "paper":
    match = _last_match(_PAPER_NUMBER_RE, text)
    if match is None:
      raise ValueError(f"Gold answer {text!r} has no number (paper rule `\\d*\\.?\\d+`).")
    return float(match.group())
  tail = _gold_tail(text)
  matches = list(_NUMBER_RE.finditer(tail))
  if (len(matches) != 1 or tail[:matches[0].start()].strip() or
      any(c.isdigit() for c in tail[matches[0].end():])):
    raise ValueError(
        f"Gold answer {text!r} is not a single number (accepted forms: '#### 72', "
        "'The answer is 72', a final 'A: 72' line, '9 (apples)', '39.0', '$1,000', '50%', '3/4'). "
        "Non-numeric or multi-part golds cannot be scored as math answers: drop them, or count "
        "them as wrong (the metrics do, reporting them as 'unparsable_targets').")
  return _number_value(matches[0])


def answers_match(pred: Optional[float], gold: float, mode: str = "default") -> bool:
  """Whether a predicted number equals the gold one; a missing prediction never matches.

  Default: `math.isclose` with REL_TOL and ABS_TOL (absorbs float noise, not rounding by the
  model: 0.33 does not match 1/3). Paper: float equality, as the original did.
  """
  check_mode(mode)
  if gold is None:
    raise ValueError("answers_match got gold=None: parse the gold answer with parse_gold first "
                     "and skip (or count as wrong) examples whose gold is not a number.")
  if pred is None:
    return False
  if mode == "paper":
    return float(pred) == float(gold)
  return math.isclose(pred, gold, rel_tol=REL_TOL, abs_tol=ABS_TOL)
