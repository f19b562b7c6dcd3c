"""Hugging Face Kosmos-2 checkpoints <-> our parameters (reference/kosmos2.md 1.8).

Reads `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`; writes a directory that
`transformers.Kosmos2ForConditionalGeneration.from_pretrained` loads. Pickle
(`pytorch_model.bin`) is refused unless asked for, then unpickled weights-only.
Nothing is dropped or initialised silently: any key or shape mismatch raises
with the offending keys listed.
"""

import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
import tqdm

from kosmos_jax import errors
from kosmos_jax.models import vit
from kosmos_jax.models.config import model_config
from kosmos_jax.processing import views

# Buffers some checkpoints carry; they are derived, never learned.
_IGNORED = (
  re.compile(r"vision_model\.model\.embeddings\.position_ids"),
  re.compile(r"text_model\.model\.embed_positions\.weights?"),
)
_TIED_HEAD = "text_model.lm_head.weight"
_EMBED = "text_model.model.embed_tokens.weight"


class ConversionError(errors.UserError):
  """A checkpoint that does not convert: the message names the file or keys."""


# --------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """Model config from a Hugging Face Kosmos-2 `config.json` dict."""
  if hf.get("model_type") not in ("kosmos-2", None):
    raise ConversionError(
      f"config.json has model_type {hf.get('model_type')!r}, expected 'kosmos-2'"
    )
  t, v = hf.get("text_config", {}), hf.get("vision_config", {})
  if t.get("add_cross_attention"):
    raise ConversionError("text_config.add_cross_attention=True is not Kosmos-2")
  base = model_config()
  pick = lambda d, key, default: d.get(key, default)
  return model_config(
    **{
      "text.vocab_size": pick(t, "vocab_size", base.text.vocab_size),
      "text.max_positions": pick(t, "max_position_embeddings", base.text.max_positions),
      "text.width": pick(t, "embed_dim", base.text.width),
      "text.depth": pick(t, "layers", base.text.depth),
      "text.ffn_dim": pick(t, "ffn_dim", base.text.ffn_dim),
      "text.heads": pick(t, "attention_heads", base.text.heads),
      "text.activation": pick(t, "activation_function", base.text.activation),
      "text.dropout": pick(t, "dropout", base.text.dropout),
      "text.attention_dropout": pick(t, "attention_dropout", base.text.attention_dropout),
      "text.activation_dropout": pick(t, "activation_dropout", base.text.activation_dropout),
      "text.layer_norm_eps": pick(t, "layer_norm_eps", base.text.layer_norm_eps),
      "text.scale_embedding": pick(t, "scale_embedding", base.text.scale_embedding),
      "text.pad_id": pick(t, "pad_token_id", base.text.pad_id),
      "text.bos_id": pick(t, "bos_token_id", base.text.bos_id),
      "text.eos_id": pick(t, "eos_token_id", base.text.eos_id),
      "vision.width": pick(v, "hidden_size", base.vision.width),
      "vision.mlp_dim": pick(v, "intermediate_size", base.vision.mlp_dim),
      "vision.depth": pick(v, "num_hidden_layers", base.vision.depth),
      "vision.heads": pick(v, "num_attention_heads", base.vision.heads),
      "vision.num_channels": pick(v, "num_channels", base.vision.num_channels),
      "vision.image_size": pick(v, "image_size", base.vision.image_size),
      "vision.patch_size": pick(v, "patch_size", base.vision.patch_size),
      "vision.activation": pick(v, "hidden_act", base.vision.activation),
      "vision.layer_norm_eps": pick(v, "layer_norm_eps", base.vision.layer_norm_eps),
      "vision.attention_dropout": pick(v, "attention_dropout", base.vision.attention_dropout),
      "latent_query_num": hf.get("latent_query_num", base.latent_query_num),
      "magneto_init": False,
    }
  )


