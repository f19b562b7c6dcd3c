"""The processor's side of other modalities (PandaGPT-style soft tokens).

Each `<name>` placeholder of a text becomes `<name>`, N slot ids and
`</name>`; the slots are marked 2 in `image_embeds_position_mask` and the
vectors come back as `modality_embeds` [B, M, D] and `modality_types` [B, M]
(models/batch.py; the model projects them in models/modalities.py). A
modality's type id is its index in sorted(names), as its tags' order in the
vocabulary.
"""

import numpy as np

from kosmos_jax.processing import vocab as vocab_lib

MODALITY_SLOT = 2  # the slot mask's value on modality slots


def _vectors(value) -> list:
  """One modality's vectors in a {name: vectors} input: a list, a [n, D]
  array, or a single [D] vector."""
  if isinstance(value, np.ndarray) and value.ndim == 1:
    return [value]
  return list(value)


def _pairs(entry, where: str) -> list[tuple[str, object]]:
  """One text's modality input as (name, vector) pairs, in the given order."""
  if entry is None:
    return []
  if isinstance(entry, dict):
    return [(name, v) for name, vectors in entry.items() for v in _vectors(vectors)]
  if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
    entry = [entry]  # a single (name, vector) pair
  if isinstance(entry, (list, tuple)) and all(
    isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in entry
  ):
    return list(entry)
  raise ValueError(
    f"modalities{where} must be None, a list of (name, vector) pairs or a dict "
    f"{{name: [vectors]}}, got {type(entry).__name__}"
  )


def vectors_by_name(entry, widths: dict[str, int], where: str = "") -> dict[str, list[np.ndarray]]:
  """One text's modality input, checked against `widths` (name -> width):
  name -> its float32 vectors in order."""
  out = {}
  for name, vector in _pairs(entry, where):
    if name not in widths:
      raise ValueError(
        f"modalities{where}: unknown modality {name!r}; this processor has {list(widths) or 'none'}"
      )
    vector = np.asarray(vector, np.float32)
    if vector.shape != (widths[name],):
      raise ValueError(
        f"modalities{where}: a {name} vector of shape {vector.shape}; the {name} "
        f"modality takes vectors of width {widths[name]}"
      )
    out.setdefault(name, []).append(vector)
  return out


def expand(text: str, names, tokens: int, counts: dict[str, int] | None = None) -> str:
  """`text` with each `<name>` placeholder expanded into `<name>`, `tokens`
  more `<name>` tags (the slots, until `slot_mask` gives them their ids) and
  `</name>`. `counts`: the vectors given per name, which must match the
  placeholders."""
  for name in names:
    tag = f"<{name}>"
    if counts is not None and text.count(tag) != counts.get(name, 0):
      raise ValueError(
        f"{text.count(tag)} {tag} placeholders for {counts.get(name, 0)} {name} vectors in {text!r}"
      )
    text = text.replace(tag, " ".join([tag] * (tokens + 1) + [f"</{name}>"]))
  return text


def slot_mask(ids: list[int], vocab, names, tokens: int) -> tuple[list[int], list[str]]:
  """2 at each item's slots, which get the slot ids (`ids` changes in place),
  and the items' modalities in order."""
  tags = {}
  for name in names:
    open_id, close_id = vocab.modality_tag_ids(name)
    tags[open_id] = (name, close_id)
  mask, items, i, n = [0] * len(ids), [], 0, tokens
  while i < len(ids):
    name, close_id = tags.get(ids[i], (None, None))
    if name and ids[i + 1 : i + n + 1] == [ids[i]] * n and ids[i + n + 1 : i + n + 2] == [close_id]:
      ids[i + 1 : i + n + 1] = vocab_lib.image_slot_ids(n)
      mask[i + 1 : i + n + 1] = [MODALITY_SLOT] * n
      items.append(name)
      i += n + 2
    else:
      i += 1
  return mask, items


def stack(vectors: list[dict], items: list[list[str]], widths: dict[str, int]):
  """(modality_embeds [B, M, D] float32, modality_types [B, M] int32): each
  row's vectors in slot order, zero-padded to D = the widest modality; -1
  types and zero vectors after a row's items."""
  names = sorted(widths)
  embeds = np.zeros((len(items), max(map(len, items), default=0), max(widths.values())), np.float32)
  types = np.full(embeds.shape[:2], -1, np.int32)
  for row, (given, row_items) in enumerate(zip(vectors, items)):
    taken = {name: iter(given.get(name, [])) for name in names}
    for k, name in enumerate(row_items):
      vector = next(taken[name])
      embeds[row, k, : vector.shape[0]] = vector
      types[row, k] = names.index(name)
  return embeds, types
