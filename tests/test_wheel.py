"""A wheel install works away from the repository: it carries the gin configs and the task
registrations inside the package, so `specialize` finds them from any directory.

The wheel is built from a copy of the working tree, installed without dependencies into a fresh
virtualenv that sees this environment's packages (JAX, SeqIO, ...), and every command runs with a
working directory outside the repository. The editable install of the checkout stays visible to
that virtualenv too, so the test first checks that Python imports the wheel's copy.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

from specialize_jax.demo import synthetic

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_LITTER = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                      ".pytest_cache")
LOCAL_OUTPUTS = {"runs", "data"}  # local: the checkout's own run and data folders, at its top only


def _not_copied(directory, names):
  top = {name for name in names if name in LOCAL_OUTPUTS} if directory == str(ROOT) else set()
  return BUILD_LITTER(directory, names) | top


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(virtualenv bin dir, environment, outside working dir) with the wheel installed."""
  work = tmp_path_factory.mktemp("wheel")
  source = work / "source"
  shutil.copytree(ROOT, source, ignore=_not_copied)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--wheel-dir", str(work / "dist"), str(source)],
                 check=True, capture_output=True, text=True, timeout=600)
  wheels = list((work / "dist").glob("specialize_jax-*.whl"))
  assert len(wheels) == 1, wheels
  venv.create(work / "venv", system_site_packages=True, with_pip=False)
  bin_dir = work / "venv" / "bin"
  subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install",
                  "--no-deps", "--no-index", str(wheels[0])],
                 check=True, capture_output=True, text=True, timeout=600)
  outside = work / "elsewhere"
  data = outside / "data"
  synthetic.write_demo_data(data / "demo", num_train=200, num_eval=8, seed=0)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env.update(SPECIALIZE_DATA_DIR=str(data), JAX_PLATFORMS="cpu",
             PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
  return bin_dir, env, outside


def _run(installed, *argv, timeout=600):
  bin_dir, env, outside = installed
  return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=outside, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_configs_and_tasks_and_no_top_level_tasks(installed):
  done = _run(installed, "python", "-c",
              "import importlib.util, pathlib, specialize_jax, specialize_jax.tasks;"
              "print(specialize_jax.__file__); print(specialize_jax.tasks.__file__);"
              "print(importlib.util.find_spec('tasks'));"
              "from specialize_jax.jobs import gin_config; print(gin_config.SHIPPED_GIN_DIR)")
  assert done.returncode == 0, done.stderr[-3000:]
  package, tasks, top_level_tasks, gin_dir = done.stdout.split()
  site = str(installed[0].parent / "lib")
  assert package.startswith(site) and tasks.startswith(site), done.stdout
  assert top_level_tasks == "None"
  assert gin_dir.startswith(site)
  assert (pathlib.Path(gin_dir) / "experiments" / "flan_t5_base_gsm8k.gin").is_file()
  assert (pathlib.Path(gin_dir) / "t5x" / "specialize.gin").is_file()
  # `specialize report --reference fu2023_flan_t5` finds the paper's numbers by name.
  assert (pathlib.Path(gin_dir) / "reference" / "fu2023_flan_t5.json").is_file()


def test_tasks_lists_the_registrations(installed):
  done = _run(installed, "specialize", "tasks", "--filter", "gsm8k_dev")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "gsm8k_dev_zs_cot" in done.stdout.split()


def test_plan_reads_a_shipped_experiment(installed):
  done = _run(installed, "specialize", "plan", "--gin_file=experiments/flan_t5_base_gsm8k.gin",
              "--no_compile")
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith("Topology "), done.stdout[:500]
  assert "verdict: fits" in done.stdout, done.stdout[-2000:]


def test_train_runs_a_few_steps_of_the_demo(installed):
  done = _run(installed, "specialize", "train", "--gin_file=experiments/demo_cpu.gin",
              '--gin.MODEL_DIR="runs/wheel"', "--gin.TRAIN_STEPS=3", "--gin.WARMUP_STEPS=1",
              "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=3")
  assert done.returncode == 0, done.stderr[-3000:]
  run_dir = installed[2] / "runs" / "wheel"
  assert (run_dir / "config.gin").is_file()
  assert (run_dir / "checkpoint_3" / "state").is_dir(), sorted(p.name for p in run_dir.iterdir())


def test_eval_reads_the_step_through_a_relative_path(installed):
  """After `train` above: a relative CHECKPOINT_PATH, as the docs' commands write it."""
  done = _run(installed, "specialize", "eval", "--gin_file=runs/eval.gin",
              "--gin_file=models/demo_tiny.gin", '--gin.CHECKPOINT_PATH="runs/wheel/checkpoint_3"',
              "--gin.EVAL_TASKS=('demo_id_cot',)", "--gin.EVAL_FEATURE_LENGTHS={'inputs': 256, 'targets': 80}",
              "--gin.EVAL_BATCH_SIZE=8", "--gin.EVAL_MAX_DECODE_LENGTH=8")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "demo_id_cot" in done.stdout + done.stderr
