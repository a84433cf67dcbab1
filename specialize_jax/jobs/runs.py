"""The jobs the `specialize` command runs, as functions gin configures (like T5X's `train.py`):
`train` (with evaluation in the loop), `evaluate` (one checkpoint or a whole run directory) and
`infer`. They only assemble the layers below; the CLI parses gin and calls them.

Decode dtype: `train` evaluates in its model's compute dtype; `evaluate` and `infer` decode in
`dtype` (DECODE_DTYPE) when given, else in `model`'s (MODEL), else in the dtype of the model the
checkpoint's run trained (its MODEL_DIR/config.gin), else float32 (`decode_dtype`). So a checkpoint
scores the same in the training loop and in `specialize eval`.
"""
import logging
from typing import Dict, Optional

from specialize_jax.jobs import gin_config
from specialize_jax.evaluation import evaluator as evaluator_lib
from specialize_jax.evaluation import inference
from specialize_jax.model import models
from specialize_jax.training import checkpoint_manager
from specialize_jax.training import input_pipeline
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning
from specialize_jax.training import trainer


def _flatten(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  return {f"{task}/{name}": value for task, metrics in results.items()
          for name, value in metrics.items()}


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
          eval_config: Optional[evaluator_lib.EvalConfig] = None,
          tensorboard: bool = True) -> Dict[str, float]:
  """Trains, evaluating `eval_config.task_names` every `eval_period` steps (greedy decoding in the
  model's compute dtype); per-task metrics and predictions go to `model_dir/eval/`."""
  eval_fn = None
  if eval_config is not None and eval_config.task_names and eval_period:
    # The trainer's mesh (the same devices and axes): the loop's params are decoded in the
    # shardings they are trained in, batches split over `data`.
    evaluator = evaluator_lib.Evaluator(model, eval_config,
                                        mesh=partitioning.make_mesh(partitioner),
                                        logical_axis_rules=partitioner.logical_axis_rules)
    eval_dir = f"{model_dir}/eval"
    eval_fn = lambda params, step: _flatten(evaluator.evaluate(params, step, output_dir=eval_dir))
  return trainer.train(model_dir, model, dataset, num_train_steps, optimizer=optimizer,
                       partitioner=partitioner, checkpoint=checkpoint,
                       num_microbatches=num_microbatches,
                       gradient_reduction=gradient_reduction, seed=seed,
                       initial_checkpoint_path=initial_checkpoint_path, log_period=log_period,
                       eval_period=eval_period, eval_fn=eval_fn, tensorboard=tensorboard)


def decode_dtype(checkpoint_path: str, model: Optional[models.EncoderDecoderModel],
                 dtype: Optional[str]) -> str:
  """`dtype`, else `model`'s compute dtype, else that of the model the checkpoint's run trained,
  else float32 (see the module docstring)."""
  if dtype is None and model is None:
    dtype = gin_config.recorded_model_dtype(checkpoint_path)
  return evaluator_lib.decode_dtype(dtype, None if model is None else model.config)


def evaluate(checkpoint_path: str, eval_config: evaluator_lib.EvalConfig,
             model: Optional[models.EncoderDecoderModel] = None,
             partitioner: partitioning.PartitioningConfig = partitioning.PartitioningConfig(),
             dtype: Optional[str] = None):
  """Evaluates one checkpoint, or every checkpoint of a run directory (resumable), on the mesh
  `partitioner` gives (params read straight into the trainer's shardings, batches on `data`), in
  `decode_dtype(checkpoint_path, model, dtype)`."""
  results = evaluator_lib.evaluate_checkpoints(
      checkpoint_path, eval_config, model_config=None if model is None else model.config,
      mesh=partitioning.make_mesh(partitioner),
      logical_axis_rules=partitioner.logical_axis_rules,
      dtype=decode_dtype(checkpoint_path, model, dtype))
  logging.info("Evaluation results: %s", results)
  return results


def infer(checkpoint_path: str, output_path: str, inputs: str, vocabulary_path: Optional[str] = None,
          batch_size: int = 32, max_decode_length: int = 256, decode_method: str = "greedy",
          partitioner: partitioning.PartitioningConfig = partitioning.PartitioningConfig(),
          model: Optional[models.EncoderDecoderModel] = None, dtype: Optional[str] = None):
  """Writes predictions JSONL for a registered task name or a plain text file of inputs, on the
  mesh `partitioner` gives, in `decode_dtype(checkpoint_path, model, dtype)` (as `evaluate`)."""
  return inference.infer_from_checkpoint(checkpoint_path, inputs, output_path,
                                         vocabulary_path=vocabulary_path, batch_size=batch_size,
                                         max_decode_length=max_decode_length,
                                         decode_method=decode_method,
                                         model_config=None if model is None else model.config,
                                         mesh=partitioning.make_mesh(partitioner),
                                         logical_axis_rules=partitioner.logical_axis_rules,
                                         dtype=decode_dtype(checkpoint_path, model, dtype))
