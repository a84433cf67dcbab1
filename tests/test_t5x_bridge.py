"""The T5X bridge (gin/t5x/, specialize_jax/integrations/t5x_bridge.py).

Without T5X (CI): every name the gin files import, include, bind or reference exists in our package
or among the T5X names they rely on, and `import specialize_jax` never imports T5X. With T5X
installed (it is not on PyPI; install it from its repository to run these): a real
`python -m t5x.train` run of gin/t5x/tiny_cpu.gin with the distribution loss, and a checkpoint
round trip between `specialize train` and T5X.
"""
import ast
import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gin import config_parser
import specialize_jax
from specialize_jax import cli
from specialize_jax.errors import ConfigError
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.checkpoints import param_tree
from tests.support import prepared_sets
from tests.support import tiny_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN_DIR = ROOT / "gin"
T5X_GIN_FILES = sorted((GIN_DIR / "t5x").glob("*.gin"))
BRIDGE_MODULE = "specialize_jax.integrations.t5x_bridge"
# The T5X names the gin files use: their modules and the attributes bound or referenced, and the
# T5X config files they include. Checked against T5X itself when it is installed.
T5X_NAMES = {
    "t5x.decoding": {"temperature_sample"},
    "t5x.optimizers": {"adamw"},
    "t5x.partitioning": {"PjitPartitioner", "standard_logical_axis_rules"},
    "t5x.trainer": {"Trainer"},
    "t5x.utils": {"create_learning_rate_scheduler", "RestoreCheckpointConfig",
                  "SaveCheckpointConfig", "DatasetConfig"},
    "t5x.examples.t5.network": {"Transformer", "T5Config"},
}
T5X_GIN_INCLUDES = {"t5x/configs/runs/finetune.gin"} | {
    f"t5x/examples/t5/t5_1_1/{size}.gin" for size in ("tiny", "small", "base", "large", "xl",
                                                      "xxl")}
# Macros the included T5X files define (t5_1_1/base.gin and finetune.gin).
T5X_MACROS = {"Z_LOSS", "LABEL_SMOOTHING", "LOSS_NORMALIZING_FACTOR", "OPTIMIZER", "MODEL_DIR",
              "TRAIN_STEPS", "BATCH_SIZE", "EVAL_STEPS", "RANDOM_SEED"}


def _has_t5x() -> bool:
  try:
    importlib.import_module("t5x")
    return True
  except ImportError:
    return False


class _References(config_parser.ParserDelegate):
  def configurable_reference(self, scoped_configurable_name, evaluate):
    return ("@", scoped_configurable_name.split("/")[-1])

  def macro(self, macro_name):
    return ("%", macro_name)


def _refs(value):
  if isinstance(value, tuple) and len(value) == 2 and value[0] in ("@", "%"):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _refs(item)
  elif isinstance(value, dict):
    for item in value.values():
      yield from _refs(item)


def _statements(path):
  with open(path, encoding="utf-8") as f:
    return list(config_parser.ConfigParser(f, _References()))


def _resolve(module_name: str, attribute: str):
  """The object `module.attribute`; None (after checking the name) for modules that need T5X
  when it is absent: T5X's own and our bridge, whose top-level names are read from its source."""
  if module_name.split(".")[0] == "t5x":
    assert attribute in T5X_NAMES.get(module_name, ()), (
        f"{module_name}.{attribute} is not among the T5X names this test knows; add it to "
        "T5X_NAMES after checking it in T5X")
    if not _has_t5x():
      return None
  if module_name == BRIDGE_MODULE and not _has_t5x():
    tree = ast.parse((ROOT / "specialize_jax" / "integrations" / "t5x_bridge.py").read_text(encoding="utf-8"))
    names = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert attribute in names, f"{module_name} has no {attribute}"
    return None
  return getattr(importlib.import_module(module_name), attribute)


