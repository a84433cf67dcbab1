"""Generated arithmetic word problems for the embedded demo (`specialize demo`), with a vocabulary.

The demo shows the paper's claim in miniature without a download: a tiny student trained on
chain-of-thought targets beats one trained on answer-only targets. This module makes its data.

Terms:
  problem: a person starts with some objects and 1-4 *steps* (add, subtract, multiply, divide
    evenly) change how many they hold; the question asks how many they have at the end. Every
    intermediate and final value lies in [1, MAX_VALUE], and each is one token of the vocabulary.
  gold chain of thought (CoT): one line per step with the operation written out, ending exactly in
    `The answer is N` (the project's CoT target form, see `formats`)::

      Ava starts with 12 apples.
      12 + 7 = 19.
      19 - 5 = 14.
      The answer is 14

  pool: the wording a problem is drawn from (sentence templates, person names, object nouns). The
    in-distribution (ID) and out-of-distribution (OOD) pools share no template, name or object, so
    OOD problems are a shift in wording, like the paper's OOD sets; the CoT form is the same.
  splits: `train` (ID, 1-3 steps), `test_id` (ID, 1-3 steps, no question shared with train),
    `test_ood` (OOD, 1-3 steps), `test_long` (ID, 4 steps: length generalization). Evaluation
    splits hold equally many problems of each step count.
  demo directory: what `write_demo_data` writes: `train.jsonl` (teacher data, schema
    `teacher_data.SCHEMA`: one record per question whose one sample is the gold CoT, like
    `teacher_sources.records_from_gsm8k_gold`), `test_id.jsonl`, `test_ood.jsonl`,
    `test_long.jsonl` (same schema and form), `spm.model` (the vocabulary) and `manifest.json`
    (parameters and sha256 of every file, so a second call with the same parameters reuses them).
    Every record's `meta` holds `{"num_steps": k}`.

Vocabulary: a SentencePiece BPE model of VOCAB_SIZE=384 pieces trained in-process on the training
texts as the model sees them (`vocabulary_text`: both input formats and the CoT targets; under a
second). Every value a problem can hold is one piece: `▁0`..`▁99` are user-defined pieces and digits
are not split, so `17 + 8 = 25.` is five tokens and each sits at a fixed offset from the result.
Whole-number pieces let the demo's CoT student learn far more arithmetic in the same steps than
split digits, whose errors sat mostly in the units digit (docs/benchmarks.md, "Demo settings").
Ids follow T5: pad 0, eos 1, unk 2, no bos, no byte fallback. Every ASCII letter, digit and common
punctuation mark is a required character, so OOD names never map to unk; the merges are learned
from in-distribution text only, so OOD words split into short pieces (part of the shift). Newlines
follow the T5 vocabulary's convention: there is no newline piece and a newline encodes like a space
(the default `nmt_nfkc` normalizer), so a decoded CoT comes back on one line and answer extraction
still finds `The answer is N` at its end.

Randomness: each split draws from its own `numpy.random.default_rng([seed, split number])`, one
block of uniforms per problem, so the same seed gives the same problems on every platform.
"""
import collections
import dataclasses
import hashlib
import io
import json
import pathlib
import string
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from specialize_jax.data import answers
from specialize_jax.data import storage
from specialize_jax.data import vocabulary
from specialize_jax.data import formats
from specialize_jax.prepared import prepare
from specialize_jax.prepared import prepared_data
from specialize_jax.teacher import teacher_data

SOURCE = "demo"
# Difficulty is set so that a 2+2-layer student trained for five minutes on CPU learns one step
# well; the CoT-vs-answer-only gap then shows on the multi-step problems. Every value has at most two
# digits (three-digit values, generator version 1, left the CoT student at 12 % in-distribution) and
# added or removed amounts have one digit: with amounts up to 20 (and one piece per number) the CoT
# student got far fewer additions right than with amounts up to 9 (docs/benchmarks.md, "Demo
# settings").
MAX_VALUE = 99
MIN_START, MAX_START = 2, 20
MIN_AMOUNT, MAX_AMOUNT = 2, 9  # Added or removed objects; removals also leave at least 1.
FACTORS = (2, 3, 4, 5)  # Multipliers and divisors.
# Only values up to this are multiplied (products <= 95): one-digit-times-two-digit arithmetic.
MAX_MULTIPLICAND = 19
MAX_STEPS = 4
TRAIN_STEPS = (1, 2, 3)
LONG_STEPS = (4,)

