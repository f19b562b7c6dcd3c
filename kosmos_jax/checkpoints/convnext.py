"""ConvNeXt tower weights (models/convnext.py) from transformers checkpoints.

Source: a ConvNextModel state dict, keys bare or under `convnext.` (as in
ConvNextForImageClassification and the hub's facebook/convnext-* files; what
lies outside that prefix, the classifier, is not the tower's). The result is
a nested dict in our layout, each stage's blocks stacked on axis 0, for
`convnext.from_params`. Nothing is dropped or initialised silently: a missing
or unexpected key, or a shape that differs from the tower's, raises
`ConversionError` with the keys listed.
"""

from collections.abc import Callable

import ml_collections
import numpy as np

from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import convnext, layers

# (source key, our parameter path, block index or None, source -> ours).
Entry = tuple[str, tuple, int | None, Callable[[np.ndarray], np.ndarray]]

_same = lambda a: a
_linear = lambda a: a.T  # torch [out, in] -> ours [in, out]
_conv = lambda a: a.transpose(2, 3, 1, 0)  # torch [O, I, kh, kw] -> ours [kh, kw, I, O]
_MARKER = "embeddings.patch_embeddings.weight"


def convnext_config_from_hf(cfg: dict) -> ml_collections.ConfigDict:
  """Tower config from a transformers ConvNextConfig dict (`config.json`)."""
  kind = cfg.get("model_type")
  if kind not in ("convnext", None):
    # ConvNeXt V2's blocks add GRN and drop layer scale: other weights.
    raise ConversionError(f"config model_type {kind!r} is not 'convnext'")
  depths = tuple(cfg.get("depths", (3, 3, 9, 3)))
  sizes = tuple(cfg.get("hidden_sizes", (96, 192, 384, 768)))
  stages = cfg.get("num_stages", len(depths))
  if not len(depths) == len(sizes) == stages:
    raise ConversionError(f"depths {depths}, hidden_sizes {sizes}, num_stages {stages} disagree")
  act = cfg.get("hidden_act", "gelu")
  if act not in layers.ACTIVATIONS:
    raise ConversionError(f"hidden_act {act!r} is not one of {sorted(layers.ACTIVATIONS)}")
  size = cfg.get("image_size", 224)
  return convnext.convnext_config(
    "tiny",
    depths=depths,
    hidden_sizes=sizes,
    image_size=size[0] if isinstance(size, (list, tuple)) else size,
    num_channels=cfg.get("num_channels", 3),
    patch_size=cfg.get("patch_size", 4),
    activation=act,
    layer_norm_eps=1e-6,  # transformers hardwires it below the final norm
    head_norm_eps=cfg.get("layer_norm_eps", 1e-12),
    layer_scale_init=cfg.get("layer_scale_init_value", 1e-6),
    drop_path=cfg.get("drop_path_rate", 0.0),
  )


def _pair(src, ours, names=("weight", "bias"), to=("scale", "bias"), layer=None, fn=_same):
  return [
    (f"{src}.{names[0]}", (*ours, to[0]), layer, fn),
    (f"{src}.{names[1]}", (*ours, to[1]), layer, _same),
  ]


def key_map(cfg) -> list[Entry]:
  """Every tensor of a transformers ConvNextModel and where it lives in ours."""
  entries = [
    ("embeddings.patch_embeddings.weight", ("stem_kernel",), None, _conv),
    ("embeddings.patch_embeddings.bias", ("stem_bias",), None, _same),
    *_pair("embeddings.layernorm", ("stem_norm",)),
    *_pair("layernorm", ("norm",)),
  ]
  for s, depth in enumerate(cfg.depths):
    src, ours = f"encoder.stages.{s}", ("stages", s)
    if s > 0:
      entries += _pair(f"{src}.downsampling_layer.0", (*ours, "downsample_norm"))
      entries += [
        (f"{src}.downsampling_layer.1.weight", (*ours, "downsample_kernel"), None, _conv),
        (f"{src}.downsampling_layer.1.bias", (*ours, "downsample_bias"), None, _same),
      ]
    blocks = (*ours, "blocks")
    for i in range(depth):
      at = f"{src}.layers.{i}"
      entries += [
        (f"{at}.dwconv.weight", (*blocks, "dwconv_kernel"), i, _conv),
        (f"{at}.dwconv.bias", (*blocks, "dwconv_bias"), i, _same),
        *_pair(f"{at}.layernorm", (*blocks, "norm"), layer=i),
        *_pair(f"{at}.pwconv1", (*blocks, "pwconv1"), to=("kernel", "bias"), layer=i, fn=_linear),
        *_pair(f"{at}.pwconv2", (*blocks, "pwconv2"), to=("kernel", "bias"), layer=i, fn=_linear),
      ]
      if cfg.layer_scale_init > 0:
        entries.append((f"{at}.layer_scale_parameter", (*blocks, "gamma"), i, _same))
  return entries


def convnext_from_hf(tensors: dict, cfg) -> dict:
  """transformers ConvNextModel state dict (numpy arrays; keys bare or under
  `convnext.`) -> our params for `convnext.from_params(cfg, ...)`."""
  prefix = next((p for p in ("", "convnext.") if p + _MARKER in tensors), None)
  if prefix is None:
    raise ConversionError(f"no {_MARKER!r}, bare or under 'convnext.': not a ConvNeXt checkpoint")
  tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
  entries = key_map(cfg)
  known = {e[0] for e in entries}
  missing = sorted(known - set(tensors))
  unexpected = sorted(set(tensors) - known)
  if missing or unexpected:
    raise ConversionError(
      "checkpoint keys do not match a convnext tower with this config:\n"
      f"  missing ({len(missing)}): {missing[:20]}\n"
      f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
    )
  flat, stacks = {}, {}
  for key, path, layer, fn in entries:
    value = fn(np.asarray(tensors[key]))
    if layer is None:
      flat[path] = value
    else:
      stacks.setdefault(path, []).append(value)
  flat.update({path: np.stack(values) for path, values in stacks.items()})
  _check_shapes(flat, _flatten(convnext.abstract_params(cfg)))
  params = {}
  for path, value in flat.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return params


def _flatten(tree: dict, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def _check_shapes(flat: dict, expected: dict) -> None:
  name = lambda path: "/".join(map(str, path))
  bad = [
    f"{name(p)}: checkpoint {v.shape} vs tower {expected[p].shape}"
    for p, v in flat.items()
    if tuple(v.shape) != tuple(expected[p].shape)
  ]
  # The key map and the module must agree: a path of one alone is a bug here.
  stray = [f"{name(p)}: in only one of key map and tower" for p in set(flat) ^ set(expected)]
  if bad or stray:
    raise ConversionError("shape mismatch:\n  " + "\n  ".join(bad + sorted(stray)))


def convnext_from_hf_dir(path: str, *, allow_pickle: bool = False, **kw) -> convnext.ConvNeXt:
  """A ConvNeXt tower from a transformers snapshot directory (`config.json` +
  safetensors); **kw: dtype, param_dtype, remat."""
  hf_config, tensors = hf.read_hf_dir(path, allow_pickle=allow_pickle)
  cfg = convnext_config_from_hf(hf_config)
  return convnext.from_params(cfg, convnext_from_hf(tensors, cfg), **kw)
