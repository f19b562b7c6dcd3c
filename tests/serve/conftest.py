"""One `kosmos-jax serve` on the tiny random snapshot for the API, batching and
browser tests: a subprocess, as a user starts it, in an empty working
directory with an empty TMPDIR (a test checks that they stay empty)."""

import base64
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

# Small limits, so the over-the-limit requests stay small and fast.
MAX_IMAGE_BYTES = 300_000
MAX_IMAGE_SIDE = 1000
MAX_BATCH = 8
NEW_TOKENS = 8  # the server's default for a request


@dataclasses.dataclass
class Served:
  url: str
  proc: subprocess.Popen
  cwd: pathlib.Path
  tmp: pathlib.Path
  snowman: pathlib.Path
  log: list

  def get(self, path: str):
    return request(self.url + path)

  def post(self, body, path: str = "/v1/generate"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(self.url + path, data)

  def metrics(self) -> dict:
    return self.get("/metrics")[1]


def request(url: str, data: bytes | None = None) -> tuple[int, dict]:
  """(status, JSON body) of a GET, or of a POST when `data` is given."""
  try:
    with urllib.request.urlopen(url, data, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def b64(path) -> str:
  return base64.b64encode(pathlib.Path(path).read_bytes()).decode()


def _command() -> list[str]:
  script = os.path.join(os.path.dirname(sys.executable), "kosmos-jax")
  return [script] if os.path.exists(script) else [sys.executable, "-m", "kosmos_jax.commands"]


@pytest.fixture(scope="session")
def served(tiny_snapshot, tmp_path_factory):
  cwd, tmp = tmp_path_factory.mktemp("serve_cwd"), tmp_path_factory.mktemp("serve_tmp")
  root = pathlib.Path(__file__).resolve().parents[2]
  env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's server has
  args = [
    *("--checkpoint", str(tiny_snapshot / "snap"), "--port", "0"),
    *("--max-batch", str(MAX_BATCH), "--max-new-tokens", str(NEW_TOKENS)),
    *("--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-side", str(MAX_IMAGE_SIDE)),
  ]
  proc = subprocess.Popen(
    [*_command(), "serve", *args],
    cwd=cwd,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  log = []  # stderr, read all along so the pipe never fills
  threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
  line = proc.stdout.readline()  # the address, once warm
  if "http://" not in line:
    proc.kill()
    proc.wait()
    raise AssertionError(f"kosmos-jax serve did not start: {line!r}\n{''.join(log)[-3000:]}")
  url = line.split("http://")[1].split("/")[0]
  yield Served(f"http://{url}", proc, cwd, tmp, tiny_snapshot / "snowman.jpg", log)
  proc.terminate()
  proc.wait(timeout=30)