def _accepts(target, parameter: str) -> bool:
  target = target.__init__ if inspect.isclass(target) else target
  parameters = inspect.signature(target).parameters
  return parameter in parameters or any(
      p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@pytest.mark.parametrize("path", T5X_GIN_FILES, ids=lambda p: p.name)
def test_gin_files_reference_only_existing_names(path):
  modules, macros_defined, macros_used, selectors = {}, set(), set(), []
  for statement in _statements(path):
    where = f"{path.name}:{statement.location.line_num}"
    if isinstance(statement, config_parser.ImportStatement):
      if statement.module.startswith("__gin__"):
        continue
      alias = statement.alias or statement.module.split(".")[-1]
      modules[alias] = statement.module
      if statement.module == BRIDGE_MODULE:
        assert (ROOT / "specialize_jax" / "integrations" / "t5x_bridge.py").is_file()
      elif statement.module.split(".")[0] in ("specialize_jax", "tasks", "seqio", "optax"):
        importlib.import_module(statement.module)
      else:
        assert statement.module in T5X_NAMES, f"{where}: unknown module {statement.module}"
    elif isinstance(statement, config_parser.IncludeStatement):
      ours = GIN_DIR / statement.filename
      assert ours.is_file() or statement.filename in T5X_GIN_INCLUDES, (
          f"{where}: include {statement.filename!r} is neither in gin/ nor a T5X config file")
    elif isinstance(statement, config_parser.BindingStatement):
      if "." not in statement.selector:  # a macro
        macros_defined.add(statement.selector)
      else:
        selectors.append((where, statement.selector, statement.arg_name))
      for kind, name in _refs(statement.value):
        if kind == "%":
          macros_used.add(name)
        else:
          selectors.append((where, name, None))
  for where, selector, arg_name in selectors:
    alias, _, attribute = selector.rpartition(".")
    assert alias in modules, f"{where}: {selector} uses {alias!r}, which the file does not import"
    target = _resolve(modules[alias], attribute)
    if target is not None and arg_name:
      assert _accepts(target, arg_name), f"{where}: {selector} has no parameter {arg_name!r}"
  included_macros = set()
  for statement in _statements(path):
    if isinstance(statement, config_parser.IncludeStatement) and (
        GIN_DIR / statement.filename).is_file():
      included_macros |= {s.selector for s in _statements(GIN_DIR / statement.filename)
                          if isinstance(s, config_parser.BindingStatement) and "." not in
                          s.selector}
  undefined = macros_used - macros_defined - included_macros - T5X_MACROS
  assert not undefined, f"{path.name} uses macros nobody defines: {sorted(undefined)}"


def test_every_flan_t5_size_has_a_t5x_config():
  names = {p.name for p in T5X_GIN_FILES}
  assert {f"flan_t5_{s}.gin" for s in ("small", "base", "large", "xl", "xxl")} <= names
  assert "tiny_cpu.gin" in names


# The reproduction settings both routes share (gin/experiments/ for `specialize train`).
SIZES = ("small", "base", "large", "xl", "xxl")


def _bindings(path, into=None):
  """The file's bindings after its includes from gin/ (later ones win), keyed `selector` for
  macros and `selector.arg` otherwise; values as the parser gives them (references as tuples)."""
  into = {} if into is None else into
  for statement in _statements(path):
    if isinstance(statement, config_parser.IncludeStatement) and (
        GIN_DIR / statement.filename).is_file():
      _bindings(GIN_DIR / statement.filename, into)
    elif isinstance(statement, config_parser.BindingStatement):
      scope = f"{statement.scope}/" if statement.scope else ""
      key = statement.selector if "." not in statement.selector else (
          f"{scope}{statement.selector}.{statement.arg_name}")
      into[key] = statement.value
  return into


def _value(bindings, key):
  value = bindings[key]
  while isinstance(value, tuple) and len(value) == 2 and value[0] == "%":
    value = bindings[value[1]]
  return value


@pytest.mark.parametrize("size", SIZES)
def test_t5x_size_file_is_the_experiment_of_our_trainer(size):
  """No packing, fixed seeds, the input's position in every checkpoint (a restart resumes it, not
  reshuffles), a checkpoint kept and an in-distribution plus OOD dev eval every 250 steps, dropout
  off, and the steps, rate, accumulation and batch of gin/experiments/ (T5X's finetune defaults:
  packing, seed None, save_dataset False, a checkpoint every 5,000, one eval task, dropout 0.1)."""
  t5x = _bindings(GIN_DIR / "t5x" / f"flan_t5_{size}.gin")
  ours = _bindings(GIN_DIR / "experiments" / f"flan_t5_{size}_gsm8k.gin")
  assert _value(t5x, "train/utils.DatasetConfig.pack") is False
  assert _value(t5x, "train/utils.DatasetConfig.shuffle") is True
  assert isinstance(_value(t5x, "train/utils.DatasetConfig.seed"), int)
  assert isinstance(_value(t5x, "RANDOM_SEED"), int)
  assert _value(t5x, "train_eval/utils.DatasetConfig.pack") is False
  assert _value(t5x, "utils.SaveCheckpointConfig.save_dataset") is True
  assert _value(t5x, "utils.SaveCheckpointConfig.keep") is None
  assert _value(t5x, "utils.SaveCheckpointConfig.period") == 250
  assert _value(ours, "CHECKPOINT_PERIOD") == 250
  assert _value(t5x, "EVAL_PERIOD") == _value(ours, "EVAL_PERIOD") == 250
  assert _value(t5x, "DROPOUT_RATE") == _value(ours, "DROPOUT_RATE") == 0.0
  assert t5x["EVAL_MIXTURE_OR_TASK_NAME"] == ("@", "math_eval.register_eval_mixture")
  for config in ("train_eval", "infer_eval"):
    assert t5x[f"{config}/utils.DatasetConfig.mixture_or_task_name"] == (
        "%", "EVAL_MIXTURE_OR_TASK_NAME")
  eval_tasks = _value(t5x, "math_eval.register_eval_mixture.task_names")
  assert tuple(eval_tasks) == tuple(_value(ours, "EVAL_TASKS"))
  assert any(t.startswith("gsm8k_dev_") for t in eval_tasks)
  assert any(t.startswith("multiarith_dev_") for t in eval_tasks)
  start = int(_value(t5x, "INITIAL_CHECKPOINT_PATH").rpartition("checkpoint_")[2])
  assert _value(t5x, "TRAIN_STEPS") - start == _value(ours, "TRAIN_STEPS")
  assert start % 250 == 0  # T5X saves at absolute steps: fine-tuning step 250k lands on them
  for macro in ("LEARNING_RATE", "NUM_MICROBATCHES", "BATCH_SIZE", "TASK_FEATURE_LENGTHS",
                "WARMUP_STEPS", "WEIGHT_DECAY", "MICRO_BATCHES",
                "micro_batches.MicroBatchSettings.micro_batch_sizes",
                "micro_batches.MicroBatchSettings.accumulation"):
    assert _value(t5x, macro) == _value(ours, macro), macro
  # The original's batching reaches T5X's training task (ours: DatasetConfig.micro_batches).
  assert t5x["distillation.register_distillation_tasks.batching"] == ("%", "MICRO_BATCHES")
  assert ours["train/input_pipeline.DatasetConfig.micro_batches"] == ("%", "MICRO_BATCHES")
  assert _value(t5x, "MICRO_BATCHES")[0] == "@"


def test_eval_mixture_holds_the_eval_tasks_and_names_an_unknown_one():
  import seqio  # pylint: disable=g-import-not-at-top
  from specialize_jax.tasks import math_eval  # pylint: disable=g-import-not-at-top
  tasks = ("gsm8k_dev_icl_cot", "multiarith_dev_zs_cot")
  for _ in range(2):  # gin calls it once per reference
    assert math_eval.register_eval_mixture("test_dev_eval", tasks) == "test_dev_eval"
  assert sorted(t.name for t in seqio.get_mixture_or_task("test_dev_eval").tasks) == sorted(tasks)
  with pytest.raises(ConfigError, match="gsm8k_dev_nope"):
    math_eval.register_eval_mixture("test_dev_eval", ("gsm8k_dev_nope",))
  seqio.MixtureRegistry.remove("test_dev_eval")


def test_importing_the_package_never_imports_t5x():
  code = ("import sys, specialize_jax, specialize_jax.cli, specialize_jax.model.models; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 't5x' or "
          "m == 'specialize_jax.integrations.t5x_bridge'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_convert_to_t5x_writes_the_legacy_layout_at_the_named_step(tmp_path):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from tests import test_network  # pylint: disable=g-import-not-at-top
  params = tiny_model.random_params(test_network.TINY, seed=3)
  source = orbax_pytree.save_orbax(params, test_network.TINY, tmp_path / "ours")
  assert cli.main(["convert", source, "--to", "t5x", str(tmp_path / "out")]) == 2  # no step
  assert not (tmp_path / "out").exists()
  step_dir = tmp_path / "for_t5x" / "checkpoint_1234"
  assert cli.main(["convert", source, "--to", "t5x", str(step_dir)]) == 0
  state = serialization.msgpack_restore((step_dir / "checkpoint").read_bytes())
  assert int(state["optimizer"]["state"]["step"]) == 1234
  assert "param_states" not in state["optimizer"]["state"]  # no invented optimizer state
  _, loaded = loading.load_checkpoint(step_dir, fmt="t5x")
  expected, got = param_tree.flatten_params(params), param_tree.flatten_params(loaded)
  assert set(expected) == set(got)
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], np.asarray(value), err_msg=name)


