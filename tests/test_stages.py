"""The demo's cached stages: reused when nothing changed, moved aside (never deleted) when a setting
changed, resumed when interrupted with the same settings."""
import json
import os

import pytest

from specialize_jax.demo import stages
from specialize_jax.demo import world

pytestmark = pytest.mark.slow

SHORT = ("TRAIN_STEPS = 2", "CHECKPOINT_PERIOD = 2", "WARMUP_STEPS = 1", "BATCH_SIZE = 8",
         "LOG_PERIOD = 1")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  from specialize_jax.tasks import world as world_tasks  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("data") / "world"
  world.write_world(directory, world.WorldSize.quick())
  world_tasks.register_world_tasks(str(directory))
  return directory


def test_a_stage_is_reused_moved_aside_on_a_change_and_resumed(world_dir, tmp_path):
  digest = world.manifest_digest(world_dir)
  model_dir = tmp_path / "pretrain"
  stage = stages.Stage("pretrain", "demo/pretrain.gin", str(model_dir), SHORT)
  first = stages.run_stage(stage, digest)
  assert not first.reused and os.path.isdir(first.checkpoint)
  assert json.loads((model_dir / stages.STAGE_FILE).read_text())["finished"] is True

  again = stages.run_stage(stage, digest)
  assert again.reused and again.key == first.key

  # Another world (its digest) or another setting: another key; the old run is kept aside.
  changed = stages.run_stage(stages.Stage("pretrain", "demo/pretrain.gin", str(model_dir),
                                          SHORT + ("LEARNING_RATE = 1e-3",)), digest)
  assert not changed.reused and changed.key != first.key
  stale = tmp_path / f"pretrain.stale-{first.key}"
  assert (stale / "checkpoint_2").is_dir()
  assert json.loads((stale / stages.STAGE_FILE).read_text())["key"] == first.key

  # Interrupted with the same settings (not finished): the run resumes instead of starting over.
  record = json.loads((model_dir / stages.STAGE_FILE).read_text())
  (model_dir / stages.STAGE_FILE).write_text(json.dumps(dict(record, finished=False)))
  resumed = stages.run_stage(stages.Stage("pretrain", "demo/pretrain.gin", str(model_dir),
                                          SHORT + ("LEARNING_RATE = 1e-3",)), digest)
  assert not resumed.reused and resumed.key == changed.key
  assert not list(tmp_path.glob("pretrain.stale-*-2"))  # Nothing more moved aside.
  assert json.loads((model_dir / stages.STAGE_FILE).read_text())["finished"] is True
