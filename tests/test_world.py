"""The demo's world: math families, span corruption, vocabularies, files and its SeqIO tasks."""
import json
import re

import numpy as np
import pytest
import sentencepiece

from specialize_jax.data import answers
from specialize_jax.data import formats
from specialize_jax.demo import generic_tasks
from specialize_jax.demo import synthetic
from specialize_jax.demo import world
from specialize_jax.teacher import teacher_data

SIZE = world.WorldSize.quick()


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("data") / "world"
  world.write_world(directory, SIZE, seed=0)
  return directory


def _chain_value(cot: str) -> int:
  """Recomputes a gold chain line by line; returns its final value (checking every line)."""
  lines = cot.split("\n")
  value = int(re.search(r"starts with (\d+)", lines[0]).group(1))
  for line in lines[1:-1]:
    left, op, operand, _, result = line.rstrip(".").split()
    assert int(left) == value
    value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand),
             "/": value // int(operand)}[op]
    assert value == int(result)
  assert lines[-1] == f"The answer is {value}"
  return value


@pytest.mark.parametrize("family", world.FAMILIES)
def test_every_family_has_correct_chains_and_its_step_counts(family):
  problems = world.math_problems(family, 60, seed=0, stream=1)
  assert len({p.question for p in problems}) == 60
  _, steps = world._FAMILY_WORDING[family]  # pylint: disable=protected-access
  assert {p.num_steps for p in problems} == set(steps)
  for p in problems:
    assert _chain_value(p.cot) == p.answer
    assert answers.extract_answer(p.cot) == p.answer


def test_families_shift_the_wording_as_documented():
  gsm = world.math_problems("gsm", 50, 0, 1)
  svamp = world.math_problems("svamp", 50, 0, 2)
  asdiv = world.math_problems("asdiv", 50, 0, 3)
  multiarith = world.math_problems("multiarith", 50, 0, 4)
  id_names = {p.name for p in synthetic.ID_POOL.people}
  ood_names = {p.name for p in synthetic.OOD_POOL.people}
  first_word = lambda p: p.question.split()[0]
  assert {first_word(p) for p in gsm} <= id_names
  assert {first_word(p) for p in multiarith} <= ood_names  # Training templates, other names.
  assert all(not p.question.startswith(tuple(id_names)) for p in asdiv)
  # SVAMP: a second sentence about another person's objects, which the chain ignores.
  for p in svamp:
    fact = p.question.split(". ")[1]
    other = fact.split()[0]
    assert other in id_names and other != first_word(p) and " has " in fact
    assert str(_chain_value(p.cot)) == str(p.answer)


def test_span_corruption_hides_spans_that_the_targets_restore():
  rng = np.random.default_rng(0)
  text = " ".join(f"w{i}" for i in range(40))
  inputs, targets = world.span_corrupt(text, rng)
  sentinels = re.findall(r"<extra_id_\d+>", inputs)
  assert sentinels == [f"<extra_id_{i}>" for i in range(len(sentinels))]
  assert targets.split()[-1] == f"<extra_id_{len(sentinels)}>"
  hidden = dict(re.findall(r"(<extra_id_\d+>) ([^<]*)", targets))
  restored = " ".join(hidden.get(w, w).strip() if w.startswith("<extra") else w
                      for w in inputs.split())
  assert restored == text
  noise = sum(len(v.split()) for v in hidden.values())
  assert noise == round(40 * world.NOISE_DENSITY)


def test_no_question_is_in_two_files_and_eval_splits_avoid_exemplars(world_dir):
  seen = {}
  for family in world.FAMILIES:
    for split in (world.GSM_SPLITS if family == world.ID_FAMILY else world.EVAL_SPLITS):
      for record in teacher_data.read_records(world.math_path(world_dir, family, split)).records:
        assert record.question not in seen, (family, split, seen.get(record.question))
        seen[record.question] = (family, split)
  for task in generic_tasks.TASKS:
    shots = {e.question for e in generic_tasks.exemplars(task)}
    questions = []
    for split in world.GENERIC_SPLITS:
      with open(world.generic_path(world_dir, task, split), encoding="utf-8") as f:
        questions += [json.loads(line)["question"] for line in f]
    assert len(questions) == len(set(questions))
    assert not shots & set(questions)


def test_vocabularies_differ_and_keep_numbers_and_sentinels_whole(world_dir):
  student = sentencepiece.SentencePieceProcessor(
      model_file=str(world_dir / world.STUDENT_VOCAB_FILE))
  teacher = sentencepiece.SentencePieceProcessor(
      model_file=str(world_dir / world.TEACHER_VOCAB_FILE))
  for n in (0, 7, 42, 99):
    assert len(student.encode(f" {n}")) == 1
    assert len(teacher.encode(f" {n}")) == 1
  for sentinel in world.SENTINELS:
    assert student.piece_to_id(sentinel) != student.unk_id()
    assert student.piece_to_id(sentinel) in student.encode(f"Ava has {sentinel} apples")
  text = world.math_problems("gsm", 1, 0, 1)[0].question
  assert student.encode(text, out_type=str) != teacher.encode(text, out_type=str)
  assert student.piece_to_id("<unk>") == 2 and teacher.piece_to_id("<unk>") == 2