# -- with T5X installed ---------------------------------------------------------------------------

needs_t5x = pytest.mark.skipif(not _has_t5x(), reason=(
    "T5X is not installed (it is not on PyPI): install it from github.com/google-research/t5x "
    "to run the T5X bridge end to end"))

TINY_DIMS = {"emb_dim": 8, "num_heads": 4, "head_dim": 3, "mlp_dim": 16}  # T5X's t5_1_1/tiny.gin


@needs_t5x
def test_the_t5x_names_the_check_relies_on_exist_in_t5x():
  """T5X_NAMES, T5X_GIN_INCLUDES and T5X_MACROS (used above without T5X) against T5X itself."""
  import t5x  # pylint: disable=g-import-not-at-top
  for module, attributes in T5X_NAMES.items():
    for attribute in attributes:
      assert hasattr(importlib.import_module(module), attribute), f"{module}.{attribute}"
  t5x_root = pathlib.Path(t5x.__file__).resolve().parent.parent
  defined = set()
  for include in T5X_GIN_INCLUDES:
    assert (t5x_root / include).is_file(), include
    defined |= {s.selector for s in _statements(t5x_root / include)
                if isinstance(s, config_parser.BindingStatement) and "." not in s.selector}
  assert T5X_MACROS <= defined, sorted(T5X_MACROS - defined)


