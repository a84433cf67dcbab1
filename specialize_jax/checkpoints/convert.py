"""Checkpoint conversion between formats: HF, T5X or orbax (ours too) in; HF, orbax or T5X out.

The CLI exposes it as `specialize convert --from {hf,t5x,auto} SRC --to {hf,orbax,t5x} DST`.
Reading checks every parameter name and shape first; writing goes to a temporary directory renamed
into place, so a failed conversion leaves no partial output.

`--to t5x` writes T5X's legacy layout (msgpack + zarr, what the public FlanT5 checkpoints use)
with the parameters under `target` and the step under `state`, and no optimizer state: T5X
restores it with `RestoreCheckpointConfig.fallback_to_scratch = True` and the optimizer state
excluded by `assignment_map` (gin/t5x/specialize.gin sets both). `DST` must be named
`checkpoint_<step>`, T5X's step-directory name; the step is read from it.
"""
import logging
import os
import re
from typing import Any, Union

import numpy as np

from specialize_jax.errors import ConfigError
from specialize_jax.checkpoints import hf
from specialize_jax.checkpoints import loading
from specialize_jax.checkpoints import orbax_pytree
from specialize_jax.checkpoints import param_tree
from specialize_jax.checkpoints import t5x_legacy

SOURCE_FORMATS = ('hf', 't5x', 'orbax', 'auto')
DESTINATION_FORMATS = ('hf', 'orbax', 't5x')
_T5X_STEP_DIR = re.compile(r'checkpoint_(\d+)')


def convert(src: Union[str, os.PathLike], src_format: str, dst: Union[str, os.PathLike],
            dst_format: str, *, config: Any = None, overwrite: bool = False) -> str:
  """Converts the checkpoint at `src` and returns the written `dst` path.

  Args:
    src: HF directory, T5X checkpoint (model dir, step dir or `checkpoint` file) or orbax dir.
    src_format: one of SOURCE_FORMATS ('auto' detects it).
    dst: the directory to create (for 't5x': `.../checkpoint_<step>`).
    dst_format: 'hf' (config.json + model.safetensors), 'orbax' (params checkpoint) or 't5x'
      (T5X's legacy layout, see the module docstring).
    config: the architecture of a T5X/orbax source (T5Config, preset name or dict); inferred
      from the parameter shapes when omitted.
    overwrite: replace an existing `dst`.
  """
  if src_format not in SOURCE_FORMATS:
    raise ConfigError(f'--from {src_format!r} is not a source format; use one of {SOURCE_FORMATS}.')
  if dst_format not in DESTINATION_FORMATS:
    raise ConfigError(f'--to {dst_format!r} is not a destination format; use one of '
                      f'{DESTINATION_FORMATS}.')
  step_dir = _T5X_STEP_DIR.fullmatch(os.path.basename(os.path.normpath(os.fspath(dst))))
  if dst_format == 't5x' and not step_dir:
    raise ConfigError(f'--to t5x {dst}: name the destination checkpoint_<step> (T5X\'s step '
                      'directory), e.g. .../checkpoint_1184000; the step is read from the name.')
  model_config, params = loading.load_checkpoint(src, fmt=src_format, config=config)
  num_params = sum(int(np.size(v)) for v in param_tree.flatten_params(params).values())
  logging.info('Read %s parameters from %s: %s', f'{num_params:,}', src, model_config)
  if dst_format == 'hf':
    written = hf.save_hf(params, model_config, dst, overwrite=overwrite)
  elif dst_format == 'orbax':
    written = orbax_pytree.save_orbax(params, model_config, dst, overwrite=overwrite)
  else:
    written = t5x_legacy.save_t5x(params, dst, step=int(step_dir.group(1)),
                                  optimizer_state=False, overwrite=overwrite)
  logging.info('Wrote %s checkpoint %s.', dst_format, written)
  return written
