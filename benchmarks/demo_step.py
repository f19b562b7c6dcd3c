"""The `make demo` train step on this CPU: time per step, and what the input pipeline costs.

One JSON line per batch size: the jitted step (configs/shapes.py, AdamW,
donated state) on real loader batches, the model's matmul FLOP/s against the
machine's float32 matmul peak, and the loader's time per batch on its own.
The demo's budget is normalised to a 140 GFLOP/s peak (README, "Two commands").
Run: `.venv/bin/python -m benchmarks.demo_step [--batch-sizes 4 8 16] [--set KEY=VALUE ..]`.
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from kosmos_jax import heap  # noqa: I001  (before jax: the process keeps freed memory)

heap.keep_freed_memory()

import jax
from flax import nnx

from benchmarks.common import timed
from kosmos_jax import config as config_lib
from kosmos_jax.data import loader
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import mfu, optim
from kosmos_jax.train import state as state_lib
from kosmos_jax.train import step as step_lib


def measure(config, repeats: int) -> dict:
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  tx = optim.optimizer(config.optim, config.total_steps)
  holder = [state_lib.create(nnx.state(model, nnx.Param), tx, 0)]
  train_step = jax.jit(step_lib.make_train_step(nnx.graphdef(model), tx), donate_argnums=0)
  ds = loader.dataset(
    config.data.mixture,
    "train",
    seq_len=config.seq_len,
    images_per_row=config.images_per_row,
    batch_size=config.batch_size,
    seed=0,
  )
  batches = loader.numpy_batches(iter(ds))
  data_s, _ = timed(lambda: next(batches), repeats)
  batch = next(batches)

  def step():
    holder[0], metrics = train_step(holder[0], batch)
    jax.block_until_ready(metrics)

  step()  # compiles
  step_s, _ = timed(step, repeats)
  flops = mfu.model_flops_per_step(config)
  return dict(
    batch_size=config.batch_size,
    step_ms=round(step_s * 1e3, 1),
    model_gflops_per_s=round(flops / step_s / 1e9, 1),
    data_ms_per_batch=round(data_s * 1e3, 1),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/shapes.py")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument(
    "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. seq_len=96"
  )
  args = parser.parse_args()
  base = config_lib.load(args.config, args.set)
  loader.register_user_tasks(base.data)
  peak = mfu.peak_flops()
  for batch_size in args.batch_sizes:
    config = config_lib.load(args.config, [*args.set, f"batch_size={batch_size}"])
    result = measure(config, args.repeats)
    record = dict(config=args.config, overrides=args.set, matmul_peak_gflops=round(peak / 1e9, 1))
    print(json.dumps(dict(record, **result)))


if __name__ == "__main__":
  main()