def _t5x_train(model_dir, *bindings, timeout=300):
  """Runs `python -m t5x.train` with gin/t5x/tiny_cpu.gin (or the `--gin_file=` among `bindings`,
  found in a `--gin_search_paths=` among them); returns its log."""
  flags = [b for b in bindings if b.startswith(("--gin_file=", "--gin_search_paths="))]
  bindings = [b for b in bindings if b not in flags]
  paths = ",".join([str(GIN_DIR)] + [f.partition("=")[2] for f in flags
                                     if f.startswith("--gin_search_paths=")])
  files = [f for f in flags if f.startswith("--gin_file=")] or ["--gin_file=t5x/tiny_cpu.gin"]
  args = [sys.executable, "-m", "t5x.train", f"--gin_search_paths={paths}", *files,
          f'--gin.MODEL_DIR="{model_dir}"', *bindings]
  # One CPU device: T5X lays 8 fake CPU devices out as a model-parallel mesh the tiny model's
  # 12-wide projections do not divide.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # T5X can hang at exit after an error (tf.data teardown), hence the timeout.
  run = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
  assert run.returncode == 0, run.stderr[-6000:]
  return run.stderr


def _scalars(event_dir):
  """{tag: {step: value}} from the TensorBoard event files T5X wrote in `event_dir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted(pathlib.Path(event_dir).glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
        if array is not None and array.dtype.kind == "f":  # scalars, not the gin text summary
          values.setdefault(value.tag, {})[event.step] = float(array)
  return values


@needs_t5x
def test_tiny_t5x_run_trains_with_the_distribution_loss(data_dir, codex_aligned_files,
                                                        tmp_path):
  teacher_path, aligned_path, _ = codex_aligned_files
  prepared = prepared_sets.prepare_gsm8k_set(tmp_path / "prepared", teacher_path, aligned_path,
                                             teacher_k=5, format_names=("zs_ao", "zs_cot"),
                                             num_chunks=1)
  model_dir = tmp_path / "t5x_run"
  _t5x_train(model_dir, "--gin.LOSS_TYPE='distribution'", "--gin.TEACHER_K=5",
             f"--gin.PREPARED_DATA='{prepared}'")
  train = _scalars(model_dir / "train")
  assert sorted(train["loss"]) == [2, 4]
  for step in (2, 4):
    # ce_weight 0: the loss is the teacher KL plus the z-loss; the real top-5 rows hold < 1 mass.
    assert train["loss"][step] == pytest.approx(train["kl"][step] + train["z_loss"][step],
                                                rel=1e-5)
    assert 0.5 < train["teacher_mass"][step] < 0.999
    assert train["kl"][step] < train["cross_ent_loss"][step]
  # Training eval on a task without teacher features: the one-hot teacher, KL = cross-entropy.
  train_eval = _scalars(model_dir / "training_eval" / "gsm8k_dev_zs_cot")
  assert train_eval["kl"][4] == pytest.approx(train_eval["cross_ent_loss"][4], rel=1e-5)
  assert train_eval["teacher_mass"][4] == pytest.approx(1.0)
  # Inference eval with our metrics, on 8 examples.
  with open(model_dir / "inference_eval" / "gsm8k_dev_zs_cot-metrics.jsonl",
            encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f]
  assert [m["step"] for m in metrics] == [2, 4]
  assert {"accuracy", "accuracy_paper"} <= set(metrics[-1])
  with open(model_dir / "inference_eval" / "gsm8k_dev_zs_cot-000004.jsonl",
            encoding="utf-8") as f:
    assert len(f.readlines()) == 8
  assert (model_dir / "checkpoint_4").is_dir()


@needs_t5x
def test_checkpoints_round_trip_between_specialize_and_t5x(data_dir, gsm8k_gold_set, tmp_path):
  """specialize train -> convert --to t5x -> T5X restores, trains, saves -> our loader reads T5X's
  copy of the restored step identically; and our network reproduces T5X's logits on it."""
  ours = tmp_path / "ours"
  overrides = {"MODEL_DIR": f"'{ours}'", "MIXTURE_OR_TASK_NAME": "'gsm8k_distill_zs_cot'",
               "TASK_FEATURE_LENGTHS": "{'inputs': 256, 'targets': 128}", "TRAIN_STEPS": 2,
               "BATCH_SIZE": 8, "CHECKPOINT_PERIOD": 2,
               **{f"model_config.T5Config.{k}": v for k, v in TINY_DIMS.items()}}
  assert cli.main(["train", "--gin_file=runs/specialize.gin", "--gin_file=models/tiny.gin"] +
                  [f"--gin.{k}={v}" for k, v in overrides.items()]) == 0
  handed = tmp_path / "to_t5x" / "checkpoint_2"
  assert cli.main(["convert", str(ours), "--to", "t5x", str(handed)]) == 0
  t5x_dir = tmp_path / "t5x_run"
  _t5x_train(t5x_dir, f"--gin.INITIAL_CHECKPOINT_PATH='{handed}'", "--gin.TRAIN_STEPS=4")
  # T5X continued from step 2 (a scratch start would write checkpoint_0).
  assert sorted(p.name for p in t5x_dir.glob("checkpoint_*")) == ["checkpoint_2", "checkpoint_4"]
  _, original = loading.load_checkpoint(ours / "checkpoint_2")
  _, restored = loading.load_checkpoint(t5x_dir / "checkpoint_2")
  _, trained = loading.load_checkpoint(t5x_dir / "checkpoint_4")
  original, restored, trained = map(param_tree.flatten_params, (original, restored, trained))
  assert set(original) == set(restored) == set(trained)
  for name in original:
    np.testing.assert_array_equal(restored[name], original[name], err_msg=name)
  assert any(not np.allclose(trained[n], original[n]) for n in original)

  # T5X's network and ours give the same logits from the checkpoint T5X trained.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from t5x.examples.t5 import network as t5x_network  # pylint: disable=g-import-not-at-top
  model = specialize_jax.load_pretrained(t5x_dir / "checkpoint_4")
  rng = np.random.default_rng(0)
  encoder = rng.integers(2, 32000, size=(2, 12)).astype(np.int32)
  targets = rng.integers(2, 32000, size=(2, 7)).astype(np.int32)
  decoder = np.pad(targets[:, :-1], ((0, 0), (1, 0)))  # shifted right, BOS 0
  config = t5x_network.T5Config(vocab_size=32128, dtype="float32", num_encoder_layers=2,
                                num_decoder_layers=2, mlp_activations=("gelu", "linear"),
                                dropout_rate=0.0, logits_via_embedding=False, **TINY_DIMS)
  t5x_logits = t5x_network.Transformer(config).apply(
      {"params": jax.tree.map(jnp.asarray, param_tree.unflatten_params(trained))},
      encoder, decoder, targets, enable_dropout=False)
  np.testing.assert_allclose(model.logits(encoder, decoder, targets), np.asarray(t5x_logits),
                             atol=1e-5)


