"""KosmosVocabulary: id layout, parity with transformers' tokenizer, tf == python."""

import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from kosmos_jax.processing import vocab as vocab_lib
from tests.helpers import spm as spm_util


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("spm_unigram")
  spm_util.train_tiny_spm(directory, "unigram")
  return directory


@pytest.fixture(scope="module")
def vocab(unigram_dir):
  return vocab_lib.KosmosVocabulary(str(unigram_dir / "sentencepiece.bpe.model"))


@pytest.fixture(scope="module")
def hf_tokenizer(unigram_dir):
  return spm_util.hf_processor(unigram_dir).tokenizer


def _random_strings(n, seed=0):
  """Grounded text, specials, stray markup and awkward whitespace/unicode."""
  rng = random.Random(seed)
  words = spm_util.lexicon()
  extras = [
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
    "<mask>",
    "<image>",
    "</image>",
    "</doc>",
    "</chunk>",
    "</line>",
    "<patch_index_1023>",
    "<patch_index_9999>",
    "<patch_index_12>",
    "<phrase",
    "\x85",
    "\xa0",
    "\u3000",
    "\t",
    "\n",
    "  ",
    "<",
    ">",
    "ﬁ",
    "ＡＢＣ",
    "…",
  ]
  out = []
  for _ in range(n):
    text, _ = spm_util.random_grounded_example(rng, words)
    pieces = [text] + rng.sample(extras, rng.randint(0, 4))
    rng.shuffle(pieces)
    out.append(rng.choice(["", " "]).join(pieces))
  return out


