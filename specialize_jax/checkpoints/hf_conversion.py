"""Hugging Face T5 state dicts and `config.json` <-> our T5X-named parameter tree (pure numpy).

Terms:
  HF name: a key of a Hugging Face `T5ForConditionalGeneration` state dict, e.g.
    `encoder.block.0.layer.0.SelfAttention.q.weight`. HF `Linear` weights are [out, in]; ours
    (T5X `DenseGeneral` kernels) are [in, out], so every dense weight is transposed.
  T5X name: a '/'-joined path in the parameter tree, e.g. `encoder/layers_0/attention/query/kernel`.
    The tree is T5X's T5 v1.1 network tree, so names are part of the checkpoint format.
  head convention: how a config.json says the logits are made. HF multiplies the decoder output by
    d_model**-0.5 before the head when `scale_decoder_outputs` is true (transformers 5.x key) or,
    when that key is absent (files written by transformers 4.x), when `tie_word_embeddings` is not
    false. The head is `lm_head.weight` when the file has one that differs from `shared.weight`,
    else the input embedding (transformers 5.x unties a head stored with different values).
    Published FlanT5 (4.x): `tie_word_embeddings: false` + `lm_head.weight` -> unscaled, untied.
    Files written by 5.x: `tie_word_embeddings: true, scale_decoder_outputs: false`, maybe no
    `lm_head.weight` -> unscaled, head = embedding. Original T5: tied and scaled, which is T5X's
    `logits_via_embedding=True` (it divides by sqrt(emb_dim) too).
"""
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np

from specialize_jax.model.config import T5Config

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
HF_EMBEDDING_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
HF_UNUSED_NAMES = ('decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)
HF_HEAD_NAME = 'lm_head.weight'
HF_EMBEDDING_NAME = 'shared.weight'


def flatten_params(tree: Mapping[str, Any], prefix: str = '',
                   is_leaf: Callable[[Any], bool] = lambda x: False) -> Dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}; the '/' names are the ones used in error messages."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and not is_leaf(value):
      flat.update(flatten_params(value, name + '/', is_leaf))
    else:
      flat[name] = value
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """Inverse of `flatten_params`."""
  tree: Dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _mlp_names(config: T5Config) -> Tuple[str, ...]:
  """T5X names the MLP input kernels 'wi' for one activation, else 'wi_0', 'wi_1', ..."""
  n = len(config.mlp_activations)
  return ('wi',) if n == 1 else tuple(f'wi_{i}' for i in range(n))