# The original's batching on the tiny T5X run: two formats of the gold set, micro-batches of 2 and
# 3 rows, 2 per step, padded to BATCH_SIZE 8 in 2 device micro-batches.
ORIGINAL_FORMATS = {"zs_cot": 2, "zs_ao": 3}
ORIGINAL_LENGTHS = {"inputs": 256, "targets": 320}  # the gold set's longest target is 290 tokens
ORIGINAL_MODE = f"""
from __gin__ import dynamic_registration
from specialize_jax.prepared import micro_batches
from specialize_jax.tasks import distillation

include 't5x/tiny_cpu.gin'

MICRO_BATCHES = @micro_batches.MicroBatchSettings()
micro_batches.MicroBatchSettings:
  micro_batch_sizes = {ORIGINAL_FORMATS}
  accumulation = 2
  device_micro_batches = %NUM_MICROBATCHES
  rows_per_step = %BATCH_SIZE
NUM_MICROBATCHES = 2
distillation.register_distillation_tasks.rates = {{'zs_cot': 1.0, 'zs_ao': 1.0}}
TASK_FEATURE_LENGTHS = {ORIGINAL_LENGTHS}
"""


@needs_t5x
def test_t5x_reads_the_batches_of_specialize_train_in_the_originals_batching(gsm8k_gold_set):
  """T5X's own dataset function on the task `register_distillation_tasks(batching=...)` registers
  (what gin/t5x/ binds) yields exactly the batches of our trainer's `DatasetConfig.micro_batches`."""
  from t5x import utils as t5x_utils  # pylint: disable=g-import-not-at-top
  from specialize_jax.data import feature_converters  # pylint: disable=g-import-not-at-top
  from specialize_jax.prepared import micro_batches  # pylint: disable=g-import-not-at-top
  from specialize_jax.tasks import distillation  # pylint: disable=g-import-not-at-top
  from specialize_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
  settings = micro_batches.MicroBatchSettings(ORIGINAL_FORMATS, 2, device_micro_batches=2,
                                              rows_per_step=8)
  rates = {"zs_cot": 1.0, "zs_ao": 1.0}
  t5x_task = distillation.register_distillation_tasks("t5x_original_batching", gsm8k_gold_set,
                                                      rates, batching=settings)
  our_task = distillation.register_distillation_tasks("ours_original_batching", gsm8k_gold_set,
                                                      rates)
  t5x_config = t5x_utils.DatasetConfig(
      mixture_or_task_name=t5x_task, task_feature_lengths=ORIGINAL_LENGTHS, split="train",
      batch_size=8, shuffle=True, seed=0, pack=False, use_cached=False)
  t5x_batches = t5x_utils.get_dataset(
      t5x_config, 0, 1, feature_converters.TeacherEncDecFeatureConverter).as_numpy_iterator()
  ours = input_pipeline.TrainIterator(input_pipeline.DatasetConfig(
      our_task, ORIGINAL_LENGTHS, batch_size=8, seed=0, micro_batches=settings))
  for _ in range(3):
    expected, got = next(ours), next(t5x_batches)
    assert set(got) == set(expected)
    for name, value in expected.items():
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert expected["decoder_loss_weights"].dtype == np.float32


