"""Low-rank adapters (LoRA) on chosen Dense layers, as PandaGPT fine-tunes its LLM.

Design. `add(model, cfg, rngs)` swaps each targeted `layers.Dense` for a
`LoraDense`: the same `kernel` and `bias` Variables (so their paths, values
and logical axes stay what checkpoints and the Hugging Face key map know),
plus two new `nnx.Param` leaves next to them:

  lora_a [..., in, r]  init uniform(+-1/sqrt(in)) (PEFT's kaiming-uniform, a=sqrt(5))
  lora_b [..., r, out] init zeros, so an added adapter leaves the model's output unchanged

  y = x @ kernel + bias + (dropout(x) @ lora_a @ lora_b) * alpha / r

Inside the scanned layer stack a Dense's kernel is [layers, in, out]; the
adapters get the same leading axes, so the scan hands every layer its own
slice. The adapters' logical names follow the kernel's: lora_a is
(..., in_axis, None) and lora_b (..., None, out_axis), so the sharding rules
split them like the layer they adapt and the rank axis stays whole.

A subclass swapped in after construction, rather than an option of Dense,
keeps the layers and the model code free of LoRA: the model is built as
always, then adapted (the trainer does it when `config.lora.rank > 0`).

Targets are regexes over module paths ('text_model/layers/self_attn/q_proj',
the parameter paths less their leaf name), matched whole. A pattern that
matches no Dense is an error naming it: a typo must not train nothing.

Dropout needs a key the Dense call does not take: the train step sets one
for the duration of the forward pass (`dropout_key`). Without it (evaluation,
generation) the adapters are deterministic.
"""

import contextlib
import contextvars
import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kosmos_jax import errors
from kosmos_jax.models import layers
from kosmos_jax.models.kosmos import Kosmos2

# q, k, v and out projections of the decoder, as PandaGPT adapts Vicuna's.
DEFAULT_TARGETS = ("text_model/layers/self_attn/(q|k|v|out)_proj",)
# Every adapter leaf, as a regex over parameter paths.
ADAPTER_PATTERN = r"(.*/)?lora_[ab]"
ADAPTER_NAMES = ("lora_a", "lora_b")

_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


def lora_config() -> ml_collections.ConfigDict:
  """`lora.*` keys; rank 0 (or no targets) is off. PandaGPT: r 32, alpha 32, dropout 0.1."""
  return ml_collections.ConfigDict(
    dict(rank=0, alpha=32.0, dropout=0.1, targets=list(DEFAULT_TARGETS))
  )


def enabled(cfg) -> bool:
  """Whether a `lora` config (or None, from configs saved before the key) adds adapters."""
  return bool(cfg) and int(cfg.get("rank", 0)) > 0 and bool(cfg.get("targets"))


