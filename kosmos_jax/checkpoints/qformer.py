"""Q-Former weights (models/qformer.py) from transformers BLIP-2 state dicts.

Two layouts: a Blip2Model / Blip2ForConditionalGeneration state dict (the
Q-Former under `qformer.`, `query_tokens` at the top; the vision model and
LLM beside them are other modules' and are not read), or a bare
Blip2QFormerModel state dict plus a `query_tokens` key.

Nothing is dropped or initialised silently: a missing key, a key that is
neither mapped nor ignored, or a shape that differs from the config's raises
ConversionError with the keys listed. Ignored: the text-token feed-forward
(`encoder.layer.{i}.intermediate` / `.output`, present when
use_qformer_text_input is on), which query tokens never pass through.
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
from kosmos_jax.models import qformer

# (source key, our parameter path, source -> ours).
Entry = tuple[str, tuple, Callable[[np.ndarray], np.ndarray]]

_same = lambda a: a
_linear = lambda a: a.T  # torch [out, in] -> ours [in, out]
_rows = lambda a: a.reshape(-1, a.shape[-1])  # [1, n, d] -> [n, d]

_TEXT_FFN = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\..*")
_MARKER = "layernorm.weight"


def qformer_config_from_hf(hf_config: dict, **overrides) -> ml_collections.ConfigDict:
  """Config from a Blip2Config dict (its `qformer_config`, top-level
  `num_query_tokens` and vision width) or a Blip2QFormerConfig dict (32
  queries unless it says otherwise); **overrides win."""
  kind = hf_config.get("model_type")
  if kind == "blip-2":
    q, queries = hf_config.get("qformer_config", {}), hf_config.get("num_query_tokens", 32)
    # Blip2Config overwrites the Q-Former's encoder width with its vision model's.
    q = {**q, "encoder_hidden_size": hf_config.get("vision_config", {}).get("hidden_size", 1408)}
  elif kind in ("blip_2_qformer", None):
    q, queries = hf_config, hf_config.get("num_query_tokens", 32)
  else:
    raise ConversionError(f"config model_type {kind!r} is not 'blip-2' or 'blip_2_qformer'")
  values = dict(
    num_query_tokens=queries,
    width=q.get("hidden_size", 768),
    depth=q.get("num_hidden_layers", 12),
    heads=q.get("num_attention_heads", 12),
    mlp_dim=q.get("intermediate_size", 3072),
    activation=q.get("hidden_act", "gelu"),
    cross_attention_frequency=q.get("cross_attention_frequency", 2),
    encoder_hidden_size=q.get("encoder_hidden_size", 1408),
    layer_norm_eps=q.get("layer_norm_eps", 1e-12),
    dropout=q.get("hidden_dropout_prob", 0.1),
    attention_dropout=q.get("attention_probs_dropout_prob", 0.1),
    max_position_embeddings=q.get("max_position_embeddings", 512),
  )
  return qformer.qformer_config(**{**values, **overrides})


def _linear_entries(src: str, ours: tuple) -> list[Entry]:
  return [(f"{src}.weight", (*ours, "kernel"), _linear), (f"{src}.bias", (*ours, "bias"), _same)]


def _norm_entries(src: str, ours: tuple) -> list[Entry]:
  return [(f"{src}.weight", (*ours, "scale"), _same), (f"{src}.bias", (*ours, "bias"), _same)]


def _attention_entries(src: str, ours: tuple) -> list[Entry]:
  entries = []
  for name in ("query", "key", "value"):
    entries += _linear_entries(f"{src}.attention.{name}", (*ours, name))
  return (
    entries
    + _linear_entries(f"{src}.output.dense", (*ours, "dense"))
    + _norm_entries(f"{src}.output.LayerNorm", (*ours, "norm"))
  )


def qformer_key_map(cfg) -> list[Entry]:
  """Every tensor of a bare Blip2QFormerModel (+ query_tokens) and where it lives in ours."""
  entries = [
    ("query_tokens", ("query_tokens",), _rows),
    *_norm_entries("layernorm", ("layernorm",)),
  ]
  for i in range(cfg.depth):
    src, ours = f"encoder.layer.{i}", ("layers", i)
    entries += _attention_entries(f"{src}.attention", (*ours, "self_attention"))
    if i % cfg.cross_attention_frequency == 0:
      entries += _attention_entries(f"{src}.crossattention", (*ours, "cross_attention"))
    entries += _linear_entries(f"{src}.intermediate_query.dense", (*ours, "ffn", "intermediate"))
    entries += _linear_entries(f"{src}.output_query.dense", (*ours, "ffn", "output"))
    entries += _norm_entries(f"{src}.output_query.LayerNorm", (*ours, "ffn", "norm"))
  return entries


def _qformer_tensors(tensors: dict) -> dict:
  """The bare-layout tensors: under `qformer.` (plus the top-level
  query_tokens) when the dict is a whole BLIP-2's, else all of them."""
  if "qformer." + _MARKER in tensors:
    out = {k[len("qformer.") :]: v for k, v in tensors.items() if k.startswith("qformer.")}
    if "query_tokens" in tensors:
      out["query_tokens"] = tensors["query_tokens"]
    return out
  if _MARKER in tensors:
    return dict(tensors)
  raise ConversionError(
    f"no {_MARKER!r} or 'qformer.{_MARKER}' key: not a BLIP-2 Q-Former state dict"
  )


