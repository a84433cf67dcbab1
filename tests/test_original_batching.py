"""The original's batching as a trainer mode (`DatasetConfig.micro_batches`): one optimizer step
reads the original's single-format micro-batches, laid into a fixed-shape batch, and its gradient is
the original's rule (each micro-batch's token mean, divided by the accumulation count) computed by
hand; the layout is the same on any number of data shards and resumes at its step."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specialize_jax.errors import ConfigError
from specialize_jax.model import models
from specialize_jax.prepared import micro_batches
from specialize_jax.prepared import prepare
from specialize_jax.prepared import prepared_data
from specialize_jax.teacher import teacher_data
from specialize_jax.training import input_pipeline
from specialize_jax.training import train_state
from specialize_jax.training import train_step
from tests.support import tiny_model

FORMATS = ("zs_cot", "zs_ao")
SIZES = {"zs_cot": 3, "zs_ao": 5}
ACCUMULATION = 2
LENGTHS = {"inputs": 48, "targets": 40}
ROWS, DEVICE_MICRO_BATCHES = 12, 4  # 3 rows per device micro-batch; a step holds 6 to 10 rows.
TASK = "original_batching_toy"


def _records(num_questions=40):
  for i in range(num_questions):
    yield teacher_data.TeacherRecord(
        id=f"toy/train/{i}", source="toy", split="train", question=f"How many pens in box {i}?",
        gold_answer=str(i), gold_number=float(i),
        samples=tuple(teacher_data.TeacherSample(
            text=f"Box {i} has {i} pens" + " and more pens" * j + f".\nThe answer is {i}.",
            answer=float(i), correct=True) for j in range(3)))


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
  vocab = os.environ["SPECIALIZE_VOCAB_PATH"]
  config = prepare.PrepareConfig(
      output_dir=str(tmp_path_factory.mktemp("batching") / "toy"), vocab_path=vocab,
      format_names=FORMATS, num_chunks=2, rates={"zs_cot": 0.8, "zs_ao": 0.2})
  prepared = prepare.prepare(lambda: _records(), config, sources={"teacher": "toy"})
  from specialize_jax.tasks import distillation  # pylint: disable=g-import-not-at-top
  distillation.register_prepared_task(TASK, lambda: prepared.directory, FORMATS,
                                      vocabulary_path=vocab)
  return prepared


def _settings(**overrides):
  return micro_batches.MicroBatchSettings(
      **{"micro_batch_sizes": SIZES, "accumulation": ACCUMULATION,
         "device_micro_batches": DEVICE_MICRO_BATCHES, **overrides})


def _config(**overrides):
  return input_pipeline.DatasetConfig(
      **{"mixture_or_task_name": TASK, "task_feature_lengths": LENGTHS, "batch_size": ROWS,
         "seed": 3, "micro_batches": _settings(), **overrides})


def _plan(prepared, seed=3):
  return _settings().plan({f: prepared.num_examples(f) for f in FORMATS}, seed)


def _hand_written_micro_batch(prepared, micro_batch):
  """The original's micro-batch as arrays, built from the stored records without the pipeline."""
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = array_record_data_source.ArrayRecordDataSource(prepared.files(micro_batch.format_name))
  rows = {"encoder_input_tokens": [], "decoder_input_tokens": [], "decoder_target_tokens": []}
  for record in reader.__getitems__(micro_batch.examples.tolist()):
    example = tf.train.Example.FromString(record).features.feature
    inputs = list(example["inputs"].int64_list.value) + [1]  # + EOS
    targets = list(example["targets"].int64_list.value) + [1]
    pad = lambda x, n: x + [0] * (n - len(x))
    rows["encoder_input_tokens"].append(pad(inputs, LENGTHS["inputs"]))
    rows["decoder_target_tokens"].append(pad(targets, LENGTHS["targets"]))
    rows["decoder_input_tokens"].append(pad([0] + targets[:-1], LENGTHS["targets"]))
  return {name: np.asarray(value, np.int32) for name, value in rows.items()}


