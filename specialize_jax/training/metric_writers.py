"""Where training and evaluation numbers go: `MODEL_DIR/metrics.jsonl` (one JSON object per write,
`{"step": N, "split": "train"|"eval", ...}`), TensorBoard event files under `MODEL_DIR/tensorboard/`,
and the console. Only process 0 writes."""
import json
import logging
import math
import time
from typing import Mapping, Optional

import jax

from specialize_jax.data import storage


class MetricWriter:
  def __init__(self, model_dir: str, enable_tensorboard: bool = True):
    self._is_primary = jax.process_index() == 0
    self._path = storage.join(model_dir, "metrics.jsonl")
    self._tensorboard = {}
    self._enable_tensorboard = enable_tensorboard and self._is_primary
    self._model_dir = model_dir

  def _summary_writer(self, split: str):
    if split not in self._tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tensorboard[split] = tf.summary.create_file_writer(
          storage.join(self._model_dir, "tensorboard", split))
    return self._tensorboard[split]

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self._is_primary:
      return
    record = {"step": int(step), "split": split, "time": round(time.time(), 3),
              **{k: float(v) for k, v in scalars.items()}}
    storage.append_lines(self._path, [json.dumps(record) + "\n"])
    if self._enable_tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._summary_writer(split).as_default():
        for name, value in scalars.items():
          tf.summary.scalar(name, float(value), step=int(step))
      self._summary_writer(split).flush()

  def close(self) -> None:
    for writer in self._tensorboard.values():
      writer.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLogger:
  """Console lines with step/total, loss, learning rate, steps/s, target tokens/s and ETA."""

  def __init__(self, num_train_steps: int, start_step: int, log: Optional[callable] = None):
    self._total = num_train_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._log = log or logging.info

  def log(self, step: int, scalars: Mapping[str, float]) -> Mapping[str, float]:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    steps_per_s = steps / seconds
    rates = {"steps_per_s": steps_per_s,
             "target_tokens_per_s": scalars.get("num_target_tokens", 0.0) * steps_per_s}
    eta = (self._total - step) / steps_per_s
    self._log(f"step {step}/{self._total} | loss {scalars.get('loss', float('nan')):.4f} | "
              f"lr {scalars.get('learning_rate', float('nan')):.2e} | {steps_per_s:.2f} steps/s | "
              f"{rates['target_tokens_per_s']:.0f} target tokens/s | ETA {format_duration(eta)}")
    self._last_step, self._last_time = step, now
    return rates
