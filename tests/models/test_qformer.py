"""The Q-Former equals transformers' Blip2QFormerModel (query tokens only) on
random tiny weights, loaded from its state dict in both BLIP-2 layouts."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kosmos_jax.checkpoints import qformer as ckpt
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import qformer
from tests.helpers import parity

TOL = 1e-4  # max abs difference, relative to the largest output
QUERIES, ENCODER = 8, 24


def _hf_config(encoder_hidden_size=ENCODER, **kw):
  return transformers.Blip2QFormerConfig(
    encoder_hidden_size=encoder_hidden_size,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=48,
    cross_attention_frequency=2,
    attn_implementation="eager",
    **kw,
  )


def _randomize(model, seed):
  """Every parameter random at a scale that keeps activations O(1): weights
  ~ fan_in^-0.5, norm scales around 1, biases around 0."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layernorm" in name:
        p.copy_(
          1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p)
        )
      elif p.ndim >= 2:
        p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def _state(model, query_tokens):
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return {**state, "query_tokens": query_tokens}


@pytest.fixture(scope="module")
def reference():
  """(transformers model, its state dict + query_tokens, our config, our Q-Former)."""
  model = _randomize(transformers.Blip2QFormerModel(_hf_config()), seed=3)
  tokens = np.random.default_rng(4).standard_normal((1, QUERIES, 32)).astype(np.float32)
  state = _state(model, tokens)
  cfg = ckpt.qformer_config_from_hf(model.config.to_dict(), num_query_tokens=QUERIES)
  return model, state, cfg, qformer.from_params(cfg, ckpt.qformer_from_hf(state, cfg))


@nnx.jit
def _run(model, features, mask=None, rng=None):
  # Compiled: op-by-op dispatch, dropout's random bits above all, is slow on CPU.
  return model(features, mask, dropout_rng=rng)


def _features(b=2, n=10, seed=5):
  return np.random.default_rng(seed).standard_normal((b, n, ENCODER)).astype(np.float32)


def _check(ref, got):
  parity.assert_close(ref, got, TOL)


def _run_hf(model, tokens, features, mask=None):
  b = features.shape[0]
  with torch.no_grad():
    out = model(
      query_embeds=torch.from_numpy(tokens).expand(b, -1, -1),
      encoder_hidden_states=torch.from_numpy(features),
      encoder_attention_mask=None if mask is None else torch.from_numpy(mask),
    )
  return out.last_hidden_state.numpy()


def test_matches_transformers(reference):
  model, state, cfg, ours = reference
  features = _features()
  got = _run(ours, features)
  assert got.shape == (2, QUERIES, 32)
  _check(_run_hf(model, state["query_tokens"], features), got)


def test_feature_mask_matches_encoder_attention_mask(reference):
  model, state, _, ours = reference
  features = _features(seed=6)
  mask = np.ones((2, 10), np.int64)
  mask[1, 6:] = 0  # the second image has 6 real features
  ref = _run_hf(model, state["query_tokens"], features, mask)
  _check(ref, _run(ours, features, mask))
  # Padding is ignored: only the real features matter.
  np.testing.assert_allclose(
    _run(ours, features[1:, :6])[0], _run(ours, features, mask)[1], atol=1e-5
  )


def test_dropout_only_with_an_rng():
  # One cross-attention layer: every dropout site, and little to compile.
  cfg = qformer.qformer_config(
    width=16, depth=1, heads=2, mlp_dim=16, num_query_tokens=4, encoder_hidden_size=8
  )
  ours, features = qformer.QFormer(cfg, rngs=nnx.Rngs(0)), _features(1, 3)[..., :8]
  a = _run(ours, features, rng=jax.random.key(0))
  assert not np.allclose(a, _run(ours, features))
  np.testing.assert_array_equal(a, _run(ours, features, rng=jax.random.key(0)))


@pytest.fixture(scope="module")
def blip2(reference):
  """A tiny Blip2Model whose Q-Former and query tokens are the reference's
  (vision width ENCODER: Blip2Config gives its Q-Former the vision width)."""
  model, state, *_ = reference
  hf = transformers.Blip2Config(
    vision_config=dict(
      hidden_size=ENCODER, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ),
    qformer_config=_hf_config(encoder_hidden_size=1408).to_dict(),
    text_config=dict(
      model_type="opt", hidden_size=16, ffn_dim=16, num_hidden_layers=1, num_attention_heads=2
    ),
    num_query_tokens=QUERIES,
  )
  blip = transformers.Blip2Model(hf).eval()
  blip.qformer.load_state_dict(model.state_dict())
  with torch.no_grad():
    blip.query_tokens.copy_(torch.from_numpy(state["query_tokens"]))
  return blip


def test_blip2_layout_and_text_ffn_load_the_same(reference, blip2):
  _, state, cfg, _ = reference
  bare = ckpt.qformer_from_hf(state, cfg)
  # Blip2Model: the Q-Former under `qformer.`, query_tokens and other modules beside it.
  whole = {k: v.numpy() for k, v in blip2.state_dict().items()}
  assert {"language_projection.bias", "qformer.layernorm.bias", "query_tokens"} <= set(whole)
  jax.tree.map(np.testing.assert_array_equal, ckpt.qformer_from_hf(whole, cfg), bare)
  # use_qformer_text_input adds the text feed-forward, which queries never use.
  text = _randomize(transformers.Blip2QFormerModel(_hf_config(use_qformer_text_input=True)), 3)
  text_state = _state(text, state["query_tokens"])
  assert any(".intermediate.dense" in k for k in text_state)
  ckpt.qformer_from_hf(text_state, cfg)


def test_bad_checkpoints_list_the_keys(reference):
  _, state, cfg, _ = reference
  with pytest.raises(ConversionError, match=r"missing \(1\): \['query_tokens'\]"):
    ckpt.qformer_from_hf({k: v for k, v in state.items() if k != "query_tokens"}, cfg)
  # Cross-attention in every layer, for a config with it every other layer.
  every = cfg.copy_and_resolve_references()
  every.cross_attention_frequency = 1
  with pytest.raises(ConversionError, match=r"missing \(20\): \['encoder.layer.1.crossattention"):
    ckpt.qformer_from_hf(state, every)
  extra = {**state, "encoder.layer.4.output_query.dense.bias": np.zeros(32)}
  with pytest.raises(ConversionError, match=r"unexpected \(1\): \['encoder.layer.4.output_query"):
    ckpt.qformer_from_hf(extra, cfg)
  wider = cfg.copy_and_resolve_references()
  wider.encoder_hidden_size = 40
  with pytest.raises(
    ConversionError, match=r"layers/0/cross_attention/key/kernel: checkpoint \(24, 32\)"
  ):
    ckpt.qformer_from_hf(state, wider)
  with pytest.raises(ConversionError, match="not a BLIP-2 Q-Former"):
    ckpt.qformer_from_hf({"vision_model.embeddings.patch_embedding.weight": np.zeros(1)}, cfg)
  with pytest.raises(ValueError, match=r"reads \[batch, tokens, 24\]"):
    reference[3](np.zeros((1, 4, 32), np.float32))


def test_from_blip2_snapshot(reference, blip2, tmp_path):
  """A sharded Blip2Model snapshot: the config from config.json's
  qformer_config, num_query_tokens and vision width."""
  *_, cfg, ours = reference
  blip2.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert ckpt.qformer_config_from_hf(blip2.config.to_dict()).to_dict() == cfg.to_dict()
  loaded = ckpt.qformer_from_hf_dir(str(tmp_path))
  features = _features(1, 5, seed=8)
  np.testing.assert_array_equal(_run(loaded, features), _run(ours, features))
