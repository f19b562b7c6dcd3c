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
TensorFlow ops; they only move bytes and numbers. A training job's
checkpoint saves its data iterator, and tf.data cannot save a position
inside a Python generator, so `file_dataset` reads through positions tf.data
owns: JSON lines and .txt by line (`TextLineDataset`, each line parsed under
`tf.py_function`), a tar shard through an index of its members' offsets
(headers only), a parquet file by row number (a row group in memory at a
time). Only a glob mixing those kinds falls back to the generator readers,
whose position cannot be saved. Everything
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

from kosmos_jax.data import conversations, instructions, task_prompts

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
  return _documents(path, _jsonl(path))


def _documents(path: str, rows):
  base = os.path.dirname(path)
  for number, row in rows:
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
  path: str,
  number: int,
  line: bytes,
  modalities: dict[str, int] | None = None,
  image_dir: str = "",
  template: str = "",
) -> list[dict]:
  """The conversation record of line `number` of `path` (`modalities`: the
  model's, name -> width), kept with its problem if bad; `template`: a task
  prompt (task_prompts.py) each human value is put through first, so `<box>`
  and `<image>` in it count as the line's own."""
  if template:
    line = task_prompts.apply_to_line(line, template)
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


def image_text_records(path: str, number: int, line: bytes) -> list[dict]:
  row = _json(line)
  image = _read_file(os.path.join(os.path.dirname(path), row["image"])) if row.get("image") else b""
  return [image_text_record(row.get("key", f"{os.path.basename(path)}:{number - 1}"), image, row)]


def document_records(path: str, number: int, line: bytes) -> list[dict]:
  return list(_documents(path, [(number - 1, _json(line))]))


def text_records(path: str, number: int, line: bytes) -> list[dict]:
  key = f"{os.path.basename(path)}:{number - 1}"
  if path.endswith(".txt"):
    return [dict(key=_text(key), text=line)]
  row = _json(line)
  return [dict(key=_text(row.get("key", key)), text=_text(row.get("text", "")))]


def _line_records(path: tf.Tensor, parse, signature: dict, per_line: str) -> tf.data.Dataset:
  """The records `parse(path, number, line)` makes of each non-blank line of
  the file at `path`. `per_line`: "one" record per line, or "many" (fields
  all scalars, stacked, then unbatched)."""
  keys = list(signature)

  def py(file, number, line):
    records = parse(file.numpy().decode(), int(number), line.numpy())
    if per_line != "many":
      return [records[0][k] for k in keys]
    return [
      np.array([r[k] for r in records], object if signature[k].dtype == tf.string else None)
      for k in keys
    ]

  def example(number, line):
    values = tf.py_function(py, [path, number, line], [signature[k].dtype for k in keys])
    lead = [None] if per_line == "many" else []
    return {
      k: tf.ensure_shape(v, lead + signature[k].shape.as_list()) for k, v in zip(keys, values)
    }

  lines = tf.data.Dataset.zip(tf.data.Dataset.counter(1), tf.data.TextLineDataset(path))
  ds = lines.filter(lambda _, line: tf.strings.length(tf.strings.strip(line)) > 0).map(example)
  return ds.unbatch() if per_line == "many" else ds


