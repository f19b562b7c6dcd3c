"""DINOv2 and SigLIP tower weights (models/towers.py) from outside checkpoints.

Sources: transformers state dicts of Dinov2Model and SiglipVisionModel (also
with the `dinov2.` / `vision_model.` prefix of a bigger model's state dict,
and DINOv2's pre-v5 key names that hub files still carry), and big_vision
`.npz` SigLIP checkpoints (the `img` tower, looped `encoderblock_{i}` or
scanned `encoderblock` layout). The result is a nested dict in our layout,
layers stacked on axis 0, for `towers.from_params`.

Like the Kosmos-2 converter, nothing is dropped or initialised silently: a
key that is neither mapped nor named below as ignored, or a missing key, or a
shape that differs from the tower's, raises with the keys listed.
"""

import math
import re
from collections.abc import Callable

import ml_collections
import ml_dtypes
import numpy as np

from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import towers

# (source key, our parameter path, layer index or None, source -> ours).
Entry = tuple[str, tuple[str, ...], int | None, Callable[[np.ndarray], np.ndarray]]

_same = lambda a: a
_linear = lambda a: a.T  # torch [out, in] -> ours [in, out]
_conv = lambda a: a.transpose(2, 3, 1, 0)  # torch [O, I, kh, kw] -> ours [kh, kw, I, O]
_row = lambda a: a.reshape(a.shape[-1])  # [1, 1, d] or [1, d] -> [d]
_rows = lambda a: a.reshape(-1, a.shape[-1])  # [1, n, d] -> [n, d]; [H, hd, d] -> [H * hd, d]


def _heads_in(a):  # big_vision [d, H, hd] -> [d, H * hd]; its bias [H, hd] -> [H * hd]
  return a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1)


# --------------------------------------------------------------------------- configs


def dinov2_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """Tower config from a transformers Dinov2Config dict (`config.json`)."""
  if hf.get("model_type") not in ("dinov2", None):
    raise ConversionError(f"config model_type {hf.get('model_type')!r} is not 'dinov2'")
  if not hf.get("qkv_bias", True):
    raise ConversionError(
      "Dinov2Config qkv_bias=False is not supported (released DINOv2 has biases)"
    )
  width = hf.get("hidden_size", 768)
  hidden = int(width * hf.get("mlp_ratio", 4))
  swiglu = hf.get("use_swiglu_ffn", False)
  if swiglu:  # transformers' Dinov2SwiGLUFFN width: 2/3 of it, rounded up to 8
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
  return towers.dinov2_config(
    width=width,
    depth=hf.get("num_hidden_layers", 12),
    heads=hf.get("num_attention_heads", 12),
    mlp_dim=hidden,
    mlp="swiglu" if swiglu else hf.get("hidden_act", "gelu"),
    image_size=_side(hf.get("image_size", 224)),
    patch_size=_side(hf.get("patch_size", 14)),
    num_channels=hf.get("num_channels", 3),
    layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
    layer_scale=hf.get("layerscale_value", 1.0),
  )


def siglip_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """Tower config from a SiglipVisionConfig dict, or a SiglipConfig's (its
  `vision_config`)."""
  v = hf.get("vision_config", hf)
  if v.get("model_type") not in ("siglip_vision_model", None):
    raise ConversionError(f"config model_type {v.get('model_type')!r} is not a SigLIP vision model")
  return towers.siglip_config(
    width=v.get("hidden_size", 768),
    depth=v.get("num_hidden_layers", 12),
    heads=v.get("num_attention_heads", 12),
    mlp_dim=v.get("intermediate_size", 3072),
    mlp=v.get("hidden_act", "gelu_pytorch_tanh"),
    image_size=v.get("image_size", 224),
    patch_size=v.get("patch_size", 16),
    num_channels=v.get("num_channels", 3),
    layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    head=v.get("vision_use_head", True),
  )


def _side(size) -> int:
  if isinstance(size, (list, tuple)):
    if size[0] != size[1]:
      raise ConversionError(f"non-square size {size} is not supported")
    return size[0]
  return size


