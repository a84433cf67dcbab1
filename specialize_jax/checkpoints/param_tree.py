"""The parameter tree every checkpoint format holds, and the checks made before reading it.

Terms:
  params: the nested dict of float32 numpy arrays named like T5X's T5 v1.1 network
    (`token_embedder/embedding`, `encoder/layers_0/attention/query/kernel`, ...). The names and
    shapes are the checkpoint contract: every format (HF, T5X legacy, orbax) is read into this tree
    and written from it.
  flat name: a '/'-joined path in the tree, as `flatten_params` gives it; the names error messages
    use.

Every loader checks all names and shapes before reading array data; a mismatch raises
`CheckpointMismatchError` listing missing, unexpected and wrong-shape parameters. T5X and orbax
checkpoints carry no architecture, so without a config it is inferred from the shapes
(`infer_config`).
"""
import dataclasses
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from specialize_jax.errors import ConfigError
from specialize_jax.model.config import T5Config

# The logits head of an untied model (absent with `logits_via_embedding`).
HEAD_KERNEL = 'decoder/logits_dense/kernel'
# Optimizer subtrees mirror the params tree; never take params from them.
OPTIMIZER_KEYS = ('param_states', 'opt_state', '_optimizer_state')
_MAX_LISTED = 20


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


def mlp_input_names(config: T5Config) -> Tuple[str, ...]:
  """T5X names the MLP input kernels 'wi' for one activation, else 'wi_0', 'wi_1', ..."""
  n = len(config.mlp_activations)
  return ('wi',) if n == 1 else tuple(f'wi_{i}' for i in range(n))


def t5x_param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """The T5X parameter tree of `config`, flattened: name -> shape (the checkpoint contract).

  Per stack: the shared relative position bias, the final norm, then each layer's sublayers in
  the order T5X builds them; the untied head last.
  """
  embed, joined_kv = config.emb_dim, config.num_heads * config.head_dim
  shapes = {'token_embedder/embedding': (config.vocab_size, embed)}

  def attention(prefix: str):
    for name in ('query', 'key', 'value'):
      shapes[f'{prefix}/{name}/kernel'] = (embed, joined_kv)
    shapes[f'{prefix}/out/kernel'] = (joined_kv, embed)

  def mlp(prefix: str):
    for name in mlp_input_names(config):
      shapes[f'{prefix}/{name}/kernel'] = (embed, config.mlp_dim)
    shapes[f'{prefix}/wo/kernel'] = (config.mlp_dim, embed)

  for stack, num_layers in (('encoder', config.num_encoder_layers),
                            ('decoder', config.num_decoder_layers)):
    shapes[f'{stack}/relpos_bias/rel_embedding'] = (config.num_heads,
                                                    config.relative_attention_num_buckets)
    shapes[f'{stack}/{stack}_norm/scale'] = (embed,)
    for i in range(num_layers):
      layer = f'{stack}/layers_{i}'
      if stack == 'encoder':
        shapes[f'{layer}/pre_attention_layer_norm/scale'] = (embed,)
        attention(f'{layer}/attention')
      else:
        shapes[f'{layer}/pre_self_attention_layer_norm/scale'] = (embed,)
        attention(f'{layer}/self_attention')
        shapes[f'{layer}/pre_cross_attention_layer_norm/scale'] = (embed,)
        attention(f'{layer}/encoder_decoder_attention')
      shapes[f'{layer}/pre_mlp_layer_norm/scale'] = (embed,)
      mlp(f'{layer}/mlp')
  if not config.logits_via_embedding:
    shapes[HEAD_KERNEL] = (embed, config.vocab_size)
  return shapes


class CheckpointMismatchError(ValueError):
  """The checkpoint's parameters do not match the model: names and shapes are in the message."""

  def __init__(self, source: str, missing: Mapping[str, Tuple[int, ...]],
               unexpected: Mapping[str, Tuple[int, ...]],
               wrong_shape: Mapping[str, Tuple[Tuple[int, ...], Tuple[int, ...]]], hint: str):
    self.missing, self.unexpected, self.wrong_shape = dict(missing), dict(unexpected), dict(
        wrong_shape)
    lines = [f'{source} does not match the model:']

    def section(title, items, fmt):
      if not items:
        return
      lines.append(f'  {title} ({len(items)}):')
      for name, value in list(sorted(items.items()))[:_MAX_LISTED]:
        lines.append(f'    {name}: {fmt(value)}')
      if len(items) > _MAX_LISTED:
        lines.append(f'    ... and {len(items) - _MAX_LISTED} more')

    section('missing', self.missing, lambda s: f'expected shape {tuple(s)}')
    section('unexpected', self.unexpected, lambda s: f'found shape {tuple(s)}')
    section('wrong shape', self.wrong_shape,
            lambda s: f'expected shape {tuple(s[0])}, found shape {tuple(s[1])}')
    lines.append(hint)
    super().__init__('\n'.join(lines))