def test_a_step_has_the_originals_gradient(toy_set):
  """Our step on the pipeline's batch (device micro-batches, padding skipped) == the original's
  rule written out: sum over the step's micro-batches of grad(token-mean cross-entropy) / A."""
  model = models.EncoderDecoderModel(tiny_model.config(vocab_size=32128, dtype="float32"),
                                     z_loss=0.0)
  params = tiny_model.random_params(model.config)
  step = 3
  batch = next(input_pipeline.TrainIterator(_config(), position={"batches_consumed": step,
                                                                  "seed": 3}))
  optimizer = optax.sgd(1.0)  # new params = params - gradient
  state = train_state.TrainState(step=jnp.asarray(step), params=params,
                                 opt_state=optimizer.init(params))
  run_step = jax.jit(functools.partial(
      train_step.train_step, model=model, optimizer=optimizer,
      num_microbatches=DEVICE_MICRO_BATCHES, learning_rate_fn=lambda _: 1.0,
      skip_empty_microbatches=True))
  new_state, metrics = run_step(state, jax.tree_util.tree_map(jnp.asarray, batch),
                                jax.random.PRNGKey(0))
  ours = jax.tree_util.tree_map(lambda a, b: a - b, params, new_state.params)

  def token_mean(p, micro_batch):
    logits = model.compute_logits(p, micro_batch)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), micro_batch["decoder_target_tokens"][
        ..., None], axis=-1)[..., 0]
    mask = (micro_batch["decoder_target_tokens"] > 0).astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.sum(mask)

  step_micro_batches = _plan(toy_set).step(step)
  token_mean_and_grad = jax.jit(jax.value_and_grad(token_mean))
  expected = None
  losses = []
  for micro_batch in step_micro_batches:
    arrays = _hand_written_micro_batch(toy_set, micro_batch)
    loss, grads = token_mean_and_grad(params, arrays)
    losses.append(float(loss))
    grads = jax.tree_util.tree_map(lambda g: g / ACCUMULATION, grads)
    expected = grads if expected is None else jax.tree_util.tree_map(jnp.add, expected, grads)
  for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(expected)):
    # f32: token gradients of magnitude ~10 cancel to ~0.01 in a different order.
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * float(np.max(np.abs(want))))
  # The loss is the original's logged one: the mean of the micro-batches' token means.
  assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
  real_rows = sum(len(m.examples) for m in step_micro_batches)
  assert float(metrics["num_examples"]) == real_rows


