"""The demo's generated problems, teacher-data files, BPE vocabulary and SeqIO tasks."""
import functools
import json
import re
import time

import numpy as np
import pytest
import seqio
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from specialize_jax.data import answers
from specialize_jax.demo import synthetic
from specialize_jax.teacher import teacher_data

NUM_TRAIN, NUM_EVAL = 2000, 60


@pytest.fixture(scope="module")
def splits():
  start = time.perf_counter()
  result = synthetic.make_splits(num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=0)
  seconds = time.perf_counter() - start
  print(f"\ngenerated {sum(map(len, result.values()))} problems at "
        f"{sum(map(len, result.values())) / seconds:,.0f} problems/s")
  return result


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("data") / "demo"
  start = time.perf_counter()
  synthetic.write_demo_data(directory, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=0)
  print(f"\nwrote the demo directory ({NUM_TRAIN} train problems) in "
        f"{time.perf_counter() - start:.2f} s")
  return directory


# ------------------------------------------------------------------------------------------------
# Parsing a question back into its steps with the pool's templates.


@functools.lru_cache(maxsize=None)
def _template_regex(template, pool_name):
  pool = synthetic.POOLS[pool_name]
  names = "|".join(p.name for p in pool.people)
  objects = "|".join(re.escape(o) for o in pool.objects)
  pattern = re.escape(template)
  for field, value in (("name", f"(?P<name>{names})"), ("other", f"(?:{names})"),
                       ("obj", f"(?P<obj>{objects})"), ("n", r"(?P<n>\d+)"),
                       ("he", "(?:he|she)"), ("him", "(?:him|her)"), ("his", "(?:his|her)"),
                       ("He", "(?:He|She)"), ("His", "(?:His|Her)")):
    pattern = pattern.replace(re.escape("{" + field + "}"), value)
  return re.compile(pattern)


def _parse(question, pool):
  """[(kind, number or None, object)] per sentence; kind is 'start', an operation or 'question'.
  Fails the test when a sentence matches no template of `pool`."""
  kinds = [("start", t) for t in pool.start] + [("question", t) for t in pool.question] + [
      (op, t) for op in synthetic.OPERATIONS for t in pool.steps[op]]
  parsed = []
  for sentence in re.split(r"(?<=[.?]) ", question):
    matches = [(kind, m) for kind, t in kinds
               for m in [_template_regex(t, pool.name).fullmatch(sentence)] if m]
    assert len(matches) == 1, f"{sentence!r} matches {len(matches)} {pool.name} templates"
    kind, match = matches[0]
    groups = match.groupdict()
    parsed.append((kind, int(groups["n"]) if groups.get("n") else None, groups.get("obj")))
  return parsed


def _words(text):
  return set(re.findall(r"[A-Za-z]+", text))


# ------------------------------------------------------------------------------------------------
# Generation.


def test_same_seed_same_problems_other_seed_other_problems():
  first = synthetic.generate_problems(300, seed=3)
  assert first == synthetic.generate_problems(300, seed=3)
  other = synthetic.generate_problems(300, seed=4)
  shared = {p.question for p in first} & {p.question for p in other}
  assert len(shared) < 10


def test_split_sizes_steps_and_disjointness(splits):
  assert {k: len(v) for k, v in splits.items()} == {
      "train": NUM_TRAIN, "test_id": NUM_EVAL, "test_ood": NUM_EVAL, "test_long": NUM_EVAL}
  for name, problems in splits.items():
    assert len({p.question for p in problems}) == len(problems), f"{name} repeats a question"
  train_questions = {p.question for p in splits["train"]}
  assert not train_questions & {p.question for p in splits["test_id"]}
  for name in ("train", "test_id", "test_ood"):
    counts = np.bincount([p.num_steps for p in splits[name]], minlength=5).tolist()
    assert counts[0] == counts[4] == 0 and max(counts[1:4]) - min(counts[1:4]) <= 1, (name, counts)
  assert {p.num_steps for p in splits["test_long"]} == {4}
  assert [p.pool for p in splits["test_ood"]] == ["ood"] * NUM_EVAL
  assert {p.pool for name in ("train", "test_id", "test_long") for p in splits[name]} == {"id"}


