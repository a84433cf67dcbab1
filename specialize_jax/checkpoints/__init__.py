"""Model checkpoints in the three formats a FlanT5 student meets, one module per concept.

  param_tree: the parameter tree every format holds (names, shapes, checks, inferred config).
  hf: Hugging Face directories (config.json + safetensors/torch) and HF names <-> ours.
  t5x_legacy: T5X's msgpack + zarr layout (the public FlanT5 checkpoints).
  orbax_pytree: orbax PyTree checkpoints of the params (T5X's `state` item, our exports).
  directories: which format a path holds, the latest committed step, the commit markers.
  loading: `load_checkpoint` (whole, on the host) and `load_checkpoint_sharded` (this process's
    shards), each dispatching once to the reader of the format found.
  staging: writing a checkpoint directory atomically.
  convert: `specialize convert` between formats; pretrained: `load_pretrained` for inference.
"""
