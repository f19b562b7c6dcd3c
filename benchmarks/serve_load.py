"""Serving under load: `kosmos-jax serve` with batching vs the same server without.

The mid-size random model (common.MID_HF_CONFIG) behind two servers in this
process: one batching (`--max-batch 32`, a 10 ms window) and the baseline
with batching off (`--max-batch 1`); both compile their shapes first. At each
concurrency level, that many loopback clients send grounded-caption requests
(greedy, `--new-tokens` new tokens, default 32: about a brief grounded
caption with its location tokens; 8 different pictures), each client its
next request as soon as its answer arrives. One JSON line per level:
requests/s and p50 / p99 latency of each server, the batched server's mean
batch size, and the machine's matmul peak. Run:
`.venv/bin/python -m benchmarks.serve_load` (`--tiny`: seconds, for tests).
"""

import argparse
import base64
import io
import json
import os
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kosmos_jax import heap  # pylint: disable=g-import-not-at-top

heap.keep_freed_memory()  # as `kosmos-jax` does for long-running commands (kosmos_jax/heap.py)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import transformers
from PIL import Image

from benchmarks.common import MID_HF_CONFIG, TINY_HF_CONFIG, same_weights
from kosmos_jax.eval import rec
from kosmos_jax.processing import vocab as vocab_lib
from kosmos_jax.serve import batcher, server
from kosmos_jax.train import mfu
from tests.helpers import spm


def _pictures(count: int) -> list[str]:
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), np.uint8)).save(buffer, "JPEG")
    out.append(base64.b64encode(buffer.getvalue()).decode())
  return out


def start_server(model, processor, max_batch: int, args, examples: list[dict]):
  """A warm server on a free loopback port; returns (url, http server, engine)."""
  engine = batcher.Engine(
    model,
    processor,
    max_batch=max_batch,
    window_s=args.window_ms / 1e3,
    timeout_s=3600,
    max_queue=4096,
    max_new_tokens=args.new_tokens,
  )
  engine.warmup(server.warmup_jobs(engine, examples[0])[:1])  # the caption's shapes
  engine.start()
  httpd = server.make_server(server.App(engine, examples), "127.0.0.1", 0)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  return f"http://127.0.0.1:{httpd.server_address[1]}/v1/generate", httpd, engine


def _post(url: str, body: bytes) -> None:
  import urllib.request  # pylint: disable=g-import-not-at-top

  with urllib.request.urlopen(url, body, timeout=3600) as response:
    assert response.status == 200
    json.loads(response.read())


def load(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
  """Wall time of answering every body with `concurrency` clients, and each latency."""
  latencies, lock, next_index = [], threading.Lock(), iter(range(len(bodies)))

  def client():
    while True:
      with lock:
        i = next(next_index, None)
      if i is None:
        return
      start = time.perf_counter()
      _post(url, bodies[i])
      with lock:
        latencies.append(time.perf_counter() - start)

  threads = [threading.Thread(target=client) for _ in range(concurrency)]
  start = time.perf_counter()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return time.perf_counter() - start, latencies


def _stats(wall: float, latencies: list[float]) -> dict:
  ms = np.asarray(latencies) * 1e3
  return dict(
    rps=round(len(latencies) / wall, 2),
    p50_ms=round(float(np.percentile(ms, 50)), 1),
    p99_ms=round(float(np.percentile(ms, 99)), 1),
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--levels", default="1,8,32", help="client concurrency levels")
  parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
  parser.add_argument("--min-requests", type=int, default=8, help="at least this many per level")
  parser.add_argument("--max-batch", type=int, default=32)
  parser.add_argument("--window-ms", type=float, default=10.0)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--tiny", action="store_true", help="tiny model and counts (tests)")
  args = parser.parse_args()
  if args.tiny:
    args.levels, args.rounds, args.min_requests, args.max_batch, args.new_tokens = "1,4", 1, 4, 4, 4

  transformers.logging.set_verbosity_error()
  _, model = same_weights(
    transformers.Kosmos2Config(**(TINY_HF_CONFIG if args.tiny else MID_HF_CONFIG))
  )
  with tempfile.TemporaryDirectory() as d:
    vocab = vocab_lib.KosmosVocabulary(spm.train_tiny_spm(d), num_patches_per_side=32)
  processor = rec.processor_for(vocab, model.config)
  examples = server.examples(1)
  started = time.perf_counter()
  batched = start_server(model, processor, args.max_batch, args, examples)
  warmup_s = time.perf_counter() - started
  unbatched = start_server(model, processor, 1, args, examples)
  pictures = _pictures(8)
  common = {
    "model": "tiny" if args.tiny else "mid",
    "task": "caption_brief",
    "new_tokens": args.new_tokens,
    "max_batch": args.max_batch,
    "window_ms": args.window_ms,
    "warmup_s": round(warmup_s, 1),
    "matmul_peak_gflops": round(mfu.peak_flops() / 1e9, 1),
    "cpu_count": os.cpu_count(),
    "cpu_load_1min": round(os.getloadavg()[0], 2),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
  }
  for concurrency in (int(c) for c in args.levels.split(",")):
    count = max(args.min_requests, concurrency * args.rounds)
    bodies = [
      json.dumps(dict(image=pictures[i % len(pictures)], task="caption_brief")).encode()
      for i in range(count)
    ]
    line = {"benchmark": "serve_load", "concurrency": concurrency, "requests": count}
    # Baseline first, then batched: a load that comes and goes hits both about alike.
    for name, (url, _, engine) in (("unbatched", unbatched), ("batched", batched)):
      calls = engine.metrics()["generate_calls"]
      stats = _stats(*load(url, bodies, concurrency))
      line.update({f"{name}_{k}": v for k, v in stats.items()})
      line[f"{name}_generate_calls"] = engine.metrics()["generate_calls"] - calls
    line["mean_batch"] = round(count / line["batched_generate_calls"], 2)
    line["speedup"] = round(line["batched_rps"] / line["unbatched_rps"], 2)
    line["compiles_after_warmup"] = batched[2].metrics()["compiles_after_warmup"]
    print(json.dumps({**line, **common}), flush=True)
  for _, httpd, engine in (batched, unbatched):
    httpd.shutdown()
    engine.stop()


if __name__ == "__main__":
  main()
