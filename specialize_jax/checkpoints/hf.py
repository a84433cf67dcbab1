"""Hugging Face T5 directories: the files on disk, config.json, and HF names <-> ours.

On disk: `config.json` (a transformers `T5Config`) plus the weights, one of `model.safetensors`,
sharded safetensors listed by `model.safetensors.index.json`, or `pytorch_model.bin` (sharded:
`pytorch_model.bin.index.json`; read only when torch is importable). `save_hf` writes
config.json + model.safetensors, which `T5ForConditionalGeneration.from_pretrained` loads as is.

Terms:
  HF name: a key of a Hugging Face `T5ForConditionalGeneration` state dict, e.g.
    `encoder.block.0.layer.0.SelfAttention.q.weight`. HF `Linear` weights are [out, in]; ours
    (T5X `DenseGeneral` kernels) are [in, out], so every dense weight is transposed.
  T5X name: a '/'-joined path in the parameter tree (`param_tree`), e.g.
    `encoder/layers_0/attention/query/kernel`.
  head convention: how a config.json says the logits are made. HF multiplies the decoder output by
    d_model**-0.5 before the head when `scale_decoder_outputs` is true (transformers 5.x key) or,
    when that key is absent (files written by transformers 4.x), when `tie_word_embeddings` is not
    false. The head is `lm_head.weight` when the file has one that differs from `shared.weight`,
    else the input embedding (transformers 5.x unties a head stored with different values).
    Published FlanT5 (4.x): `tie_word_embeddings: false` + `lm_head.weight` -> unscaled, untied.
    Files written by 5.x: `tie_word_embeddings: true, scale_decoder_outputs: false`, maybe no
    `lm_head.weight` -> unscaled, head = embedding. Original T5: tied and scaled, which is T5X's
    `logits_via_embedding=True` (it divides by sqrt(emb_dim) too).

The name and config conversions are pure numpy; reading checks every tensor name and shape
against config.json before converting (see `param_tree.CheckpointMismatchError`).
"""
import atexit
import dataclasses
import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

from etils import epath
import numpy as np

from specialize_jax.errors import ConfigError
from specialize_jax.checkpoints import param_tree
from specialize_jax.checkpoints import staging
from specialize_jax.data import storage
from specialize_jax.model.config import T5Config

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json'
TORCH_FILE = 'pytorch_model.bin'
TORCH_INDEX_FILE = 'pytorch_model.bin.index.json'

# HF `feed_forward_proj` -> T5X/Flax `mlp_activations`. HF's 'gated-gelu' uses the tanh
# approximation ('gelu_new'), which is what `flax.linen.gelu` computes by default. Exact-erf GELU
# ('gelu' without the gate) has no Flax name in T5X's MLP, so it is refused, not approximated.
FEED_FORWARD_TO_ACTIVATIONS = {
    'gated-gelu': ('gelu', 'linear'),
    'gated-relu': ('relu', 'linear'),
    'gated-silu': ('silu', 'linear'),
    'relu': ('relu',),
    'silu': ('silu',),
}
_ACTIVATIONS_TO_FEED_FORWARD = {v: k for k, v in FEED_FORWARD_TO_ACTIVATIONS.items()}
_HF_MODEL_TYPES = ('t5', 'mt5')
# HF keys that carry no information of their own: copies of `shared.weight` (tied on load), and a
# cross-attention bias that old checkpoints stored but no T5 uses (HF ignores it on load too).
EMBEDDING_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
UNUSED_NAMES = ('decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)
HEAD_NAME = 'lm_head.weight'
EMBEDDING_NAME = 'shared.weight'

# ---------------------------------------------------------------------------------------------
# Names

# (stack, T5X sublayer) -> the HF module holding it: `<layer index in the block>.<module>`.
_SUBLAYERS = {
    ('encoder', 'pre_attention_layer_norm'): '0.layer_norm',
    ('encoder', 'attention'): '0.SelfAttention',
    ('encoder', 'pre_mlp_layer_norm'): '1.layer_norm',
    ('encoder', 'mlp'): '1.DenseReluDense',
    ('decoder', 'pre_self_attention_layer_norm'): '0.layer_norm',
    ('decoder', 'self_attention'): '0.SelfAttention',
    ('decoder', 'pre_cross_attention_layer_norm'): '1.layer_norm',
    ('decoder', 'encoder_decoder_attention'): '1.EncDecAttention',
    ('decoder', 'pre_mlp_layer_norm'): '2.layer_norm',
    ('decoder', 'mlp'): '2.DenseReluDense',
}
_ATTENTION_PROJECTIONS = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}


