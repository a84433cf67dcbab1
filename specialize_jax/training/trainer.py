"""The training loop: one function, `train`, with every-N-steps hooks (log, evaluate, checkpoint).

Order of events, written down because users debug by it:
1. mesh from the partitioning config; optimizer and schedule; the abstract (sharded) train state;
2. restore: the latest checkpoint in `model_dir` (resume), else `initial_checkpoint_path` (params
   only, any format `specialize_jax.checkpoints.loading` reads, each process reading only its
   devices' slices: `load_checkpoint_sharded`), else scratch — the choice and the bytes read are
   logged;
3. the input iterator, fast-forwarded to the checkpoint's data position;
4. the compiled train step (first call timed and logged separately);
5. the loop: step; every `log_period` fetch metrics, write them and a progress line; every
   `eval_period` call `eval_fn`; every checkpoint period save (with the latest eval metrics, for
   best-N retention). Before any of these the losses since the last check must be finite, else the
   run stops naming the steps, without saving them;
6. a final checkpoint, then wait for asynchronous saves.

Preemption (`preemption`): on SIGTERM (or TPU maintenance) every process logs and saves the same
step, waits for the save and raises `preemption.Preempted`; the CLI prints `preempted at step N;
rerun the same command to resume` and exits 0. An evaluation due at that step is skipped (it would
spend the grace period); `specialize eval` or `sweep` can evaluate the saved step.
"""
import logging
import time
from typing import Callable, Dict, Mapping, Optional

import jax
import numpy as np

from specialize_jax.errors import ConfigError
from specialize_jax.data import feature_converters
from specialize_jax.data import storage
from specialize_jax.checkpoints import loading
from specialize_jax.model import models
from specialize_jax.training import checkpoint_manager
from specialize_jax.training import input_pipeline
from specialize_jax.training import metric_writers
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.training import preemption
from specialize_jax.training import train_state
from specialize_jax.training import train_step

EvalFn = Callable[[object, int], Mapping[str, float]]


def _mean_metrics(history) -> Dict[str, float]:
  fetched = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _check_finite(losses, last_checked_step: int, done: int,
                  checkpointer: checkpoint_manager.TrainCheckpointer) -> None:
  """Raises naming the steps when a loss since `last_checked_step` is not finite."""
  values = np.asarray(jax.device_get(losses), np.float64)
  if not np.all(np.isfinite(values)):
    raise FloatingPointError(
        f"Non-finite loss ({float(np.mean(values))}) between steps {last_checked_step + 1} and "
        f"{done}; nothing was saved from these steps. Lower the learning rate or check the data "
        f"(the last good checkpoint is {checkpointer.latest_step()}).")


def check_train_arguments(dataset: input_pipeline.DatasetConfig, num_train_steps: int,
                          num_microbatches: int,
                          gradient_reduction: str = "per_microbatch") -> None:
  """The checks `train` makes before reading data (`specialize plan` makes them too)."""
  train_step.check_gradient_reduction(gradient_reduction)
  if num_train_steps < 1:
    raise ConfigError(f"TRAIN_STEPS={num_train_steps} must be >= 1; set --gin.TRAIN_STEPS.")
  if num_microbatches < 1 or dataset.batch_size % num_microbatches:
    raise ConfigError(f"BATCH_SIZE={dataset.batch_size} is not divisible by NUM_MICROBATCHES="
                      f"{num_microbatches}; change --gin.NUM_MICROBATCHES or --gin.BATCH_SIZE.")


