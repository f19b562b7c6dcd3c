"""`kosmos-jax train`: the sharded training loop with Orbax checkpoints and safe preemption.

One process per host. The job resumes from the latest checkpoint in
`workdir/checkpoints` (parameters, optimizer, RNG, step and every host's data
iterator), saves at the next step boundary on SIGTERM and exits 0, skips
non-finite updates and stops after `max_bad_steps` of them in a row.
"""

import json
import logging
import os
import signal
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
import tqdm
from clu import metric_writers
from etils import epath
from flax import nnx
from flax.core import spmd
from jax.experimental import multihost_utils

from kosmos_jax import sharding
from kosmos_jax.checkpoints import loading
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.data import loader
from kosmos_jax.eval import rec, runner
from kosmos_jax.eval import tasks as eval_tasks
from kosmos_jax.models import lora
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.processing import views
from kosmos_jax.train import mfu, optim
from kosmos_jax.train import state as state_lib
from kosmos_jax.train import step as step_lib


class NonFiniteLossError(RuntimeError):
  pass


class _Preemption:
  """Remembers a SIGTERM so that the loop can save at a step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving at the next step boundary, then exiting")
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must save the same step: the coordination service agrees on it.
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _init_params(config, abstract_params, mesh, rules):
  """Parameters created already sharded: random init, or read from `init_from`."""
  shardings = sharding.state_shardings(abstract_params, mesh, rules)
  # Adapters (config.lora) go on after the base weights, from a stream of their own.
  adapt = lambda m: lora.add(m, config.get("lora"), lora.adapter_rngs(config.seed))
  if config.init_from:
    model = adapt(loading.from_pretrained(config.init_from, **_fine_tune_overrides(config)))
    return jax.device_put(nnx.state(model, nnx.Param), shardings)
  init = jax.jit(
    lambda: nnx.state(adapt(Kosmos2(config.model, rngs=nnx.Rngs(config.seed))), nnx.Param),
    out_shardings=shardings,
  )
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    return init()


def _fine_tune_overrides(config) -> dict:
  """What a fine-tune's `config.model` changes of `init_from`'s model: the
  numerics, the soft-token modalities it adds (new tag rows and
  projections; models/modalities.py) and SPHINX's views (their tags are
  added; processing/views.py). Everything else is the checkpoint's."""
  m = config.model
  out = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
  if m.get("modalities"):
    out.update(modalities=m.modalities.to_dict(), modality_tokens=m.modality_tokens)
  if views.tagged(m.vision):
    out["vision.views"] = m.vision.views.to_dict()
  return out


def resolve_init_from(config) -> None:
  """With `init_from`: `config.model` becomes the checkpoint's model (with the
  overrides above), and the vocabulary defaults to the checkpoint's own
  sentencepiece model (a snapshot's file, or a workdir's data config)."""
  config.model = loading.pretrained_config(config.init_from, **_fine_tune_overrides(config))
  if not config.data.spm_model_file:
    config.data.spm_model_file = loading.sentencepiece_file(config.init_from)


def _check_sequence_budget(config) -> None:
  """A picture's slots with its `<s>`, `<image>`, `</image>` and one more
  token must fit a row: the packer drops pictures that do not, so a views
  model on too short rows would train on text alone."""
  slots = views.image_slots(config.model)
  if slots + 4 > config.seq_len:
    raise ValueError(
      f"seq_len {config.seq_len} cannot hold one picture: it takes {slots} slots "
      f"({views.count(config.model.vision)} views) and 3 tags; raise seq_len"
    )


def _check_pictures(config, batch: dict) -> None:
  """The mixture's pictures and slots must be the model's: the decoder would
  otherwise read mismatched embeddings without an error (a views model on
  tasks registered for single 224 px views, say)."""
  name, model = config.data.mixture, config.model
  size, slots = views.input_size(model.vision), views.image_slots(model)
  pixels = batch.get("pixel_values")
  if pixels is not None and pixels.shape[-2:] != (size, size):
    raise ValueError(
      f"mixture {name!r} gives {pixels.shape[-2]}x{pixels.shape[-1]} px pictures; "
      f"the model reads {size}x{size} (vision.image_size x its views' grid)"
    )
  counts = (batch["image_embeds_position_mask"] == 1).sum(axis=1)
  if (counts % slots).any():
    raise ValueError(
      f"mixture {name!r} gives rows with {sorted(set(counts.tolist()))} image slots; "
      f"the model fills {slots} per picture (latent_query_num, times the views with their tags)"
    )


