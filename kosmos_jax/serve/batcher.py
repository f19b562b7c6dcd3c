"""The worker that owns the model: requests that arrive together share one `generate` call.

Request threads tokenize and preprocess their picture (`Engine.prepare`),
then queue a `Job` and wait. One worker thread takes the first job, collects
more for a short window (or until `max_batch`), groups them by generation
options (they are per-call scalars) and prompt-length bucket, left pads each
group and runs it as one batch. The batch is padded to a size bucket (powers
of two up to `max_batch`) by repeating a row, so the compiled shapes are few
and `warmup` compiles the common ones before the first request. A left-padded
row generates exactly what it generates alone (models/generation.py), so
greedy and beam answers do not depend on their neighbours.
"""

import dataclasses
import queue
import threading
import time
import traceback

import numpy as np

from kosmos_jax.search import options as options_lib
from kosmos_jax.serve import requests

DEFAULT_MAX_NEW_TOKENS = 128  # the official demo's budget


@dataclasses.dataclass(eq=False)
class Job:
  key: tuple  # generation options and prompt bucket: equal keys share a call
  ids: np.ndarray  # (L,) prompt ids
  slots: np.ndarray  # (L,) 1 at image slots
  pixels: np.ndarray  # (3, H, W)
  options: dict
  prompt: str
  preprocess_s: float = 0.0
  queued_at: float = 0.0
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: dict | None = None
  error: requests.BadRequest | None = None
  abandoned: bool = False  # its client got a 503; skip it


def size_buckets(max_batch: int) -> list[int]:
  """Batch sizes a call is padded to: 1, 2, 4, ... below max_batch, and max_batch."""
  sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
  return sizes + [max_batch]


def default_options(generation_config, max_new_tokens: int | None) -> dict:
  """Every option of `requests.OPTIONS`: the checkpoint's generation config,
  else transformers' defaults (as `model.generate` resolves them)."""
  config = dict(generation_config or {})
  out = {k: config.get(k, options_lib.DEFAULTS.get(k)) for k in requests.OPTIONS}
  out["max_new_tokens"] = max_new_tokens or config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
  out["seed"] = 0
  return out