def train(model_dir: str,
          model: models.EncoderDecoderModel,
          dataset: input_pipeline.DatasetConfig,
          num_train_steps: int,
          optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig(),
          partitioner: partitioning.PartitioningConfig = partitioning.PartitioningConfig(),
          checkpoint: checkpoint_manager.CheckpointConfig = checkpoint_manager.CheckpointConfig(),
          num_microbatches: int = 1,
          gradient_reduction: str = "per_microbatch",
          seed: int = 0,
          initial_checkpoint_path: Optional[str] = None,
          log_period: int = 10,
          eval_period: int = 0,
          eval_fn: Optional[EvalFn] = None,
          tensorboard: bool = True,
          log: Callable[[str], None] = logging.info) -> Dict[str, float]:
  """Trains `model` to `num_train_steps` (absolute: a resumed run continues to the same end).

  `gradient_reduction`: where the gradient is reduced over the data axis, 'per_microbatch' or
  'once' (`train_step`'s module docstring).

  Returns the last logged train metrics plus the last eval metrics.
  """
  check_train_arguments(dataset, num_train_steps, num_microbatches, gradient_reduction)
  feature_converters.check_vocabulary_fits(input_pipeline.mixture_or_task(dataset),
                                             model.config.vocab_size)
  step_rows = input_pipeline.micro_batch_rows(dataset, num_train_steps, num_microbatches)
  if step_rows is not None:
    if model.loss_normalizing_factor is not None:
      raise ConfigError(
          f"The original's batching weighs every token by its micro-batch's token mean, so the "
          f"loss must be a plain sum; loss_normalizing_factor={model.loss_normalizing_factor!r} "
          "would divide it again. Unset it (models.EncoderDecoderModel.loss_normalizing_factor = "
          "None).")
    per_device = dataset.batch_size // num_microbatches
    log(f"The original's batching: a step holds {step_rows.mean():.1f} rows on average (at most "
        f"{int(step_rows.max())}) of {dataset.batch_size}; "
        f"{np.mean(-(-step_rows // per_device)):.1f} of {num_microbatches} device micro-batches "
        f"of {per_device} rows run per step, the rest are padding and skipped.")
  storage.makedirs(model_dir)
  mesh = partitioning.make_mesh(partitioner)
  partitioning.check_batch_divisible(dataset.batch_size, mesh, num_microbatches)
  rules = partitioner.logical_axis_rules
  tx = optimizers.make_optimizer(optimizer, num_train_steps)
  layout = partitioning.data_layout(mesh, dataset.batch_size)
  log(f"Data layout: this process feeds {layout.describe()} per step.")
  # The input pipeline reads its files now, so a missing one fails before anything compiles; a
  # resumed run builds it again at its saved position.
  batches = input_pipeline.TrainIterator(dataset, shards=layout.shards)
  rng = jax.random.PRNGKey(seed)
  init_rng, step_rng = jax.random.split(rng)
  abstract_state, state_shardings = train_state.abstract_train_state(model, tx, mesh, rules)

  def init_from_scratch():
    return train_state.create_train_state(model, tx, mesh, rules, init_rng)[0]

  def init_from_params(params):
    return train_state.create_train_state(model, tx, mesh, rules, init_rng,
                                          init_params_fn=lambda: params)[0]

  def load_params(path):
    # Each process reads only the slices its devices hold, straight into their shardings.
    _, params, stats = loading.load_checkpoint_sharded(
        path, lambda _: abstract_state.params, config=model.config)
    log(f"INITIAL_CHECKPOINT_PATH: {stats.describe()}.")
    return params

  checkpointer = checkpoint_manager.TrainCheckpointer(model_dir, checkpoint)
  state, data_position, source = checkpoint_manager.restore_or_initialize(
      checkpointer, abstract_state, init_from_scratch,
      initial_checkpoint_path=initial_checkpoint_path, load_params_fn=load_params, log=log,
      init_from_params_fn=init_from_params)
  start_step = int(jax.device_get(state.step))
  log(f"Starting at step {start_step} from {source}; training to step {num_train_steps}.")

  if data_position:
    batches = input_pipeline.TrainIterator(dataset, position=data_position, shards=layout.shards)
  step_fn = train_step.make_train_step(model, tx, state_shardings, mesh, num_microbatches,
                                       rules=rules, skip_empty_microbatches=step_rows is not None,
                                       gradient_reduction=gradient_reduction)
  writer = metric_writers.MetricWriter(model_dir, enable_tensorboard=tensorboard)
  progress = metric_writers.ProgressLogger(num_train_steps, start_step, log=log)
  # From here a SIGTERM saves and stops; before, it ends the process (nothing new to save).
  watch = preemption.PreemptionWatch()

  try:
    history, last_train, last_eval = [], {}, {}
    last_checked_step = start_step  # Losses of the steps up to here were finite.
    for step in range(start_step, num_train_steps):
      batch = partitioning.global_batch(next(batches), mesh, layout)
      if step == start_step:
        compile_start = time.perf_counter()
        state, metrics = step_fn(state, batch, step_rng)
        jax.block_until_ready(metrics)
        log(f"First step (compilation included) took {time.perf_counter() - compile_start:.1f} s.")
        # Rates from here on exclude input start-up and compilation.
        progress = metric_writers.ProgressLogger(num_train_steps, step + 1, log=log)
      else:
        # The step folds its own step number into the key: one key serves every step.
        state, metrics = step_fn(state, batch, step_rng)
      history.append(metrics)
      done = step + 1
      # Every process gets the same answer at the same step, so all save the same step.
      preempted = watch.reached(done) and done < num_train_steps
      log_now = done % log_period == 0 or done == num_train_steps or preempted
      save_now = checkpointer.due(done) or done == num_train_steps or preempted
      eval_now = (eval_fn is not None and eval_period and not preempted and
                  (done % eval_period == 0 or done == num_train_steps))

      if log_now or save_now or eval_now:
        # Before any checkpoint save too: a non-finite state is never saved (its steps need not
        # be logged ones).
        _check_finite([m['loss'] for m in history], last_checked_step, done, checkpointer)
        last_checked_step = done
      if log_now:
        last_train = _mean_metrics(history)
        history = []
        last_train.update(progress.log(done, last_train))
        writer.write(done, "train", last_train)
      if eval_now:
        eval_start = time.perf_counter()
        last_eval = dict(eval_fn(state.params, done))
        writer.write(done, "eval", last_eval)
        log(f"Evaluation at step {done} took {time.perf_counter() - eval_start:.1f} s: " +
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(last_eval.items())))
      if save_now:
        writer.flush()  # The records up to a checkpoint are stored before it is.
        checkpointer.save(done, state, batches.position(), metrics=last_eval if eval_now else None,
                          force=True)
      if preempted:
        checkpointer.wait_until_finished()
        log(f"Preempted: saved step {done} in {model_dir}.")
        raise preemption.Preempted(done, model_dir)

    checkpointer.wait_until_finished()
  finally:
    # Also on errors (a non-finite loss, an interrupt): finish pending saves, stop orbax's threads.
    watch.close()
    checkpointer.close()
    writer.close()
  return {**last_train, **{f"eval/{k}": v for k, v in last_eval.items()}}
