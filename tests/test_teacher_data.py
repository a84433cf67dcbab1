"""Tests for the teacher-data schema: round trip, validator messages, crash safety, builders."""
import json
import math
import os

import pytest

from specialize_jax.teacher import teacher_data as td
from specialize_jax.teacher import teacher_sources
from tests.support import shared_data

PALM_DIR = "teacher_outputs/distilling_step_by_step_palm_svamp"
CODEX_DIR = "teacher_outputs/fu2023_codex_notebook"


def _full_record(record_id: str = "gsm8k/train/0") -> td.TeacherRecord:
  """A record using every optional field."""
  text = "She sold 48/2 = 24.\nThe answer is 72"
  tokens = ("She", " sold", " 48/2 = 24.", "\n", "The answer is", " 72")
  offsets, at = [], 0
  for token in tokens:
    offsets.append(at)
    at += len(token)
  return td.TeacherRecord(
      id=record_id, source="gsm8k", split="train", question="Natalia sold clips?",
      gold_answer="72", gold_number=72.0,
      teacher=td.TeacherInfo(name="code-davinci-002", api="openai.completions",
                             params={"temperature": 0.5, "logprobs": 5}),
      meta={"note": "unit test"},
      samples=(
          td.TeacherSample(
              text=text, answer=72.0, correct=True, tokens=tokens,
              logprobs=(-0.1, -0.2, -0.3, 0.0, -0.5, -1e-3),
              top_logprobs=tuple(((tok, -0.1), ("alt", -2.5)) for tok in tokens),
              offsets=tuple(offsets), finish_reason="stop", meta={"sample_index": 3}),
          td.TeacherSample(text="The answer is 5", answer=5.0, correct=False),
          td.TeacherSample(text="no number", answer=None, correct=False),
      ))


def _line(obj) -> str:
  return json.dumps(obj) + "\n"


def test_round_trip(tmp_path):
  record = _full_record()
  assert td.TeacherRecord.from_json(record.to_json()) == record
  assert td.TeacherRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
  path = tmp_path / "teacher.jsonl"
  records = [record, _full_record("gsm8k/train/1")]
  assert td.write_records(path, records) == 2
  assert td.validate_file(path) == []
  result = td.read_records(path)
  assert result.records == tuple(records)
  assert (result.skipped_lines, result.truncated_last_line, result.problems) == (0, False, ())
  first = json.loads(path.read_text().splitlines()[0])
  assert first["schema"] == "specialize_jax.teacher/1"
  assert "tokens" not in first["samples"][1]  # Optional fields are omitted, not null.


def _bad_file(tmp_path):
  good = _full_record("q/0").to_json()

  def variant(record_id, edit):
    obj = json.loads(json.dumps(good))
    obj["id"] = record_id
    edit(obj)
    return _line(obj)

  def missing_and_extra(obj):
    obj["questoin"] = obj.pop("question")

  def wrong_types(obj):
    obj["gold_number"] = "72"
    obj["samples"][1]["answer"] = "five"
    obj["samples"][2]["correct"] = "no"

  def lengths(obj):
    sample = obj["samples"][0]
    sample["logprobs"] = sample["logprobs"][:-1]
    sample["top_logprobs"] = sample["top_logprobs"] + [[["x", -1.0]]]
    sample["offsets"] = sample["offsets"][:2]

  def tokens_differ(obj):
    obj["samples"][0]["tokens"][0] = "He"

  def bad_per_token_values(obj):
    sample = obj["samples"][0]
    sample["logprobs"][1] = 0.5  # Not a log-probability.
    sample["top_logprobs"][0] = [["t", -1.0]] * 21  # Over the 20-per-position cap.
    obj["samples"][1]["logprobs"] = [-1.0]  # Per-token data without tokens.

  def correct_disagrees(obj):
    obj["samples"][1]["correct"] = True  # Answer 5 vs gold 72.

  lines = [
      _line(good),                                                       # 1 ok
      '{"schema": "specialize_jax.teacher/1", "id": \n',                 # 2 bad JSON
      variant("q/3", missing_and_extra),                                 # 3
      variant("q/4", wrong_types),                                       # 4
      variant("q/5", lengths),                                           # 5
      variant("q/6", tokens_differ),                                     # 6 warning only
      _line(good),                                                       # 7 duplicate of line 1
      variant("q/8", lambda o: o.update(schema="specialize_jax.teacher/2")),  # 8
      variant("q/9", bad_per_token_values),                              # 9
      variant("q/10", correct_disagrees),                                # 10 warning only
      "\n",                                                              # 11 blank
      _line([1, 2]),                                                     # 12 not an object
  ]
  path = tmp_path / "bad.jsonl"
  path.write_text("".join(lines))
  return path


