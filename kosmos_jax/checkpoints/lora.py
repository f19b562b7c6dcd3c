"""LoRA checkpoints: a trainer workdir's adapters merged into a plain
checkpoint, or written as a PEFT adapter for transformers' Kosmos-2.

A LoRA run's workdir holds the whole model plus the adapters (models/lora.py)
under the experiment config's `lora` key. `merge` folds them into the
kernels, which every other reader then takes for an ordinary model; `peft_adapter`
writes what `peft.PeftModel.from_pretrained` loads onto
`Kosmos2ForConditionalGeneration`:

  adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, and
                             target_modules as full module names (PEFT matches a
                             name by equality or suffix, so "q_proj" alone would
                             adapt the ViT's and the connector's too)
  adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight [r, in]
                             base_model.model.<HF module>.lora_B.weight [out, r]
                             (torch Linear layout: our [in, r] and [r, out] transposed)

Parameters that `optim.train_also` trained besides the adapters go in as
PEFT's `modules_to_save`: the whole Hugging Face module holding each, its
tensors under base_model.model.<HF key>.
"""

import json
import os
import re

import jax
import ml_collections
import numpy as np
import safetensors.numpy

from kosmos_jax import errors
from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build, lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# A copy of the embedding would leave transformers' tied head on the original.
_UNSAVABLE = ("text_model.model.embed_tokens",)


class LoraCheckpointError(errors.UserError):
  """A checkpoint without adapters, or adapters PEFT cannot express."""


def workdir_params(path, model_config, abstract: dict, step: int | None = None) -> dict:
  """The parameters of a trainer workdir for the plain model of `model_config`
  (`abstract`: its parameters' shapes): a LoRA run's adapters come merged in,
  so readers need not know about them."""
  lora_cfg = orbax_ckpt.load_workdir_config(path).get("lora")
  if not lora.enabled(lora_cfg):
    return orbax_ckpt.load_workdir_params(path, abstract, step)
  return lora.merge_params(_adapted_params(path, model_config, lora_cfg, step), lora_cfg)


def _adapted_params(path, model_config, lora_cfg, step) -> dict:
  abstract = jax.tree.map(
    lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
    build.params_of(lora.abstract_model(model_config, lora_cfg)),
  )
  return orbax_ckpt.load_workdir_params(path, abstract, step)


def load(path, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """(experiment config, parameters with adapters) of a LoRA run's workdir."""
  config = orbax_ckpt.load_workdir_config(path)
  if not lora.enabled(config.get("lora")):
    raise LoraCheckpointError(
      f"{os.fspath(path)}: its run has no LoRA adapters (config.lora.rank is 0 or no targets); "
      "it is a plain model already"
    )
  return config, _adapted_params(path, config.model, config.lora, step)


def merge(path, out: str, step: int | None = None) -> dict:
  """Writes the workdir's model with its adapters folded in as a converted
  checkpoint at `out` (then `kosmos-jax convert orbax-to-hf` reads it)."""
  config, params = load(path, step)
  merged = lora.merge_params(params, config.lora)
  orbax_ckpt.save_params(out, config.model, jax.tree.map(np.asarray, merged))
  return {"out": out, "merged": _count_adapted(params)}


def _count_adapted(params: dict) -> int:
  if not isinstance(params, dict):
    return 0
  return int("lora_a" in params) + sum(_count_adapted(v) for v in params.values())


def _get(tree: dict, path):
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


def peft_adapter(
  params: dict, model_config, lora_cfg, train_also=(), base_model: str = ""
) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json dict, adapter tensors) of parameters with adapters."""
  entries = hf.key_map(model_config)
  tensors, targets, placed = {}, [], set()
  for hf_key, path, layer, layout in entries:
    owner = _get(params, path[:-1])
    if path[-1] != "kernel" or not isinstance(owner, dict) or "lora_a" not in owner:
      continue
    assert layout == "linear", hf_key
    module = hf_key.removesuffix(".weight")
    a, b = (np.asarray(owner[k], np.float32) for k in lora.ADAPTER_NAMES)
    if layer is not None:
      a, b = a[layer], b[layer]
    tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    targets.append(module)
    placed.add(path[:-1])
  unplaced = sorted("/".join(p) for p in _adapter_owners(params) if p not in placed)
  if unplaced:
    raise LoraCheckpointError(f"adapters on {unplaced} have no Hugging Face module to go on")
  modules = _modules_to_save(entries, params, train_also)
  clash = sorted(m for m in modules if any(t == m or t.startswith(m + ".") for t in targets))
  if clash:
    raise LoraCheckpointError(
      f"optim.train_also trained {clash}, which hold LoRA targets: PEFT cannot save a module "
      "whole and adapt it too; use `kosmos-jax convert merge-lora`"
    )
  if modules:
    full = hf.params_to_hf(lora.merge_params(params, lora_cfg), model_config)
    for key, value in full.items():
      if any(key.startswith(m + ".") for m in modules):
        tensors[_PREFIX + key] = np.asarray(value, np.float32)
  config = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": base_model,
    "r": int(lora_cfg.rank),
    "lora_alpha": float(lora_cfg.alpha),
    "lora_dropout": float(lora_cfg.dropout),
    "target_modules": sorted(targets),
    "modules_to_save": modules or None,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "init_lora_weights": True,
    "inference_mode": True,
  }
  return config, tensors


def _adapter_owners(params: dict, prefix=()):
  for k, v in params.items():
    if isinstance(v, dict):
      if "lora_a" in v:
        yield (*prefix, k)
      yield from _adapter_owners(v, (*prefix, k))


def _modules_to_save(entries, params, train_also) -> list[str]:
  """The smallest set of HF modules that holds every parameter `train_also`
  matches (adapters aside); a module whose copy PEFT would untie is an error."""
  regexes = [re.compile(p) for p in train_also]
  modules = set()
  for hf_key, path, _, _ in entries:
    name = "/".join(path)
    if _get(params, path) is not None and any(r.fullmatch(name) for r in regexes):
      modules.add(hf_key.rpartition(".")[0])
  # An ancestor saved whole covers its children.
  modules = {m for m in modules if not any(m.startswith(o + ".") for o in modules)}
  bad = sorted(m for m in modules if m in _UNSAVABLE)
  if bad:
    raise LoraCheckpointError(
      f"optim.train_also trained {bad}, tied to the LM head: PEFT's modules_to_save would "
      "untie it; use `kosmos-jax convert merge-lora`"
    )
  return sorted(modules)


def export_peft(path, out: str, step: int | None = None) -> dict:
  """Writes the workdir's adapters as a PEFT adapter directory at `out`."""
  config, params = load(path, step)
  adapter_config, tensors = peft_adapter(
    params,
    config.model,
    config.lora,
    train_also=list(config.optim.get("train_also", [])),
    base_model=config.get("init_from", ""),
  )
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
    json.dump(adapter_config, f, indent=2)
  safetensors.numpy.save_file(
    tensors, os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"}
  )
  return {
    "out": out,
    "target_modules": len(adapter_config["target_modules"]),
    "modules_to_save": adapter_config["modules_to_save"] or [],
    "tensors": len(tensors),
  }
