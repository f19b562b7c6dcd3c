"""Issue #19's GPU table in one run: train step, generation and attention, ours vs transformers.

Rows (one JSON line each, then a final summary line):
  train/...      one AdamW step of the released Kosmos-2 shape (models/config.py
                 defaults: ViT-L/14 at 224, 24 x 2048 decoder, 1.66B
                 parameters), random weights, 8 rows x 2048 tokens, one
                 224 px image per row, bf16 compute on float32 master
                 weights, dropout off on both sides. Ours at attention x remat
                 pallas/full, xla/full, pallas/none, cudnn/full, pallas/dots;
                 transformers' Kosmos2ForConditionalGeneration under torch
                 autocast bf16, sdpa attention, fused AdamW (same betas, eps,
                 decay, clip 2.0), no gradient checkpointing.
  generate/...   bf16 weights, 8 images, 64 new tokens greedy (EOS off, so
                 every row generates all 64), no_repeat_ngram_size 0 and 3;
                 ours (first call, i.e. tracing + compilation, reported
                 apart) and transformers' generate.
  flash/...      attention forward + backward, causal, 32 heads x 64, bf16,
                 1024 / 4096 / 8192 tokens (batch = 16384 tokens // length):
                 ours (Pallas Triton), cuDNN (jax.nn.dot_product_attention
                 implementation="cudnn") and XLA; ours and cuDNN are checked
                 against XLA (max_abs_diff_vs_xla), so a fast wrong kernel
                 cannot hide.
  decode/xla     one decode step's attention (the XLA path generation takes)
                 over a half-full 8192-token cache, batch 16: useful bytes/s
                 (the valid K and V) and their fraction of the HBM bandwidth.

Every row runs in a subprocess of its own with its own time limit
(--row-timeout): jax and torch never share the GPU, and an out-of-memory
cannot poison the next row. A failure is a line with "error": "<type>:
<first line>"; a row past its limit, "timeout after N s". Each line has the
median time over --repeats calls after warm-up (median_s), tokens/s, MFU
(train rows; kosmos_jax.train.mfu counting, the same FLOPs for both sides),
peak device memory (jax: peak_bytes_in_use; torch: max_memory_allocated),
the device and the versions of its side's stack.

Run on a GPU: `python -m benchmarks.gpu_vs_hf` (20 rows, each a fresh process
that imports, compiles and measures: several minutes in all), or a subset,
e.g. under a per-command time limit: `python -m benchmarks.gpu_vs_hf --only
train/ours/pallas generate`. `--set batch=4 ...` changes a shape. jax rows may
take 95% of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set), as torch
may take all of it. `--tiny` runs the rows at a seconds-long shape on CPU
(tests/test_benchmarks.py: one row per code path, with --jobs 2); there the
cuDNN rows trace up to jax's cuDNN call and stop with "needs a GPU", and the
HBM fraction and MFU are null.

Known figures (issue #19, one NVIDIA H200, jax 0.11.2, torch 2.11,
transformers 5.17), to compare with:
  train  ours pallas/remat=full 0.513 s/step, 28.7% MFU, 31.6 GB peak;
         transformers 0.615 s, 84 GB; ours remat=none OOM (one 131 GiB
         allocation); ours attention=cudnn TypeError.
  generate  ours 0.247 s vs transformers 0.705 s.
  flash  ours 145 / 204 / 217 TFLOP/s vs cuDNN 171 / 300 / 372 at 1024 /
         4096 / 8192 tokens.
"""

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures

from benchmarks.common import TINY_HF_CONFIG, feature_batch, timed

