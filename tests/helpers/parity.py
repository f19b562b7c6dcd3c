"""Shared by the tower parity tests: random torch weights and a relative check."""

import numpy as np


def randomize(model, seed: int):
  """Every parameter of a torch model random with O(1) activations (no
  trivial 0 or 1): norm scales and layer scales near 1, matrices scaled by
  fan-in, other vectors small; the model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layer_scale_parameter") or ("norm" in name and name.endswith("weight")):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim >= 2:
        p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def assert_close(ref, got, tol: float) -> None:
  """Max abs difference relative to the reference's largest value < tol."""
  ref, got = np.asarray(ref), np.asarray(got)
  assert got.shape == ref.shape
  scale = float(np.abs(ref).max())
  assert scale > 0.5  # not a comparison between near-zeros
  err = float(np.abs(ref - got).max())
  assert err / scale < tol, f"max abs diff {err:.2e}, relative {err / scale:.2e}"
