"""tools/make_paper_scale_teacher.py at a tiny size: both files validate, hold GSM8K train's real
questions with correct samples, the aligned rows are exactly the CoT targets, and the output depends
on the seed only (not on workers or chunking)."""
import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest
import sentencepiece

from specialize_jax.data import answers
from specialize_jax.data import formats
from specialize_jax.align import aligned_data
from specialize_jax.teacher import teacher_data
from specialize_jax.teacher import teacher_sources
from tests.support import shared_data

TOOL = shared_data.REPO_ROOT / "tools" / "make_paper_scale_teacher.py"
NUM_QUESTIONS = 12
SAMPLES_PER_QUESTION = 3
TOP_K = 5


def _run_tool(output_dir: pathlib.Path, data_dir: pathlib.Path, *extra: str) -> pathlib.Path:
  argv = [sys.executable, str(TOOL), "--output_dir", str(output_dir),
          "--num_questions", str(NUM_QUESTIONS), "--samples_per_question",
          str(SAMPLES_PER_QUESTION), "--data_dir", str(data_dir),
          "--vocab", str(data_dir / "tokenizer" / "t5_spiece.model"), *extra]
  done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                        cwd=shared_data.REPO_ROOT)
  if done.returncode != 0:
    raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n"
                         f"{done.stderr}")
  assert f"{NUM_QUESTIONS} questions" in done.stdout, done.stdout
  return output_dir


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  """Output folders of four runs: the reference, 2 workers + other chunking, seed 1, top_k 3."""
  data_dir = shared_data.shared_data_dir()
  shared_data.shared_file("gsm8k/train.jsonl")
  shared_data.shared_file("tokenizer/t5_spiece.model")
  root = tmp_path_factory.mktemp("paper_scale")
  return {
      "data_dir": data_dir,
      "ref": _run_tool(root / "ref", data_dir, "--workers", "1", "--seed", "0"),
      "workers2": _run_tool(root / "workers2", data_dir, "--workers", "2", "--seed", "0",
                            "--questions_per_chunk", "5"),
      "seed1": _run_tool(root / "seed1", data_dir, "--workers", "1", "--seed", "1"),
      "top_k3": _run_tool(root / "top_k3", data_dir, "--workers", "2", "--top_k", "3",
                          "--questions_per_chunk", "4"),
  }


def _records(folder: pathlib.Path):
  read = teacher_data.read_records(folder / "teacher.jsonl", strict=True)
  assert read.problems == () and read.skipped_lines == 0 and not read.truncated_last_line
  return read.records