_T, _V = TINY_HF_CONFIG["text_config"], TINY_HF_CONFIG["vision_config"]
# TINY_HF_CONFIG in model_config()'s keys, for `--tiny`.
TINY_MODEL = {
  "text.vocab_size": _T["vocab_size"],
  "text.width": _T["embed_dim"],
  "text.depth": _T["layers"],
  "text.heads": _T["attention_heads"],
  "text.ffn_dim": _T["ffn_dim"],
  "text.max_positions": _T["max_position_embeddings"],
  "vision.width": _V["hidden_size"],
  "vision.mlp_dim": _V["intermediate_size"],
  "vision.depth": _V["num_hidden_layers"],
  "vision.heads": _V["num_attention_heads"],
  "vision.image_size": _V["image_size"],
  "vision.patch_size": _V["patch_size"],
  "latent_query_num": TINY_HF_CONFIG["latent_query_num"],
}
# The issue's shapes, and `--tiny`'s seconds-long ones.
SHAPES = dict(
  batch=8,  # train rows x seq_len tokens, one image each
  seq_len=2048,
  gen_batch=8,
  prompt_tokens=8 + 67,  # <s> <image> 64 slots </image> and 8 text tokens
  new_tokens=64,
  flash_lens=(1024, 4096, 8192),
  flash_tokens=16384,  # a flash row's batch: flash_tokens // length
  heads=32,  # Kosmos-2's decoder: 32 heads of 64
  head_dim=64,
  decode_batch=16,
  cache_len=8192,
  repeats=5,
)
TINY_SHAPES = dict(
  batch=2,
  seq_len=32,
  gen_batch=2,
  prompt_tokens=TINY_HF_CONFIG["latent_query_num"] + 3 + 4,
  new_tokens=8,
  flash_lens=(128,),
  flash_tokens=256,
  heads=2,
  decode_batch=2,
  cache_len=256,
  repeats=2,
)
# Same work on both sides: no dropout anywhere (the kernels have no attention dropout).
NO_DROPOUT = {"text.dropout": 0.0, "text.attention_dropout": 0.0, "vision.attention_dropout": 0.0}
# (attention, remat) of our train rows, in the order.
OUR_TRAIN = (
  ("pallas", "full"),
  ("xla", "full"),
  ("pallas", "none"),
  ("cudnn", "full"),
  ("pallas", "dots"),
)
# HBM bandwidth by device kind, bytes/s (vendor figures; first match wins;
# another device's fraction is null).
HBM_BYTES_PER_S = (("h200", 4.8e12), ("h100 pcie", 2.0e12), ("h100 nvl", 3.9e12), ("h100", 3.35e12))


def _sig(x: float) -> float:
  """Four significant digits: a tiny CPU row's figures do not round to zero."""
  return float(f"{x:.4g}")


class NeedsGPU(Exception):
  pass


def _gpu_only(trace):
  """On a host without a GPU: runs `trace` (our code, traced up to jax's
  cuDNN call, which refuses there) and stops the row with NeedsGPU; a failure
  of our own code on the way still surfaces as itself."""
  try:
    trace()
  except RuntimeError as e:
    if "cuDNN" not in str(e):
      raise
  raise NeedsGPU


def _first_then_median(call, repeats, warmups=0):
  """(the first call's result, its seconds (with jax's tracing and compiling),
  the median seconds of `repeats` calls after `warmups` more)."""
  start = time.perf_counter()
  out = call()
  first = time.perf_counter() - start
  for _ in range(warmups):
    call()
  return out, first, timed(call, repeats)[0]


def _model_config(args, **overrides):
  from kosmos_jax.models.config import model_config  # pylint: disable=g-import-not-at-top

  return model_config(**(TINY_MODEL if args.tiny else {}), **NO_DROPOUT, **overrides)


def _hf_config(model_cfg):
  """transformers' Kosmos2Config of our model config, sdpa attention."""
  import transformers  # pylint: disable=g-import-not-at-top

  from kosmos_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top

  config = transformers.Kosmos2Config.from_dict(hf.config_to_hf(model_cfg))
  config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  return config


def _grounded_batch(model_cfg, batch, length):
  """`batch` rows of exactly `length` tokens in transformers' layout (no
  padding: neither side packs), from numpy alone (a jax row imports no torch)."""
  from tests.helpers.batches import grounded_rows  # pylint: disable=g-import-not-at-top

  latents = model_cfg.latent_query_num
  text = [length - latents - 3] * batch  # after <s> <image> slots </image>
  return grounded_rows(model_cfg.text.vocab_size, latents, model_cfg.vision.image_size, text)


