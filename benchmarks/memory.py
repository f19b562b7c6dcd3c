"""Train-step memory at the released Kosmos-2 size: what the backward pass saves, and why.

For each remat policy and attention implementation, one JSON line: the bytes
of activations the backward pass keeps (`saved_residuals` of the loss: the
jaxpr's view, the same on every device), the parameter, gradient and AdamW
bytes, and the largest saved arrays with the line that makes them. With
`--compile`, the step is also compiled for this process's backend and XLA's
`memory_analysis()` added (on a GPU, its real peak plan; on the CPU a compile
of the 1.6B step takes minutes).

The issue's case (one H200, batch 8 x 2048, bf16, `attention=pallas,
remat=none`: out of memory on one 131 GiB allocation) reads here as 132 GiB
saved, 99 GiB of them float32 copies made by autodiff of the float32
LayerNorm and GELU; with their custom backward passes (models/layers.py) and
the loss's (train/step.py) 43 GiB remain, all bfloat16 but the float32
logits. Run: `.venv/bin/python -m benchmarks.memory [--remat none dots full]
[--attention pallas xla] [--batch 8] [--length 2048] [--compile]`.
"""

import argparse
import collections
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax._src import ad_checkpoint  # noqa: E402

from kosmos_jax.models import batch as batch_lib  # noqa: E402
from kosmos_jax.models.config import model_config  # noqa: E402
from kosmos_jax.models.kosmos import Kosmos2  # noqa: E402
from kosmos_jax.train import optim  # noqa: E402
from kosmos_jax.train import state as state_lib  # noqa: E402
from kosmos_jax.train import step as step_lib  # noqa: E402

GIB = 2**30


def _abstract(shape_dtypes: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shape_dtypes.items()}


def measure(remat: str, attention: str, batch: int, length: int, compile_step: bool) -> dict:
  # Dropout off, as in the other train benchmarks (the kernels have no
  # attention dropout).
  config = model_config(
    dtype="bfloat16", remat=remat, **{"text.dropout": 0.0, "text.attention_dropout": 0.0}
  )
  config.attention = attention
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Kosmos2(config, rngs=nnx.Rngs(0))), nnx.Param)
  v = config.vision
  inputs = _abstract(batch_lib.shapes(batch, length, 1, v.image_size, v.num_channels))

  def loss(params, inputs):
    model = nnx.merge(graphdef, params)
    logits = model(**{k: inputs[k] for k in batch_lib.MODEL_INPUTS if k in inputs}).logits
    return step_lib.token_loss(logits, inputs)["loss"]

  biggest = collections.Counter()
  saved = 0
  for aval, where in ad_checkpoint.saved_residuals(loss, params, inputs):
    if "argument" in where:  # parameters and inputs: counted below
      continue
    size = aval.size * aval.dtype.itemsize
    saved += size
    biggest[f"{aval.str_short()} {where.split(' from ')[-1]}"] += size
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  row = dict(
    remat=remat,
    attention=attention,
    batch=batch,
    length=length,
    saved_activations_gib=round(saved / GIB, 2),
    # float32 master weights, their gradients, AdamW's two moments.
    params_grads_adam_gib=round(4 * param_bytes / GIB, 2),
    largest_saved=[f"{size / GIB:.2f} GiB {name}" for name, size in biggest.most_common(5)],
  )
  if compile_step:
    tx = optim.optimizer(optim.optim_config(), 1000)
    state = jax.eval_shape(lambda p: state_lib.create(p, tx, 0), params)
    step = jax.jit(step_lib.make_train_step(graphdef, tx), donate_argnums=0)
    stats = step.lower(state, inputs).compile().memory_analysis()
    row.update(
      backend=jax.default_backend(),
      compiled_temp_gib=round(stats.temp_size_in_bytes / GIB, 2),
      compiled_argument_gib=round(stats.argument_size_in_bytes / GIB, 2),
      compiled_output_gib=round(stats.output_size_in_bytes / GIB, 2),
    )
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--remat", nargs="+", default=["none", "dots", "full"])
  parser.add_argument("--attention", nargs="+", default=["pallas", "xla"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--compile", action="store_true", help="also compile and read XLA's plan")
  args = parser.parse_args()
  for attention in args.attention:
    for remat in args.remat:
      row = measure(remat, attention, args.batch, args.length, args.compile)
      print(json.dumps({"benchmark": "memory", **row, "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
  main()
