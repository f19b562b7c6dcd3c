"""SPHINX's weight mix: `beta * A + (1 - beta) * B` of two checkpoints of one
model (reference/sphinx_pandagpt.md 1.2: an LLM tuned on real data and one
tuned on synthetic data, interpolated parameter by parameter).

A and B are converted checkpoints (`kosmos_config.json` + `params/`) or
trainer workdirs (`WORKDIR` or `WORKDIR@STEP`); the result is a converted
checkpoint with A's model config and A's stored dtypes, which
`from_pretrained` and `kosmos-jax convert orbax-to-hf` read. A LoRA run's
adapters are merged into their kernel as that kernel is read, so its workdir
mixes like a plain model.

What is in host memory at once: one parameter of A and the same of B (a
whole leaf: a scanned stack such as `text_model/layers/fc1/kernel` holds
every layer), the mix written into A's buffer (float32 temporaries of at
most `_CHUNK` values), and mixed leaves not yet written, flushed by
incremental Orbax writes (`ocp.partial`) once they pass `budget_bytes`.
While Orbax reads a leaf it holds the stored bytes too, and while it writes
a batch its encoded copy, so the peak is about three to four times the
largest leaf, never two models. Measured on two 2.4 GB checkpoints: 1.8 to
2.4 GB above the start with 600 MB leaves, 0.5 to 0.7 GB with 100 MB ones. The
1.6B Kosmos-2's largest leaves (decoder fc1 / fc2 kernels) are 1.6 GB each
in float32.
"""

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.experimental import v1 as ocp_v1

from kosmos_jax import errors
from kosmos_jax.checkpoints import hf, loading
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import lora

# Config keys that change how the weights are computed with or trained, not
# what they mean: two checkpoints may differ in these and still be mixed.
NUMERIC_KEYS = frozenset(
  {
    "dtype",
    "param_dtype",
    "remat",
    "attention",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "magneto_init",
    "position_init",
    "location_init",
    "connector_init",
  }
)
# Mixed leaves gathered before one incremental write: big enough that a small
# model is one write, small next to a large model.
BUDGET_BYTES = 256 * 2**20
# float32 values per step of the mix, bounding its temporaries (64 MiB each).
_CHUNK = 1 << 24
_MAX_LISTED = 10
_STEP_METADATA = "_CHECKPOINT_METADATA"


class MixError(errors.UserError):
  """Checkpoints that cannot be mixed, or a bad beta or pattern."""


@dataclasses.dataclass
class _Source:
  """One input: its model config, its stored parameters' shapes and dtypes
  (adapters folded away), and `read(keys)` -> {keys: numpy array}."""

  name: str
  config: ml_collections.ConfigDict
  shapes: dict  # (name, ..., leaf) -> (shape, dtype)
  read: Callable[[list], dict]
  sidecars: str | None  # directory whose processor files the output copies
  directory: str  # on disk, to refuse writing the output over it


def _step_dir(where: loading.Location) -> epath.Path:
  with orbax_ckpt.checkpoint_manager(where.path, read_only=True) as manager:
    steps = sorted(manager.all_steps())
    root = manager.directory
  if not steps:
    raise FileNotFoundError(f"{root}: no checkpoint")
  step = steps[-1] if where.step is None else where.step
  if step not in steps:
    raise FileNotFoundError(
      f"{where.path}: no checkpoint of step {step} (steps: {', '.join(map(str, steps))})"
    )
  return ocp.path.step.find_step_path(root, ocp.path.step.standard_name_format(), step=step)


