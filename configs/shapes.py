"""`make demo`: a small Kosmos-2 trained from scratch on the shapes mixture on CPU.

Aim: REC accuracy (IoU >= 0.5, greedy output) on 500 held-out pictures within
15 minutes on 2 cores, data, training and evaluation included. Choices:
  data     `shapes_demo_mix` (registered from `data.shapes_tasks` below): 64 px pictures, a
           16 x 16 location grid (4 px cells: decoded boxes reach IoU >= 0.5
           on 99.9% of the reference boxes, an 8 x 8 grid only on 86%), and
           REC-heavy rates (REC examples carry the expression -> box signal
           the demo measures; grit grounds phrases in captions; captions
           and interleaved documents are rare, since they teach no boxes:
           caption 1 -> 0.5 and interleaved 0.5 -> 0.1 took the demo from
           0.807 to 0.819).
  model    ViT with 8 px patches (8 x 8 tokens; a shape spans 2-3 of them),
           16 latents, narrow 3-layer towers: on 2 cores a step costs about
           0.21 s (data included), so 3000 steps take about 11 minutes.
  rows     REC examples are ~35 tokens with one picture, grit ~63: 128-token
           rows with up to 3 pictures pack 2-3 sequences with little waste.
  init     from scratch, the released inits leave the image slots nearly
           constant and the decoder learns to ignore them. Three init knobs
           (models/config.py), each measured on 1,500 steps of REC-only data
           (rec_accuracy on 200 held-out pictures; location-token CE):
           2-D sin-cos ViT positions and the "scaled" connector with std-0.02
           latents: 0.092 (CE 3.32) against 0.022 (3.53) as released; plus
           sin-cos location-token embeddings: 0.378 (2.83); plus std-1
           latents, the "scaled" connector now, whose slots learn to attend
           to their own part of the picture: 0.445 (2.02).
  optim    peak rate 5e-4 after a short warmup, no dropout or weight decay
           (the run sees each training picture a few times). The peak rate
           decides when the decoder starts to read the picture, and the
           window is narrow (same 1,500-step REC-only runs): 3e-4 0.458,
           5e-4 0.639, 7e-4 0.458, 1e-3 0.445, 1.5e-3 0.075 (the decoder
           never leaves the language prior; nor at 1e-3 with a batch of 8).
           Seeds scatter such short runs (5e-4, seed 1: 0.741); the demo
           itself gave 0.819 (seed 0) and 0.830 (seed 1), and 0.812 (seed 0)
           since the loss's one-hot target select changed its rounding.
  budget   over it (README, "Two commands"): 579 s here (peak 466-482 GFLOP/s) is
           1943 s normalised to 140 GFLOP/s, against 900. At the budget's compute
           (about 260 s of training here) this config gives 0.286 (1200 steps).
           `rec_per_image` (all of a picture's expressions in one sequence) with
           `use_box_prob=1` (every grit caption grounded) gave 0.410 at the same
           1200 steps; the same data at batch 8 x 2400 steps 0.711, batch 4 x
           4800 steps 0.721, but the same batch-4 run with other float rounding
           (XLA's single-threaded CPU matmuls) 0.439: at this compute the run sits
           on the step where the decoder starts to read the picture, and rounding
           decides whether it gets there. Captions (the shape's kind, which REC
           seldom needs: the colour usually names one shape) stay at 0.05-0.17.
           So the defaults stay until a change moves that step reliably earlier.
"""

from kosmos_jax.config import experiment_config
from kosmos_jax.models.config import model_config


def get_config():
  config = experiment_config(
    model_config(
      **{
        "vision.image_size": 64,
        "vision.patch_size": 8,
        "vision.width": 96,
        "vision.depth": 3,
        "vision.heads": 4,
        "vision.mlp_dim": 192,
        "text.vocab_size": 387,
        "text.width": 128,
        "text.depth": 3,
        "text.heads": 4,
        "text.ffn_dim": 512,
        "text.max_positions": 256,
        "text.dropout": 0.0,
        "text.attention_dropout": 0.0,
        "latent_query_num": 16,
        "vision.position_init": "sincos2d",
        "connector_init": "scaled",
        "text.num_patches_per_side": 16,
        "text.location_init": "sincos2d",
      }
    )
  )
  # 1000 held-out pictures for the REC score. Interleaved documents (three
  # pictures, a whole 128-token row each) stay rare: at rate 0.5 they took
  # ~10% of the tokens and picture slots of the run.
  config.data.shapes_tasks = dict(
    prefix="shapes_demo",
    image_size=64,
    num_image_tokens=16,
    num_patches_per_side=16,
    config=dict(name="64_demo", image_size=64, num_train=20000, num_test=1000),
    rates=dict(rec=10, grit=3, caption=0.5, text=0.5, interleaved=0.1),
    # Off: measured at the budget's compute only (see "budget" above).
    use_box_prob=0.5,
    rec_per_image=False,
  )
  config.data.mixture = "shapes_demo_mix"
  config.rec.task = "shapes_demo_rec"
  config.rec.num_images = 500
  config.batch_size = 16
  config.seq_len = 128
  config.images_per_row = 3
  config.total_steps = 3000
  config.log_every = 50
  config.checkpoint_every = 3000
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.0
  return config
