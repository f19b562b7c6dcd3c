"""DINOv2, SigLIP, ViT and EVA tower weights (models/towers.py) from transformers checkpoints.

Sources: state dicts of Dinov2Model, SiglipVisionModel, ViTModel and
Blip2VisionModel (BLIP-2's EVA ViT-g) (also with the `dinov2.` /
`vision_model.` / `vit.` prefix of a bigger model's state dict, and the
pre-v5 key names that hub files still carry). The result is a nested dict in
our layout, layers stacked on axis 0, for `towers.from_params`. The shared
machinery here (`convert`, `find_prefix`, ...) also serves big_vision's
`.npz` files (checkpoints/big_vision.py).

Like the Kosmos-2 converter, nothing is dropped or initialised silently: a
key that is neither mapped nor named below as ignored, or a missing key, or a
shape that differs from the tower's, raises with the keys listed.
"""

import json
import os
import re
from collections.abc import Callable

import ml_collections
import numpy as np
import safetensors

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


def vit_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """Tower config from a transformers ViTConfig dict (`config.json`)."""
  if hf.get("model_type") not in ("vit", None):
    raise ConversionError(f"config model_type {hf.get('model_type')!r} is not 'vit'")
  if not hf.get("qkv_bias", True):
    raise ConversionError("ViTConfig qkv_bias=False is not supported (released ViTs have biases)")
  return towers.vit_config(
    width=hf.get("hidden_size", 768),
    depth=hf.get("num_hidden_layers", 12),
    heads=hf.get("num_attention_heads", 12),
    mlp_dim=hf.get("intermediate_size", 3072),
    mlp=hf.get("hidden_act", "gelu"),
    image_size=_side(hf.get("image_size", 224)),
    patch_size=_side(hf.get("patch_size", 16)),
    num_channels=hf.get("num_channels", 3),
    layer_norm_eps=hf.get("layer_norm_eps", 1e-12),  # ViTConfig's default, not flax's
  )


def eva_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """EVA tower config from a Blip2VisionConfig dict, or a Blip2Config's (its
  `vision_config`; BLIP-2's hub files spell out only what differs from the
  defaults, which are the release's)."""
  v = hf.get("vision_config", hf)
  if hf.get("model_type") not in ("blip-2", "blip_2_vision_model", None):
    raise ConversionError(f"config model_type {hf.get('model_type')!r} is not a BLIP-2 model")
  if not v.get("qkv_bias", True):
    raise ConversionError(
      "Blip2VisionConfig qkv_bias=False is not supported (released BLIP-2 has biases)"
    )
  return towers.eva_config(
    width=v.get("hidden_size", 1408),
    depth=v.get("num_hidden_layers", 39),
    heads=v.get("num_attention_heads", 16),
    mlp_dim=v.get("intermediate_size", 6144),
    mlp=v.get("hidden_act", "gelu"),
    image_size=_side(v.get("image_size", 224)),
    patch_size=_side(v.get("patch_size", 14)),
    num_channels=v.get("num_channels", 3),
    layer_norm_eps=v.get("layer_norm_eps", 1e-6),
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


def norm_entries(src, ours, layer=None, names=("weight", "bias"), sep=".") -> list[Entry]:
  return [
    (f"{src}{sep}{names[0]}", (*ours, "scale"), layer, _same),
    (f"{src}{sep}{names[1]}", (*ours, "bias"), layer, _same),
  ]


def find_prefix(keys, marker: str, prefixes: tuple[str, ...]) -> str:
  """The first of `prefixes` under which `marker` is a key."""
  keys = set(keys)
  for prefix in prefixes:
    if prefix + marker in keys:
      return prefix
  raise ConversionError(
    f"no {marker!r} under any of the prefixes {list(prefixes)}: not this tower's checkpoint"
  )


def strip_prefix(tensors: dict, marker: str, prefixes: tuple[str, ...]) -> dict:
  """The tensors under the first prefix that has `marker`, prefix removed."""
  prefix = find_prefix(tensors, marker, prefixes)
  return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def convert(tensors: dict, entries: list[Entry], ignored: re.Pattern, cfg) -> dict:
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
  expected, params, stacks, bad = towers.abstract_params(cfg), {}, {}, []
  for key, path, layer, fn in entries:
    want = hf.nested_get(expected, path).shape[0 if layer is None else 1 :]
    value = _converted(tensors[key], fn, want)
    if value is None:  # checked per array: a bad layer would otherwise fail np.stack
      bad.append(f"{key} -> {'/'.join(path)}: checkpoint {np.shape(tensors[key])} vs tower {want}")
    elif layer is None:
      hf.nested_set(params, path, value)
    else:
      stacks.setdefault(path, []).append(value)
  if bad:
    raise ConversionError(
      "shape mismatch (tower shapes in our layout; stacked layers: one layer's):\n  "
      + "\n  ".join(bad[:20])
      + "\n(a position table of another grid loads with position_grid set to its side; "
      "the tower then resizes it to image_size)"
    )
  for path, values in stacks.items():
    hf.nested_set(params, path, np.stack(values))
  return params


def _converted(array, fn, want: tuple) -> np.ndarray | None:
  """fn(array) if it has the shape `want`, else None."""
  try:
    value = fn(np.asarray(array))
  except (ValueError, IndexError):  # e.g. a reshape that the wrong shape cannot take
    return None
  return value if tuple(value.shape) == tuple(want) else None


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
    *norm_entries("layernorm", ("norm",)),
  ]
  mlp = ("gate_proj", "up_proj", "down_proj") if cfg.mlp == "swiglu" else ("fc1", "fc2")
  for i in range(cfg.depth):
    src = f"encoder.layer.{i}"
    entries += norm_entries(f"{src}.norm1", ("layers", "norm1"), i)
    entries += norm_entries(f"{src}.norm2", ("layers", "norm2"), i)
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
  tensors = strip_prefix(tensors, "embeddings.cls_token", ("", "dinov2."))
  return convert(_dinov2_modern(tensors), dinov2_key_map(cfg), _DINOV2_IGNORED, cfg)