def test_validator_reports_every_problem_with_line_and_field(tmp_path):
  path = _bad_file(tmp_path)
  problems = td.validate_file(path)
  found = {(p.line, p.field, p.kind, p.severity) for p in problems}
  E, W = td.ERROR, td.WARNING
  assert found == {
      (2, "", "bad_json", E),
      (3, "question", "missing_field", E),
      (3, "questoin", "unknown_field", E),
      (4, "gold_number", "type", E),
      (4, "samples[1].answer", "type", E),
      (4, "samples[2].correct", "type", E),
      (5, "samples[0].logprobs", "length_mismatch", E),
      (5, "samples[0].top_logprobs", "length_mismatch", E),
      (5, "samples[0].offsets", "length_mismatch", E),
      (6, "samples[0].tokens", "tokens_text_mismatch", W),
      (6, "samples[0].offsets[0]", "tokens_text_mismatch", W),
      (7, "id", "duplicate_id", E),
      (8, "schema", "schema_version", E),
      (9, "samples[0].logprobs[1]", "type", E),
      (9, "samples[0].top_logprobs[0]", "type", E),
      (9, "samples[1].tokens", "missing_field", E),
      (10, "samples[1].correct", "answer_mismatch", W),
      (11, "", "blank_line", W),
      (12, "", "type", E),
  }
  assert len(problems) == len(found)
  by_key = {(p.line, p.field): p for p in problems}
  assert "did you mean 'question'" in by_key[(3, "questoin")].message
  assert "has 5 entries but samples[0].tokens has 6" in by_key[(5, "samples[0].logprobs")].message
  assert "first on line 1" in by_key[(7, "id")].message
  assert "specialize_jax.teacher/2" in by_key[(8, "schema")].message
  assert "supports only 'specialize_jax.teacher/1'" in by_key[(8, "schema")].message
  assert "first difference at char 0" in by_key[(6, "samples[0].tokens")].message
  assert str(by_key[(4, "gold_number")]).startswith(f"{path}:4: gold_number: error:")


def test_read_records_strict_raises_with_all_errors_and_lenient_skips(tmp_path):
  path = _bad_file(tmp_path)
  with pytest.raises(td.TeacherDataError) as info:
    td.read_records(path)
  message = str(info.value)
  assert "15 schema errors on 8 of 12 lines" in message
  assert "length_mismatch: 3" in message and "duplicate_id: 1" in message
  assert f"{path}:5: samples[0].logprobs: error:" in message
  assert f"{path}:2: <line>: error: not valid JSON" in message
  assert len(info.value.problems) == 15
  result = td.read_records(path, strict=False)
  assert [r.id for r in result.records] == ["q/0", "q/6", "q/10"]  # Warnings keep the line.
  assert result.skipped_lines == 9  # 8 lines with errors + 1 blank line.
  assert sum(p.severity == td.ERROR for p in result.problems) == 15


def test_error_report_is_capped_with_counts(tmp_path):
  path = tmp_path / "many.jsonl"
  path.write_text("not json\n" * 30)
  with pytest.raises(td.TeacherDataError) as info:
    td.read_records(path)
  message = str(info.value)
  assert "30 schema errors on 30 of 30 lines (bad_json: 30)" in message
  assert message.count("not valid JSON") == td.MAX_REPORTED_PROBLEMS
  assert "... and 10 more" in message


def test_from_json_names_the_field():
  obj = _full_record().to_json()
  obj["samples"][0]["offsets"] = obj["samples"][0]["offsets"][:-1]
  with pytest.raises(td.TeacherDataError,
                     match=r"record 'gsm8k/train/0': samples\[0\]\.offsets: error: has 5 entries"):
    td.TeacherRecord.from_json(obj)


def _failing_iterator(records, fail_after):
  for i, record in enumerate(records):
    if i == fail_after:
      raise RuntimeError("teacher API went away")
    yield record


