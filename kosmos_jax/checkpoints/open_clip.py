"""SPHINX's CLIP ViT and ConvNeXt tower weights from open_clip state dicts.

Sources: open_clip model state dicts as the hub serves them
(`open_clip_model.safetensors`; `open_clip_pytorch_model.bin` only with
allow_pickle). The image tower lives under `visual.`; the rest of the file
(text tower, `logit_scale`) is never read. Two image towers:

  ViT       open_clip's VisionTransformer (`ViT-L-14`, pretrained `openai`) ->
            our `vision_model` (models/vit.py). Its `proj` (pooled token ->
            joint embedding) is left out by design: SPHINX takes all 257
            tokens after `ln_post`, and our ViT has no projection.
  ConvNeXt  a timm trunk under `visual.trunk.` (`convnext_xxlarge`,
            `laion2b_s34b_b82k_augreg_soup`) -> our ConvNeXt tower
            (models/convnext.py); the trunk's `head.norm` is the tower's
            final norm, which SPHINX applies at every position (`norm_map`).
            open_clip's own `visual.head.*` (projection to the embedding)
            is not the trunk's and is left out.

Both are renamed to transformers' names and go through the key maps of the
transformers loaders (checkpoints/hf.py for CLIP, checkpoints/convnext.py), so
each layout has one home. Keys are checked in open_clip's names first: a
missing or unexpected key in the part read, or a shape the config does not
give, raises `ConversionError` naming the open_clip key.
"""

import math
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
from flax import nnx

from kosmos_jax.checkpoints import convnext as convnext_ckpt
from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import convnext, vit
from kosmos_jax.models.config import model_config

VISUAL = "visual."
TRUNK = "visual.trunk."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# What open_clip's ViT has beyond our vision_model: the projection to the
# joint embedding (module doc).
_VIT_IGNORED = ("proj",)
# hf.key_map's prefix of the Kosmos-2 vision tower; its names below that are
# transformers' CLIPVisionModel's below `vision_model.`.
_HF_VIT = "vision_model.model."
_OPENAI_EPS = 1e-5  # open_clip's LayerNorm default, OpenAI's CLIP too


# --------------------------------------------------------------------------- files


