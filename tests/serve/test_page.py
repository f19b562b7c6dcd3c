"""The page in a real browser (Debian's Chromium, headless, through Playwright):
grounded caption from an uploaded picture, REG from a box drawn with the
mouse, hover links between phrases and boxes, copying the JSON, errors.

`KOSMOS_JAX_SCREENSHOT=docs/serve.png` keeps the REG screenshot (the README's).
"""

import json
import os
import shutil

import pytest
from playwright.sync_api import sync_playwright

from tests.serve.conftest import b64

CHROMIUM = "/usr/bin/chromium"  # `make test` installs it (apt-get install chromium)


@pytest.fixture(scope="module")
def browser():
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
    yield browser
    browser.close()


@pytest.fixture
def page(browser, served):
  context = browser.new_context(viewport={"width": 1180, "height": 760})
  context.grant_permissions(["clipboard-read", "clipboard-write"], origin=served.url)
  page = context.new_page()
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  page.goto(served.url)
  page.wait_for_selector("#examples button.example")  # health and examples loaded
  yield page
  context.close()
  assert not errors, errors


def _percent(style: str, name: str) -> float:
  return float(style.split(f"{name}: ")[1].split("%")[0]) / 100


def test_grounded_caption_of_an_uploaded_picture(page, served):
  page.set_input_files("#file", str(served.snowman))
  page.wait_for_selector("#stage:not(.empty)")
  page.select_option("#task", "caption_brief")
  page.click("#run")
  page.wait_for_selector("#result:not([hidden])")
  status, want = served.post(dict(image=b64(served.snowman), task="caption_brief"))
  assert status == 200
  assert page.inner_text("#answer") == want["text"] and want["text"]
  # Every box of every entity has its overlay, every phrase its coloured span.
  boxes = page.locator("#overlay .box.entity")
  assert boxes.count() == sum(len(e["boxes"]) for e in want["entities"])
  spans = [e for e in want["entities"] if e["span"][1] > e["span"][0]]
  assert page.locator("#answer .phrase").count() == len(spans)
  assert json.loads(page.text_content("#json"))["text"] == want["text"]


def test_reg_from_a_box_drawn_with_the_mouse(page, served, tmp_path):
  page.click("#examples button.example >> nth=1")
  page.wait_for_selector("#stage:not(.empty)")
  page.select_option("#task", "reg")
  frame = page.locator("#overlay").bounding_box()
  at = lambda fx, fy: (frame["x"] + frame["width"] * fx, frame["y"] + frame["height"] * fy)
  page.mouse.move(*at(0.25, 0.2))
  page.mouse.down()
  page.mouse.move(*at(0.75, 0.6), steps=6)
  page.mouse.up()
  drawn = page.get_attribute("#user-box", "style")
  assert abs(_percent(drawn, "left") - 0.25) < 0.01 and abs(_percent(drawn, "width") - 0.5) < 0.01
  with page.expect_request("**/v1/generate") as sent:
    page.click("#run")
  box = sent.value.post_data_json["box"]
  assert all(abs(a - b) < 0.01 for a, b in zip(box, [0.25, 0.2, 0.75, 0.6])), box
  page.wait_for_selector("#result:not([hidden])")
  answer = json.loads(page.text_content("#json"))
  assert page.inner_text("#answer").startswith("It") and answer["entities"][0]["phrase"] == "It"
  # The answer's "It" carries the drawn box (quantized to the location grid): drawn over it.
  overlay = page.locator('#overlay .box.entity[data-entity="0"]')
  style = overlay.get_attribute("style")
  x1, y1, x2, y2 = answer["entities"][0]["boxes"][0]
  assert (
    abs(_percent(style, "left") - x1) < 1e-3 and abs(_percent(style, "width") - (x2 - x1)) < 1e-3
  )
  assert abs(x1 - 0.25) < 0.04 and abs(y2 - 0.6) < 0.04
  assert page.is_visible("#user-box")
  # Hovering the phrase highlights its box, and the other way round.
  phrase = page.locator('#answer .phrase[data-entity="0"]')
  phrase.hover()
  assert "hl" in overlay.get_attribute("class").split()
  page.mouse.move(0, 0)
  assert "hl" not in overlay.get_attribute("class").split()
  overlay.hover(position={"x": 5, "y": 5})
  assert "hl" in phrase.get_attribute("class").split()
  page.screenshot(path=str(tmp_path / "serve.png"))
  if os.environ.get("KOSMOS_JAX_SCREENSHOT"):
    shutil.copyfile(tmp_path / "serve.png", os.environ["KOSMOS_JAX_SCREENSHOT"])
  page.click("#copy")
  page.wait_for_selector("#copied:text('Copied.')")
  assert json.loads(page.evaluate("navigator.clipboard.readText()")) == answer


def test_a_dropped_picture_and_errors_shown(page, served):
  page.select_option("#task", "reg")
  page.click("#run")
  assert page.inner_text("#error") == "Choose a picture first."
  data = page.evaluate_handle(
    """async (b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const data = new DataTransfer();
      data.items.add(new File([bytes], "snowman.jpg", { type: "image/jpeg" }));
      return data;
    }""",
    b64(served.snowman),
  )
  page.dispatch_event("#stage", "drop", {"dataTransfer": data})
  page.wait_for_selector("#stage:not(.empty)")
  page.click("#run")
  assert page.inner_text("#error") == "Draw a box on the picture first."
  page.select_option("#task", "free")
  page.fill("#prompt", "<image> two pictures")  # the server refuses it, naming the problem
  page.click("#run")
  page.wait_for_selector("#error:not([hidden])")
  assert page.inner_text("#error").startswith("400: prompt: one picture per request")
  page.select_option("#task", "vqa")
  page.fill("#question", "What is it?")
  page.click("#run")
  page.wait_for_selector("#result:not([hidden])")
  assert page.is_hidden("#error") and "What is it?" in page.inner_text("#answer")
