"""Where training and evaluation numbers go: `MODEL_DIR/metrics.jsonl` (one JSON object per write,
`{"step": N, "split": "train"|"eval", ...}`), TensorBoard event files under `MODEL_DIR/tensorboard/`,
and the console. Only process 0 writes.

`metrics.jsonl` is a `storage.AppendLog`: locally a file appended at every write; on an object
store a folder of parts, one per flush, so a run's log costs bytes linear in its length. Read it
with `read_metrics`, which handles both.
"""
import json
import logging
import math
import time
from typing import Dict, List, Mapping, Optional

import jax

from specialize_jax.data import storage


METRICS_FILE = "metrics.jsonl"
# Events TensorBoard's writer holds between flushes (its default, 10, flushes nearly every write).
TENSORBOARD_MAX_QUEUE = 100_000


def read_metrics(model_dir: str) -> List[Dict]:
  """The records of `MODEL_DIR/metrics.jsonl` in the order written, local or on a store."""
  text = storage.read_log(storage.join(model_dir, METRICS_FILE))
  return [json.loads(line) for line in text.splitlines() if line]


class MetricWriter:
  """Writes `metrics.jsonl` and TensorBoard (process 0). Both are flushed (on a store: uploaded)
  at the first write, then at a write at least `flush_secs` after the last flush, at `flush()` (the
  loop calls it before every checkpoint save, so a resumed run finds every record up to its
  checkpoint) and at `close()`. A store then holds all but at most `flush_secs` of records while a
  run goes, at one small upload per flush for metrics.jsonl. TensorFlow's GCS client uploads an
  event file whole at each flush, hence TensorBoard too flushes on this schedule only."""

  def __init__(self, model_dir: str, enable_tensorboard: bool = True, flush_secs: float = 60.0):
    self._is_primary = jax.process_index() == 0
    self._log = storage.AppendLog(storage.join(model_dir, METRICS_FILE))
    self._tensorboard = {}
    self._enable_tensorboard = enable_tensorboard and self._is_primary
    self._model_dir = model_dir
    self._flush_secs = flush_secs
    self._last_flush = -math.inf  # The first record is flushed at once: the run is seen started.

  def _summary_writer(self, split: str):
    if split not in self._tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tensorboard[split] = tf.summary.create_file_writer(
          storage.join(self._model_dir, "tensorboard", split), max_queue=TENSORBOARD_MAX_QUEUE,
          flush_millis=int(self._flush_secs * 1000))
    return self._tensorboard[split]

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self._is_primary:
      return
    record = {"step": int(step), "split": split, "time": round(time.time(), 3),
              **{k: float(v) for k, v in scalars.items()}}
    self._log.append([json.dumps(record) + "\n"])
    if self._enable_tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._summary_writer(split).as_default():
        for name, value in scalars.items():
          tf.summary.scalar(name, float(value), step=int(step))
    if time.monotonic() - self._last_flush >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    """Makes every record written so far durable (on a store: uploads the new ones as one part)."""
    if not self._is_primary:
      return
    self._log.flush()
    for writer in self._tensorboard.values():
      writer.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if not self._is_primary:
      return
    self._log.close()
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
