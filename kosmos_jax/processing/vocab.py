"""KOSMOS-2 vocabulary: sentencepiece + fairseq id layout + tag and location tokens.

Id layout (reference/kosmos2.md 2.1), for a sentencepiece model with S pieces:

  0 <s>, 1 <pad>, 2 </s>, 3 <unk>          fairseq specials
  4 .. S                                    sentencepiece pieces 3..S-1, shifted by one
  S + 1 <mask>
  S + 2 .. S + 12                           the 11 tags of `TAGS`, in that order
  S + 13 + k                                <patch_index_{k:04d}>, k < P * P
  S + 13 + P * P + 2 m, + 1                 `<{name}>`, `</{name}>` of the m-th of
                                            `modalities` (PandaGPT-style soft tokens)

With the real model (S = 64000) this gives <mask> = 64001, </doc> = 64002 and
<patch_index_1023> = 65036; a model with modalities ("audio", "depth") adds
<audio> = 65037, </audio> = 65038, <depth> = 65039, </depth> = 65040, so the
released ids never move.

Encoding follows Hugging Face's handling of added tokens: tags and patch tokens
are `lstrip=True` (whitespace before them is absorbed), the specials are not,
and every stretch of text between them is encoded on its own by sentencepiece
(so it gets sentencepiece's dummy-prefix "▁").
"""

import re

import numpy as np
import sentencepiece as spm
import seqio
import tensorflow as tf
import tensorflow_text as tf_text

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
TAGS = (
  "</doc>",
  "<image>",
  "</image>",
  "</chunk>",
  "</line>",
  "<phrase>",
  "</phrase>",
  "<object>",
  "</object>",
  "</delimiter_of_multi_objects/>",
  "<grounding>",
)
NUM_IMAGE_TOKENS = 64
# Unicode White_Space, the set Hugging Face's `lstrip` and whitespace split use.
WHITESPACE = (
  "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
  "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f"
  "\u3000"
)
# The only White_Space character that sentencepiece's normalizer keeps as a
# non-space; Hugging Face still splits words on it, so it is mapped to " ".
_SPM_HIDDEN_SPACE = "\x85"
_WORD_BOUNDARY = "\u2581"  # sentencepiece's "▁"


def patch_index_token(k: int) -> str:
  """The location token for grid cell `k` (row-major), e.g. `<patch_index_0044>`."""
  return f"<patch_index_{k:04d}>"


def image_slot_ids(num_image_tokens: int = NUM_IMAGE_TOKENS) -> list[int]:
  """Ids written into the image-embedding slots: unk_id + 1 onwards (4..67).

  The values are overwritten by image embeddings, but they must differ from
  pad (1) or the position ids, which count non-pad tokens, would shift.
  """
  return list(range(UNK_ID + 1, UNK_ID + 1 + num_image_tokens))


