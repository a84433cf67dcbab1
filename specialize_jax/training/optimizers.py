"""Optimizers and learning-rate schedules (AdamW, T5X-style Adafactor) from one frozen config.

Terms:
  step: the number of updates applied so far; the update computed at step `s` uses the learning
    rate `schedule(s)`, so the first update uses `schedule(0)`.
  warm-up: for 'constant', 'linear' and 'cosine', the rate rises linearly from 0 at step 0 to
    `learning_rate` at step `warmup_steps`.
  decay: after warm-up, 'constant' stays at `learning_rate`; 'linear' and 'cosine' fall to
    `end_learning_rate_fraction * learning_rate` at step `decay_steps` (counted from step 0,
    warm-up included, as optax's `warmup_cosine_decay_schedule`) and stay there.
  rsqrt: T5X's `constant * rsqrt_decay`: `c / sqrt(max(step, warmup_steps))`, flat during warm-up
    (T5X has no linear ramp in this schedule). We scale it so its peak is `learning_rate`:
    `learning_rate * sqrt(warmup_steps / max(step, warmup_steps))`; T5X's
    `base_learning_rate=B, warmup_steps=W` is `learning_rate = B / sqrt(W)` here (B=1, W=10,000:
    1e-2).
  T5X-style Adafactor: factored second moments (a row and a column statistic instead of a full
    matrix for 2-D parameters whose two largest dimensions are both >= `min_dim_size_to_factor`),
    decay `1 - (step + 1) ** -0.8`, update clipping at RMS 1, relative step sizes
    (`multiply_by_parameter_scale`: scaled by max(RMS(param), 1e-3)), no momentum: optax's
    `adafactor`, whose defaults are T5X's.
  recorded learning rate: the schedule is injected with `optax.inject_hyperparams`, so the state
    holds the rate of the latest update (`current_learning_rate`) for the step's metrics; with
    warm-up the first update's rate is 0 (as with T5X's `linear_warmup` and optax's schedules).
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from specialize_jax.errors import ConfigError

OPTIMIZERS = ('adamw', 'adafactor')
SCHEDULES = ('constant', 'linear', 'cosine', 'rsqrt')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer, its learning-rate schedule and clipping.

  Attributes:
    name: 'adamw' or 'adafactor'.
    learning_rate: the peak learning rate (see the module docstring for 'rsqrt').
    schedule: 'constant', 'linear', 'cosine' or 'rsqrt'.
    warmup_steps: steps of linear warm-up (of the flat phase for 'rsqrt').
    decay_steps: the step at which 'linear'/'cosine' decay ends; None: the run's total steps.
    end_learning_rate_fraction: the final rate of 'linear'/'cosine' as a fraction of the peak.
    weight_decay: AdamW's decoupled weight decay (scaled by the learning rate, optax's
      convention). Adafactor ignores it: T5X's Adafactor runs without weight decay.
    b1, b2, eps: AdamW's moment decays and epsilon.
    gradient_clip_norm: when set, gradients are clipped to this global L2 norm first.
    adafactor_decay_rate: exponent of the second-moment decay `1 - (step + 1) ** -rate`.
    adafactor_multiply_by_parameter_scale: relative step sizes (T5X's default True).
    adafactor_factored: factor the second moments of large 2-D parameters.
    adafactor_min_dim_size_to_factor: factor only if the two largest dimensions reach this size.
    adafactor_clipping_threshold: update clipping by block RMS; None disables it.
    adafactor_eps: added to squared gradients (T5X's epsilon1).
  """
  name: str = 'adamw'
  learning_rate: float = 5e-4
  schedule: str = 'constant'
  warmup_steps: int = 10
  decay_steps: Optional[int] = None
  end_learning_rate_fraction: float = 0.0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  gradient_clip_norm: Optional[float] = None
  adafactor_decay_rate: float = 0.8
  adafactor_multiply_by_parameter_scale: bool = True
  adafactor_factored: bool = True
  adafactor_min_dim_size_to_factor: int = 128
  adafactor_clipping_threshold: Optional[float] = 1.0
  adafactor_eps: float = 1e-30

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ConfigError(f'OptimizerConfig.name={self.name!r} is unknown; use one of {OPTIMIZERS}.')
    if self.schedule not in SCHEDULES:
      raise ConfigError(f'OptimizerConfig.schedule={self.schedule!r} is unknown; use one of '
                        f'{SCHEDULES}.')
    if not self.learning_rate > 0:
      raise ConfigError(f'OptimizerConfig.learning_rate={self.learning_rate} must be positive.')
    if self.warmup_steps < 0:
      raise ConfigError(f'OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0.')
    if self.schedule == 'rsqrt' and self.warmup_steps < 1:
      raise ConfigError(f'OptimizerConfig.warmup_steps={self.warmup_steps}: the rsqrt schedule '
                        'divides by sqrt(max(step, warmup_steps)); set warmup_steps >= 1.')
    if not 0.0 <= self.end_learning_rate_fraction <= 1.0:
      raise ConfigError(f'OptimizerConfig.end_learning_rate_fraction='
                        f'{self.end_learning_rate_fraction} must be in [0, 1].')
    if self.weight_decay < 0:
      raise ConfigError(f'OptimizerConfig.weight_decay={self.weight_decay} must be >= 0.')
    if self.gradient_clip_norm is not None and not self.gradient_clip_norm > 0:
      raise ConfigError(f'OptimizerConfig.gradient_clip_norm={self.gradient_clip_norm} must be '
                        'positive or None.')
    if (self.adafactor_clipping_threshold is not None and
        self.adafactor_clipping_threshold < 1.0):
      raise ConfigError(f'OptimizerConfig.adafactor_clipping_threshold='
                        f'{self.adafactor_clipping_threshold} must be >= 1 or None (optax).')


