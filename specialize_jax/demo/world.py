"""The demo's world: the paper's data in miniature, generated, seeded, no download.

`specialize demo` runs the paper's experiment on this world (`demo/miniature.py`). Terms:
  math families: arithmetic word problems from the `synthetic` generator. `gsm` is the target
    skill in distribution (this world's GSM8K: 1-3 steps, the training wording); the held-out
    families shift the structure in the same vocabulary: `multiarith` (simpler, 1-2 steps, other
    names and objects), `svamp` (the training wording with an irrelevant fact inserted after the
    first sentence, which the chain must ignore) and `asdiv` (other sentence templates, names and
    objects, 1-3 steps).
  generic suite: the procedural tasks of `generic_tasks` (this world's BIG-Bench Hard).
  formats: the project's four (`formats`): zero-shot or in-context (one exemplar), CoT or
    answer-only.
    Generic tasks render them with `generic_tasks.build_input` (fixed exemplars, as BBH's prompts).
  files (what `write_world` puts in the world directory; every file is written atomically and
    `manifest.json`, written last, records the parameters and each file's sha256):
    `math/{family}_{split}.jsonl`: teacher records (`teacher_data` schema), the gold chain as the one
      sample. `gsm` has `teacher_train` (the teacher's own training questions), `train` (the
      questions the teacher is sampled on: the students' training questions), `instruct` (the
      little math of the generalist's instruction mixture), `dev` and `test`; the other families
      `dev` and `test`. No question is in two files.
    `generic/{task}_{split}.jsonl`: `{"question", "cot", "answer"}`, splits `instruct`, `dev`,
      `test`.
    `pretrain.jsonl`: `{"inputs", "targets"}`, span corruption (`span_corrupt`) of documents of the
      world's text: questions and chains of every math family and generic task.
    `instruct.jsonl`: `{"inputs", "targets", "task"}`, the generalist's instruction mixture: the
      generic tasks and a little `gsm` math, each example in one of the four formats in turn.
    `teacher_train.jsonl`: `{"inputs", "targets"}`, the teacher's math CoT training data, inputs as
      `specialize teacher` will prompt it (`teacher_client.build_prompt` with `teacher_prompt.txt`).
    `teacher_prompt.txt`: the teacher's few-shot prompt (one worked `gsm` problem).
    `student.spm`: the student's SentencePiece BPE vocabulary (`STUDENT_VOCAB_SIZE` pieces: a piece
      per number 0..99 and the span-corruption sentinels `<extra_id_0>`.. as user-defined pieces),
      trained on the world's text; `teacher.spm`: the teacher's own, a unigram model of
      `TEACHER_VOCAB_SIZE` pieces trained on its math text only, so the two segment words
      differently and `specialize align` has real work.
Randomness: every file has its own `numpy.random.default_rng([seed, stream])`; the same seed gives
the same world on every platform.
"""
import dataclasses
import hashlib
import json
import pathlib
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from specialize_jax.data import formats
from specialize_jax.data import storage
from specialize_jax.data.records import MathExample
from specialize_jax.demo import generic_tasks
from specialize_jax.demo import synthetic
from specialize_jax.prepared import prepared_data
from specialize_jax.teacher import teacher_client
from specialize_jax.teacher import teacher_data

SOURCE = "world"
# Bumped whenever what `write_world` writes changes, so older world directories are rebuilt.
WORLD_VERSION = 3
ID_FAMILY = "gsm"
OOD_FAMILIES = ("multiarith", "svamp", "asdiv")
FAMILIES = (ID_FAMILY,) + OOD_FAMILIES
GSM_SPLITS = ("teacher_train", "train", "instruct", "dev", "test")
EVAL_SPLITS = ("dev", "test")
GENERIC_SPLITS = ("instruct", "dev", "test")
NUM_EXEMPLARS = 1
NUM_SENTINELS = 16
SENTINELS = tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))
STUDENT_VOCAB_SIZE = 640
TEACHER_VOCAB_SIZE = 512
# Span corruption as T5's: 15 % of the words, in spans of 3 on average.
NOISE_DENSITY = 0.15
MEAN_SPAN_LENGTH = 3.0