def qformer_from_hf(tensors: dict, cfg) -> dict:
  """transformers state dict (numpy arrays; either layout of the module doc)
  -> our params for `qformer.from_params(cfg, ...)`."""
  tensors = _qformer_tensors(tensors)
  entries = qformer_key_map(cfg)
  known = {e[0] for e in entries}
  unexpected = sorted(k for k in tensors if k not in known and not _TEXT_FFN.fullmatch(k))
  missing = sorted(k for k in known if k not in tensors)
  if unexpected or missing:
    raise ConversionError(
      "checkpoint keys do not match a Q-Former with this config (depth "
      f"{cfg.depth}, cross_attention_frequency {cfg.cross_attention_frequency}):\n"
      f"  missing ({len(missing)}): {missing[:20]}\n"
      f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
    )
  params = {}
  for key, path, fn in entries:
    hf.nested_set(params, path, fn(np.asarray(tensors[key])))
  bad = list(_shape_mismatches(params, qformer.abstract_params(cfg)))
  if bad:
    raise ConversionError("shape mismatch:\n  " + "\n  ".join(bad))
  return params


def _shape_mismatches(params: dict, expected: dict, prefix=()):
  for key, value in params.items():
    path = (*prefix, str(key))
    if isinstance(value, dict):
      yield from _shape_mismatches(value, expected[key], path)
    elif tuple(value.shape) != tuple(expected[key].shape):
      yield f"{'/'.join(path)}: checkpoint {value.shape} vs config {expected[key].shape}"


def _read_qformer_safetensors(path: str) -> dict | None:
  """Only the Q-Former's tensors of a safetensors snapshot (a BLIP-2 file's
  LLM is many times its size), or None when the snapshot has none."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    with safetensors.safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
      weight_map = {k: "model.safetensors" for k in f.keys()}
  else:
    return None
  # A whole BLIP-2's file: its Q-Former part; a Q-Former's own file: all of it.
  wanted = lambda k: (
    k == "query_tokens" or k.startswith("qformer.") or "qformer." + _MARKER not in weight_map
  )
  by_file = {}
  for key, name in weight_map.items():
    if wanted(key):
      by_file.setdefault(name, []).append(key)
  tensors = {}
  for name, keys in sorted(by_file.items()):
    with safetensors.safe_open(os.path.join(path, name), "numpy") as f:
      tensors.update({k: f.get_tensor(k) for k in keys})
  return tensors


def qformer_from_hf_dir(path: str, *, allow_pickle: bool = False, **kw) -> qformer.QFormer:
  """A Q-Former from a transformers BLIP-2 snapshot directory (`config.json`
  + safetensors; only the Q-Former's tensors are read); **kw: dtype,
  param_dtype."""
  config_path = os.path.join(path, "config.json")
  tensors = _read_qformer_safetensors(path) if os.path.isfile(config_path) else None
  if tensors is None:  # no config, pickle or no weights: hf's reader refuses or explains
    hf_config, tensors = hf.read_hf_dir(path, allow_pickle=allow_pickle)
  else:
    with open(config_path) as f:
      hf_config = json.load(f)
  cfg = qformer_config_from_hf(hf_config)
  return qformer.from_params(cfg, qformer_from_hf(tensors, cfg), **kw)
