"""The normalized record every math reader returns."""
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class MathExample:
  """One math word problem from any source.

  Attributes:
    id: stable id within its source (e.g. ``gsm8k/train/17``, ``asdiv/nluds-0001``).
    question: the question text as the model sees it (sources' own joining rules applied).
    answer_text: the gold answer as the source writes it (``"72"``, ``"9 (apples)"``, ``"39.0"``).
    answer_number: the gold answer as a number (None only if the source's answer is not numeric).
    source: dataset name (``gsm8k``, ``multiarith``, ``asdiv``, ``svamp``, ...).
    rationale: gold step-by-step solution without calculator annotations, when the source has one
      (GSM8K); empty otherwise.
  """
  id: str
  question: str
  answer_text: str
  answer_number: Optional[float]
  source: str
  rationale: str = ""