STUDENT_VOCAB_FILE = "student.spm"
TEACHER_VOCAB_FILE = "teacher.spm"
TEACHER_PROMPT_FILE = "teacher_prompt.txt"
MANIFEST_FILE = "manifest.json"
PRETRAIN_FILE = "pretrain.jsonl"
INSTRUCT_FILE = "instruct.jsonl"
TEACHER_TRAIN_FILE = "teacher_train.jsonl"

# Names and objects of `multiarith` (the OOD pool's) with the training templates.
MIXED_POOL = dataclasses.replace(synthetic.ID_POOL, name="mixed", people=synthetic.OOD_POOL.people,
                                 objects=synthetic.OOD_POOL.objects)
_FAMILY_WORDING = {"gsm": (synthetic.ID_POOL, (1, 2, 3)), "svamp": (synthetic.ID_POOL, (1, 2, 3)),
                   "multiarith": (MIXED_POOL, (1, 2)), "asdiv": (synthetic.OOD_POOL, (1, 2, 3))}


@dataclasses.dataclass(frozen=True)
class WorldSize:
  """How much of each file `write_world` generates (the quick demo writes a smaller world)."""
  teacher_train: int = 20_000
  # The questions the teacher is sampled on (docs/demo.md, study step 5: 1,000 were memorized).
  train: int = 2_000
  instruct_math: int = 1_500
  # Per generic task (`boolean_expressions` has about 1,100 distinct questions in all).
  instruct_generic: int = 900
  # Sized to the demo's eval batch of 64 rows, which a smaller set pads anyway.
  eval_math: int = 64  # per family and split
  eval_generic: int = 48  # per task and split
  pretrain_documents: int = 30_000
  # The quick world's teacher learns the very questions it is sampled on (a few steps of
  # memorizing), so that the chain has correct chains to filter, align and train on.
  teacher_memorizes_train: bool = False

  @classmethod
  def quick(cls) -> "WorldSize":
    return cls(teacher_train=16, train=16, instruct_math=100, instruct_generic=60, eval_math=8,
               eval_generic=6, pretrain_documents=600, teacher_memorizes_train=True)


def math_path(directory, family: str, split: str) -> pathlib.Path:
  return pathlib.Path(directory) / "math" / f"{family}_{split}.jsonl"


def generic_path(directory, task: str, split: str) -> pathlib.Path:
  return pathlib.Path(directory) / "generic" / f"{task}_{split}.jsonl"


# ------------------------------------------------------------------------------------ math families


def _with_irrelevant_fact(problem: synthetic.Problem, u: Sequence[float]) -> synthetic.Problem:
  """`svamp`: a sentence about someone else's objects after the first sentence; same chain."""
  pool = synthetic.ID_POOL
  other = synthetic._pick([p for p in pool.people if p.name not in problem.question], u[0])  # pylint: disable=protected-access
  obj = synthetic._pick(pool.objects, u[1])  # pylint: disable=protected-access
  fact = f"{other.name} has {synthetic.MIN_START + int(u[2] * 15)} {obj}."
  first, rest = problem.question.split(". ", 1)
  return dataclasses.replace(problem, question=f"{first}. {fact} {rest}")


def math_problems(family: str, num_problems: int, seed: int, stream: int,
                  exclude_questions: Iterable[str] = ()) -> List[synthetic.Problem]:
  """`num_problems` distinct problems of one family (see the module docstring)."""
  pool, steps = _FAMILY_WORDING[family]
  rng = np.random.default_rng([seed, stream])
  seen = set(exclude_questions)
  problems: List[synthetic.Problem] = []
  while len(problems) < num_problems:
    u = rng.random(synthetic._DRAWS_PER_PROBLEM + 3).tolist()  # pylint: disable=protected-access
    problem = synthetic._problem(pool, steps[len(problems) % len(steps)], u)  # pylint: disable=protected-access
    if family == "svamp":
      problem = _with_irrelevant_fact(problem, u[-3:])
    if problem.question not in seen:
      seen.add(problem.question)
      problems.append(dataclasses.replace(problem, pool=family))
  return problems