VOCAB_SIZE = 384
# One piece per value: no problem holds a number above MAX_VALUE.
NUMBER_PIECES = tuple(f"\u2581{n}" for n in range(MAX_VALUE + 1))
VOCAB_FILE = vocabulary.DEMO_VOCAB_FILE
# The prepared training set (`prepare_training_set`): the demo trains zero-shot formats only.
PREPARED_SUBDIR = "prepared"
PREPARED_FORMATS = ("zs_cot", "zs_ao")
# Characters the vocabulary always has, so text in other wording (OOD names) never maps to unk. Not
# all of string.punctuation: each required character takes one of the pieces from the merges.
REQUIRED_CHARS = string.ascii_letters + string.digits + ".,;:!?'+-*/="
MANIFEST_FILE = "manifest.json"
SPLIT_FILES = {"train": "train.jsonl", "test_id": "test_id.jsonl", "test_ood": "test_ood.jsonl",
               "test_long": "test_long.jsonl"}
EVAL_SPLITS = ("test_id", "test_ood", "test_long")
# Bumped whenever generation or vocabulary training changes, so old demo directories are rebuilt.
GENERATOR_VERSION = 3
# Text lines the vocabulary trains on: more adds nothing to VOCAB_SIZE pieces and costs time.
VOCAB_TRAINING_PROBLEMS = 20_000

OPERATIONS = ("add", "subtract", "multiply", "divide")
_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
# Uniforms drawn per problem: person, object, start template, start value, question template, then
# per step: operation, template, operand, other person.
_DRAWS_PER_PROBLEM = 5 + 4 * MAX_STEPS


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  subject: str  # "she" / "he"
  object: str  # "her" / "him"
  possessive: str  # "her" / "his"


def _people(spec: str) -> Tuple[Person, ...]:
  """`"Ava:f Ben:m"` -> persons with their pronouns."""
  pronouns = {"f": ("she", "her", "her"), "m": ("he", "him", "his")}
  return tuple(Person(name, *pronouns[g]) for name, g in (p.split(":") for p in spec.split()))


@dataclasses.dataclass(frozen=True)
class WordingPool:
  """Names, objects (plural nouns) and sentence templates of one pool.

  Templates use `{name}`, `{obj}`, `{n}` (the step's number), `{other}` (another person of the
  pool), and the pronouns `{he}`, `{him}`, `{his}` (`{He}`, `{His}` capitalized).
  """
  name: str
  people: Tuple[Person, ...]
  objects: Tuple[str, ...]
  start: Tuple[str, ...]
  steps: Mapping[str, Tuple[str, ...]]  # operation -> templates
  question: Tuple[str, ...]

  def templates(self) -> Tuple[str, ...]:
    return self.start + self.question + tuple(t for op in OPERATIONS for t in self.steps[op])


ID_POOL = WordingPool(
    name="id",
    people=_people("Ava:f Ben:m Chloe:f Daniel:m Emma:f Frank:m Grace:f Henry:m Isla:f Jack:m "
                   "Lily:f Mason:m Nora:f Oscar:m Ruby:f Sam:m Tara:f Victor:m Wendy:f Zack:m"),
    objects=("apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards",
             "shells", "balloons", "crayons", "toy cars"),
    start=("{name} has {n} {obj}.", "{name} owns {n} {obj}.", "{name} collected {n} {obj}."),
    steps={
        "add": ("{He} buys {n} more {obj}.", "Then {he} finds {n} more {obj}.",
                "{He} gets {n} more {obj} from {other}."),
        "subtract": ("Then {he} gives {n} {obj} to {other}.", "{He} loses {n} {obj}.",
                     "{He} sells {n} {obj}."),
        "multiply": ("{He} ends up with {n} times as many {obj} as before.",
                     "Then the number of {his} {obj} is multiplied by {n}."),
        "divide": ("{He} splits {his} {obj} into {n} equal piles and keeps one pile.",
                   "Then {he} divides {his} {obj} equally among {n} boxes and keeps one box."),
    },
    question=("How many {obj} does {name} have now?",
              "How many {obj} does {name} have in the end?"),
)