def tar_index(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(keys [n], members [n]) of an img2dataset tar shard, a sample per key in
  file order; members: JSON {extension: [offset, size]} of its files' data.
  Only the headers are read (the archive is seeked over), so building the
  index costs a small part of reading the shard."""
  keys, members = [], []
  with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
    for member in tar:
      if not member.isfile():
        continue
      stem, _, ext = os.path.basename(member.name).partition(".")
      if not keys or keys[-1] != stem:
        keys.append(stem)
        members.append({})
      members[-1][ext.lower()] = [member.offset_data, member.size]
  return np.array(keys, object), np.array([json.dumps(m) for m in members], object)


_OPEN_SHARDS: dict = {}  # path -> open GFile: seeks on one handle are range reads


def tar_sample(path: str, key: bytes, members: bytes) -> dict:
  """One sample of a shard from its `tar_index` entry."""
  if path not in _OPEN_SHARDS:
    if len(_OPEN_SHARDS) >= 16:
      _OPEN_SHARDS.pop(next(iter(_OPEN_SHARDS))).close()
    _OPEN_SHARDS[path] = tf.io.gfile.GFile(path, "rb")
  f, data = _OPEN_SHARDS[path], {}
  for ext, (offset, size) in json.loads(members).items():
    f.seek(offset)
    data[ext] = f.read(size)
  image = next((data[e] for e in _IMAGE_EXTENSIONS if e in data), b"")
  return image_text_record(key, image, _json(data.get("json", b"{}")), data.get("txt", b""))


def _tar_records(path: tf.Tensor) -> tf.data.Dataset:
  """A shard's samples through its index: tf.data saves the position in the
  index, which it cannot do inside a generator."""

  def index(p):  # in a map, not around the dataset: tf.data saves map state only
    keys, members = tf.py_function(
      lambda p: tar_index(p.numpy().decode()), [p], [tf.string, tf.string]
    )
    return tf.ensure_shape(keys, [None]), tf.ensure_shape(members, [None])

  names = list(IMAGE_TEXT_SIGNATURE)

  def sample(key, member):
    py = lambda p, k, m: [tar_sample(p.numpy().decode(), k.numpy(), m.numpy())[n] for n in names]
    values = tf.py_function(py, [path, key, member], [IMAGE_TEXT_SIGNATURE[n].dtype for n in names])
    return {n: tf.ensure_shape(v, IMAGE_TEXT_SIGNATURE[n].shape) for n, v in zip(names, values)}

  samples = tf.data.Dataset.from_tensors(path).map(index)
  return samples.flat_map(lambda k, m: tf.data.Dataset.from_tensor_slices((k, m))).map(sample)


def _parquet_file(path: str):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from pyarrow import fs  # pylint: disable=g-import-not-at-top

  filesystem, location = fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
  return pq.ParquetFile(filesystem.open_input_file(location))


_GROUP_ENDS: dict = {}  # path -> cumulative row counts of its row groups
_ROW_GROUP: dict = {}  # the last row group read: key (path, group), rows


def parquet_sample(path: str, row: int) -> dict:
  """Row `row` of an img2dataset parquet file (one row group in memory)."""
  if path not in _GROUP_ENDS:
    meta = _parquet_file(path).metadata
    _GROUP_ENDS[path] = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
  ends = _GROUP_ENDS[path]
  group = int(np.searchsorted(ends, row, side="right"))
  if _ROW_GROUP.get("key") != (path, group):
    _ROW_GROUP.update(key=(path, group), rows=_parquet_file(path).read_row_group(group).to_pylist())
  r = _ROW_GROUP["rows"][row - (int(ends[group - 1]) if group else 0)]
  image = r.get("jpg", r.get("image"))
  image = image.get("bytes") if isinstance(image, dict) else image
  return image_text_record(r.get("key", ""), image, r)


def _parquet_records(path: tf.Tensor) -> tf.data.Dataset:
  """A parquet file's rows by number: tf.data saves that position."""
  names = list(IMAGE_TEXT_SIGNATURE)

  def rows(p):
    count = tf.py_function(
      lambda p: _parquet_file(p.numpy().decode()).metadata.num_rows, [p], tf.int64
    )
    return tf.range(tf.ensure_shape(count, []))

  def sample(row):
    py = lambda p, r: [parquet_sample(p.numpy().decode(), int(r))[n] for n in names]
    values = tf.py_function(py, [path, row], [IMAGE_TEXT_SIGNATURE[n].dtype for n in names])
    return {n: tf.ensure_shape(v, IMAGE_TEXT_SIGNATURE[n].shape) for n, v in zip(names, values)}

  numbers = tf.data.Dataset.from_tensors(path).map(rows)
  return numbers.flat_map(tf.data.Dataset.from_tensor_slices).map(sample)


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
# kind -> (line parser, signature, records per line, file endings read line by line)
_LINE_KINDS = {
  "instructions": (instruction_records, INSTRUCTION_SIGNATURE, "many", (".jsonl",)),
  "conversations": (conversation_records, CONVERSATION_SIGNATURE, "one", (".jsonl",)),
  "image_text": (image_text_records, IMAGE_TEXT_SIGNATURE, "one", (".jsonl", ".json")),
  "documents": (document_records, DOCUMENT_SIGNATURE, "one", (".jsonl", ".json")),
  "text": (text_records, TEXT_SIGNATURE, "one", (".jsonl", ".json", ".txt")),
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
  # Line by line (or a tar shard through its index) when every file allows
  # it: tf.data can save that position, not a Python generator's.
  by_lines = kind in _LINE_KINDS and all(f.endswith(_LINE_KINDS[kind][3]) for f in files)
  if kind == "image_text" and all(f.endswith(".tar") for f in files):
    read = _tar_records
  elif kind == "image_text" and all(f.endswith(".parquet") for f in files):
    read = _parquet_records
  elif by_lines:
    parse, signature, per_line, _ = _LINE_KINDS[kind]
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
