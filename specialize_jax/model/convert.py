"""Checkpoint conversion between formats: HF or T5X (or orbax) in, HF or orbax out.

The CLI exposes it as `specialize convert --from {hf,t5x} SRC --to {hf,orbax} DST`. Reading checks
every parameter name and shape first; writing goes to a temporary directory renamed into place,
so a failed conversion leaves no partial output.
"""
import logging
import os
from typing import Any, Union

import numpy as np

from specialize_jax.model import checkpoints
from specialize_jax.model import hf_conversion

SOURCE_FORMATS = ('hf', 't5x', 'orbax', 'auto')
DESTINATION_FORMATS = ('hf', 'orbax')


def convert(src: Union[str, os.PathLike], src_format: str, dst: Union[str, os.PathLike],
            dst_format: str, *, config: Any = None, overwrite: bool = False) -> str:
  """Converts the checkpoint at `src` and returns the written `dst` path.

  Args:
    src: HF directory, T5X checkpoint (model dir, step dir or `checkpoint` file) or orbax dir.
    src_format: one of SOURCE_FORMATS ('auto' detects it).
    dst: the directory to create.
    dst_format: 'hf' (config.json + model.safetensors) or 'orbax' (params checkpoint).
    config: the architecture of a T5X/orbax source (T5Config, preset name or dict); inferred
      from the parameter shapes when omitted.
    overwrite: replace an existing `dst`.
  """
  if src_format not in SOURCE_FORMATS:
    raise ValueError(f'--from {src_format!r} is not a source format; use one of {SOURCE_FORMATS}.')
  if dst_format not in DESTINATION_FORMATS:
    raise ValueError(f'--to {dst_format!r} is not a destination format; use one of '
                     f'{DESTINATION_FORMATS}.')
  model_config, params = checkpoints.load_checkpoint(src, fmt=src_format, config=config)
  num_params = sum(int(np.size(v)) for v in hf_conversion.flatten_params(params).values())
  logging.info('Read %s parameters from %s: %s', f'{num_params:,}', src, model_config)
  if dst_format == 'hf':
    written = checkpoints.save_hf(params, model_config, dst, overwrite=overwrite)
  else:
    written = checkpoints.save_orbax(params, model_config, dst, overwrite=overwrite)
  logging.info('Wrote %s checkpoint %s.', dst_format, written)
  return written
