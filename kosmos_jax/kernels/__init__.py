"""Pallas attention kernels (TPU Mosaic and GPU Triton) and their references."""

from kosmos_jax.kernels.flash import flash_attention
from kosmos_jax.kernels.reference import attention_reference
from kosmos_jax.kernels.tiling import BlockSizes

__all__ = ["BlockSizes", "attention_reference", "flash_attention"]
