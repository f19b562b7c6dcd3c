"""Readers for the files users download, as tf.data datasets in the preprocessors' schemas.

Image-text records (caption pairs, GrIT): key, image (encoded bytes), caption,
noun_chunks and ref_exps float32 [n, 7], from
  *.tar      webdataset shards written by img2dataset: `{key}.jpg|png|webp` +
             `{key}.json` (GrIT columns kept with `--save_additional_columns`)
             and/or `{key}.txt` (the caption);
  *.parquet  img2dataset's parquet output (image bytes in `jpg`, or an `image`
             column of bytes or {"bytes": ...}) with the same metadata columns;
  *.jsonl    one JSON object per line with `image`: a path relative to the file.
Documents: *.jsonl with `texts` and `images` lists of equal length (null where
the item is of the other kind; images as relative paths), OBELICS style.
Text: *.jsonl with `text`, or *.txt (one document per line).
Instructions: *.jsonl in the formats of instructions.py, as key ("file:line"),
prompt (the template applied), response and problem (a quality reason or "":
the JSON structure and field types can only be checked where the line is
parsed, so instructions.py names the problem and the preprocessor counts it).
Conversations: *.jsonl in the format of conversations.py, as key ("file:line"),
problem, the segments (texts, kinds, weights, refs), images (encoded bytes),
modality_embeds [m, D] and modality_types [m] (vectors read here: a width can
only be checked against the model's), boxes [b, 4] and box_pixels.

These readers run in Python because archive and JSON parsing have no
TensorFlow ops; they only move bytes and numbers. Instructions and
conversations are parsed line by line under `tf.py_function` over a
`TextLineDataset`, so a training job's checkpoint can save the iterator's
position in them; the other kinds are `from_generator` readers, whose
position tf.data cannot save. Everything
that inspects content (decoding, checks, repairs) is in the tf-op
preprocessors, so a malformed row is normalized here (a span row that is not 7
numbers becomes NaNs, a missing image empty bytes) and counted there.
"""

import functools
import json
import os
import tarfile

import numpy as np
import seqio
import tensorflow as tf

from kosmos_jax.data import conversations, instructions

_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
IMAGE_TEXT_SIGNATURE = dict(
  key=tf.TensorSpec([], tf.string),
  image=tf.TensorSpec([], tf.string),
  caption=tf.TensorSpec([], tf.string),
  noun_chunks=tf.TensorSpec([None, 7], tf.float32),
  ref_exps=tf.TensorSpec([None, 7], tf.float32),
)
DOCUMENT_SIGNATURE = dict(
  key=tf.TensorSpec([], tf.string),
  texts=tf.TensorSpec([None], tf.string),
  images=tf.TensorSpec([None], tf.string),
)
TEXT_SIGNATURE = dict(key=tf.TensorSpec([], tf.string), text=tf.TensorSpec([], tf.string))
INSTRUCTION_SIGNATURE = {
  k: tf.TensorSpec([], tf.string) for k in ("key", "prompt", "response", "problem")
}

CONVERSATION_SIGNATURE = dict(
  key=tf.TensorSpec([], tf.string),
  problem=tf.TensorSpec([], tf.string),
  texts=tf.TensorSpec([None], tf.string),
  kinds=tf.TensorSpec([None], tf.int32),
  weights=tf.TensorSpec([None], tf.int32),
  refs=tf.TensorSpec([None], tf.int32),
  images=tf.TensorSpec([None], tf.string),
  modality_embeds=tf.TensorSpec([None, None], tf.float32),
  modality_types=tf.TensorSpec([None], tf.int32),
  boxes=tf.TensorSpec([None, 4], tf.float32),
  box_pixels=tf.TensorSpec([], tf.bool),
)


def span_rows(value) -> np.ndarray:
  """GrIT span rows as float32 [n, 7]; a row that is not 7 numbers becomes NaNs."""
  rows = []
  for row in value if isinstance(value, (list, tuple, np.ndarray)) else []:
    try:
      row = [float(v) for v in row]
    except (TypeError, ValueError):
      row = []
    rows.append(row if len(row) == 7 else [np.nan] * 7)
  return np.asarray(rows, np.float32).reshape(-1, 7)


def _text(value) -> bytes:
  if isinstance(value, bytes):
    return value
  # surrogateescape keeps undecodable input bytes, for the preprocessors to count.
  return str(value).encode("utf-8", "surrogateescape") if value is not None else b""


