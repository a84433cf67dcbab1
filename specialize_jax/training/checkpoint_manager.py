"""Training checkpoints (orbax): save every N steps, keep the last N plus the best N, resume.

Terms:
  MODEL_DIR: the run directory. Checkpoints live directly in it, in T5X's layout, so that
    `specialize_jax.checkpoints.loading.load_checkpoint(MODEL_DIR)` (and `load_pretrained`) read the
    params of the latest step without knowing about training:

      MODEL_DIR/
        checkpoint_<step>/          one step (orbax CheckpointManager, step_prefix='checkpoint')
          state/                    the train state {step, params, opt_state}: an OCDBT PyTree
          meta/metadata             JSON {'step', 'data_position', 'metrics'}
          metrics/metrics           JSON {best_metric: value} (orbax's, for best-N retention;
                                    only with keep_best and eval metrics at that step)
          _CHECKPOINT_METADATA      orbax step metadata, with the commit timestamp
          commit_success.txt        orbax's commit marker, written last
        checkpoint_<step>.orbax-checkpoint-tmp-<n>/   a save in flight or cut short: never read,
                                    deleted by the next writer (`TrainCheckpointer`)

  train state: any pytree with `step`, `params` and `opt_state` (e.g. `train_state.TrainState`);
    params follow T5X's tree (`token_embedder/embedding`, `encoder/layers_0/...`), the names being
    part of the checkpoint format.
  data position: the JSON dict the input pipeline gives (`{'batches_consumed': N, 'seed': S}`),
    saved with each step so a resumed run continues the data where it stopped.
  committed step: a `checkpoint_<step>` directory with orbax's commit marker (or a commit
    timestamp in `_CHECKPOINT_METADATA`). Orbax writes a step into a temporary directory and
    renames it when complete (on object stores it writes the marker last instead), so a crash
    mid-save leaves the previous steps intact and the torn step uncommitted.
  bad step: a step that is uncommitted, or unreadable for certain: a file orbax wrote is missing
    or truncated (`state/_METADATA`, `meta/metadata`, array data: tensorstore's NOT_FOUND,
    OUT_OF_RANGE, DATA_LOSS), or the metadata is not valid JSON for this step. `restore` skips it
    for the next older step, warning with the step and the reason, and a writer moves it aside to
    `MODEL_DIR/bad_checkpoints/checkpoint_<step>.<uncommitted|unreadable>-<UTC time>/` (named in
    the warning; never deleted), so it neither counts among the last N nor blocks its number.
  read error: any other failure to restore a step (a storage error, a host out of memory, a train
    state that does not match the checkpoint). It is retried `restore_attempts` times with
    exponential backoff, then `CheckpointReadError` is raised: such a step is never skipped, moved
    or deleted, since a run that silently fell back would overwrite progress.

Retention: the last `keep_last` steps plus the best `keep_best` by `best_metric` (the union), via
orbax's `preservation_policy` (`LatestN` or `BestN`). Ties in the metric keep the later step;
steps saved without the metric are kept only while among the last `keep_last`.

Restore order (`restore_or_initialize`), logged: the latest committed step in MODEL_DIR (resume:
state, data position), else INITIAL_CHECKPOINT_PATH (params only, any format
`load_checkpoint` reads; fresh optimizer state, step 0), else scratch (`init_fn()`).

Multi-host: saving and restoring are collective. Every process must call `save`, `restore` and
`restore_or_initialize` with the same arguments (orbax synchronises processes inside, and each
writes its own shards); the JSON items are written by the primary process only, so the data
position must be the same on every process (it is for a per-process sharded pipeline counting
global batches). Process 0 decides which step to try (its listing, broadcast) and moves bad steps
aside; after each attempt the processes agree on the outcome (the worst of theirs), so all restore
the same step or all fail.
"""
import dataclasses
import difflib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from specialize_jax.errors import ConfigError
from specialize_jax.data import storage
from specialize_jax.checkpoints import directories
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import param_tree