# --------------------------------------------------------------------------- shared


def _linear_entries(src, ours, layer=None) -> list[Entry]:
  return [
    (f"{src}.weight", (*ours, "kernel"), layer, _linear),
    (f"{src}.bias", (*ours, "bias"), layer, _same),
  ]


def _norm_entries(src, ours, layer=None, names=("weight", "bias"), sep=".") -> list[Entry]:
  return [
    (f"{src}{sep}{names[0]}", (*ours, "scale"), layer, _same),
    (f"{src}{sep}{names[1]}", (*ours, "bias"), layer, _same),
  ]


def _find_prefix(keys, marker: str, prefixes: tuple[str, ...]) -> str:
  """The first of `prefixes` under which `marker` is a key."""
  keys = set(keys)
  for prefix in prefixes:
    if prefix + marker in keys:
      return prefix
  raise ConversionError(
    f"no {marker!r} under any of the prefixes {list(prefixes)}: not this tower's checkpoint"
  )


def _strip_prefix(tensors: dict, marker: str, prefixes: tuple[str, ...]) -> dict:
  """The tensors under the first prefix that has `marker`, prefix removed."""
  prefix = _find_prefix(tensors, marker, prefixes)
  return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _convert(tensors: dict, entries: list[Entry], ignored: re.Pattern, cfg) -> dict:
  """Applies the key map; checks completeness and every shape against the tower's."""
  known = {e[0] for e in entries}
  unexpected = sorted(k for k in tensors if k not in known and not ignored.fullmatch(k))
  missing = sorted(k for k in known if k not in tensors)
  if unexpected or missing:
    raise ConversionError(
      f"checkpoint keys do not match a {cfg.kind} tower with this config:\n"
      f"  missing ({len(missing)}): {missing[:20]}\n"
      f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
    )
  params, stacks = {}, {}
  for key, path, layer, fn in entries:
    value = fn(np.asarray(tensors[key]))
    if layer is None:
      _nested_set(params, path, value)
    else:
      stacks.setdefault(path, []).append(value)
  for path, values in stacks.items():
    _nested_set(params, path, np.stack(values))
  _check_shapes(params, towers.abstract_params(cfg), cfg)
  return params


def _nested_set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _check_shapes(params: dict, expected: dict, cfg, prefix=()) -> None:
  bad = []
  for key, value in params.items():
    if isinstance(value, dict):
      _check_shapes(value, expected[key], cfg, (*prefix, key))
    elif tuple(value.shape) != tuple(expected[key].shape):
      bad.append(
        f"{'/'.join((*prefix, key))}: checkpoint {value.shape} vs tower {expected[key].shape}"
      )
  if bad:
    raise ConversionError(
      "shape mismatch:\n  " + "\n  ".join(bad) + "\n(a position table of another grid loads with "
      "position_grid set to its side; the tower then resizes it to image_size)"
    )


# --------------------------------------------------------------------------- DINOv2

# transformers before v5 (and the hub's facebook/dinov2-* files): old -> new names.
_DINOV2_RENAMES = (
  ("attention.attention.query.", "attention.q_proj."),
  ("attention.attention.key.", "attention.k_proj."),
  ("attention.attention.value.", "attention.v_proj."),
  ("attention.output.dense.", "attention.o_proj."),
  ("mlp.weights_out.", "mlp.down_proj."),
)
# mask_token: masked-image pretraining only; never used to encode an image.
_DINOV2_IGNORED = re.compile(r"embeddings\.mask_token")


def _dinov2_modern(tensors: dict) -> dict:
  out = {}
  for key, value in tensors.items():
    if ".mlp.weights_in." in key:  # fused SwiGLU input: [gate; up] on the output axis
      gate, up = np.split(np.asarray(value), 2, axis=0)
      out[key.replace("weights_in", "gate_proj")] = gate
      out[key.replace("weights_in", "up_proj")] = up
      continue
    for old, new in _DINOV2_RENAMES:
      key = key.replace(old, new)
    out[key] = value
  return out


