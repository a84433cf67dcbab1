"""One cached stage of `specialize demo`: a training run from gin files, rebuilt only when what it
depends on changes.

Terms:
  stage key: a digest of the stage's operative gin configuration (`gin.config_str()` after parsing
    its files and bindings, which holds every setting and the start checkpoint's path), the world's
    manifest digest and the keys of the stages it starts from. It is written to
    `MODEL_DIR/STAGE.json` before training (`finished: false`) and again once the run has finished.
  reuse: a directory whose `STAGE.json` holds the same key, finished, with its final checkpoint
    committed, is reused without training; the same key unfinished (an interrupted run) resumes
    from its latest checkpoint, as `specialize train` does. A directory with another key, or with
    checkpoints but no `STAGE.json`, is moved aside (`MODEL_DIR.stale-<old key>[-N]`, never deleted)
    and the run starts over.
"""
import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Optional, Sequence

from specialize_jax.checkpoints import directories
from specialize_jax.data import storage
from specialize_jax.jobs import gin_config

STAGE_FILE = "STAGE.json"


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training run of the demo: its gin file, extra bindings and where it lives."""
  name: str
  gin_file: str
  model_dir: str
  bindings: Sequence[str] = ()
  upstream_keys: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class StageResult:
  name: str
  model_dir: str
  checkpoint: str  # The final checkpoint's directory.
  key: str
  reused: bool
  seconds: float


def _final_checkpoint(model_dir: str, steps: int) -> str:
  return os.path.join(model_dir, f"checkpoint_{steps}")


def _read_stage(model_dir: str) -> Optional[dict]:
  try:
    with open(os.path.join(model_dir, STAGE_FILE), encoding="utf-8") as f:  # local: demo dirs
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_stage(model_dir: str, key: str, stage: Stage, final: str, finished: bool) -> None:
  os.makedirs(model_dir, exist_ok=True)
  text = json.dumps({"key": key, "finished": finished, "gin_file": stage.gin_file,
                     "bindings": list(stage.bindings), "checkpoint": final}, indent=2)
  with storage.atomic_write(os.path.join(model_dir, STAGE_FILE)) as f:
    f.write(text + "\n")


def run_stage(stage: Stage, world_digest: str) -> StageResult:
  """Trains `stage` unless an identical finished run is there; returns where its checkpoint is."""
  import gin  # pylint: disable=g-import-not-at-top
  from specialize_jax.jobs import runs  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  model_dir = os.path.abspath(stage.model_dir)
  gin_config.parse_gin([stage.gin_file], [f"MODEL_DIR = '{model_dir}'", *stage.bindings], [])
  try:
    steps = int(gin_config.macro("TRAIN_STEPS"))
    key = hashlib.sha256("\n".join([gin.config_str(), world_digest, *stage.upstream_keys])
                         .encode("utf-8")).hexdigest()[:16]
    recorded = _read_stage(model_dir)
    final = _final_checkpoint(model_dir, steps)
    same = recorded is not None and recorded.get("key") == key
    if same and recorded.get("finished") and directories.is_committed_step_dir(final):
      logging.info("Stage %s: reusing %s (key %s).", stage.name, model_dir, key)
      return StageResult(stage.name, model_dir, final, key, True, time.perf_counter() - start)
    if not same and os.path.isdir(model_dir) and os.listdir(model_dir):
      old = (recorded or {}).get("key", "unknown")
      stale, copy = f"{model_dir}.stale-{old}", 1
      while os.path.exists(stale):
        copy += 1
        stale = f"{model_dir}.stale-{old}-{copy}"
      logging.info("Stage %s: settings changed (key %s, was %s); moving the old run to %s.",
                   stage.name, key, old, stale)
      os.replace(model_dir, stale)
    _write_stage(model_dir, key, stage, final, finished=False)
    gin_config.write_config(model_dir)
    gin.get_configurable(runs.train)()
  finally:
    gin.clear_config()
  if not directories.is_committed_step_dir(final):
    raise RuntimeError(f"Stage {stage.name} finished without its final checkpoint {final}.")
  _write_stage(model_dir, key, stage, final, finished=True)
  return StageResult(stage.name, model_dir, final, key, False, time.perf_counter() - start)
