"""The four formats (golden file), seeded exemplar choice, and the length policy."""
import pytest

from specialize_jax.data import formats
from specialize_jax.data import readers
from specialize_jax.data import splits
from specialize_jax.teacher import teacher_data
from specialize_jax.teacher import teacher_sources
from specialize_jax.data.records import MathExample
from tests.support.golden_files import check_golden


def _pool(n=10):
  return [MathExample(id=f"p/{i}", question=f"Question {i}?", answer_text=str(i),
                      answer_number=float(i), source="test", rationale=f"Step for {i}.\n")
          for i in range(n)]


def test_training_formats_golden(data_dir, vocab_path):
  train = splits.math_split("gsm8k", "train")
  records = teacher_sources.records_from_gsm8k_gold(data_dir / "gsm8k" / "train.jsonl")[:1]
  sampler = formats.ExemplarSampler(train, seed=0)
  count = formats.SentencePieceCounter(str(vocab_path))
  sections = []
  for format_name in formats.FORMATS:
    example = next(formats.distillation_examples(records, format_name, sampler, 1024, count))
    sections.append(f"===== {format_name} | inputs =====\n{example['inputs']}\n"
                    f"===== {format_name} | targets =====\n{example['targets']}\n")
  check_golden("training_formats.txt", "\n".join(sections))


def test_eval_formats_golden(data_dir):
  question = readers.read_gsm8k("test")[0].question
  cot_prompt = readers.read_prompt("prompt_simple_4_cases")
  ao_prompt = formats.answer_only_prompt_from(readers.parse_prompt_exemplars(cot_prompt))
  sections = [f"===== {f} =====\n{formats.eval_input(question, f, cot_prompt, ao_prompt)}\n"
              for f in formats.FORMATS]
  check_golden("eval_formats.txt", "\n".join(sections))


def test_method_md_layout_exactly():
  pool = _pool(2)
  assert formats.build_input("Q?", "zs_ao") == "Q: Q? A:"
  assert formats.build_input("Q?", "zs_cot") == "Q: Q?\nLet's think step by step"
  assert formats.build_input("Q?", "icl_ao", pool) == (
      "Q: Question 0?\nA: The answer is 0\n\nQ: Question 1?\nA: The answer is 1\n\nQ: Q?\nA:")
  assert formats.build_input("Q?", "icl_cot", pool[:1]) == (
      "Q: Question 0?\nLet's think step by step\nStep for 0.\nThe answer is 0\n\n"
      "Q: Q?\nLet's think step by step")


def test_exemplars_are_seeded_and_never_the_target():
  pool = _pool(6)
  sampler = formats.ExemplarSampler(pool, num_exemplars=4, seed=3)
  ids = lambda chosen: [e.id for e in chosen]
  assert ids(sampler.choose(7, "x")) == ids(formats.ExemplarSampler(pool, 4, seed=3).choose(7, "x"))
  # Keys and seeds both change the draw (over 20 keys / seeds, more than one distinct choice).
  assert len({tuple(ids(sampler.choose(key, "x"))) for key in range(20)}) > 1
  assert len({tuple(ids(formats.ExemplarSampler(pool, 4, seed=s).choose(7, "x")))
              for s in range(20)}) > 1
  for key in range(200):
    for target in pool:
      chosen = sampler.choose(key, target.question)
      assert len(chosen) == 4 and target not in chosen


def test_length_policy_drops_exemplars_not_question():
  pool = _pool(4)
  words = lambda text: len(text.split())  # A stand-in token counter with known counts.
  full = formats.build_input("What is the final question?", "icl_cot", pool)
  fitted = formats.fit_exemplars("What is the final question?", "icl_cot", pool,
                                 max_tokens=words(full) - 1, count_tokens=words)
  assert fitted.endswith("Q: What is the final question?\nLet's think step by step")
  assert "Question 0?" not in fitted and "Question 3?" in fitted  # Earliest dropped first.
  tiny = formats.fit_exemplars("What is the final question?", "icl_cot", pool, 1, words)
  assert tiny == formats.build_input("What is the final question?", "zs_cot".replace("zs", "icl"), [])


def test_distillation_examples_filter_and_count():
  sample = lambda text, correct: teacher_data.TeacherSample(text=text, answer=None, correct=correct)
  record = teacher_data.TeacherRecord(
      id="r0", source="gsm8k", split="train", question="How many?", gold_answer="5",
      gold_number=5.0, samples=(sample("\n2+3=5.\nThe answer is 5.\nQuestion: next", True),
                                sample("The answer is 4", False), sample("no final line", True)))
  held_out = teacher_data.TeacherRecord(id="r1", source="gsm8k", split="train", question="Held?",
                                        gold_answer="1", gold_number=1.0, samples=())
  stats = {}
  sampler = formats.ExemplarSampler(_pool(), seed=0)
  out = list(formats.distillation_examples([record, held_out], "zs_cot", sampler,
                                           exclude_questions=frozenset({"Held?"}), stats=stats))
  assert [e["targets"] for e in out] == ["2+3=5.\nThe answer is 5."]  # Cut after the answer line.
  assert stats == {"excluded_questions": 1, "incorrect_samples": 1, "malformed_samples": 1}
  answer_only = list(formats.distillation_examples([record], "icl_ao", sampler))
  assert len(answer_only) == 1 and answer_only[0]["targets"] == "The answer is 5"
  assert answer_only[0]["inputs"].count("\nA: The answer is") == 4


def test_unknown_format_is_named():
  with pytest.raises(ValueError, match="Unknown format 'cot'.*zs_ao"):
    formats.build_input("q", "cot")