def image_text_record(key, image: bytes, meta: dict, caption=None) -> dict:
  return dict(
    key=_text(key),
    image=image or b"",
    caption=_text(meta.get("caption", caption)),
    noun_chunks=span_rows(meta.get("noun_chunks")),
    ref_exps=span_rows(meta.get("ref_exps")),
  )


def _read_or_none(path: str) -> bytes | None:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except (tf.errors.OpError, OSError):
    return None


def _read_file(path: str) -> bytes:
  return _read_or_none(path) or b""  # counted as image_missing


def _json(raw: bytes) -> dict:
  try:
    value = json.loads(raw.decode("utf-8", "surrogateescape"))
  except ValueError:
    return {}
  return value if isinstance(value, dict) else {}


def read_webdataset(path: str):
  """Image-text records of one img2dataset tar shard (members grouped by key)."""

  def flush(key, members):
    image = next((members[e] for e in _IMAGE_EXTENSIONS if e in members), b"")
    caption = members.get("txt", b"")
    return image_text_record(key, image, _json(members.get("json", b"{}")), caption)

  key, members = None, {}
  with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
    for member in tar:
      if not member.isfile():
        continue
      name = os.path.basename(member.name)
      stem, _, ext = name.partition(".")
      if key is not None and stem != key:
        yield flush(key, members)
        members = {}
      key = stem
      members[ext.lower()] = tar.extractfile(member).read()
  if key is not None:
    yield flush(key, members)


def read_parquet(path: str):
  """Image-text records of an img2dataset parquet file."""
  # pyarrow (a tensorflow-datasets dependency) opens local and gs:// / s3:// paths.
  import pyarrow.parquet as pq
  from pyarrow import fs

  filesystem, location = fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
  with filesystem.open_input_file(location) as f:
    for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
      for row in batch.to_pylist():
        image = row.get("jpg", row.get("image"))
        image = image.get("bytes") if isinstance(image, dict) else image
        yield image_text_record(row.get("key", ""), image, row)


def _jsonl(path: str):
  with tf.io.gfile.GFile(path, "rb") as f:
    for number, line in enumerate(f):
      if line.strip():
        yield number, _json(line)


def read_image_text_jsonl(path: str):
  base = os.path.dirname(path)
  for number, row in _jsonl(path):
    image = _read_file(os.path.join(base, row["image"])) if row.get("image") else b""
    yield image_text_record(row.get("key", f"{os.path.basename(path)}:{number}"), image, row)


def read_documents(path: str):
  base = os.path.dirname(path)
  for number, row in _jsonl(path):
    texts, images = row.get("texts") or [], row.get("images") or []
    items = max(len(texts), len(images))
    texts, images = texts + [None] * (items - len(texts)), images + [None] * (items - len(images))
    yield dict(
      key=_text(row.get("key", f"{os.path.basename(path)}:{number}")),
      texts=np.array([_text(t) for t in texts], object),
      images=np.array([_read_file(os.path.join(base, i)) if i else b"" for i in images], object),
    )


def read_text(path: str):
  if path.endswith(".txt"):
    with tf.io.gfile.GFile(path, "rb") as f:
      for number, line in enumerate(f):
        yield dict(key=_text(f"{os.path.basename(path)}:{number}"), text=line.rstrip(b"\n"))
    return
  for number, row in _jsonl(path):
    yield dict(
      key=_text(row.get("key", f"{os.path.basename(path)}:{number}")),
      text=_text(row.get("text", "")),
    )


# JSON-lines kinds read line by line in tf.data (TextLineDataset + a Python
# parse per line), not by a generator: tf.data cannot save a generator's
# position, and a fine-tune's checkpoints must hold its data iterator.
_surrogates = lambda s: s.encode("utf-8", "surrogatepass")


def instruction_records(path: str, number: int, line: bytes) -> list[dict]:
  """The instruction records of line `number` (1-based) of `path`; a bad line
  is kept as a record with its problem, keyed "file:line" (strict mode names
  it). Lone surrogates (from JSON or invalid input bytes) become invalid
  UTF-8, which the preprocessor repairs and counts."""
  return [
    dict(
      key=_surrogates(r.key),
      prompt=_surrogates(r.prompt),
      response=_surrogates(r.response),
      problem=r.problem,
    )
    for r in instructions.parse_line(line, f"{path}:{number}")
  ]


