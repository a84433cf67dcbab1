"""Every shipped gin file parses (required macros filled), binds only real parameters, and the model
files match the presets; the CLI's flag handling follows T5X's semantics. Parsing runs in a working
directory holding `runs/`, `models/` and `experiments/` folders (as after `specialize demo`), on
`sys.path` like a checkout's root: gin must not mistake them for Python packages."""
import logging
import pathlib

import gin
import pytest

from specialize_jax.jobs import gin_config
from specialize_jax.errors import ConfigError
from specialize_jax.model import config as model_config
from specialize_jax.prepared import micro_batches

GIN_DIR = pathlib.Path(gin_config.SHIPPED_GIN_DIR)
REQUIRED = {
    "runs": ["MODEL_DIR='/tmp/x'", "MIXTURE_OR_TASK_NAME='gsm8k_distill'",
             "TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}", "TRAIN_STEPS=1", "BATCH_SIZE=8",
             "CHECKPOINT_PATH='/tmp/x'", "EVAL_TASKS=('gsm8k_test_zs_cot',)",
             "INFER_INPUTS='gsm8k_test_zs_cot'", "INFER_OUTPUT='/tmp/x.jsonl'"],
    "experiments": ["MODEL_DIR='/tmp/x'"],
    "demo": ["MODEL_DIR='/tmp/x'", "INITIAL_CHECKPOINT_PATH='/tmp/x/checkpoint_1'"],
}


@pytest.fixture(autouse=True)
def cwd_with_gin_named_folders(tmp_path, monkeypatch):
  for name in ("runs/demo", "models", "experiments", "partitioning", "batching"):
    (tmp_path / name).mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))


def _all_gin_files():
  """Our trainer's gin files; gin/t5x/ is for `python -m t5x.train` (tests/test_t5x_bridge.py)."""
  return sorted(p for p in GIN_DIR.rglob("*.gin") if p.relative_to(GIN_DIR).parts[0] != "t5x")


def test_gin_files_exist():
  names = {str(p.relative_to(GIN_DIR)) for p in _all_gin_files()}
  assert {"runs/specialize.gin", "runs/eval.gin", "runs/infer.gin", "models/flan_t5_xxl.gin",
          "partitioning/fsdp.gin", "experiments/demo_cpu.gin",
          "experiments/demo_cpu_answer_only.gin"} <= names


@pytest.mark.parametrize("path", _all_gin_files(), ids=lambda p: str(p.relative_to(GIN_DIR)))
def test_every_gin_file_parses(path):
  relative = path.relative_to(GIN_DIR)
  files = [str(relative)]
  if relative.parts[0] in ("models", "partitioning", "batching"):
    bindings = []
  else:
    bindings = [b for b in REQUIRED[relative.parts[0]]]
  gin.clear_config()
  # Bindings for macros a file does not use are harmless; unknown *parameters* fail parsing.
  with gin_config.file_resolution([str(GIN_DIR)]):
    gin.parse_config_files_and_bindings(files, bindings, skip_unknown=False,
                                        finalize_config=False)
  assert gin.config_str().strip()
  gin.clear_config()


@pytest.mark.parametrize("path", [p for p in _all_gin_files() if p.parent.name == "experiments"],
                         ids=lambda p: p.name)
def test_cli_parses_experiments_without_errors_in_the_log(path, caplog):
  """`parse_gin` as `specialize train` calls it: a run that works logs nothing at ERROR (gin's
  package-resource reader logged "Path not found" for each location it probed)."""
  caplog.set_level(logging.DEBUG)
  gin_config.parse_gin([f"experiments/{path.name}"], ["MODEL_DIR='/tmp/x'"], [])
  assert gin_config.macro("MODEL_DIR") == "/tmp/x"
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
  gin.clear_config()


def test_parse_gin_leaves_gin_file_lookup_as_it_was():
  from gin import config as gin_lib  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  before = list(gin_lib._FILE_READERS), list(gin_lib._LOCATION_PREFIXES)
  gin_config.parse_gin(["experiments/demo_cpu.gin"], ["MODEL_DIR='/tmp/x'"], ["/nonexistent"])
  assert (gin_lib._FILE_READERS, gin_lib._LOCATION_PREFIXES) == before
  # pylint: enable=protected-access
  gin.clear_config()


