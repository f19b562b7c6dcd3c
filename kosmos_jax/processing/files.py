"""The processor's files in a checkpoint directory, as Hugging Face names them.

Its own module so that checkpoint code can copy them without importing the
processor (which needs TensorFlow for the vocabulary).
"""

SENTENCEPIECE = "sentencepiece.bpe.model"
# Every file `Processor.from_pretrained` reads.
FILES = (
  SENTENCEPIECE,
  "tokenizer_config.json",
  "preprocessor_config.json",
  "processor_config.json",
)
# What a directory needs to give a processor: one of each group.
REQUIRED = ((SENTENCEPIECE,), ("preprocessor_config.json", "processor_config.json"))
