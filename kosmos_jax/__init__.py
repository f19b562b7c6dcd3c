"""kosmos-jax: KOSMOS-1/2 grounded multimodal LLMs in JAX/Flax, TPU-native."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy: `import kosmos_jax` must stay cheap (no TF/JAX import) for the CLI's --help.
  if name == "from_pretrained":
    from kosmos_jax.checkpoints.loading import from_pretrained

    return from_pretrained
  if name == "Processor":
    from kosmos_jax.processing.processor import Processor

    return Processor
  raise AttributeError(f"module 'kosmos_jax' has no attribute {name!r}")