def check_shapes(found: Mapping[str, Tuple[int, ...]], expected: Mapping[str, Tuple[int, ...]],
                 source: str, hint: str, optional: Mapping[str, Tuple[int, ...]] = None,
                 ignored: Iterable[str] = ()) -> None:
  """Raises `CheckpointMismatchError` unless `found` has exactly the `expected` names and shapes.

  `optional` names may be absent but must have their shape when present; `ignored` names are
  neither required nor checked.
  """
  optional = dict(optional or {})
  ignored = set(ignored)
  missing = {k: v for k, v in expected.items() if k not in found}
  unexpected = {k: tuple(v) for k, v in found.items()
                if k not in expected and k not in optional and k not in ignored}
  wrong = {}
  for name, shape in found.items():
    want = expected.get(name, optional.get(name))
    if want is not None and tuple(shape) != tuple(want):
      wrong[name] = (tuple(want), tuple(shape))
  if missing or unexpected or wrong:
    raise CheckpointMismatchError(source, missing, unexpected, wrong, hint)


def check_params(shapes: Mapping[str, Tuple[int, ...]], config: T5Config, source: str) -> None:
  """Raises `CheckpointMismatchError` unless `shapes` (flat name -> shape) is `config`'s tree."""
  check_shapes(shapes, t5x_param_shapes(config), source,
               hint=f'Expected the parameters of {config}. If the checkpoint is right, pass the '
               'config it was trained with (config=...); if it is partial, re-export it.')


def find_params(tree: Mapping[str, Any], source: str) -> Tuple[Tuple[str, ...], Mapping]:
  """(path, subtree) of the shallowest dict with token_embedder/encoder/decoder keys.

  Breadth first, so `target`/`params` win over optimizer mirrors, which are skipped anyway.
  """
  queue = [((), tree)]
  while queue:
    path, node = queue.pop(0)
    if {'token_embedder', 'encoder', 'decoder'} <= set(node):
      return path, node
    for key, child in node.items():
      if isinstance(child, Mapping) and key not in OPTIMIZER_KEYS:
        queue.append((path + (key,), child))
  raise ConfigError(f'{source} holds no T5 parameters: no subtree with token_embedder, encoder '
                    f'and decoder (top-level keys: {sorted(tree)}).')


# ---------------------------------------------------------------------------------------------
# Architecture


def infer_config(shapes: Mapping[str, Tuple[int, ...]], source: str, **overrides) -> T5Config:
  """A `T5Config` from a flat T5X name -> shape dict.

  Not recoverable from shapes, and so taken from `overrides` or T5X's defaults: the activations
  (two MLP inputs: T5 v1.1's gated GELU; one: ReLU), relative_attention_max_distance (128),
  dropout_rate, layer_norm_epsilon and dtype.
  """
  required = ('token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
              'encoder/layers_0/attention/query/kernel', 'encoder/layers_0/mlp/wo/kernel')
  missing = [n for n in required if n not in shapes]
  if missing:
    raise ConfigError(f'{source}: cannot infer the architecture, {missing} are missing; pass the '
                      'model config (config=T5Config(...) or a preset name) to check what else is '
                      'missing.')

  def count(stack):
    layers = {int(m.group(1)) for n in shapes if (m := re.match(rf'{stack}/layers_(\d+)/', n))}
    return max(layers) + 1 if layers else 0

  vocab_size, emb_dim = shapes['token_embedder/embedding']
  num_heads, num_buckets = shapes['encoder/relpos_bias/rel_embedding']
  num_wi = len({n for n in shapes if re.match(r'encoder/layers_0/mlp/wi(_\d+)?/kernel$', n)})
  fields = dict(
      vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads,
      num_encoder_layers=count('encoder'), num_decoder_layers=count('decoder'),
      head_dim=shapes['encoder/layers_0/attention/query/kernel'][1] // num_heads,
      mlp_dim=shapes['encoder/layers_0/mlp/wo/kernel'][0],
      mlp_activations=('relu',) if num_wi == 1 else ('gelu', 'linear'),
      relative_attention_num_buckets=num_buckets,
      logits_via_embedding=HEAD_KERNEL not in shapes)
  fields.update(overrides)
  return T5Config(**fields)


def as_config(config: Any) -> Optional[T5Config]:
  """`config` (a T5Config, preset name or dict) as a T5Config; None stays None."""
  if config is None or isinstance(config, T5Config):
    return config
  if isinstance(config, str):
    from specialize_jax.model import config as config_lib  # pylint: disable=g-import-not-at-top
    return config_lib.get_config(config)
  if isinstance(config, Mapping):
    return T5Config(**config)
  raise ValueError(f'config must be a T5Config, a preset name or a dict, got {type(config)}.')


def resolve_config(config: Any, shapes: Mapping[str, Tuple[int, ...]], source: str,
                   dtype: Optional[str]) -> T5Config:
  """`config` (else inferred from `shapes`), its dtype replaced by `dtype` when one is given.

  The compute dtype kept is the one given (`config=`) or stored with the checkpoint, else
  T5Config's default (float32); params are float32 whatever the dtype.
  """
  config = as_config(config)
  if config is None:
    config = infer_config(shapes, source)
  return config if dtype is None else dataclasses.replace(config, dtype=dtype)


def architecture(config: T5Config) -> Dict[str, Any]:
  """The fields that decide the parameters and the function (not dtype, dropout, what the backward
  pass rematerializes or how attention is computed)."""
  fields = dataclasses.asdict(config)
  for name in ('dtype', 'dropout_rate', 'remat_policy', 'attention_kernel',
               'float32_attention_logits'):
    fields.pop(name)
  return fields