def dinov2_key_map(cfg) -> list[Entry]:
  """Every tensor of a transformers Dinov2Model and where it lives in ours."""
  entries = [
    ("embeddings.cls_token", ("cls_token",), None, _row),
    ("embeddings.position_embeddings", ("position_embedding",), None, _rows),
    ("embeddings.patch_embeddings.projection.weight", ("patch_embedding", "kernel"), None, _conv),
    ("embeddings.patch_embeddings.projection.bias", ("patch_embedding", "bias"), None, _same),
    *_norm_entries("layernorm", ("norm",)),
  ]
  mlp = ("gate_proj", "up_proj", "down_proj") if cfg.mlp == "swiglu" else ("fc1", "fc2")
  for i in range(cfg.depth):
    src = f"encoder.layer.{i}"
    entries += _norm_entries(f"{src}.norm1", ("layers", "norm1"), i)
    entries += _norm_entries(f"{src}.norm2", ("layers", "norm2"), i)
    for ours, theirs in zip(("q_proj", "k_proj", "v_proj", "out_proj"), ("q", "k", "v", "o")):
      entries += _linear_entries(f"{src}.attention.{theirs}_proj", ("layers", "attn", ours), i)
    for name in mlp:
      entries += _linear_entries(f"{src}.mlp.{name}", ("layers", "mlp", name), i)
    for j in (1, 2):
      entries.append((f"{src}.layer_scale{j}.lambda1", ("layers", f"layer_scale{j}"), i, _same))
  return entries


def dinov2_from_hf(tensors: dict, cfg) -> dict:
  """transformers Dinov2Model state dict (numpy arrays; keys bare or under
  `dinov2.`) -> our params for `towers.from_params(cfg, ...)`."""
  tensors = _strip_prefix(tensors, "embeddings.cls_token", ("", "dinov2."))
  return _convert(_dinov2_modern(tensors), dinov2_key_map(cfg), _DINOV2_IGNORED, cfg)


# --------------------------------------------------------------------------- SigLIP, transformers


def siglip_key_map(cfg) -> list[Entry]:
  """Every tensor of a transformers SiglipVisionModel and where it lives in ours."""
  entries = [
    ("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), None, _conv),
    ("embeddings.patch_embedding.bias", ("patch_embedding", "bias"), None, _same),
    ("embeddings.position_embedding.weight", ("position_embedding",), None, _same),
    *_norm_entries("post_layernorm", ("norm",)),
  ]
  for i in range(cfg.depth):
    src = f"encoder.layers.{i}"
    entries += _norm_entries(f"{src}.layer_norm1", ("layers", "norm1"), i)
    entries += _norm_entries(f"{src}.layer_norm2", ("layers", "norm2"), i)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      entries += _linear_entries(f"{src}.self_attn.{name}", ("layers", "attn", name), i)
    for name in ("fc1", "fc2"):
      entries += _linear_entries(f"{src}.mlp.{name}", ("layers", "mlp", name), i)
  if cfg.head:
    d = cfg.width
    # torch.nn.MultiheadAttention packs q, k, v on the output axis of in_proj.
    for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
      rows = slice(n * d, (n + 1) * d)
      path = ("head", "attn", name)
      weight, bias = (lambda a, r=rows: a[r].T), (lambda a, r=rows: a[r])
      entries.append(("head.attention.in_proj_weight", (*path, "kernel"), None, weight))
      entries.append(("head.attention.in_proj_bias", (*path, "bias"), None, bias))
    entries += _linear_entries("head.attention.out_proj", ("head", "attn", "out_proj"))
    entries += [("head.probe", ("head", "probe"), None, _row)]
    entries += _norm_entries("head.layernorm", ("head", "norm"))
    entries += _linear_entries("head.mlp.fc1", ("head", "mlp", "fc1"))
    entries += _linear_entries("head.mlp.fc2", ("head", "mlp", "fc2"))
  return entries


def siglip_from_hf(tensors: dict, cfg) -> dict:
  """transformers SiglipVisionModel state dict (keys bare, or under
  `vision_model.` as in hub files and SiglipModel) -> our params. With
  cfg.head False, a checkpoint's MAP head is left out."""
  tensors = _strip_prefix(tensors, "embeddings.patch_embedding.weight", ("", "vision_model."))
  # position_ids: a derived buffer some files carry.
  ignored = r"embeddings\.position_ids" + ("" if cfg.head else r"|head\..*")
  return _convert(tensors, siglip_key_map(cfg), re.compile(ignored), cfg)


# --------------------------------------------------------------------------- SigLIP, big_vision


_IMG_PREFIXES = ("params/img/", "img/", "")


def read_npz(path: str, prefix: str = "") -> dict[str, np.ndarray]:
  """A big_vision `.npz` as a flat dict of arrays ("a/b/c" keys), only those
  under `prefix` (the others, e.g. a PaliGemma LLM, are never read)."""
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files if k.startswith(prefix)}
  # numpy has no bfloat16: big_vision's files store it as 2-byte void.
  return {
    k: a.view(ml_dtypes.bfloat16) if a.dtype.kind == "V" and a.dtype.itemsize == 2 else a
    for k, a in arrays.items()
  }