class KosmosVocabulary(seqio.Vocabulary):
  """A `seqio.Vocabulary` with the KOSMOS-2 id layout (see the module doc)."""

  def __init__(
    self,
    sentencepiece_model_file: str,
    num_patches_per_side: int = 32,
    extra_ids: int = 0,
    modalities: tuple[str, ...] = (),
  ):
    """Loads the sentencepiece model.

    Args:
      sentencepiece_model_file: path of the sentencepiece model (the hub's
        `sentencepiece.bpe.model`).
      num_patches_per_side: P; the vocabulary has P * P location tokens.
      extra_ids: seqio extra ids, appended after the modality tags.
      modalities: names of soft-token modalities (e.g. "audio"); each adds the
        tags `<name>` and `</name>` after the location tokens, in this order.
    """
    modalities = tuple(modalities)
    for name in modalities:
      if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("image", "phrase", "object"):
        raise ValueError(
          f"modality name {name!r}: expected lowercase letters, digits and _, "
          "and not a KOSMOS tag name"
        )
    if len(set(modalities)) != len(modalities):
      raise ValueError(f"modality names repeat: {modalities}")
    self._modalities = modalities
    self._model_file = sentencepiece_model_file
    with tf.io.gfile.GFile(sentencepiece_model_file, "rb") as f:
      self._model_proto = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
    self._num_patches_per_side = num_patches_per_side
    num_pieces = self._sp.get_piece_size()
    self._mask_id = num_pieces + 1
    self._first_tag_id = num_pieces + 2
    self._first_patch_id = self._first_tag_id + len(TAGS)
    self._first_modality_id = self._first_patch_id + num_patches_per_side**2
    self._size = self._first_modality_id + 2 * len(modalities)
    # sentencepiece id -> our id: its <unk>/<s>/</s> (0, 1, 2) become the
    # fairseq ones, every other piece moves up by one.
    self._spm_to_id = np.arange(1, num_pieces + 1, dtype=np.int32)
    self._spm_to_id[:3] = [UNK_ID, BOS_ID, EOS_ID]
    self._tokens = list(SPECIAL_TOKENS) + [self._sp.id_to_piece(i) for i in range(3, num_pieces)]
    self._tokens += [MASK_TOKEN, *TAGS]
    self._tokens += [patch_index_token(k) for k in range(num_patches_per_side**2)]
    self._tokens += [t for name in modalities for t in (f"<{name}>", f"</{name}>")]
    self._token_to_id = {t: i for i, t in enumerate(self._tokens)}
    self._special_ids = frozenset((BOS_ID, PAD_ID, EOS_ID, UNK_ID, self._mask_id))
    self._added = {
      t: self._token_to_id[t]
      for t in (*SPECIAL_TOKENS, MASK_TOKEN, *self._tokens[self._first_tag_id :])
    }
    # One pattern finds every added token; tags and patch tokens take the
    # whitespace before them. Longest first, as Hugging Face matches
    # leftmost-longest.
    by_length = lambda ts: sorted(ts, key=len, reverse=True)
    lstripped = "|".join(map(re.escape, by_length(self._tokens[self._first_tag_id :])))
    plain = "|".join(map(re.escape, by_length((*SPECIAL_TOKENS, MASK_TOKEN))))
    ws = "[" + WHITESPACE + "]"
    self._added_pattern = f"{ws}*(?:{lstripped})|{plain}"
    self._added_re = re.compile(self._added_pattern)
    self._ws_prefix_pattern = f"^{ws}+"
    self._tf_state = None
    super().__init__(extra_ids=extra_ids)

  # --- ids -----------------------------------------------------------------

  @property
  def sentencepiece_model_file(self) -> str:
    return self._model_file

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def mask_id(self) -> int:
    return self._mask_id

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids dropped by `detokenize(..., skip_special_tokens=True)`."""
    return self._special_ids

  @property
  def num_patches_per_side(self) -> int:
    return self._num_patches_per_side

  @property
  def _base_vocab_size(self) -> int:
    return self._size

  def tag_id(self, tag: str) -> int:
    """Id of one of `TAGS`, e.g. `tag_id("<phrase>")`."""
    if tag not in TAGS:
      raise KeyError(f"{tag!r} is not a KOSMOS tag; tags are {TAGS}")
    return self._first_tag_id + TAGS.index(tag)

  def patch_index_id(self, k: int) -> int:
    """Id of `<patch_index_{k:04d}>`."""
    if not 0 <= k < self._num_patches_per_side**2:
      raise ValueError(f"patch index {k} outside [0, {self._num_patches_per_side**2})")
    return self._first_patch_id + k

  def is_patch_index_id(self, i: int) -> bool:
    return self._first_patch_id <= i < self._first_modality_id

  @property
  def modalities(self) -> tuple[str, ...]:
    return self._modalities

  def modality_tag_ids(self, name: str) -> tuple[int, int]:
    """Ids of `<name>` and `</name>` for a modality of this vocabulary."""
    if name not in self._modalities:
      raise KeyError(f"modality {name!r} is not in this vocabulary's {self._modalities}")
    first = self._first_modality_id + 2 * self._modalities.index(name)
    return first, first + 1

  def id_to_token(self, i: int) -> str:
    return self._tokens[i]

  def token_to_id(self, token: str) -> int:
    return self._token_to_id.get(token, UNK_ID)

  # --- python --------------------------------------------------------------

  def _encode_text(self, s: str) -> list[int]:
    ids = self._sp.encode(s.replace(_SPM_HIDDEN_SPACE, " "))
    return self._spm_to_id[ids].tolist() if ids else []

  def _encode(self, s: str) -> list[int]:
    ids, pos = [], 0
    for m in self._added_re.finditer(s):
      ids += self._encode_text(s[pos : m.start()])
      ids.append(self._added[m.group().lstrip(WHITESPACE)])
      pos = m.end()
    return ids + self._encode_text(s[pos:])

  def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
    """Ids to text as Hugging Face's `decode` does (no cut at EOS).

    Pieces are concatenated with "▁" read as a space; the leading "▁" of the
    first token kept is dropped (sentencepiece's dummy prefix). Ids outside the
    vocabulary read as <unk>.
    """
    tokens = []
    for i in ids:
      i = int(i)
      i = i if 0 <= i < self._size else UNK_ID
      if not (skip_special_tokens and i in self._special_ids):
        tokens.append(self._tokens[i])
    text = "".join(tokens)
    if text.startswith(_WORD_BOUNDARY):
      text = text[1:]
    return text.replace(_WORD_BOUNDARY, " ")

  def _decode(self, ids) -> str:
    return self.detokenize(ids, skip_special_tokens=True)

  # --- tensorflow ----------------------------------------------------------

  def _tf(self):
    """Lazily built tf objects (tables do not pickle; seqio pickles vocabs).

    Built eagerly (init_scope) so that one set serves every graph: tf.function,
    tf.data map functions and eager calls.
    """
    if self._tf_state is None:
      with tf.init_scope():
        added = tf.lookup.StaticHashTable(
          tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(self._added)), tf.constant(list(self._added.values()), tf.int32)
          ),
          default_value=-1,
        )
        skip = np.array(self._tokens, dtype=object)
        skip[list(self._special_ids)] = ""
        self._tf_state = dict(
          tokenizer=tf_text.SentencepieceTokenizer(model=self._model_proto, out_type=tf.int32),
          spm_to_id=tf.constant(self._spm_to_id),
          added=added,
          tokens=tf.constant(self._tokens),
          tokens_skip_special=tf.constant(skip.tolist()),
        )
    return self._tf_state

  def _encode_tf(self, s: tf.Tensor):
    """Encodes a string (1-D int32 tensor) or a 1-D batch (int32 RaggedTensor)."""
    state = self._tf()
    s = tf.convert_to_tensor(s, tf.string)
    scalar = s.shape.rank == 0
    s = tf.reshape(s, [-1])
    # [batch, segments]: text stretches and added tokens (with the whitespace
    # they absorb), in order.
    segments = tf_text.regex_split(s, self._added_pattern, self._added_pattern)
    flat = segments.flat_values
    added_ids = state["added"].lookup(tf.strings.regex_replace(flat, self._ws_prefix_pattern, ""))
    is_added = added_ids >= 0
    text_ids = self.encode_plain_tf(tf.where(is_added, "", flat))
    added_part = tf.RaggedTensor.from_row_lengths(
      tf.boolean_mask(added_ids, is_added), tf.cast(is_added, tf.int64)
    )
    per_segment = tf.concat([added_part, text_ids], axis=1)
    ids = segments.with_flat_values(per_segment).merge_dims(1, 2)
    return ids[0] if scalar else ids

  def encode_plain_tf(self, texts: tf.Tensor) -> tf.RaggedTensor:
    """1-D strings -> ragged ids, each string as plain text: tags and specials
    in it are not parsed (data text, and the stretches between added tokens)."""
    state = self._tf()
    # sentencepiece keeps U+0085 as a character; Hugging Face splits words on it.
    texts = tf.strings.regex_replace(texts, _SPM_HIDDEN_SPACE, " ")
    return tf.ragged.map_flat_values(
      tf.gather, state["spm_to_id"], state["tokenizer"].tokenize(texts)
    )

  def detokenize_tf(self, ids: tf.Tensor, skip_special_tokens: bool = True) -> tf.Tensor:
    """`detokenize` as tf ops over the last axis of a dense or ragged tensor."""
    state = self._tf()
    table = state["tokens_skip_special" if skip_special_tokens else "tokens"]
    ids = tf.where((ids >= 0) & (ids < self._size), ids, UNK_ID)
    text = tf.strings.reduce_join(tf.gather(table, ids), axis=-1)
    text = tf.strings.regex_replace(text, "^" + _WORD_BOUNDARY, "")
    return tf.strings.regex_replace(text, _WORD_BOUNDARY, " ")

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self.detokenize_tf(ids, skip_special_tokens=True)

  # --- seqio plumbing ------------------------------------------------------

  def __getstate__(self):
    return dict(
      model_file=self._model_file,
      num_patches_per_side=self._num_patches_per_side,
      extra_ids=self._extra_ids,
      modalities=self._modalities,
    )

  def __setstate__(self, state):
    self.__init__(
      state["model_file"],
      state["num_patches_per_side"],
      state["extra_ids"],
      state.get("modalities", ()),
    )

  def __eq__(self, other):
    return (
      isinstance(other, KosmosVocabulary)
      and self._model_proto == other._model_proto
      and self._num_patches_per_side == other._num_patches_per_side
      and self._extra_ids == other._extra_ids
      and self._modalities == other._modalities
    )

  def __hash__(self):
    return hash((self._model_proto, self._num_patches_per_side, self._extra_ids, self._modalities))

  def __str__(self):
    return (
      f"KosmosVocabulary(file={self._model_file}, size={self.vocab_size}, "
      f"num_patches_per_side={self._num_patches_per_side}, modalities={self._modalities})"
    )