def _hf_name(t5x_name: str) -> Tuple[str, bool]:
  """(HF name, whether the value is transposed) of a T5X name; the head is not mapped here.

  HF keeps the shared relative position bias in block 0 as [buckets, heads], T5X as
  [heads, buckets]; dense kernels are transposed too, norm scales and the embedding are not.
  """
  if t5x_name == 'token_embedder/embedding':
    return EMBEDDING_NAME, False
  stack, module, *rest = t5x_name.split('/')
  if (module, *rest) == ('relpos_bias', 'rel_embedding'):
    return f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', True
  if (module, *rest) == (f'{stack}_norm', 'scale'):
    return f'{stack}.final_layer_norm.weight', False
  if not module.startswith('layers_') or len(rest) < 2 or (stack, rest[0]) not in _SUBLAYERS:
    raise ValueError(f'{t5x_name} is not a parameter of a T5 encoder-decoder.')
  prefix = f'{stack}.block.{module[len("layers_"):]}.layer.{_SUBLAYERS[stack, rest[0]]}'
  if rest[1:] == ['scale']:
    return f'{prefix}.weight', False
  projection = _ATTENTION_PROJECTIONS.get(rest[1], rest[1])  # MLP kernels keep their names.
  return f'{prefix}.{projection}.weight', True


def _name_map(config: T5Config) -> Dict[str, Tuple[str, bool]]:
  """T5X name -> (HF name, transpose) for every parameter except the output head."""
  return {name: _hf_name(name) for name in param_tree.t5x_param_shapes(config)
          if name != param_tree.HEAD_KERNEL}


def hf_param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """HF name -> shape of the tensors an HF directory for `config` must hold (head excluded)."""
  t5x_shapes = param_tree.t5x_param_shapes(config)
  return {hf: t5x_shapes[t5x][::-1] if transpose else t5x_shapes[t5x]
          for t5x, (hf, transpose) in _name_map(config).items()}


# ---------------------------------------------------------------------------------------------
# config.json


def hf_scales_decoder_outputs(hf_config: Mapping[str, Any]) -> bool:
  """Whether HF multiplies the decoder output by d_model**-0.5 before the head (module doc)."""
  if 'scale_decoder_outputs' in hf_config:
    return bool(hf_config['scale_decoder_outputs'])
  return hf_config.get('tie_word_embeddings', True) is not False


def config_from_hf(hf_config: Mapping[str, Any], *, untied_head: bool = True,
                   dtype: str = 'float32', source: str = 'config.json') -> T5Config:
  """Reads an HF T5 config.json dict. `untied_head`: the file has an `lm_head.weight` of its own.

  The head is folded into `logits_dense` except for HF's tied-and-scaled head (original T5), which
  is exactly T5X's `logits_via_embedding=True`.
  """
  model_type = hf_config.get('model_type', 't5')
  if model_type not in _HF_MODEL_TYPES:
    raise ConfigError(f'{source}: model_type={model_type!r} is not a T5 encoder-decoder; this '
                      f'converter reads model_type in {_HF_MODEL_TYPES}.')
  missing = [k for k in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads')
             if k not in hf_config]
  if missing:
    raise ConfigError(f'{source} lacks {missing}; it is not a T5 config.json '
                      '(expected the keys written by transformers T5Config.save_pretrained).')
  # HF's own default for feed_forward_proj is 'relu' (original T5).
  feed_forward = hf_config.get('feed_forward_proj', 'relu')
  if feed_forward not in FEED_FORWARD_TO_ACTIVATIONS:
    raise ConfigError(
        f'{source}: feed_forward_proj={feed_forward!r} is not supported; supported are '
        f'{sorted(FEED_FORWARD_TO_ACTIVATIONS)} (T5 v1.1 / FlanT5 use "gated-gelu"; exact-erf '
        '"gelu" has no T5X equivalent).')
  num_layers = hf_config['num_layers']
  num_decoder_layers = hf_config.get('num_decoder_layers')
  return T5Config(
      vocab_size=hf_config['vocab_size'],
      emb_dim=hf_config['d_model'],
      num_heads=hf_config['num_heads'],
      num_encoder_layers=num_layers,
      num_decoder_layers=num_layers if num_decoder_layers is None else num_decoder_layers,
      head_dim=hf_config['d_kv'],
      mlp_dim=hf_config['d_ff'],
      mlp_activations=FEED_FORWARD_TO_ACTIVATIONS[feed_forward],
      dropout_rate=hf_config.get('dropout_rate', 0.1),
      relative_attention_num_buckets=hf_config.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf_config.get('relative_attention_max_distance', 128),
      dtype=dtype,
      logits_via_embedding=hf_scales_decoder_outputs(hf_config) and not untied_head,
      layer_norm_epsilon=hf_config.get('layer_norm_epsilon', 1e-6),
  )