OOD_POOL = WordingPool(
    name="ood",
    people=_people("Priya:f Kenji:m Amara:f Diego:m Fatima:f Lars:m Mei:f Omar:m Sofia:f Tomasz:m "
                   "Yuki:f Rafael:m Ingrid:f Kwame:m Leilani:f Mateo:m"),
    objects=("mangoes", "stamps", "feathers", "buttons", "ribbons", "candles", "pebbles", "tickets",
             "muffins", "keychains", "beads", "lemons"),
    start=("At first, {name} is holding {n} {obj}.",
           "In the morning, {name} keeps {n} {obj} in a jar."),
    steps={
        "add": ("Later, {name} receives another {n} {obj}.",
                "A neighbor hands {him} {n} extra {obj}.",
                "Afterwards {he} picks up {n} additional {obj}."),
        "subtract": ("After that, {he} donates {n} of the {obj}.",
                     "{other} takes {n} {obj} away from {him}.",
                     "Sadly, {n} {obj} go missing."),
        "multiply": ("Later, the collection grows to {n} times its size.",
                     "Next, {his} stock of {obj} becomes {n} times bigger."),
        "divide": ("{He} shares the {obj} evenly between {n} jars and holds on to a single jar.",
                   "Next, {he} hands out the {obj} in {n} equal parts and keeps just one part."),
    },
    question=("What is the number of {obj} that {name} holds at the end?",
              "How many {obj} remain with {name} at the end?"),
)

