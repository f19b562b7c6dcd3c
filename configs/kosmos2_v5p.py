"""Kosmos-2 on a v5p-128 slice (64 chips) at the paper's global batch (reference 3.3).

The paper trained with ~419K tokens per step; here 208 packed rows of 2048
tokens = 425,984. Mesh: fsdp=16 x tensor=4 (the batch is split 16 ways, so 13
rows per fsdp group), bfloat16 compute, full rematerialisation:

  kosmos-jax aot --config configs/kosmos2_v5p.py --topology v5p:4x4x4
"""

from configs import kosmos2


def get_config():
  config = kosmos2.get_config()
  config.batch_size = 208
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 16, 4
  return config