def conversation_records(
  path: str, number: int, line: bytes, modalities: dict[str, int] | None = None, image_dir: str = ""
) -> list[dict]:
  """The conversation record of line `number` of `path` (`modalities`: the
  model's, name -> width), kept with its problem if bad."""
  r = conversations.parse_line(
    line, f"{path}:{number}", os.path.dirname(path), modalities, image_dir, _read_or_none
  )
  record = dict(
    key=_surrogates(r.key),
    problem=r.problem,
    texts=np.array([_surrogates(t) for t in r.texts], object).reshape(-1),
    kinds=np.array(r.kinds, np.int32).reshape(-1),
    weights=np.array(r.weights, np.int32).reshape(-1),
    refs=np.array(r.refs, np.int32).reshape(-1),
    images=np.array([_read_file(i) for i in r.images], object).reshape(-1),
    modality_embeds=r.modality_embeds,
    modality_types=r.modality_types,
    boxes=r.boxes,
    box_pixels=r.box_pixels,
  )
  return [record]


def _line_records(path: tf.Tensor, parse, signature: dict, per_line: str) -> tf.data.Dataset:
  """The records `parse(path, number, line)` makes of each non-blank line of
  the file at `path`. `per_line`: "one" record per line, or "many" (fields
  all scalars, stacked, then unbatched)."""
  keys = list(signature)

  def py(file, number, line):
    records = parse(file.numpy().decode(), int(number), line.numpy())
    if per_line == "one":
      return [records[0][k] for k in keys]
    return [
      np.array([r[k] for r in records], object if signature[k].dtype == tf.string else None)
      for k in keys
    ]

  def example(number, line):
    values = tf.py_function(py, [path, number, line], [signature[k].dtype for k in keys])
    lead = [] if per_line == "one" else [None]
    return {
      k: tf.ensure_shape(v, lead + signature[k].shape.as_list()) for k, v in zip(keys, values)
    }

  lines = tf.data.Dataset.zip(tf.data.Dataset.counter(1), tf.data.TextLineDataset(path))
  ds = lines.filter(lambda _, line: tf.strings.length(tf.strings.strip(line)) > 0).map(example)
  return ds if per_line == "one" else ds.unbatch()


def _image_text_reader(path: str):
  if path.endswith(".tar"):
    return read_webdataset(path)
  if path.endswith(".parquet"):
    return read_parquet(path)
  return read_image_text_jsonl(path)


_KINDS = {
  "image_text": (_image_text_reader, IMAGE_TEXT_SIGNATURE),
  "documents": (read_documents, DOCUMENT_SIGNATURE),
  "text": (read_text, TEXT_SIGNATURE),
}
# kind -> (line parser, signature, records per line)
_LINE_KINDS = {
  "instructions": (instruction_records, INSTRUCTION_SIGNATURE, "many"),
  "conversations": (conversation_records, CONVERSATION_SIGNATURE, "one"),
}


def file_dataset(
  patterns: dict[str, str],
  kind: str,
  split: str,
  shuffle_files: bool = False,
  seed: int | None = None,
  cycle_length: int = 4,
  reader_args: dict | None = None,
) -> tf.data.Dataset:
  """Records of `kind` ("image_text", "documents", "text", "instructions",
  "conversations") from the files that `patterns[split]` (a glob, or several
  joined by ",") matches, read `cycle_length` files at a time,
  deterministically; `reader_args`: keyword arguments of the kind's reader."""
  files = sorted(
    f for p in patterns[split].split(",") for f in tf.io.gfile.glob(os.path.expanduser(p))
  )
  if not files:
    raise FileNotFoundError(
      f"no files match {patterns[split]!r} (split {split!r}); see data/README.md"
    )
  ds = tf.data.Dataset.from_tensor_slices(files)
  if shuffle_files:
    ds = ds.shuffle(len(files), seed=seed)
  if kind in _LINE_KINDS:
    parse, signature, per_line = _LINE_KINDS[kind]
    parse = functools.partial(parse, **(reader_args or {}))
    read = lambda f: _line_records(f, parse, signature, per_line)
  else:
    reader, signature = _KINDS[kind]
    reader = functools.partial(reader, **(reader_args or {}))
    read = lambda f: tf.data.Dataset.from_generator(
      lambda path: reader(path.decode()), args=(f,), output_signature=signature
    )
  return ds.interleave(
    read, cycle_length=cycle_length, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )


def function_source(patterns: dict[str, str], kind: str, reader_args: dict | None = None):
  """A seqio.FunctionDataSource over `file_dataset`."""

  def dataset_fn(split, shuffle_files, seed=None):
    return file_dataset(patterns, kind, split, shuffle_files, seed, reader_args=reader_args)

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(patterns))