def _img_tree(arrays: dict, prefix: str | None) -> dict:
  prefixes = (prefix,) if prefix is not None else _IMG_PREFIXES
  tree = _strip_prefix(arrays, "embedding/kernel", prefixes)
  # Scanned layout: one `encoderblock` with a leading layer axis -> looped.
  stacked = "Transformer/encoderblock/"
  out = {}
  for key, value in tree.items():
    if key.startswith(stacked):
      for i in range(value.shape[0]):
        out[f"Transformer/encoderblock_{i}/{key[len(stacked) :]}"] = value[i]
    else:
      out[key] = value
  return out


def siglip_config_from_big_vision(arrays: dict, prefix: str | None = None, **overrides):
  """A SigLIP tower config read off a big_vision checkpoint's shapes
  (big_vision keeps no config beside the weights); **overrides e.g. head."""
  tree = _img_tree(arrays, prefix)
  p, _, c, width = tree["embedding/kernel"].shape
  grid = math.isqrt(tree["pos_embedding"].shape[-2])
  block = "Transformer/encoderblock_0/"
  return towers.siglip_config(
    **{
      "width": width,
      "patch_size": p,
      "num_channels": c,
      "image_size": grid * p,
      "depth": sum(1 for k in tree if k.endswith("/LayerNorm_0/scale") and "encoderblock_" in k),
      "heads": tree[block + "MultiHeadDotProductAttention_0/query/kernel"].shape[1],
      "mlp_dim": tree[block + "MlpBlock_0/Dense_0/kernel"].shape[-1],
      "head": "MAPHead_0/probe" in tree,
      **overrides,
    }
  )


def _bv_attention(src, ours, layer=None) -> list[Entry]:
  entries = []
  for theirs, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    entries += [
      (f"{src}/{theirs}/kernel", (*ours, name, "kernel"), layer, _heads_in),
      (f"{src}/{theirs}/bias", (*ours, name, "bias"), layer, _heads_in),
    ]
  return entries + [
    (f"{src}/out/kernel", (*ours, "out_proj", "kernel"), layer, _rows),  # [H, hd, d] -> [H*hd, d]
    (f"{src}/out/bias", (*ours, "out_proj", "bias"), layer, _same),
  ]


def _bv_dense(src, ours, layer=None) -> list[Entry]:
  return [
    (f"{src}/kernel", (*ours, "kernel"), layer, _same),
    (f"{src}/bias", (*ours, "bias"), layer, _same),
  ]


def _bv_norm(src, ours, layer=None) -> list[Entry]:
  return _norm_entries(src, ours, layer, names=("scale", "bias"), sep="/")


