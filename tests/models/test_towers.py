"""DINOv2 and SigLIP towers equal transformers' Dinov2Model / SiglipVisionModel
on random tiny weights, loaded from their state dicts and from big_vision npz."""

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from kosmos_jax.checkpoints import towers as ckpt
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import towers

TOL = 1e-4  # max abs difference, relative to the largest output


def _randomize(model, seed):
  """Every parameter random at a scale that keeps activations O(1): weights
  ~ fan_in^-0.5, vectors (biases, norms, LayerScale, positions) around their
  init so that none is the trivial 0 or 1."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("norm" in name and name.endswith("weight")) or "lambda" in name:  # scales
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim >= 2 and not any(s in name for s in ("position", "token", "probe")):
        p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
      else:  # biases, positions, class token, probe
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def _images(n, h, w, seed):
  return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def _state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _check(ref, got):
  ref, got = np.asarray(ref), np.asarray(got)
  assert got.shape == ref.shape
  scale = float(np.abs(ref).max())
  assert scale > 0.5  # not a comparison between near-zeros
  err = float(np.abs(ref - got).max())
  assert err / scale < TOL, f"max abs diff {err:.2e}, relative {err / scale:.2e}"


def _tower(cfg, params):
  return towers.from_params(cfg, params)


def _nhwc(x):
  return x.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=["gelu", "swiglu"])
def dinov2(request):
  hf = transformers.Dinov2Config(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
    use_swiglu_ffn=request.param == "swiglu",
    attn_implementation="eager",
  )
  model = _randomize(transformers.Dinov2Model(hf), seed=1)
  cfg = ckpt.dinov2_config_from_hf(hf.to_dict())
  return model, cfg, _tower(cfg, ckpt.dinov2_from_hf(_state(model), cfg))


@pytest.mark.parametrize("size", [(28, 28), (42, 42), (35, 49)], ids=["native", "bigger", "oblong"])
def test_dinov2_matches(dinov2, size):
  model, _, ours = dinov2
  pixels = _images(2, *size, seed=sum(size))
  with torch.no_grad():
    ref = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
  _check(ref, ours(_nhwc(pixels)))


def test_dinov2_legacy_keys_load_the_same(dinov2):
  model, cfg, _ = dinov2
  state, legacy = _state(model), {}
  for key, value in state.items():
    key = key.replace("attention.q_proj", "attention.attention.query")
    key = key.replace("attention.k_proj", "attention.attention.key")
    key = key.replace("attention.v_proj", "attention.attention.value")
    key = key.replace("attention.o_proj", "attention.output.dense").replace(
      "down_proj", "weights_out"
    )
    if "up_proj" in key:
      continue
    if "gate_proj" in key:
      value = np.concatenate([value, state[key.replace("gate_proj", "up_proj")]])
      key = key.replace("gate_proj", "weights_in")
    legacy["dinov2." + key] = value
  a, b = ckpt.dinov2_from_hf(state, cfg), ckpt.dinov2_from_hf(legacy, cfg)
  np.testing.assert_equal(a, b)


def test_tower_from_hf_dir(dinov2, tmp_path):
  model, _, ours = dinov2
  model.save_pretrained(tmp_path)
  loaded = ckpt.tower_from_hf_dir(str(tmp_path))
  pixels = _nhwc(_images(1, 28, 28, seed=7))
  np.testing.assert_array_equal(loaded(pixels), ours(pixels))


@pytest.fixture(scope="module")
def siglip():
  hf = transformers.SiglipVisionConfig(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=3,
    image_size=32,
    patch_size=8,
    attn_implementation="eager",
  )
  model = _randomize(transformers.SiglipVisionModel(hf), seed=2)
  cfg = ckpt.siglip_config_from_hf(hf.to_dict())
  return model, cfg


@pytest.mark.parametrize("size", [32, 48], ids=["native", "interpolated"])
def test_siglip_matches(siglip, size):
  model, cfg = siglip
  ours = _tower(cfg, ckpt.siglip_from_hf(_state(model), cfg))
  pixels = _images(2, size, size, seed=size)
  with torch.no_grad():
    out = model(torch.from_numpy(pixels), interpolate_pos_encoding=size != cfg.image_size)
  tokens = ours(_nhwc(pixels))
  _check(out.last_hidden_state.numpy(), tokens)
  _check(out.pooler_output.numpy(), ours.pool(tokens))


def _to_big_vision(model, cfg, stacked: bool) -> dict:
  """The inverse of our big_vision key map, from transformers' weights, in
  big_vision's layout: heads split, HWIO conv, `params/img/` prefix."""
  s, d, h = _state(model), cfg.width, cfg.heads
  out = {
    "embedding/kernel": s["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": s["embeddings.patch_embedding.bias"],
    "pos_embedding": s["embeddings.position_embedding.weight"][None],
    "Transformer/encoder_norm/scale": s["post_layernorm.weight"],
    "Transformer/encoder_norm/bias": s["post_layernorm.bias"],
    "MAPHead_0/probe": s["head.probe"],
    "MAPHead_0/LayerNorm_0/scale": s["head.layernorm.weight"],
    "MAPHead_0/LayerNorm_0/bias": s["head.layernorm.bias"],
  }

  def attention(prefix, q, k, v, o, ob):  # torch [out, in] weights and biases
    for name, (w, b) in zip(("query", "key", "value"), (q, k, v)):
      out[f"{prefix}/{name}/kernel"] = w.T.reshape(d, h, -1)
      out[f"{prefix}/{name}/bias"] = b.reshape(h, -1)
    out[f"{prefix}/out/kernel"] = o.T.reshape(h, -1, d)
    out[f"{prefix}/out/bias"] = ob

  def mlp(prefix, src):
    for j, fc in enumerate(("fc1", "fc2")):
      out[f"{prefix}/Dense_{j}/kernel"] = s[f"{src}.{fc}.weight"].T
      out[f"{prefix}/Dense_{j}/bias"] = s[f"{src}.{fc}.bias"]

  w, b = s["head.attention.in_proj_weight"], s["head.attention.in_proj_bias"]
  qkv = [(w[i * d : (i + 1) * d], b[i * d : (i + 1) * d]) for i in range(3)]
  attention("MAPHead_0/MultiHeadDotProductAttention_0", *qkv, *_out(s, "head.attention.out_proj"))
  mlp("MAPHead_0/MlpBlock_0", "head.mlp")
  for i in range(cfg.depth):
    src, dst = f"encoder.layers.{i}", f"Transformer/encoderblock_{i}"
    for j in (1, 2):
      out[f"{dst}/LayerNorm_{j - 1}/scale"] = s[f"{src}.layer_norm{j}.weight"]
      out[f"{dst}/LayerNorm_{j - 1}/bias"] = s[f"{src}.layer_norm{j}.bias"]
    qkv = [_out(s, f"{src}.self_attn.{n}_proj") for n in "qkv"]
    attention(f"{dst}/MultiHeadDotProductAttention_0", *qkv, *_out(s, f"{src}.self_attn.out_proj"))
    mlp(f"{dst}/MlpBlock_0", f"{src}.mlp")
  if stacked:
    looped = [k for k in out if k.startswith("Transformer/encoderblock_0/")]
    for key in looped:
      rest = key[len("Transformer/encoderblock_0/") :]
      layers = [out.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(cfg.depth)]
      out[f"Transformer/encoderblock/{rest}"] = np.stack(layers)
  # What else a SigLIP or PaliGemma file holds beside the image tower.
  extra = {
    "txt/head/kernel": np.zeros((2, 2)),
    "t": np.ones(1),
    "img/head/kernel": np.zeros((d, 4)),
  }
  return {
    **{f"params/img/{k}": v for k, v in out.items()},
    **{f"params/{k}": v for k, v in extra.items()},
  }


def _out(s, name):
  return s[f"{name}.weight"], s[f"{name}.bias"]


@pytest.mark.parametrize("stacked", [False, True], ids=["looped", "scanned"])
def test_siglip_big_vision_npz_matches(siglip, stacked, tmp_path):
  model, cfg = siglip
  path = tmp_path / "siglip.npz"
  np.savez(path, **_to_big_vision(model, cfg, stacked))
  read_cfg = ckpt.siglip_config_from_big_vision(ckpt.read_npz(str(path)))
  assert read_cfg.to_dict() == cfg.to_dict()
  ours = ckpt.tower_from_npz(str(path))
  pixels = _images(2, 32, 32, seed=5)
  with torch.no_grad():
    out = model(torch.from_numpy(pixels))
  tokens = ours(_nhwc(pixels))
  _check(out.last_hidden_state.numpy(), tokens)
  _check(out.pooler_output.numpy(), ours.pool(tokens))


def test_npz_bfloat16_and_bad_checkpoints(siglip, tmp_path):
  model, cfg = siglip
  np.savez(tmp_path / "bf16.npz", a=np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16))
  a = ckpt.read_npz(str(tmp_path / "bf16.npz"))["a"]
  assert a.dtype == ml_dtypes.bfloat16 and a.tolist() == [0, 1, 2]
  state = _state(model)
  with pytest.raises(ConversionError, match="missing.*post_layernorm.bias"):
    ckpt.siglip_from_hf({k: v for k, v in state.items() if k != "post_layernorm.bias"}, cfg)
  with pytest.raises(ConversionError, match="unexpected.*encoder.layers.7"):
    ckpt.siglip_from_hf(
      {**state, "encoder.layers.7.mlp.fc1.bias": state["post_layernorm.bias"]}, cfg
    )
  bigger = cfg.copy_and_resolve_references()
  bigger.image_size = 48
  with pytest.raises(ConversionError, match="position_embedding: checkpoint"):
    ckpt.siglip_from_hf(state, bigger)
  # No head wanted: a checkpoint's MAP head is left out.
  no_head = cfg.copy_and_resolve_references()
  no_head.head = False
  assert "head" not in ckpt.siglip_from_hf(state, no_head)
