"""`kosmos-jax mix`: SPHINX's beta * A + (1 - beta) * B, tensor by tensor."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import kosmos_jax
from kosmos_jax import commands
from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import lora as lora_ckpt
from kosmos_jax.checkpoints import mix as mix_lib
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build, lora
from kosmos_jax.train import optim
from kosmos_jax.train import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(*overrides):
  return config_lib.load(str(ROOT / "configs/tiny.py"), list(overrides))


def _random(abstract: dict, seed: int) -> dict:
  """Normal(0, 1) values of the shapes of `abstract`: a tiny random model
  without building it (eager construction takes seconds)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), abstract)


def _save(path, model_config, seed: int, dtype=np.float32) -> dict:
  params = _random(build.abstract_params(model_config), seed)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  orbax_ckpt.save_params(str(path), model_config, params)
  return params


def _load(path) -> dict:
  model_config = orbax_ckpt.load_config(str(path))
  return orbax_ckpt.load_params(str(path), build.abstract_params(model_config))


def _flat(tree: dict) -> dict:
  return {
    jax.tree_util.keystr(k, simple=True, separator="/"): v
    for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _bits(x: np.ndarray) -> np.ndarray:
  return np.asarray(x).view(np.uint8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """Checkpoints A (with a sidecar file) and B of the tiny model, other seeds."""
  root = tmp_path_factory.mktemp("mix")
  model_config = _config().model
  params_a = _save(root / "a", model_config, seed=1)
  params_b = _save(root / "b", model_config, seed=2)
  (root / "a" / "generation_config.json").write_text('{"max_new_tokens": 7}')
  return dict(root=root, a=str(root / "a"), b=str(root / "b"), pa=params_a, pb=params_b)


def test_the_cli_writes_the_formula_as_a_checkpoint(pair, capsys):
  out = pair["root"] / "cli"
  commands.main(
    ["mix", "--checkpoint", pair["a"], "--checkpoint", pair["b"], "--beta", "0.6"]
    + ["--out", str(out)]
  )
  summary = json.loads(capsys.readouterr().out)
  n = len(jax.tree.leaves(pair["pa"]))
  assert summary == {
    "mixed": n,
    "copied": 0,
    "beta": 0.6,
    "out": str(out),
    "sidecars": ["generation_config.json"],
  }
  got = _flat(_load(out))
  for name, a in _flat(pair["pa"]).items():
    b = _flat(pair["pb"])[name]
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], 0.6 * a + (1 - 0.6) * b, err_msg=name)
  model = kosmos_jax.from_pretrained(str(out))
  assert model.generation_config.max_new_tokens == 7
  assert not list(out.glob(".mix-*"))  # the partial write's scratch is gone
  assert (out / "params" / "_CHECKPOINT_METADATA").exists()  # as save_params writes it


def test_beta_one_and_zero_copy_a_side_bitwise(pair):
  for beta, want in ((1.0, pair["pa"]), (0.0, pair["pb"])):
    out = pair["root"] / f"end{beta}"
    mix_lib.mix(pair["a"], pair["b"], str(out), beta)
    got = _flat(_load(out))
    for name, value in _flat(want).items():
      np.testing.assert_array_equal(_bits(got[name]), _bits(value), err_msg=name)


def test_a_bfloat16_side_mixes_in_float32_and_keeps_its_dtype(pair):
  # param_dtype is numerics: checkpoints that differ in it still mix.
  model_config = _config("model.param_dtype=bfloat16").model
  a = _save(pair["root"] / "a16", model_config, seed=1, dtype=ml_dtypes.bfloat16)
  out = pair["root"] / "mix16"
  mix_lib.mix(pair["root"] / "a16", pair["b"], str(out), 0.3)
  assert orbax_ckpt.load_config(str(out)).param_dtype == "bfloat16"
  got = _flat(_load(out))
  for name, value in _flat(a).items():
    want = (0.3 * value.astype(np.float32) + (1 - 0.3) * _flat(pair["pb"])[name]).astype(
      ml_dtypes.bfloat16
    )
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(_bits(got[name]), _bits(want), err_msg=name)


def test_only_mixes_the_matching_parameters(pair):
  out = pair["root"] / "decoder"
  result = mix_lib.mix(pair["a"], pair["b"], str(out), 0.5, only=["text_model/.*"])
  got, a, b = _flat(_load(out)), _flat(pair["pa"]), _flat(pair["pb"])
  text = [n for n in a if n.startswith("text_model/")]
  assert (result["mixed"], result["copied"]) == (len(text), len(a) - len(text))
  for name in a:
    want = 0.5 * a[name] + 0.5 * b[name] if name in text else a[name]
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  with pytest.raises(mix_lib.MixError, match=r"\['text_model/fc9/.*'\]: matches no parameter"):
    mix_lib.mix(pair["a"], pair["b"], str(out), 0.5, only=["text_model/.*", "text_model/fc9/.*"])
  with pytest.raises(mix_lib.MixError, match=r"--only '\(': not a regular expression"):
    mix_lib.mix(pair["a"], pair["b"], str(out), 0.5, only=["("])


