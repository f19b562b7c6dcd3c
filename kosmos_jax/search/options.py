"""Generation options: defaults, checks, and the static / traced split.

What the compiled decoding loop depends on (`Static`) is hashable and
static; every other option is a traced scalar, so a new value reuses the
loop. transformers' rules carry over: an explicit argument, else the
checkpoint's generation config, else transformers' default.
"""

import dataclasses
from collections.abc import Mapping, Sequence

# transformers' GenerationConfig defaults, except top_k: 0 (off) rather than 50.
DEFAULTS = dict(
  num_beams=1,
  do_sample=False,
  temperature=1.0,
  top_k=0,
  top_p=1.0,
  no_repeat_ngram_size=0,
  length_penalty=1.0,
  early_stopping=False,
  min_length=0,
  repetition_penalty=1.0,
  num_return_sequences=1,
)
# Traced scalars that are integers; the others are float32.
INT_SCALARS = ("max_new_tokens", "top_k", "start", "min_new_tokens", "eos_ids")


def bucket_length(n: int) -> int:
  """Powers of two from 16 to 64, then multiples of 64."""
  if n <= 64:
    return max(16, 1 << (n - 1).bit_length())
  return -(-n // 64) * 64


@dataclasses.dataclass(frozen=True)
class Static:
  """What the compiled loop depends on; everything else is a traced argument."""

  capacity: int  # new-token slots (bucketed max_new_tokens)
  num_beams: int
  do_sample: bool
  ngram_size: int
  early_stopping: bool | str
  num_eos: int  # the ids themselves are traced
  pad_id: int
  num_return: int = 1  # beams returned per item (sampling repeats rows instead)
  stop_window: int = 0  # tokens a stop-string check looks back; 0: no stop strings


def _check(opts: dict) -> None:
  """transformers' GenerationConfig.validate errors, and ours."""
  if not opts["max_new_tokens"] or opts["max_new_tokens"] < 1:
    raise ValueError("max_new_tokens must be a positive integer (argument or generation config)")
  beams, returns = opts["num_beams"], opts["num_return_sequences"]
  if beams > 1 and opts["do_sample"]:
    raise ValueError("sampling with num_beams > 1 (beam sampling) is not supported")
  if returns < 1 or (returns > 1 and beams == 1 and not opts["do_sample"]):
    raise ValueError(
      f"num_return_sequences={returns}: greedy search returns one sequence per row "
      "(sample, or use beam search, for more)"
    )
  if beams > 1 and returns > beams:
    raise ValueError(f"num_return_sequences={returns} is more than num_beams={beams}")
  if not opts["repetition_penalty"] > 0:
    raise ValueError(f"repetition_penalty must be > 0, got {opts['repetition_penalty']}")
  for key in ("min_length", "min_new_tokens"):
    if opts[key] is not None and opts[key] < 0:
      raise ValueError(f"{key} must be >= 0, got {opts[key]}")


def resolve(
  generation_config: Mapping, eos_id: int, pad_id: int, prompt_length: int, **explicit
) -> tuple[Static, dict, tuple[str, ...]]:
  """Explicit arguments (None: unset), else `generation_config`, else DEFAULTS.

  eos_id / pad_id: the model's, used when neither gives them. Returns the
  static options, the traced scalars (Python numbers; eos_ids a list) and
  the stop strings.
  """
  opts = {}
  for key, value in explicit.items():
    if value is None:
      value = generation_config.get(key)
    opts[key] = DEFAULTS.get(key) if value is None else value
  _check(opts)
  eos = eos_id if opts["eos_token_id"] is None else opts["eos_token_id"]
  eos = [int(e) for e in (eos if isinstance(eos, Sequence) else [eos])]
  if not eos:
    raise ValueError("eos_token_id: give at least one id")
  static = Static(
    capacity=bucket_length(opts["max_new_tokens"]),
    num_beams=int(opts["num_beams"]),
    do_sample=bool(opts["do_sample"]),
    ngram_size=int(opts["no_repeat_ngram_size"] or 0),
    early_stopping=opts["early_stopping"],
    num_eos=len(eos),
    pad_id=pad_id if opts["pad_token_id"] is None else int(opts["pad_token_id"]),
    num_return=int(opts["num_return_sequences"]),
  )
  keys = ("max_new_tokens", "temperature", "top_k", "top_p", "length_penalty")
  scalars = {k: opts[k] for k in (*keys, "repetition_penalty")}
  scalars["eos_ids"] = eos
  # transformers: min_new_tokens wins; min_length counts the prompt's width.
  scalars["min_new_tokens"] = (
    max(opts["min_length"] - prompt_length, 0)
    if opts["min_new_tokens"] is None
    else opts["min_new_tokens"]
  )
  stops = opts["stop_strings"] or ()
  return static, scalars, (stops,) if isinstance(stops, str) else tuple(stops)


def token_texts(tokenizer) -> list[str]:
  """Token id -> text ("▁" read as a space) from our Processor or
  vocabulary, or a transformers sentencepiece tokenizer (Kosmos-2's XLM-R)."""
  vocab = getattr(tokenizer, "vocab", tokenizer)  # a Processor holds its vocabulary
  if hasattr(vocab, "id_to_token"):
    pieces = []
    for i in range(vocab.vocab_size):
      try:
        pieces.append(vocab.id_to_token(i))
      except IndexError:  # seqio extra ids have no text
        break
  elif hasattr(tokenizer, "convert_ids_to_tokens"):
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  else:
    raise TypeError(
      "tokenizer: expected a kosmos_jax Processor or KosmosVocabulary, or a transformers "
      f"tokenizer; got {type(tokenizer).__name__}"
    )
  return [p.replace("\u2581", " ") for p in pieces]