class LoraDense(layers.Dense):
  """A Dense with a low-rank update; see the module docstring."""

  def __init__(self, base: layers.Dense, *, rank: int, alpha: float, dropout: float, key, salt):
    # Dense.__init__ is not run: the base's Variables are taken over as they are.
    self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
    kernel = base.kernel
    *lead, fan_in, fan_out = kernel.shape
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    *lead_names, in_name, out_name = names
    bound = 1.0 / fan_in**0.5
    a = jax.random.uniform(key, (*lead, fan_in, rank), kernel.dtype, -bound, bound)
    self.lora_a = layers.param(a, (*lead_names, in_name, None))
    self.lora_b = layers.param(
      jnp.zeros((*lead, rank, fan_out), kernel.dtype), (*lead_names, None, out_name)
    )
    self.scale = alpha / rank
    self.dropout_rate = dropout
    self.salt = salt  # tells this module's dropout masks from the other adapters'

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    h = x.astype(self.dtype)
    h = layers.dropout(h, self.dropout_rate, self._dropout_rng())
    h = jnp.dot(h, self.lora_a[...].astype(self.dtype))
    h = jnp.dot(h, self.lora_b[...].astype(self.dtype))
    return y + h * jnp.asarray(self.scale, self.dtype)

  def _dropout_rng(self) -> jax.Array | None:
    key = _DROPOUT_KEY.get()
    if key is None or not self.dropout_rate:
      return None
    key = jax.random.fold_in(key, self.salt)
    # The scanned layers share one trace, so nothing static tells them apart;
    # the bits of the layer's own first lora_a entry do (its init is random),
    # giving each layer its own mask, as separate torch Dropouts would.
    first = jax.lax.stop_gradient(self.lora_a[...]).reshape(-1)[0].astype(jnp.float32)
    return jax.random.fold_in(key, jax.lax.bitcast_convert_type(first, jnp.uint32))


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
  """Adapters' dropout draws from `key` in this block (the train step's forward pass)."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


def _path(path) -> str:
  return "/".join(str(p) for p in path)


def targets(model: nnx.Module, patterns) -> dict[str, layers.Dense]:
  """{module path: Dense} of every plain Dense a pattern matches; a pattern
  matching none is an error naming it (a UserError: one line on the command line)."""
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise errors.UserError(f"lora.targets pattern {pattern!r}: {e}") from e
  dense = {
    _path(p): m
    for p, m in nnx.iter_modules(model)
    if isinstance(m, layers.Dense) and not isinstance(m, LoraDense)
  }
  found, unmatched = {}, []
  for regex in compiled:
    hits = {name: m for name, m in dense.items() if regex.fullmatch(name)}
    if not hits:
      unmatched.append(regex.pattern)
    found.update(hits)
  if unmatched:
    raise errors.UserError(
      f"lora.targets {unmatched} match no Dense layer; Dense layers are e.g. "
      f"{sorted(dense)[:8]} (regexes over these paths, matched whole)"
    )
  return found


def add(model: nnx.Module, cfg, rngs: nnx.Rngs) -> nnx.Module:
  """Puts adapters on the Dense layers `cfg.targets` names (in place); returns the model.

  A disabled config (`enabled`) leaves the model as it is.
  """
  if not enabled(cfg):
    return model
  chosen = targets(model, cfg.targets)
  modules = {_path(p): m for p, m in nnx.iter_modules(model)}
  for salt, name in enumerate(sorted(chosen)):
    parent_name, _, leaf = name.rpartition("/")
    adapted = LoraDense(
      chosen[name],
      rank=int(cfg.rank),
      alpha=float(cfg.alpha),
      dropout=float(cfg.dropout),
      key=rngs.params(),
      salt=salt,
    )
    parent = modules[parent_name] if parent_name else model
    if leaf.isdigit() and not hasattr(parent, leaf):  # a Dense inside a list
      parent[int(leaf)] = adapted
    else:
      setattr(parent, leaf, adapted)
  return model


def adapter_rngs(seed: int) -> nnx.Rngs:
  # A stream of its own: adding adapters leaves the base model's init as it was.
  return nnx.Rngs(jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def abstract_model(model_config, cfg, seed: int = 0) -> Kosmos2:
  """The model with the adapters of `cfg`, as ShapeDtypeStructs; allocates nothing."""
  return nnx.eval_shape(
    lambda: add(Kosmos2(model_config, rngs=nnx.Rngs(0)), cfg, adapter_rngs(seed))
  )


def merge_params(params: dict, cfg) -> dict:
  """A nested dict of parameters with adapters -> the plain model's: each
  adapted kernel becomes kernel + lora_a @ lora_b * alpha / r (float32 sum,
  stored in the kernel's dtype) and the adapter leaves are dropped."""
  if not isinstance(params, dict):
    return params
  out = {k: merge_params(v, cfg) for k, v in params.items() if k not in ADAPTER_NAMES}
  if "lora_a" in params:
    kernel = params["kernel"]
    delta = jnp.matmul(
      jnp.asarray(params["lora_a"], jnp.float32), jnp.asarray(params["lora_b"], jnp.float32)
    )
    scale = float(cfg.alpha) / int(cfg.rank)
    out["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta * scale).astype(kernel.dtype)
  return out


def has_adapters(params: dict) -> bool:
  if not isinstance(params, dict):
    return False
  return any(k in ADAPTER_NAMES or has_adapters(v) for k, v in params.items())
