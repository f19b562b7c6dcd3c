"""SPHINX-1k: configs/sphinx_kosmos.py's encoder mix on 448 px pictures as 5 views.

`model.vision.views = {"grid": 2, "global": True}` (processing/views.py,
sphinx_pandagpt.md 1.5): each picture is resized to 448 px; a global view
(the picture downsampled to 224) and its four 224 px quadrants, row-major,
each go through every tower and the connector, and each view's 64 slots sit
between the learned start/end tags `view_tags` (trained with the decoder):
5 x (64 + 2) = 330 slots per picture, against SPHINX-1k's 5 x (289 + 2)
= 1455 LLaMA positions (its towers' tokens go to the LLM directly; ours
through the Kosmos-2 connector's 64 latents). Boxes stay in the whole
picture's frame. Four pictures per 2048-token row (1,320 slots).

  kosmos-jax train --config configs/sphinx_kosmos_1k.py --workdir gs://BUCKET/run \\
    --config.init_from=kosmos-2-patch14-224 --config.data.conversations.files=...
"""

from configs import sphinx_kosmos


def get_config():
  config = sphinx_kosmos.get_config()
  config.model.vision.views = {"grid": 2, "global": True}
  config.optim.train_also = [*config.optim.train_also, "view_tags"]
  config.images_per_row = 4  # 4 x 330 slots per 2048-token row
  return config
