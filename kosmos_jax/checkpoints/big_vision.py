"""SigLIP and ViT tower weights (models/towers.py) from big_vision `.npz` files.

big_vision's SigLIP `img` tower and plain ViTs, and google-research/
vision_transformer's ViTs (the augreg files), looped `encoderblock_{i}` or
scanned `encoderblock` layout, with or without the `params/img/`, `img/`,
`params/` prefixes. The result is a nested dict in our layout, layers
stacked on axis 0, for `towers.from_params`; as for the transformers
formats (checkpoints/towers.py), nothing is dropped or initialised
silently.
"""

import math
import re

import ml_dtypes
import numpy as np

from kosmos_jax.checkpoints import towers as tower_ckpt
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import towers

_same = lambda a: a
_row = lambda a: a.reshape(a.shape[-1])  # [1, 1, d] or [1, d] -> [d]
_rows = lambda a: a.reshape(-1, a.shape[-1])  # [1, n, d] -> [n, d]; [H, hd, d] -> [H * hd, d]


def _heads_in(a):  # big_vision [d, H, hd] -> [d, H * hd]; its bias [H, hd] -> [H * hd]
  return a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1)


# SigLIP / PaliGemma files keep the tower under `img`; a ViT's is the root,
# under `params/` in a full training checkpoint.
_IMG_PREFIXES = ("params/img/", "img/", "params/", "")


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
  tree = tower_ckpt.strip_prefix(arrays, "embedding/kernel", prefixes)
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


def _shapes(tree: dict, grid: int) -> dict:
  """The config fields that a big_vision ViT tree's shapes tell (big_vision
  keeps no config beside the weights)."""
  p, _, c, width = tree["embedding/kernel"].shape
  block = "Transformer/encoderblock_0/"
  return {
    "width": width,
    "patch_size": p,
    "num_channels": c,
    "image_size": grid * p,
    "depth": sum(1 for k in tree if k.endswith("/LayerNorm_0/scale") and "encoderblock_" in k),
    "heads": tree[block + "MultiHeadDotProductAttention_0/query/kernel"].shape[1],
    "mlp_dim": tree[block + "MlpBlock_0/Dense_0/kernel"].shape[-1],
    "head": "MAPHead_0/probe" in tree,
  }


def siglip_config_from_big_vision(arrays: dict, prefix: str | None = None, **overrides):
  """A SigLIP tower config read off a big_vision checkpoint's shapes;
  **overrides e.g. head."""
  tree = _img_tree(arrays, prefix)
  grid = math.isqrt(tree["pos_embedding"].shape[-2])
  return towers.siglip_config(**{**_shapes(tree, grid), **overrides})


def _bv_attention(src, ours, layer=None) -> list[tower_ckpt.Entry]:
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


def _bv_dense(src, ours, layer=None) -> list[tower_ckpt.Entry]:
  return [
    (f"{src}/kernel", (*ours, "kernel"), layer, _same),
    (f"{src}/bias", (*ours, "bias"), layer, _same),
  ]


def _bv_norm(src, ours, layer=None) -> list[tower_ckpt.Entry]:
  return tower_ckpt.norm_entries(src, ours, layer, names=("scale", "bias"), sep="/")


def big_vision_key_map(cfg) -> list[tower_ckpt.Entry]:
  """Every array of big_vision's looped ViT tree (SigLIP's `img` tower, or a
  plain ViT's) and where it lives in ours."""
  entries = [
    ("embedding/kernel", ("patch_embedding", "kernel"), None, _same),  # already HWIO
    ("embedding/bias", ("patch_embedding", "bias"), None, _same),
    ("pos_embedding", ("position_embedding",), None, _rows),
    *_bv_norm("Transformer/encoder_norm", ("norm",)),
  ]
  if cfg.class_token:
    entries.append(("cls", ("cls_token",), None, _row))
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
  return tower_ckpt.convert(
    _img_tree(arrays, prefix), big_vision_key_map(cfg), re.compile(ignored), cfg
  )


# --------------------------------------------------------------------------- ViT, big_vision

# Where the position table lives: big_vision's vit.py; google-research/
# vision_transformer's (the augreg files); big_vision's name for the latter
# in its files from before 2022.
_POSEMB_KEYS = (
  "pos_embedding",
  "Transformer/posembed_input/pos_embedding",
  "Transformer/pos_embedding",
)
# vision_transformer's files keep the pre-linen module numbering, counted
# across module types within a block; big_vision's count per type (what
# flax's convert_pre_linen turns the former into).
_PRE_LINEN = {
  "LayerNorm_2": "LayerNorm_1",
  "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
  "MlpBlock_3": "MlpBlock_0",
}
_BLOCK = re.compile(r"(Transformer/encoderblock_\d+/)([^/]+)(/.*)")


