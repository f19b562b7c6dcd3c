"""The HTTP side: routes, JSON errors, the page and its bundled examples.

Python's ThreadingHTTPServer: a thread per connection parses, checks and
preprocesses its request (`requests.parse`, `Engine.prepare`), then waits for
the batching worker (batcher.py). Bodies stay in memory; nothing from a
request is written to disk.

  GET  /                 the page (page.html + page.js; no CDN, works offline)
  GET  /v1/examples      bundled example pictures (shapes, drawn at start-up)
  POST /v1/generate      one answer; see openapi.py
  GET  /healthz          {"status": "ok", ...} once the model is warm
  GET  /metrics          requests, generate calls, batch sizes, compiles
  GET  /openapi.json     the API description
"""

import base64
import http.server
import json
import os
import socket
import sys
import time
import traceback

from kosmos_jax.data import shapes
from kosmos_jax.processing import views
from kosmos_jax.serve import batcher, openapi, requests

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = {"/": ("page.html", "text/html"), "/page.js": ("page.js", "text/javascript")}
# Room for the JSON around a base64 image (4 bytes per 3) and long prompts.
BODY_SLACK = 1 << 20


def examples(count: int, image_size: int = 224) -> list[dict]:
  """Held-out shapes pictures with their captions and objects, made in memory."""
  out = []
  for index in range(count):
    example = shapes.make_example("test", index, image_size)
    objects = example["objects"]
    out.append(
      dict(
        name=example["key"],
        image="data:image/jpeg;base64," + base64.b64encode(example["image"]).decode(),
        caption=example["caption"],
        objects=[
          dict(expression=e, box=[round(float(v), 4) for v in b])
          for e, b in zip(objects["expression"], objects["bbox"])
        ],
      )
    )
  return out


def warmup_jobs(engine: batcher.Engine, example: dict) -> list[batcher.Job]:
  """A job per task with a fixed prompt shape, on an example picture, at the
  default options: what the page sends unless its options are changed."""
  fields = [
    dict(task="caption_brief"),
    dict(task="caption_detailed"),
    dict(task="rec", phrase=example["objects"][0]["expression"]),
    dict(task="reg", box=example["objects"][0]["box"]),
    dict(task="vqa", question="What is in the picture?"),
  ]
  patches = engine.processor.vocab.num_patches_per_side
  image = example["image"].partition(",")[2]
  jobs = []
  for f in fields:
    body = json.dumps(dict(f, image=image)).encode()
    jobs.append(engine.prepare(requests.parse(body, engine.limits, engine.defaults, patches)))
  return jobs


class App:
  """What the handlers share: the engine, the static files, the examples."""

  def __init__(self, engine: batcher.Engine, example_list: list[dict], access_log: bool = False):
    self.engine = engine
    self.examples = example_list
    self.access_log = access_log
    self.started = time.time()
    self.static = {}
    for route, (name, kind) in STATIC.items():
      with open(os.path.join(HERE, name), "rb") as f:
        self.static[route] = (f.read(), kind)
    limits = engine.limits
    self.max_body = limits.max_image_bytes * 4 // 3 + BODY_SLACK
    self.spec = openapi.spec(limits, engine.defaults)

  def generate(self, body: bytes) -> dict:
    engine = self.engine
    started = time.perf_counter()
    try:
      parsed = requests.parse(
        body, engine.limits, engine.defaults, engine.processor.vocab.num_patches_per_side
      )
      job = engine.prepare(parsed)
    except requests.BadRequest:
      engine.count("bad_requests")
      raise
    result = engine.submit(job)
    result["timings"]["total_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    return result

  def health(self) -> dict:
    config = self.engine.model.config
    return dict(
      status="ok",
      uptime_s=round(time.time() - self.started, 1),
      image_size=views.input_size(config.vision),
      max_positions=config.text.max_positions,
      max_batch=self.engine.max_batch,
      defaults=self.engine.defaults,
    )


class Handler(http.server.BaseHTTPRequestHandler):
  server_version = "kosmos-jax"
  timeout = 60  # seconds a client may stall mid-request before its connection closes

  @property
  def app(self) -> App:
    return self.server.app

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    if self.app.access_log:
      super().log_message(format, *args)

  def _send(self, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
    self.send_response(status)
    self.send_header("Content-Type", kind)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    for key, value in (extra or {}).items():
      self.send_header(key, value)
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, value, extra: dict | None = None) -> None:
    body = json.dumps(value, ensure_ascii=False).encode()
    self._send(status, body, "application/json; charset=utf-8", extra)

  def _error(self, status: int, message: str, extra: dict | None = None) -> None:
    self._json(status, dict(error=message, status=status), extra)

  def do_GET(self):  # pylint: disable=invalid-name
    path = self.path.split("?")[0]
    if path in self.app.static:
      body, kind = self.app.static[path]
      self._send(200, body, f"{kind}; charset=utf-8")
    elif path == "/healthz":
      self._json(200, self.app.health())
    elif path == "/metrics":
      self._json(200, self.app.engine.metrics())
    elif path == "/openapi.json":
      self._json(200, self.app.spec)
    elif path == "/v1/examples":
      self._json(200, self.app.examples)
    elif path == "/v1/generate":
      self._error(405, "use POST /v1/generate with a JSON body", {"Allow": "POST"})
    else:
      self._error(404, f"no route GET {path}; the API is described at /openapi.json")

  def do_POST(self):  # pylint: disable=invalid-name
    path = self.path.split("?")[0]
    if path != "/v1/generate":
      self._error(404, f"no route POST {path}; the API is described at /openapi.json")
      return
    length = self.headers.get("Content-Length")
    if length is None or not length.isdigit():
      self._error(411, "a Content-Length header is required")
      return
    if int(length) > self.app.max_body:
      self.close_connection = True  # the unread body must not be taken for a request
      self._error(413, f"body: {length} bytes; the limit is {self.app.max_body}")
      return
    body = self.rfile.read(int(length))
    try:
      self._json(200, self.app.generate(body))
    except requests.BadRequest as e:
      self._error(e.status, str(e))
    except Exception as e:  # pylint: disable=broad-except  # answer, log, keep serving
      traceback.print_exc(file=sys.stderr)
      self._error(500, f"internal error: {type(e).__name__}: {e}")


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True  # a stuck client does not block shutdown
  request_queue_size = 128  # concurrent clients connecting at once


class Server6(Server):
  address_family = socket.AF_INET6


def make_server(app: App | None, host: str = "127.0.0.1", port: int = 8080) -> Server:
  """Binds now (a taken port fails here); `serve_forever` answers once `app`
  (here or set later as `server.app`) is there."""
  server = (Server6 if ":" in host else Server)((host, port), Handler)
  server.app = app
  return server