def test_id_layout(vocab, hf_tokenizer):
  pieces = 1000
  assert vocab.vocab_size == len(hf_tokenizer) == pieces + 2 + 11 + 1024
  assert (vocab.bos_id, vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
  assert vocab.mask_id == pieces + 1
  assert [vocab.tag_id(t) for t in vocab_lib.TAGS] == list(range(pieces + 2, pieces + 13))
  assert (
    vocab.patch_index_id(0) == pieces + 13 and vocab.patch_index_id(1023) == vocab.vocab_size - 1
  )
  assert vocab_lib.image_slot_ids() == list(range(4, 68))
  assert vocab_lib.patch_index_token(44) == "<patch_index_0044>"
  for i in range(vocab.vocab_size):
    assert vocab.id_to_token(i) == hf_tokenizer.convert_ids_to_tokens(i)
  with pytest.raises(ValueError):
    vocab.patch_index_id(1024)
  with pytest.raises(KeyError):
    vocab.tag_id("<p>")


def test_encode_matches_transformers(vocab, hf_tokenizer):
  for s in _random_strings(600):
    assert vocab.encode(s) == hf_tokenizer(s, add_special_tokens=False)["input_ids"], repr(s)


def test_decode_matches_transformers(vocab, hf_tokenizer):
  rng = np.random.default_rng(0)
  for s in _random_strings(200, seed=1):
    ids = hf_tokenizer(s, add_special_tokens=False)["input_ids"]
    for skip in (False, True):
      assert vocab.detokenize(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
  for _ in range(200):
    ids = rng.integers(0, vocab.vocab_size, rng.integers(0, 12)).tolist()
    for skip in (False, True):
      assert vocab.detokenize(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_tf_matches_python(vocab):
  strings = _random_strings(300, seed=2)
  encode = tf.function(vocab.encode_tf)  # graph mode: no py_function inside
  ragged = encode(tf.constant(strings))
  assert ragged.to_list() == [vocab.encode(s) for s in strings]
  assert vocab.encode_tf(tf.constant(strings[0])).numpy().tolist() == vocab.encode(strings[0])
  dataset = tf.data.Dataset.from_tensor_slices(strings[:20]).map(vocab.encode_tf)
  assert [x.tolist() for x in dataset.as_numpy_iterator()] == [
    vocab.encode(s) for s in strings[:20]
  ]
  padded = ragged.to_tensor(default_value=vocab.eos_id)
  decoded = tf.function(vocab.decode_tf)(padded).numpy()
  assert [d.decode() for d in decoded] == [vocab.decode(r) for r in ragged.to_list()]
  unskipped = vocab.detokenize_tf(ragged).numpy()
  assert [d.decode() for d in unskipped] == [vocab.detokenize(r) for r in ragged.to_list()]


def test_seqio_decode_stops_at_eos_and_skips_specials(vocab):
  ids = vocab.encode("<grounding> An image of<phrase> a snowman</phrase>")
  assert vocab.decode([0] + ids + [2] + ids) == vocab.detokenize(ids)
  assert vocab.decode(ids + [vocab.vocab_size + 5]) == vocab.detokenize(ids)


def test_pickle_round_trip(vocab):
  again = pickle.loads(pickle.dumps(vocab))
  assert again == vocab and again.encode("<phrase> x</phrase>") == vocab.encode(
    "<phrase> x</phrase>"
  )


def test_bpe_model_follows_sentencepiece(tmp_path):
  # The real KOSMOS-2 model is BPE: text between tags must tokenize exactly as
  # sentencepiece does (the tokenizer the model was trained with).
  model = spm_util.train_tiny_spm(tmp_path, "bpe")
  vocab = vocab_lib.KosmosVocabulary(model, num_patches_per_side=16)
  sp = spm.SentencePieceProcessor(model_file=model)
  assert vocab.vocab_size == sp.get_piece_size() + 2 + 11 + 256
  shift = lambda ids: [{0: 3, 1: 0, 2: 2}.get(i, i + 1) for i in ids]
  rng = random.Random(3)
  words = spm_util.lexicon()
  for _ in range(200):
    a, b = (" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(2))
    s = f"{a} <phrase>{b}</phrase><object><patch_index_0003><patch_index_0255></object>."
    expected = (
      shift(sp.encode(a))
      + [vocab.tag_id("<phrase>")]
      + shift(sp.encode(b))
      + [
        vocab.tag_id("</phrase>"),
        vocab.tag_id("<object>"),
        vocab.patch_index_id(3),
        vocab.patch_index_id(255),
        vocab.tag_id("</object>"),
      ]
      + shift(sp.encode("."))
    )
    assert vocab.encode(s) == expected
    assert vocab.encode_tf(tf.constant(s)).numpy().tolist() == expected
  # <patch_index_0256> is not in a 16 x 16 vocabulary: it is plain text.
  assert vocab.patch_index_id(255) not in vocab.encode("<patch_index_0256>")


def test_modality_tags_follow_the_location_tokens(unigram_dir, vocab):
  """Modality tags are appended: every id of the plain vocabulary stays put,
  and the python and tf encoders read the tags (with the whitespace before them)."""
  path = str(unigram_dir / "sentencepiece.bpe.model")
  with_tags = vocab_lib.KosmosVocabulary(path, modalities=("sound", "depth"))
  assert with_tags.vocab_size == vocab.vocab_size + 4
  assert with_tags.modality_tag_ids("sound") == (vocab.vocab_size, vocab.vocab_size + 1)
  assert with_tags.modality_tag_ids("depth") == (vocab.vocab_size + 2, vocab.vocab_size + 3)
  assert not with_tags.is_patch_index_id(vocab.vocab_size)
  assert with_tags.is_patch_index_id(with_tags.patch_index_id(1023))
  text = "a dog <phrase>barks</phrase> <sound></sound>and <depth> </depth>"
  ids = with_tags.encode(text)
  plain = vocab.encode("a dog <phrase>barks</phrase>")
  assert ids[: len(plain)] == plain
  assert ids.count(vocab.vocab_size) == 1 and ids.count(vocab.vocab_size + 3) == 1
  np.testing.assert_array_equal(with_tags.encode_tf(tf.constant(text)).numpy(), ids)
  assert with_tags.decode(ids).endswith("<sound></sound> and<depth></depth>")
  assert pickle.loads(pickle.dumps(with_tags)) == with_tags != vocab
  with pytest.raises(ValueError, match="modality name 'Image'"):
    vocab_lib.KosmosVocabulary(path, modalities=("Image",))
  with pytest.raises(KeyError, match="'audio' is not in"):
    with_tags.modality_tag_ids("audio")