def math_example(record: teacher_data.TeacherRecord) -> MathExample:
  """A world record as a `MathExample` (the gold chain as its rationale)."""
  return MathExample(id=record.id, question=record.question, answer_text=record.gold_answer,
                     answer_number=record.gold_number, source=record.source,
                     rationale=record.samples[0].text if record.samples else "")


def read_math(directory, family: str, split: str) -> List[MathExample]:
  return [math_example(r) for r in teacher_data.read_records(math_path(directory, family,
                                                                       split)).records]


def cot_prompt(exemplars: Sequence[MathExample]) -> str:
  """The in-context CoT evaluation prompt: the exemplars as the training formats render them."""
  return "".join(formats.cot_exemplar(e) for e in exemplars)


def answer_only_prompt(exemplars: Sequence[MathExample]) -> str:
  return "".join(formats.answer_only_exemplar(e) for e in exemplars)


def eval_exemplars(directory) -> List[MathExample]:
  """The fixed exemplars of the in-context math evaluation prompts: the first `instruct` problems."""
  return read_math(directory, ID_FAMILY, "instruct")[:NUM_EXEMPLARS]


# ------------------------------------------------------------------------------- span corruption


def span_corrupt(text: str, rng: np.random.Generator) -> Tuple[str, str]:
  """T5's span corruption over whitespace-separated words: `(inputs, targets)`.

  About NOISE_DENSITY of the words, in spans of MEAN_SPAN_LENGTH on average, are each replaced in
  the inputs by one sentinel; the targets list every sentinel followed by the words it hides, and
  end with the next sentinel (T5's form). At most NUM_SENTINELS - 1 spans.
  """
  words = text.split()
  num_noise = min(max(1, round(len(words) * NOISE_DENSITY)), len(words) - 1)
  num_spans = min(max(1, round(num_noise / MEAN_SPAN_LENGTH)), NUM_SENTINELS - 1, num_noise,
                  len(words) - num_noise)

  def split_into(total, parts):  # `parts` positive lengths summing to `total`, at random.
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).tolist()

  noise = split_into(num_noise, num_spans)
  keep = split_into(len(words) - num_noise, num_spans)
  inputs, targets, position = [], [], 0
  for span, (kept, hidden) in enumerate(zip(keep, noise)):
    inputs += words[position:position + kept] + [SENTINELS[span]]
    position += kept
    targets += [SENTINELS[span]] + words[position:position + hidden]
    position += hidden
  targets.append(SENTINELS[num_spans])
  return " ".join(inputs), " ".join(targets)


