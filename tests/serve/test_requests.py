"""Request parsing and batch sizes, without a server."""

import base64
import io
import json

import pytest
from PIL import Image

from kosmos_jax.serve import batcher, requests

DEFAULTS = batcher.default_options({"no_repeat_ngram_size": 3}, None)


def _parse(**fields):
  return requests.parse(json.dumps(fields).encode(), requests.Limits(), DEFAULTS, 32)


def _png() -> bytes:
  buffer = io.BytesIO()
  Image.new("RGBA", (6, 4), (255, 0, 0, 0)).save(buffer, "PNG")
  return buffer.getvalue()


def test_size_buckets():
  assert batcher.size_buckets(1) == [1]
  assert batcher.size_buckets(8) == [1, 2, 4, 8]
  assert batcher.size_buckets(12) == [1, 2, 4, 8, 12]


def test_defaults_follow_the_generation_config():
  assert DEFAULTS["no_repeat_ngram_size"] == 3 and DEFAULTS["max_new_tokens"] == 128
  assert DEFAULTS["num_beams"] == 1 and DEFAULTS["do_sample"] is False
  assert set(DEFAULTS) == set(requests.OPTIONS)


def test_images_as_data_urls_or_wrapped_base64():
  text = base64.encodebytes(_png()).decode()  # 76-character lines, as `base64` writes
  wrapped = _parse(image=text, task="caption_brief")
  url = _parse(
    image="data:image/png;base64," + base64.b64encode(_png()).decode(), task="rec", phrase="a dot"
  )
  assert wrapped.image.shape == url.image.shape == (4, 6, 3)
  assert (wrapped.image == 255).all()  # transparency composited onto white
  assert url.prompt == "<grounding><phrase>a dot</phrase>"


@pytest.mark.parametrize(
  "fields, prompt",
  [
    (dict(task="caption_detailed"), "<grounding>Describe this image in detail:"),
    (
      dict(task="grounding", phrase="a dot", context="An image of"),
      "<grounding>An image of <phrase>a dot</phrase>",
    ),
    (dict(task="vqa", question="Why?"), "<grounding> Question: Why? Answer:"),
    (
      dict(task="reg", box=[0, 0, 1, 1]),
      "<phrase> It</phrase><object><patch_index_0000><patch_index_1023></object> is",
    ),
    (dict(task="free", prompt="<phrase>x</phrase> is"), "<phrase>x</phrase> is"),
  ],
)
def test_task_prompts(fields, prompt):
  parsed = _parse(image=base64.b64encode(_png()).decode(), **fields)
  assert parsed.prompt == prompt and parsed.options == DEFAULTS


def test_options_override_defaults_and_box_goes_to_the_free_phrase():
  parsed = _parse(
    image=base64.b64encode(_png()).decode(),
    task="free",
    prompt="<grounding><phrase>x</phrase>",
    box=[0.1, 0.2, 0.3, 0.4],
    num_beams=3,
    temperature=1,
  )
  assert parsed.bboxes == [[(0.1, 0.2, 0.3, 0.4)]]
  assert parsed.options["num_beams"] == 3 and parsed.options["temperature"] == 1.0