def _check_convertible(cfg: ml_collections.ConfigDict) -> None:
  # transformers' Kosmos-2 has only the released one-layer connector: a
  # perceiver model has no Hugging Face twin to read from or write to.
  kind = cfg.get("connector", "kosmos2")
  if kind != "kosmos2":
    raise ConversionError(
      f"model.connector={kind!r} has no Hugging Face Kosmos-2 equivalent; only "
      "model.connector='kosmos2' converts to or from transformers (use Orbax checkpoints)"
    )
  # Nor other modalities' soft tokens (PandaGPT-style projections and tags).
  if cfg.get("modalities"):
    raise ConversionError(
      f"model.modalities={dict(cfg.modalities)!r} has no Hugging Face Kosmos-2 "
      "equivalent; only a model without modalities converts to or from "
      "transformers (use Orbax checkpoints)"
    )
  # Nor SPHINX's extra vision towers (their own loaders: checkpoints/towers.py).
  if cfg.get("towers"):
    raise ConversionError(
      f"model.towers={sorted(cfg.towers)} has no Hugging Face Kosmos-2 equivalent; only "
      "a model without extra towers converts to or from transformers (use Orbax checkpoints)"
    )
  # Nor SPHINX's sub-image views (their tags are parameters it lacks).
  if views.tagged(cfg.vision):
    raise ConversionError(
      f"model.vision.views={dict(cfg.vision.views)} has no Hugging Face Kosmos-2 "
      "equivalent; only a single view converts to or from transformers (use Orbax checkpoints)"
    )
  # Nor has it xPos (KOSMOS-1): its decoder only adds the sinusoidal table.
  position = cfg.text.get("position", "sinusoidal")
  if position != "sinusoidal":
    raise ConversionError(
      f"model.text.position={position!r} has no Hugging Face Kosmos-2 equivalent; only "
      "'sinusoidal' converts to or from transformers (use Orbax checkpoints)"
    )


