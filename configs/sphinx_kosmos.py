"""SPHINX's visual encoder mix in front of the Kosmos-2 decoder (sphinx_pandagpt.md 1.4).

CLIP ViT-L/14 (the release's `vision_model`), ConvNeXt-XXLarge (open_clip's
trunk: 256 px, an 8 x 8 map upsampled to CLIP's 16 x 16, the mean token
first), DINOv2 ViT-g/14 (class token + 256 patches after its norm): the three
grids concatenated on channels (1024 + 3072 + 1536 = 5632) -> Dense + LayerNorm
to 2048 ("channel mix"); BLIP-2's EVA ViT-g/14 (transformers'
Blip2VisionModel: 39 blocks of 1408, 257 tokens after `post_layernorm`, CLIP's
normalisation) feeds BLIP-2's Q-Former only (channel_mix False, as SPHINX),
whose 32 tokens go first ("spatial mix"); the released connector then makes
the 64 image slots (models/mixing.py). Grounding stays Kosmos-2's: location
tokens, `<phrase>`.

  kosmos-jax train --config configs/sphinx_kosmos.py --workdir gs://BUCKET/run \\
    --config.init_from=kosmos-2-patch14-224 --config.data.conversations.files=...

CLIP, ConvNeXt, DINOv2 and EVA frozen as SPHINX freezes its encoders; the
Q-Former, mix projections, connector and decoder train (1.48B of 4.75B
parameters: `kosmos-jax summary` counts 4,748,984,192). Tower weights load
with checkpoints/towers.py and big_vision.py (EVA: `eva_from_hf` on a Salesforce/blip2-* file's
`vision_model.`), convnext.py and qformer.py (transformers and big_vision
formats) into the `towers/<name>` parameters; EVA and the Q-Former both come
from the same BLIP-2 release. Planned, like configs/kosmos2.py, for a
v5e-16: `kosmos-jax aot --config configs/sphinx_kosmos.py --topology v5e:4x4`
compiles it at 6.48 GiB per chip (arguments 1.82, temporaries 4.66; 6.25
before EVA was added).
"""

from configs import kosmos2
from kosmos_jax.models import convnext, qformer, towers


def get_config():
  config = kosmos2.get_config()
  # The Q-Former reads BLIP-2's EVA ViT-g (1408 wide), its own release's
  # input, so it loads whole from Salesforce/blip2-*; EVA feeds it only.
  q_former = qformer.qformer_config(encoder_hidden_size=1408, dropout=0.0, attention_dropout=0.0)
  q_former.input = "eva"
  config.model.towers = {
    "convnext": convnext.convnext_config("xxlarge"),
    "dinov2": towers.dinov2_config("g/14"),
    "eva": towers.eva_config("g/14", channel_mix=False),
    "qformer": q_former,
  }
  # CLIP, ConvNeXt, DINOv2 and EVA frozen as SPHINX freezes its encoders:
  # only what follows them trains, so no gradient flows back into the towers
  # and the optimizer keeps state for the trained 1.48B alone.
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
