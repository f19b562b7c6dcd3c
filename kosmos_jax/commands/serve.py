"""`kosmos-jax serve`: a grounding web page and an HTTP API with batched inference.

The server binds (so a taken port fails at once), the model loads, the
common shapes compile (`--no-warmup` skips that), then one line on stdout
gives the address; requests that arrive together share one `generate` call.
"""

from kosmos_jax.commands.generate import (
  checkpoint_processor,
  non_negative_int,
  positive_float,
  positive_int,
)

USES_TENSORFLOW = True  # the processor's vocabulary
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
  """Registers `serve` on the subparsers of the `kosmos-jax` parser."""
  p = sub.add_parser(
    "serve",
    help="a web page and an HTTP API (POST /v1/generate) for grounded captions, "
    "REC, REG and VQA, batching concurrent requests",
  )
  p.add_argument(
    "--checkpoint",
    required=True,
    help="Hugging Face snapshot directory, kosmos-jax checkpoint or trainer workdir, "
    "with the processor files",
  )
  p.add_argument(
    "--host",
    default="127.0.0.1",
    help="address to bind (default loopback only; the API has no authentication)",
  )
  p.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")
  p.add_argument(
    "--max-batch", type=positive_int, default=16, help="most requests in one generate call"
  )
  p.add_argument(
    "--batch-window-ms",
    type=float,
    default=10.0,
    help="how long the first waiting request waits for others to join its batch",
  )
  p.add_argument(
    "--timeout",
    type=positive_float,
    default=60.0,
    help="seconds a request may wait for its answer before it gets a 503",
  )
  p.add_argument(
    "--max-queue", type=positive_int, default=256, help="waiting requests before a 503"
  )
  p.add_argument("--max-image-bytes", type=positive_int, default=20_000_000)
  p.add_argument(
    "--max-image-side", type=positive_int, default=8000, help="pixels, width or height"
  )
  p.add_argument(
    "--max-new-tokens",
    type=positive_int,
    help="a request's default (default: the checkpoint's generation config, else 128)",
  )
  p.add_argument(
    "--max-new-tokens-limit",
    type=positive_int,
    default=512,
    help="the most new tokens a request may ask for",
  )
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument(
    "--examples",
    type=non_negative_int,
    default=4,
    help="example pictures on the page (shapes, made in memory)",
  )
  p.add_argument(
    "--no-warmup",
    action="store_true",
    help="start at once; each new batch shape compiles on its first request",
  )
  p.add_argument("--access-log", action="store_true", help="one line per request on stderr")


def run(args, overrides) -> None:
  """`kosmos-jax serve`."""
  del overrides
  import sys  # pylint: disable=g-import-not-at-top

  from kosmos_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top
  from kosmos_jax.processing import views  # pylint: disable=g-import-not-at-top
  from kosmos_jax.serve import server  # pylint: disable=g-import-not-at-top

  if args.batch_window_ms < 0:
    raise SystemExit(f"--batch-window-ms {args.batch_window_ms:g}: must be >= 0")
  try:
    where = loading.locate(args.checkpoint)
  except FileNotFoundError as e:
    raise SystemExit(f"--checkpoint {e}") from None
  config = loading.model_config(where)
  processor = checkpoint_processor(where, config)
  if processor.num_image_tokens != views.image_slots(config):
    raise SystemExit(
      f"--checkpoint {where.path}: the processor files give {processor.num_image_tokens} "
      f"image slots, the model {views.image_slots(config)}"
    )
  # Bound before the weights load: a taken port fails at once. Connections wait
  # in the listen queue until the model is warm.
  try:
    httpd = server.make_server(None, args.host, args.port)
  except (OSError, OverflowError) as e:  # taken, not ours, not an address; port > 65535
    reason = getattr(e, "strerror", None) or e
    raise SystemExit(f"--host {args.host} --port {args.port}: cannot bind: {reason}") from None
  if args.host not in LOOPBACK:
    print(
      f"kosmos-jax serve: listening on {args.host}, not loopback: anyone who can reach it "
      "can use the model (there is no authentication)",
      file=sys.stderr,
    )
  try:
    _load_and_serve(httpd, args, where, processor)
  finally:
    httpd.server_close()


def _load_and_serve(httpd, args, where, processor) -> None:
  import time  # pylint: disable=g-import-not-at-top

  from kosmos_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top
  from kosmos_jax.serve import batcher, requests, server  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  model = loading.from_pretrained(where, dtype=args.dtype)
  limits = requests.Limits(
    max_image_bytes=args.max_image_bytes,
    max_image_side=args.max_image_side,
    max_new_tokens=args.max_new_tokens_limit,
  )
  engine = batcher.Engine(
    model,
    processor,
    max_batch=args.max_batch,
    window_s=args.batch_window_ms / 1e3,
    timeout_s=args.timeout,
    max_queue=args.max_queue,
    max_new_tokens=args.max_new_tokens,
    limits=limits,
  )
  examples = server.examples(max(args.examples, 1))
  httpd.app = server.App(engine, examples[: args.examples], access_log=args.access_log)
  if not args.no_warmup:
    engine.warmup(server.warmup_jobs(engine, examples[0]))
  engine.start()
  host, port = httpd.server_address[:2]
  shown = f"[{host}]" if ":" in host else host
  print(
    f"kosmos-jax serve: http://{shown}:{port}/ (ready in {time.perf_counter() - started:.1f} s, "
    f"max batch {args.max_batch}, {engine.metrics()['shapes_warmed']} shapes compiled)",
    flush=True,
  )
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    engine.stop()