def _name_map(config: T5Config) -> Dict[str, Tuple[str, bool]]:
  """T5X name -> (HF name, transpose) for every parameter except the output head."""
  names = {'token_embedder/embedding': (HF_EMBEDDING_NAME, False)}

  def attention(t5x: str, hf: str):
    for ours, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o')):
      names[f'{t5x}/{ours}/kernel'] = (f'{hf}.{theirs}.weight', True)

  def mlp(t5x: str, hf: str):
    for wi in _mlp_names(config):
      names[f'{t5x}/{wi}/kernel'] = (f'{hf}.DenseReluDense.{wi}.weight', True)
    names[f'{t5x}/wo/kernel'] = (f'{hf}.DenseReluDense.wo.weight', True)

  for stack, num_layers in (('encoder', config.num_encoder_layers),
                            ('decoder', config.num_decoder_layers)):
    # HF keeps the shared relative bias in block 0 as [buckets, heads]; T5X as [heads, buckets].
    names[f'{stack}/relpos_bias/rel_embedding'] = (
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', True)
    names[f'{stack}/{stack}_norm/scale'] = (f'{stack}.final_layer_norm.weight', False)
    for i in range(num_layers):
      t5x, hf = f'{stack}/layers_{i}', f'{stack}.block.{i}.layer'
      if stack == 'encoder':
        names[f'{t5x}/pre_attention_layer_norm/scale'] = (f'{hf}.0.layer_norm.weight', False)
        attention(f'{t5x}/attention', f'{hf}.0.SelfAttention')
        names[f'{t5x}/pre_mlp_layer_norm/scale'] = (f'{hf}.1.layer_norm.weight', False)
        mlp(f'{t5x}/mlp', f'{hf}.1')
      else:
        names[f'{t5x}/pre_self_attention_layer_norm/scale'] = (f'{hf}.0.layer_norm.weight', False)
        attention(f'{t5x}/self_attention', f'{hf}.0.SelfAttention')
        names[f'{t5x}/pre_cross_attention_layer_norm/scale'] = (f'{hf}.1.layer_norm.weight',
                                                                False)
        attention(f'{t5x}/encoder_decoder_attention', f'{hf}.1.EncDecAttention')
        names[f'{t5x}/pre_mlp_layer_norm/scale'] = (f'{hf}.2.layer_norm.weight', False)
        mlp(f'{t5x}/mlp', f'{hf}.2')
  return names


def t5x_param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """The T5X parameter tree of `config`, flattened: name -> shape (the checkpoint contract)."""
  embed, joined_kv = config.emb_dim, config.num_heads * config.head_dim
  shapes = {}
  for name in _name_map(config):
    leaf = name.split('/')
    if name == 'token_embedder/embedding':
      shape = (config.vocab_size, embed)
    elif leaf[-1] == 'rel_embedding':
      shape = (config.num_heads, config.relative_attention_num_buckets)
    elif leaf[-1] == 'scale':
      shape = (embed,)
    elif leaf[-2] in ('query', 'key', 'value'):
      shape = (embed, joined_kv)
    elif leaf[-2] == 'out':
      shape = (joined_kv, embed)
    elif leaf[-2] == 'wo':
      shape = (config.mlp_dim, embed)
    else:  # wi, wi_0, wi_1, ...
      shape = (embed, config.mlp_dim)
    shapes[name] = shape
  if not config.logits_via_embedding:
    shapes['decoder/logits_dense/kernel'] = (embed, config.vocab_size)
  return shapes


def hf_param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """HF name -> shape of the tensors an HF directory for `config` must hold (head excluded)."""
  t5x_shapes = t5x_param_shapes(config)
  return {hf: t5x_shapes[t5x][::-1] if transpose else t5x_shapes[t5x]
          for t5x, (hf, transpose) in _name_map(config).items()}


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
    raise ValueError(f'{source}: model_type={model_type!r} is not a T5 encoder-decoder; this '
                     f'converter reads model_type in {_HF_MODEL_TYPES}.')
  missing = [k for k in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads')
             if k not in hf_config]
  if missing:
    raise ValueError(f'{source} lacks {missing}; it is not a T5 config.json '
                     '(expected the keys written by transformers T5Config.save_pretrained).')
  # HF's own default for feed_forward_proj is 'relu' (original T5).
  feed_forward = hf_config.get('feed_forward_proj', 'relu')
  if feed_forward not in FEED_FORWARD_TO_ACTIVATIONS:
    raise ValueError(
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
    head = state_dict.get(HF_HEAD_NAME, state_dict[HF_EMBEDDING_NAME])
    kernel = np.asarray(head, np.float32).T  # [embed, vocab]
    if hf_scales_decoder_outputs(hf_config):
      # An untied head behind HF's output scaling: fold d_model**-0.5 into the kernel (equal up to
      # float rounding; the export then writes the folded head, unscaled).
      kernel = kernel * np.float32(config.emb_dim**-0.5)
    flat['decoder/logits_dense/kernel'] = np.ascontiguousarray(kernel)
  return unflatten_params(flat)


def params_to_hf(params: Mapping[str, Any], config: T5Config,
                 dtype: Any = np.float32) -> Dict[str, np.ndarray]:
  """Nested T5X params -> HF state dict (head written as `lm_head.weight` unless tied)."""
  flat = flatten_params(params)
  state_dict = {}
  for t5x, (hf, transpose) in _name_map(config).items():
    value = np.asarray(flat[t5x]).astype(dtype)
    state_dict[hf] = np.ascontiguousarray(value.T) if transpose else value
  if not config.logits_via_embedding:
    state_dict[HF_HEAD_NAME] = np.ascontiguousarray(
        np.asarray(flat['decoder/logits_dense/kernel']).astype(dtype).T)
  return state_dict