def config_to_hf(config: T5Config) -> Dict[str, Any]:
  """The config.json dict for `config`, read the same way by transformers 4.x and 5.x.

  An untied head is written as `tie_word_embeddings: false` (4.x: untied, unscaled) plus
  `scale_decoder_outputs: false` (5.x); `logits_via_embedding` as tied and scaled.
  """
  activations = tuple(config.mlp_activations)
  if activations not in _ACTIVATIONS_TO_FEED_FORWARD:
    raise ValueError(f'T5Config.mlp_activations={activations} has no HF feed_forward_proj; '
                     f'exportable are {sorted(_ACTIVATIONS_TO_FEED_FORWARD)}.')
  feed_forward = _ACTIVATIONS_TO_FEED_FORWARD[activations]
  act = feed_forward.split('-')[-1]
  tied = bool(config.logits_via_embedding)
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'vocab_size': config.vocab_size,
      'd_model': config.emb_dim,
      'd_kv': config.head_dim,
      'd_ff': config.mlp_dim,
      'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'num_heads': config.num_heads,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'dropout_rate': config.dropout_rate,
      'layer_norm_epsilon': config.layer_norm_epsilon,
      'initializer_factor': 1.0,
      'feed_forward_proj': feed_forward,
      'dense_act_fn': 'gelu_new' if feed_forward == 'gated-gelu' else act,
      'is_gated_act': feed_forward.startswith('gated-'),
      'is_encoder_decoder': True,
      'tie_word_embeddings': tied,
      'scale_decoder_outputs': tied,
      'use_cache': True,
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
  }


# ---------------------------------------------------------------------------------------------
# State dicts


def params_from_hf(state_dict: Mapping[str, np.ndarray], config: T5Config,
                   hf_config: Mapping[str, Any]) -> Dict[str, Any]:
  """HF state dict -> nested T5X params (float32). Names and shapes must already be checked.

  `config` must come from `config_from_hf(hf_config, untied_head=...)` for this state dict.
  """
  flat = {}
  for t5x, (hf, transpose) in _name_map(config).items():
    value = np.asarray(state_dict[hf], np.float32)
    flat[t5x] = np.ascontiguousarray(value.T) if transpose else value
  if not config.logits_via_embedding:
    head = state_dict.get(HEAD_NAME, state_dict[EMBEDDING_NAME])
    kernel = np.asarray(head, np.float32).T  # [embed, vocab]
    if hf_scales_decoder_outputs(hf_config):
      # An untied head behind HF's output scaling: fold d_model**-0.5 into the kernel (equal up to
      # float rounding; the export then writes the folded head, unscaled).
      kernel = kernel * np.float32(config.emb_dim**-0.5)
    flat[param_tree.HEAD_KERNEL] = np.ascontiguousarray(kernel)
  return param_tree.unflatten_params(flat)


def params_to_hf(params: Mapping[str, Any], config: T5Config,
                 dtype: Any = np.float32) -> Dict[str, np.ndarray]:
  """Nested T5X params -> HF state dict (head written as `lm_head.weight` unless tied)."""
  flat = param_tree.flatten_params(params)
  state_dict = {}
  for t5x, (hf, transpose) in _name_map(config).items():
    value = np.asarray(flat[t5x]).astype(dtype)
    state_dict[hf] = np.ascontiguousarray(value.T) if transpose else value
  if not config.logits_via_embedding:
    state_dict[HEAD_NAME] = np.ascontiguousarray(
        np.asarray(flat[param_tree.HEAD_KERNEL]).astype(dtype).T)
  return state_dict


# ---------------------------------------------------------------------------------------------
# Files


def _tensor_files(directory: epath.Path) -> Tuple[str, Dict[str, epath.Path]]:
  """('safetensors' | 'torch', {tensor name: file}) for an HF directory (index files read)."""
  for kind, single, index in (('safetensors', SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE),
                              ('torch', TORCH_FILE, TORCH_INDEX_FILE)):
    if (directory / index).exists():
      weight_map = json.loads((directory / index).read_text())['weight_map']
      return kind, {name: directory / file for name, file in weight_map.items()}
    if (directory / single).exists():
      return kind, {None: directory / single}
  raise ConfigError(f'{directory} has {CONFIG_FILE} but no weights: expected '
                    f'{SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE} or {TORCH_FILE}.')