def _vit_tree(arrays: dict, prefix: str | None) -> dict:
  """A big_vision or vision_transformer ViT tree in big_vision's naming,
  layers looped, the position table at `pos_embedding`."""
  tree = _img_tree(arrays, prefix)
  tables = [k for k in _POSEMB_KEYS if k in tree]
  if len(tables) != 1:
    raise ConversionError(
      f"expected one position table of {list(_POSEMB_KEYS)}, found {tables}"
      + ("" if tables else " (big_vision's fixed sincos2d positions are not supported)")
    )
  pre_linen = any("/MultiHeadDotProductAttention_1/" in k for k in tree)
  out, source = {}, {}
  for key, value in tree.items():
    new = "pos_embedding" if key == tables[0] else key
    block = _BLOCK.fullmatch(key)
    if pre_linen and block and block[2] in _PRE_LINEN:
      new = block[1] + _PRE_LINEN[block[2]] + block[3]
    if new in out:
      raise ConversionError(f"{source[new]!r} and {key!r} both name {new!r}: mixed naming")
    out[new], source[new] = value, key
  return out


def _grid_of(rows: int) -> tuple[int, bool]:
  """(grid side, whether a class-token row leads) of a position table."""
  for class_row in (False, True):
    side = math.isqrt(rows - class_row)
    if side * side == rows - class_row:
      return side, class_row
  raise ConversionError(f"pos_embedding of {rows} rows: neither a square grid nor 1 + one")


def vit_config_from_big_vision(arrays: dict, prefix: str | None = None, **overrides):
  """A ViT tower config read off a big_vision or vision_transformer
  checkpoint's shapes; **overrides e.g. mlp, layer_norm_eps."""
  tree = _vit_tree(arrays, prefix)
  grid, class_row = _grid_of(tree["pos_embedding"].shape[-2])
  if class_row and "cls" not in tree:
    raise ConversionError("pos_embedding has a class-token row, but there is no `cls`")
  # Both repositories' MlpBlock use flax's nn.gelu: the tanh approximation.
  return towers.vit_config(
    **{
      **_shapes(tree, grid),
      "class_token": "cls" in tree,
      "mlp": "gelu_pytorch_tanh",
      **overrides,
    }
  )


def _class_row(table: np.ndarray, cfg) -> np.ndarray:
  """big_vision adds the positions before prepending the class token, so its
  table has no class-token row; ours has (towers.vit_config). Adding a zero
  row is exact."""
  table = _rows(np.asarray(table))
  if cfg.class_token and table.shape[0] == towers.table_grid(cfg) ** 2:
    table = np.concatenate([np.zeros_like(table[:1]), table])
  return table


def vit_from_big_vision(arrays: dict, cfg, prefix: str | None = None) -> dict:
  """big_vision / vision_transformer ViT arrays (`read_npz`; the tree found
  under `params/img/`, `img/`, `params/` or the root, or under `prefix`) ->
  our params. Ignored: `head/*`, `pre_logits/*` (classifier layers after the
  tower) and, with cfg.head False, `MAPHead_0/*`."""
  tree = _vit_tree(arrays, prefix)
  tree["pos_embedding"] = _class_row(tree["pos_embedding"], cfg)
  ignored = r"head/.*|pre_logits/.*" + ("" if cfg.head else r"|MAPHead_0/.*")
  return tower_ckpt.convert(tree, big_vision_key_map(cfg), re.compile(ignored), cfg)


def npz_kind(arrays: dict, prefix: str | None = None) -> str:
  """The tower kind of a big_vision tree: "vit" with a class token (`cls`)
  or vision_transformer's names, else "siglip". A big_vision ViT without class token ("gap" / "map"
  pooling) thus reads as "siglip": SigLIP's image tower is that same network
  (same activation, norms and [-1, 1] inputs); pass kind="vit" to label it so."""
  tree = _img_tree(arrays, prefix)
  old = any(k in tree for k in _POSEMB_KEYS[1:]) or any(
    "/MultiHeadDotProductAttention_1/" in k for k in tree
  )
  return "vit" if "cls" in tree or old else "siglip"


def tower_from_npz(
  path: str, prefix: str | None = None, kind: str | None = None, **kw
) -> towers.VisionTower:
  """A SigLIP or ViT tower from a big_vision / vision_transformer `.npz`, its
  config read off the shapes; kind None: `npz_kind`'s guess; **kw: dtype,
  param_dtype, remat, attention."""
  if prefix is None:
    with np.load(path, allow_pickle=False) as f:
      prefix = tower_ckpt.find_prefix(f.files, "embedding/kernel", _IMG_PREFIXES)
  arrays = read_npz(path, prefix)
  kind = kind or npz_kind(arrays, prefix)
  if kind == "vit":
    cfg = vit_config_from_big_vision(arrays, prefix)
    return towers.from_params(cfg, vit_from_big_vision(arrays, cfg, prefix), **kw)
  if kind == "siglip":
    cfg = siglip_config_from_big_vision(arrays, prefix)
    return towers.from_params(cfg, siglip_from_big_vision(arrays, cfg, prefix), **kw)
  raise ConversionError(f"{path}: kind {kind!r} is not 'vit' or 'siglip'")
