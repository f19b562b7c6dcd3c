"""Instruction data: the prompt template and the JSON-line formats it reads.

Pure Python (no TensorFlow), so that generation and evaluation use the same
template as training: `prompt_text(instruction, input)` is the text a model
tuned on these tasks is given, and it answers with the response and `</s>`.

Template (`prompt_text`), the response following it:

  Instruction: {instruction}
  Input: {input}                (this line only when the input is not blank)
  Response: {response}

The tokenizer reads newlines as spaces (sentencepiece normalization), so the
three markers, not the line breaks, tell the model where the parts start. The
training sequence is `<s> prompt response </s>`, prompt and response tokenized
separately, as at generation time (prompt encoded alone, then the model
writes); loss falls on the response and `</s>` only.

Accepted lines (one JSON object per line; formats may mix within a file):

  {"instruction": ..., "input": ..., "output": ...}    Unnatural Instructions /
      Alpaca style; `input` may be missing, null or "".
  {"instruction": ..., "instances": [{"input": ..., "output": ..., ...}, ...]}
      the released Unnatural Instructions `core_data.jsonl` (and `full_data.jsonl`,
      whose `reformulations` are not read: the 68,478 core instances are what
      KOSMOS-1 trained on); one example per instance; `constraints` and
      `instruction_with_input` are not read.
  {"inputs": ..., "targets": ...}                      FLAN (v2) style: `inputs`
      is the instruction (FLAN's own template already applied), no input.

Other fields are ignored. A bad record becomes one example with a `problem`
(a `quality.REASONS` name) and is counted and dropped downstream.
"""

import dataclasses
import json

INSTRUCTION_MARKER = "Instruction: "
INPUT_MARKER = "\nInput: "
RESPONSE_MARKER = "\nResponse:"


def prompt_text(instruction: str, input_text: str | None = None) -> str:
  """The prompt for an instruction and its (optional) input; the response
  follows it (the model's first piece carries sentencepiece's leading space)."""
  text = INSTRUCTION_MARKER + instruction.strip()
  if input_text and input_text.strip():
    text += INPUT_MARKER + input_text.strip()
  return text + RESPONSE_MARKER


@dataclasses.dataclass(frozen=True)
class Record:
  key: str  # "file:line", "file:line#i" for the i-th instance of a core line
  prompt: str = ""
  response: str = ""
  problem: str = ""  # "" for a good record, else a quality.REASONS name


def _example(key: str, instruction, input_text, output) -> Record:
  if instruction is None or output is None:
    return Record(key, problem="instruction_field_missing")
  if not all(isinstance(v, str) for v in (instruction, output)) or not isinstance(
    input_text, (str, type(None))
  ):
    return Record(key, problem="instruction_not_string")
  if not instruction.strip():
    return Record(key, problem="instruction_empty_prompt")
  if not output.strip():
    return Record(key, problem="instruction_empty_response")
  return Record(key, prompt_text(instruction, input_text), output)


def parse_line(line: bytes | str, key: str) -> list[Record]:
  """The records of one JSON line (several for a core-format line)."""
  if isinstance(line, bytes):
    # Invalid UTF-8 survives as lone surrogates, for the preprocessor to repair and count.
    line = line.decode("utf-8", "surrogateescape")
  try:
    row = json.loads(line)
  except ValueError:
    row = None
  if not isinstance(row, dict):
    return [Record(key, problem="instruction_bad_json")]
  if "instances" in row:
    instances = row["instances"]
    if not isinstance(instances, list) or not instances:
      return [Record(key, problem="instruction_field_missing")]
    return [
      _example(f"{key}#{i}", row.get("instruction"), x.get("input"), x.get("output"))
      if isinstance(x, dict)
      else Record(f"{key}#{i}", problem="instruction_field_missing")
      for i, x in enumerate(instances)
    ]
  if "inputs" in row or "targets" in row:
    return [_example(key, row.get("inputs"), None, row.get("targets"))]
  return [_example(key, row.get("instruction"), row.get("input"), row.get("output"))]