def _local_copy(file: epath.Path) -> str:
  """A local path of `file`: itself, or for a storage URL a copy in the temp area (safetensors
  and torch read local files only), removed when the process exits."""
  if not storage.is_url(file):
    return os.fspath(file)
  handle, path = tempfile.mkstemp(prefix='specialize-', suffix=f'-{file.name}')
  os.close(handle)
  _TEMP_COPIES.append(path)
  storage.copy_file(file, path)
  return path


_TEMP_COPIES = []
atexit.register(lambda: [os.remove(p) for p in _TEMP_COPIES if os.path.exists(p)])  # local: temp


def _read_tensors(directory: epath.Path) -> Tuple[Dict[str, Tuple[int, ...]], Any]:
  """(name -> shape, loader(name) -> np.ndarray) without reading tensor data up front."""
  kind, files = _tensor_files(directory)
  if kind == 'safetensors':
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    shapes, owner = {}, {}
    for file in sorted(set(files.values()), key=str):
      handle = safe_open(_local_copy(file), framework='numpy')
      for name in handle.keys():
        shapes[name] = tuple(handle.get_slice(name).get_shape())
        owner[name] = handle
    return shapes, lambda name: owner[name].get_tensor(name)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f'{directory} holds PyTorch weights ({TORCH_FILE}); install torch to read '
                      'them, or re-save the model with safetensors.') from e
  tensors = {}
  for file in sorted(set(files.values()), key=str):
    tensors.update(torch.load(_local_copy(file), map_location='cpu', weights_only=True))
  shapes = {name: tuple(t.shape) for name, t in tensors.items()}
  return shapes, lambda name: tensors[name].float().numpy()


class _LazyDict(Mapping):
  """A read-only mapping that loads a tensor when it is looked up (keeps peak memory low)."""

  def __init__(self, shapes, load):
    self._shapes, self._load = shapes, load

  def __getitem__(self, name):
    if name not in self._shapes:
      raise KeyError(name)
    return self._load(name)

  def __iter__(self):
    return iter(self._shapes)

  def __len__(self):
    return len(self._shapes)


def load_hf(directory: os.PathLike, config: Any = None,
            dtype: Optional[str] = None) -> Tuple[T5Config, Dict[str, Any]]:
  """Reads an HF T5 directory; `config`, when given, must describe the same architecture.

  The returned config's compute dtype is `dtype`, else `config`'s, else float32.
  """
  directory = epath.Path(directory)
  hf_config = json.loads((directory / CONFIG_FILE).read_text())
  shapes, load = _read_tensors(directory)
  # transformers 5.x unties a stored head only when its values differ from the embedding.
  untied_head = HEAD_NAME in shapes and (
      EMBEDDING_NAME not in shapes or not np.array_equal(load(HEAD_NAME), load(EMBEDDING_NAME)))
  wanted = param_tree.as_config(config)
  if dtype is None and wanted is not None:
    dtype = wanted.dtype
  ours = config_from_hf(hf_config, untied_head=untied_head,
                        source=os.fspath(directory / CONFIG_FILE))
  if dtype is not None:
    ours = dataclasses.replace(ours, dtype=dtype)
  if wanted is not None and param_tree.architecture(wanted) != param_tree.architecture(ours):
    raise ConfigError(f'{directory} holds {ours}, not the requested {wanted}; drop config= to use '
                      'the checkpoint\'s architecture.')
  embedding_shape = (ours.vocab_size, ours.emb_dim)
  param_tree.check_shapes(
      shapes, hf_param_shapes(ours), f'HF checkpoint {directory}',
      hint=f'Expected the tensors that {CONFIG_FILE} describes ({ours}); the weights file is '
      'partial or belongs to another config.',
      optional={name: embedding_shape for name in (HEAD_NAME,) + EMBEDDING_COPIES},
      ignored=UNUSED_NAMES)
  return ours, params_from_hf(_LazyDict(shapes, load), ours, hf_config)


def save_hf(params: Mapping[str, Any], config: T5Config, directory: os.PathLike,
            overwrite: bool = False, dtype: Any = np.float32) -> str:
  """Writes config.json + model.safetensors that `T5ForConditionalGeneration` loads as is.

  Written to a staging directory, then moved into place (`staging`).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  param_tree.check_params(
      {k: np.shape(v) for k, v in param_tree.flatten_params(params).items()}, config,
      'params to export')
  state_dict = params_to_hf(params, config, dtype)
  directory, tmp = staging.staging_dir(directory, overwrite)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:  # local: staging dir
      json.dump(config_to_hf(config), f, indent=2, sort_keys=True)
      f.write('\n')
    save_file(state_dict, os.path.join(tmp, SAFETENSORS_FILE), metadata={'format': 'pt'})
  except BaseException:
    staging.remove_staging(tmp)
    raise
  staging.replace_dir(tmp, directory, overwrite)
  return directory