# ------------------------------------------------------------------------------------- writing


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _write_jsonl(path: pathlib.Path, rows: Iterable[Mapping]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with storage.atomic_write(path) as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _records(problems: Sequence[synthetic.Problem], family: str,
             split: str) -> List[teacher_data.TeacherRecord]:
  records = synthetic.to_records(problems, f"{family}_{split}", source=SOURCE)
  return [dataclasses.replace(r, meta={**r.meta, "family": family}) for r in records]


def _math_splits(size: WorldSize, seed: int) -> Dict[Tuple[str, str], List[synthetic.Problem]]:
  """Every family's splits; evaluation questions first, then training ones that avoid them."""
  out: Dict[Tuple[str, str], List[synthetic.Problem]] = {}
  seen: set = set()
  counts = {"dev": size.eval_math, "test": size.eval_math, "instruct": size.instruct_math,
            "train": size.train, "teacher_train": size.teacher_train}
  stream = 0
  for family in FAMILIES:
    for split in (GSM_SPLITS if family == ID_FAMILY else EVAL_SPLITS):
      stream += 1
      problems = math_problems(family, counts[split], seed, stream, exclude_questions=seen)
      seen.update(p.question for p in problems)
      out[(family, split)] = problems
  return out


def _generic_splits(size: WorldSize, seed: int) -> Dict[Tuple[str, str], List]:
  out: Dict[Tuple[str, str], List] = {}
  counts = {"instruct": size.instruct_generic, "dev": size.eval_generic, "test": size.eval_generic}
  for task in generic_tasks.TASKS:
    seen = {e.question for e in generic_tasks.exemplars(task)}
    for stream, split in enumerate(("dev", "test", "instruct")):
      examples = generic_tasks.generate(task, counts[split], seed, stream=stream,
                                        exclude_questions=seen)
      seen.update(e.question for e in examples)
      out[(task, split)] = examples
  return out


def _math_format_example(problem: synthetic.Problem, format_name: str,
                         exemplars: Sequence[MathExample]) -> Dict[str, str]:
  example = MathExample(id="", question=problem.question, answer_text=str(problem.answer),
                        answer_number=float(problem.answer), source=SOURCE, rationale=problem.cot)
  target = (problem.cot if formats.is_chain_of_thought(format_name)
            else problem.answer_only_target)
  return {"inputs": formats.build_input(example.question, format_name, exemplars),
          "targets": target}


def _instruct_rows(math: Sequence[synthetic.Problem], generic: Mapping[str, Sequence],
                   seed: int) -> List[Dict[str, str]]:
  """The instruction mixture: each example in one of the four formats in turn, shuffled."""
  pool = [MathExample(id=str(i), question=p.question, answer_text=str(p.answer),
                      answer_number=float(p.answer), source=SOURCE, rationale=p.cot)
          for i, p in enumerate(math)]
  sampler = formats.ExemplarSampler(pool, NUM_EXEMPLARS, seed)
  rows = []
  for i, problem in enumerate(math):
    format_name = formats.FORMATS[i % len(formats.FORMATS)]
    exemplars = sampler.choose(i, problem.question) if formats.is_in_context(format_name) else ()
    rows.append(dict(_math_format_example(problem, format_name, exemplars), task="math"))
  for task, examples in generic.items():
    for i, example in enumerate(examples):
      format_name = formats.FORMATS[i % len(formats.FORMATS)]
      shots = "few" if formats.is_in_context(format_name) else "zero"
      cot = formats.is_chain_of_thought(format_name)
      rows.append({"inputs": generic_tasks.build_input(example, task, shots, cot),
                   "targets": generic_tasks.target(example, cot), "task": task})
  order = np.random.default_rng([seed, 1000]).permutation(len(rows))
  return [rows[i] for i in order]


def _pretrain_rows(size: WorldSize, seed: int) -> List[Dict[str, str]]:
  """Span-corrupted documents: a question and its chain, of every math family and generic task."""
  rng = np.random.default_rng([seed, 2000])
  per_family = size.pretrain_documents // (2 * len(FAMILIES))
  per_task = min(size.pretrain_documents // (2 * len(generic_tasks.TASKS)), 1_000)
  documents = []
  for stream, family in enumerate(FAMILIES):
    for p in math_problems(family, per_family, seed, 3000 + stream):
      documents.append(_one_line(f"{p.question} {p.cot}."))
  for task in generic_tasks.TASKS:
    for e in generic_tasks.generate(task, per_task, seed, stream=3000):
      documents.append(_one_line(f"{e.question} {e.cot}"))
  order = rng.permutation(len(documents))
  rows = []
  for i in order:
    inputs, targets = span_corrupt(documents[i], rng)
    rows.append({"inputs": inputs, "targets": targets})
  return rows


def _teacher_rows(problems: Sequence[synthetic.Problem], prompt: str) -> List[Dict[str, str]]:
  return [{"inputs": teacher_client.build_prompt(prompt, p.question), "targets": p.cot}
          for p in problems]


def _teacher_prompt(problem: synthetic.Problem) -> str:
  """Empty: the teacher is prompted zero-shot (docs/demo.md: a one-exemplar prompt left the
  teacher far weaker in the same budget). `problem` is the exemplar such a prompt would hold."""
  del problem
  return ""


def _student_vocab_text(pretrain: Sequence[Mapping], instruct: Sequence[Mapping]) -> List[str]:
  texts = [row["inputs"] for row in instruct] + [row["targets"] for row in instruct]
  texts += [row["inputs"] for row in pretrain[:5000]]
  return texts[:synthetic.VOCAB_TRAINING_PROBLEMS * 2]


def world_files(directory) -> Dict[str, pathlib.Path]:
  """Every file `write_world` writes but the manifest, by key."""
  directory = pathlib.Path(directory)
  files = {f"math/{family}_{split}": math_path(directory, family, split)
           for family in FAMILIES for split in (GSM_SPLITS if family == ID_FAMILY else EVAL_SPLITS)}
  files.update({f"generic/{task}_{split}": generic_path(directory, task, split)
                for task in generic_tasks.TASKS for split in GENERIC_SPLITS})
  for name in (PRETRAIN_FILE, INSTRUCT_FILE, TEACHER_TRAIN_FILE, TEACHER_PROMPT_FILE,
               STUDENT_VOCAB_FILE, TEACHER_VOCAB_FILE):
    files[name] = directory / name
  return files


def parameters(size: WorldSize, seed: int) -> Dict:
  return {"world_version": WORLD_VERSION, "seed": seed, "size": dataclasses.asdict(size),
          "student_vocab_size": STUDENT_VOCAB_SIZE, "teacher_vocab_size": TEACHER_VOCAB_SIZE}


def is_current(directory, size: WorldSize, seed: int) -> bool:
  """Whether `directory` holds intact files written with these parameters."""
  try:
    manifest = json.loads((pathlib.Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  if manifest.get("parameters") != parameters(size, seed):
    return False
  recorded = manifest.get("sha256", {})
  return all(key in recorded and path.is_file()
             and prepared_data.file_sha256(str(path)) == recorded[key]
             for key, path in world_files(directory).items())


def manifest_digest(directory) -> str:
  """A digest of the world's manifest: what the cached stages built on this world are keyed by."""
  return hashlib.sha256((pathlib.Path(directory) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]


def write_world(directory, size: WorldSize = WorldSize(), seed: int = 0) -> Dict[str, pathlib.Path]:
  """Writes (or reuses, when current) the world directory; returns `world_files`."""
  directory = pathlib.Path(directory)
  files = world_files(directory)
  if is_current(directory, size, seed):
    return files
  directory.mkdir(parents=True, exist_ok=True)
  manifest_path = directory / MANIFEST_FILE
  if manifest_path.exists():
    manifest_path.unlink()  # The files are about to change: the old manifest no longer holds.
  math = _math_splits(size, seed)
  for (family, split), problems in math.items():
    teacher_data.write_records(math_path(directory, family, split),
                               _records(problems, family, split))
  generic = _generic_splits(size, seed)
  for (task, split), examples in generic.items():
    _write_jsonl(generic_path(directory, task, split), (dataclasses.asdict(e) for e in examples))
  instruct = _instruct_rows(math[(ID_FAMILY, "instruct")],
                            {t: generic[(t, "instruct")] for t in generic_tasks.TASKS}, seed)
  _write_jsonl(files[INSTRUCT_FILE], instruct)
  pretrain = _pretrain_rows(size, seed)
  _write_jsonl(files[PRETRAIN_FILE], pretrain)
  teacher_problems = math[(ID_FAMILY, "teacher_train")]
  prompt = _teacher_prompt(teacher_problems[0])
  with storage.atomic_write(files[TEACHER_PROMPT_FILE]) as f:
    f.write(prompt)
  teacher_rows = _teacher_rows(
      math[(ID_FAMILY, "train")] if size.teacher_memorizes_train else teacher_problems[1:], prompt)
  _write_jsonl(files[TEACHER_TRAIN_FILE], teacher_rows)
  student_vocab = synthetic.train_vocabulary(
      _student_vocab_text(pretrain, instruct), STUDENT_VOCAB_SIZE, extra_symbols=SENTINELS,
      hard_vocab_limit=False)
  with storage.atomic_write(files[STUDENT_VOCAB_FILE], "wb") as f:
    f.write(student_vocab)
  teacher_vocab = synthetic.train_vocabulary(
      [r["inputs"] for r in teacher_rows[:5000]] + [r["targets"] for r in teacher_rows[:5000]],
      TEACHER_VOCAB_SIZE, model_type="unigram", hard_vocab_limit=False)
  with storage.atomic_write(files[TEACHER_VOCAB_FILE], "wb") as f:
    f.write(teacher_vocab)
  manifest = {"parameters": parameters(size, seed),
              "sha256": {key: prepared_data.file_sha256(str(path)) for key, path in files.items()}}
  with storage.atomic_write(manifest_path) as f:
    f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return files