# --------------------------------------------------------------------------- SigLIP, transformers


def siglip_key_map(cfg) -> list[Entry]:
  """Every tensor of a transformers SiglipVisionModel and where it lives in ours."""
  entries = [
    ("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), None, _conv),
    ("embeddings.patch_embedding.bias", ("patch_embedding", "bias"), None, _same),
    ("embeddings.position_embedding.weight", ("position_embedding",), None, _same),
    *norm_entries("post_layernorm", ("norm",)),
  ]
  for i in range(cfg.depth):
    src = f"encoder.layers.{i}"
    entries += norm_entries(f"{src}.layer_norm1", ("layers", "norm1"), i)
    entries += norm_entries(f"{src}.layer_norm2", ("layers", "norm2"), i)
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
    entries += norm_entries("head.layernorm", ("head", "norm"))
    entries += _linear_entries("head.mlp.fc1", ("head", "mlp", "fc1"))
    entries += _linear_entries("head.mlp.fc2", ("head", "mlp", "fc2"))
  return entries


def siglip_from_hf(tensors: dict, cfg) -> dict:
  """transformers SiglipVisionModel state dict (keys bare, or under
  `vision_model.` as in hub files and SiglipModel) -> our params. With
  cfg.head False, a checkpoint's MAP head is left out."""
  tensors = strip_prefix(tensors, "embeddings.patch_embedding.weight", ("", "vision_model."))
  # position_ids: a derived buffer some files carry.
  ignored = r"embeddings\.position_ids" + ("" if cfg.head else r"|head\..*")
  return convert(tensors, siglip_key_map(cfg), re.compile(ignored), cfg)


# --------------------------------------------------------------------------- ViT, transformers

# transformers before v5 (and the hub's google/vit-* files): old -> new names,
# in this order (the attention's `output.dense` goes before the MLP's).
_VIT_RENAMES = (
  ("encoder.layer.", "layers."),
  (".attention.attention.query.", ".attention.q_proj."),
  (".attention.attention.key.", ".attention.k_proj."),
  (".attention.attention.value.", ".attention.v_proj."),
  (".attention.output.dense.", ".attention.o_proj."),
  (".intermediate.dense.", ".mlp.fc1."),
  (".output.dense.", ".mlp.fc2."),
)
# mask_token: masked-image modelling only; pooler: a Dense + tanh after the tower.
_VIT_IGNORED = re.compile(r"embeddings\.mask_token|pooler\..*")


def _vit_modern(tensors: dict) -> dict:
  out = {}
  for key, value in tensors.items():
    for old, new in _VIT_RENAMES:
      key = key.replace(old, new)
    out[key] = value
  return out


def vit_key_map(cfg) -> list[Entry]:
  """Every tensor of a transformers ViTModel and where it lives in ours."""
  entries = [
    ("embeddings.cls_token", ("cls_token",), None, _row),
    # [1, 1 + grid², d]: a class-token row first, as our class-token towers'.
    ("embeddings.position_embeddings", ("position_embedding",), None, _rows),
    ("embeddings.patch_embeddings.projection.weight", ("patch_embedding", "kernel"), None, _conv),
    ("embeddings.patch_embeddings.projection.bias", ("patch_embedding", "bias"), None, _same),
    *norm_entries("layernorm", ("norm",)),
  ]
  for i in range(cfg.depth):
    src = f"layers.{i}"
    entries += norm_entries(f"{src}.layernorm_before", ("layers", "norm1"), i)
    entries += norm_entries(f"{src}.layernorm_after", ("layers", "norm2"), i)
    for ours, theirs in zip(("q_proj", "k_proj", "v_proj", "out_proj"), "qkvo"):
      entries += _linear_entries(f"{src}.attention.{theirs}_proj", ("layers", "attn", ours), i)
    for name in ("fc1", "fc2"):
      entries += _linear_entries(f"{src}.mlp.{name}", ("layers", "mlp", name), i)
  return entries


def vit_from_hf(tensors: dict, cfg) -> dict:
  """transformers ViTModel state dict (numpy arrays; keys bare or under `vit.`
  as in ViTForImageClassification; v5 or older names) -> our params."""
  if not cfg.class_token or cfg.head:
    raise ConversionError("a transformers ViTModel has a class token and no MAP head")
  tensors = strip_prefix(tensors, "embeddings.cls_token", ("", "vit."))
  return convert(_vit_modern(tensors), vit_key_map(cfg), _VIT_IGNORED, cfg)


# --------------------------------------------------------------------------- EVA (BLIP-2)

# Under `vision_model.` in a whole BLIP-2's state dict; the keys beside it
# (qformer., query_tokens: checkpoints/qformer.py; language_model.,
# language_projection.: not a tower's) are never read.
_EVA_PREFIXES = ("", "vision_model.")
_EVA_MARKER = "embeddings.class_embedding"
_NOTHING = re.compile(r"(?!)")  # a Blip2VisionModel has no buffers to skip


def _eva_fused_bias(tensors: dict) -> dict:
  """LAVIS's per-layer `q_bias` / `v_bias` (the names of early conversions)
  -> transformers' fused `qkv.bias` [q; 0; v], as transformers' own
  conversion builds it; dicts that already have `qkv.bias` pass unchanged."""
  out = dict(tensors)
  for key in [k for k in tensors if k.endswith(".self_attn.q_bias")]:
    block = key[: -len("q_bias")]
    if block + "v_bias" not in tensors:
      continue  # reported as unexpected by _convert, with qkv.bias missing
    if block + "qkv.bias" in tensors:
      raise ConversionError(f"{block}q_bias/v_bias and {block}qkv.bias: two key layouts at once")
    q, v = np.asarray(out.pop(key)), np.asarray(out.pop(block + "v_bias"))
    out[block + "qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
  return out


def _qkv_entries(src, ours, layer, width) -> list[Entry]:
  """The fused torch `qkv` Linear [3 * width, width] (q, k, v rows in that
  order, transformers' Blip2Attention) -> our separate projections."""
  entries = []
  for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
    rows = slice(n * width, (n + 1) * width)
    weight, bias = (lambda a, r=rows: a[r].T), (lambda a, r=rows: a[r])
    entries.append((f"{src}.qkv.weight", (*ours, name, "kernel"), layer, weight))
    entries.append((f"{src}.qkv.bias", (*ours, name, "bias"), layer, bias))
  return entries


def eva_key_map(cfg) -> list[Entry]:
  """Every tensor of a transformers Blip2VisionModel and where it lives in ours."""
  entries = [
    ("embeddings.class_embedding", ("cls_token",), None, _row),
    ("embeddings.position_embedding", ("position_embedding",), None, _rows),  # class row first
    ("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), None, _conv),
    ("embeddings.patch_embedding.bias", ("patch_embedding", "bias"), None, _same),
    *norm_entries("post_layernorm", ("norm",)),
  ]
  for i in range(cfg.depth):
    src = f"encoder.layers.{i}"
    entries += norm_entries(f"{src}.layer_norm1", ("layers", "norm1"), i)
    entries += norm_entries(f"{src}.layer_norm2", ("layers", "norm2"), i)
    entries += _qkv_entries(f"{src}.self_attn", ("layers", "attn"), i, cfg.width)
    entries += _linear_entries(f"{src}.self_attn.projection", ("layers", "attn", "out_proj"), i)
    for name in ("fc1", "fc2"):
      entries += _linear_entries(f"{src}.mlp.{name}", ("layers", "mlp", name), i)
  return entries


def eva_from_hf(tensors: dict, cfg) -> dict:
  """transformers Blip2VisionModel state dict (numpy arrays; keys bare, or
  under `vision_model.` as in Blip2Model / Blip2ForConditionalGeneration
  files, whose other keys are not read) -> our params."""
  if cfg.kind != "eva" or not cfg.class_token or cfg.head or cfg.layer_scale is not None:
    raise ConversionError("a Blip2VisionModel loads into an eva_config tower")
  tensors = _eva_fused_bias(strip_prefix(tensors, _EVA_MARKER, _EVA_PREFIXES))
  return convert(tensors, eva_key_map(cfg), _NOTHING, cfg)


def _read_vision_model(path: str) -> dict | None:
  """Only the `vision_model.` tensors of a whole BLIP-2's safetensors
  snapshot (its LLM is many times the tower's size), or None where the
  snapshot is not that (then hf.read_hf_dir reads or explains)."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  elif os.path.isfile(single):
    with safetensors.safe_open(single, "numpy") as f:
      weight_map = dict.fromkeys(f.keys(), "model.safetensors")
  else:
    return None
  by_file = {}
  for key, name in weight_map.items():
    if key.startswith("vision_model."):
      by_file.setdefault(name, []).append(key)
  if not by_file:
    return None
  tensors = {}
  for name, keys in sorted(by_file.items()):
    with safetensors.safe_open(os.path.join(path, name), "numpy") as f:
      tensors.update({k: f.get_tensor(k) for k in keys})
  return tensors


# --------------------------------------------------------------------------- files


def _read_hf_dir(path: str, allow_pickle: bool) -> tuple[dict, dict]:
  """(config.json, tensors) of a snapshot; of a whole BLIP-2's, only the
  vision model's tensors."""
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    with open(config_path) as f:
      hf_config = json.load(f)
    if hf_config.get("model_type") == "blip-2":
      tensors = _read_vision_model(path)
      if tensors is not None:
        return hf_config, tensors
  return hf.read_hf_dir(path, allow_pickle=allow_pickle)


_HF_KINDS = ("dinov2", "siglip", "siglip_vision_model", "vit", "blip-2", "blip_2_vision_model")


def tower_from_hf_dir(path: str, *, allow_pickle: bool = False, **kw) -> towers.VisionTower:
  """A DINOv2, SigLIP, ViT or EVA tower from a transformers snapshot
  directory (`config.json` + safetensors; of a whole BLIP-2, only its
  `vision_model.` tensors are read); **kw: dtype, param_dtype, remat,
  attention."""
  hf_config, tensors = _read_hf_dir(path, allow_pickle)
  kind = hf_config.get("model_type")
  if kind == "dinov2":
    cfg = dinov2_config_from_hf(hf_config)
    return towers.from_params(cfg, dinov2_from_hf(tensors, cfg), **kw)
  if kind in ("siglip", "siglip_vision_model"):
    cfg = siglip_config_from_hf(hf_config)
    return towers.from_params(cfg, siglip_from_hf(tensors, cfg), **kw)
  if kind == "vit":
    cfg = vit_config_from_hf(hf_config)
    return towers.from_params(cfg, vit_from_hf(tensors, cfg), **kw)
  if kind in ("blip-2", "blip_2_vision_model"):
    cfg = eva_config_from_hf(hf_config)
    return towers.from_params(cfg, eva_from_hf(tensors, cfg), **kw)
  raise ConversionError(f"{path}: model_type {kind!r} is not one of {list(_HF_KINDS)}")