def make_schedule(config: OptimizerConfig, num_train_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step (see the module docstring)."""
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == 'rsqrt':

    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      return peak * jnp.sqrt(warmup / jnp.maximum(step, warmup))

    return rsqrt
  if config.schedule == 'constant':
    if warmup == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  decay_steps = num_train_steps if config.decay_steps is None else config.decay_steps
  if decay_steps <= warmup:
    source = ('num_train_steps' if config.decay_steps is None else 'OptimizerConfig.decay_steps')
    raise ConfigError(f'The {config.schedule} schedule decays from warmup_steps={warmup} to '
                      f'{source}={decay_steps}, which must be larger; set '
                      '--gin.OptimizerConfig.decay_steps or lower warmup_steps.')
  end = peak * config.end_learning_rate_fraction
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay_steps, end)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup),
       optax.linear_schedule(peak, end, decay_steps - warmup)], [warmup])


def make_optimizer(config: OptimizerConfig, num_train_steps: int) -> optax.GradientTransformation:
  """The optimizer of `config` with its schedule, optionally after global-norm clipping."""
  if num_train_steps < 1:
    raise ConfigError(f'num_train_steps={num_train_steps} must be >= 1; set --gin.TRAIN_STEPS.')
  schedule = make_schedule(config, num_train_steps)

  def build(learning_rate):
    if config.name == 'adamw':
      return optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                         weight_decay=config.weight_decay)
    return optax.adafactor(
        learning_rate, min_dim_size_to_factor=config.adafactor_min_dim_size_to_factor,
        decay_rate=config.adafactor_decay_rate,
        multiply_by_parameter_scale=config.adafactor_multiply_by_parameter_scale,
        clipping_threshold=config.adafactor_clipping_threshold, eps=config.adafactor_eps,
        factored=config.adafactor_factored)

  # The schedule is injected so the state records the rate of the latest update
  # (`opt_state.hyperparams['learning_rate']`), which the train step reports as a metric.
  optimizer = optax.inject_hyperparams(build)(learning_rate=schedule)
  if config.gradient_clip_norm is not None:
    optimizer = optax.chain(optax.clip_by_global_norm(config.gradient_clip_norm), optimizer)
  return optimizer


def current_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate of the latest update, as recorded in a `make_optimizer` state.

  Before the first update it is the rate the first update will use.
  """
  found = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
           if len(path) >= 2 and getattr(path[-2], 'name', None) == 'hyperparams'
           and getattr(path[-1], 'key', None) == 'learning_rate']
  if len(found) != 1:
    raise ValueError(f'Found {len(found)} recorded learning rates in the optimizer state; only '
                     'states of optimizers.make_optimizer record exactly one. Pass the schedule '
                     '(learning_rate_fn) instead.')
  return jnp.asarray(found[0], jnp.float32)
