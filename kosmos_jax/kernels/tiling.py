"""Block sizes, padding to block multiples and the per-tile attention mask.

Shared by the TPU (Mosaic) and GPU (Triton) flash attention kernels, so both
apply exactly the same mask (see `reference.py` for the semantics).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

# Masked logits get this finite value rather than -inf: exp(MASK - m) is then 0
# for any real running max m, and exp(MASK - MASK) = 1 never produces NaN (rows
# that see only masked keys are detected and zeroed at the end instead).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# dot_general dimension numbers of 2-D matmuls inside the kernels.
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes along the sequence; they change speed, not results.

  Attributes:
    block_q: query rows per tile in the forward kernel.
    block_k: key rows per tile in the forward kernel.
    block_q_bwd: query rows per tile in both backward kernels.
    block_k_bwd: key rows per tile in both backward kernels.
  """

  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int

  def fit(self, length, align):
    """Shrinks blocks to the length rounded up to `align` (short inputs)."""
    cap = _round_up(length, align)
    return BlockSizes(*(min(b, cap) for b in dataclasses.astuple(self)))

  @property
  def multiple(self):
    """The length every input is padded to a multiple of."""
    return math.lcm(*dataclasses.astuple(self))


def pad_inputs(q, k, v, segment_ids, multiple):
  """Pads the length axis to `multiple`; padding gets segment id 0.

  Args:
    q: [batch, length, heads, head_dim]; k and v alike.
    k: keys.
    v: values.
    segment_ids: [batch, length] ints or None.
    multiple: the padded length is a multiple of this.

  Returns:
    (q, k, v, segment_ids) padded. segment_ids stays None only when it was
    None and no padding was needed, so kernels can skip segment masking.
  """
  length = q.shape[1]
  extra = _round_up(length, multiple) - length
  if extra == 0:
    return q, k, v, segment_ids
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  widths = ((0, 0), (0, extra), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, extra)))
  return q, k, v, segment_ids


def tile_mask(q_start, k_start, block_q, block_k, *, causal, q_ids=None, kv_ids=None):
  """Allowed-pairs mask of one [block_q, block_k] tile, or None if all allowed.

  Args:
    q_start: position of the tile's first query.
    k_start: position of the tile's first key.
    block_q: tile rows.
    block_k: tile columns.
    causal: mask keys after the query.
    q_ids: [block_q, 1] segment ids of the queries, or None.
    kv_ids: [1, block_k] segment ids of the keys, or None.
  """
  mask = None
  if causal:
    shape = (block_q, block_k)
    rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = cols <= rows
  if q_ids is not None:
    same = jnp.logical_and(q_ids == kv_ids, kv_ids != 0)
    mask = same if mask is None else jnp.logical_and(mask, same)
  return mask


def masked_scores(q, k, sm_scale, q_start, k_start, *, causal, q_ids=None, kv_ids=None):
  """Scaled float32 logits of one tile; disallowed pairs are MASK_VALUE.

  Args:
    q: [block_q, head_dim] query tile.
    k: [block_k, head_dim] key tile.
    sm_scale: logit scale.
    q_start: position of the tile's first query.
    k_start: position of the tile's first key.
    causal: mask keys after the query.
    q_ids: [block_q, 1] segment ids of the queries, or None.
    kv_ids: [1, block_k] segment ids of the keys, or None.
  """
  s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
  s *= sm_scale
  mask = tile_mask(
    q_start, k_start, q.shape[0], k.shape[0], causal=causal, q_ids=q_ids, kv_ids=kv_ids
  )
  return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def out_struct(shape, dtype, like):
  """ShapeDtypeStruct for a pallas_call output that varies like `like`.

  Inside `shard_map` (required for Mosaic on a multi-device mesh) Pallas needs
  to know over which manual mesh axes the output varies; outside it the
  attribute is empty and harmless.
  """
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _round_up(x, m):
  return -(-x // m) * m


def resolve_backend(backend: str | None, interpret: bool) -> tuple[str, bool]:
  """The kernel family to use and whether to interpret it.

  None follows jax.default_backend(); on CPU the TPU kernels run interpreted,
  which is how the tests check them.
  """
  if backend is not None:
    return backend, interpret
  platform = jax.default_backend()
  return ("gpu" if platform == "gpu" else "tpu"), interpret or platform not in ("tpu", "gpu")
