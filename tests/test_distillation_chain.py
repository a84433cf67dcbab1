"""The whole distillation chain from the command line, on CPU: sample a teacher over HTTP, filter,
align, prepare the training set, train a tiny student with the `distribution` loss on the top-k
task, evaluate."""
import json

import pytest

from specialize_jax import cli
from specialize_jax.data import metrics
from specialize_jax.align import aligned_data
from specialize_jax.teacher import teacher_data
from specialize_jax.training import metric_writers
from tests.support import openai_server
from tests.support import shared_data

pytestmark = pytest.mark.slow

API_KEY = "sk-chain-test"
QUESTIONS = 6
NUM_SAMPLES = 4  # the test server answers 2 correct, 1 wrong, 1 without an answer line


@pytest.fixture
def teacher_server(data_dir, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
  solutions = openai_server.gold_solutions(shared_data.shared_file("gsm8k/train.jsonl"))
  server = openai_server.FakeOpenAIServer(solutions, API_KEY).start()
  yield server
  server.stop()


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _records(model_dir, split):
  return [r for r in metric_writers.read_metrics(str(model_dir)) if r["split"] == split]


def test_sample_filter_align_train_eval(teacher_server, tmp_path, capsys, monkeypatch):
  teacher = tmp_path / "teacher.jsonl"
  assert cli.main([
      "teacher", "--base_url", teacher_server.base_url, "--model", "test-teacher",
      "--api", "completions", "--split", "gsm8k_train", "--num_samples", str(NUM_SAMPLES),
      "--temperature", "0.5", "--top_logprobs", "5", "--output", str(teacher),
      "--limit", str(QUESTIONS), "--concurrency", "1", "--timeout_s", "5"]) == 0  # fixed order
  summary = _last_json(capsys)
  assert summary["questions"]["done"] == QUESTIONS and summary["questions"]["failed"] == 0
  assert summary["teacher"]["per_sample_accuracy"] == pytest.approx(0.5)
  filtered = tmp_path / summary["filter"]["output"]
  records = teacher_data.read_records(filtered).records
  assert len(records) == QUESTIONS and all(len(r.samples) == 2 for r in records)
  assert all(s.correct and s.text.rstrip().endswith(f"The answer is {r.gold_answer}")
             for r in records for s in r.samples)

  aligned = tmp_path / "aligned.jsonl"
  vocab = shared_data.shared_file("tokenizer/t5_spiece.model")
  assert cli.main(["align", "--input", str(filtered), "--output", str(aligned),
                   "--vocab", str(vocab)]) == 0
  align_summary = _last_json(capsys)
  rows = aligned_data.read_aligned(aligned)
  assert len(rows) == 2 * QUESTIONS == align_summary["samples"]
  assert align_summary["share_kept"] > 0.5

  prepared = tmp_path / "prepared"
  assert cli.main(["prepare", "--teacher", str(filtered), "--aligned", str(aligned),
                   "--output", str(prepared), "--vocab", str(vocab), "--formats", "zs_ao,zs_cot",
                   "--num_chunks", "2"]) == 0
  prepare_summary = _last_json(capsys)
  assert prepare_summary["formats"]["zs_cot"]["num_examples"] == 2 * QUESTIONS
  assert prepare_summary["formats"]["zs_cot"]["with_teacher"] == 2 * QUESTIONS
  monkeypatch.setenv("SPECIALIZE_PREPARED_DATA", str(prepared))
  model_dir = tmp_path / "run"
  overrides = {
      "MODEL_DIR": f"'{model_dir}'", "MIXTURE_OR_TASK_NAME": "'gsm8k_distill_top6_zs_cot'",
      "TEACHER_K": 6, "models.EncoderDecoderModel.loss_type": "'distribution'",
      "TASK_FEATURE_LENGTHS": "{'inputs': 256, 'targets': 256}", "USE_PACKING": True,
      "TRAIN_STEPS": 4, "BATCH_SIZE": 8, "LOG_PERIOD": 2, "CHECKPOINT_PERIOD": 4,
      "LEARNING_RATE": 3e-3, "DROPOUT_RATE": 0.0, "EVAL_PERIOD": 4,
      "EVAL_TASKS": "('gsm8k_dev_zs_cot',)", "EVAL_MAX_EXAMPLES": 8, "EVAL_BATCH_SIZE": 8,
      "EVAL_FEATURE_LENGTHS": "{'inputs': 256, 'targets': 16}", "EVAL_MAX_DECODE_LENGTH": 16}
  argv = ["train", "--gin_file=runs/specialize.gin", "--gin_file=models/tiny.gin"] + [
      f"--gin.{name}={value}" for name, value in overrides.items()]
  assert cli.main(argv) == 0
  train = _records(model_dir, "train")
  assert [r["step"] for r in train] == [2, 4]
  for record in train:
    # ce_weight 0: the loss is the KL (plus z-loss); cross-entropy is reported beside it.
    assert record["loss"] == pytest.approx(record["kl"] + record["z_loss"], rel=1e-4)
    assert record["kl"] < record["cross_ent_loss"]
    # The test server's top-5 holds less than all of the mass: real teacher rows reached the loss.
    assert 0.5 < record["teacher_mass"] < 0.999
    assert record["grad_norm"] > 0.0
  assert (model_dir / "checkpoint_4").is_dir()
  evals = _records(model_dir, "eval")
  assert [r["step"] for r in evals] == [4]
  with open(model_dir / "eval" / "gsm8k_dev_zs_cot" / "predictions_step4.jsonl",
            encoding="utf-8") as f:
    predictions = [json.loads(line) for line in f]
  assert [p["index"] for p in predictions] == list(range(8))
  # The logged accuracy is the task metric of the predictions written beside it.
  rescored = metrics.math_accuracy([p["target"] for p in predictions],
                                   [p["prediction"] for p in predictions])
  assert evals[0]["gsm8k_dev_zs_cot/accuracy"] == rescored["accuracy"]
  assert evals[0]["gsm8k_dev_zs_cot/accuracy"] == 100.0 * sum(p["correct"] for p in predictions) / 8
