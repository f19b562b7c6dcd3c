"""The API's OpenAPI 3 description (`GET /openapi.json`), written by hand.

The limits and defaults are the running server's, so the description says
what this server accepts.
"""

from kosmos_jax.serve import requests

_NUMBER = {"type": "number"}
_INT = {"type": "integer"}
_BOX = {
  "type": "array",
  "items": {"type": "number", "minimum": 0, "maximum": 1},
  "minItems": 4,
  "maxItems": 4,
  "description": "[x1, y1, x2, y2], fractions of the picture's width and height; x1 < x2, y1 < y2",
}
_ERROR = {
  "type": "object",
  "properties": {"error": {"type": "string"}, "status": _INT},
  "required": ["error", "status"],
}


def _option_schemas(limits: requests.Limits, defaults: dict) -> dict:
  kinds = {int: _INT, float: _NUMBER, bool: {"type": "boolean"}}
  out = {}
  for name, (kind, _, what) in requests.OPTIONS.items():
    what = what.format(max=limits.max_new_tokens, beams=limits.max_beams)
    out[name] = dict(kinds[kind], default=defaults[name], description=what)
  return out


def spec(limits: requests.Limits, defaults: dict) -> dict:
  request = {
    "type": "object",
    "required": ["image", "task"],
    "additionalProperties": False,
    "properties": {
      "image": {
        "type": "string",
        "description": "the picture file (PNG, JPEG, GIF, WebP, ...) in base64, or a "
        f"data: URL; at most {limits.max_image_bytes} bytes and {limits.max_image_side} "
        "pixels per side",
      },
      "task": {
        "type": "string",
        "enum": list(requests.TASKS),
        "description": "caption_brief '<grounding>An image of'; caption_detailed "
        "'<grounding>Describe this image in detail:'; grounding (phrase, optional context: "
        "the caption before it) and rec (phrase) '<grounding>[context ]<phrase>..</phrase>'; "
        "reg (box) '<phrase> It</phrase><object>..</object> is'; vqa (question) "
        "'<grounding> Question: .. Answer:'; free (prompt, optional box for its one phrase)",
      },
      "phrase": {"type": "string", "description": "grounding, rec: what to find"},
      "context": {"type": "string", "description": "grounding: the words before the phrase"},
      "question": {"type": "string", "description": "vqa"},
      "prompt": {"type": "string", "description": "free: the text after the image, markup allowed"},
      "box": _BOX,
      **_option_schemas(limits, defaults),
    },
  }
  entity = {
    "type": "object",
    "properties": {
      "phrase": {"type": "string"},
      "span": {"type": "array", "items": _INT, "description": "[start, end) in text"},
      "boxes": {"type": "array", "items": _BOX},
    },
  }
  answer = {
    "type": "object",
    "properties": {
      "text": {"type": "string", "description": "the prompt's words and the answer, no markup"},
      "entities": {"type": "array", "items": entity},
      "token_ids": {"type": "array", "items": _INT, "description": "the new tokens, EOS included"},
      "prompt": {"type": "string", "description": "the prompt the task made"},
      "timings": {
        "type": "object",
        "description": "preprocess_ms, queue_ms, generate_ms (the whole batch's call), "
        "batch_size (requests in that call), total_ms",
      },
    },
  }
  errors = {
    str(code): {
      "description": text,
      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for code, text in (
      (
        400,
        "malformed JSON, a missing or unknown field, an unknown task, a bad box or "
        "option, not an image, a prompt longer than the model takes",
      ),
      (411, "no Content-Length"),
      (413, "an image over the byte or pixel limit, or a body over the byte limit"),
      (503, "no answer within the timeout, or too many requests waiting"),
    )
  }
  json_body = lambda ref: {"application/json": {"schema": {"$ref": ref}}}
  plain = lambda text: {"200": {"description": text, "content": {"application/json": {}}}}
  return {
    "openapi": "3.0.3",
    "info": {"title": "kosmos-jax serve", "version": "1"},
    "paths": {
      "/v1/generate": {
        "post": {
          "summary": "A grounded answer for one picture; requests that arrive together "
          "share one batched generate call",
          "requestBody": {"required": True, "content": json_body("#/components/schemas/Request")},
          "responses": {
            "200": {
              "description": "the answer",
              "content": json_body("#/components/schemas/Answer"),
            },
            **errors,
          },
        }
      },
      "/healthz": {"get": {"summary": "alive and warm", "responses": plain("status, model")}},
      "/metrics": {
        "get": {"summary": "counters", "responses": plain("requests, generate calls, batches")}
      },
      "/v1/examples": {
        "get": {"summary": "bundled pictures", "responses": plain("name, image, objects")}
      },
    },
    "components": {"schemas": {"Request": request, "Answer": answer, "Error": _ERROR}},
  }