def _our_model_state(model_cfg):
  """(graphdef, Params) of a randomly initialised model, built by one jitted
  init on the device rather than op by op."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from kosmos_jax.models import build  # pylint: disable=g-import-not-at-top
  from kosmos_jax.models.kosmos import Kosmos2  # pylint: disable=g-import-not-at-top

  graphdef = nnx.split(build.abstract_model(model_cfg), nnx.Param)[0]
  params = jax.jit(lambda: nnx.state(Kosmos2(model_cfg, rngs=nnx.Rngs(0)), nnx.Param))()
  return graphdef, params


def _jax_info():
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  return dict(
    device=jax.devices()[0].device_kind,
    platform=jax.default_backend(),
    jax=jax.__version__,
    flax=flax.__version__,
  )


def _jax_peak_bytes():
  import jax  # pylint: disable=g-import-not-at-top

  stats = jax.devices()[0].memory_stats()  # None on CPU
  return stats["peak_bytes_in_use"] if stats else None


def _torch_device():
  import torch  # pylint: disable=g-import-not-at-top

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_info():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  gpu = torch.cuda.is_available()
  return dict(
    device=torch.cuda.get_device_name() if gpu else "cpu",
    platform="gpu" if gpu else "cpu",
    torch=torch.__version__,
    transformers=transformers.__version__,
  )


def _torch_peak_bytes():
  import torch  # pylint: disable=g-import-not-at-top

  return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def train_ours(args, attention, remat):
  import jax  # pylint: disable=g-import-not-at-top

  from kosmos_jax.config import experiment_config  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import optim  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  model_cfg = _model_config(args, dtype="bfloat16", remat=remat, attention=attention)
  cfg = experiment_config(model_cfg)
  tx = optim.optimizer(cfg.optim, cfg.total_steps)
  graphdef, params = _our_model_state(model_cfg)
  holder = [state_lib.create(params, tx, seed=0)]
  del params  # the state holds them: no other reference to the buffers the step donates
  batch = jax.device_put(feature_batch(_grounded_batch(model_cfg, args.batch, args.seq_len)))
  train_step = jax.jit(step_lib.make_train_step(graphdef, tx), donate_argnums=0)
  if attention == "cudnn" and jax.default_backend() != "gpu":
    _gpu_only(lambda: train_step.trace(holder[0], batch))

  def step():
    holder[0], metrics = train_step(holder[0], batch)
    return float(metrics["loss"])

  # An untimed second step: the allocator reaches its working set.
  _, first, seconds = _first_then_median(step, args.repeats, warmups=1)
  return _train_record(args, model_cfg, seconds, first, _jax_peak_bytes())


def train_transformers(args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from kosmos_jax.train import optim  # pylint: disable=g-import-not-at-top

  model_cfg = _model_config(args)
  device = _torch_device()
  torch.manual_seed(0)
  with device:  # initialised where it runs: no 6.6 GB host copy
    hf = transformers.Kosmos2ForConditionalGeneration(_hf_config(model_cfg))
  hf.train()
  batch = _grounded_batch(model_cfg, args.batch, args.seq_len)
  # Labels: every token but the slots (transformers shifts them itself), as ours.
  labels = np.where(batch["image_embeds_position_mask"] == 0, batch["input_ids"], -100)
  inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
  labels = torch.from_numpy(labels).to(device)
  o = optim.optim_config()
  opt = torch.optim.AdamW(
    hf.parameters(),
    lr=o.learning_rate,
    betas=(o.b1, o.b2),
    eps=o.eps,
    weight_decay=o.weight_decay,
    fused=True,
  )

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = hf(**inputs, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_norm)
    opt.step()
    return loss.item()  # waits for the step

  _, first, seconds = _first_then_median(step, args.repeats, warmups=1)
  record = _train_record(args, model_cfg, seconds, first, _torch_peak_bytes())
  # What the decoder's attention layers run, as the model resolved it.
  used = hf.text_model.config._attn_implementation  # pylint: disable=protected-access
  return dict(record, attention=used, remat="none")


def _train_record(args, model_cfg, seconds, first, peak_bytes):
  from kosmos_jax.config import experiment_config  # pylint: disable=g-import-not-at-top
  from kosmos_jax.train import mfu  # pylint: disable=g-import-not-at-top

  cfg = experiment_config(model_cfg)
  cfg.batch_size, cfg.seq_len, cfg.images_per_row = args.batch, args.seq_len, 1
  return dict(
    median_s=_sig(seconds),
    first_call_s=_sig(first),
    tokens_per_s=_sig(args.batch * args.seq_len / seconds),
    model_flops_per_step=mfu.model_flops_per_step(cfg),
    peak_memory_bytes=peak_bytes,
  )


def generate_ours(args, ngram):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model_cfg = _model_config(args, dtype="bfloat16", param_dtype="bfloat16")
  model = nnx.merge(*_our_model_state(model_cfg))
  batch = _grounded_batch(model_cfg, args.gen_batch, args.prompt_tokens)
  options = dict(max_new_tokens=args.new_tokens, eos_token_id=-1, no_repeat_ngram_size=ngram)
  call = lambda: model.generate(**batch, **options)  # returns numpy: waits
  out, first, seconds = _first_then_median(call, args.repeats)
  return _generate_record(args, seconds, first, out, _jax_peak_bytes())


def generate_transformers(args, ngram):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  model_cfg = _model_config(args)
  device = _torch_device()
  torch.manual_seed(0)
  with device:
    hf = transformers.Kosmos2ForConditionalGeneration(_hf_config(model_cfg))
  hf = hf.to(torch.bfloat16).eval()
  if torch.cuda.is_available():  # the float32 copy it was made from is not generation's memory
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  transformers.logging.set_verbosity_error()  # eos_token_id=-1 is deliberate
  batch = _grounded_batch(model_cfg, args.gen_batch, args.prompt_tokens)
  inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
  inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
  options = dict(max_new_tokens=args.new_tokens, eos_token_id=-1, no_repeat_ngram_size=ngram)

  def call():
    with torch.no_grad():
      return hf.generate(**inputs, do_sample=False, **options).cpu().numpy()

  out, first, seconds = _first_then_median(call, args.repeats)
  return _generate_record(args, seconds, first, out, _torch_peak_bytes())


def _generate_record(args, seconds, first, out, peak_bytes):
  new = out.shape[1] - args.prompt_tokens
  if new != args.new_tokens:  # EOS is off: anything else is a broken measurement
    raise AssertionError(f"generated {new} tokens, not {args.new_tokens}")
  return dict(
    median_s=_sig(seconds),
    first_call_s=_sig(first),
    tokens_per_s=_sig(args.gen_batch * args.new_tokens / seconds),
    peak_memory_bytes=peak_bytes,
  )


def flash(args, impl, length):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import attention  # pylint: disable=g-import-not-at-top

  batch = max(1, args.flash_tokens // length)
  shape = (batch, length, args.heads, args.head_dim)
  q, k, v, dout = (
    jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 4)
  )
  step = attention.forward_backward(attention.attention_fn(impl, True))
  if impl == "cudnn" and jax.default_backend() != "gpu":
    _gpu_only(lambda: step.trace(q, k, v, dout))
  outs = jax.block_until_ready(step(q, k, v, dout))  # compiles
  seconds, _ = timed(lambda: jax.block_until_ready(step(q, k, v, dout)), args.repeats)
  record = dict(
    batch=batch,
    median_s=_sig(seconds),
    tflops=_sig(attention.flops(*shape, True) / seconds / 1e12),
    tokens_per_s=_sig(batch * length / seconds),
    peak_memory_bytes=_jax_peak_bytes(),  # before the check below adds XLA's
  )
  if impl != "xla":
    try:  # XLA's [length, length] scores may not fit where the kernel did: keep the timing
      want = attention.forward_backward(attention.attention_fn("xla", True))(q, k, v, dout)
      record["max_abs_diff_vs_xla"] = max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(outs, want)
      )
    except Exception as e:  # pylint: disable=broad-except
      record.update(max_abs_diff_vs_xla=None, check_error=_error(e))
  return record


def decode(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import attention  # pylint: disable=g-import-not-at-top

  shape = (args.decode_batch, args.cache_len, args.heads, args.head_dim)
  m = attention.run_decode(*shape, jnp.bfloat16, args.repeats)
  kind = jax.devices()[0].device_kind.lower()
  hbm = next((bw for name, bw in HBM_BYTES_PER_S if name in kind), None)
  bytes_per_s = m["useful_bytes"] / m["seconds"]
  return dict(
    valid_len=m["valid_len"],
    median_s=_sig(m["seconds"]),
    useful_gb_per_s=_sig(bytes_per_s / 1e9),
    hbm_gb_per_s=hbm and hbm / 1e9,
    hbm_fraction=hbm and _sig(bytes_per_s / hbm),
    peak_memory_bytes=_jax_peak_bytes(),
  )


def rows(args) -> dict:
  """Row name -> (function, its arguments, what the line reports of its setup)."""
  out = {}
  train = dict(batch=args.batch, seq_len=args.seq_len, images_per_row=1, dtype="bfloat16")
  for attention, remat in OUR_TRAIN:
    out[f"train/ours/{attention}/{remat}"] = (
      train_ours,
      dict(attention=attention, remat=remat),
      dict(train, impl="ours", attention=attention, remat=remat),
    )
  setup = dict(train, impl="transformers", attention="sdpa", remat="none")
  out["train/transformers"] = (train_transformers, {}, setup)
  generate = dict(batch=args.gen_batch, prompt_len=args.prompt_tokens, new_tokens=args.new_tokens)
  for ngram in (0, 3):
    for impl, fn in (("ours", generate_ours), ("transformers", generate_transformers)):
      setup = dict(generate, impl=impl, no_repeat_ngram_size=ngram, dtype="bfloat16")
      out[f"generate/{impl}/ngram{ngram}"] = (fn, dict(ngram=ngram), setup)
  for length in args.flash_lens:
    for impl in ("ours", "cudnn", "xla"):
      setup = dict(impl=impl, seq_len=length, heads=args.heads, head_dim=args.head_dim)
      setup.update(causal=True, dtype="bfloat16")
      out[f"flash/{impl}/{length}"] = (flash, dict(impl=impl, length=length), setup)
  setup = dict(impl="xla", batch=args.decode_batch, cache_len=args.cache_len, heads=args.heads)
  setup.update(head_dim=args.head_dim, dtype="bfloat16")
  out["decode/xla"] = (decode, {}, setup)
  return out


def _error(e: BaseException) -> str:
  if isinstance(e, NeedsGPU):
    return "needs a GPU"
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def run_row(args, name):
  """This process measures one row and prints its line."""
  from kosmos_jax import heap  # pylint: disable=g-import-not-at-top

  heap.keep_freed_memory()  # as the other benchmarks, before jax or torch start threads
  fn, kwargs, setup = rows(args)[name]
  side_is_torch = fn in (train_transformers, generate_transformers)
  if side_is_torch:  # jax only counts FLOPs here: it must not take the GPU from torch
    os.environ["JAX_PLATFORMS"] = "cpu"
    if args.tiny:
      import torch  # pylint: disable=g-import-not-at-top

      # A tiny row is all overhead: torch's spinning pool threads only fight
      # the other rows' (--jobs) for the CPU, 40x slower per call.
      torch.set_num_threads(1)
  record = dict(benchmark="gpu_vs_hf", row=name, **setup)
  try:
    record.update(_torch_info() if side_is_torch else _jax_info())
    record.update(fn(args, **kwargs))
  except Exception as e:  # pylint: disable=broad-except
    record["error"] = _error(e)
  if "model_flops_per_step" in record:
    # By name, not mfu.peak_flops(): a torch row keeps jax off the GPU; a
    # CPU's is None (a tiny model's MFU there means nothing).
    from kosmos_jax.train import mfu  # pylint: disable=g-import-not-at-top

    peak = mfu.peak_flops_of(record["device"])
    record["mfu"] = peak and _sig(record["model_flops_per_step"] / record["median_s"] / peak)
  if record.get("peak_memory_bytes") is not None:
    record["peak_memory_gib"] = round(record["peak_memory_bytes"] / 2**30, 2)
  print(json.dumps(record), flush=True)


def _child(args, argv, env, name) -> dict:
  """Row `name` measured by a child process: its line, or one saying why there is none."""
  command = [sys.executable, "-m", "benchmarks.gpu_vs_hf", *argv, "--row", name]
  child = subprocess.Popen(
    command,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    start_new_session=True,
  )
  try:
    out, err = child.communicate(timeout=args.row_timeout)
    error = None
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)  # its own session: the row and anything it started
    out, err = child.communicate()
    error = f"timeout after {args.row_timeout:g} s"
  sys.stderr.write(err)
  lines = [line for line in out.splitlines() if line.startswith("{")]
  if lines and error is None:
    return json.loads(lines[-1])
  if error is None:  # died without a line: a crash, e.g. killed for host memory
    last = [line for line in err.splitlines() if line.strip()]
    error = f"exit code {child.returncode}: {last[-1] if last else ''}"[:500]
  return dict(benchmark="gpu_vs_hf", row=name, **rows(args)[name][2], error=error)


def run_all(args, argv):
  """Each selected row in a child process of its own; prints their lines as they come."""
  names = [n for n in rows(args) if not args.only or any(n.startswith(p) for p in args.only)]
  env = dict(os.environ)
  # jax's default reservation is 75% of the GPU; torch may use all of it.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")
  start, failed = time.perf_counter(), []
  with tempfile.TemporaryDirectory(prefix="gpu_vs_hf_") as cache:
    if args.tiny:
      # Compiling is most of a tiny row: spend little on optimising, and let
      # the rows share what they all compile (the init, the eager ops). Not
      # on a GPU: a row's first call would then time another row's compile.
      flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
      env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
      env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
      env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    with futures.ThreadPoolExecutor(args.jobs) as pool:
      running = [pool.submit(_child, args, argv, env, name) for name in names]
      for done in futures.as_completed(running):
        record = done.result()
        failed += [record["row"]] if "error" in record else []
        print(json.dumps(record), flush=True)
  wall = round(time.perf_counter() - start, 1)
  print(json.dumps(dict(benchmark="gpu_vs_hf", rows=len(names), failed=failed, wall_s=wall)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="seconds-long shapes, for a CPU")
  parser.add_argument(
    "--only", nargs="*", default=[], metavar="PREFIX", help="rows whose name starts so"
  )
  parser.add_argument("--row-timeout", type=float, default=240, help="seconds per row")
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed calls after warm-up (5; tiny 2)"
  )
  parser.add_argument(
    "--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"overrides of {', '.join(SHAPES)}"
  )
  parser.add_argument(
    "--jobs", type=int, default=1, help="rows at a time; more than 1 only with --tiny (CPU)"
  )
  parser.add_argument("--row", help=argparse.SUPPRESS)  # the child's: measure this row here
  args = parser.parse_args()
  if args.jobs > 1 and not args.tiny:
    parser.error("--jobs > 1 would share the device between rows: only with --tiny")
  shapes = dict(SHAPES, **(TINY_SHAPES if args.tiny else {}))
  for item in args.set:
    key, value = item.split("=", 1)
    if key not in shapes:
      parser.error(f"--set {key}: not one of {sorted(shapes)}")
    shapes[key] = ast.literal_eval(value)
  for key, value in shapes.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  if args.row:
    run_row(args, args.row)
  else:
    run_all(args, sys.argv[1:])


if __name__ == "__main__":
  main()
