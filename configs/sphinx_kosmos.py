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

CLIP, ConvNeXt and DINOv2 frozen as SPHINX freezes its encoders; the
Q-Former, mix projections, connector and decoder train. Tower weights load
with checkpoints/towers.py, convnext.py and qformer.py (transformers and
big_vision formats) into the
`towers/<name>` parameters. One deviation: SPHINX's Q-Former reads BLIP-2's
EVA ViT-g (1408 wide), which is not among our towers; here it reads CLIP's
1024-wide tokens, so its cross-attention keys and values cannot come from the
BLIP-2 release (they train; the rest of the Q-Former loads). Planned, like
configs/kosmos2.py, for a v5e-16: `kosmos-jax aot --config
configs/sphinx_kosmos.py --topology v5e:4x4` compiles it at 6.25 GiB per chip
(arguments 1.59, temporaries 4.66) and 5.5 TFLOP per chip per step; with the
towers trainable (no train_also) the temporaries alone took 30.5 GiB at 16
pictures per row.
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
  # CLIP, ConvNeXt and DINOv2 frozen as SPHINX freezes its encoders: only
  # what follows them trains, so no gradient flows back into the towers and
  # the optimizer keeps state for the trained 1.45B alone.
  config.optim.train_also = [
    "towers/qformer/.*",
    "tower_mix/.*",
    "image_to_text_projection/.*",
    "text_model/.*",
  ]
  config.images_per_row = 8  # conversations: ~8 one-picture samples per 2048-token row
  config.optim.learning_rate = 2e-5  # SPHINX's fine-tuning rate
  config.optim.warmup_steps = 100
  return config