POOLS = {"id": ID_POOL, "ood": OOD_POOL}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One generated problem; `cot` is its gold chain of thought, `answer` the final value."""
  question: str
  cot: str
  answer: int
  num_steps: int
  pool: str

  @property
  def answer_only_target(self) -> str:
    return f"The answer is {self.answer}"


def _pick(options: Sequence, u: float):
  return options[int(u * len(options))]


def _fill(template: str, person: Person, obj: str, n: int, other: str) -> str:
  return template.format(name=person.name, obj=obj, n=n, other=other, he=person.subject,
                         him=person.object, his=person.possessive,
                         He=person.subject.capitalize(), His=person.possessive.capitalize())


def _problem(pool: WordingPool, num_steps: int, u: Sequence[float]) -> Problem:
  """One problem from `_DRAWS_PER_PROBLEM` uniforms in [0, 1)."""
  people = pool.people
  person_index = int(u[0] * len(people))
  person = people[person_index]
  obj = _pick(pool.objects, u[1])
  value = MIN_START + int(u[3] * (MAX_START - MIN_START + 1))
  sentences = [_fill(_pick(pool.start, u[2]), person, obj, value, "")]
  lines = [f"{person.name} starts with {value} {obj}."]
  for step in range(num_steps):
    u_op, u_template, u_operand, u_other = u[5 + 4 * step: 9 + 4 * step]
    # Any person but the protagonist.
    other = people[(person_index + 1 + int(u_other * (len(people) - 1))) % len(people)].name
    feasible = []  # (operation, operand, result): the result stays in [1, MAX_VALUE].
    if value + MIN_AMOUNT <= MAX_VALUE:
      amount = MIN_AMOUNT + int(u_operand * (min(MAX_AMOUNT, MAX_VALUE - value) - MIN_AMOUNT + 1))
      feasible.append(("add", amount, value + amount))
    if value - MIN_AMOUNT >= 1:
      amount = MIN_AMOUNT + int(u_operand * (min(MAX_AMOUNT, value - 1) - MIN_AMOUNT + 1))
      feasible.append(("subtract", amount, value - amount))
    if value <= MAX_MULTIPLICAND:
      factor = _pick(FACTORS, u_operand)
      feasible.append(("multiply", factor, value * factor))
    divisors = [f for f in FACTORS if value % f == 0]
    if divisors:
      divisor = _pick(divisors, u_operand)
      feasible.append(("divide", divisor, value // divisor))
    op, operand, result = _pick(feasible, u_op)
    sentences.append(_fill(_pick(pool.steps[op], u_template), person, obj, operand, other))
    lines.append(f"{value} {_SYMBOL[op]} {operand} = {result}.")
    value = result
  sentences.append(_fill(_pick(pool.question, u[4]), person, obj, value, ""))
  lines.append(f"The answer is {value}")
  return Problem(question=" ".join(sentences), cot="\n".join(lines), answer=value,
                 num_steps=num_steps, pool=pool.name)


def generate_problems(num_problems: int, seed: int, pool: str = "id",
                      steps: Sequence[int] = TRAIN_STEPS, stream: int = 0,
                      exclude_questions: Iterable[str] = ()) -> List[Problem]:
  """`num_problems` distinct problems; problem i has `steps[i % len(steps)]` steps.

  Questions in `exclude_questions` (another split's) and repeats are skipped and redrawn. `stream`
  separates the random streams of splits that share a seed.
  """
  if pool not in POOLS:
    raise ValueError(f"Unknown pool {pool!r}; expected one of {sorted(POOLS)}.")
  bad_steps = [k for k in steps if not 1 <= k <= MAX_STEPS]
  if not steps or bad_steps:
    raise ValueError(f"steps={tuple(steps)}: every step count must be in 1..{MAX_STEPS}.")
  if num_problems < 0:
    raise ValueError(f"num_problems={num_problems} must be >= 0.")
  wording = POOLS[pool]
  rng = np.random.default_rng([seed, stream])
  seen = set(exclude_questions)
  problems: List[Problem] = []
  max_draws = 10 * num_problems + 1000  # The question space is far larger; this only stops a loop.
  draws = 0
  while len(problems) < num_problems:
    block = rng.random((max(1024, num_problems - len(problems)), _DRAWS_PER_PROBLEM)).tolist()
    for u in block:
      if len(problems) == num_problems:
        break
      draws += 1
      problem = _problem(wording, steps[len(problems) % len(steps)], u)
      if problem.question not in seen:
        seen.add(problem.question)
        problems.append(problem)
    if draws > max_draws:
      raise ValueError(f"Drew {draws} problems but found only {len(problems)} distinct ones of the "
                       f"{num_problems} asked for (pool {pool!r}, steps {tuple(steps)}); ask for "
                       "fewer problems.")
  return problems


def make_splits(num_train: int = 200_000, num_eval: int = 600,
                seed: int = 0) -> Dict[str, List[Problem]]:
  """The four demo splits. Test questions are drawn first and never appear in train."""
  test_id = generate_problems(num_eval, seed, "id", TRAIN_STEPS, stream=1)
  return {
      "train": generate_problems(num_train, seed, "id", TRAIN_STEPS, stream=0,
                                 exclude_questions={p.question for p in test_id}),
      "test_id": test_id,
      "test_ood": generate_problems(num_eval, seed, "ood", TRAIN_STEPS, stream=2),
      "test_long": generate_problems(num_eval, seed, "id", LONG_STEPS, stream=3),
  }


def to_records(problems: Sequence[Problem], split: str,
               source: str = SOURCE) -> List[teacher_data.TeacherRecord]:
  """Teacher records (ids `<source>/<split>/<i>`), each with the gold CoT as its one correct
  sample."""
  records = []
  for i, problem in enumerate(problems):
    answer = float(problem.answer)
    records.append(teacher_data.TeacherRecord(
        id=f"{source}/{split}/{i}", source=source, split=split, question=problem.question,
        gold_answer=str(problem.answer), gold_number=answer,
        samples=(teacher_data.TeacherSample(text=problem.cot, answer=answer, correct=True),),
        meta={"num_steps": problem.num_steps}))
  return records


# ---------------------------------------------------------------------------------------------------
# Vocabulary.


def vocabulary_text(problems: Sequence[Problem]) -> List[str]:
  """What the vocabulary learns from: the model's texts, prompt wrappers included (inputs of both
  zero-shot formats and the CoT targets), so `Q:` and the CoT trigger get pieces of their own."""
  lines = []
  for problem in problems:
    lines.append(formats.build_input(problem.question, "zs_cot"))
    lines.append(formats.build_input(problem.question, "zs_ao"))
    lines.append(problem.cot)
  return lines


def train_vocabulary(texts: Iterable[str], vocab_size: int = VOCAB_SIZE,
                     extra_symbols: Sequence[str] = (), model_type: str = "bpe",
                     hard_vocab_limit: bool = True) -> bytes:
  """A serialized SentencePiece model (see the module docstring for its settings); `extra_symbols`
  become user-defined pieces after the number pieces; without `hard_vocab_limit`, `vocab_size` is
  an upper bound (a small text may hold fewer pieces)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top  (only writers need it)
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, model_type=model_type,
      vocab_size=vocab_size, character_coverage=1.0, split_digits=False,
      user_defined_symbols=list(NUMBER_PIECES) + list(extra_symbols),
      required_chars=REQUIRED_CHARS,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False,
      hard_vocab_limit=hard_vocab_limit, num_threads=1, minloglevel=2)
  return model.getvalue()


