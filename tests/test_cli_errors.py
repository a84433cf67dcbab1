"""A user's mistake ends in one line on stderr naming the path or value and the fix, exit code 2,
before anything compiles: every `specialize` subcommand on an empty data directory (a fresh
machine), with the vocabulary missing or present, and a gin value the code validates. Each case is
one process of its own, forked from a server that has imported the libraries
(`tests/support/forked_commands.py`: a case then costs its command's work, not 7 s of imports); all
fail before any model is built. A bug inside a command (an exception outside the user-error family)
ends in a traceback and exit code 1 (a `python -c` subprocess patching the library)."""
import os
import subprocess
import sys

import pytest

from tests.support import demo_data
from tests.support import forked_commands
from tests.support import processes
from tests.support import shared_data

EMPTY_VOCAB = "missing"  # SPECIALIZE_VOCAB_PATH names a file that does not exist.
SHARED_VOCAB = "shared"  # SPECIALIZE_VOCAB_PATH is the real T5 vocabulary; the data is missing.
DOWNLOAD = "Fetch it with `specialize download`"

# (argv, vocabulary, what the one line must contain)
CASES = [
    # The README's "each student also trains alone" command before `specialize demo --only_data`.
    (["train", "--gin_file=experiments/demo_cpu.gin", '--gin.MODEL_DIR="runs/x"'], None,
     ["demo/spm.model", "`specialize demo --only_data`"]),
    (["train", "--gin_file=experiments/flan_t5_small_gsm8k.gin", '--gin.MODEL_DIR="runs/x"'],
     EMPTY_VOCAB,
     ["missing.model", "$SPECIALIZE_VOCAB_PATH", "specialize download --only tokenizer"]),
    (["train", "--gin_file=experiments/flan_t5_small_gsm8k.gin", '--gin.MODEL_DIR="runs/x"'],
     SHARED_VOCAB, ["gsm8k/train.jsonl", DOWNLOAD]),
    (["train", "--gin_file=experiments/demo_cpu.gin", '--gin.MODEL_DIR="runs/x"',
      "--gin.EVAL_TASKS=('demo_id_cot', 'gsm8k_tset_zs_cot')"], SHARED_VOCAB,
     ["'gsm8k_tset_zs_cot'", "EVAL_TASKS", "gsm8k_test_zs_cot"]),
    (["train", "--gin_file=experiments/demo_cpu.gin"], None, ["MODEL_DIR"]),
    (["eval", "--gin_file=runs/eval.gin", '--gin.CHECKPOINT_PATH="ckpt"',
      "--gin.EVAL_TASKS=('gsm8k_test_zs_cot',)"], SHARED_VOCAB, ["gsm8k/test.jsonl", DOWNLOAD]),
    (["eval", "--gin_file=runs/eval.gin", '--gin.CHECKPOINT_PATH="ckpt"',
      "--gin.EVAL_TASKS=('gsm8k_tfds_test_zs_cot',)"], SHARED_VOCAB,
     ["gsm8k:1.0.0", "specialize prepare_tfds", "TFDS_DATA_DIR"]),
    (["infer", "--gin_file=runs/infer.gin", '--gin.CHECKPOINT_PATH="ckpt"',
      '--gin.INFER_INPUTS="bbh_snarks_cot"', '--gin.INFER_OUTPUT="out.jsonl"'], SHARED_VOCAB,
     ["bbh/bbh/snarks.json", DOWNLOAD]),
    (["infer", "--gin_file=runs/infer.gin", '--gin.CHECKPOINT_PATH="ckpt"',
      '--gin.INFER_INPUTS="inputs.txt"', '--gin.INFER_OUTPUT="out.jsonl"',
      '--gin.VOCABULARY_PATH="spm.model"'], None, ["VOCABULARY_PATH=spm.model"]),
    (["infer", "--gin_file=runs/infer.gin", '--gin.CHECKPOINT_PATH="ckpt"',
      '--gin.INFER_INPUTS="inputs.txt"', '--gin.INFER_OUTPUT="out.jsonl"'], SHARED_VOCAB,
     ["Checkpoint path", "ckpt does not exist", "CHECKPOINT_PATH"]),
    (["sweep", "run"], SHARED_VOCAB, ["gsm8k/train.jsonl", DOWNLOAD]),
    (["score", "--task", "gsm8k_test_zs_cot", "--predictions", "preds.jsonl"], None,
     ["gsm8k/test.jsonl", DOWNLOAD]),
    (["score", "--task", "demo_id_cot", "--predictions", "preds.jsonl"], None,
     ["demo/test_id.jsonl", "`specialize demo --only_data`"]),
    (["score", "--task", "gsm8k_test_zz_cot", "--predictions", "preds.jsonl"], None,
     ["'gsm8k_test_zz_cot'", "gsm8k_test_zs_cot"]),
    (["prepare_tfds", "--tfds_data_dir", "tfds"], None, ["gsm8k/train.jsonl", DOWNLOAD]),
    (["teacher", "--model", "m", "--output", "t.jsonl", "--dry_run"], None,
     ["prompt_complex.txt", DOWNLOAD]),
    (["teacher_import", "--from", "fu2023_pickle", "x.pkl", "--output", "t.jsonl"], None,
     ["gsm8k/train.jsonl", DOWNLOAD]),
    (["teacher_filter", "--input", "t.jsonl", "--output", "f.jsonl"], None, ["t.jsonl"]),
    (["align", "--input", "t.jsonl", "--output", "a.jsonl", "--vocab", "spm.model"], None,
     ["t.jsonl"]),
    (["convert", "ckpt", "--to", "hf", "out"], None, ["ckpt does not exist"]),
    (["compare", "run", "--output", "out"], None, ["run", "`specialize sweep"]),
    (["demo", "--steps=2"], None, ["unrecognized arguments", "--steps=2"]),
]