def test_rewriting_the_same_world_reuses_it_and_other_parameters_rebuild(world_dir):
  manifest = world_dir / world.MANIFEST_FILE
  before = manifest.stat().st_mtime_ns
  world.write_world(world_dir, SIZE, seed=0)
  assert manifest.stat().st_mtime_ns == before
  assert world.is_current(world_dir, SIZE, 0)
  assert not world.is_current(world_dir, SIZE, 1)
  # A damaged file is found by its digest.
  path = world.math_path(world_dir, "svamp", "dev")
  original = path.read_bytes()
  path.write_bytes(original.replace(b"has", b"had", 1))
  try:
    assert not world.is_current(world_dir, SIZE, 0)
  finally:
    path.write_bytes(original)


def test_instruction_mixture_holds_every_task_and_format(world_dir):
  with open(world_dir / world.INSTRUCT_FILE, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert {r["task"] for r in rows} == {"math", *generic_tasks.TASKS}
  math_rows = [r for r in rows if r["task"] == "math"]
  assert len(math_rows) == SIZE.instruct_math
  # The four formats in turn: in-context inputs hold exemplars, CoT targets a chain.
  in_context = [r for r in math_rows if r["inputs"].count("Q: ") == world.NUM_EXEMPLARS + 1]
  cot = [r for r in math_rows if "\n" in r["targets"]]
  assert len(in_context) == SIZE.instruct_math // 2
  assert len(cot) == SIZE.instruct_math // 2


def test_teacher_rows_are_the_prompt_the_teacher_client_sends(world_dir):
  from specialize_jax.teacher import teacher_client  # pylint: disable=g-import-not-at-top
  prompt = (world_dir / world.TEACHER_PROMPT_FILE).read_text(encoding="utf-8")
  with open(world_dir / world.TEACHER_TRAIN_FILE, encoding="utf-8") as f:
    row = json.loads(f.readline())
  question = row["inputs"][len(prompt):].split("\n")[1][len("Question: "):]
  assert row["inputs"] == teacher_client.build_prompt(prompt, question)
  assert row["targets"].endswith(f"The answer is {_chain_value(row['targets'])}")


def test_world_tasks_build_the_documented_inputs(world_dir):
  from specialize_jax.tasks import world as world_tasks  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  world_tasks.register_world_tasks(str(world_dir))
  exemplars = world.eval_exemplars(world_dir)
  task = seqio.get_mixture_or_task("world_svamp_dev_icl_cot")
  example = next(iter(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator()))
  first = world.read_math(world_dir, "svamp", "dev")[0]
  assert example["inputs_pretokenized"].decode() == formats.eval_input(
      first.question, "icl_cot", world.cot_prompt(exemplars))
  assert example["answer"].decode() == first.answer_text
  generic = seqio.get_mixture_or_task("world_bbh_navigate_test_zs_ao")
  example = next(iter(generic.get_dataset(None, split="test", shuffle=False).as_numpy_iterator()))
  assert example["targets_pretokenized"].decode().startswith("So the answer is ")
  with pytest.raises(Exception, match="specialize demo"):
    seqio.get_mixture_or_task("world_distill_top6").get_dataset(
        {"inputs": 320, "targets": 80}, split="train")


def test_world_task_names_say_split_distribution_and_selection_refuses_their_tests():
  from specialize_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import selection  # pylint: disable=g-import-not-at-top
  from specialize_jax.evaluation import task_keys  # pylint: disable=g-import-not-at-top
  key = task_keys.describe_task("world_gsm_dev_icl_cot")
  assert (key.dataset, key.split, key.format, key.distribution) == (
      "world_gsm", "dev", "icl_cot", task_keys.IN_DISTRIBUTION)
  key = task_keys.describe_task("world_svamp_test_zs_cot")
  assert (key.split, key.distribution) == ("test", task_keys.OUT_OF_DISTRIBUTION)
  key = task_keys.describe_task("world_bbh_dyck_languages_dev_icl_cot")
  assert (key.dataset, key.subtask, key.distribution) == (
      "world_bbh", "dyck_languages", task_keys.GENERIC)
  with pytest.raises(ConfigError, match="test"):
    selection.make_rule("custom", ["world_svamp_test_icl_cot"])


def test_teacher_client_samples_the_questions_of_a_world_file(world_dir):
  """`specialize teacher --questions FILE`: ids, questions and gold answers of the file."""
  from specialize_jax.teacher import teacher_client  # pylint: disable=g-import-not-at-top
  path = world.math_path(world_dir, world.ID_FAMILY, "train")
  examples = teacher_client.file_examples(path)
  records = teacher_data.read_records(path).records
  assert [(e.id, e.question, e.answer_number) for e in examples] == [
      (r.id, r.question, r.gold_number) for r in records]
  assert examples[0].id == "world/gsm_train/0"
