"""Attention forward+backward TFLOP/s on a GPU: ours (Pallas Triton), cuDNN, XLA.

One JSON line per (implementation, sequence length); then one line per cache
length for decode (the XLA path every generation step takes; run_decode,
which benchmarks/gpu_vs_hf.py's decode row also runs).
Needs a GPU; exits with a message otherwise.
Run: `.venv/bin/python -m benchmarks.attention [--head-dim 128 ...]`.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import timed
from kosmos_jax import kernels
from kosmos_jax.models import attention


def attention_fn(impl, causal):
  """(q, k, v) -> out for one implementation; all take [b, l, h, d]."""
  if impl == "ours":
    return lambda q, k, v: kernels.flash_attention(q, k, v, causal=causal)
  return lambda q, k, v: jax.nn.dot_product_attention(
    q, k, v, is_causal=causal, implementation=impl
  )


def forward_backward(attention):
  """Jitted (q, k, v, dout) -> (out, dq, dk, dv)."""

  def step(q, k, v, dout):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(dout))

  return jax.jit(step)


def flops(batch, length, heads, head_dim, causal):
  """Matmul flops of forward (2 matmuls) + backward (5 matmuls)."""
  forward = 4 * batch * heads * length * length * head_dim
  if causal:
    forward //= 2
  return 3.5 * forward


def run_flash(args, dtype):
  for length in args.seq_lens:
    batch = max(1, args.tokens // length)
    shape = (batch, length, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, dout = (jax.random.normal(key, shape, dtype) for key in keys)
    baseline = None
    for impl in ("ours", "cudnn", "xla"):
      record = dict(
        case="flash_fwd_bwd",
        impl=impl,
        batch=batch,
        seq_len=length,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        causal=args.causal,
      )
      try:
        step = forward_backward(attention_fn(impl, args.causal))
        outs = jax.block_until_ready(step(q, k, v, dout))  # Compile + warm.
        seconds, _ = timed(lambda: jax.block_until_ready(step(q, k, v, dout)), args.repeats)
        record["ms"] = round(seconds * 1e3, 3)
        record["tflops"] = round(flops(*shape, args.causal) / seconds / 1e12, 2)
        if impl == "ours":
          baseline = outs
        elif baseline is not None:  # A fast wrong kernel cannot hide.
          record["max_abs_diff_vs_ours"] = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in zip(outs, baseline)
          )
      except Exception as e:  # pylint: disable=broad-except
        record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(record), flush=True)


def run_decode(batch, cache_len, heads, head_dim, dtype, repeats) -> dict:
  """One decode step's attention over half-full caches of `cache_len`, as
  mid-generation: the call a generation step makes per layer
  (models/layers.py, cached), which says how close XLA gets to the HBM
  bandwidth. Returns the valid length, the median seconds and the bytes of
  the valid half of the K and V caches."""
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), dtype)
  cache_shape = (batch, cache_len, heads, head_dim)
  k, v = (jax.random.normal(key, cache_shape, dtype) for key in keys[1:])
  # Written slots have segment id 1.
  written = (jnp.arange(cache_len) < cache_len // 2).astype(jnp.int32)
  kv_segment_ids = jnp.broadcast_to(written, (batch, cache_len))
  segment_ids = jnp.ones((batch, 1), jnp.int32)
  step = jax.jit(
    lambda q, k, v: attention.attention(
      q, k, v, causal=False, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids
    )
  )
  jax.block_until_ready(step(q, k, v))
  seconds, _ = timed(lambda: jax.block_until_ready(step(q, k, v)), repeats)
  useful = 2 * batch * (cache_len // 2) * heads * head_dim * jnp.dtype(dtype).itemsize
  return dict(valid_len=cache_len // 2, seconds=seconds, useful_bytes=useful)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq_len")
  # Kosmos-2's decoder: 32 heads of 64.
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--causal", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--decode-batch", type=int, default=16)
  args = parser.parse_args()
  args.causal = bool(args.causal)
  if jax.default_backend() != "gpu":
    sys.exit(
      f"benchmarks/attention.py needs a GPU; jax sees "
      f"{jax.default_backend()!r} ({jax.devices()[0].device_kind})."
    )
  print(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__)), flush=True)
  dtype = jnp.dtype(args.dtype)
  run_flash(args, dtype)
  for length in args.seq_lens:
    m = run_decode(args.decode_batch, length, args.heads, args.head_dim, dtype, args.repeats)
    record = dict(
      case="decode",
      impl="xla",
      batch=args.decode_batch,
      cache_len=length,
      valid_len=m["valid_len"],
      heads=args.heads,
      head_dim=args.head_dim,
      dtype=args.dtype,
      us=round(m["seconds"] * 1e6, 1),
      useful_gb_per_s=round(m["useful_bytes"] / m["seconds"] / 1e9, 1),
    )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