def _environment(**values):
  return processes.environment(
      drop=("SPECIALIZE_VOCAB_PATH", "SPECIALIZE_PREPARED_DATA"), JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3", GLIBC_TUNABLES="", **values)  # No re-exec for the malloc settings.


@pytest.fixture(scope="module")
def server():
  serving = forked_commands.Server(_environment())
  yield serving
  serving.close()


def _run(argv, cwd, data_dir, vocabulary=None, timeout=300, program=None, server=None):
  env = _environment(SPECIALIZE_DATA_DIR=str(data_dir))
  if vocabulary == EMPTY_VOCAB:
    env["SPECIALIZE_VOCAB_PATH"] = str(cwd / "missing.model")
  elif vocabulary == SHARED_VOCAB:
    env["SPECIALIZE_VOCAB_PATH"] = str(shared_data.shared_file("tokenizer/t5_spiece.model"))
  if program is not None:  # A script standing in for the command (see _PATCHED_ALIGN).
    return subprocess.run([sys.executable, "-c", program, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
  if server is not None:
    return server.run(argv, env, cwd, timeout)
  return processes.run_specialize(argv, env, cwd, timeout)


def _error_lines(done, command):
  return [line for line in done.stderr.splitlines() if line.startswith(f"specialize {command}: ")]


@pytest.mark.slow
@pytest.mark.parametrize("argv, vocabulary, expected", CASES,
                         ids=[" ".join(c[0])[:70] + f" [{c[1]}]" for c in CASES])
def test_user_errors_are_one_line_and_exit_2(server, tmp_path, argv, vocabulary, expected):
  (tmp_path / "data").mkdir()
  (tmp_path / "preds.jsonl").write_text('{"prediction": "The answer is 3."}\n')
  (tmp_path / "inputs.txt").write_text("Q: 1 + 1?\n")
  done = _run(argv, tmp_path, tmp_path / "data", vocabulary, server=server)
  assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
  assert done.returncode == 2, done.stderr[-3000:]
  lines = _error_lines(done, argv[0])
  assert len(lines) == 1, done.stderr[-3000:]
  for part in expected:
    assert part in lines[0], lines[0]
  assert not (tmp_path / "runs").exists()  # Failed before writing the run directory.


# `specialize align` with the library's `align_file` replaced by `failure`, as a user runs it.
_PATCHED_ALIGN = """
import sys
import numpy as np
from specialize_jax import cli
from specialize_jax.align import alignment
from specialize_jax.errors import ConfigError
def failing_align_file(*args, **kwargs):
  {failure}
alignment.align_file = failing_align_file
sys.exit(cli.main(sys.argv[1:]))
"""
_ALIGN_ARGV = ["align", "--input", "t.jsonl", "--output", "a.jsonl", "--vocab", "spm.model"]


def test_a_bug_inside_a_command_is_a_traceback_and_exit_1(tmp_path):
  """A `ValueError` from library work (here numpy's, from arrays of mismatched shapes) is a bug,
  not the user's mistake: it is never turned into the one-line message."""
  failure = "return np.zeros((3,)) + np.zeros((4,))"
  done = _run(_ALIGN_ARGV, tmp_path, tmp_path,
              program=_PATCHED_ALIGN.format(failure=failure))
  assert done.returncode == 1, done.stderr[-3000:]
  assert "Traceback" in done.stderr, done.stderr[-3000:]
  assert "ValueError: operands could not be broadcast together" in done.stderr, done.stderr[-3000:]
  assert not _error_lines(done, "align"), done.stderr[-3000:]


def test_a_user_error_raised_by_the_library_is_one_line_and_exit_2(tmp_path):
  """The same command and place, a `ConfigError` instead: one line, exit 2, no traceback."""
  failure = 'raise ConfigError("alignment mode x is unknown; use one of default, paper.")'
  done = _run(_ALIGN_ARGV, tmp_path, tmp_path,
              program=_PATCHED_ALIGN.format(failure=failure))
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
  assert _error_lines(done, "align") == [
      "specialize align: alignment mode x is unknown; use one of default, paper."]


@pytest.mark.slow
def test_tasks_needs_no_data(server, tmp_path):
  done = _run(["tasks", "--filter", "bbh_snarks"], tmp_path, tmp_path, server=server)
  assert (done.returncode, done.stdout.split()) == (0, ["bbh_snarks_ao", "bbh_snarks_ao_paper",
                                                        "bbh_snarks_cot", "bbh_snarks_cot_paper"])


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
  with demo_data.tiny_demo_data(tmp_path_factory, num_train=200, num_eval=8) as directory:
    yield directory


@pytest.mark.slow
def test_a_validated_gin_value_is_one_line_and_exit_2(server, tiny_demo, tmp_path):
  """The demo's cosine schedule warms up for 40 steps: 2 training steps cannot hold it."""
  done = _run(["train", "--gin_file=experiments/demo_cpu.gin", '--gin.MODEL_DIR="runs/x"',
               "--gin.TRAIN_STEPS=2"], tmp_path, tiny_demo.parent, server=server)
  assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
  assert done.returncode == 2, done.stderr[-3000:]
  assert _error_lines(done, "train") == [
      "specialize train: The cosine schedule decays from warmup_steps=40 to num_train_steps=2, "
      "which must be larger; set --gin.OptimizerConfig.decay_steps or lower warmup_steps."]
  assert "First step" not in done.stderr  # Nothing was compiled or trained.


@pytest.mark.slow
def test_missing_training_data_fails_before_the_model_is_built(server, tmp_path):
  """No eval tasks, so only the trainer reads data: it builds its input pipeline first."""
  (tmp_path / "data").mkdir()
  done = _run(["train", "--gin_file=experiments/flan_t5_small_gsm8k.gin",
               '--gin.MODEL_DIR="runs/x"', "--gin.EVAL_PERIOD=0"], tmp_path, tmp_path / "data",
              SHARED_VOCAB, server=server)
  assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
  assert done.returncode == 2, done.stderr[-3000:]
  [line] = _error_lines(done, "train")
  # The training tasks read a prepared set; the default one is the GSM8K gold rationales.
  assert f"{tmp_path / 'data' / 'prepared' / 'gsm8k_gold'} is missing" in line, line
  assert "specialize prepare --output" in line and "SPECIALIZE_PREPARED_DATA" in line, line
  assert "initialized" not in done.stderr  # No train state was built (nor compiled).
  assert sorted(os.listdir(tmp_path / "runs" / "x")) == ["config.gin"]
