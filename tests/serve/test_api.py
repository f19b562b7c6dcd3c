"""`kosmos-jax serve`'s API: answers, every kind of bad input, limits, timeouts."""

import base64
import http.client
import io
import json
import os
import threading
import time
import urllib.parse
import urllib.request

import ml_collections
import numpy as np
import pytest
from PIL import Image

import kosmos_jax
from kosmos_jax.processing import grounding
from kosmos_jax.serve import batcher, requests, server
from tests.serve.conftest import MAX_IMAGE_BYTES, MAX_IMAGE_SIDE, NEW_TOKENS, b64, request


def _png(size, mode="RGB") -> str:
  buffer = io.BytesIO()
  Image.new(mode, size).save(buffer, "PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def test_health_openapi_examples_and_page(served):
  status, health = served.get("/healthz")
  assert status == 200 and health["status"] == "ok" and health["max_batch"] == 8
  assert health["defaults"]["max_new_tokens"] == NEW_TOKENS
  status, spec = served.get("/openapi.json")
  assert status == 200 and spec["openapi"].startswith("3.")
  schema = spec["components"]["schemas"]["Request"]
  assert set(schema["properties"]["task"]["enum"]) == set(requests.TASKS)
  assert set(requests.FIELDS) == set(schema["properties"])
  status, examples = served.get("/v1/examples")
  assert status == 200 and len(examples) == 4
  assert examples[0]["image"].startswith("data:image/jpeg;base64,") and examples[0]["objects"]
  page = [urllib.request.urlopen(served.url + p).read().decode() for p in ("/", "/page.js")]
  assert '<script src="/page.js">' in page[0]
  assert not any(scheme in text for text in page for scheme in ("http:", "https:", "//cdn"))


def test_answers_equal_model_generate(served, tiny_snapshot):
  """The REG answer is the model's own greedy continuation; its text keeps the
  boxed "It" of the prompt, so the entity's box is the drawn one, quantized."""
  box = [0.3, 0.1, 0.7, 0.9]
  status, answer = served.post(dict(image=b64(served.snowman), task="reg", box=box))
  assert status == 200, answer
  snap = str(tiny_snapshot / "snap")
  model, processor = kosmos_jax.from_pretrained(snap), kosmos_jax.Processor.from_pretrained(snap)
  prompt = grounding.reg_prompt(box)
  inputs = processor(text=[prompt], images=[np.asarray(Image.open(served.snowman))])
  ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS)[0].tolist()
  new = ids[inputs["input_ids"].shape[1] :]
  assert answer["token_ids"] == new[: len(answer["token_ids"])]
  assert answer["prompt"] == prompt
  ul, lr = grounding.box_to_patch_indices(box)
  assert answer["entities"][0]["phrase"] == "It" and answer["entities"][0]["span"] == [0, 2]
  assert answer["entities"][0]["boxes"] == [list(grounding.patch_indices_to_box(ul, lr))]
  assert answer["text"].startswith("It is")
  assert answer["timings"]["batch_size"] == 1 and answer["timings"]["total_ms"] > 0


@pytest.fixture(scope="module")
def image(served):
  return b64(served.snowman)


