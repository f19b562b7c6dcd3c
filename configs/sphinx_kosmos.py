"""SPHINX's visual encoder mix in front of the Kosmos-2 decoder (sphinx_pandagpt.md 1.4).

CLIP ViT-L/14 (the release's `vision_model`), ConvNeXt-XXLarge (open_clip's
trunk: 256 px, an 8 x 8 map upsampled to CLIP's 16 x 16, the mean token
first), DINOv2 ViT-g/14 (class token + 256 patches after its norm): the three
grids concatenated on channels (1024 + 3072 + 1536 = 5632) -> Dense + LayerNorm
to 2048 ("channel mix"); BLIP-2's Q-Former gives 32 tokens that go first
("spatial mix"); the released connector then makes the 64 image slots
(models/mixing.py). Grounding stays Kosmos-2's: location tokens, `<phrase>`.

  kosmos-jax train --config configs/sphinx_kosmos.py --workdir gs://BUCKET/run \\
    --config.init_from=kosmos-2-patch14-224 --config.data.conversations.files=...

Towers and CLIP frozen as SPHINX freezes its encoders; the mix projections,
connector and decoder train. Tower weights load with checkpoints/towers.py,
convnext.py and qformer.py (transformers and big_vision formats) into the
`towers/<name>` parameters. One deviation: SPHINX's Q-Former reads BLIP-2's
EVA ViT-g (1408 wide), which is not among our towers; here it reads CLIP's
1024-wide tokens, so its cross-attention keys and values cannot come from the
BLIP-2 release (they train; the rest of the Q-Former loads). Planned for a
v5e-32 (`kosmos-jax aot --config configs/sphinx_kosmos.py --topology v5e:4x8`;
numbers in README.md).
"""

from configs import kosmos2
from kosmos_jax.models import convnext, qformer, towers


def get_config():
  config = kosmos2.get_config()
  config.model.towers = {
    "convnext": convnext.convnext_config("xxlarge"),
    "dinov2": towers.dinov2_config("g/14"),
    "qformer": qformer.qformer_config(encoder_hidden_size=1024, dropout=0.0, attention_dropout=0.0),
  }
  config.optim.freeze = ["vision_model/.*", "towers/(convnext|dinov2)/.*"]
  config.optim.learning_rate = 2e-5  # SPHINX's fine-tuning rate
  config.optim.warmup_steps = 100
  return config