def read_state_dict(path: str, allow_pickle: bool = False, prefix: str = "") -> dict:
  """An open_clip state dict as numpy arrays, only the keys under `prefix`
  (e.g. `VISUAL`: a safetensors file's text tower is then never read).

  `.safetensors` always; `.bin` / `.pt` / `.pth` are pickles, which can run
  code when loaded: refused unless allow_pickle, then read weights-only.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found")
  if path.endswith(".safetensors"):
    with safetensors.safe_open(path, framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
  if not path.endswith(_PICKLE_SUFFIXES):
    raise ConversionError(
      f"{path}: not a .safetensors file (nor a {'/'.join(_PICKLE_SUFFIXES)} pickle)"
    )
  if not allow_pickle:
    raise ConversionError(
      f"{path}: pickle checkpoints can run code when loaded and are refused; use "
      "open_clip_model.safetensors or pass allow_pickle=True"
    )
  return {k: v for k, v in hf.read_pickle(path).items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- shared


def _under(tensors: dict, prefix: str, marker: str, what: str) -> dict:
  """The tensors under `prefix`, prefix removed; `marker` must be there."""
  if prefix + marker not in tensors:
    raise ConversionError(f"no {prefix + marker!r}: not an open_clip {what} checkpoint")
  return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _rename(key: str, rules) -> str:
  for pattern, replacement in rules:
    match = re.fullmatch(pattern, key)
    if match:
      return match.expand(replacement)
  raise AssertionError(f"no open_clip name for {key!r}")  # a rule missing here


def _check_keys(tensors: dict, known, prefix: str, ignored=(), what="tower") -> None:
  unexpected = sorted(prefix + k for k in tensors if k not in known and k not in ignored)
  missing = sorted(prefix + k for k in known if k not in tensors)
  if missing or unexpected:
    raise ConversionError(
      f"open_clip keys do not match a {what} with this config:\n"
      f"  missing ({len(missing)}): {missing[:20]}\n"
      f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
    )


def _shape_errors(rows, expected: dict) -> list[str]:
  """rows: (open_clip key, its shape in the file, the array it gives (q, k or v
  alone for in_proj), our path, layer or None, array -> ours). One line per
  array that does not give the tower's shape (a stacked parameter's slice)."""
  bad = []
  for key, shape, raw, path, layer, fn in rows:
    want = expected[path][1:] if layer is not None else expected[path]
    try:
      got = tuple(fn(raw).shape)
    except ValueError:  # a transpose of the wrong rank
      got = None
    if got != want:
      bad.append(f"{key} {tuple(shape)}: gives {got}, {'/'.join(map(str, path))} wants {want}")
  return bad


# --------------------------------------------------------------------------- CLIP ViT

# transformers' CLIP vision names (below _HF_VIT) -> open_clip's (below
# `visual.`). q, k and v are row blocks of one in_proj (torch's
# MultiheadAttention packing), picked out in `_vit_rows`.
_VIT_NAMES = (
  (r"embeddings\.class_embedding", "class_embedding"),
  (r"embeddings\.patch_embedding\.weight", "conv1.weight"),
  (r"embeddings\.position_embedding\.weight", "positional_embedding"),
  (r"pre_layrnorm\.(\w+)", r"ln_pre.\1"),
  (r"post_layernorm\.(\w+)", r"ln_post.\1"),
  (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(\w+)", r"transformer.resblocks.\1.ln_\2.\3"),
  (
    r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(\w+)",
    r"transformer.resblocks.\1.attn.in_proj_\2",
  ),
  (
    r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)",
    r"transformer.resblocks.\1.attn.out_proj.\2",
  ),
  (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(\w+)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
  (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(\w+)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
)
_QKV = re.compile(r".*\.self_attn\.([qkv])_proj\..*")


def _vit_entries(depth: int) -> list[tuple[str, int | None, tuple, int | None, str]]:
  """(open_clip key, q/k/v block or None, path in vision_model, layer, layout)
  for every vision tensor of hf.key_map."""
  entries = []
  for key, path, layer, layout in hf.key_map(model_config(**{"vision.depth": depth})):
    if not key.startswith(_HF_VIT):
      continue  # the connector and text model of the Kosmos-2 map
    name = key[len(_HF_VIT) :]
    qkv = _QKV.fullmatch(name)
    block = "qkv".index(qkv.group(1)) if qkv else None
    entries.append((_rename(name, _VIT_NAMES), block, path[1:], layer, layout))
  return entries


def _vit_depth(visual: dict) -> int:
  layers = {
    int(m.group(1)) for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))
  }
  if not layers:
    raise ConversionError("no visual.transformer.resblocks.*: not an open_clip ViT checkpoint")
  return max(layers) + 1


def _vit_shape(visual: dict, heads: int | None, activation: str | None) -> dict:
  """The vision config keys that the weights fix (after the key check)."""
  conv = visual["conv1.weight"]  # [width, channels, patch, patch]
  width, patch = conv.shape[0], conv.shape[-1]
  rows = visual["positional_embedding"].shape[0]
  grid = math.isqrt(max(rows - 1, 0))
  if rows < 2 or grid * grid + 1 != rows:
    raise ConversionError(
      f"visual.positional_embedding has {rows} rows: not 1 + a square grid of patches"
    )
  return dict(
    width=width,
    depth=_vit_depth(visual),
    heads=heads or width // 64,  # OpenAI's CLIP ViTs: 64-wide heads (ViT-L/14: 16)
    mlp_dim=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
    num_channels=conv.shape[1],
    image_size=grid * patch,
    patch_size=patch,
    activation=activation or "quick_gelu",  # OpenAI's CLIP; open_clip's LAION ViTs use "gelu"
    layer_norm_eps=_OPENAI_EPS,
  )


# Which open_clip key shows each inferred value, for the config check.
_VIT_SOURCES = {
  "width": "conv1.weight",
  "patch_size": "conv1.weight",
  "num_channels": "conv1.weight",
  "depth": "transformer.resblocks.*",
  "mlp_dim": "transformer.resblocks.0.mlp.c_fc.weight",
}


def _check_vit_config(shape: dict, vision, heads, activation) -> None:
  bad = [
    f"{k} {shape[k]} (visual.{source}) vs config's {vision[k]}"
    for k, source in _VIT_SOURCES.items()
    if shape[k] != vision[k]
  ]
  grid, want = shape["image_size"] // shape["patch_size"], vit.position_grid(vision)
  if grid != want:
    bad.append(
      f"position grid {grid}x{grid} (visual.positional_embedding) vs config's {want}x{want}; "
      f"a config running it at another image_size sets vision.position_grid={grid}"
    )
  if vision.layer_norm_eps != _OPENAI_EPS:
    bad.append(f"layer_norm_eps: open_clip's is {_OPENAI_EPS}, config's {vision.layer_norm_eps}")
  for key, given in (("heads", heads), ("activation", activation)):
    if given is not None and given != vision[key]:
      bad.append(f"{key} {given!r} (argument) vs config's {vision[key]!r}")
  if bad:
    raise ConversionError("open_clip ViT does not match the vision config:\n  " + "\n  ".join(bad))


def _vit_shapes(vision) -> dict:
  make = lambda: vit.VisionTransformer(
    vision,
    rngs=nnx.Rngs(0),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat="none",
    attention="xla",
  )
  return dict(hf.leaf_shapes(nnx.to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))))


def _vit_rows(visual: dict, entries) -> list:
  rows = []
  for key, block, path, layer, layout in entries:
    raw = visual[key]
    shape = raw.shape
    if block is not None:  # q, k, v: consecutive thirds of in_proj's rows
      n = raw.shape[0] // 3
      raw = raw[block * n : (block + 1) * n]
    to_ours = lambda a, layout=layout: hf.to_ours(a, layout)
    rows.append((VISUAL + key, shape, raw, path, layer, to_ours))
  return rows


def clip_vit_from_open_clip(
  tensors: dict,
  vision: ml_collections.ConfigDict | None = None,
  *,
  heads: int | None = None,
  activation: str | None = None,
) -> tuple[dict, dict]:
  """open_clip VisionTransformer weights (keys under `visual.`) -> (overrides,
  params of our `vision_model`, layers stacked).

  overrides: the `vision.*` keys the checkpoint fixes, for
  `model_config(**overrides)`; width, depth, patch and image size (from
  positional_embedding's grid) and mlp_dim are read off the weights. heads
  cannot be: the argument, else vision.heads, else width / 64 (OpenAI's
  ViT-L/14: 16). activation likewise (OpenAI's CLIP: "quick_gelu").
  With `vision` (a model config's vision section) every inferred value is
  checked against it, and the params take its shapes.
  """
  visual = _under(tensors, VISUAL, "conv1.weight", "ViT")
  entries = _vit_entries(_vit_depth(visual))
  _check_keys(visual, {e[0] for e in entries}, VISUAL, _VIT_IGNORED, "CLIP ViT")
  if vision is not None:
    shape = _vit_shape(visual, heads or vision.heads, activation or vision.activation)
    _check_vit_config(shape, vision, heads, activation)
  else:
    shape = _vit_shape(visual, heads, activation)
    if not shape["heads"] or shape["width"] % shape["heads"]:
      raise ConversionError(
        f"width {shape['width']} (visual.conv1.weight) does not split into "
        f"{shape['heads']} heads: pass heads"
      )
    vision = model_config(**{f"vision.{k}": v for k, v in shape.items()}).vision
  rows = _vit_rows(visual, entries)
  bad = _shape_errors(rows, _vit_shapes(vision))
  if bad:
    raise ConversionError("shape mismatch:\n  " + "\n  ".join(bad))
  params, stacks = {}, {}
  for _, _, raw, path, layer, fn in rows:
    if layer is None:
      hf.nested_set(params, path, fn(np.asarray(raw)))
    else:
      stacks.setdefault(path, []).append(fn(np.asarray(raw)))
  for path, values in stacks.items():
    hf.nested_set(params, path, np.stack(values))
  return {f"vision.{k}": v for k, v in shape.items()}, params


# --------------------------------------------------------------------------- ConvNeXt

# transformers' ConvNextModel names -> timm's (below `visual.trunk.`).
_CONVNEXT_NAMES = (
  (r"embeddings\.patch_embeddings\.(\w+)", r"stem.0.\1"),
  (r"embeddings\.layernorm\.(\w+)", r"stem.1.\1"),
  (r"layernorm\.(\w+)", r"head.norm.\1"),
  (r"encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.(\w+)", r"stages.\1.downsample.\2.\3"),
  (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.(\w+)", r"stages.\1.blocks.\2.conv_dw.\3"),
  (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(\w+)", r"stages.\1.blocks.\2.norm.\3"),
  (
    r"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv([12])\.(\w+)",
    r"stages.\1.blocks.\2.mlp.fc\3.\4",
  ),
  (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", r"stages.\1.blocks.\2.gamma"),
)
_POINTWISE = re.compile(r".*\.mlp\.fc[12]\.weight")


def _pointwise(key: str, value):
  """timm's conv_mlp=True blocks keep their MLP as 1x1 convs, [out, in, 1, 1];
  the same matrix as a Linear's [out, in] (convnext_xxlarge's, conv_mlp=False)."""
  if _POINTWISE.fullmatch(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
    return value[:, :, 0, 0]
  return value


def convnext_config_from_open_clip(tensors: dict, **overrides) -> ml_collections.ConfigDict:
  """A ConvNeXt tower config read off an open_clip timm trunk: SPHINX's
  xxlarge preset (eps 1e-5, 256 px, norm_map) with the checkpoint's depths,
  widths, patch size and layer scale; **overrides win."""
  trunk = _under(tensors, TRUNK, "stem.0.weight", "ConvNeXt")
  depths, widths = [], []
  for s in sorted({int(m.group(1)) for k in trunk if (m := re.match(r"stages\.(\d+)\.", k))}):
    blocks = {m.group(1) for k in trunk if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k))}
    first = f"stages.{s}.blocks.0.conv_dw.weight"
    if not blocks or first not in trunk:
      raise ConversionError(f"no {TRUNK}{first}: not a timm ConvNeXt stage")
    depths.append(len(blocks))
    widths.append(trunk[first].shape[0])
  stem = trunk["stem.0.weight"]  # [width, channels, patch, patch]
  inferred = dict(
    depths=tuple(depths),
    hidden_sizes=tuple(widths),
    patch_size=stem.shape[-1],
    num_channels=stem.shape[1],
    # Only its presence matters for loading: the trained values replace it.
    layer_scale_init=1e-6 if any(k.endswith(".gamma") for k in trunk) else 0.0,
  )
  return convnext.convnext_config("xxlarge", **{**inferred, **overrides})


def convnext_from_open_clip(tensors: dict, cfg) -> dict:
  """open_clip timm ConvNeXt trunk weights (keys under `visual.trunk.`) ->
  our params for `convnext.from_params(cfg, ...)`. cfg: e.g. the model's
  `towers.convnext` (`convnext_config("xxlarge")`, SPHINX's) or
  `convnext_config_from_open_clip`. Outside the trunk nothing is read
  (open_clip's `visual.head.*` projection, the text tower)."""
  trunk = _under(tensors, TRUNK, "stem.0.weight", "ConvNeXt")
  entries = convnext_ckpt.key_map(cfg)
  names = {_rename(e[0], _CONVNEXT_NAMES): e[0] for e in entries}  # timm -> transformers
  _check_keys(trunk, names, TRUNK, what="ConvNeXt trunk")
  renamed = {names[k]: _pointwise(k, v) for k, v in trunk.items()}
  timm = {hf_key: timm_key for timm_key, hf_key in names.items()}
  rows = [
    (TRUNK + timm[key], trunk[timm[key]].shape, renamed[key], path, layer, fn)
    for key, path, layer, fn in entries
  ]
  bad = _shape_errors(rows, dict(hf.leaf_shapes(convnext.abstract_params(cfg))))
  if bad:
    raise ConversionError("shape mismatch:\n  " + "\n  ".join(bad))
  # The one home of the layout: transformers' loader builds the params.
  return convnext_ckpt.convnext_from_hf(renamed, cfg)
