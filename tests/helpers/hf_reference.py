"""Random-weight transformers Kosmos-2 models and inputs, the reference for parity tests."""

import numpy as np
import torch
import transformers

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
  rng = np.random.default_rng(seed)
  vocab = hf_config.text_config.vocab_size
  latents = hf_config.latent_query_num
  rows, slot_rows = [], []
  for n_text in lengths:
    text = rng.integers(4 + latents, vocab - 3, size=n_text)
    ids = [0, vocab - 3, *range(4, 4 + latents), vocab - 2, *text]
    rows.append(ids)
    slot_rows.append([0, 0] + [1] * latents + [0] + [0] * n_text)
  width = max(map(len, rows))
  input_ids = np.full((len(rows), width), 1, np.int64)
  attention_mask = np.zeros_like(input_ids)
  slot_mask = np.zeros_like(input_ids)
  for i, (ids, slots) in enumerate(zip(rows, slot_rows)):
    input_ids[i, width - len(ids) :] = ids
    attention_mask[i, width - len(ids) :] = 1
    slot_mask[i, width - len(ids) :] = slots
  vc = hf_config.vision_config
  pixel_values = rng.standard_normal((len(rows), 3, vc.image_size, vc.image_size)).astype(
    np.float32
  )
  return dict(
    input_ids=input_ids,
    attention_mask=attention_mask,
    image_embeds_position_mask=slot_mask,
    pixel_values=pixel_values,
  )