@needs_t5x
def test_a_restarted_t5x_run_trains_on_the_batches_of_an_uninterrupted_one(
    data_dir, gsm8k_gold_set, tmp_path):
  """In the original's batching: T5X stopped at its step-2 checkpoint and started again (the input's
  position restored from that checkpoint) ends at the parameters of a run that never stopped."""
  (tmp_path / "gin").mkdir()
  (tmp_path / "gin" / "tiny_original.gin").write_text(ORIGINAL_MODE)
  common = [f"--gin_search_paths={tmp_path / 'gin'}", "--gin_file=tiny_original.gin",
            f"--gin.PREPARED_DATA='{gsm8k_gold_set}'", "--gin.EVAL_PERIOD=1000"]
  _t5x_train(tmp_path / "whole", *common, "--gin.TRAIN_STEPS=4")
  _t5x_train(tmp_path / "restarted", *common, "--gin.TRAIN_STEPS=2")
  log = _t5x_train(tmp_path / "restarted", *common, "--gin.TRAIN_STEPS=4")
  assert "checkpoint_2" in log  # it restored, rather than starting again
  _, whole = loading.load_checkpoint(tmp_path / "whole" / "checkpoint_4")
  _, restarted = loading.load_checkpoint(tmp_path / "restarted" / "checkpoint_4")
  _, second = loading.load_checkpoint(tmp_path / "whole" / "checkpoint_2")
  whole, restarted, second = map(param_tree.flatten_params, (whole, restarted, second))
  for name in whole:
    np.testing.assert_array_equal(restarted[name], whole[name], err_msg=name)
  assert any(not np.allclose(whole[n], second[n]) for n in whole)  # steps 3-4 trained