STEP_PREFIX = 'checkpoint'  # T5X's `checkpoint_<step>`; `load_checkpoint` resolves it.
STATE_ITEM = 'state'  # First in `orbax_pytree.ITEM_NAMES`: `load_checkpoint` finds it.
META_ITEM = 'meta'
SOURCES = ('resume', 'initial_checkpoint', 'scratch')
BAD_SUBDIR = 'bad_checkpoints'  # Not `checkpoint_*`: orbax and `load_checkpoint` never list it.
# Files every committed step has; one missing means the step is damaged for certain.
REQUIRED_FILES = (f'{STATE_ITEM}/_METADATA', f'{META_ITEM}/metadata')
# Tensorstore status codes of damaged data (a missing or truncated file), not of a failing read.
DAMAGED_DATA_CODES = ('NOT_FOUND', 'OUT_OF_RANGE', 'DATA_LOSS')
_MAX_REASON_CHARS = 500
# Outcomes of one restore attempt, ordered: processes agree on the largest.
_RESTORED, _UNREADABLE, _FAILED = 0, 1, 2

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and what to keep.

  Attributes:
    period: save when `step % period == 0` (and whenever `save(..., force=True)`).
    keep_last: the most recent steps kept (>= 1).
    keep_best: steps kept for the best `best_metric`, besides the last ones (0: none).
    best_metric: the eval metric ranking steps, e.g. 'gsm8k_dev_icl_cot/accuracy'.
    best_mode: 'max' or 'min': whether a larger `best_metric` is better.
    async_save: write arrays in a background thread after copying them to the host.
    restore_attempts: tries of a step that fails with a read error (see the module docstring)
      before `CheckpointReadError`.
    restore_backoff_s: the wait after the first failed try, doubled after each next one.
  """
  period: int = 1000
  keep_last: int = 3
  keep_best: int = 0
  best_metric: Optional[str] = None
  best_mode: str = 'max'
  async_save: bool = True
  restore_attempts: int = 4
  restore_backoff_s: float = 2.0

  def __post_init__(self):
    if self.restore_attempts < 1 or self.restore_backoff_s < 0:
      raise ValueError(f'CheckpointConfig.restore_attempts={self.restore_attempts} must be >= 1 '
                       f'and restore_backoff_s={self.restore_backoff_s} >= 0; set '
                       '--gin.CheckpointConfig.restore_attempts / restore_backoff_s.')
    if self.period < 1:
      raise ConfigError(f'CheckpointConfig.period={self.period} must be >= 1; set '
                        '--gin.CheckpointConfig.period.')
    if self.keep_last < 1:
      raise ConfigError(f'CheckpointConfig.keep_last={self.keep_last} must be >= 1 (the latest '
                        'step is what a run resumes from); set --gin.CheckpointConfig.keep_last.')
    if self.keep_best < 0:
      raise ConfigError(f'CheckpointConfig.keep_best={self.keep_best} must be >= 0; set '
                        '--gin.CheckpointConfig.keep_best.')
    if self.keep_best and not self.best_metric:
      raise ConfigError(f'CheckpointConfig.keep_best={self.keep_best} needs a metric to rank '
                        'steps by; set --gin.CheckpointConfig.best_metric (e.g. '
                        '"gsm8k_dev_icl_cot/accuracy") or keep_best=0.')
    if self.best_mode not in ('max', 'min'):
      raise ConfigError(f'CheckpointConfig.best_mode={self.best_mode!r} must be "max" or "min"; '
                        'set --gin.CheckpointConfig.best_mode.')


def _to_json(value: Any) -> Any:
  """numpy / jax scalars and arrays as JSON values (for `json.dumps(default=...)`)."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serializable')


def _as_json(value: Any, what: str) -> Any:
  """A JSON round trip of `value`, so what restore returns equals what was saved."""
  try:
    return json.loads(json.dumps(value, default=_to_json))
  except (TypeError, ValueError) as e:
    raise ValueError(f'{what} must be JSON-serializable (numbers, strings, lists, dicts): '
                     f'{e}.') from e


class NoCheckpointError(ValueError):
  """MODEL_DIR holds no committed step (nothing to resume from)."""


class CheckpointReadError(RuntimeError):
  """A step could not be read after every retry; nothing was skipped, moved or deleted."""