BAD = [
  # (what, body with IMAGE for the good picture, status, words of the message)
  ("malformed JSON", b'{"task": "caption_brief",', 400, "malformed JSON"),
  ("not an object", b"[1, 2]", 400, "JSON object"),
  ("no image", dict(task="caption_brief"), 400, "missing field 'image'"),
  ("no task", dict(image="IMAGE"), 400, "missing field 'task'"),
  ("unknown task", dict(image="IMAGE", task="poem"), 400, 'task: unknown "poem"'),
  ("unknown field", dict(image="IMAGE", task="caption_brief", max_tokens=3), 400, "max_tokens"),
  ("not base64", dict(image="not base64!", task="caption_brief"), 400, "not valid base64"),
  (
    "not an image",
    dict(image=base64.b64encode(b"x" * 99).decode(), task="caption_brief"),
    400,
    "image: not an image",
  ),
  (
    "bytes",
    dict(image=base64.b64encode(os.urandom(MAX_IMAGE_BYTES + 10)).decode(), task="caption_brief"),
    413,
    f"limit is {MAX_IMAGE_BYTES}",
  ),
  (
    "pixels",
    dict(image=_png((MAX_IMAGE_SIDE + 1, 8)), task="caption_brief"),
    413,
    f"{MAX_IMAGE_SIDE + 1} x 8 pixels",
  ),
  ("16-bit", dict(image=_png((8, 8), "I;16"), task="caption_brief"), 400, "mode 'I;16'"),
  ("box outside", dict(image="IMAGE", task="reg", box=[0.1, 0.1, 1.2, 0.5]), 400, "box: [0.1"),
  ("x1 >= x2", dict(image="IMAGE", task="reg", box=[0.5, 0.1, 0.5, 0.5]), 400, "x1 < x2"),
  ("box size", dict(image="IMAGE", task="reg", box=[0.1, 0.2]), 400, "[x1, y1, x2, y2]"),
  ("no box", dict(image="IMAGE", task="reg"), 400, "missing field 'box'"),
  (
    "box unused",
    dict(image="IMAGE", task="vqa", question="q", box=[0, 0, 1, 1]),
    400,
    "task 'vqa' does not use it",
  ),
  ("markup", dict(image="IMAGE", task="rec", phrase="a <b>"), 400, "'<' or '>'"),
  ("no phrase", dict(image="IMAGE", task="rec"), 400, "missing field 'phrase'"),
  ("empty", dict(image="IMAGE", task="vqa", question=" "), 400, "question: expected a non-empty"),
  (
    "too long",
    dict(image="IMAGE", task="free", prompt="ba " * 2100),
    400,
    "more than the model's 2048 positions",
  ),
  ("chars", dict(image="IMAGE", task="free", prompt="a" * 70_000), 400, "70000 characters"),
  ("images", dict(image="IMAGE", task="free", prompt="<image> a"), 400, "no <image>"),
  (
    "free box",
    dict(image="IMAGE", task="free", prompt="a", box=[0, 0, 1, 1]),
    400,
    "exactly one <phrase>",
  ),
  (
    "tokens",
    dict(image="IMAGE", task="caption_brief", max_new_tokens=0),
    400,
    "max_new_tokens: 0 is not an integer in [1, 512]",
  ),
  ("beams", dict(image="IMAGE", task="caption_brief", num_beams=99), 400, "num_beams: 99"),
  ("bool", dict(image="IMAGE", task="caption_brief", do_sample="yes"), 400, "true or false"),
  ("temperature", dict(image="IMAGE", task="caption_brief", temperature=-1), 400, "> 0"),
  (
    "beam sampling",
    dict(image="IMAGE", task="caption_brief", do_sample=True, num_beams=2),
    400,
    "beam sampling",
  ),
]


@pytest.mark.parametrize("what, body, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_it(served, image, what, body, status, words):
  if isinstance(body, dict):
    body = json.dumps({k: image if v == "IMAGE" else v for k, v in body.items()}).encode()
  got, answer = served.post(body)
  assert (got, answer["status"]) == (status, status), (what, answer)
  assert words in answer["error"], (what, answer["error"])


def test_routes_methods_and_headers(served):
  assert served.get("/nothing")[0] == 404
  status, answer = served.get("/v1/generate")
  assert status == 405 and "POST" in answer["error"]
  host = urllib.parse.urlsplit(served.url)
  connection = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
  connection.putrequest("POST", "/v1/generate")
  connection.endheaders()  # no Content-Length
  response = connection.getresponse()
  assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
  connection.close()


def test_server_keeps_serving_and_writes_nothing(served, image):
  bad_before = served.metrics()["bad_requests"]
  for _ in range(3):
    assert served.post(b"{")[0] == 400
  status, answer = served.post(dict(image=image, task="vqa", question="What is it?"))
  assert status == 200 and "What is it?" in answer["text"]
  assert served.metrics()["bad_requests"] == bad_before + 3
  assert served.proc.poll() is None
  assert not list(served.cwd.iterdir()) and not list(served.tmp.iterdir())


class SlowModel:
  """Answers after `delay` seconds with EOS: a stand-in for a busy accelerator."""

  generation_config = {}
  config = ml_collections.ConfigDict(dict(text=dict(max_positions=2048), vision=dict(image_size=8)))

  def __init__(self, delay: float):
    self.delay = delay

  def generate(self, input_ids, **kwargs):
    del kwargs
    time.sleep(self.delay)
    return np.concatenate([input_ids, np.full((len(input_ids), 1), 2)], axis=1)


def test_slow_answers_get_503_and_a_full_queue_too(tiny_snapshot):
  processor = kosmos_jax.Processor.from_pretrained(tiny_snapshot / "snap")
  engine = batcher.Engine(
    SlowModel(0.6), processor, max_batch=1, window_s=0, timeout_s=0.3, max_queue=1
  )
  app = server.App(engine, [])
  httpd = server.make_server(app, "127.0.0.1", 0)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  engine.start()
  url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/generate"
  body = json.dumps(dict(image=_png((8, 8)), task="caption_brief")).encode()
  answers = []
  threads = [threading.Thread(target=lambda: answers.append(request(url, body))) for _ in range(3)]
  for thread in threads:  # one runs, one waits in the queue, one finds it full
    thread.start()
    time.sleep(0.1)
  for thread in threads:
    thread.join()
  httpd.shutdown()
  engine.stop()
  messages = sorted(a["error"].split(":")[0] for _, a in answers)
  assert [s for s, _ in answers] == [503] * 3 and messages == ["busy", "timed out", "timed out"]
  assert "--timeout" in next(a["error"] for _, a in answers if "timed" in a["error"])
  metrics = engine.metrics()
  assert (metrics["timed_out"], metrics["busy"], metrics["answered"]) == (2, 1, 0)