def config_to_hf(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """A `config.json` dict that transformers' Kosmos2Config reads back exactly.

  transformers sizes the position table from `image_size`, so a model run at
  another size than its table's grid (`vision.position_grid`) is written with
  the table's image size; transformers then matches it at `vision.image_size`
  with `interpolate_pos_encoding=True`.
  """
  _check_convertible(cfg)
  t, v = cfg.text, cfg.vision
  image_size = v.image_size if not v.get("position_grid") else v.position_grid * v.patch_size
  return {
    "architectures": ["Kosmos2ForConditionalGeneration"],
    "model_type": "kosmos-2",
    "latent_query_num": cfg.latent_query_num,
    "tie_word_embeddings": True,
    "text_config": {
      "model_type": "kosmos_2_text_model",
      "vocab_size": t.vocab_size,
      "max_position_embeddings": t.max_positions,
      "embed_dim": t.width,
      "layers": t.depth,
      "ffn_dim": t.ffn_dim,
      "attention_heads": t.heads,
      "activation_function": t.activation,
      "dropout": t.dropout,
      "attention_dropout": t.attention_dropout,
      "activation_dropout": t.activation_dropout,
      "layerdrop": 0.0,
      "layer_norm_eps": t.layer_norm_eps,
      "scale_embedding": t.scale_embedding,
      "use_cache": True,
      "pad_token_id": t.pad_id,
      "bos_token_id": t.bos_id,
      "eos_token_id": t.eos_id,
    },
    "vision_config": {
      "model_type": "kosmos_2_vision_model",
      "hidden_size": v.width,
      "intermediate_size": v.mlp_dim,
      "num_hidden_layers": v.depth,
      "num_attention_heads": v.heads,
      "num_channels": v.num_channels,
      "image_size": image_size,
      "patch_size": v.patch_size,
      "hidden_act": v.activation,
      "layer_norm_eps": v.layer_norm_eps,
      "attention_dropout": v.attention_dropout,
    },
  }


# --------------------------------------------------------------------------- key map
# Each entry: (HF key, our parameter path, layer index or None, layout).
# Layouts: "linear" (torch [out, in] <-> ours [in, out]), "conv" (torch
# [O, I, kh, kw] <-> ours [kh, kw, I, O]), "same".


def _linear(hf, ours):
  return [(f"{hf}.weight", (*ours, "kernel"), "linear"), (f"{hf}.bias", (*ours, "bias"), "same")]


def _norm(hf, ours):
  return [(f"{hf}.weight", (*ours, "scale"), "same"), (f"{hf}.bias", (*ours, "bias"), "same")]


def _attention(hf, ours):
  return [
    e for p in ("q_proj", "k_proj", "v_proj", "out_proj") for e in _linear(f"{hf}.{p}", (*ours, p))
  ]


def key_map(cfg: ml_collections.ConfigDict) -> list[tuple[str, tuple[str, ...], int | None, str]]:
  """Every HF tensor of a Kosmos-2 with this config and where it lives in ours."""
  _check_convertible(cfg)
  entries = []
  vm, vo = "vision_model.model", ("vision_model",)
  entries += [
    (f"{vm}.embeddings.class_embedding", (*vo, "class_embedding"), None, "same"),
    (f"{vm}.embeddings.patch_embedding.weight", (*vo, "patch_embedding"), None, "conv"),
    (f"{vm}.embeddings.position_embedding.weight", (*vo, "position_embedding"), None, "same"),
  ]
  entries += [(k, p, None, l) for k, p, l in _norm(f"{vm}.pre_layrnorm", (*vo, "pre_layrnorm"))]
  entries += [(k, p, None, l) for k, p, l in _norm(f"{vm}.post_layernorm", (*vo, "post_layernorm"))]
  for i in range(cfg.vision.depth):
    hf, ours = f"{vm}.encoder.layers.{i}", (*vo, "layers")
    layer = (
      _attention(f"{hf}.self_attn", (*ours, "self_attn"))
      + _norm(f"{hf}.layer_norm1", (*ours, "layer_norm1"))
      + _norm(f"{hf}.layer_norm2", (*ours, "layer_norm2"))
      + _linear(f"{hf}.mlp.fc1", (*ours, "fc1"))
      + _linear(f"{hf}.mlp.fc2", (*ours, "fc2"))
    )
    entries += [(k, p, i, l) for k, p, l in layer]
  po = ("image_to_text_projection",)
  proj = (
    _linear("image_to_text_projection.dense", (*po, "dense"))
    + [("image_to_text_projection.latent_query", (*po, "latent_query"), "same")]
    + _attention("image_to_text_projection.x_attn", (*po, "x_attn"))
  )
  entries += [(k, p, None, l) for k, p, l in proj]
  tm, to = "text_model.model", ("text_model",)
  entries += [(_EMBED, (*to, "embed_tokens"), None, "same")]
  entries += [(k, p, None, l) for k, p, l in _norm(f"{tm}.layer_norm", (*to, "layer_norm"))]
  for i in range(cfg.text.depth):
    hf, ours = f"{tm}.layers.{i}", (*to, "layers")
    layer = (
      _attention(f"{hf}.self_attn", (*ours, "self_attn"))
      + _norm(f"{hf}.self_attn.inner_attn_ln", (*ours, "self_attn", "inner_attn_ln"))
      + _norm(f"{hf}.self_attn_layer_norm", (*ours, "self_attn_layer_norm"))
      + _norm(f"{hf}.final_layer_norm", (*ours, "final_layer_norm"))
      + _linear(f"{hf}.ffn.fc1", (*ours, "fc1"))
      + _norm(f"{hf}.ffn.ffn_layernorm", (*ours, "ffn_layernorm"))
      + _linear(f"{hf}.ffn.fc2", (*ours, "fc2"))
    )
    entries += [(k, p, i, l) for k, p, l in layer]
  return entries


def to_ours(x: np.ndarray, layout: str) -> np.ndarray:
  return {"linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0), "same": lambda a: a}[
    layout
  ](x)


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  return {"linear": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1), "same": lambda a: a}[
    layout
  ](x)


def nested_set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def nested_get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def leaf_shapes(tree: dict, prefix=()) -> Iterator[tuple[tuple[str, ...], tuple[int, ...]]]:
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from leaf_shapes(v, (*prefix, k))
    else:
      yield (*prefix, k), tuple(v.shape)


