"""`from_pretrained`: a model from a Hugging Face snapshot, a converted
checkpoint or a trainer workdir, and the sidecar files that travel with it.

What a directory is gets decided here, once (`checkpoint_kind`).
"""

import json
import os
import shutil

import ml_collections

from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.processing import files as processor_files

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


def split_step(path: str) -> tuple[str, int | None]:
  """`workdir@1200` -> (`workdir`, 1200); any other path -> (path, None)."""
  head, sep, tail = os.fspath(path).rpartition("@")
  if sep and tail.isdigit() and not os.path.exists(path):
    return head, int(tail)
  return os.fspath(path), None


def checkpoint_kind(path: str) -> str:
  """ "workdir" (a trainer's), "orbax" (converted) or "hf" (a snapshot);
  anything else is an error naming the path."""
  path, step = split_step(path)
  if orbax_ckpt.is_workdir(path):
    return "workdir"
  if step is not None:
    raise FileNotFoundError(
      f"{path}: `@{step}` names a step, but this is not a trainer "
      "workdir (config.json + checkpoints/)"
    )
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  if orbax_ckpt.is_checkpoint(path):
    return "orbax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise FileNotFoundError(
    f"{path}: neither a Hugging Face snapshot (config.json), a kosmos-jax "
    "checkpoint (kosmos_config.json) nor a trainer workdir "
    "(config.json + checkpoints/)"
  )


def model_config(path: str) -> ml_collections.ConfigDict:
  """The model config of any checkpoint `from_pretrained` reads, without its weights."""
  kind = checkpoint_kind(path)
  path, _ = split_step(path)
  if kind == "workdir":
    return orbax_ckpt.load_workdir_config(path).model
  if kind == "orbax":
    return orbax_ckpt.load_config(path)
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
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


def from_pretrained(
  path: str, *, allow_pickle: bool = False, progress: bool = False, **config_overrides
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
      attention="pallas"; shapes cannot change.

  The directory's `generation_config.json`, if any, becomes
  `model.generation_config`: the defaults of `model.generate`.
  """
  kind = checkpoint_kind(path)
  path, step = split_step(path)
  config = model_config(path)
  config.update(config_overrides)
  if kind == "workdir":
    _, params = orbax_ckpt.load_workdir_params(path, build.abstract_params(config), step)
  elif kind == "orbax":
    params = orbax_ckpt.load_params(path, build.abstract_params(config))
  else:
    _, tensors = hf.read_hf_dir(path, allow_pickle=allow_pickle, progress=progress)
    params = hf.hf_to_params(
      tensors, config, expected_shapes=build.abstract_params(config), progress=progress
    )
  model = build.model_from_params(config, params)
  model.generation_config = read_generation_config(path)
  return model