def test_pools_share_no_name_object_or_template():
  id_pool, ood_pool = synthetic.ID_POOL, synthetic.OOD_POOL
  assert not {p.name for p in id_pool.people} & {p.name for p in ood_pool.people}
  assert not set(id_pool.objects) & set(ood_pool.objects)
  assert not set(id_pool.templates()) & set(ood_pool.templates())
  # Word level too: no name or object of one pool occurs inside the other pool's templates.
  for pool, other in ((id_pool, ood_pool), (ood_pool, id_pool)):
    own_words = _words(" ".join(pool.templates()))
    assert not own_words & ({p.name for p in other.people} | _words(" ".join(other.objects)))


def test_problems_use_only_their_pool_and_the_cot_is_right(splits):
  for name, problems in splits.items():
    for problem in problems:
      pool = synthetic.POOLS[problem.pool]
      other = synthetic.OOD_POOL if pool is synthetic.ID_POOL else synthetic.ID_POOL
      parsed = _parse(problem.question, pool)  # Fails on any sentence outside the pool.
      assert not _words(problem.question) & {p.name for p in other.people}, problem.question
      kinds = [kind for kind, _, _ in parsed]
      assert kinds[0] == "start" and kinds[-1] == "question", problem.question
      assert len(kinds) == problem.num_steps + 2
      lines = problem.cot.split("\n")
      obj = parsed[0][2]
      person = re.match(r"\w+", lines[0]).group()
      assert person in {p.name for p in pool.people}
      assert lines[0] == f"{person} starts with {parsed[0][1]} {obj}.", problem
      assert f"{person}" in problem.question and obj in problem.question
      value = parsed[0][1]
      symbols = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
      for (op, operand, _), line in zip(parsed[1:-1], lines[1:-1]):
        a, symbol, b, equals, c = line.rstrip(".").split(" ")
        assert (int(a), symbol, int(b), equals) == (value, symbols[op], operand, "="), problem
        result = {"+": value + operand, "-": value - operand, "*": value * operand,
                  "/": value / operand}[symbol]
        assert int(c) == result and 1 <= result <= synthetic.MAX_VALUE, problem
        value = int(c)
      assert lines[-1] == f"The answer is {problem.answer}" and value == problem.answer
      assert len(lines) == problem.num_steps + 2
      assert answers.extract_answer(problem.cot) == problem.answer
      assert problem.answer_only_target == f"The answer is {problem.answer}"


def test_every_operation_occurs(splits):
  symbols = [line.split(" ")[1] for p in splits["train"] for line in p.cot.split("\n")[1:-1]]
  counts = {s: symbols.count(s) for s in "+-*/"}
  assert min(counts.values()) > 0.1 * len(symbols), counts


def test_generate_problems_refuses_bad_arguments():
  with pytest.raises(ValueError, match="steps"):
    synthetic.generate_problems(3, seed=0, steps=(5,))
  with pytest.raises(ValueError, match="pool"):
    synthetic.generate_problems(3, seed=0, pool="other")


# ------------------------------------------------------------------------------------------------
# The demo directory.


@pytest.mark.slow
def test_files_are_valid_teacher_data(demo_dir, splits):
  for split, problems in splits.items():
    path = demo_dir / synthetic.SPLIT_FILES[split]
    assert teacher_data.validate_file(path) == []  # No errors and no warnings.
    records = teacher_data.read_records(path).records
    assert len(records) == len(problems)
    for i, (record, problem) in enumerate(zip(records, problems)):
      assert (record.id, record.source, record.split) == (f"demo/{split}/{i}", "demo", split)
      assert (record.question, record.gold_answer) == (problem.question, str(problem.answer))
      assert record.gold_number == problem.answer
      assert record.meta == {"num_steps": problem.num_steps}
      (sample,) = record.samples
      assert (sample.text, sample.answer, sample.correct) == (problem.cot, problem.answer, True)
    assert synthetic.read_problems(path) == problems


