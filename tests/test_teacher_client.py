"""Teacher sampling end to end against a real local OpenAI-compatible server (`openai_server`).

The official `openai` client talks HTTP to the server; faults are injected by the server. Every
run checks that each question has exactly the requested samples, once.
"""
import json
import math
import os
import pickle
import signal
import subprocess
import time

import pytest

from specialize_jax import cli
from specialize_jax.teacher import teacher_client
from specialize_jax.teacher import teacher_data
from specialize_jax.teacher import teacher_filter
from specialize_jax.teacher import teacher_sources
from specialize_jax.teacher.teacher_data import TeacherRecord
from specialize_jax.teacher.teacher_data import TeacherSample
from tests.support import openai_server
from tests.support import processes
from tests.support import shared_data

API_KEY = "sk-test-DO-NOT-LEAK-5f2c9a"
NUM_SAMPLES = 4
FORMAT_EXAMPLES = "teacher_outputs/fu2023_codex_notebook/processed_data_format_examples.json"


@pytest.fixture(scope="module")
def solutions():
  return openai_server.gold_solutions(shared_data.shared_file("gsm8k/train.jsonl"))


@pytest.fixture
def server(solutions, data_dir, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
  fake = openai_server.FakeOpenAIServer(solutions, API_KEY).start()
  yield fake
  fake.stop()


def _flags(server, output, limit=4, api="completions", top_logprobs=5, extra=()):
  return ["teacher", "--base_url", server.base_url, "--model", "test-teacher", "--api", api,
          "--split", "gsm8k_train", "--num_samples", str(NUM_SAMPLES), "--temperature", "0.5",
          "--top_logprobs", str(top_logprobs), "--output", str(output), "--limit", str(limit),
          "--concurrency", "2", "--timeout_s", "1.5", "--initial_backoff_s", "0.01",
          "--max_backoff_s", "0.05", "--max_attempts", "4", "--progress_period_s", "0.5",
          "--seed", "0", *extra]


def _run(argv, capsys):
  code = cli.main(argv)
  captured = capsys.readouterr()
  return code, json.loads(captured.out.strip().splitlines()[-1]), captured.out + captured.err


def _check_complete(output, expected_ids):
  """Every expected question once, each with exactly NUM_SAMPLES samples; returns the records."""
  records = teacher_data.read_records(output, strict=True).records
  ids = [r.id for r in records]
  assert len(ids) == len(set(ids))
  assert sorted(ids) == sorted(expected_ids)
  assert all(len(r.samples) == NUM_SAMPLES for r in records)
  return records


def _expected_ids(n):
  return [f"gsm8k/train/{i}" for i in range(n)]  # The first train questions are not dev ones.


def _assert_no_key(*texts):
  for text in texts:
    assert API_KEY not in text


# ----------------------------------------------------------------------------- parsing

def test_completions_logprobs_scores_and_filtered_file(server, tmp_path, capsys):
  output = tmp_path / "teacher.jsonl"
  code, summary, console = _run(_flags(server, output, limit=3), capsys)
  assert code == 0
  records = _check_complete(output, _expected_ids(3))
  assert len(server.requests) == 3 and all(r["authorized"] for r in server.requests)
  for record in records:
    assert record.teacher.api == "openai.completions" and record.teacher.params["n"] == NUM_SAMPLES
    kinds = [openai_server.CHOICE_KINDS[i] for i in range(NUM_SAMPLES)]
    assert [s.correct for s in record.samples] == [k == "correct" for k in kinds]
    for sample in record.samples:
      assert "".join(sample.tokens) == sample.text
      assert sample.offsets[0] == 0  # Relative to the text, not OpenAI's prompt-based text_offset.
      assert all(sample.text[o:o + len(t)] == t for o, t in zip(sample.offsets, sample.tokens))
      assert all(len(pos) == 5 and pos[0][0] == tok for pos, tok in
                 zip(sample.top_logprobs, sample.tokens))
      assert sample.logprobs == tuple(pos[0][1] for pos in sample.top_logprobs)
  assert summary["teacher"] == {"questions": 3, "samples": 12, "per_sample_accuracy": 0.5,
                                "majority_vote_accuracy": 1.0}
  assert summary["questions"] == {"requested": 3, "skipped_already_done": 0, "done": 3,
                                  "failed": 0}
  assert summary["usage"]["requests"] == 3 and summary["usage"]["completion_tokens"] > 0
  filtered = teacher_data.read_records(tmp_path / "teacher.filtered.jsonl").records
  assert [len(r.samples) for r in filtered] == [2, 2, 2]
  assert all(s.text.endswith(f"The answer is {r.gold_answer}") for r in filtered
             for s in r.samples)
  assert summary["filter"]["dropped"] == {"empty": 0, "no_answer_line": 3, "no_answer": 0,
                                          "no_gold": 0, "incorrect": 3,
                                          "tokens_text_mismatch": 0}
  _assert_no_key(output.read_text(), console)


def test_chat_logprobs_top20(server, tmp_path, capsys):
  output = tmp_path / "chat.jsonl"
  code, summary, _ = _run(_flags(server, output, limit=2, api="chat", top_logprobs=20), capsys)
  assert code == 0
  records = _check_complete(output, _expected_ids(2))
  assert all(r["path"] == "/v1/chat/completions" for r in server.requests)
  record = next(r for r in records if r.id == "gsm8k/train/0")  # Written in completion order.
  sample = record.samples[0]
  assert record.teacher.api == "openai.chat"
  assert "".join(sample.tokens) == sample.text and sample.text.endswith("The answer is 72")
  assert all(len(pos) == 20 and pos[0][0] == tok
             for pos, tok in zip(sample.top_logprobs, sample.tokens))
  assert sample.offsets[:3] == (0, len(sample.tokens[0]),
                                len(sample.tokens[0]) + len(sample.tokens[1]))
  assert summary["teacher"]["per_sample_accuracy"] == 0.5


def test_samples_split_over_requests(server, tmp_path, capsys):
  output = tmp_path / "t.jsonl"
  code, summary, _ = _run(_flags(server, output, limit=2, extra=("--samples_per_request", "3")),
                          capsys)
  assert code == 0 and summary["usage"]["requests"] == 4  # n=3 then n=1 per question.
  records = _check_complete(output, _expected_ids(2))
  # Choice kinds restart with each request: correct, correct, wrong | correct.
  assert all([s.correct for s in r.samples] == [True, True, False, True] for r in records)


def test_teacher_filter_command(server, tmp_path, capsys):
  output = tmp_path / "t.jsonl"
  assert _run(_flags(server, output, limit=2, extra=("--no-filter",)), capsys)[0] == 0
  assert not (tmp_path / "t.filtered.jsonl").exists()
  code, report, _ = _run(["teacher_filter", "--input", str(output), "--output",
                          str(tmp_path / "f.jsonl")], capsys)
  assert code == 0 and (report["samples_in"], report["samples_kept"]) == (8, 4)
  assert [len(r.samples) for r in teacher_data.read_records(tmp_path / "f.jsonl").records] == [2, 2]


# ----------------------------------------------------------------------------- faults

@pytest.mark.parametrize("fault", openai_server.FAULTS)
def test_recovers_from_fault(server, tmp_path, capsys, fault):
  server.faults = [fault, fault]
  server.retry_after_s = 0.1
  server.slow_s = 2.5  # Past --timeout_s 1.5.
  output = tmp_path / "t.jsonl"
  code, summary, console = _run(_flags(server, output), capsys)
  assert code == 0
  _check_complete(output, _expected_ids(4))
  assert [r["fault"] for r in server.requests].count(fault) == 2
  assert len(server.requests) == 4 + 2
  assert summary["usage"]["retries"] == 2 and summary["questions"]["failed"] == 0
  assert not (tmp_path / "t.failures.jsonl").exists()
  _assert_no_key(output.read_text(), console)


def test_retry_after_is_honoured(server, tmp_path, capsys):
  server.faults = ["429"]
  server.retry_after_s = 1.0
  code, _, _ = _run(_flags(server, tmp_path / "t.jsonl", limit=1), capsys)
  assert code == 0
  first, second = server.requests
  assert first["fault"] == "429" and second["fault"] is None
  assert second["time"] - first["time"] >= 1.0  # Backoff alone would be under 0.05 s.


def test_question_that_always_fails_is_recorded_then_retried(server, tmp_path, capsys, solutions):
  output = tmp_path / "t.jsonl"
  question_1 = next(q for q in solutions if q.startswith("Weng earns"))  # gsm8k/train/1
  server.always_fail = [question_1]
  code, summary, console = _run(_flags(server, output, limit=3), capsys)
  assert code == 1
  assert summary["questions"]["failed"] == 1 and summary["questions"]["done"] == 2
  assert [f["id"] for f in summary["failed"]] == ["gsm8k/train/1"]
  failures_path = tmp_path / "t.failures.jsonl"
  failures = [json.loads(line) for line in failures_path.read_text().splitlines()]
  assert [(f["id"], f["attempts"]) for f in failures] == [("gsm8k/train/1", 4)]
  assert "InternalServerError" in failures[0]["last_error"]
  _check_complete(output, ["gsm8k/train/0", "gsm8k/train/2"])
  _assert_no_key(output.read_text(), failures_path.read_text(), console)
  # Rerun once the server is healthy: only the failed question is requested.
  server.always_fail = []
  server.requests.clear()
  code, summary, _ = _run(_flags(server, output, limit=3), capsys)
  assert code == 0 and summary["questions"]["skipped_already_done"] == 2
  assert [r["question"] for r in server.requests] == [question_1]
  _check_complete(output, _expected_ids(3))
  assert not failures_path.exists()


def test_bad_key_fails_at_once_and_is_not_written(server, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", API_KEY + "-wrong")
  output = tmp_path / "t.jsonl"
  code, summary, console = _run(_flags(server, output, limit=2), capsys)
  assert code == 1 and summary["questions"]["failed"] == 2
  assert len(server.requests) == 2  # 401 is permanent: no retry.
  failures = (tmp_path / "t.failures.jsonl").read_text()
  assert "AuthenticationError" in failures
  _assert_no_key(failures, console, json.dumps(summary))
  assert not output.exists()


@pytest.mark.slow
def test_kill_mid_run_then_resume(server, tmp_path):
  server.delay_s = 0.25
  output = tmp_path / "t.jsonl"
  argv = processes.specialize_argv(*_flags(server, output, limit=6))
  argv[argv.index("--concurrency") + 1] = "1"
  env = processes.environment(drop=(), OPENAI_API_KEY=API_KEY)
  cwd = processes.REPO_ROOT
  proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and (not output.exists() or
                                         output.read_bytes().count(b"\n") < 2):
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  out, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  written = [r.id for r in teacher_data.read_records(output, strict=False).records]
  assert 2 <= len(written) < 6
  with open(output, "ab") as f:  # What a kill in the middle of an append leaves.
    f.write(b'{"schema": "specialize_jax.teacher/1", "id": "gsm8k/train/5", "sam')
  server.delay_s = 0.0
  restart_at = time.monotonic()
  rerun = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
  assert rerun.returncode == 0, rerun.stderr
  summary = json.loads(rerun.stdout.strip().splitlines()[-1])
  assert summary["questions"]["skipped_already_done"] == len(written)
  records = _check_complete(output, _expected_ids(6))
  by_id = {r.id: r.question for r in records}
  asked_again = [r["question"] for r in server.requests if r["time"] >= restart_at]
  assert sorted(asked_again) == sorted(by_id[i] for i in by_id if i not in written)
  _assert_no_key(output.read_text(), out.decode(), err.decode(), rerun.stdout, rerun.stderr)


# ----------------------------------------------------------------------------- dry run

def test_dry_run_estimates_and_sends_nothing(server, tmp_path, capsys, data_dir):
  output = tmp_path / "t.jsonl"
  code, estimate, _ = _run(_flags(server, output, limit=5, extra=(
      "--dry_run", "--price_per_1k_input", "0.5", "--price_per_1k_output", "1.5")), capsys)
  assert code == 0 and server.requests == [] and not output.exists()
  prompt = (data_dir / "prompts/fu2023_lib_prompt/prompt_complex.txt").read_text()
  questions = [json.loads(line)["question"].strip()
               for line in (data_dir / "gsm8k/train.jsonl").read_text().splitlines()[:5]]
  expected_input = sum(math.ceil(len(f"{prompt}\nQuestion: {q}\nLet's think step by step\n") / 4)
                       for q in questions)
  assert estimate["questions"] == 5 and estimate["requests"] == 5
  assert estimate["estimated_input_tokens"] == expected_input
  assert estimate["estimated_output_tokens_max"] == 5 * 256 * NUM_SAMPLES
  assert estimate["estimated_cost_max"] == pytest.approx(
      expected_input / 1000 * 0.5 + 5 * 256 * NUM_SAMPLES / 1000 * 1.5, abs=1e-4)


def test_dev_and_unknown_splits_are_refused(server, tmp_path, capsys):
  argv = _flags(server, tmp_path / "t.jsonl")
  argv[argv.index("--split") + 1] = "gsm8k_dev"
  assert cli.main(argv) == 2
  assert "not a training split" in capsys.readouterr().err
  assert server.requests == []


def test_resume_with_other_settings_is_refused(server, tmp_path, capsys):
  output = tmp_path / "t.jsonl"
  assert _run(_flags(server, output, limit=1), capsys)[0] == 0
  argv = _flags(server, output, limit=2)
  argv[argv.index("--temperature") + 1] = "0.9"
  assert cli.main(argv) == 2
  assert "same flags" in capsys.readouterr().err
  assert len(server.requests) == 1


# ----------------------------------------------------------------------------- units

def test_token_bucket_waits_for_refill():
  bucket = teacher_client.TokenBucket(rate_per_minute=600)  # 10 units per second, starts full.
  start = time.monotonic()
  assert bucket.acquire(600) == 0.0
  assert bucket.acquire(3) > 0.0
  assert time.monotonic() - start >= 0.29  # 3 units at 10/s after draining the bucket.


def test_backoff_respects_retry_after_and_ceiling():
  import random  # pylint: disable=g-import-not-at-top
  run = teacher_client.RunConfig(initial_backoff_s=1.0, max_backoff_s=8.0)
  rng = random.Random(0)
  waits = [teacher_client.backoff_s(a, run, None, rng) for a in range(1, 10) for _ in range(50)]
  assert max(waits) <= 8.0 and min(waits) >= 0.0
  assert all(teacher_client.backoff_s(1, run, 3.0, rng) >= 3.0 for _ in range(50))


def _sample(text, tokens=None):
  fields = {}
  if tokens is not None:
    offsets, at = [], 0
    for t in tokens:
      offsets.append(at)
      at += len(t)
    fields = {"tokens": tuple(tokens), "logprobs": tuple(-0.1 * i for i in range(len(tokens))),
              "top_logprobs": tuple(((t, -0.1 * i),) for i, t in enumerate(tokens)),
              "offsets": tuple(offsets)}
  return TeacherSample(text=text, answer=None, correct=None, **fields)


def test_filter_cuts_per_token_fields_with_the_text():
  tokens = ["\n", "\nTwo", " plus", " two", " is", " 4.", "\n", "The", " answer", " is", " 4",
            "\n\n", "Question", ":", " next"]
  sample = _sample("".join(tokens), tokens)
  kept, reason, trimmed = teacher_filter.filter_sample(sample, 4.0)
  assert reason is None and trimmed == 1  # "\nTwo" loses its newline.
  assert kept.text == "Two plus two is 4.\nThe answer is 4"
  assert kept.tokens == ("Two", " plus", " two", " is", " 4.", "\n", "The", " answer", " is", " 4")
  assert kept.logprobs == sample.logprobs[1:11]
  assert kept.top_logprobs == sample.top_logprobs[1:11]
  assert kept.offsets == (0, 3, 8, 12, 15, 18, 19, 22, 29, 32)
  assert all(kept.text[o:o + len(t)] == t for o, t in zip(kept.offsets, kept.tokens))
  assert kept.answer == 4.0 and kept.correct is True


def test_filter_report_counts_every_reason():
  gold = TeacherRecord(id="x/train/0", source="x", split="train", question="q", gold_answer="4",
                       gold_number=4.0, samples=(
                           _sample("So 4.\nThe answer is 4\nmore"),
                           _sample("   \n"),
                           _sample("Two and two make 4."),
                           _sample("The answer is unknown."),
                           _sample("The answer is 5"),
                           _sample("The answer is 4", ["The answer", " is", " 4?"])))
  no_gold = TeacherRecord(id="x/train/1", source="x", split="train", question="q",
                          gold_answer="four", gold_number=None,
                          samples=(_sample("The answer is 4"),))
  kept, report = teacher_filter.filter_records([gold, no_gold])
  assert [r.id for r in kept] == ["x/train/0"]
  assert [s.text for s in kept[0].samples] == ["So 4.\nThe answer is 4"]
  assert report.to_json()["dropped"] == {"empty": 1, "no_answer_line": 1, "no_answer": 1,
                                         "no_gold": 1, "incorrect": 1, "tokens_text_mismatch": 1}
  assert (report.samples_in, report.samples_kept, report.questions_kept,
          report.questions_without_kept_sample) == (7, 1, 1, 1)


# ----------------------------------------------------------------------------- the paper's pickles

def _format_example_rows(extra_rows=()):
  examples = json.loads(shared_data.shared_file(FORMAT_EXAMPLES).read_text())
  icl = examples["in_context_chain_of_thought_example"]
  icl_row = {k: icl[k] for k in ("question", "answer", "answer_gold", "answer_label", "type")}
  # The notebook printed this record's per_step_probs separately (same chain: train[0] sample 0).
  icl_row["per_step_probs"] = examples["dtw_transformed_per_step_probs_train0_sample0"][
      "per_step_probs"]
  return [icl_row, dict(examples["zero_shot_chain_of_thought_example"]["record"]), *extra_rows]


def test_pickle_import_converts_the_real_format(tmp_path, data_dir):
  path = tmp_path / "processed.pkl"
  rows = _format_example_rows()
  with open(path, "wb") as f:
    pickle.dump(rows, f)
  train = [json.loads(line) for line in (data_dir / "gsm8k/train.jsonl").read_text().splitlines()]
  ids = {row["question"].strip(): f"gsm8k/train/{i}" for i, row in enumerate(train)}
  records = teacher_sources.records_from_fu2023_pickle(path, ids)
  assert [r.id for r in records] == ["gsm8k/train/0", "gsm8k/train/7472"]
  assert [r.gold_number for r in records] == [72.0, 50.0]
  assert records[0].question == train[0]["question"].strip()
  icl_sample, zs_sample = records[0].samples[0], records[1].samples[0]
  assert icl_sample.text == rows[0]["answer"] and icl_sample.correct is True
  assert icl_sample.meta["type"] == "in_context_chain_of_thought"
  assert len(icl_sample.meta["per_step_probs"]) == 40
  assert icl_sample.meta["per_step_probs"][1][0] == ["▁Nat", 0.6018]
  assert zs_sample.answer == 50.0 and len(zs_sample.meta["per_step_probs"]) == 143
  out = tmp_path / "imported.jsonl"
  assert teacher_data.write_records(out, records) == 2
  assert teacher_data.read_records(out).records == tuple(records)
  unnamed = teacher_sources.records_from_fu2023_pickle(path)
  assert [r.id for r in unnamed] == ["fu2023-pkl/train/0", "fu2023-pkl/train/1"]


def test_pickle_import_cli_drops_dev_questions(tmp_path, data_dir, capsys):
  row_4041 = json.loads((data_dir / "gsm8k/train.jsonl").read_text().splitlines()[4041])
  rationale, final = row_4041["answer"].rsplit("####", 1)
  dev_row = {"question": f"Q: {row_4041['question']}\nLet's think step by step",
             "answer": f"{rationale.strip()}\nThe answer is {final.strip()}",
             "answer_gold": "Answer: " + row_4041["answer"], "answer_label": 1,
             "type": "zero_shot_chain_of_thought", "per_step_probs": None}
  path = tmp_path / "processed.pkl"
  with open(path, "wb") as f:
    pickle.dump(_format_example_rows([dev_row]), f)
  out = tmp_path / "imported.jsonl"
  code, summary, _ = _run(["teacher_import", "--from", "fu2023_pickle", str(path), "--output",
                           str(out)], capsys)
  assert code == 0
  assert (summary["records"], summary["excluded_dev_questions"]) == (2, 1)  # train[4041] is dev.
  assert [r.id for r in teacher_data.read_records(out).records] == ["gsm8k/train/0",
                                                                   "gsm8k/train/7472"]


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_unexecuted(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump([{"question": "Q: x", "answer": _Exploit(marker)}], f)
  with pytest.raises(teacher_sources.UnsafePickleError) as error:
    teacher_sources.records_from_fu2023_pickle(path)
  assert f"{os.system.__module__}.system" in str(error.value) and str(path) in str(error.value)
  assert not marker.exists()
  import collections  # pylint: disable=g-import-not-at-top
  with open(path, "wb") as f:
    pickle.dump([collections.OrderedDict(question="Q: x")], f)
  with pytest.raises(teacher_sources.UnsafePickleError, match="collections.OrderedDict"):
    teacher_sources.records_from_fu2023_pickle(path)