def _open(path, stack: contextlib.ExitStack) -> _Source:
  where = loading.locate(path)
  if where.kind == "hf":
    raise MixError(
      f"{path}: a Hugging Face snapshot; convert it first "
      f"(kosmos-jax convert hf-to-orbax --hf-dir {path} --out DIR) and mix DIR"
    )
  # A converted checkpoint's tree is the parameters themselves; a workdir's
  # step keeps them under the train state's "params", each an nnx Variable
  # stored as {"value": array}.
  if where.kind == "orbax":
    config = orbax_ckpt.load_config(where.path)
    directory = epath.Path(os.path.abspath(where.path)) / orbax_ckpt.PARAMS_DIR
    prefix, suffix, lora_cfg, sidecars = (), (), None, where.path
  else:
    experiment = orbax_ckpt.load_workdir_config(where.path)
    config = experiment.model
    directory = _step_dir(where) / "state"
    prefix, suffix = ("params",), ("value",)
    lora_cfg = experiment.get("lora") if lora.enabled(experiment.get("lora")) else None
    init_from = experiment.get("init_from", "")
    sidecars = init_from if init_from and os.path.isdir(init_from) else None
  checkpointer = stack.enter_context(ocp.PyTreeCheckpointer())
  tree = hf.nested_get(checkpointer.metadata(directory).item_metadata.tree, prefix)
  stored = {}
  for keypath, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in keypath)
    stored[keys[: len(keys) - len(suffix)]] = (tuple(meta.shape), np.dtype(meta.dtype))
  adapted = lambda k: lora_cfg is not None and k[-1] == "kernel" and k[:-1] + ("lora_a",) in stored

  def read(keys: list) -> dict:
    wanted = set(keys)
    for k in keys:
      if adapted(k):
        wanted.update(k[:-1] + (n,) for n in lora.ADAPTER_NAMES)
    item = {}
    for k in wanted:
      hf.nested_set(item, prefix + k + suffix, jax.ShapeDtypeStruct(*stored[k]))
    # Only the leaves in `item` are read from disk (partial_restore), as
    # numpy arrays: nothing goes through a device.
    restored = checkpointer.restore(
      directory,
      args=ocp.args.PyTreeRestore(
        item=item,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item),
        partial_restore=True,
      ),
    )
    values = {k: hf.nested_get(restored, prefix + k + suffix) for k in wanted}
    for k in keys:
      if adapted(k):
        owner = {n: values[k[:-1] + (n,)] for n in ("kernel", *lora.ADAPTER_NAMES)}
        values[k] = np.asarray(lora.merge_params(owner, lora_cfg)["kernel"])
    return {k: values[k] for k in keys}

  shapes = {k: v for k, v in stored.items() if k[-1] not in lora.ADAPTER_NAMES}
  return _Source(os.fspath(path), config, shapes, read, sidecars, os.fspath(directory))


def _dotted(values: dict, prefix: str = "") -> dict:
  """{"text.width": 64, ...} of a nested dict."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(_dotted(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _differences(a: _Source, b: _Source) -> list[str]:
  """What keeps A and B from being one model's parameters: config keys (but
  numerics), parameters only one has, and shapes."""
  ca, cb = _dotted(a.config.to_dict()), _dotted(b.config.to_dict())
  found = [
    f"config {key}: {ca.get(key)!r} vs {cb.get(key)!r}"
    for key in sorted(ca.keys() | cb.keys())
    if key.rpartition(".")[2] not in NUMERIC_KEYS and ca.get(key) != cb.get(key)
  ]
  for keys in sorted(a.shapes.keys() | b.shapes.keys()):
    name = "/".join(keys)
    if keys not in b.shapes:
      found.append(f"{name}: in A only")
    elif keys not in a.shapes:
      found.append(f"{name}: in B only")
    elif a.shapes[keys][0] != b.shapes[keys][0]:
      found.append(f"{name}: A {a.shapes[keys][0]} vs B {b.shapes[keys][0]}")
  return found


def _compile(patterns) -> list[re.Pattern]:
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise MixError(f"--only {p!r}: not a regular expression ({e})") from None
  return compiled


def interpolate(a: np.ndarray, b: np.ndarray, beta: float, dtype) -> np.ndarray:
  """`beta * a + (1 - beta) * b` in float32 (both weights rounded to float32,
  as numpy does for a Python float times a float32 array), cast to `dtype`.
  Written into `a` where it can be, so a pair costs no third array."""
  wa, wb = np.float32(beta), np.float32(1 - beta)
  out = (
    a
    if a.dtype == dtype and a.flags.writeable and a.flags.c_contiguous
    else np.empty(a.shape, dtype)
  )
  fa, fb, fo = a.reshape(-1), b.reshape(-1), out.reshape(-1)
  for i in range(0, fo.size, _CHUNK):
    s = slice(i, i + _CHUNK)
    mixed = np.multiply(fa[s], wa, dtype=np.float32)
    mixed += np.multiply(fb[s], wb, dtype=np.float32)
    fo[s] = mixed
  return out


def _mixed(keys, a: _Source, b: _Source, beta: float) -> np.ndarray:
  dtype = a.shapes[keys][1]
  # The ends copy a side exactly: 1 * x + 0 * y is not x for x = -0.0 or y = inf.
  if beta == 1:
    return a.read([keys])[keys]
  if beta == 0:
    return b.read([keys])[keys].astype(dtype, copy=False)
  return interpolate(a.read([keys])[keys], b.read([keys])[keys], beta, dtype)


def _select(src_a: _Source, src_b: _Source, regexes) -> tuple[dict, set]:
  """({keys: path name} of every parameter, the keys to mix), once A and B
  are known to be one model's parameters."""
  found = _differences(src_a, src_b)
  if found:
    more = f"; and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    raise MixError(
      f"{src_a.name} and {src_b.name} are not one model's parameters "
      f"({len(found)} differences): " + "; ".join(found[:_MAX_LISTED]) + more
    )
  names = {keys: "/".join(keys) for keys in sorted(src_a.shapes)}
  unmatched = [r.pattern for r in regexes if not any(r.fullmatch(n) for n in names.values())]
  if unmatched:
    example = next(iter(names.values()))
    raise MixError(f"--only {unmatched}: matches no parameter (e.g. {example})")
  chosen = {
    keys
    for keys, name in names.items()
    if (not regexes or any(r.fullmatch(name) for r in regexes))
    and jnp.issubdtype(src_a.shapes[keys][1], jnp.floating)
  }
  return names, chosen