@pytest.mark.slow
def test_reuse_and_regeneration(demo_dir, tmp_path):
  paths = synthetic.demo_paths(demo_dir)
  before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
  synthetic.write_demo_data(demo_dir, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=0)
  assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == before  # Reused.
  manifest = json.loads(paths["manifest"].read_text())
  assert manifest["parameters"]["seed"] == 0 and manifest["parameters"]["num_train"] == NUM_TRAIN

  # A damaged copy is rebuilt byte for byte (generation and vocabulary training are deterministic).
  copy = tmp_path / "demo"
  copy_paths = synthetic.write_demo_data(copy, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=0)
  assert all(copy_paths[k].read_bytes() == paths[k].read_bytes() for k in paths)
  copy_paths["test_id"].write_text("damaged\n")
  synthetic.write_demo_data(copy, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=0)
  assert copy_paths["test_id"].read_bytes() == paths["test_id"].read_bytes()

  synthetic.write_demo_data(copy, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=1)
  assert copy_paths["train"].read_bytes() != paths["train"].read_bytes()
  assert json.loads(copy_paths["manifest"].read_text())["parameters"]["seed"] == 1
  assert not list(copy.glob(".*.tmp"))  # No temp files left behind.


@pytest.mark.slow
def test_vocabulary(demo_dir, splits):
  path = demo_dir / synthetic.VOCAB_FILE
  start = time.perf_counter()
  text = synthetic.vocabulary_text(splits["train"])
  model = synthetic.train_vocabulary(text)
  print(f"\nvocabulary trained on {len(text)} lines in {time.perf_counter() - start:.2f} s")
  assert model == path.read_bytes()
  proto = sentencepiece_model_pb2.ModelProto.FromString(model)
  assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
  assert not proto.trainer_spec.byte_fallback
  sp = sentencepiece.SentencePieceProcessor(model_proto=model)
  assert sp.get_piece_size() == synthetic.VOCAB_SIZE == 384
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  assert pieces[3:103] == [f"\u2581{n}" for n in range(100)]
  for piece in pieces[103:]:  # Numbers come only from the number pieces (or single characters).
    assert not any(c.isdigit() for c in piece) or len(piece) == 1, piece
  encoded = sp.encode("Ava has 12 apples.\n12 + 7 = 19.", out_type=str)
  assert encoded[encoded.index("\u2581has") + 1:] == [
      "\u258112", "\u2581apples", ".", "\u258112", "\u2581+", "\u25817", "\u2581=", "\u258119",
      "."]

  tokens = {"cot targets": [], "cot inputs": [], "ao inputs": []}
  for name, problems in splits.items():
    for problem in problems:
      ids = sp.encode(problem.cot)
      assert sp.unk_id() not in ids + sp.encode(problem.question), problem.question
      # One token per number; the newline encodes like a space (T5 convention).
      assert [sp.id_to_piece(i) for i in ids if 3 <= i < 103] == [
          f"\u2581{n}" for n in re.findall(r"\d+", problem.cot)]
      assert sp.decode(ids) == problem.cot.replace("\n", " ")
      if name == "test_id":
        tokens["cot targets"].append(len(ids) + 1)  # + EOS
        tokens["cot inputs"].append(len(sp.encode(f"Q: {problem.question}\n"
                                                  "Let's think step by step")) + 1)
        tokens["ao inputs"].append(len(sp.encode(f"Q: {problem.question} A:")) + 1)
  print("mean tokens (test_id, with EOS): " +
        ", ".join(f"{k} {np.mean(v):.1f} (max {max(v)})" for k, v in tokens.items()))
  # Merges at work, prompt wrappers included: an input needs far fewer tokens than characters
  # (about 0.3 per character).
  assert np.mean(tokens["cot inputs"]) < 0.4 * np.mean(
      [len(f"Q: {p.question}\nLet's think step by step") for p in splits["test_id"]])


# ------------------------------------------------------------------------------------------------
# Scoring by step count.