def hf_to_params(
  tensors: dict[str, np.ndarray],
  cfg: ml_collections.ConfigDict,
  expected_shapes: dict | None = None,
  progress: bool = False,
) -> dict:
  """HF state dict -> nested dict of numpy arrays in our layout (layers stacked).

  `expected_shapes` (a nested dict of arrays or ShapeDtypeStructs, e.g. from
  `jax.eval_shape` of the model) makes shape mismatches an error naming both keys.
  """
  entries = key_map(cfg)
  known = {k for k, _, _, _ in entries}
  unexpected = sorted(
    k
    for k in tensors
    if k not in known and k != _TIED_HEAD and not any(p.fullmatch(k) for p in _IGNORED)
  )
  missing = sorted(k for k in known if k not in tensors)
  if unexpected or missing:
    raise ConversionError(
      "checkpoint keys do not match a Kosmos-2 with this config:\n"
      f"  missing ({len(missing)}): {missing[:20]}\n"
      f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
    )
  if _TIED_HEAD in tensors and not np.array_equal(tensors[_TIED_HEAD], tensors[_EMBED]):
    raise ConversionError(f"{_TIED_HEAD} differs from {_EMBED}; Kosmos-2 ties them")

  stacks: dict[tuple[str, ...], list] = {}
  params: dict = {}
  for hf_key, path, layer, layout in tqdm.tqdm(
    entries, desc="converting", unit="tensor", disable=not progress
  ):
    value = to_ours(np.asarray(tensors[hf_key]), layout)
    if layer is None:
      nested_set(params, path, value)
    else:
      stacks.setdefault(path, []).append(value)
  for path, values in stacks.items():
    nested_set(params, path, np.stack(values))

  if expected_shapes is not None:
    bad = []
    for path, shape in leaf_shapes(params):
      want = tuple(nested_get(expected_shapes, path).shape)
      if want != shape:
        bad.append(f"{'/'.join(path)}: checkpoint {shape} vs model {want}")
    if bad:
      hint = _position_hint(params, cfg)
      raise ConversionError("shape mismatch:\n  " + "\n  ".join(bad) + hint)
  return params


def _position_hint(params: dict, cfg: ml_collections.ConfigDict) -> str:
  """How to run a checkpoint's position table at another image size."""
  rows = params["vision_model"]["position_embedding"].shape[0]
  grid = math.isqrt(rows - 1)
  if grid * grid + 1 != rows or grid == vit.position_grid(cfg.vision):
    return ""
  return (
    f"\nthe checkpoint's position table is a {grid}x{grid} grid: set "
    f"vision.position_grid={grid} to run it at vision.image_size={cfg.vision.image_size} "
    "(from_pretrained does this when image_size is overridden)"
  )


def params_to_hf(params: dict, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Nested dict of our parameters -> HF state dict (lm_head left tied, as HF saves)."""
  out = {}
  for hf_key, path, layer, layout in key_map(cfg):
    value = np.asarray(nested_get(params, path))
    out[hf_key] = np.ascontiguousarray(_to_hf(value if layer is None else value[layer], layout))
  return out


# --------------------------------------------------------------------------- files


def read_hf_dir(
  path: str, *, allow_pickle: bool = False, progress: bool = False
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, state dict of numpy arrays) of a HF snapshot directory."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
      f"{config_path}: not found; is {path!r} a Hugging Face Kosmos-2 snapshot directory?"
    )
  with open(config_path) as f:
    hf_config = json.load(f)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  pickle_file = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
  elif os.path.isfile(pickle_file):
    if not allow_pickle:
      raise ConversionError(
        f"{pickle_file}: pickle checkpoints can run code when loaded and are "
        "refused; convert to safetensors or pass --allow-pickle"
      )
    return hf_config, read_pickle(pickle_file)
  else:
    raise FileNotFoundError(
      f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )
  tensors = {}
  for file in files:
    with safetensors.safe_open(file, framework="numpy") as f:
      for key in tqdm.tqdm(
        list(f.keys()), desc=os.path.basename(file), unit="tensor", disable=not progress
      ):
        tensors[key] = f.get_tensor(key)
  return hf_config, tensors


def read_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"{path}: reading a pickle checkpoint needs torch") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  # numpy has no bfloat16 of its own: go through float32 to ml_dtypes' one.
  return {
    k: (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
    for k, v in state.items()
  }


def write_hf_dir(path: str, cfg: ml_collections.ConfigDict, params: dict) -> None:
  """Writes config.json + model.safetensors for transformers' from_pretrained."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  safetensors.numpy.save_file(
    params_to_hf(params, cfg), os.path.join(path, "model.safetensors"), metadata={"format": "pt"}
  )
