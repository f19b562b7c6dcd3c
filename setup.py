"""kosmos-jax: KOSMOS-1/2 grounded multimodal LLMs in JAX/Flax for TPUs.

Every dependency is pinned: a fresh machine must reproduce the exact stack that
was checked together (Python 3.11; see shared/DESIGN.md "Environment facts").
"""

import setuptools

INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "chex==0.1.92",
  "seqio==0.0.20",
  "tensorflow==2.21.0",
  "tensorflow-text==2.21.1",
  "tensorflow-datasets==4.9.10",
  "ml-collections==1.1.0",
  "safetensors==0.8.0",
  "numpy==2.4.6",
  "ml-dtypes==0.6.0",
  "pillow==13.0.0",
  "tqdm==4.70.1",
  "sentencepiece==0.2.3",
  "pyarrow==26.0.1",
  "clu==0.0.12",
  "tensorboard==2.21.0",
  # COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr); its tokenizer and METEOR need Java.
  "pycocoevalcap==1.2",
  "pycocotools==2.0.11",
]

EXTRAS_REQUIRE = {
  # The reference implementation we test parity against, and the AOT TPU compiler.
  "test": [
    "torch==2.13.0",  # CPU build; a looser pin pulls several GB of CUDA wheels.
    "transformers==5.23.0",
    "peft==0.18.0",  # loads our LoRA export onto transformers' Kosmos-2 in the tests
    "accelerate==1.15.0",  # peft's dependency, pinned so a fresh machine gets the tested one
    "libtpu==0.0.51",
    "pytest==9.0.1",
    "ruff==0.17.5",  # formatter and linter (ruff.toml), checked by `make test`
    "nbclient==0.11.0",  # executes the Colab notebook in the tests
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
    # The browser test of `kosmos-jax serve`'s page; it drives Debian's Chromium
    # (`make test` installs it), so no `playwright install` download is needed.
    "playwright==1.65.2",
    "greenlet==3.5.6",
  ],
  "tpu": ["libtpu==0.0.51"],
  "gpu": ["jax[cuda12]==0.10.2"],
}

setuptools.setup(
  name="kosmos-jax",
  version="0.1.0",
  description="KOSMOS-1/2 grounded multimodal LLMs in JAX/Flax, TPU-native.",
  packages=setuptools.find_packages(include=["kosmos_jax", "kosmos_jax.*"]),
  package_data={
    "kosmos_jax.serve": ["page.html", "page.js"],  # `kosmos-jax serve`'s page
    "kosmos_jax.data": ["task_prompts.json"],  # the task prompts (data/task_prompts.py)
  },
  python_requires=">=3.11,<3.12",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  entry_points={"console_scripts": ["kosmos-jax=kosmos_jax.commands:main"]},
)
