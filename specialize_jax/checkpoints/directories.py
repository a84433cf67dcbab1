"""Finding checkpoints: which format a path holds, which step to read, whether a step finished.

A checkpoint path is one of:
  a model directory: holds step directories, `checkpoint_<N>` (T5X, our trainer) or `<N>` (an
    orbax CheckpointManager's default); it resolves to the committed step with the largest N.
  a step directory: an HF directory (`config.json`), a T5X legacy step (a msgpack `checkpoint`
    file), an orbax PyTree checkpoint (`_METADATA`, `manifest.ocdbt`), or an orbax
    CheckpointManager step holding one such PyTree per item (`state`, `params`, `default`, ...).
  a file: T5X's `checkpoint` or HF's `config.json`, standing for its directory.

Committed step: an orbax CheckpointManager finishes a step by writing `COMMIT_MARKER` (or, on some
file systems, a commit timestamp in `STEP_METADATA_FILE`); a step with `STEP_METADATA_FILE` but
neither was cut short and is never read. A step directory no CheckpointManager wrote (T5X,
`save_orbax`) has no `STEP_METADATA_FILE` and counts as committed.
"""
import json
import logging
import os
import re
from typing import Optional, Tuple

from etils import epath

from specialize_jax.checkpoints import hf
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.checkpoints import t5x_legacy
from specialize_jax.errors import ConfigError

FORMATS = ('hf', 't5x', 'orbax')
# Written last by an orbax CheckpointManager when a step is complete.
COMMIT_MARKER = 'commit_success.txt'
# An orbax CheckpointManager's step metadata; holds `commit_timestamp_nsecs` once committed.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
_STEP_DIR_NAME = re.compile(r'(?:checkpoint_)?(\d+)')


def has_commit_record(step_dir: os.PathLike) -> bool:
  """Whether a step directory has orbax's commit marker or a commit timestamp."""
  step_dir = epath.Path(step_dir)
  if (step_dir / COMMIT_MARKER).exists():
    return True
  metadata = step_dir / STEP_METADATA_FILE
  if not metadata.exists():
    return False
  try:
    return bool(json.loads(metadata.read_text()).get('commit_timestamp_nsecs'))
  except ValueError:
    return False


def is_committed_step_dir(step_dir: os.PathLike) -> bool:
  """Whether a step directory is finished: orbax's commit marker or commit timestamp, or a step
  directory no CheckpointManager wrote (no `STEP_METADATA_FILE`: T5X, `save_orbax`)."""
  step_dir = epath.Path(step_dir)
  return has_commit_record(step_dir) or not (step_dir / STEP_METADATA_FILE).exists()


def _latest_step_dir(path: epath.Path) -> Optional[epath.Path]:
  """The committed `checkpoint_<N>` (T5X) or `<N>` (orbax CheckpointManager) child with the
  largest N; uncommitted ones (a save cut short) are skipped with a warning."""
  steps = []
  for child in path.iterdir():
    match = _STEP_DIR_NAME.fullmatch(child.name)
    if match and child.is_dir():
      steps.append((int(match.group(1)), child))
  for _, step_dir in sorted(steps, key=lambda s: s[0], reverse=True):
    if is_committed_step_dir(step_dir):
      return step_dir
    logging.warning('Skipping %s: the save did not finish (no %s and no commit timestamp).',
                    step_dir, COMMIT_MARKER)
  return None


def _is_orbax_dir(path: epath.Path) -> bool:
  return any((path / marker).exists() for marker in orbax_pytree.MARKERS)


def _orbax_item_dir(path: epath.Path) -> Optional[epath.Path]:
  """The PyTree item directory inside an orbax step directory, if any."""
  names = orbax_pytree.ITEM_NAMES
  children = [path / name for name in names] + sorted(
      (c for c in path.iterdir() if c.name not in names), key=lambda c: c.name)
  for child in children:
    if child.is_dir() and _is_orbax_dir(child):
      return child
  return None


def resolve_checkpoint(path: os.PathLike, fmt: str = 'auto') -> Tuple[str, epath.Path]:
  """Returns (format, concrete path) for a checkpoint file, step directory or model directory.

  A model directory resolves to its latest committed `checkpoint_<N>` (or orbax `<N>`) step, as
  in T5X. `fmt` ('auto' or one of `FORMATS`) restricts what is recognised.
  """
  if fmt not in FORMATS + ('auto',):
    raise ConfigError(f'Unknown checkpoint format {fmt!r}; use one of {FORMATS} or "auto".')
  path = epath.Path(path)
  if not path.exists():
    raise ConfigError(f'Checkpoint path {path} does not exist; check the path (CHECKPOINT_PATH, '
                      'INITIAL_CHECKPOINT_PATH or the command line argument).')
  if not path.is_dir():
    if path.name == t5x_legacy.CHECKPOINT_FILE and fmt in ('auto', 't5x'):
      return 't5x', path.parent
    if path.name == hf.CONFIG_FILE and fmt in ('auto', 'hf'):
      return 'hf', path.parent
    raise ConfigError(f'{path} is a file; pass the checkpoint directory (an HF directory with '
                      f'{hf.CONFIG_FILE}, a T5X checkpoint_<step> directory or an orbax '
                      'directory).')
  for _ in range(3):  # model dir -> step dir -> orbax item dir
    if (path / hf.CONFIG_FILE).exists() and fmt in ('auto', 'hf'):
      return 'hf', path
    if (path / t5x_legacy.CHECKPOINT_FILE).exists() and fmt in ('auto', 't5x'):
      return 't5x', path
    if _is_orbax_dir(path) and fmt in ('auto', 'orbax'):
      return 'orbax', path
    item_dir = _orbax_item_dir(path) if fmt in ('auto', 'orbax') else None
    if item_dir is not None:
      path = item_dir
      continue
    step_dir = _latest_step_dir(path)
    if step_dir is None:
      break
    logging.info('Using the latest step directory %s.', step_dir)
    path = step_dir
  wanted = {'auto': 'any known format', 'hf': f'{hf.CONFIG_FILE} (HF)',
            't5x': f'a msgpack "{t5x_legacy.CHECKPOINT_FILE}" file (T5X)',
            'orbax': f'orbax metadata {orbax_pytree.MARKERS}'}[fmt]
  raise ConfigError(f'No checkpoint in {path}: expected {wanted}. Point at the HF directory, the '
                    'T5X checkpoint_<step> directory or the orbax checkpoint directory.')


def detect_format(path: os.PathLike) -> str:
  """'hf', 't5x' or 'orbax' for a checkpoint path (see `resolve_checkpoint`)."""
  return resolve_checkpoint(path)[0]