def test_write_records_is_atomic(tmp_path):
  path = tmp_path / "out.jsonl"
  records = [_full_record(f"q/{i}") for i in range(5)]
  # Absent target stays absent.
  with pytest.raises(RuntimeError, match="went away"):
    td.write_records(path, _failing_iterator(records, 3))
  assert not path.exists()
  assert os.listdir(tmp_path) == []
  # Existing target keeps its exact bytes, whatever fails mid-way.
  td.write_records(path, records[:2])
  before = path.read_bytes()
  with pytest.raises(RuntimeError, match="went away"):
    td.write_records(path, _failing_iterator(records, 3))
  bad = records[:3] + [td.TeacherRecord(**{**records[3].__dict__, "gold_number": math.nan})]
  with pytest.raises(td.TeacherDataError,
                     match=r"record 4, id 'q/3'\): gold_number: error: expected a finite"):
    td.write_records(path, bad)
  with pytest.raises(td.TeacherDataError, match="duplicate id, already record 1"):
    td.write_records(path, [records[0], records[1], records[0]])
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["out.jsonl"]


def test_truncated_last_line_is_tolerated_and_repaired_by_append(tmp_path):
  path = tmp_path / "resumable.jsonl"
  for i in range(3):
    td.append_record(path, _full_record(f"q/{i}"))
  full_line = _line(_full_record("q/3").to_json())
  with open(path, "a") as f:
    f.write(full_line[:len(full_line) // 2])  # A crash mid-append.
  problems = td.validate_file(path)
  assert [(p.line, p.kind, p.severity) for p in problems] == [
      (4, "truncated_last_line", td.WARNING)]
  result = td.read_records(path)  # Strict, yet not an error.
  assert [r.id for r in result.records] == ["q/0", "q/1", "q/2"]
  assert result.truncated_last_line and result.skipped_lines == 1
  td.append_record(path, _full_record("q/3"))  # Drops the partial line, then appends.
  assert td.validate_file(path) == []
  assert [r.id for r in td.read_records(path).records] == ["q/0", "q/1", "q/2", "q/3"]
  # A complete last record without its newline is kept, not dropped.
  path.write_bytes(path.read_bytes().rstrip(b"\n"))
  td.append_record(path, _full_record("q/4"))
  assert [r.id for r in td.read_records(path).records][-2:] == ["q/3", "q/4"]


def test_corruption_before_the_last_line_is_an_error(tmp_path):
  path = tmp_path / "corrupt.jsonl"
  td.write_records(path, [_full_record(f"q/{i}") for i in range(3)])
  lines = path.read_text().splitlines(keepends=True)
  lines[1] = lines[1][:40] + "\n"
  path.write_text("".join(lines))
  with pytest.raises(td.TeacherDataError, match=r"corrupt\.jsonl:2: <line>: error: not valid"):
    td.read_records(path)
  # A bad last line that does end in a newline was fully written: corruption, not a crash.
  path.write_text(lines[0] + lines[2][:40] + "\n")
  assert [(p.line, p.kind) for p in td.validate_file(path)] == [(2, "bad_json")]


def test_missing_file_is_actionable(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    td.read_records(tmp_path / "nope.jsonl")


def test_safe_arithmetic_never_executes():
  evaluate = teacher_sources._evaluate_arithmetic  # pylint: disable=protected-access
  assert evaluate("( 84.0 / 2.0 )") == 42.0
  assert evaluate("((28 - 13) + -(2))") == 13.0
  for text in ("__import__('os').system('true')", "2 ** 10", "(2 * x)", "1 / 0", "(9 + 6",
               "(175, 5)", "11,210 / 84", "(1) and (2)", "(" * 500 + "1" + ")" * 500):
    assert evaluate(text) is None, text


def test_summarize_counts_and_majority_vote():
  def sample(answer):
    return td.TeacherSample(text="", answer=answer, correct=answer == 7.0)
  records = [
      td.TeacherRecord(id="a", source="s", split="t", question="", gold_answer="7",
                       gold_number=7.0, samples=(sample(7.0), sample(3.0), sample(7.0))),
      td.TeacherRecord(id="b", source="s", split="t", question="", gold_answer="7",
                       gold_number=7.0, samples=(sample(7.0), sample(3.0), sample(3.0))),
      td.TeacherRecord(id="c", source="s", split="t", question="", gold_answer="7",
                       gold_number=7.0, samples=(sample(None),)),
  ]
  summary = td.summarize(records)
  assert summary["questions"] == 3 and summary["samples"] == 7
  assert summary["correct_samples"] == 3
  assert summary["per_sample_accuracy"] == pytest.approx(3 / 7)
  assert summary["majority_vote_accuracy"] == pytest.approx(1 / 3)
  assert summary["questions_with_a_correct_sample"] == 2
  assert summary["samples_with_per_token_data"] == 0


# ----------------------------------------------------------------------------- real shared data

@pytest.fixture(scope="module")
def gsm8k_gold_records():
  return teacher_sources.records_from_gsm8k_gold(shared_data.shared_file("gsm8k/train.jsonl"))


def test_gsm8k_gold_builder(gsm8k_gold_records, tmp_path):
  records = gsm8k_gold_records
  assert len(records) == 7473
  assert all(len(r.samples) == 1 for r in records)
  texts = [r.samples[0].text for r in records]
  assert all(t.endswith(f"\nThe answer is {r.gold_answer}") for t, r in zip(texts, records))
  assert not any("<<" in t or ">>" in t or "####" in t for t in texts)
  assert all(r.samples[0].correct for r in records)
  assert records[0].id == "gsm8k/train/0" and records[0].gold_number == 72.0
  assert texts[0] == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                      "altogether in April and May.\nThe answer is 72")
  with_commas = [r for r in records if "," in r.gold_answer]
  assert len(with_commas) == 79 and all(r.samples[0].correct for r in with_commas)
  path = tmp_path / "gold.jsonl"
  td.write_records(path, records[:500])
  assert td.validate_file(path) == []


def test_palm_svamp_builder_reproduces_reported_accuracy():
  records = teacher_sources.records_from_palm_svamp(shared_data.shared_file(PALM_DIR))
  by_split = {split: [r for r in records if r.split == split] for split in ("train", "test")}
  assert [len(by_split["train"]), len(by_split["test"])] == [800, 200]
  train, test = td.summarize(by_split["train"]), td.summarize(by_split["test"])
  # SOURCES.md §4d: 74.4 % train, 77.5 % test (595/800 = 74.375 %, 155/200).
  assert (train["correct_samples"], test["correct_samples"]) == (595, 155)
  assert round(100 * train["per_sample_accuracy"], 1) == 74.4
  assert round(100 * test["per_sample_accuracy"], 1) == 77.5
  first = by_split["train"][0]
  assert first.id == "svamp-dsbs/train/0" and first.gold_number == 42.0
  assert first.samples[0].text.endswith("The answer is (84 / 2).")
  assert first.samples[0].answer == 42.0 and first.samples[0].correct
  assert not any("\n\nQ:" in r.samples[0].text for r in records)


def test_codex_builder_keeps_per_token_data(tmp_path):
  records = teacher_sources.records_from_fu2023_codex(
      shared_data.shared_file(f"{CODEX_DIR}/codex_gsm8k_train0_50samples_top5.json"))
  assert [r.id for r in records] == ["gsm8k/train/0"]
  record = records[0]
  assert record.gold_number == 72.0 and len(record.samples) == 50
  for sample in record.samples:
    assert sample.answer == 72.0 and sample.correct
    assert "".join(sample.tokens) == sample.text
    assert sample.tokens[:2] == (" step", "\n")  # Trigger tail, dropped later by alignment.
    assert len(sample.logprobs) == len(sample.top_logprobs) == len(sample.offsets)
    assert all(len(position) == 5 for position in sample.top_logprobs)
  first = record.samples[0]
  assert first.logprobs[0] == 0.0 and first.logprobs[1] == pytest.approx(math.log(0.9862))
  assert first.top_logprobs[0][0] == ("!", td.ROUNDED_ZERO_LOGPROB)
  summary = td.summarize(records)
  assert summary["samples_with_per_token_data"] == 50
  assert summary["per_sample_accuracy"] == 1.0
  path = tmp_path / "codex.jsonl"
  extra = teacher_sources.records_from_fu2023_codex(
      shared_data.shared_file(f"{CODEX_DIR}/codex_gsm8k_train_extra_samples_top5.json"))
  assert [(r.id, len(r.samples)) for r in extra] == [("gsm8k/train/1", 1), ("gsm8k/train/32", 1)]
  td.write_records(path, records + extra)
  assert td.validate_file(path) == []
  assert td.read_records(path).records == tuple(records + extra)
