"""Tokenizers: text -> int32 token ids, plus the UTF-8 byte count of every token.

Data flow: source documents (str) -> `Tokenizer.encode` (no BOS/EOS; the pipeline adds
them) -> pieces -> packed batches, where `token_bytes[targets]` becomes the batch's
`target_bytes` so the trainer can report bits per byte, a number comparable across
tokenizers and languages.

Both tokenizers reserve id 0 for padding because the trainer masks the loss where
`segment_ids == 0` and packing pads with zeros.
"""

import os
from typing import Protocol, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm

from data_pipelines.errors import DataError


class Tokenizer(Protocol):
  """What the pipeline and trainer need from a tokenizer."""
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  # [vocab_size] int32: UTF-8 bytes each token stands for (0 for pad/bos/eos/control).
  token_bytes: np.ndarray

  def encode(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: pad 0, bos 1, eos 2, byte b -> b + 3 (vocab 259).

  Needs no training and covers every language; multi-byte scripts simply cost more
  tokens per character.
  """

  OFFSET = 3

  def __init__(self):
    self.pad_id = 0
    self.bos_id = 1
    self.eos_id = 2
    self.vocab_size = 256 + self.OFFSET
    self.token_bytes = np.ones([self.vocab_size], np.int32)
    self.token_bytes[:self.OFFSET] = 0

  def encode(self, text: str) -> np.ndarray:
    """UTF-8 bytes of `text` shifted past the special ids, as int32 (no BOS/EOS)."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return data.astype(np.int32) + self.OFFSET

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Inverse of encode; special ids are dropped, broken UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64)
    data = ids[(ids >= self.OFFSET) & (ids < self.vocab_size)] - self.OFFSET
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model; ids are the model's own (pad must be 0).

  `token_bytes` comes from the piece strings: "▁" counts as one space byte, byte-fallback
  pieces "<0xNN>" as one byte, control/unknown pieces as zero. For models trained by
  `data_pipelines.train_sentencepiece` (identity normalisation, no dummy prefix) the
  bytes of `encode(text)` sum exactly to `len(text.encode())`.
  """

  def __init__(self, model_path: str):
    path = os.path.expanduser(model_path)
    if not os.path.isfile(path):
      raise DataError(f"SentencePiece model {model_path!r}: no such file")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise DataError(
          f"{model_path} is not a loadable SentencePiece model: {e}") from e
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    if self.pad_id != 0:
      raise DataError(
          f"{model_path} has pad_id={self.pad_id}, but the trainer masks pad id 0; "
          "retrain with python -m data_pipelines.train_sentencepiece (pad_id=0)")
    if self.bos_id < 0 or self.eos_id < 0:
      raise DataError(f"{model_path} has no BOS/EOS pieces (bos_id={self.bos_id}, "
                      f"eos_id={self.eos_id}); the pipeline needs both")
    self.token_bytes = np.zeros([self.vocab_size], np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        self.token_bytes[i] = 1
      elif not (self._sp.is_control(i) or self._sp.is_unknown(i) or
                self._sp.is_unused(i)):
        piece = self._sp.id_to_piece(i)
        self.token_bytes[i] = len(piece.replace("\u2581", " ").encode("utf-8"))

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32 (no BOS/EOS)."""
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; pad/bos/eos are dropped."""
    specials = (self.pad_id, self.bos_id, self.eos_id)
    return self._sp.decode([int(i) for i in ids if int(i) not in specials])

  def model_proto(self) -> bytes:
    """The serialized SentencePiece model (the bytes of its .model file)."""
    return self._sp.serialized_model_proto()


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer named by `data_cfg.tokenizer` ("byte" | "sentencepiece")."""
  if data_cfg.tokenizer == "byte":
    return ByteTokenizer()
  if data_cfg.tokenizer == "sentencepiece":
    if not data_cfg.tokenizer_model:
      raise DataError('data.tokenizer="sentencepiece" needs data.tokenizer_model')
    return SentencePieceTokenizer(data_cfg.tokenizer_model)
  raise DataError(f"unknown data.tokenizer {data_cfg.tokenizer!r}; expected byte or "
                  "sentencepiece")