def test_the_layout_fills_device_micro_batches_in_order_and_pads_the_rest(toy_set):
  plan = _plan(toy_set)
  batch = next(input_pipeline.TrainIterator(_config()))
  weights = batch["decoder_loss_weights"]
  assert weights.dtype == np.float32
  # What `specialize plan` compiles against (float32 weights) is what the pipeline yields.
  assert input_pipeline.batch_spec(_config()) == {
      name: (value.shape, value.dtype) for name, value in batch.items()}
  rows = sum(len(m.examples) for m in plan.step(0))
  per_device = ROWS // DEVICE_MICRO_BATCHES
  used = -(-rows // per_device)
  for i in range(DEVICE_MICRO_BATCHES):  # Device micro-batch i: rows i, i + k, ... (train_step).
    has_weight = weights[i::DEVICE_MICRO_BATCHES].sum(axis=1) > 0
    assert has_weight.all() if i < used - 1 else (has_weight.any() == (i < used))
  # Each micro-batch's weights sum to 1 / A: each weighs the same, whatever its tokens.
  assert weights.sum() == pytest.approx(1.0, rel=1e-5)


def test_the_batches_are_the_same_on_any_shard_layout_and_resume_at_their_step(toy_set):
  config = _config()
  whole = input_pipeline.TrainIterator(config, position={"batches_consumed": 2, "seed": 3})
  expected = next(whole)
  # Two processes, interleaved blocks of 3 rows (as a TPU host feeds them).
  parts = [next(input_pipeline.TrainIterator(config, position={"batches_consumed": 2, "seed": 3},
                                             shards=[(i, 4), (i + 2, 4)])) for i in range(2)]
  for name, value in expected.items():
    np.testing.assert_array_equal(parts[0][name], value[[0, 1, 2, 6, 7, 8]], err_msg=name)
    np.testing.assert_array_equal(parts[1][name], value[[3, 4, 5, 9, 10, 11]], err_msg=name)
  fresh = input_pipeline.TrainIterator(config)
  for _ in range(2):
    next(fresh)
  for name, value in next(fresh).items():
    np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_settings_that_do_not_fit_fail_before_training_naming_the_fix(toy_set):
  # Every step holds at least 6 rows (2 micro-batches of 3 or 5).
  with pytest.raises(ConfigError, match=r"--gin.NUM_MICROBATCHES=[34] --gin.BATCH_SIZE=(9|12) "
                                        r"\(the same 3 rows per device micro-batch"):
    input_pipeline.micro_batch_rows(_config(batch_size=6, micro_batches=_settings(
        device_micro_batches=2)), num_train_steps=50, num_microbatches=2)
  with pytest.raises(ConfigError, match="device_micro_batches=4 differs from NUM_MICROBATCHES=2"):
    input_pipeline.micro_batch_rows(_config(), num_train_steps=5, num_microbatches=2)
  rows = input_pipeline.micro_batch_rows(_config(), num_train_steps=50, num_microbatches=4)
  assert rows.min() >= 6 and rows.max() <= 10
  longest = max(int(toy_set.target_tokens(f).max()) for f in FORMATS) + 1
  short = _config(task_feature_lengths={"inputs": 48, "targets": longest - 1})
  with pytest.raises(ConfigError, match=f"at least {{'targets': {longest}"):
    next(input_pipeline.TrainIterator(short))
  with pytest.raises(ConfigError, match="USE_PACKING=False"):
    input_pipeline.batching(_config(pack=True))


def test_a_set_prepared_without_target_lengths_names_the_fix(toy_set, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  old = tmp_path / "old"
  shutil.copytree(toy_set.directory, old)
  os.remove(old / prepared_data.target_tokens_file("zs_cot"))
  with pytest.raises(prepared_data.PreparedDataError, match="prepare it again"):
    prepared_data.PreparedSet.open(str(old)).target_tokens("zs_cot")


def test_the_example_level_mixture_keeps_unit_weights(toy_set):
  batch = next(input_pipeline.TrainIterator(_config(micro_batches=None, batch_size=8)))
  assert batch["decoder_loss_weights"].dtype == np.int32
  assert set(np.unique(batch["decoder_loss_weights"])) == {0, 1}


CLI_SIZES = {"icl_cot": 1, "icl_ao": 2, "zs_cot": 2, "zs_ao": 3}


@pytest.mark.slow
def test_specialize_train_runs_the_originals_batching_from_its_gin_file(data_dir, gsm8k_gold_set,
                                                                        tmp_path):
  """`specialize train` with a gin/batching/ file (the shipped experiments include one), shrunk to a
  tiny model and micro-batches: each logged step trained on exactly its step's real rows, and a
  resumed run continues with the next step's."""
  import json  # pylint: disable=g-import-not-at-top
  from tests.support import processes  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "run"
  flags = ["train", "--gin_file=runs/specialize.gin", "--gin_file=models/tiny.gin",
           "--gin_file=batching/original_3b.gin", f"--gin.MODEL_DIR='{model_dir}'",
           "--gin.MIXTURE_OR_TASK_NAME='gsm8k_distill'", "--gin.LOG_PERIOD=1",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 1024, 'targets': 320}",
           "--gin.BATCH_SIZE=8", "--gin.NUM_MICROBATCHES=4", "--gin.CHECKPOINT_PERIOD=2",
           f"--gin.micro_batches.MicroBatchSettings.micro_batch_sizes={CLI_SIZES}",
           "--gin.micro_batches.MicroBatchSettings.accumulation=2"]
  env = processes.environment(SPECIALIZE_PREPARED_DATA=gsm8k_gold_set,
                              SPECIALIZE_DATA_DIR=str(data_dir))
  first = processes.run_specialize(flags + ["--gin.TRAIN_STEPS=2"], env=env, check=True)
  assert "The original's batching: a step holds" in first.stderr
  processes.run_specialize(flags + ["--gin.TRAIN_STEPS=3"], env=env, check=True)
  with open(model_dir / "metrics.jsonl", encoding="utf-8") as f:
    logged = {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}
  prepared = prepared_data.PreparedSet.open(gsm8k_gold_set)
  plan = micro_batches.MicroBatchPlan({f: prepared.num_examples(f) for f in prepared.formats},
                                      CLI_SIZES, 2, seed=0)
  assert sorted(logged) == [1, 2, 3]
  for step in (1, 2, 3):
    assert logged[step]["num_examples"] == plan.rows_per_step(3)[step - 1], step
