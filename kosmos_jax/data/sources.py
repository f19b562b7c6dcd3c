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

These readers run in Python (`from_generator`) because archive and JSON
parsing have no TensorFlow ops; they only move bytes and numbers. Everything
that inspects content (decoding, checks, repairs) is in the tf-op
preprocessors, so a malformed row is normalized here (a span row that is not 7
numbers becomes NaNs, a missing image empty bytes) and counted there.
"""

import json
import os
import tarfile

import numpy as np
import seqio
import tensorflow as tf

from kosmos_jax.data import instructions

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


def _read_file(path: str) -> bytes:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except (tf.errors.OpError, OSError):
    return b""  # counted as image_missing


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


def read_instructions(path: str):
  """Instruction records; a bad line is kept as a record with its problem,
  keyed by the file and its 1-based line number (strict mode names it)."""
  # surrogatepass: a lone surrogate (from JSON or from invalid input bytes)
  # becomes invalid UTF-8, which the preprocessor repairs and counts.
  text = lambda s: s.encode("utf-8", "surrogatepass")
  with tf.io.gfile.GFile(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        for r in instructions.parse_line(line, f"{path}:{number}"):
          yield dict(
            key=text(r.key), prompt=text(r.prompt), response=text(r.response), problem=r.problem
          )


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
  "instructions": (read_instructions, INSTRUCTION_SIGNATURE),
}


def file_dataset(
  patterns: dict[str, str],
  kind: str,
  split: str,
  shuffle_files: bool = False,
  seed: int | None = None,
  cycle_length: int = 4,
) -> tf.data.Dataset:
  """Records of `kind` ("image_text", "documents", "text", "instructions")
  from the files that `patterns[split]` (a glob, or several joined by ",")
  matches, read `cycle_length` files at a time, deterministically."""
  reader, signature = _KINDS[kind]
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
  read = lambda f: tf.data.Dataset.from_generator(
    lambda path: reader(path.decode()), args=(f,), output_signature=signature
  )
  return ds.interleave(
    read, cycle_length=cycle_length, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )


def function_source(patterns: dict[str, str], kind: str):
  """A seqio.FunctionDataSource over `file_dataset`."""

  def dataset_fn(split, shuffle_files, seed=None):
    return file_dataset(patterns, kind, split, shuffle_files, seed)

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(patterns))