def test_records_are_gsm8k_trains_first_questions(outputs):
  records = _records(outputs["ref"])
  with open(outputs["data_dir"] / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
    raw = [json.loads(next(f)) for _ in range(NUM_QUESTIONS)]
  gold = teacher_sources.records_from_gsm8k_gold(outputs["data_dir"] / "gsm8k" / "train.jsonl")
  assert [r.id for r in records] == [f"gsm8k/train/{i}" for i in range(NUM_QUESTIONS)]
  assert [r.id for r in records] == [g.id for g in gold[:NUM_QUESTIONS]]
  assert [r.question for r in records] == [row["question"].strip() for row in raw]
  assert [r.gold_answer for r in records] == [row["answer"].split("####")[1].strip()
                                              for row in raw]
  assert [r.gold_number for r in records] == [g.gold_number for g in gold[:NUM_QUESTIONS]]
  assert all((r.source, r.split) == ("gsm8k", "train") for r in records)


def test_samples_are_correct_with_per_token_top_k(outputs):
  records = _records(outputs["ref"])
  assert [len(r.samples) for r in records] == [SAMPLES_PER_QUESTION] * NUM_QUESTIONS
  positions = sampled_in_top = 0
  for record in records:
    texts = [s.text for s in record.samples]
    assert len(set(texts)) == SAMPLES_PER_QUESTION, f"{record.id}: samples are not varied"
    for sample in record.samples:
      assert sample.correct is True
      assert answers.answers_match(answers.extract_answer(sample.text), record.gold_number)
      assert sample.answer == pytest.approx(record.gold_number)
      target = formats.teacher_cot_target(sample.text)
      assert target.endswith(f"The answer is {record.gold_answer}.")
      assert "".join(sample.tokens) == sample.text
      assert len(sample.logprobs) == len(sample.top_logprobs) == len(sample.tokens)
      for token, logprob, top in zip(sample.tokens, sample.logprobs, sample.top_logprobs):
        top_lps = [lp for _, lp in top]
        assert len(top) == TOP_K and len({t for t, _ in top}) == TOP_K
        assert top_lps == sorted(top_lps, reverse=True) and max(top_lps) <= 0 and logprob <= 0
        positions += 1
        if token in dict(top):
          sampled_in_top += 1
          assert dict(top)[token] == logprob
        else:
          assert logprob < min(top_lps)
  assert 0.85 < sampled_in_top / positions < 1.0
  tails = []
  for sample in (s for r in records for s in r.samples):
    target = formats.teacher_cot_target(sample.text)
    tails.append(sample.text[sample.text.index(target) + len(target):])
  assert any(tail.strip() for tail in tails), "no sample has text after its answer line"
  assert any(tail == "\n\n" for tail in tails)


def test_aligned_rows_are_the_cot_targets(outputs):
  records = _records(outputs["ref"])
  rows = aligned_data.read_aligned(outputs["ref"] / "teacher.aligned.jsonl")
  processor = sentencepiece.SentencePieceProcessor(
      model_file=str(outputs["data_dir"] / "tokenizer" / "t5_spiece.model"))
  expected = [(r, i, s) for r in records for i, s in enumerate(r.samples)]
  assert [(row.id, row.sample_index) for row in rows] == [(r.id, i) for r, i, _ in expected]
  one_hot = target_in_kept = kept = 0
  for row, (record, _, sample) in zip(rows, expected):
    assert (row.question, row.gold_answer) == (record.question, record.gold_answer)
    assert row.target == formats.teacher_cot_target(sample.text)
    assert list(row.target_ids) == processor.encode(row.target)
    assert processor.eos_id() not in row.target_ids
    row_one_hot = 0
    for target_id, ids, lps in zip(row.target_ids, row.topk_ids, row.topk_logprobs):
      assert 1 <= len(ids) <= TOP_K and len(set(ids)) == len(ids) and len(lps) == len(ids)
      assert list(lps) == sorted(lps, reverse=True)
      if list(ids) == [target_id] and list(lps) == [0.0]:
        row_one_hot += 1
      else:
        kept += 1
        target_in_kept += target_id in ids
    assert row.kept == len(row.target_ids) - row_one_hot
    one_hot += row_one_hot
  total = sum(len(row.target_ids) for row in rows)
  assert 0.08 < one_hot / total < 0.25
  assert 0.85 < target_in_kept / kept < 1.0


def test_top_k_bounds_the_row_widths(outputs):
  records = _records(outputs["top_k3"])
  assert {len(top) for r in records for s in r.samples for top in s.top_logprobs} == {3}
  rows = aligned_data.read_aligned(outputs["top_k3"] / "teacher.aligned.jsonl")
  widths = {len(ids) for row in rows for ids in row.topk_ids}
  assert max(widths) == 3 and min(widths) == 1


def test_output_depends_on_the_seed_only(outputs):
  for name in ("teacher.jsonl", "teacher.aligned.jsonl"):
    ref = (outputs["ref"] / name).read_bytes()
    assert (outputs["workers2"] / name).read_bytes() == ref, name
    assert (outputs["seed1"] / name).read_bytes() != ref, name
  seed0 = _records(outputs["ref"])
  seed1 = _records(outputs["seed1"])
  assert [r.id for r in seed0] == [r.id for r in seed1]
  assert [s.text for r in seed0 for s in r.samples] != [s.text for r in seed1 for s in r.samples]


def test_target_lengths_follow_the_generator(outputs):
  """Targets are drawn from N(130, 40) teacher tokens clipped to [40, 256] (mean ~130)."""
  lengths = []
  for record in _records(outputs["ref"]) + _records(outputs["seed1"]):
    for sample in record.samples:
      target = formats.teacher_cot_target(sample.text)
      start = sample.text.index(target)
      lengths.append(sum(start <= o < start + len(target) for o in sample.offsets))
  assert 100 < statistics.mean(lengths) < 160, statistics.mean(lengths)
  assert 15 < statistics.stdev(lengths) < 60, statistics.stdev(lengths)
  assert max(lengths) <= 280


def test_output_dir_holds_only_the_finished_files(outputs):
  for name in ("ref", "workers2", "seed1", "top_k3"):
    assert sorted(os.listdir(outputs[name])) == ["teacher.aligned.jsonl", "teacher.jsonl"]