# ---------------------------------------------------------------------------------------------------
# The demo directory.


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _write_bytes_atomically(path: pathlib.Path, data: bytes) -> None:
  with storage.atomic_write(path, "wb") as f:
    f.write(data)


def demo_paths(directory) -> Dict[str, pathlib.Path]:
  """Where `write_demo_data` puts each file: split names, `vocab` and `manifest`."""
  directory = pathlib.Path(directory)
  paths = {split: directory / name for split, name in SPLIT_FILES.items()}
  paths["vocab"] = directory / VOCAB_FILE
  paths["manifest"] = directory / MANIFEST_FILE
  return paths


def _manifest_parameters(num_train: int, num_eval: int, seed: int) -> Dict[str, int]:
  return {"generator_version": GENERATOR_VERSION, "num_train": num_train, "num_eval": num_eval,
          "seed": seed, "vocab_size": VOCAB_SIZE}


def _is_current(paths: Mapping[str, pathlib.Path], parameters: Mapping[str, int]) -> bool:
  """Whether the directory holds intact files written with these parameters."""
  try:
    manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  if manifest.get("parameters") != dict(parameters):
    return False
  files = manifest.get("sha256", {})
  return all(key in files and path.is_file() and _sha256(path) == files[key]
             for key, path in paths.items() if key != "manifest")


