"""Task prompts (SPHINX's task-specific instructions): templates as data.

The templates live in `task_prompts.json` (name -> template), SPHINX's own
strings (reference sphinx_pandagpt.md 1.3) with our location tokens for
boxes; `load(prompts_file)` adds or overrides names from a JSON file of the
same shape. Built in:

  vqa               "{question} Answer the question using a single word or phrase."
  rec               "Please provide the bounding box coordinate of the region this
                    sentence describes: {expression}"
  reg               "Please provide a short description of the region {box}."
  grounded_caption  "Describe the image concisely. Include the bounding box for each
                    mentioned object."
  caption           "Provide a one-sentence caption for the provided image."
  detailed_caption  "Generate a detailed description about the image."

SPHINX writes a box as "[0.12, 0.30, 0.45, 0.80]"; here boxes stay the
model's location tokens: a `<box>` marker of the conversation format (or
`<object><patch_index_a><patch_index_b></object>` written out), in the
question (reg's `{box}`) as in the answer (rec: "<phrase>the red circle</phrase><box>").

The rule, for a conversation task with a template: every human turn's value
is put through `fill`. A template has at most one `{field}` (its name only
documents what goes there); the value, stripped, fills it. A template
without a field follows the value ("" or "<image>" for a caption task gives
the template alone, or "<image> " + template). Placement markers leading the
value (`<image>`, a modality's `<name>`) stay in front of the filled
template, so LLaVA-style "<image>\\nWhat colour is it?" still puts the picture
first. A field template with nothing to fill gives "", which the conversation
checks count as an empty value (the record is dropped, not trained on a
half prompt). Answers are never changed: the loss falls on them as before.
"""

import json
import os
import re
import string

from kosmos_jax import errors
from kosmos_jax.data import conversations
from kosmos_jax.processing import conversation

PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "task_prompts.json")
_MARK = re.compile(r"\s*<([a-z][a-z0-9_]*)>")


def _read(path: str) -> dict[str, str]:
  try:
    with open(path) as f:
      prompts = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"task prompts file {path!r}: {e}") from None
  if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
    raise errors.UserError(f"task prompts file {path!r}: not a JSON object of name -> template")
  for text in prompts.values():
    field(text)  # a bad template fails when it is loaded, not on every line
  return prompts


def load(prompts_file: str = "") -> dict[str, str]:
  """The built-in templates, with those of `prompts_file` added over them."""
  return {
    **_read(PROMPTS_FILE),
    **(_read(os.path.expanduser(prompts_file)) if prompts_file else {}),
  }


def template(name: str, prompts_file: str = "") -> str:
  """The template called `name`; a UserError naming the known ones if none is."""
  prompts = load(prompts_file)
  if name not in prompts:
    raise errors.UserError(f"no task prompt named {name!r} (known: {sorted(prompts)})")
  return prompts[name]


def field(text: str) -> str:
  """The name of a template's field, "" if it has none; a UserError for more
  than one field, positional or with a format spec."""
  try:
    names = {
      (n, spec, conv) for _, n, spec, conv in string.Formatter().parse(text) if n is not None
    }
  except ValueError as e:
    raise errors.UserError(f"task prompt {text!r}: {e}") from None
  if len(names) > 1 or any(not n.isidentifier() or spec or conv for n, spec, conv in names):
    raise errors.UserError(f"task prompt {text!r}: at most one plain {{name}} field")
  return next(iter(names))[0] if names else ""


def _placement(name: str) -> bool:
  """`<name>` places a picture or a vector (not a model tag, box or location)."""
  mark = f"<{name}>"
  return (
    mark not in conversations.MODEL_TAGS
    and mark != conversations.BOX_MARK
    and not (name.startswith("patch_index_"))
  )


def fill(text: str, value: str) -> str:
  """A human turn's value put through template `text` (the module doc's rule)."""
  lead, pos = [], 0
  while (m := _MARK.match(value, pos)) and _placement(m.group(1)):
    lead.append(m.group().strip())
    pos = m.end()
  rest = value[pos:].strip()
  name = field(text)
  if name:
    if not rest:
      return ""
    body = text.format(**{name: rest})
  else:
    body = f"{rest} {text}" if rest else text
  return " ".join([*lead, body])


def apply(turns, text: str) -> list:
  """`turns` with each human value put through template `text`; anything
  malformed is left as it is, for the conversation checks to name."""
  out = []
  for turn in turns:
    if conversation.role(turn) == conversation.HUMAN:
      turn = dict(turn, value=fill(text, turn["value"]))
    out.append(turn)
  return out


def apply_to_line(line: bytes | str, text: str) -> bytes | str:
  """A conversation JSON line with its human values templated; a line that is
  not a JSON object with a list of turns is returned as it is."""
  decoded = line.decode("utf-8", "surrogateescape") if isinstance(line, bytes) else line
  try:
    row = json.loads(decoded)
  except ValueError:
    return line
  if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
    return line
  # ensure_ascii keeps lone surrogates (invalid input bytes) as escapes, which
  # parse_line reads back the same as the untemplated line's.
  return json.dumps(dict(row, conversations=apply(row["conversations"], text)))