class _DamagedStepError(ValueError):
  """The step's files are there but say something impossible (e.g. another step number)."""


def _primary_value(value: int) -> int:
  """Process 0's `value`, on every process."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _worst_outcome(outcome: int) -> int:
  """The largest of every process's `outcome` (see `_RESTORED` ...), on every process."""
  if jax.process_count() == 1:
    return outcome
  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _shorten(error: BaseException) -> str:
  text = f'{type(error).__name__}: {error}'
  return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + '...'


def _check_abstract_state(abstract_state: PyTree) -> None:
  """Every leaf must carry a sharding, so arrays are restored straight onto their devices."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  if not leaves:
    raise ValueError('abstract_state has no leaves; pass the abstract train state (shapes, dtypes '
                     'and shardings), e.g. from train_state.abstract_train_state.')
  for path, leaf in leaves:
    if getattr(leaf, 'sharding', None) is None or not hasattr(leaf, 'shape'):
      raise ValueError(
          f'abstract_state leaf {jax.tree_util.keystr(path, simple=True, separator="/")} '
          f'({leaf!r}) has no sharding; give '
          'every leaf a jax.ShapeDtypeStruct(shape, dtype, sharding=...) (see '
          'train_state.abstract_train_state) so it is restored onto its devices.')


class TrainCheckpointer:
  """Saves and restores train states in MODEL_DIR (see the module docstring for the layout)."""

  def __init__(self, model_dir: Union[str, os.PathLike],
               config: CheckpointConfig = CheckpointConfig(), read_only: bool = False):
    """Opens (and unless `read_only`, creates) MODEL_DIR.

    A writer removes temporary directories left by interrupted saves; a reader (e.g. an
    evaluation job beside the trainer) touches nothing.
    """
    # orbax writes only to absolute paths; a relative MODEL_DIR is relative to the working directory.
    self.directory = epath.Path(storage.absolute(model_dir))
    self.config = config
    policies = [checkpoint_managers.LatestN(n=config.keep_last)]
    best_fn = None
    if config.keep_best:
      best_fn = self._metric_value
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=config.best_mode == 'min', n=config.keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        step_prefix=STEP_PREFIX,
        # `save` decides when to save (period or force) and always forces orbax.
        save_interval_steps=0 if read_only else 1,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # Set so that orbax writes and reloads each step's metrics for BestN.
        best_fn=best_fn,
        best_mode=config.best_mode,
        keep_checkpoints_without_metrics=False,
        enable_async_checkpointing=config.async_save,
        # On an object store orbax's cleanup deletes every directory of MODEL_DIR without its
        # commit marker (eval/, tensorboard/, metrics.jsonl/, bad_checkpoints/ too), taking each
        # for a torn step. There a torn step keeps its final name and `restore` sets it aside, so
        # the cleanup runs only on local disks, where it removes `*.orbax-checkpoint-tmp-*` alone.
        cleanup_tmp_directories=not read_only and not storage.is_url(model_dir),
        read_only=read_only,
        create=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE_ITEM, META_ITEM))
    self.read_only = read_only

  def _metric_value(self, metrics: Mapping[str, Any]) -> float:
    """The ranking value for BestN; a missing or non-finite metric ranks last."""
    try:
      value = float(metrics[self.config.best_metric])
    except (KeyError, TypeError, ValueError):
      value = math.nan
    if math.isfinite(value):
      return value
    return -math.inf if self.config.best_mode == 'max' else math.inf

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / f'{STEP_PREFIX}_{step}'

  def _uncommitted_reason(self, step: int) -> Optional[str]:
    """Why `step` is not a committed checkpoint, or None when it is."""
    step_dir = self._step_dir(step)
    if directories.has_commit_record(step_dir):
      return None
    return (f'not committed: {step_dir} has neither {directories.COMMIT_MARKER} nor a commit '
            f'timestamp in {directories.STEP_METADATA_FILE} (a save that did not finish)')

  def all_steps(self) -> List[int]:
    """Committed steps, ascending (what `restore` may use; saves in flight are not included)."""
    return [s for s in sorted(self._manager.all_steps()) if self._uncommitted_reason(s) is None]

  def uncommitted_steps(self) -> Dict[int, str]:
    """Step directories without a commit (cut-short saves): step -> reason."""
    reasons = {s: self._uncommitted_reason(s) for s in sorted(self._manager.all_steps())}
    return {s: r for s, r in reasons.items() if r is not None}

  def latest_step(self) -> Optional[int]:
    """The latest committed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def wait_until_finished(self) -> None:
    """Blocks until asynchronous saves (and their deletions of old steps) are done."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for saves and releases orbax's threads."""
    self._manager.close()

  def _damage(self, step: int, error: BaseException) -> Optional[str]:
    """Why `error` shows `step` to be damaged for certain, or None (a read error: retry)."""
    step_dir = self._step_dir(step)
    missing = [name for name in REQUIRED_FILES if not (step_dir / name).exists()]
    if missing:
      return f'missing {", ".join(str(step_dir / name) for name in missing)}: {_shorten(error)}'
    text = str(error)
    if (isinstance(error, (FileNotFoundError, json.JSONDecodeError, _DamagedStepError)) or
        any(text.startswith(code + ':') for code in DAMAGED_DATA_CODES)):
      return _shorten(error)
    return None

  def _set_aside(self, step: int, kind: str, reason: str) -> None:
    """Warns that `step` is skipped; a writer's process 0 also moves it into BAD_SUBDIR."""
    if self.read_only or jax.process_index() != 0 or not self._step_dir(step).exists():
      logging.warning('Checkpoint step %d in %s is bad and is skipped (%s).', step,
                      self.directory, reason)
      return
    name = f'{self._step_dir(step).name}.{kind}-{time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}'
    target = self.directory / BAD_SUBDIR / name
    for n in range(1, 1000):  # The same step may go bad twice within a second.
      if not target.exists():
        break
      target = self.directory / BAD_SUBDIR / f'{name}-{n}'
    target.parent.mkdir(parents=True, exist_ok=True)
    self._step_dir(step).rename(target)
    logging.warning('Checkpoint step %d in %s is bad and is skipped (%s); moved it to %s.', step,
                    self.directory, reason, target)

  def _restore_step(self, step: int, abstract_state: PyTree) -> Tuple[Any, Optional[str]]:
    """`(restored, None)`, or `(None, why)` when `step` is damaged for certain on some process;
    raises `CheckpointReadError` when read errors persist through every retry."""
    attempts = self.config.restore_attempts
    for attempt in range(1, attempts + 1):
      restored, error, damage = None, None, None
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                META_ITEM: ocp.args.JsonRestore()}))
        meta = restored[META_ITEM]
        if not isinstance(meta, Mapping) or meta.get('step') != step:
          raise _DamagedStepError(f'{META_ITEM} item {meta!r} does not record step {step}')
      # Anything may fail a read; `_damage` tells a damaged step from a read to retry, and what
      # is neither is re-raised below as CheckpointReadError.
      except Exception as e:  # pylint: disable=broad-except
        error = e
        damage = self._damage(step, e)
      outcome = _worst_outcome(
          _RESTORED if error is None else _UNREADABLE if damage else _FAILED)
      if outcome == _RESTORED:
        return restored, None
      if outcome == _UNREADABLE:
        return None, damage or 'unreadable on another process (see its log)'
      if attempt < attempts:
        wait_s = self.config.restore_backoff_s * 2 ** (attempt - 1)
        logging.warning('Reading checkpoint step %d of %s failed (try %d of %d: %s); retrying in '
                        '%.1f s.', step, self.directory, attempt, attempts,
                        _shorten(error) if error else 'on another process', wait_s)
        time.sleep(wait_s)
    raise CheckpointReadError(
        f'Reading checkpoint step {step} of {self.directory} failed {attempts} times; last '
        f'error: {_shorten(error) if error else "on another process (see its log)"}. Nothing was '
        'skipped, moved or deleted. If the storage is reachable again, rerun the same command; if '
        'the train state changed (model, optimizer), restore it as it was or set a new '
        '--gin.MODEL_DIR; more tries: --gin.CheckpointConfig.restore_attempts.') from error

  def due(self, step: int) -> bool:
    """Whether `step` is a periodic save step."""
    return step % self.config.period == 0

  def save(self, step: int, state: PyTree, data_position: Mapping[str, Any],
           metrics: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Saves `state` at `step` when `step % period == 0` or `force`; returns whether it did.

    Asynchronous with `async_save`: arrays are copied to the host before this returns, so the
    state may be donated to the next train step. `metrics` (eval metrics of this step) rank the
    step for best-N retention; without them the step is kept only while among the last N.
    """
    if not force and not self.due(step):
      return False
    if self.read_only:
      raise ValueError(f'This TrainCheckpointer of {self.directory} is read-only; open it with '
                       'read_only=False to save.')
    data_position = _as_json(dict(data_position), 'data_position')
    metrics = _as_json(dict(metrics), 'metrics') if metrics is not None else None
    ranking_metrics = None
    if self.config.keep_best and metrics is not None:
      if self.config.best_metric not in metrics:
        close = difflib.get_close_matches(self.config.best_metric, list(metrics), n=3)
        raise ValueError(
            f'Eval metrics at step {step} lack best_metric={self.config.best_metric!r} '
            f'(closest: {close}; all: {sorted(metrics)}); set '
            '--gin.CheckpointConfig.best_metric to one of them.')
      ranking_metrics = {self.config.best_metric: metrics[self.config.best_metric]}
    self._manager.wait_until_finished()
    existing = self._manager.all_steps()
    if existing and max(existing) >= step:
      raise ValueError(
          f'{self.directory} already holds step {max(existing)} >= step {step}; a run writing '
          'here must resume from its latest step (restore_or_initialize), or set a new '
          '--gin.MODEL_DIR.')
    meta = {'step': int(step), 'data_position': data_position, 'metrics': metrics}
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                   META_ITEM: ocp.args.JsonSave(meta)}),
        metrics=ranking_metrics, force=True)

  def restore(self, abstract_state: PyTree) -> Tuple[PyTree, Dict[str, Any], int]:
    """(state, data_position, step) of the latest step that restores, newest first.

    Arrays go straight into the shardings of `abstract_state` (each device reads its shards;
    nothing is gathered on one device). Uncommitted and damaged steps are skipped (and moved
    aside by a writer), read errors retried then raised (see the module docstring);
    `NoCheckpointError` when there is no committed step, `ValueError` when every one was bad.
    """
    _check_abstract_state(abstract_state)
    self._manager.wait_until_finished()
    self._manager.reload()
    reasons: Dict[int, str] = {}
    if jax.process_index() == 0:
      for step, reason in self.uncommitted_steps().items():
        reasons[step] = reason
        self._set_aside(step, 'uncommitted', reason)
    while True:
      # Process 0's newest committed step not yet skipped, or -1; every process tries that one.
      self._manager.reload()
      remaining = [s for s in self.all_steps() if s not in reasons]
      step = _primary_value(remaining[-1] if remaining else -1)
      if step < 0:
        break
      restored, reason = self._restore_step(step, abstract_state)
      if reason is not None:
        reasons[step] = reason
        self._set_aside(step, 'unreadable', reason)
        continue
      if reasons:
        logging.warning('Restored step %d of %s instead of the bad newer steps %s.', step,
                        self.directory, sorted(s for s in reasons if s > step))
      self._manager.reload()  # Forget the steps moved aside.
      meta = restored[META_ITEM]
      return restored[STATE_ITEM], dict(meta.get('data_position') or {}), step
    self._manager.reload()
    committed_bad = {s: r for s, r in reasons.items() if not r.startswith('not committed')}
    if not committed_bad:
      raise NoCheckpointError(f'No committed checkpoint steps in {self.directory} to restore.')
    lines = '\n'.join(f'  step {s}: {r}' for s, r in sorted(reasons.items()))
    where = ('' if self.read_only else
             f'They were moved to {self.directory / BAD_SUBDIR}, so a rerun starts afresh. ')
    raise ValueError(f'No checkpoint step in {self.directory} restores:\n{lines}\n{where}'
                     'Repair these steps, or set a new --gin.MODEL_DIR.')


def _place_params(params: PyTree, abstract_params: PyTree, source: str) -> PyTree:
  """Host params onto the devices of `abstract_params`'s shardings, shard by shard."""
  def flat_shapes(tree):
    return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

  param_tree.check_shapes(
      flat_shapes(params), flat_shapes(abstract_params), source,
      hint='load_params_fn must return the params tree of the model being trained '
      '(abstract_state.params); check INITIAL_CHECKPOINT_PATH and the model config.')
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(abstract_params):
    raise ValueError(f'{source}: the params tree has the right names and shapes but a different '
                     'container structure than abstract_state.params (e.g. a list for a dict).')

  def place(value, abstract):
    if isinstance(value, jax.Array):
      return jax.device_put(value.astype(abstract.dtype), abstract.sharding)
    host = np.asarray(value, dtype=abstract.dtype)
    return jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                        lambda index: host[index])

  return jax.tree_util.tree_map(place, params, abstract_params)


