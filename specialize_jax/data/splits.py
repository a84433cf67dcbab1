"""Named splits of every math dataset, including the ones the project carves itself.

- `gsm8k/train`: the 7,473 upstream train questions minus the dev questions (what training sees).
- `gsm8k/dev`: the original's 200 dev questions, GSM8K train lines `validation_index.npy` (its
  `gsm8k['train'].select(validation_index)`), in that file's order. Departure: the original's dev
  questions were also in its training data; here they are excluded from every training task.
- `gsm8k/test`: the 1,319 upstream test questions.
- `multiarith/dev` / `multiarith/test`: the paper's 200 indices in `validation_index.npy` / the other 400.
- `asdiv/test` (2,305), `svamp/test` (1,000), `addsub/test` (395), `singleeq/test` (508): whole sets.
"""
from typing import Callable, Dict, List, Tuple

from specialize_jax.data import readers
from specialize_jax.data.records import MathExample

# What "gsm8k dev" means, recorded in every prepared set (`prepare.gsm8k_held_out`): a set that
# held out another dev split is refused by the training tasks. An earlier version drew 200
# questions with its own seed; change this name whenever the definition changes again.
GSM8K_DEV_DEFINITION = "fu2023 lib_prompt/validation_index.npy"
GSM8K_HELD_OUT = f"gsm8k dev ({GSM8K_DEV_DEFINITION}) and test"


def _gsm8k_train_and_dev() -> Tuple[List[MathExample], List[MathExample]]:
  train = readers.read_gsm8k("train")
  dev_indices = readers.gsm8k_dev_indices(len(train))
  held = set(dev_indices.tolist())
  return [e for i, e in enumerate(train) if i not in held], [train[i] for i in dev_indices]


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
