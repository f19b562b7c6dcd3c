"""DINOv2, SigLIP, ViT and EVA towers equal transformers' Dinov2Model /
SiglipVisionModel / ViTModel / Blip2VisionModel on random tiny weights, loaded
from their state dicts and from big_vision (and vision_transformer) npz."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from kosmos_jax.checkpoints import big_vision
from kosmos_jax.checkpoints import towers as ckpt
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import mixing, towers
from tests.helpers import parity

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
  parity.assert_close(ref, got, TOL)


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
  read_cfg = big_vision.siglip_config_from_big_vision(big_vision.read_npz(str(path)))
  assert read_cfg.to_dict() == cfg.to_dict()
  ours = big_vision.tower_from_npz(str(path))
  pixels = _images(2, 32, 32, seed=5)
  with torch.no_grad():
    out = model(torch.from_numpy(pixels))
  tokens = ours(_nhwc(pixels))
  _check(out.last_hidden_state.numpy(), tokens)
  _check(out.pooler_output.numpy(), ours.pool(tokens))


def test_npz_bfloat16_and_bad_checkpoints(siglip, tmp_path):
  model, cfg = siglip
  np.savez(tmp_path / "bf16.npz", a=np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16))
  a = big_vision.read_npz(str(tmp_path / "bf16.npz"))["a"]
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


# --------------------------------------------------------------------------- ViT


def _vit(**kw):
  hf = transformers.ViTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    attn_implementation="eager",
    **kw,
  )
  return _randomize(transformers.ViTModel(hf, add_pooling_layer=False), seed=3)


@pytest.fixture(scope="module")
def vit():
  """transformers' defaults: exact GELU, LayerNorm eps 1e-12."""
  model = _vit()
  cfg = ckpt.vit_config_from_hf(model.config.to_dict())
  return model, cfg, _tower(cfg, ckpt.vit_from_hf(_state(model), cfg))


@pytest.fixture(scope="module")
def vit_bv():
  """big_vision's graph: flax's tanh GELU, LayerNorm eps 1e-6."""
  return _vit(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def test_vit_config():
  cfg = towers.vit_config("B/16")
  assert (cfg.kind, cfg.mlp, cfg.class_token, cfg.layer_scale, cfg.head) == (
    "vit",
    "gelu",
    True,
    None,
    False,
  )
  sizes = [np.prod(x.shape) for x in jax.tree.leaves(towers.abstract_params(cfg))]
  assert sum(sizes) == 85_798_656  # ViT-B/16 without its classifier
  assert mixing.NORMALISATION["vit"] == ((0.5,) * 3, (0.5,) * 3)
  tiny = towers.vit_config("Ti/16", depth=1, image_size=32)
  built = nnx.eval_shape(lambda: mixing._build(tiny, dict(rngs=nnx.Rngs(0))))
  assert isinstance(built, towers.VisionTower)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)], ids=["native", "interpolated"])
def test_vit_matches(vit, size):
  model, cfg, ours = vit
  assert cfg.layer_norm_eps == 1e-12 and cfg.class_token
  pixels = _images(2, *size, seed=sum(size))
  with torch.no_grad():
    out = model(torch.from_numpy(pixels), interpolate_pos_encoding=size != (32, 32))
  _check(out.last_hidden_state.numpy(), ours(_nhwc(pixels)))


def test_vit_hf_legacy_keys_and_dir(vit, tmp_path):
  model, cfg, ours = vit
  state, legacy = _state(model), {}
  for key, value in state.items():  # transformers v4's ViTForImageClassification names
    key = key.replace("layers.", "encoder.layer.").replace("mlp.fc1", "intermediate.dense")
    key = key.replace("mlp.fc2", "output.dense").replace(
      "attention.o_proj", "attention.output.dense"
    )
    for x, name in zip("qkv", ("query", "key", "value")):
      key = key.replace(f"attention.{x}_proj", f"attention.attention.{name}")
    legacy["vit." + key] = value
  legacy["vit.pooler.dense.bias"] = legacy["classifier.bias"] = np.zeros(cfg.width)
  np.testing.assert_equal(ckpt.vit_from_hf(state, cfg), ckpt.vit_from_hf(legacy, cfg))
  model.save_pretrained(tmp_path)
  loaded = ckpt.tower_from_hf_dir(str(tmp_path))
  assert loaded.cfg.to_dict() == cfg.to_dict()
  # The same config and parameters as `ours` (whose outputs test_vit_matches checks).
  state_of = lambda tower: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(tower)))
  np.testing.assert_equal(state_of(loaded), state_of(ours))