def test_header_on_every_gin_file():
  for path in _all_gin_files():
    text = path.read_text()
    assert text.startswith("#") and "Required:" in text and "Commonly overridden:" in text, path


@pytest.mark.parametrize("preset", ["tiny", "demo", "small", "base", "large", "xl", "xxl"])
def test_model_gin_files_equal_presets(preset):
  name = {"tiny": "tiny", "demo": "demo_tiny"}.get(preset, f"flan_t5_{preset}")
  gin.clear_config()
  with gin_config.file_resolution([str(GIN_DIR)]):
    gin.parse_config_files_and_bindings([f"models/{name}.gin"], ["MODEL_DTYPE = 'float32'"])
  from specialize_jax.model import models  # pylint: disable=g-import-not-at-top
  model = gin.get_configurable(models.EncoderDecoderModel)()
  import dataclasses  # pylint: disable=g-import-not-at-top
  expected = dataclasses.replace(model_config.PRESETS[preset], dtype="float32")
  assert model.config == expected
  gin.clear_config()


def test_missing_required_binding_is_named_before_compiling():
  with pytest.raises(ConfigError, match="TRAIN_STEPS"):
    gin_config.parse_gin(["runs/specialize.gin", "models/tiny.gin"],
                  ["MODEL_DIR='/tmp/x'", "MIXTURE_OR_TASK_NAME='x'", "BATCH_SIZE=8",
                   "TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}"], [])
  with pytest.raises(ConfigError, match="no_such_parameter"):
    gin_config.parse_gin(["experiments/demo_cpu.gin"],
                  ["MODEL_DIR='/tmp/x'", "runs.train.no_such_parameter = 3"], [])
  gin.clear_config()


def test_gin_flags_become_bindings():
  assert gin_config.gin_bindings(["--gin.TRAIN_STEPS=20", '--gin.MODEL_DIR="a b"']) == [
      "TRAIN_STEPS = 20", 'MODEL_DIR = "a b"']
  with pytest.raises(ConfigError, match="unrecognized argument '--steps=3'"):
    gin_config.gin_bindings(["--steps=3"])


def _recorded_dtype_of(config_text, tmp_path):
  run = tmp_path / "run"
  (run / "checkpoint_4").mkdir(parents=True, exist_ok=True)
  (run / "config.gin").write_text(config_text)
  from_step = gin_config.recorded_model_dtype(str(run / "checkpoint_4"))
  assert gin_config.recorded_model_dtype(str(run)) == from_step
  return from_step


@pytest.mark.parametrize("files, bindings, expected", [
    (["experiments/flan_t5_small_gsm8k.gin"], [], "bfloat16"),  # MODEL_DTYPE's default
    (["experiments/flan_t5_small_gsm8k.gin"], ["MODEL_DTYPE = 'float32'"], "float32"),
    (["experiments/demo_cpu.gin"], ["model_config.T5Config.dtype = 'bfloat16'"], "bfloat16"),
    (["experiments/demo_cpu.gin"], [], "float32"),
])
def test_recorded_model_dtype_reads_what_train_wrote(files, bindings, expected, tmp_path):
  """The dtype of the model a run trained, from the config.gin `specialize train` writes (the
  run directory or a step directory in it), without touching the caller's gin configuration."""
  gin_config.parse_gin(files, ["MODEL_DIR = '/tmp/x'"] + bindings, [])
  written = gin.config_str()
  assert _recorded_dtype_of(written, tmp_path) == expected
  assert gin.config_str() == written
  gin.clear_config()


def test_recorded_model_dtype_without_a_model_config(tmp_path):
  assert gin_config.recorded_model_dtype(str(tmp_path)) is None  # no config.gin
  assert _recorded_dtype_of("STEPS = 3\n", tmp_path) is None  # no T5Config in it
  # A T5Config without a dtype binding has T5Config's default.
  assert _recorded_dtype_of("from __gin__ import dynamic_registration\n"
                            "from specialize_jax.model import config\n"
                            "config.T5Config.emb_dim = 16\n", tmp_path) == "float32"
  assert _recorded_dtype_of("not gin (\n", tmp_path) is None  # a warning, not a failure


