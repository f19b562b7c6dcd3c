"""The one attention entry point: every attention in the model goes through here.

Mask semantics, shared by every implementation: query i of row b may attend key
j iff kv_segment_ids[b, j] != 0, the segment ids of i and j are equal, and (when
causal) j <= i + (kv_len - q_len), i.e. queries are aligned to the end of the
keys. A query with no allowed key returns zeros (never NaN). segment_ids=None
means one segment and no padding.

Implementations (config key `attention`):
  xla     plain einsum + softmax; any shapes, attention dropout; the CPU default.
  pallas  our flash kernel (kosmos_jax.kernels), TPU Mosaic or GPU Triton.
  splash  JAX's TPU splash-attention kernel.
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's flash
          attention, GPU only, bfloat16/float16 activations only.
The kernels serve self-attention (the ViT and decoder stacks, ~all the FLOPs),
each called as kernel(q, k, v, *, causal, segment_ids) with segment_ids None
when there is one segment and no padding (the ViT). The connector's one small
cross-attention (64 latents over 321 keys) and decode steps against a cache
always take the xla path. Under a mesh the kernels run inside shard_map over
the batch and heads axes of the logical rules.
"""

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from kosmos_jax import sharding


def _mask(b, lq, lk, *, causal, segment_ids, kv_segment_ids):
  """Boolean [b, 1, lq, lk] mask, or None when everything is allowed."""
  mask = None
  if kv_segment_ids is not None:
    q_seg = segment_ids if segment_ids is not None else jnp.ones((b, lq), kv_segment_ids.dtype)
    mask = (q_seg[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    mask = mask[:, None]
  if causal:
    allowed = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq)
    mask = allowed[None, None] if mask is None else mask & allowed[None, None]
  return mask


def _xla(q, k, v, *, causal, segment_ids, kv_segment_ids, dropout_rate, dropout_rng):
  b, lq, _, d = q.shape
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d**-0.5
  mask = _mask(
    b, lq, k.shape[1], causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids
  )
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # Rows with no allowed key would otherwise average over masked keys.
    probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
  if dropout_rng is not None and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _cudnn(q, k, v, *, causal, segment_ids):
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
      f"attention='cudnn' takes bfloat16 or float16 activations, got {q.dtype}: "
      "set model.dtype='bfloat16' or use another attention implementation"
    )
  # jax.nn.dot_product_attention's cuDNN path masks causality (is_causal) and
  # right padding (*_seq_lengths) inside the kernel but takes no segment ids,
  # and a boolean `mask` becomes a dense [b, 1, lq, lk] additive bias that the
  # kernel reads and, in training, writes a gradient for (and then needs even
  # lengths): jax/_src/cudnn/fused_attention_stablehlo.py, combine_bias_and_mask,
  # should_export_dbias, check_is_flash_attention. So a mask only where there
  # are segment ids (the decoder's packed rows, left-padded prompts); the ViT
  # has none and runs mask-free.
  mask = None
  if segment_ids is not None:
    # Without the `!= 0` term of the shared semantics: a padding query then
    # attends the padding, never an empty row (which the bias would turn into
    # a uniform average), and is zeroed below.
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  if segment_ids is None:
    return out
  return jnp.where((segment_ids != 0)[:, :, None, None], out, 0)


def _pallas(q, k, v, *, causal, segment_ids):
  # Lazy: Pallas' Mosaic and Triton modules load only when a model uses them.
  from kosmos_jax import kernels  # pylint: disable=g-import-not-at-top

  return kernels.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids)


def _splash(q, k, v, *, causal, segment_ids):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask  # pylint: disable=g-import-not-at-top

  b, length, heads, d = q.shape
  block = 128
  padded = -(-length // block) * block
  if segment_ids is None:
    segment_ids = jnp.ones((b, length), jnp.int32)
  pad = [(0, 0), (0, padded - length)]
  q, k, v = (jnp.pad(x, pad + [(0, 0), (0, 0)]) for x in (q, k, v))
  # Padding keeps id 0 and so only attends padding: splash forbids empty rows,
  # and those rows are zeroed below, as the shared semantics require.
  ids = jnp.pad(segment_ids.astype(jnp.int32), pad)
  base = (
    splash_mask.CausalMask((padded, padded)) if causal else splash_mask.FullMask((padded, padded))
  )
  kernel = splash.make_splash_mha(
    splash_mask.MultiHeadMask([base] * heads),
    head_shards=1,
    q_seq_shards=1,
    block_sizes=splash.BlockSizes.get_default(),
    interpret=jax.default_backend() != "tpu",
  )
  to_hld = lambda x: x.transpose(0, 2, 1, 3)  # splash takes [heads, length, dim]
  run = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1))
  out = jax.vmap(run)(to_hld(q * d**-0.5), to_hld(k), to_hld(v), ids)
  out = to_hld(out)[:, :length]
  return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


_KERNELS = {"pallas": _pallas, "splash": _splash, "cudnn": _cudnn}
IMPLEMENTATIONS = ("xla", *_KERNELS)


def _sharded(kernel, q, k, v, *, causal, segment_ids):
  """Runs a kernel per device under the current mesh (shard_map), else directly."""
  mesh = jax.sharding.get_abstract_mesh()
  # segment_ids=None reaches the kernel as None: it may skip masking entirely.
  args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
  run = lambda q, k, v, s=None: kernel(q, k, v, causal=causal, segment_ids=s)
  if mesh.empty or not spmd.get_logical_axis_rules():
    return run(*args)
  batch, heads = sharding.logical_to_spec(("act_batch", "act_heads"), q.shape[::2], mesh)
  qkv, ids = P(batch, None, heads, None), P(batch, None)
  return jax.shard_map(
    run,
    mesh=mesh,
    in_specs=(qkv, qkv, qkv, ids)[: len(args)],
    out_specs=qkv,
    check_vma=False,
  )(*args)


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool,
  segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  implementation: str = "xla",
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Multi-head attention. q [b, lq, h, d], k and v [b, lk, h, d] -> [b, lq, h, d].

  Args:
    causal: mask future keys (queries aligned to the end of the keys).
    segment_ids: [b, lq] int, 0 = padding. Defaults to all ones.
    kv_segment_ids: [b, lk] int; defaults to `segment_ids` (self-attention).
    implementation: one of `IMPLEMENTATIONS` (see the module doc).
    dropout_rate, dropout_rng: attention-probability dropout (training only;
      xla only: a fused kernel never materialises the probabilities).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {implementation!r} is not one of {list(IMPLEMENTATIONS)}"
    )
  self_attention = kv_segment_ids is None and q.shape[1] == k.shape[1]
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  if implementation == "xla" or not self_attention:
    return _xla(
      q,
      k,
      v,
      causal=causal,
      segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids,
      dropout_rate=dropout_rate,
      dropout_rng=dropout_rng,
    )
  if dropout_rng is not None and dropout_rate > 0.0:
    raise ValueError(
      f"attention={implementation!r} has no attention dropout; set "
      "model.text.attention_dropout=0 (and vision) or use attention='xla'"
    )
  return _sharded(_KERNELS[implementation], q, k, v, causal=causal, segment_ids=segment_ids)
