"""`from_pretrained`: a model from a Hugging Face snapshot, a converted
checkpoint or a trainer workdir, and the sidecar files that travel with it.

What a directory is gets decided here, once (`locate`).
"""

import dataclasses
import json
import os
import shutil

import jax
import ml_collections

from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints import lora as lora_ckpt
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build, modalities, vit
from kosmos_jax.models import config as model_config_lib
from kosmos_jax.models.kosmos import Kosmos2, init_view_tags
from kosmos_jax.processing import files as processor_files
from kosmos_jax.processing import views

# Files of a Hugging Face snapshot besides the weights that a converted
# checkpoint keeps, so that tokenizer, image processor and generation defaults
# travel with it both ways.
SIDECAR_FILES = tuple(
  dict.fromkeys(
    (*processor_files.FILES, "tokenizer.json", "special_tokens_map.json", "generation_config.json")
  )
)


def copy_sidecars(src: str, dst: str) -> list[str]:
  """Copies the `SIDECAR_FILES` that `src` has into `dst`; returns their names."""
  copied = []
  for name in SIDECAR_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


@dataclasses.dataclass(frozen=True)
class Location:
  """A checkpoint directory and what kind it is, decided once (`locate`)."""

  path: str
  kind: str  # "hf" (a snapshot), "orbax" (converted) or "workdir" (a trainer's)
  step: int | None = None  # of a workdir; None: its latest


def locate(path: "str | os.PathLike | Location") -> Location:
  """What `path` holds: a trainer workdir (`WORKDIR` or `WORKDIR@STEP`), one
  of our converted checkpoints, or a Hugging Face snapshot; anything else is
  an error naming the path."""
  if isinstance(path, Location):
    return path
  path = os.fspath(path)
  head, sep, tail = path.rpartition("@")
  step = int(tail) if sep and tail.isdigit() and not os.path.exists(path) else None
  if step is not None:
    path = head
  if orbax_ckpt.is_workdir(path):
    return Location(path, "workdir", step)
  if step is not None:
    raise FileNotFoundError(
      f"{path}: `@{step}` names a training step, but this is not a trainer workdir "
      "(config.json + checkpoints/)"
    )
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  if orbax_ckpt.is_checkpoint(path):
    return Location(path, "orbax")
  if os.path.isfile(os.path.join(path, "config.json")):
    return Location(path, "hf")
  raise FileNotFoundError(
    f"{path}: neither a Hugging Face snapshot (config.json), a kosmos-jax "
    "checkpoint (kosmos_config.json) nor a trainer workdir "
    "(config.json + checkpoints/)"
  )


def model_config(path: "str | Location") -> ml_collections.ConfigDict:
  """The model config of any checkpoint `from_pretrained` reads, without its weights."""
  where = locate(path)
  if where.kind == "workdir":
    return orbax_ckpt.load_workdir_config(where.path).model
  if where.kind == "orbax":
    return orbax_ckpt.load_config(where.path)
  with open(os.path.join(where.path, "config.json"), encoding="utf-8") as f:
    return hf.config_from_hf(json.load(f))