def test_a_lora_workdir_mixes_with_its_adapters_merged(pair):
  """A workdir as the trainer leaves it (config.json, the manager's step
  holding the TrainState), made by hand: training would take a minute."""
  config = _config("lora.rank=4")
  model = lora.abstract_model(config.model, config.lora, config.seed)
  state = nnx.state(model, nnx.Param)
  # Random adapters (lora_b starts at zero): the merge must show in the mix.
  nnx.replace_by_pure_dict(state, _random(nnx.to_pure_dict(state), seed=3))
  train_state = state_lib.create(state, optim.optimizer(config.optim, config.total_steps), 0)
  workdir = pair["root"] / "run"
  workdir.mkdir()
  (workdir / orbax_ckpt.WORKDIR_CONFIG_FILE).write_text(config.to_json(indent=2))
  with orbax_ckpt.checkpoint_manager(workdir) as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state)))
    manager.wait_until_finished()

  out = pair["root"] / "from_run"
  mix_lib.mix(f"{workdir}@3", pair["b"], str(out), 0.25)
  abstract = build.abstract_params(config.model)
  merged = _flat(lora_ckpt.workdir_params(workdir, config.model, abstract, 3))
  got, b = _flat(_load(out)), _flat(pair["pb"])
  assert got.keys() == b.keys()
  for name, value in merged.items():
    np.testing.assert_array_equal(got[name], 0.25 * np.asarray(value) + 0.75 * b[name], name)


def test_checkpoints_of_different_models_are_listed(pair):
  _save(pair["root"] / "wide", _config("model.text.ffn_dim=96").model, seed=2)
  with pytest.raises(mix_lib.MixError) as e:
    mix_lib.mix(pair["a"], pair["root"] / "wide", str(pair["root"] / "x"), 0.5)
  message = str(e.value)
  assert "config text.ffn_dim: 128 vs 96" in message
  assert "text_model/layers/fc1/kernel: A (2, 64, 128) vs B (2, 64, 96)" in message
  assert "\n" not in message and "more" not in message
  _save(pair["root"] / "narrow", _config("model.text.width=32").model, seed=2)
  with pytest.raises(mix_lib.MixError, match=r"\(\d\d+ differences\).*; and \d+ more$"):
    mix_lib.mix(pair["a"], pair["root"] / "narrow", str(pair["root"] / "x"), 0.5)
  assert not (pair["root"] / "x").exists()


def test_beta_outside_the_unit_interval_needs_extrapolate(pair):
  out = str(pair["root"] / "far")
  for beta in (1.5, -0.1, float("nan")):
    with pytest.raises(mix_lib.MixError, match=r"must lie in \[0, 1\]"):
      mix_lib.mix(pair["a"], pair["b"], out, beta)
  mix_lib.mix(pair["a"], pair["b"], out, 1.5, extrapolate=True, only=["text_model/embed_tokens"])
  a, b = _flat(pair["pa"])["text_model/embed_tokens"], _flat(pair["pb"])["text_model/embed_tokens"]
  np.testing.assert_array_equal(_flat(_load(out))["text_model/embed_tokens"], 1.5 * a - 0.5 * b)
  with pytest.raises(mix_lib.MixError, match="overlaps the input"):
    mix_lib.mix(pair["a"], pair["b"], pair["a"], 0.5)


def test_cli_mistakes_end_in_one_line_and_status_2(pair, capsys):
  hf_dir = pair["root"] / "snapshot"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text("{}")
  both = ["--checkpoint", pair["a"], "--checkpoint", pair["b"]]
  cases = {
    "--beta 1.5: must lie in [0, 1]": [*both, "--beta", "1.5"],
    "--checkpoint: give it twice": ["--checkpoint", pair["a"], "--beta", "0.5"],
    "a Hugging Face snapshot; convert it first": [
      *both[:2],
      *["--checkpoint", str(hf_dir), "--beta", "0.5"],
    ],
  }
  for expected, argv in cases.items():
    with pytest.raises(SystemExit) as e:
      commands.main(["mix", *argv, "--out", str(pair["root"] / "bad")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kosmos-jax mix: error: ") and err.count("\n") == 1, err
    assert expected in err
