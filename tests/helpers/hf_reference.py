"""Random-weight transformers Kosmos-2 models and inputs, the reference for parity tests."""

import torch
import transformers

from tests.helpers.batches import grounded_rows

# Three tiny shapes that differ in heads, depth, latents, image and patch size.
TINY_HF_CONFIGS = {
  "a": dict(
    text_config=dict(
      embed_dim=64,
      layers=2,
      attention_heads=4,
      ffn_dim=128,
      vocab_size=300,
      max_position_embeddings=128,
    ),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
    ),
    latent_query_num=8,
  ),
  "b": dict(
    text_config=dict(
      embed_dim=96,
      layers=3,
      attention_heads=6,
      ffn_dim=160,
      vocab_size=257,
      max_position_embeddings=96,
    ),
    vision_config=dict(
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=1,
      num_attention_heads=3,
      image_size=28,
      patch_size=7,
    ),
    latent_query_num=5,
  ),
  "c": dict(
    text_config=dict(
      embed_dim=32,
      layers=1,
      attention_heads=2,
      ffn_dim=48,
      vocab_size=211,
      max_position_embeddings=64,
    ),
    vision_config=dict(
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=3,
      num_attention_heads=8,
      image_size=24,
      patch_size=4,
    ),
    latent_query_num=16,
  ),
}


def random_hf_model(name: str, seed: int = 0) -> transformers.Kosmos2ForConditionalGeneration:
  """A transformers Kosmos-2 whose every parameter, LayerNorms included, is random."""
  torch.manual_seed(seed)
  config = transformers.Kosmos2Config(**TINY_HF_CONFIGS[name])
  model = transformers.Kosmos2ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("bias") or "layer_norm" in pname or "layernorm" in pname or "_ln" in pname:
        p.add_(0.1 * torch.randn_like(p))
    # Logits of order 10, not 0.1: a parity bound relative to them then means something.
    model.text_model.model.embed_tokens.weight.normal_(0.0, 0.3)
  return model


def grounded_batch(hf_config: transformers.Kosmos2Config, lengths, seed: int = 0):
  """Left-padded rows laid out like the processor's: <s> <image> slots </image> text."""
  return grounded_rows(
    hf_config.text_config.vocab_size,
    hf_config.latent_query_num,
    hf_config.vision_config.image_size,
    lengths,
    seed,
  )