def test_accuracy_by_steps():
  scores = synthetic.accuracy_by_steps(
      ["12 + 7 = 19.\nThe answer is 19", "The answer is 3", "no number", "The answer is 40"],
      ["19", 4, b"5", 40.0], np.array([1, 1, 2, 3]))
  assert scores == {"accuracy": 50.0, "count": 4.0,
                    "accuracy_steps_1": 50.0, "count_steps_1": 2.0,
                    "accuracy_steps_2": 0.0, "count_steps_2": 1.0,
                    "accuracy_steps_3": 100.0, "count_steps_3": 1.0}
  with pytest.raises(ValueError, match="aligned"):
    synthetic.accuracy_by_steps(["The answer is 1"], [1, 2], [1, 1])


# ------------------------------------------------------------------------------------------------
# SeqIO tasks.


@pytest.fixture
def demo_tasks(demo_dir):
  from specialize_jax.tasks import demo  # pylint: disable=g-import-not-at-top
  names = demo.register_demo_tasks(str(demo_dir))
  assert demo.register_demo_tasks(str(demo_dir)) == names  # Registering twice is fine.
  yield demo, names
  demo.register_demo_tasks()  # Back to the default directory for later tests.


@pytest.mark.slow
def test_tasks_iterate_and_decode(demo_tasks, splits):
  demo, names = demo_tasks
  assert sorted(names) == sorted(
      ["demo_train_cot", "demo_train_ao"] +
      [f"demo_{s}_{t}" for s in ("id", "ood", "long") for t in ("cot", "ao")])
  lengths = {"inputs": 256, "targets": 128}
  for name in names:
    task = seqio.get_mixture_or_task(name)
    split = "train" if "_train_" in name else "test"
    assert task.splits == (split,)
    vocab = task.output_features["targets"].vocabulary
    assert vocab.vocab_size == synthetic.VOCAB_SIZE
    demo_split = "train" if split == "train" else demo.EVAL_SETS[name.split("_")[1]]
    examples = list(task.get_dataset(lengths, split=split, shuffle=False).take(3)
                    .as_numpy_iterator())
    assert len(examples) == 3
    for example, problem in zip(examples, splits[demo_split]):
      cot = name.endswith("_cot")
      text = {"inputs": (f"Q: {problem.question}\nLet's think step by step" if cot
                         else f"Q: {problem.question} A:"),
              "targets": problem.cot if cot else problem.answer_only_target}
      if split == "test":  # Training tasks read the prepared set: tokens only.
        assert {k: example[f"{k}_pretokenized"].decode() for k in text} == text, name
      for key in ("inputs", "targets"):
        assert example[key][-1] == 1, name  # EOS
        assert example[key].tolist() == vocab.encode(text[key]) + [1], name
        assert vocab.decode(example[key].tolist()) == text[key].replace("\n", " "), name
      if split == "train":
        continue
      assert example["num_steps"] == problem.num_steps
      assert task.postprocess_fn(None, example=example, is_target=True) == str(problem.answer)
    if split == "test":
      targets = [task.postprocess_fn(None, example=e, is_target=True) for e in examples]
      assert task.metric_fns[0](targets, ["The answer is -1"] * 3)["accuracy"] == 0.0
      assert task.metric_fns[0](targets, [e["targets_pretokenized"].decode()
                                          for e in examples])["accuracy"] == 100.0


@pytest.mark.slow
def test_eval_task_holds_the_whole_split(demo_tasks, splits):
  task = seqio.get_mixture_or_task("demo_long_cot")
  examples = list(task.source.get_dataset("test", shuffle=False).as_numpy_iterator())
  assert [e["question"].decode() for e in examples] == [p.question for p in splits["test_long"]]
  assert {int(e["num_steps"]) for e in examples} == {4}


def test_missing_data_names_the_fix(tmp_path):
  from specialize_jax.tasks import demo  # pylint: disable=g-import-not-at-top
  demo.register_demo_tasks(str(tmp_path / "absent"))  # Registration reads nothing.
  try:
    task = seqio.get_mixture_or_task("demo_id_cot")
    with pytest.raises(FileNotFoundError, match="write_demo_data"):
      task.get_dataset({"inputs": 64, "targets": 64}, split="test", shuffle=False)
  finally:
    demo.register_demo_tasks()
