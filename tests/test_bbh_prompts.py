"""The original's BBH inputs (`bbh_{task}_ao_paper`, `bbh_{task}_cot_paper`), pinned on one real task."""
import tensorflow as tf

from specialize_jax.data import readers
from tests.support.golden_files import check_golden

TASK = "date_understanding"


def test_ao_paper_input_golden(data_dir):
  """The original's `modify_prompt` keeps the file up to its first `A:` and the text between its
  first two `the answer is `: exemplar 1 answer-only, exemplar 2's chain cut before its answer,
  exemplar 3 gone; then `\\n\\nQ: {question}\\nA: the answer is `."""
  from specialize_jax.tasks import bbh  # pylint: disable=g-import-not-at-top
  example = readers.read_bbh(TASK)[0]
  dataset = tf.data.Dataset.from_tensors({"id": example.id, "question": example.input,
                                          "answer": example.target})
  inputs = next(bbh.format_bbh(dataset, TASK, "ao_paper").as_numpy_iterator())["inputs"].decode()
  check_golden("bbh_ao_paper_date_understanding.txt", inputs)
  raw = readers.read_bbh_prompt_file(TASK)
  first_question = raw.split("\nA: Let's think step by step.")[0]
  assert inputs.startswith(f"{first_question}\nA: the answer is (D).")
  assert inputs.endswith(f"\n\nQ: {example.input}\nA: the answer is ")
  assert inputs.count("A: the answer is ") == 2 and inputs.count("Let's think step by step") == 1
  assert ("\nA: Let's think step by step.\nIf tomorrow is 11/12/2019, then today is 11/11/2019. "
          "The date one year ago from today is 11/11/2018. So \n\nQ: ") in inputs
  assert "Jane and John" not in inputs  # The third exemplar is dropped.
  import seqio  # pylint: disable=g-import-not-at-top
  assert {f"bbh_{TASK}_ao_paper", "bbh_ao_paper"} <= (set(seqio.TaskRegistry.names())
                                                      | set(seqio.MixtureRegistry.names()))


def test_ao_paper_prompt_of_every_task_builds(data_dir):
  for task in readers.BBH_TASKS:
    prompt = readers.bbh_answer_only_prompt_paper(readers.read_bbh_prompt_file(task))
    assert prompt.startswith("BENCHMARK DATA SHOULD NEVER APPEAR") and "A: the answer is " in prompt


def test_ao_paper_is_a_format_of_its_own_in_reports():
  """Reports average `ao` tasks into BBH-AO; the paper's prompt must not be mixed into it."""
  from specialize_jax.evaluation import task_keys  # pylint: disable=g-import-not-at-top
  key = task_keys.describe_task("bbh_date_understanding_ao_paper")
  assert (key.dataset, key.subtask, key.format) == ("bbh", "date_understanding", "ao_paper")
  assert task_keys.describe_task("bbh_date_understanding_ao").format == "ao"


def test_cot_paper_input_is_the_raw_file_then_the_originals_trigger(data_dir):
  """The original's BBH CoT input (`test_bbh.py`): the prompt file as it is, canary header
  included, then `\\n\\nQ: {question}\\nA: Let's think step by step.\\n`."""
  from specialize_jax.tasks import bbh  # pylint: disable=g-import-not-at-top
  example = readers.read_bbh(TASK)[0]
  dataset = tf.data.Dataset.from_tensors({"id": example.id, "question": example.input,
                                          "answer": example.target})
  inputs = next(bbh.format_bbh(dataset, TASK, "cot_paper").as_numpy_iterator())["inputs"].decode()
  raw = readers.read_bbh_prompt_file(TASK)
  assert inputs == f"{raw}\n\nQ: {example.input}\nA: Let's think step by step.\n"
  assert inputs.startswith("BENCHMARK DATA SHOULD NEVER APPEAR")
  ours = next(bbh.format_bbh(dataset, TASK, "cot").as_numpy_iterator())["inputs"].decode()
  assert ours.endswith("\nA: Let's think step by step.") and "BENCHMARK DATA" not in ours
  from specialize_jax.evaluation import task_keys  # pylint: disable=g-import-not-at-top
  assert task_keys.describe_task(f"bbh_{TASK}_cot_paper").format == "cot_paper"
  import seqio  # pylint: disable=g-import-not-at-top
  assert "bbh_cot_paper" in seqio.MixtureRegistry.names()