class Engine:
  """Owns `model` and `processor`; `submit` answers one prepared job."""

  def __init__(
    self,
    model,
    processor,
    *,
    max_batch: int = 16,
    window_s: float = 0.01,
    timeout_s: float = 60.0,
    max_queue: int = 256,
    max_new_tokens: int | None = None,
    limits: requests.Limits | None = None,
  ):
    self.model, self.processor = model, processor
    self.max_batch, self.window_s, self.timeout_s = max_batch, window_s, timeout_s
    self.limits = limits = limits or requests.Limits()
    self.sizes = size_buckets(max_batch)
    self.defaults = default_options(model.generation_config, max_new_tokens)
    self.defaults["max_new_tokens"] = min(self.defaults["max_new_tokens"], limits.max_new_tokens)
    self.max_positions = model.config.text.max_positions
    self._queue: queue.Queue[Job] = queue.Queue(max_queue)
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None
    self._shapes: set[tuple] = set()
    self._warm = False
    self.counts = dict(
      requests=0,
      answered=0,
      bad_requests=0,
      timed_out=0,
      busy=0,
      generate_calls=0,
      rows=0,
      padded_rows=0,
      warmup_calls=0,
      shapes_warmed=0,
      compiles_after_warmup=0,
    )
    self.batch_sizes: dict[int, int] = {}

  # --- request threads -------------------------------------------------------

  def count(self, name: str, n: int = 1) -> None:
    with self._lock:
      self.counts[name] += n

  def prepare(self, parsed: requests.Parsed) -> Job:
    """Tokenizes and preprocesses a request; a prompt the model cannot take is a 400."""
    start = time.perf_counter()
    if len(parsed.prompt) > 32 * self.max_positions:  # longer than any token run: skip tokenizing
      raise requests.BadRequest(
        f"prompt: {len(parsed.prompt)} characters; the model takes {self.max_positions} positions"
      )
    try:
      inputs = self.processor(text=[parsed.prompt], images=[parsed.image], bboxes=parsed.bboxes)
    except ValueError as e:
      raise requests.BadRequest(f"prompt: {e}") from None
    ids = inputs["input_ids"][0]
    new = parsed.options["max_new_tokens"]
    if len(ids) + new > self.max_positions:
      raise requests.BadRequest(
        f"prompt: {len(ids)} tokens ({self.processor.num_image_tokens} of them image slots) "
        f"+ max_new_tokens {new} is more than the model's {self.max_positions} positions"
      )
    options = parsed.options
    key = (tuple(sorted(options.items())), options_lib.bucket_length(len(ids)))
    return Job(
      key,
      ids,
      inputs["image_embeds_position_mask"][0],
      inputs["pixel_values"][0],
      options,
      parsed.prompt,
      preprocess_s=time.perf_counter() - start,
    )

  def submit(self, job: Job) -> dict:
    """Queues `job` and waits for its answer: a dict, or BadRequest (503 when
    the queue is full or the answer takes longer than the timeout)."""
    self.count("requests")
    job.queued_at = time.perf_counter()
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      self.count("busy")
      raise requests.BadRequest(
        f"busy: {self._queue.maxsize} requests are waiting (kosmos-jax serve --max-queue)", 503
      ) from None
    if not job.done.wait(self.timeout_s):
      with self._lock:
        job.abandoned = True
        self.counts["timed_out"] += 1
      raise requests.BadRequest(
        f"timed out: no answer within {self.timeout_s:g} s (kosmos-jax serve --timeout)", 503
      )
    if job.error is not None:
      raise job.error
    self.count("answered")
    return job.result

  # --- the worker -------------------------------------------------------------

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, name="kosmos-batcher", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _collect(self) -> list[Job]:
    """The first waiting job and those that arrive within the window after it."""
    try:
      jobs = [self._queue.get(timeout=0.1)]
    except queue.Empty:
      return []
    end = time.perf_counter() + self.window_s
    while len(jobs) < self.max_batch:
      try:  # under load the queue is full already: no waiting at all
        jobs.append(self._queue.get(timeout=max(end - time.perf_counter(), 0)))
      except queue.Empty:
        break
    return jobs

  def _loop(self) -> None:
    while not self._stop.is_set():
      groups: dict[tuple, list[Job]] = {}
      for job in self._collect():
        with self._lock:
          if job.abandoned:
            continue
        groups.setdefault(job.key, []).append(job)
      for jobs in groups.values():
        try:
          self.run(jobs)
        except Exception as e:  # pylint: disable=broad-except  # a bug: answer 500, keep serving
          traceback.print_exc()
          for job in jobs:
            if not job.done.is_set():
              job.error = requests.BadRequest(f"internal error: {type(e).__name__}: {e}", 500)
              job.done.set()

  def run(self, jobs: list[Job], warmup: bool = False) -> None:
    """One `generate` call for `jobs` (same key); sets each job's answer."""
    started = time.perf_counter()
    size = next(s for s in self.sizes if s >= len(jobs))
    rows = jobs + [jobs[-1]] * (size - len(jobs))
    length = max(len(j.ids) for j in rows)
    pad = lambda a, value=0: np.pad(a, (length - len(a), 0), constant_values=value)
    inputs = dict(
      input_ids=np.stack([pad(j.ids, self.processor.vocab.pad_id) for j in rows]),
      attention_mask=np.stack([pad(np.ones_like(j.ids)) for j in rows]),
      image_embeds_position_mask=np.stack([pad(j.slots) for j in rows]),
      pixel_values=np.stack([j.pixels for j in rows]),
    )
    options = jobs[0].options
    shape = (
      options_lib.bucket_length(options["max_new_tokens"]),
      options["num_beams"],
      options["do_sample"],
      options["no_repeat_ngram_size"],
      options_lib.bucket_length(length),
      size,
    )
    try:
      ids = self.model.generate(**inputs, **options)
    except ValueError as e:  # options the model refuses: every row has them
      error = requests.BadRequest(f"generate: {e}")
    except Exception as e:  # pylint: disable=broad-except  # a bug: answer 500, keep serving
      traceback.print_exc()
      error = requests.BadRequest(f"internal error: {type(e).__name__}: {e}", 500)
    else:
      error = None
    elapsed = time.perf_counter() - started
    with self._lock:
      if warmup:
        self.counts["warmup_calls"] += 1
      else:
        self.counts["generate_calls"] += 1
        self.counts["rows"] += len(jobs)
        self.counts["padded_rows"] += size - len(jobs)
        self.batch_sizes[len(jobs)] = self.batch_sizes.get(len(jobs), 0) + 1
        if shape not in self._shapes and self._warm:
          self.counts["compiles_after_warmup"] += 1
      self._shapes.add(shape)
    for i, job in enumerate(jobs):
      if error is None:
        job.result = self._answer(job, ids[i], length)
        job.result["timings"] = dict(
          preprocess_ms=round(job.preprocess_s * 1e3, 1),
          queue_ms=round((started - job.queued_at) * 1e3, 1),
          generate_ms=round(elapsed * 1e3, 1),
          batch_size=len(jobs),
        )
      job.error = error
      job.done.set()

  def _answer(self, job: Job, row: np.ndarray, prompt_length: int) -> dict:
    """Text and entities of the prompt + its continuation (as transformers'
    demo: a REG answer keeps its boxed "It"), and the new token ids."""
    answer = self.processor.answer(job.ids, row[prompt_length:])
    new = answer.pop("new_ids")
    return dict(answer, token_ids=new, prompt=job.prompt)

  def warmup(self, jobs: list[Job]) -> None:
    """Compiles every batch size for each of `jobs` (distinct prompt buckets)."""
    for job in {j.key: j for j in jobs}.values():
      for size in self.sizes:
        self.run([dataclasses.replace(job, done=threading.Event()) for _ in range(size)], True)
    with self._lock:
      self._warm = True
      self.counts["shapes_warmed"] = len(self._shapes)

  def metrics(self) -> dict:
    with self._lock:
      return dict(
        **self.counts,
        batch_sizes={str(k): v for k, v in sorted(self.batch_sizes.items())},
        queue_depth=self._queue.qsize(),
        max_batch=self.max_batch,
        window_ms=self.window_s * 1e3,
        timeout_s=self.timeout_s,
      )