def write_demo_data(directory, num_train: int = 200_000, num_eval: int = 600,
                    seed: int = 0) -> Dict[str, pathlib.Path]:
  """Writes (or reuses) the demo directory; returns the paths of `demo_paths`.

  Reuse: when `manifest.json` records the same parameters and every file still has its recorded
  sha256, nothing is regenerated. Each file is written to a temp file and `os.replace`d, and the
  manifest last, so an interrupted call leaves no manifest that vouches for a partial directory.
  """
  if num_train < 1 or num_eval < 1:
    raise ValueError(f"num_train={num_train} and num_eval={num_eval} must both be >= 1.")
  paths = demo_paths(directory)
  parameters = _manifest_parameters(num_train, num_eval, seed)
  if _is_current(paths, parameters):
    prepare_training_set(directory)
    return paths
  paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
  if paths["manifest"].exists():
    paths["manifest"].unlink()  # The files are about to change: the old manifest no longer holds.
  splits = make_splits(num_train, num_eval, seed)
  for split, problems in splits.items():
    teacher_data.write_records(paths[split], to_records(problems, split))
  vocab_problems = splits["train"][:VOCAB_TRAINING_PROBLEMS]
  _write_bytes_atomically(paths["vocab"], train_vocabulary(vocabulary_text(vocab_problems)))
  manifest = {"parameters": parameters,
              "sha256": {key: _sha256(path) for key, path in paths.items() if key != "manifest"}}
  _write_bytes_atomically(paths["manifest"],
                          (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
  prepare_training_set(directory)
  return paths


def prepare_training_set(directory, workers: int = 2) -> str:
  """The demo's prepared training set (`<directory>/prepared`: zero-shot CoT and answer-only
  examples of `train.jsonl` in the demo vocabulary), written unless it is current; its path."""
  paths = demo_paths(directory)
  output = str(pathlib.Path(directory) / PREPARED_SUBDIR)
  sources = {"teacher": str(paths["train"]), "teacher_sha256": _sha256(paths["train"])}
  try:
    if prepared_data.PreparedSet.open(output).metadata["sources"] == sources:
      return output
  except prepared_data.PreparedDataError:
    pass
  config = prepare.PrepareConfig(output_dir=output, vocab_path=str(paths["vocab"]),
                                 format_names=PREPARED_FORMATS,
                                 rates={f: 1.0 for f in PREPARED_FORMATS}, num_chunks=4,
                                 workers=workers)
  prepare.prepare(lambda: teacher_data.iter_records(paths["train"]), config, sources=sources)
  return output


def read_problems(path) -> List[Problem]:
  """Problems back from a demo teacher-data file (pool from the split name)."""
  problems = []
  for record in teacher_data.read_records(path).records:
    pool = "ood" if record.split == "test_ood" else "id"
    problems.append(Problem(question=record.question, cot=record.samples[0].text,
                            answer=int(record.gold_number), num_steps=record.meta["num_steps"],
                            pool=pool))
  return problems


# ---------------------------------------------------------------------------------------------------
# Scoring.


def accuracy_by_steps(predictions: Sequence[str], golds: Sequence, num_steps: Sequence[int],
                      mode: str = "default") -> Dict[str, float]:
  """Percent correct overall (`accuracy`) and per step count (`accuracy_steps_<k>`), with counts.

  `predictions` are decoded texts (str or UTF-8 bytes), `golds` the gold answers (numbers or gold
  strings such as `"14"`), `num_steps` each problem's step count, all aligned. Answers are read and compared as in
  `metrics.math_accuracy` (`answers.extract_answer`, `answers.answers_match`).
  """
  if not len(predictions) == len(golds) == len(num_steps):
    raise ValueError(f"accuracy_by_steps: {len(predictions)} predictions, {len(golds)} golds and "
                     f"{len(num_steps)} step counts; they must be aligned one per problem.")
  if len(predictions) == 0:  # len(), not truthiness: numpy arrays are welcome.
    raise ValueError("accuracy_by_steps: no predictions to score.")
  correct: Dict[int, int] = collections.Counter()
  total: Dict[int, int] = collections.Counter()
  for prediction, gold, steps in zip(predictions, golds, num_steps):
    prediction = prediction.decode("utf-8") if isinstance(prediction, bytes) else prediction
    gold = gold.decode("utf-8") if isinstance(gold, bytes) else gold
    gold_value = answers.parse_gold(gold, mode) if isinstance(gold, str) else float(gold)
    total[int(steps)] += 1
    correct[int(steps)] += answers.answers_match(answers.extract_answer(prediction, mode),
                                                 gold_value, mode)
  out = {"accuracy": 100.0 * sum(correct.values()) / len(predictions),
         "count": float(len(predictions))}
  for steps in sorted(total):
    out[f"accuracy_steps_{steps}"] = 100.0 * correct[steps] / total[steps]
    out[f"count_steps_{steps}"] = float(total[steps])
  return out