def _write_json_line(path: epath.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def _check_vocabulary(config) -> None:
  """The mixture's ids must fit the model: an embedding lookup clamps ids past
  the model's vocabulary instead of failing. A larger model vocabulary is
  padding, except under a location init, which puts the P x P location tokens
  in the last rows."""
  vocab = loader.vocabulary(config.data.mixture)
  text, name = config.model.text, config.data.mixture
  if vocab.vocab_size > text.vocab_size:
    raise ValueError(
      f"model.text.vocab_size is {text.vocab_size} but mixture {name!r} "
      f"has {vocab.vocab_size} ids ({vocab})"
    )
  if text.get("location_init", "normal") == "normal":
    return
  if vocab.vocab_size != text.vocab_size:
    raise ValueError(
      f"model.text.location_init={text.location_init!r} needs "
      f"model.text.vocab_size = the {vocab.vocab_size} ids of mixture {name!r} "
      f"(the location tokens are the last rows), got {text.vocab_size}"
    )
  side = getattr(vocab, "num_patches_per_side", text.num_patches_per_side)
  if side != text.num_patches_per_side:
    raise ValueError(
      f"model.text.num_patches_per_side is {text.num_patches_per_side} but "
      f"mixture {name!r} has a {side} x {side} location grid"
    )


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains until `config.total_steps`; returns the last logged metrics.

  `devices` (default: all) is what the mesh is built from; a checkpoint saved
  on another mesh restores onto this one.
  """
  config = config.copy_and_resolve_references()
  if config.init_from:
    resolve_init_from(config)
  workdir = orbax_ckpt.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  primary = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_of(config)
  if config.batch_size % jax.process_count():
    raise ValueError(
      f"batch_size {config.batch_size} does not divide over {jax.process_count()} processes"
    )

  tx = optim.optimizer(config.optim, config.total_steps)
  trainable = optim.trainable_patterns(config)
  graphdef, abstract_state = state_lib.abstract(
    config.model, tx, config.seed, lora_config=config.get("lora"), trainable=trainable
  )
  state_sharding = sharding.train_state_shardings(abstract_state, mesh, rules)

  loader.register_user_tasks(config.data, config.model)
  _check_vocabulary(config)  # before the pipeline is built
  _check_sequence_budget(config)
  ds = loader.dataset(
    config.data.mixture,
    config.data.train_split,
    seq_len=config.seq_len,
    images_per_row=config.images_per_row,
    batch_size=config.batch_size // jax.process_count(),
    seed=config.seed,
    shuffle=config.data.shuffle,
    shard_index=jax.process_index(),
    num_shards=jax.process_count(),
    autotune=config.data.autotune,
    modalities_per_row=config.data.get("modalities_per_row", 0),
  )
  iterator = iter(ds)

  manager = orbax_ckpt.checkpoint_manager(
    workdir, keep=config.keep_checkpoints, every=config.checkpoint_every
  )
  start = manager.latest_step()
  if start is not None:
    # The target's shardings may differ from the saved ones: a checkpoint
    # restores onto whatever mesh this run has.
    target = jax.tree.map(
      lambda s, sub: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub
      ),
      state_sharding,
      abstract_state,
    )
    restored = manager.restore(
      start,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=loader.DataIteratorRestore(iterator)
      ),
    )
    state = restored.state
    logging.info("resumed from step %d", start)
  else:
    start = 0
    params = _init_params(config, abstract_state.params, mesh, rules)
    with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
      state = jax.jit(
        lambda p: state_lib.create(p, tx, config.seed, trainable), out_shardings=state_sharding
      )(params)
    del params
    if primary:
      (workdir / "config.json").write_text(config.to_json(indent=2))

  train_step = step_lib.make_train_step(
    graphdef,
    tx,
    accumulation=config.accumulation,
    z_loss=config.z_loss,
    max_bad_steps=config.max_bad_steps,
    trainable=trainable,
    locations=step_lib.location_smoothing(config),
  )
  first = loader.numpy_batches(iterator)
  batch_sharding = None
  writer = metric_writers.create_default_writer(os.fspath(workdir), just_logging=not primary)
  metrics_path = workdir / "metrics.jsonl"
  last = {}
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules), _Preemption() as preemption:
    progress = tqdm.tqdm(
      total=config.total_steps,
      initial=start,
      disable=not primary,
      desc="train",
      unit="step",
      dynamic_ncols=True,
    )
    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    flops_per_step, peak = mfu.model_flops_per_step(config), mfu.peak_flops()
    for step in range(start, config.total_steps):
      local = next(first)
      if batch_sharding is None:
        _check_pictures(config, local)
        batch_sharding = {
          k: sharding.batch_sharding(mesh, rules, (config.batch_size, *v.shape[1:]))
          for k, v in local.items()
        }
        jitted = jax.jit(
          train_step,
          in_shardings=(state_sharding, batch_sharding),
          out_shardings=(state_sharding, None),
          donate_argnums=0,
        )
      batch = {
        k: jax.make_array_from_process_local_data(batch_sharding[k], v) for k, v in local.items()
      }
      state, metrics = jitted(state, batch)
      progress.update(1)
      done = step + 1
      if step == start:  # the first step compiles: keep it out of the throughput
        jax.block_until_ready(metrics)
        window_start = time.perf_counter()
      else:
        window_steps += 1
        window_tokens += int((local["segment_ids"] != 0).sum()) * jax.process_count()
      if done % config.log_every == 0 or done == config.total_steps:
        metrics = jax.device_get(metrics)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        step_time = elapsed / max(window_steps, 1)
        last = dict(
          step=done,
          loss=float(metrics["loss"]),
          accuracy=float(metrics["accuracy"]),
          grad_norm=float(metrics["grad_norm"]),
          learning_rate=float(optim.schedule(config.optim, config.total_steps)(done - 1)),
          tokens_per_s=window_tokens / elapsed,
          step_time_s=step_time,
          mfu=flops_per_step / (step_time * peak),
          skipped_steps=int(metrics["skipped"]),
          **{f"dropped/{k}": v for k, v in loader.dropped_records().items()},
        )
        if primary:
          _write_json_line(metrics_path, last)
          progress.set_postfix(loss=f"{last['loss']:.3f}", mfu=f"{last['mfu']:.1%}")
        writer.write_scalars(done, last)
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
        if bool(metrics["stop"]):
          manager.wait_until_finished()
          raise NonFiniteLossError(
            f"step {done}: {config.max_bad_steps} non-finite losses or gradients in a row; "
            "updates were skipped and the job stops (lower optim.learning_rate, check the data)"
          )
      if config.eval_every and done % config.eval_every == 0:
        evaluation = evaluate(config, graphdef, state.params, mesh, rules, workdir, done)
        if primary:
          _write_json_line(metrics_path, dict(step=done, **evaluation))
        writer.write_scalars(done, evaluation)
      if preemption.reached(done):
        manager.save(done, args=_save_args(state, iterator), force=True)
        manager.wait_until_finished()
        logging.warning("preempted: saved step %d, exiting", done)
        progress.close()
        return dict(last, preempted_at=done)
      manager.save(done, args=_save_args(state, iterator), force=done == config.total_steps)
    progress.close()
  manager.wait_until_finished()
  writer.flush()
  return last


def _save_args(state, iterator):
  return ocp.args.Composite(
    state=ocp.args.StandardSave(state), data=loader.DataIteratorSave(iterator)
  )


# (evaluator name, split) -> its dataset, read once per process.
_EVAL_DATASETS: dict = {}


def _evaluators(config, graphdef, params, workdir, step: int) -> dict:
  """`config.evaluators` on the current parameters, as `eval/<name>/<metric>`.

  Each entry names a task of `eval/tasks.py` with its split, size, batch size
  and data arguments; its predictions go to `workdir/eval/<name>/<step>/`.
  """
  if not config.evaluators:
    return {}
  model = nnx.merge(graphdef, params)
  processor = rec.processor_for(loader.vocabulary(config.data.mixture), config.model)
  results = {}
  for name, spec in config.evaluators.items():
    spec = dict(spec)
    task = eval_tasks.get(spec.pop("task"))
    key = (name, json.dumps(spec, sort_keys=True, default=str))
    batch_size = spec.pop("batch_size", 16)
    if key not in _EVAL_DATASETS:
      _EVAL_DATASETS[key] = task.load(spec.pop("split", "val"), spec.pop("num", None), **spec)
    metrics, _ = runner.evaluate(
      model,
      processor,
      task,
      _EVAL_DATASETS[key],
      out=os.path.join(os.fspath(workdir), "eval", name, str(step)),
      batch_size=batch_size,
    )
    results.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
  return results


def evaluate(config, graphdef, params, mesh, rules, workdir, step: int) -> dict:
  """Loss and token accuracy on `config.data.eval_batches` batches of the eval split,
  then `config.evaluators`."""
  ds = loader.dataset(
    config.data.mixture,
    config.data.eval_split,
    seq_len=config.seq_len,
    images_per_row=config.images_per_row,
    batch_size=config.batch_size // jax.process_count(),
    seed=config.seed,
    shuffle=False,
    repeat=False,
    shard_index=jax.process_index(),
    num_shards=jax.process_count(),
    modalities_per_row=config.data.get("modalities_per_row", 0),
  )
  eval_step = jax.jit(step_lib.make_eval_step(graphdef))
  totals = dict(loss=0.0, correct=0.0, weight=0.0)
  for i, local in enumerate(loader.numpy_batches(iter(ds))):
    if i == config.data.eval_batches:
      break
    shardings = {
      k: sharding.batch_sharding(mesh, rules, (config.batch_size, *v.shape[1:]))
      for k, v in local.items()
    }
    batch = {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}
    sums = jax.device_get(eval_step(params, batch))
    for k in totals:
      totals[k] += float(sums[k])
  weight = max(totals["weight"], 1.0)
  return {
    "eval/loss": totals["loss"] / weight,
    "eval/accuracy": totals["correct"] / weight,
    **_evaluators(config, graphdef, params, workdir, step),
  }
