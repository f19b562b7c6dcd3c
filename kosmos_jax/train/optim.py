"""AdamW as KOSMOS-2 trained (reference/kosmos2.md 3.3), parameter freezing, schedules.

Parameters are nnx States of Variables; paths are '/'-joined names such as
`text_model/layers/fc1/kernel`. Weight decay skips norms and biases.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from kosmos_jax import errors
from kosmos_jax.models import lora


def optim_config() -> ml_collections.ConfigDict:
  """`optim.*` keys with the paper's settings as defaults."""
  return ml_collections.ConfigDict(
    dict(
      learning_rate=2e-4,
      warmup_steps=375,
      end_learning_rate=0.0,
      b1=0.9,
      b2=0.98,
      eps=1e-6,
      weight_decay=0.01,
      clip_norm=2.0,
      # Regexes over parameter paths; `PATTERN@:-1` restricts a stacked
      # (scanned) parameter to a slice of its layers, e.g. KOSMOS-1's frozen
      # CLIP except its last block: "vision_model/(?!layers/).*",
      # "vision_model/layers/.*@:-1".
      freeze=[],
      # "REGEX=FACTOR" over parameter paths: the update (learning rate and
      # weight decay alike) of matching parameters times FACTOR, the first
      # match counting, e.g. "vision_model/.*=3" trains the ViT 3x faster.
      lr_multipliers=[],
      # Regexes over parameter paths that train besides the LoRA adapters
      # (e.g. "image_to_text_projection/.*", PandaGPT's projection). When
      # LoRA is on, or this is non-empty, nothing else trains and the
      # optimizer holds state for the trainable parameters only.
      train_also=[],
    )
  )


def path_name(path) -> str:
  """'text_model/layers/fc1/kernel' for a pytree path into a State of Variables."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return "/".join(names[:-1] if names and names[-1] == "value" else names)


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then linear decay to `end_learning_rate`."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, cfg.learning_rate, warmup),
      optax.linear_schedule(cfg.learning_rate, cfg.end_learning_rate, max(total_steps - warmup, 1)),
    ],
    [warmup],
  )


def _decays(path, _) -> bool:
  last = path_name(path).split("/")[-1]
  return last not in ("bias", "scale")


def trainable_mask(params, patterns) -> dict:
  """1.0 where a parameter trains, 0.0 where frozen; stacked layers may be sliced."""
  compiled = []
  for pattern in patterns:
    regex, _, layers = pattern.partition("@")
    compiled.append((re.compile(regex), layers))

  def mask(path, value):
    name = path_name(path)
    trains = jnp.ones(value.shape, jnp.float32)
    for regex, layers in compiled:
      if not regex.fullmatch(name):
        continue
      if not layers:
        return jnp.zeros(value.shape, jnp.float32)
      if not value.ndim:
        raise ValueError(f"freeze pattern {regex.pattern}@{layers} slices the scalar {name}")
      rows = jnp.ones(value.shape[:1], jnp.float32)
      rows = rows.at[_slice(layers)].set(0.0)
      trains = trains * rows.reshape((-1,) + (1,) * (value.ndim - 1))
    return trains

  return jax.tree_util.tree_map_with_path(mask, params)


def trainable_patterns(config) -> list[str] | None:
  """Regexes of the parameters that train under an experiment config, or None
  when all do: the LoRA adapters (`config.lora`) plus `optim.train_also`."""
  also = list(config.optim.get("train_also", []))
  on = lora.enabled(config.get("lora"))
  if not on and not also:
    return None
  return ([lora.ADAPTER_PATTERN] if on else []) + also


def split_trainable(params: nnx.State, patterns) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) parts of a State of parameters; `patterns` as
  `trainable_patterns` returns them. A pattern matching nothing is an error
  naming it."""
  compiled = [re.compile(p) for p in patterns]
  hits = set()

  def trains(path, _) -> bool:
    name = path_name(path)
    matched = {r.pattern for r in compiled if r.fullmatch(name)}
    hits.update(matched)
    return bool(matched)

  trainable, frozen = nnx.split_state(params, trains, ...)
  missing = [r.pattern for r in compiled if r.pattern not in hits]
  if missing:
    raise errors.UserError(f"optim.train_also / LoRA patterns {missing} match no parameter")
  return trainable, frozen


def _slice(spec: str) -> slice:
  parts = [int(p) if p else None for p in spec.split(":")]
  if not 1 <= len(parts) <= 3:
    raise ValueError(f"bad layer slice {spec!r}; use e.g. ':-1' or '2:5'")
  return slice(*parts) if len(parts) > 1 else slice(parts[0], parts[0] + 1)


def _freeze(patterns) -> optax.GradientTransformation:
  # The mask is built inside the update from shapes alone: XLA folds it into
  # the multiply, so no second copy of the parameters ever exists.
  def update(updates, state, params=None):
    del params
    mask = trainable_mask(updates, patterns)
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _parse_multipliers(specs) -> list[tuple[re.Pattern, float]]:
  parsed = []
  for spec in specs:
    regex, _, factor = spec.rpartition("=")
    try:
      parsed.append((re.compile(regex), float(factor)))
    except (re.error, ValueError) as e:
      raise ValueError(f"optim.lr_multipliers entry {spec!r}: expected 'REGEX=FACTOR' ({e})") from e
    if not regex:
      raise ValueError(f"optim.lr_multipliers entry {spec!r}: expected 'REGEX=FACTOR'")
  return parsed


def _scale_by_path(specs) -> optax.GradientTransformation:
  """Multiplies each update by the factor of the first `lr_multipliers` regex
  that matches its path (1 when none does); factors are Python floats, so
  XLA folds them into the update."""
  parsed = _parse_multipliers(specs)

  def factor(path) -> float:
    name = path_name(path)
    return next((f for regex, f in parsed if regex.fullmatch(name)), 1.0)

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates)
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """freeze -> clip(global norm) -> AdamW (decay on weights only) -> per-path
  learning-rate multipliers -> freeze.

  Frozen gradients are zeroed before clipping, so they do not count in the
  norm, and frozen updates after AdamW, so weight decay leaves them alone too.
  """
  adamw = optax.adamw(
    schedule(cfg, total_steps),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p),
  )
  chain = [optax.clip_by_global_norm(cfg.clip_norm), adamw]
  if cfg.lr_multipliers:
    chain.append(_scale_by_path(list(cfg.lr_multipliers)))
  if cfg.freeze:
    freeze = _freeze(list(cfg.freeze))
    chain = [freeze, *chain, freeze]
  return optax.chain(*chain)