def _write(out_dir: str, leaves, budget_bytes: int) -> None:
  """Writes the (keys, array) pairs of the iterator `leaves` as
  `out_dir/params`, in incremental Orbax writes of about `budget_bytes`."""
  tmp = tempfile.mkdtemp(prefix=".mix-", dir=out_dir)
  partial = os.path.join(tmp, "params")
  # Each write is synchronous and nothing touches its arrays meanwhile, so
  # Orbax's defensive copy of them would only double the batch in memory.
  context = ocp_v1.Context()
  context.memory.deepcopy_host_arrays = False
  context.array.saving.use_zarr3 = False  # as `save_params` stores arrays
  try:
    with context:
      pending, size = {}, 0
      for keys, value in leaves:
        hf.nested_set(pending, keys, value)
        size += value.nbytes
        del value  # `pending` holds the only reference, so a write frees the leaf
        if size >= budget_bytes:
          ocp_v1.partial.save(partial, pending)
          pending, size = {}, 0
      if pending:
        ocp_v1.partial.save(partial, pending)
      ocp_v1.partial.finalize(partial)
    # A finalized partial save is a checkpoint whose PyTree sits in its
    # "state" item: the same format `save_params` writes as `params/`.
    # It lacks the step metadata file a StandardCheckpointer writes beside
    # the tree (reading warns of its absence): take Orbax's own from a save
    # of a placeholder.
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, "probe"), {"x": np.zeros(())})
    params_dir = os.path.join(out_dir, orbax_ckpt.PARAMS_DIR)
    shutil.rmtree(params_dir, ignore_errors=True)
    os.rename(os.path.join(partial, "state"), params_dir)
    shutil.copyfile(
      os.path.join(tmp, "probe", _STEP_METADATA), os.path.join(params_dir, _STEP_METADATA)
    )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def mix(
  a,
  b,
  out: str,
  beta: float,
  *,
  only=(),
  extrapolate: bool = False,
  budget_bytes: int = BUDGET_BYTES,
) -> dict:
  """Writes `beta * A + (1 - beta) * B` as a converted checkpoint at `out`.

  Args:
    a, b: converted checkpoints or trainer workdirs (`WORKDIR@STEP`) of the
      same model (config keys other than `NUMERIC_KEYS`, parameter names and
      shapes equal); anything else is a `MixError` listing the differences.
      A Hugging Face snapshot is refused: convert it first.
    out: directory to write (its `params/` is replaced); it must not hold or
      sit inside A or B.
    beta: A's weight, in [0, 1] unless `extrapolate`.
    only: regexes over parameter paths (`text_model/layers/fc1/kernel`),
      matched whole; the parameters none matches are A's, unchanged. Each
      must match some parameter.
    budget_bytes: mixed bytes gathered before they are written.

  Returns {"mixed", "copied" (tensors taken from A), "beta", "out", "sidecars"}.
  """
  beta = float(beta)
  if not math.isfinite(beta) or not (extrapolate or 0 <= beta <= 1):
    raise MixError(f"--beta {beta}: must lie in [0, 1] (--extrapolate allows any finite beta)")
  regexes = _compile(only)
  out_dir = os.path.realpath(out)
  with contextlib.ExitStack() as stack:
    src_a, src_b = _open(a, stack), _open(b, stack)
    for src in (src_a, src_b):
      # params/ is replaced at the end: `out` must not hold, or sit in, an input.
      src_dir = os.path.realpath(src.directory)
      if os.path.commonpath([src_dir, out_dir]) in (src_dir, out_dir):
        raise MixError(f"--out {out}: overlaps the input {src.name}; write the mix elsewhere")
    names, chosen = _select(src_a, src_b, regexes)
    os.makedirs(out_dir, exist_ok=True)
    leaves = (
      (keys, _mixed(keys, src_a, src_b, beta) if keys in chosen else src_a.read([keys])[keys])
      for keys in names
    )
    _write(out_dir, leaves, budget_bytes)
  with open(os.path.join(out_dir, orbax_ckpt.CONFIG_FILE), "w") as f:
    f.write(src_a.config.to_json(indent=2))
  sidecars = loading.copy_sidecars(src_a.sidecars, out_dir) if src_a.sidecars else []
  return {
    "mixed": len(chosen),
    "copied": len(names) - len(chosen),
    "beta": beta,
    "out": os.fspath(out),
    "sidecars": sidecars,
  }