def read_generation_config(path: str) -> ml_collections.FrozenConfigDict:
  """`generation_config.json` of a checkpoint directory (empty if it has none).

  Frozen (hashable), so the model it is stored on stays usable as a static
  jit argument. Bookkeeping keys (`_from_model_config`, versions) are dropped.
  """
  file = os.path.join(path, "generation_config.json")
  if not os.path.exists(file):
    return ml_collections.FrozenConfigDict({})
  with open(file, encoding="utf-8") as f:
    values = json.load(f)
  return ml_collections.FrozenConfigDict(
    {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"}
  )


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets `overrides` (keys, nested dicts or dotted keys) on a checkpoint's
  config in place. A new `vision.image_size` pins `vision.position_grid` to the
  stored table's grid, so the weights load unchanged and run at the new size."""
  stored_grid = vit.position_grid(config.vision)
  for key, value in overrides.items():
    # "a.b": value is {"a": {"b": value}}, so both spellings behave alike.
    for part in reversed(key.split(".")[1:]):
      value = {part: value}
    config.update({key.split(".")[0]: value})
  if not config.vision.get("position_grid") and vit.position_grid(config.vision) != stored_grid:
    config.vision.position_grid = stored_grid


# The seed of the parameters `from_pretrained` adds for new modalities.
MODALITY_SEED = 0


def _modality_overrides(config, overrides: dict) -> tuple[dict, dict | None, int | None]:
  """(the other overrides, the modalities asked for, modality_tokens): None
  where the overrides keep the checkpoint's. "modalities.NAME": WIDTH adds
  one modality to the checkpoint's."""
  overrides = dict(overrides)
  names = overrides.pop("modalities", None)
  tokens = overrides.pop("modality_tokens", None)
  dotted = {k: overrides.pop(k) for k in list(overrides) if k.startswith("modalities.")}
  if dotted:
    names = {**model_config_lib.modality_widths(config), **(names or {})}
    names.update({k.split(".", 1)[1]: v for k, v in dotted.items()})
  if names is not None and dict(names) == model_config_lib.modality_widths(config):
    names = None
  if tokens is not None and tokens == model_config_lib.modality_tokens(config):
    tokens = None
  return overrides, None if names is None else dict(names), tokens


def _configs(where: Location, overrides: dict):
  """(the config the stored weights are shaped for, the loaded model's)."""
  stored = model_config(where)
  saved_views = dict(stored.vision.get("views") or {})
  overrides, names, tokens = _modality_overrides(stored, overrides)
  apply_overrides(stored, overrides)
  config = stored
  if names is not None or tokens is not None:
    names = model_config_lib.modality_widths(stored) if names is None else names
    config = model_config_lib.with_modalities(stored, names, tokens)
  had_tags = views.tagged({"views": saved_views})
  if views.tagged(config.vision) and not had_tags:
    # Views added to a single-view checkpoint (SPHINX-1k from SPHINX): the
    # weights are read as stored, then `_grow` adds the tags.
    stored = ml_collections.ConfigDict(stored.to_dict())
    stored.vision.views = saved_views or {"grid": 1, "global": False}
  elif had_tags and not views.tagged(config.vision):
    raise ValueError(
      f"{where.path}: the checkpoint was trained with views {saved_views}; "
      "it cannot run without them"
    )
  return stored, config


# The seed of the view tags `from_pretrained` adds to a single-view checkpoint.
VIEWS_SEED = 0


def _grow(params: dict, stored, config) -> dict:
  """The stored parameters extended to `config`: new modalities
  (models/modalities.py) and view tags (processing/views.py)."""
  if model_config_lib.modality_widths(stored) != model_config_lib.modality_widths(
    config
  ) or model_config_lib.modality_tokens(stored) != model_config_lib.modality_tokens(config):
    params = modalities.grow_params(params, stored, config, seed=MODALITY_SEED)
  if views.tagged(config.vision) and "view_tags" not in params:
    embed = params["text_model"]["embed_tokens"]
    key = jax.random.key(VIEWS_SEED)
    params = dict(params, view_tags=init_view_tags(key, embed.shape[1], embed.dtype))
  return params


def pretrained_config(path, **config_overrides) -> ml_collections.ConfigDict:
  """The model config `from_pretrained(path, **config_overrides)` gives,
  without reading weights (a fine-tune plans its shardings from it)."""
  return _configs(locate(path), config_overrides)[1]


def sentencepiece_file(path) -> str:
  """The sentencepiece model that goes with a checkpoint: a snapshot's or
  converted checkpoint's own file, or the one a trainer workdir's data config
  names; "" when neither has one."""
  where = locate(path)
  if where.kind == "workdir":
    return orbax_ckpt.load_workdir_config(where.path).get("data", {}).get("spm_model_file", "")
  file = os.path.join(where.path, processor_files.SENTENCEPIECE)
  return file if os.path.exists(file) else ""


def from_pretrained(
  path: "str | os.PathLike | Location",
  *,
  allow_pickle: bool = False,
  progress: bool = False,
  **config_overrides,
) -> Kosmos2:
  """Loads a Kosmos-2 model from any of our three kinds of directory.

  Args:
    path: a directory with `config.json` + `model.safetensors` (or a sharded
      index) from Hugging Face; one written by `kosmos-jax convert`
      (`kosmos_config.json` + Orbax `params/`); or a trainer workdir
      (`config.json` + `checkpoints/`: its latest step, or `WORKDIR@STEP`).
    allow_pickle: accept `pytorch_model.bin` (weights-only unpickling).
    progress: show a progress bar while reading tensors.
    **config_overrides: model config keys to change, e.g. dtype="bfloat16",
      attention="pallas", vision={"image_size": 448} (or, dotted,
      **{"vision.image_size": 448}); shapes cannot change, but a new image
      size keeps the checkpoint's position table and resizes it bicubically
      at forward time, as transformers' `interpolate_pos_encoding=True` does.
      `modalities={"sound": 1024}` (and `modality_tokens=N`) adds
      PandaGPT-style modalities to a checkpoint without them (or with fewer):
      the tags' embedding rows are appended (normal(0.02), seed
      `MODALITY_SEED`) and the new projections initialised; every stored row
      and weight stays as it was. A checkpoint saved with modalities loads
      exactly without the option. Likewise `vision={"views": {"grid": 2,
      "global": True}}` runs a single-view checkpoint with SPHINX's views,
      adding the view tags (normal(0.02), seed `VIEWS_SEED`).

  The directory's `generation_config.json`, if any, becomes
  `model.generation_config`: the defaults of `model.generate`.
  """
  where = locate(path)
  stored, config = _configs(where, config_overrides)
  abstract = build.abstract_params(stored)
  if where.kind == "workdir":
    # A LoRA run's adapters come merged into the kernels.
    params = lora_ckpt.workdir_params(where.path, stored, abstract, where.step)
  elif where.kind == "orbax":
    params = orbax_ckpt.load_params(where.path, abstract)
  else:
    _, tensors = hf.read_hf_dir(where.path, allow_pickle=allow_pickle, progress=progress)
    params = hf.hf_to_params(tensors, stored, expected_shapes=abstract, progress=progress)
  if config is not stored:
    params = _grow(params, stored, config)
  model = build.model_from_params(config, params)
  model.generation_config = read_generation_config(where.path)
  return model