def restore_or_initialize(
    model_dir: Union[str, os.PathLike, TrainCheckpointer],
    abstract_state: PyTree,
    init_fn: Callable[[], PyTree],
    initial_checkpoint_path: Optional[str] = None,
    load_params_fn: Optional[Callable[[str], PyTree]] = None,
    log: Callable[[str], Any] = logging.info,
    init_from_params_fn: Optional[Callable[[PyTree], PyTree]] = None,
) -> Tuple[PyTree, Optional[Dict[str, Any]], str]:
  """(state, data_position, source) by the written-down order: resume, initial checkpoint, scratch.

  Args:
    model_dir: MODEL_DIR, or the `TrainCheckpointer` the loop saves with (preferred: a writer
      moves bad steps aside, a read-only one only skips them).
    abstract_state: the train state's shapes, dtypes and shardings (restore targets).
    init_fn: () -> a sharded train state from scratch (random params, fresh optimizer, step 0).
    initial_checkpoint_path: INITIAL_CHECKPOINT_PATH, used only when MODEL_DIR has no committed
      step: params only (HF, T5X or orbax), optimizer state fresh.
    load_params_fn: path -> params tree (default: `load_checkpoint_sharded` into
      `abstract_state.params`, architecture inferred); pass one that checks the model config.
    log: called with one line saying which source was used.
    init_from_params_fn: placed params -> train state with a fresh optimizer; default
      `init_fn().replace(params=params)` (initialises random params once, then drops them).

  Returns:
    The state, the data position (None unless resumed: start the data from the beginning) and
    the source, one of `SOURCES`.
  """
  checkpointer = model_dir if isinstance(model_dir, TrainCheckpointer) else TrainCheckpointer(
      model_dir, read_only=True)
  try:
    state, data_position, step = checkpointer.restore(abstract_state)
    log(f'Resuming from step {step} of {checkpointer.directory} (data position '
        f'{data_position}).')
    return state, data_position, 'resume'
  except NoCheckpointError:
    pass  # Nothing committed (uncommitted steps were skipped with a warning): start afresh.
  finally:
    if checkpointer is not model_dir:
      checkpointer.close()

  if initial_checkpoint_path:
    _check_abstract_state(abstract_state)
    if load_params_fn is None:  # Each process reads only its devices' slices.
      params = loading.load_checkpoint_sharded(
          initial_checkpoint_path, lambda _: abstract_state.params)[1]
    else:
      params = load_params_fn(initial_checkpoint_path)
    params = _place_params(params, abstract_state.params,
                           f'INITIAL_CHECKPOINT_PATH={initial_checkpoint_path}')
    if init_from_params_fn is not None:
      state = init_from_params_fn(params)
    else:
      state = init_fn().replace(params=params)
    log(f'No checkpoint in {checkpointer.directory}: initialized params from '
        f'INITIAL_CHECKPOINT_PATH={initial_checkpoint_path}; fresh optimizer state, step 0.')
    return state, None, 'initial_checkpoint'

  state = init_fn()
  log(f'No checkpoint in {checkpointer.directory} and no INITIAL_CHECKPOINT_PATH: initialized '
      'from scratch.')
  return state, None, 'scratch'
