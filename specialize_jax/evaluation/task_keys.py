"""What an eval task's name says: dataset, split, prompt format and distribution.

The library never imports `tasks/` (registration is the CLI's side effect), so selection rules and
reports read these facts from the registered names, whose patterns `tasks/` fixes:

  math: `{dataset}_{split}_{format}`, e.g. `gsm8k_dev_icl_cot`, `multiarith_test_zs_cot`,
    `asdiv_test_icl_ao` (`gsm8k_tfds_test_{format}` counts as GSM8K test).
  BBH: `bbh_{subtask}_{cot|ao|cot_paper|ao_paper}`, e.g. `bbh_date_understanding_cot` (`*_paper`:
  the original's prompts, formats of their own so reports never average them with `cot` / `ao`).
  demo: `demo_{id|ood|long}_{cot|ao}` (the arithmetic example's held-out test sets).
  world (`specialize demo`): `world_{gsm|multiarith|svamp|asdiv}_{dev|test}_{format}` (`gsm` in
    distribution, the others out of it) and `world_bbh_{task}_{dev|test}_{format}` (generic).
  anything else: `{dataset}_{format}` when it ends in a known format, else the name is the dataset.

Terms:
  in-distribution (ID): the data the students are specialized on, GSM8K (and the demo's `id`).
  out-of-distribution (OOD): the other math word-problem sets, MultiArith, ASDiv, SVAMP (and the
    demo's `ood` and `long`).
  generic: BIG-Bench Hard, the generic ability the paper shows falling as math rises.
  test split: a split no model-selection rule may read (`is_test`); MultiArith and GSM8K have a dev
    split for selection, ASDiv, SVAMP, BBH and the demo sets do not.
"""
import dataclasses
import re
from typing import Optional

IN_DISTRIBUTION = 'in-distribution'
OUT_OF_DISTRIBUTION = 'out-of-distribution'
GENERIC = 'generic'
UNKNOWN = 'unknown'

MATH_FORMATS = ('icl_cot', 'zs_cot', 'icl_ao', 'zs_ao')
# Order in which a report picks a column's format: the paper's headline numbers are in-context CoT.
FORMAT_ORDER = ('icl_cot', 'zs_cot', 'cot', 'icl_ao', 'zs_ao', 'ao')
ID_DATASETS = ('gsm8k', 'demo_id', 'world_gsm')
OOD_DATASETS = ('multiarith', 'asdiv', 'svamp', 'addsub', 'singleeq', 'demo_ood', 'demo_long',
                'world_multiarith', 'world_svamp', 'world_asdiv')
GENERIC_DATASETS = ('bbh', 'world_bbh')
_MATH_RE = re.compile(r'(gsm8k_tfds|gsm8k|multiarith|asdiv|svamp|addsub|singleeq)_(dev|test|train)_'
                      r'(icl_cot|zs_cot|icl_ao|zs_ao)')
_BBH_RE = re.compile(r'bbh_(\w+?)_(cot_paper|ao_paper|cot|ao)')
_DEMO_RE = re.compile(r'demo_(id|ood|long)_(cot|ao)')
_WORLD_RE = re.compile(r'world_(gsm|multiarith|svamp|asdiv)_(dev|test)_(icl_cot|zs_cot|icl_ao|zs_ao)')
_WORLD_BBH_RE = re.compile(r'world_bbh_(\w+?)_(dev|test)_(icl_cot|zs_cot|icl_ao|zs_ao)')
_FORMAT_SUFFIX_RE = re.compile(r'(\w+?)_(icl_cot|zs_cot|icl_ao|zs_ao|cot|ao)')


@dataclasses.dataclass(frozen=True)
class TaskKey:
  """The parts of an eval task name.

  Attributes:
    name: the task name.
    dataset: 'gsm8k', 'multiarith', 'asdiv', 'svamp', 'bbh', 'demo_id', ... (the name if unknown).
    split: 'dev', 'test' or None when the name does not say.
    format: 'icl_cot', 'zs_cot', 'icl_ao', 'zs_ao', 'cot', 'ao' or None.
    subtask: the BBH task (None for others).
    distribution: IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, GENERIC or UNKNOWN.
  """
  name: str
  dataset: str
  split: Optional[str]
  format: Optional[str]
  subtask: Optional[str] = None
  distribution: str = UNKNOWN

  @property
  def is_test(self) -> bool:
    return self.split == 'test'


def _distribution(dataset: str) -> str:
  if dataset in ID_DATASETS:
    return IN_DISTRIBUTION
  if dataset in OOD_DATASETS:
    return OUT_OF_DISTRIBUTION
  return GENERIC if dataset in GENERIC_DATASETS else UNKNOWN


def describe_task(name: str) -> TaskKey:
  """The TaskKey of a task name (see the module docstring for the patterns)."""
  match = _MATH_RE.fullmatch(name)
  if match:
    dataset = 'gsm8k' if match.group(1) == 'gsm8k_tfds' else match.group(1)
    return TaskKey(name, dataset, match.group(2), match.group(3),
                   distribution=_distribution(dataset))
  match = _BBH_RE.fullmatch(name)
  if match:
    # BBH has no dev split: its 250 examples per task are the test set.
    return TaskKey(name, 'bbh', 'test', match.group(2), subtask=match.group(1),
                   distribution=GENERIC)
  match = _DEMO_RE.fullmatch(name)
  if match:
    dataset = f'demo_{match.group(1)}'
    return TaskKey(name, dataset, 'test', match.group(2), distribution=_distribution(dataset))
  match = _WORLD_RE.fullmatch(name)
  if match:
    dataset = f'world_{match.group(1)}'
    return TaskKey(name, dataset, match.group(2), match.group(3),
                   distribution=_distribution(dataset))
  match = _WORLD_BBH_RE.fullmatch(name)
  if match:
    return TaskKey(name, 'world_bbh', match.group(2), match.group(3), subtask=match.group(1),
                   distribution=GENERIC)
  match = _FORMAT_SUFFIX_RE.fullmatch(name)
  if match:
    return TaskKey(name, match.group(1), None, match.group(2))
  return TaskKey(name, name, None, None)