# The original's evaluated runs per size (docs/reproduction.md): learning rate, gradient
# accumulation, optimizer steps (Small: Base's settings, not in the paper).
REPRODUCTION = {
    "small": (5e-4, 3, 3000), "base": (5e-4, 3, 3000), "large": (5e-4, 20, 9560),
    "xl": (5e-4, 30, 2000), "xxl": (5e-4, 20, 2700),
}
# The original's micro-batch sizes (src/conf/batch_size/{250m,780m,3b,11b}.yaml).
MICRO_BATCH_SIZES = {
    "small": {"icl_cot": 25, "icl_ao": 35, "zs_cot": 40, "zs_ao": 60},
    "base": {"icl_cot": 25, "icl_ao": 35, "zs_cot": 40, "zs_ao": 60},
    "large": {"icl_cot": 8, "icl_ao": 12, "zs_cot": 18, "zs_ao": 30},
    "xl": {"icl_cot": 2, "icl_ao": 10, "zs_cot": 8, "zs_ao": 20},
    "xxl": {"icl_cot": 2, "icl_ao": 10, "zs_cot": 8, "zs_ao": 20},
}
# Examples per format: the paper's teacher set (207,135 chains of 7,473 questions), and ours
# without the 200 GSM8K dev questions (about 27.7 chains each).
TEACHER_SET_COUNTS = (
    {"icl_cot": 207_135, "icl_ao": 7_473, "zs_cot": 207_135, "zs_ao": 7_473},
    {"icl_cot": 201_591, "icl_ao": 7_273, "zs_cot": 201_591, "zs_ao": 7_273},
)


@pytest.mark.parametrize("variant", ["", "_distribution"])
@pytest.mark.parametrize("size", sorted(REPRODUCTION))
def test_experiment_reproduces_the_original_settings(size, variant):
  """Rate, accumulation and steps of the original's evaluated run, dropout off (it never calls
  model.train()), a checkpoint every 250 steps with none deleted before the run ends, and the
  in-loop eval on in-distribution (GSM8K dev) and OOD (MultiArith dev) sets, so the sweep finds
  both bests."""
  learning_rate, accumulation, steps = REPRODUCTION[size]
  gin_config.parse_gin([f"experiments/flan_t5_{size}_gsm8k{variant}.gin"], ["MODEL_DIR='/tmp/x'"],
                       [])
  try:
    macro = gin_config.macro
    assert macro("LEARNING_RATE") == learning_rate
    assert macro("TRAIN_STEPS") == steps
    # The original's batching, with a batch every step of its run fits.
    assert gin_config.bound_value("train/input_pipeline.DatasetConfig.micro_batches") is not None
    sizes = gin_config.bound_value("micro_batches.MicroBatchSettings.micro_batch_sizes")
    assert sizes == MICRO_BATCH_SIZES[size]
    assert gin_config.bound_value("micro_batches.MicroBatchSettings.accumulation") == accumulation
    rows_per_device = macro("BATCH_SIZE") // macro("NUM_MICROBATCHES")
    assert rows_per_device * macro("NUM_MICROBATCHES") == macro("BATCH_SIZE")
    for counts in TEACHER_SET_COUNTS:
      for seed in range(3):
        plan = micro_batches.MicroBatchPlan(counts, sizes, accumulation, seed)
        assert plan.rows_per_step(steps).max() <= macro("BATCH_SIZE"), (counts, seed)
    assert macro("DROPOUT_RATE") == 0.0
    assert gin.query_parameter("model_config.T5Config.dropout_rate").scoped_selector == (
        "DROPOUT_RATE/gin.macro")
    assert macro("CHECKPOINT_PERIOD") == macro("EVAL_PERIOD") == 250
    assert macro("KEEP_LAST_CHECKPOINTS") >= -(-steps // 250)  # every periodic one and the last
    tasks = macro("EVAL_TASKS")
    assert any(t.startswith("gsm8k_dev_") for t in tasks)
    assert any(t.startswith("multiarith_dev_") for t in tasks)
  finally:
    gin.clear_config()
