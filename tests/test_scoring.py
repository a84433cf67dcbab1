"""`specialize score`: real GPT-3 GSM8K solutions scored through the registered task, bad files."""
import json

import pytest
import seqio

from specialize_jax.evaluation import scoring
from tests.support import processes
from tests.support import shared_data

GPT3_ACCURACY = shared_data.GSM8K_SOLUTION_IS_CORRECT_PERCENT


@pytest.fixture(scope="module")
def gsm8k_task():
  shared_data.point_tasks_here()
  import specialize_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import
  return seqio.get_mixture_or_task("gsm8k_test_zs_cot")


@pytest.mark.parametrize("model", sorted(GPT3_ACCURACY))
def test_gpt3_solutions_reproduce_labels(gsm8k_task, model):
  path = shared_data.shared_data_dir() / "gsm8k" / "example_model_solutions.jsonl"
  result = scoring.score(gsm8k_task, str(path), prediction_field=f"{model}.solution")
  assert result.n == 1319 and result.unparsable == 0
  assert result.accuracy == pytest.approx(GPT3_ACCURACY[model], abs=0.005)


def test_paper_mode_and_explicit_indices(gsm8k_task, tmp_path):
  path = tmp_path / "p.jsonl"
  # Gold of test[0] is 18, of test[1] is 3. A thousands separator defeats the paper rule only.
  path.write_text(json.dumps({"index": 1, "prediction": "The answer is 3."}) + "\n" +
                  json.dumps({"index": 0, "prediction": "So 1,018 - 1,000 = 18"}) + "\n")
  default = scoring.score(gsm8k_task, str(path))
  assert (default.n, default.accuracy) == (2, 100.0)
  paper = scoring.score(gsm8k_task, str(path), metric_mode="paper")
  assert paper.accuracy == 100.0  # last \d*\.?\d+ is "18" here
  path.write_text(json.dumps({"index": 0, "prediction": "It is 18,000 / 1,000 = 18"}) + "\n")
  assert scoring.score(gsm8k_task, str(path)).accuracy == 100.0


@pytest.mark.parametrize("content,message", [
    ('{"prediction": "1"}\n{"prediction": 1}\n', r"p.jsonl:2: field 'prediction' is int"),
    ('{"prediction": "1"}\nnot json\n', r"p.jsonl:2: not valid JSON"),
    ('{"index": 0, "prediction": "1"}\n{"prediction": "2"}\n', r"p.jsonl:2: lacks an 'index'"),
    ('{"index": 5000, "prediction": "1"}\n', r"p.jsonl:1: index 5000 is not an integer in \[0, 1319\)"),
    ('{"index": 3, "prediction": "1"}\n{"index": 3, "prediction": "1"}\n', r"p.jsonl:2: duplicate"),
    ('{"prediction": "1"}\n', r"1 predictions without 'index' fields, but the task has 1319"),
    ('{"text": "1"}\n', r"p.jsonl:1: no field 'prediction'"),
])
def test_malformed_predictions_name_file_and_line(gsm8k_task, tmp_path, content, message):
  path = tmp_path / "p.jsonl"
  path.write_text(content)
  with pytest.raises(scoring.PredictionsError, match=message):
    scoring.score(gsm8k_task, str(path))


def test_a_missing_predictions_file_fails_before_the_task_is_read(gsm8k_task, tmp_path,
                                                                  monkeypatch):
  monkeypatch.setattr(scoring, "task_targets", lambda *a, **k: pytest.fail("read the task"))
  with pytest.raises(scoring.PredictionsError, match="missing.jsonl does not exist"):
    scoring.score(gsm8k_task, str(tmp_path / "missing.jsonl"))


@pytest.mark.slow
def test_cli_prints_one_json_object(tmp_path):
  data = shared_data.shared_data_dir()
  env = processes.environment(drop=(), SPECIALIZE_DATA_DIR=str(data),
                              SPECIALIZE_VOCAB_PATH=str(data / "tokenizer" / "t5_spiece.model"))
  predictions = tmp_path / "p.jsonl"
  predictions.write_text("".join(json.dumps({"prediction": f"The answer is {i}"}) + "\n"
                                 for i in range(400)))
  args = ["score", "--task", "multiarith_test_zs_cot", "--predictions", str(predictions)]
  done = processes.run_specialize(args, env, check=True)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["task"] == "multiarith_test_zs_cot" and result["n"] == 400
  assert 0 <= result["accuracy"] < 5 and result["unparsable"] == 0
  bad = processes.run_specialize(args[:-1] + [str(tmp_path / "missing.jsonl")], env)
  assert bad.returncode == 2 and "missing.jsonl" in bad.stderr
  # A misspelled task's suggestion: tests/test_cli_errors.py (`score --task gsm8k_test_zz_cot`).