def big_vision_key_map(cfg) -> list[Entry]:
  """Every array of big_vision's looped SigLIP `img` tree and where it lives in ours."""
  entries = [
    ("embedding/kernel", ("patch_embedding", "kernel"), None, _same),  # already HWIO
    ("embedding/bias", ("patch_embedding", "bias"), None, _same),
    ("pos_embedding", ("position_embedding",), None, _rows),
    *_bv_norm("Transformer/encoder_norm", ("norm",)),
  ]
  for i in range(cfg.depth):
    src = f"Transformer/encoderblock_{i}"
    entries += _bv_norm(f"{src}/LayerNorm_0", ("layers", "norm1"), i)
    entries += _bv_norm(f"{src}/LayerNorm_1", ("layers", "norm2"), i)
    entries += _bv_attention(f"{src}/MultiHeadDotProductAttention_0", ("layers", "attn"), i)
    entries += _bv_dense(f"{src}/MlpBlock_0/Dense_0", ("layers", "mlp", "fc1"), i)
    entries += _bv_dense(f"{src}/MlpBlock_0/Dense_1", ("layers", "mlp", "fc2"), i)
  if cfg.head:
    entries += [("MAPHead_0/probe", ("head", "probe"), None, _row)]
    entries += _bv_attention("MAPHead_0/MultiHeadDotProductAttention_0", ("head", "attn"))
    entries += _bv_norm("MAPHead_0/LayerNorm_0", ("head", "norm"))
    entries += _bv_dense("MAPHead_0/MlpBlock_0/Dense_0", ("head", "mlp", "fc1"))
    entries += _bv_dense("MAPHead_0/MlpBlock_0/Dense_1", ("head", "mlp", "fc2"))
  return entries


def siglip_from_big_vision(arrays: dict, cfg, prefix: str | None = None) -> dict:
  """big_vision SigLIP arrays (`read_npz`; the `img` tower found under
  `params/img/`, `img/` or the root, or under `prefix`) -> our params.

  Ignored: `head/*` (a classifier, or PaliGemma's projector to the LLM, not
  part of the tower) and, with cfg.head False, `MAPHead_0/*`.
  """
  ignored = r"head/.*" + ("" if cfg.head else r"|MAPHead_0/.*")
  return _convert(_img_tree(arrays, prefix), big_vision_key_map(cfg), re.compile(ignored), cfg)


# --------------------------------------------------------------------------- files


def tower_from_hf_dir(path: str, *, allow_pickle: bool = False, **kw) -> towers.VisionTower:
  """A DINOv2 or SigLIP tower from a transformers snapshot directory
  (`config.json` + safetensors); **kw: dtype, param_dtype, remat, attention."""
  hf_config, tensors = hf.read_hf_dir(path, allow_pickle=allow_pickle)
  kind = hf_config.get("model_type")
  if kind == "dinov2":
    cfg = dinov2_config_from_hf(hf_config)
    return towers.from_params(cfg, dinov2_from_hf(tensors, cfg), **kw)
  if kind in ("siglip", "siglip_vision_model"):
    cfg = siglip_config_from_hf(hf_config)
    return towers.from_params(cfg, siglip_from_hf(tensors, cfg), **kw)
  raise ConversionError(
    f"{path}: model_type {kind!r} is not 'dinov2', 'siglip' or 'siglip_vision_model'"
  )


def tower_from_npz(path: str, prefix: str | None = None, **kw) -> towers.VisionTower:
  """A SigLIP tower from a big_vision `.npz`, its config read off the shapes;
  **kw: dtype, param_dtype, remat, attention."""
  if prefix is None:
    with np.load(path, allow_pickle=False) as f:
      prefix = _find_prefix(f.files, "embedding/kernel", _IMG_PREFIXES)
  arrays = read_npz(path, prefix)
  cfg = siglip_config_from_big_vision(arrays, prefix)
  return towers.from_params(cfg, siglip_from_big_vision(arrays, cfg, prefix), **kw)
