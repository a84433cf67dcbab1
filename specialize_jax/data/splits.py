"""Named splits of every math dataset, including the ones the project carves itself.

- `gsm8k/train`: the 7,473 upstream train questions minus the dev questions (what training sees).
- `gsm8k/dev`: 200 train questions chosen by a fixed seed. Departure: the original's dev questions
  were also in its training data; here they are excluded from every training task.
- `gsm8k/test`: the 1,319 upstream test questions.
- `multiarith/dev` / `multiarith/test`: the paper's 200 indices in `validation_index.npy` / the other 400.
- `asdiv/test` (2,305), `svamp/test` (1,000), `addsub/test` (395), `singleeq/test` (508): whole sets.
"""
from typing import Callable, Dict, List, Tuple

import numpy as np

from specialize_jax.data import readers
from specialize_jax.data.records import MathExample

GSM8K_DEV_SIZE = 200
GSM8K_DEV_SEED = 20230130  # Fixed forever: changing it changes what "gsm8k dev" means.


def gsm8k_dev_indices(num_train_questions: int) -> np.ndarray:
  """Sorted indices into GSM8K train of the dev questions."""
  rng = np.random.default_rng(GSM8K_DEV_SEED)
  return np.sort(rng.permutation(num_train_questions)[:GSM8K_DEV_SIZE])


def _gsm8k_train_and_dev() -> Tuple[List[MathExample], List[MathExample]]:
  train = readers.read_gsm8k("train")
  dev_indices = set(gsm8k_dev_indices(len(train)).tolist())
  return ([e for i, e in enumerate(train) if i not in dev_indices],
          [e for i, e in enumerate(train) if i in dev_indices])


def _multiarith(split: str) -> List[MathExample]:
  examples = readers.read_multiarith()
  dev = set(readers.multiarith_dev_indices().tolist())
  keep = (lambda i: i in dev) if split == "dev" else (lambda i: i not in dev)
  return [e for i, e in enumerate(examples) if keep(i)]


SPLITS: Dict[Tuple[str, str], Callable[[], List[MathExample]]] = {
    ("gsm8k", "train"): lambda: _gsm8k_train_and_dev()[0],
    ("gsm8k", "dev"): lambda: _gsm8k_train_and_dev()[1],
    ("gsm8k", "test"): lambda: readers.read_gsm8k("test"),
    ("multiarith", "dev"): lambda: _multiarith("dev"),
    ("multiarith", "test"): lambda: _multiarith("test"),
    ("asdiv", "test"): readers.read_asdiv,
    ("svamp", "test"): readers.read_svamp,
    ("addsub", "test"): readers.read_addsub,
    ("singleeq", "test"): readers.read_singleeq,
}


def math_split(dataset: str, split: str) -> List[MathExample]:
  """The examples of one named split, e.g. `math_split("multiarith", "dev")` (200 problems)."""
  if (dataset, split) not in SPLITS:
    known = ", ".join(f"{d}/{s}" for d, s in SPLITS)
    raise ValueError(f"Unknown math split {dataset}/{split}; known: {known}.")
  return SPLITS[(dataset, split)]()
