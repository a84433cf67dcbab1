"""What `specialize plan` sizes: the training job the gin files configure, on a named topology.

The memory plan itself (`planning.memory_plan`) knows nothing of gin; this module reads the
`runs.train` bindings of parsed gin files into its `PlanRequest`, touching no task, data or
MODEL_DIR, so a config can be sized before any of them exists.
"""
from typing import List, Optional, Sequence

import gin

from specialize_jax.data import storage
from specialize_jax.errors import ConfigError
from specialize_jax.jobs import gin_config
from specialize_jax.planning import memory_plan
from specialize_jax.planning import topologies
from specialize_jax.training import optimizers
from specialize_jax.training import partitioning


def plan_request(gin_files: List[str], overrides: List[str], search_paths: List[str],
                 topology: topologies.Topology) -> memory_plan.PlanRequest:
  """The `runs.train` bindings of the gin files (and `--gin.X=Y` `overrides`) as a
  `memory_plan.PlanRequest` on `topology`; no task, data or MODEL_DIR is touched."""
  # The plan writes nothing: a placeholder satisfies a required MODEL_DIR (a given one wins).
  gin_config.parse_gin(gin_files, ["MODEL_DIR = 'unused-by-plan'"] +
                       gin_config.gin_bindings(overrides), search_paths)
  try:
    bindings = gin.get_bindings("runs.train")
  except (ValueError, TypeError) as e:  # gin's own report of a configurable it does not know.
    raise ConfigError(f"gin configuration error: {e}") from e
  missing = [name for name in ("model", "dataset", "num_train_steps") if name not in bindings]
  if missing:
    raise ConfigError(f"the gin files bind no runs.train.{missing[0]}; include runs/specialize.gin "
                      "(a training config) as `specialize train` would.")
  return memory_plan.PlanRequest(
      model=bindings["model"], dataset=bindings["dataset"],
      num_train_steps=bindings["num_train_steps"],
      optimizer=bindings.get("optimizer", optimizers.OptimizerConfig()),
      partitioner=bindings.get("partitioner", partitioning.PartitioningConfig()),
      num_microbatches=bindings.get("num_microbatches", 1), topology=topology,
      gradient_reduction=bindings.get("gradient_reduction", "per_microbatch"))


def gin_topology(gin_files: Sequence[str], search_paths: Sequence[str],
                 name: Optional[str] = None) -> topologies.Topology:
  """The topology `name`, else the one the first of `gin_files` with a `# Topology:` header line
  names; a `ConfigError` when neither gives one."""
  if name is None:
    texts = [storage.read_text(gin_config.find_file(f, search_paths)) for f in gin_files]
    name = topologies.named_topology(texts)
    if name is None:
      raise ConfigError("give --topology (e.g. v4-32, v5e-64, 8xH100): no --gin_file names one in "
                        "a `# Topology:` header line.")
  return topologies.topology(name)
