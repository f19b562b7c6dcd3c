"""Grounded examples per second: our seqio pipeline vs transformers' Kosmos2Processor.

The same records (the first N of the synthetic `shapes` GrIT task at 224 px:
JPEG bytes, caption, referring-expression spans with boxes). Ours: tf.data
through the seqio task (read the TFDS files, check the bytes, decode, resize,
normalise, render `<phrase>`/`<object>` spans, tokenise, drop-and-count bad
input) and the packing feature converter. Theirs: PIL decode and
`Kosmos2Processor(text, images, bboxes)` per record, with the same
sentencepiece model. Prints one JSON line: end to end (our start-up included)
and ours in steady state (after the first packed row; theirs has no start-up
inside its timing).

Fair in both directions: both sides decode every JPEG and normalise its
pixels, and both tokenise the same caption with the same spans (the task's
`ref_exps` at score >= 0.65). Theirs renders every caption grounded; the task
grounds half of them (use_box_prob=0.5), but ours renders and tokenises the
grounded text of every record and then picks, so it does the grounded work
for all. Ours also does work theirs does not: reading the records from the
TFDS files (theirs get them from a Python list), byte checks and packing.
Run: `.venv/bin/python -m benchmarks.data_vs_hf`.
"""

import argparse
import io
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import seqio  # pylint: disable=g-import-not-at-top
from PIL import Image

from kosmos_jax.data import feature_converter, loader, shapes
from tests.helpers.spm import hf_processor


def _tagged(record) -> tuple[str, list]:
  """The caption with `<phrase>` around each confident span (the task's
  `ref_exps`), and their boxes."""
  caption = record["caption"].decode()
  chunks = sorted((c for c in record["ref_exps"] if c[6] >= 0.65), key=lambda c: c[0])
  text, boxes, at = "<grounding>", [], 0
  for start, end, x1, y1, x2, y2, _ in chunks:
    start, end = int(start), int(end)
    if start < at:
      continue
    text += caption[at:start] + "<phrase>" + caption[start:end] + "</phrase>"
    boxes.append((float(x1), float(y1), float(x2), float(y2)))
    at = end
  return text + caption[at:], boxes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--records", type=int, default=2000)
  args = parser.parse_args()
  records = list(loader.source_records("shapes_grit", "train", args.records))
  n = len(records)

  start = time.perf_counter()
  ds = (
    seqio.get_mixture_or_task("shapes_grit")
    .get_dataset({"targets": 512, "images": 6}, split="train", shuffle=False)
    .take(n)
  )
  packed = feature_converter.MultimodalFeatureConverter(pack=True)(
    ds, {"targets": 512, "images": 6}
  )
  rows = packed.as_numpy_iterator()
  first_row = next(rows)
  first_s = time.perf_counter() - start
  num_rows = 1 + sum(1 for _ in rows)
  ours_s = time.perf_counter() - start
  # Start-up (tracing, iterator creation) is paid once per training job: the
  # steady rate counts the examples after the first row and the time after it.
  steady = (n - first_row["segment_ids"].max()) / (ours_s - first_s)

  directory = tempfile.mkdtemp()
  try:
    shutil.copy(
      shapes.shapes_vocabulary().sentencepiece_model_file,
      os.path.join(directory, "sentencepiece.bpe.model"),
    )
    processor = hf_processor(directory)
    start = time.perf_counter()
    for record in records:
      text, boxes = _tagged(record)
      image = Image.open(io.BytesIO(record["image"])).convert("RGB")
      processor(text=text, images=image, bboxes=boxes or None)
    hf_s = time.perf_counter() - start
  finally:
    shutil.rmtree(directory)

  print(
    json.dumps(
      {
        "benchmark": "data_vs_hf",
        "records": n,
        "packed_rows": num_rows,
        "ours_examples_per_s": round(n / ours_s, 1),
        "hf_examples_per_s": round(n / hf_s, 1),
        "speedup": round(hf_s / ours_s, 2),
        "ours_s": round(ours_s, 2),
        "hf_s": round(hf_s, 2),
        "ours_startup_s": round(first_s, 2),
        "ours_steady_examples_per_s": round(steady, 1),
        "steady_speedup": round(steady * hf_s / n, 2),
        "cores": os.cpu_count(),
      }
    )
  )


if __name__ == "__main__":
  main()
