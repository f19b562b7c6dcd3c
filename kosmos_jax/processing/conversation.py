"""The chat template of conversation data (LLaVA/SPHINX style), in plain Python.

Training (data/conversation_tasks.py) and generation build the same text from
it, so a model tuned on conversations is prompted exactly as it learnt:

  Human: {value} Assistant: {answer}</s> Human: {value} Assistant: {answer}</s>

Each human turn is "Human: {value}" (a single space before it after the first
turn); each assistant turn is " Assistant:" (prompt, no loss) and then
" {answer}" followed by `</s>` (both learnt). The tokenizer reads newlines as
spaces, so the markers, not line breaks, separate the turns. `</s>` ends each
answer: generation stops there, and the next question follows it.

Turns are {"from": role, "value": text}; roles "human"/"user" and
"gpt"/"assistant" (any case). A conversation alternates, starts with a human
turn and ends with an assistant turn (a trailing question teaches nothing).
"""

from collections.abc import Sequence

HUMAN, ASSISTANT = "human", "gpt"
ROLES = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT}
HUMAN_MARKER = "Human: "
ASSISTANT_MARKER = " Assistant:"
EOS = "</s>"  # after each answer, in the text `generation_prompt` gives

# What `problem` returns (data/ counts them as `conversation_{name}`).
BAD_TURNS = "bad_turns"  # not a list of {"from": str, "value": str}, or an unknown role
ROLES_ORDER = "roles"  # not human, assistant, human, ..., assistant
EMPTY_VALUE = "empty_value"  # a blank value


def role(turn) -> str | None:
  """HUMAN or ASSISTANT for a well-formed turn, else None."""
  if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
    return None
  name = turn.get("from")
  return ROLES.get(name.lower()) if isinstance(name, str) else None


def problem(conversations, complete: bool = True) -> str:
  """ "" for a usable conversation, else one of BAD_TURNS, ROLES_ORDER,
  EMPTY_VALUE. `complete=False` accepts an empty list (a history)."""
  if not isinstance(conversations, (list, tuple)):
    return BAD_TURNS
  roles = [role(t) for t in conversations]
  if None in roles:
    return BAD_TURNS
  expected = [(HUMAN, ASSISTANT)[i % 2] for i in range(len(roles))]
  if roles != expected or len(roles) % 2 or (complete and not roles):
    return ROLES_ORDER
  if any(not t["value"].strip() for t in conversations):
    return EMPTY_VALUE
  return ""


def _check(conversations, complete: bool = True) -> None:
  found = problem(conversations, complete)
  if found:
    raise ValueError(f"not a conversation ({found}): {conversations!r}")


def parts(conversations: Sequence[dict]) -> list[tuple[str, bool]]:
  """(text, carries_loss) in order; each answer part is followed by `</s>`
  (a token, not part of the text). A ValueError for a malformed conversation."""
  _check(conversations)
  out = []
  for i, turn in enumerate(conversations):
    if role(turn) == HUMAN:
      out.append(((" " if i else "") + HUMAN_MARKER + turn["value"], False))
    else:
      out += [(ASSISTANT_MARKER, False), (" " + turn["value"], True)]
  return out


def generation_prompt(history: Sequence[dict], question: str) -> str:
  """The text a model is prompted with to answer `question` after the turns
  of `history` (complete human/assistant pairs, possibly none): ends with
  " Assistant:", each earlier answer followed by `</s>`. Encoded with `<s>`
  first, its tokens are those the training sequence has up to there."""
  _check(list(history), complete=False)
  turns = [*history, {"from": HUMAN, "value": question}, {"from": ASSISTANT, "value": "-"}]
  _check(turns)
  rendered = parts(turns)[:-1]  # without the placeholder answer
  return "".join(text + (EOS if loss else "") for text, loss in rendered)