def _vit_to_npz(model, naming: str, stacked: bool) -> dict:
  """transformers' ViT weights in big_vision's layout ("big_vision": positions
  without a class-token row, that row folded into `cls`, under `img/`) or
  google-research/vision_transformer's (pre-linen block names, the class row
  in `Transformer/posembed_input`, at the root)."""
  s, cfg = _state(model), model.config
  d, h = cfg.hidden_size, cfg.num_attention_heads
  old = naming == "vision_transformer"
  pos, cls = s["embeddings.position_embeddings"], s["embeddings.cls_token"]
  out = {
    "embedding/kernel": s["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": s["embeddings.patch_embeddings.projection.bias"],
    "Transformer/encoder_norm/scale": s["layernorm.weight"],
    "Transformer/encoder_norm/bias": s["layernorm.bias"],
    # Classifier layers after the tower, ignored by the loader.
    "pre_logits/kernel": np.zeros((d, d)),
    "head/kernel": np.zeros((d, 5)),
  }
  if old:
    out["cls"], out["Transformer/posembed_input/pos_embedding"] = cls, pos
  else:  # big_vision adds positions before the class token: exact, as constants
    out["cls"], out["pos_embedding"] = cls + pos[:, :1], pos[:, 1:]
  ln0, attn, ln1, mlp = (
    ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if old
    else ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  )
  for i in range(cfg.num_hidden_layers):
    src, dst = f"layers.{i}", f"Transformer/encoderblock_{i}"
    for norm, theirs in ((ln0, "layernorm_before"), (ln1, "layernorm_after")):
      out[f"{dst}/{norm}/scale"] = s[f"{src}.{theirs}.weight"]
      out[f"{dst}/{norm}/bias"] = s[f"{src}.{theirs}.bias"]
    for x, name in zip("qkv", ("query", "key", "value")):
      out[f"{dst}/{attn}/{name}/kernel"] = s[f"{src}.attention.{x}_proj.weight"].T.reshape(d, h, -1)
      out[f"{dst}/{attn}/{name}/bias"] = s[f"{src}.attention.{x}_proj.bias"].reshape(h, -1)
    out[f"{dst}/{attn}/out/kernel"] = s[f"{src}.attention.o_proj.weight"].T.reshape(h, -1, d)
    out[f"{dst}/{attn}/out/bias"] = s[f"{src}.attention.o_proj.bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      out[f"{dst}/{mlp}/Dense_{j}/kernel"] = s[f"{src}.mlp.{fc}.weight"].T
      out[f"{dst}/{mlp}/Dense_{j}/bias"] = s[f"{src}.mlp.{fc}.bias"]
  if stacked:
    for key in [k for k in out if k.startswith("Transformer/encoderblock_0/")]:
      rest = key[len("Transformer/encoderblock_0/") :]
      layers = [
        out.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(cfg.num_hidden_layers)
      ]
      out[f"Transformer/encoderblock/{rest}"] = np.stack(layers)
  return out if old else {f"img/{k}": v for k, v in out.items()}


@pytest.mark.parametrize(
  "naming, stacked",
  [("big_vision", True), ("vision_transformer", False)],
  ids=["big_vision-scanned", "vision_transformer-looped"],
)
def test_vit_npz_matches(vit_bv, naming, stacked, tmp_path):
  path = tmp_path / "vit.npz"
  np.savez(path, **_vit_to_npz(vit_bv, naming, stacked))
  cfg = big_vision.vit_config_from_big_vision(big_vision.read_npz(str(path)))
  assert cfg.to_dict() == ckpt.vit_config_from_hf(vit_bv.config.to_dict()).to_dict()
  ours = big_vision.tower_from_npz(str(path))
  assert ours.cfg.kind == "vit"
  pixels = _images(2, 32, 32, seed=9)
  with torch.no_grad():
    ref = vit_bv(torch.from_numpy(pixels)).last_hidden_state.numpy()
  _check(ref, ours(_nhwc(pixels)))


def test_vit_bad_npz(vit_bv):
  arrays = _vit_to_npz(vit_bv, "big_vision", stacked=False)
  cfg = big_vision.vit_config_from_big_vision(arrays)
  gone = {k: v for k, v in arrays.items() if not k.endswith("encoderblock_1/LayerNorm_1/bias")}
  with pytest.raises(ConversionError, match=r"missing \(1\).*encoderblock_1/LayerNorm_1/bias"):
    big_vision.vit_from_big_vision(gone, cfg)
  key = "img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"
  wrong = {**arrays, key: arrays[key][:, :-1]}
  with pytest.raises(ConversionError, match=r"encoderblock_1/MlpBlock_0/Dense_0/kernel -> "):
    big_vision.vit_from_big_vision(wrong, cfg)
  with pytest.raises(ConversionError, match="class-token row, but there is no `cls`"):
    big_vision.vit_config_from_big_vision(
      {k: v for k, v in _vit_to_npz(vit_bv, "vision_transformer", False).items() if k != "cls"}
    )
  both = {**arrays, "img/Transformer/posembed_input/pos_embedding": arrays["img/pos_embedding"]}
  with pytest.raises(ConversionError, match="one position table"):
    big_vision.vit_config_from_big_vision(both)
  assert big_vision.npz_kind(arrays) == "vit"
  assert big_vision.npz_kind({k: v for k, v in arrays.items() if k != "img/cls"}) == "siglip"


# --------------------------------------------------------------------------- EVA (BLIP-2)


def _eva_hf_config():
  return transformers.Blip2VisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
    attn_implementation="eager",
  )


@pytest.fixture(scope="module")
def eva():
  """BLIP-2's vision model; the key bias zero as in the releases (transformers'
  conversion writes qkv.bias = [q_bias; 0; v_bias])."""
  model = _randomize(transformers.Blip2VisionModel(_eva_hf_config()), seed=4)
  with torch.no_grad():
    for layer in model.encoder.layers:
      layer.self_attn.qkv.bias[32:64] = 0.0
  cfg = ckpt.eva_config_from_hf(model.config.to_dict())
  return model, cfg, _tower(cfg, ckpt.eva_from_hf(_state(model), cfg))


def test_eva_config():
  cfg = towers.eva_config("g/14")
  assert (cfg.kind, cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch_size) == (
    "eva",
    1408,
    39,
    16,
    6144,
    14,
  )
  assert (cfg.mlp, cfg.class_token, cfg.layer_norm_eps, cfg.channel_mix) == (
    "gelu",
    True,
    1e-6,
    True,
  )
  with torch.device("meta"):  # shapes only: BLIP-2's 1B-parameter tower, unallocated
    reference = transformers.Blip2VisionModel(transformers.Blip2VisionConfig())
  sizes = [np.prod(x.shape) for x in jax.tree.leaves(towers.abstract_params(cfg))]
  assert sum(sizes) == sum(p.numel() for p in reference.parameters()) == 985_952_256
  assert ckpt.eva_config_from_hf(transformers.Blip2Config().to_dict()).to_dict() == cfg.to_dict()
  assert mixing.NORMALISATION["eva"] == (mixing.CLIP_MEAN, mixing.CLIP_STD)
  tiny = towers.eva_config(width=16, depth=1, heads=2, mlp_dim=32, image_size=28)
  built = nnx.eval_shape(lambda: mixing._build(tiny, dict(rngs=nnx.Rngs(0))))
  assert isinstance(built, towers.VisionTower)


@pytest.mark.parametrize("size", [28, 42], ids=["native", "interpolated"])
def test_eva_matches(eva, size):
  model, cfg, ours = eva
  pixels = _images(2, size, size, seed=size + 1)
  with torch.no_grad():
    out = model(torch.from_numpy(pixels), interpolate_pos_encoding=size != cfg.image_size)
  tokens = ours(_nhwc(pixels))
  assert tokens.shape == (2, 1 + (size // 14) ** 2, 32)
  _check(out.last_hidden_state.numpy(), tokens)


def _blip2_extras():
  """What a Blip2ForConditionalGeneration file holds beside `vision_model.`."""
  return {
    "query_tokens": np.zeros((1, 4, 8), np.float32),
    "qformer.layernorm.weight": np.ones(8, np.float32),
    "language_projection.weight": np.zeros((16, 8), np.float32),
    "language_model.lm_head.weight": np.zeros((10, 16), np.float32),
  }


def test_eva_loads_from_blip2_files(eva, tmp_path):
  model, cfg, ours = eva
  state = _state(model)
  bare = ckpt.eva_from_hf(state, cfg)
  whole = {**{f"vision_model.{k}": v for k, v in state.items()}, **_blip2_extras()}
  np.testing.assert_equal(ckpt.eva_from_hf(whole, cfg), bare)
  # LAVIS's names (q_bias and v_bias apart, no key bias) load the same.
  lavis = dict(state)
  for i in range(cfg.depth):
    fused = lavis.pop(f"encoder.layers.{i}.self_attn.qkv.bias")
    lavis[f"encoder.layers.{i}.self_attn.q_bias"] = fused[:32]
    lavis[f"encoder.layers.{i}.self_attn.v_bias"] = fused[64:]
  np.testing.assert_equal(ckpt.eva_from_hf(lavis, cfg), bare)
  # A whole BLIP-2 snapshot: config.json's vision_config, only vision_model.* read.
  blip2 = transformers.Blip2Config(vision_config=model.config.to_dict()).to_dict()
  (tmp_path / "blip2").mkdir()
  (tmp_path / "blip2" / "config.json").write_text(json.dumps(blip2, default=str))
  safetensors.numpy.save_file(whole, str(tmp_path / "blip2" / "model.safetensors"))
  pixels = _nhwc(_images(1, 28, 28, seed=11))
  loaded = ckpt.tower_from_hf_dir(str(tmp_path / "blip2"))
  assert loaded.cfg.to_dict() == cfg.to_dict()
  np.testing.assert_array_equal(loaded(pixels), ours(pixels))
  model.save_pretrained(tmp_path / "vision")  # a bare Blip2VisionModel
  np.testing.assert_array_equal(
    ckpt.tower_from_hf_dir(str(tmp_path / "vision"))(pixels), ours(pixels)
  )


def test_eva_bad_checkpoints(eva):
  model, cfg, _ = eva
  state = _state(model)
  with pytest.raises(ConversionError, match=r"missing \(1\).*encoder.layers.1.layer_norm2.bias"):
    ckpt.eva_from_hf(
      {k: v for k, v in state.items() if k != "encoder.layers.1.layer_norm2.bias"}, cfg
    )
  with pytest.raises(ConversionError, match="unexpected.*encoder.layers.2.mlp.fc1.bias"):
    ckpt.eva_from_hf({**state, "encoder.layers.2.mlp.fc1.bias": state["post_layernorm.bias"]}, cfg)
  key = "encoder.layers.1.self_attn.qkv.weight"
  with pytest.raises(
    ConversionError, match=f"{key} -> layers/attn/v_proj/kernel: checkpoint \\(80, 32\\)"
  ):
    ckpt.eva_from_hf({**state, key: state[key][:80]}, cfg)  # v rows cut short
  half = {k: v for k, v in state.items() if "layers.0.self_attn.qkv.bias" not in k}
  half["encoder.layers.0.self_attn.q_bias"] = np.zeros(32, np.float32)  # no v_bias beside it
  with pytest.raises(
    ConversionError, match=r"(?s)missing.*layers.0.self_attn.qkv.bias.*unexpected.*q_bias"
  ):
    ckpt.eva_from_hf(half, cfg)
  with pytest.raises(ConversionError, match="no 'embeddings.class_embedding' under"):
    ckpt.eva_from_hf({"qformer.layernorm.weight": np.ones(8)}, cfg)
  with pytest.raises(ConversionError, match="qkv_bias=False is not supported"):
    ckpt.eva_config_from_hf({**model.config.to_dict(), "qkv_bias": False})
  with pytest.raises(ConversionError, match="model_type 'vit' is not a BLIP-2 model"):
    ckpt.eva_config_from_hf({"model_type": "vit"})
