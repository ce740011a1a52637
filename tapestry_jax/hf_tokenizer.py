"""Our tokenizers as Hugging Face tokenizer files, and HF tokenizer files as ours.

Data flow: `hf.save` -> `save` writes what `transformers.AutoTokenizer` loads, built with
the `tokenizers` library so that it encodes text to exactly our ids; `hf.load` -> `load`
gives back a tokenizer with our protocol (data_pipelines/tokenizers.py): ours for our
own exports, `HFTokenizer` over a foreign directory's tokenizer.json.

Either way, text never turns into special ids: our pipeline adds BOS/EOS itself and
encodes a literal "<s>" in a document as text (`split_special_tokens`). AutoTokenizer's
`encode(text)` prepends BOS, as every packed document starts with it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np
import tokenizers
from absl import logging
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, normalizers, processors

from data_pipelines import tokenizers as tokenizers_lib
from data_pipelines.errors import DataError
from tapestry_jax.checkpoint import InitError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# The byte tokenizer's special tokens, by id (ByteTokenizer: pad 0, bos 1, eos 2).
_BYTE_SPECIALS = ("<pad>", "<s>", "</s>")


class HFTokenizer:
  """Our Tokenizer protocol over a `tokenizers.Tokenizer` (a foreign tokenizer.json).
  Ids missing from the checkpoint's config (e.g. no pad token) are -1."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: int, eos_id: int, pad_id: int):
    self.tokenizer = tokenizer
    self.tokenizer.encode_special_tokens = True  # A literal "<s>" in text is text.
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
    self.token_bytes = _token_bytes(tokenizer, self.vocab_size)

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32 (no BOS/EOS)."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; special tokens are dropped."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _token_bytes(tok: tokenizers.Tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes per token: 0 for added/special tokens, 1 for "<0xNN>" byte pieces, one
  per character in byte-level (GPT-2 style) vocabularies, else the piece's UTF-8 length
  with "▁" as a space."""
  byte_level = "ByteLevel" in json.dumps(json.loads(tok.to_str()).get("decoder"))
  special = set(tok.get_added_tokens_decoder())
  out = np.zeros([vocab_size], np.int32)
  for piece, i in tok.get_vocab(with_added_tokens=True).items():
    if i in special:
      continue
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
      out[i] = 1
    else:
      out[i] = len(piece) if byte_level else len(piece.replace("\u2581", " ").encode("utf-8"))
  return out


def _bos_template(bos: str, bos_id: int) -> processors.TemplateProcessing:
  return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                       special_tokens=[(bos, bos_id)])


def _byte_tokenizer() -> tokenizers.Tokenizer:
  """ByteTokenizer as a BPE with no merges and byte fallback: its only pieces are the
  256 "<0xNN>" bytes, so every character falls back to its UTF-8 bytes and byte b gets
  id b + 3, exactly our ids."""
  offset = tokenizers_lib.ByteTokenizer.OFFSET
  vocab = {s: i for i, s in enumerate(_BYTE_SPECIALS)}
  vocab.update({f"<0x{b:02X}>": b + offset for b in range(256)})
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
  tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                          for s in _BYTE_SPECIALS])
  tok.post_processor = _bos_template(_BYTE_SPECIALS[1], 1)
  return tok


def _sentencepiece_unigram(proto) -> tokenizers.Tokenizer | None:
  """A unigram SentencePiece model trained like `data_pipelines.train_sentencepiece`
  (identity normalisation, no dummy prefix, byte fallback) as a `tokenizers` Unigram
  with the same pieces and scores; None for any other model. transformers' own
  conversion (LlamaTokenizer) builds a BPE, which segments unigram models differently.

  A literal control piece in the text ("<s>") is the one difference left: SentencePiece
  spells it out, a `tokenizers` Unigram matches it as a piece."""
  n, t = proto.normalizer_spec, proto.trainer_spec
  if (t.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM or n.precompiled_charsmap
      or n.add_dummy_prefix or n.remove_extra_whitespaces or not n.escape_whitespaces
      or not t.byte_fallback or t.treat_whitespace_as_suffix or not t.split_by_whitespace
      or any(p.type == p.USER_DEFINED for p in proto.pieces)):
    return None
  # No piece spans a "▁" that follows a non-space (split_by_whitespace), so one Viterbi
  # over the whole text equals SentencePiece's word-by-word ones.
  tok = tokenizers.Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces],
                                            t.unk_id, True))
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False)
                          for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)])
  tok.post_processor = _bos_template(proto.pieces[t.bos_id].piece, t.bos_id)
  return tok


def _write_json(directory: str, name: str, obj) -> None:
  with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def save(directory: str, tokenizer, max_length: int) -> str:
  """Writes tokenizer.json (or tokenizer.model), tokenizer_config.json and
  special_tokens_map.json; returns the kind ("byte" | "sentencepiece" | "hf") for `load`."""
  config: dict[str, Any] = {
      "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_length),
      "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
      "split_special_tokens": True}
  if isinstance(tokenizer, tokenizers_lib.ByteTokenizer):
    kind, tok = "byte", _byte_tokenizer()
    names = dict(zip(("pad", "bos", "eos"), _BYTE_SPECIALS))
  elif isinstance(tokenizer, tokenizers_lib.SentencePieceTokenizer):
    kind = "sentencepiece"
    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_proto())
    with open(os.path.join(directory, SENTENCEPIECE_MODEL), "wb") as f:
      f.write(tokenizer.model_proto())
    names = {k: proto.pieces[i].piece for k, i in (
        ("pad", tokenizer.pad_id), ("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
        ("unk", proto.trainer_spec.unk_id)) if i >= 0}
    tok = _sentencepiece_unigram(proto)
    if tok is None:  # transformers converts tokenizer.model (exact for our BPE models).
      config.update(tokenizer_class="LlamaTokenizer", legacy=False, add_prefix_space=False)
      if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        logging.warning("%s: a SentencePiece model not trained like "
                        "data_pipelines.train_sentencepiece; transformers may segment "
                        "text differently from it", directory)
  elif isinstance(tokenizer, HFTokenizer):
    kind, tok = "hf", tokenizer.tokenizer
    names = {k: tok.id_to_token(i) for k, i in (
        ("pad", tokenizer.pad_id), ("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id))
        if i >= 0}
  else:
    raise ValueError(f"cannot export a {type(tokenizer).__name__} tokenizer")
  path = os.path.join(directory, TOKENIZER_JSON)
  if tok is not None:
    tok.save(path)
  elif os.path.exists(path):  # A previous export's would take precedence.
    os.remove(path)
  special = {f"{k}_token": v for k, v in names.items()}
  _write_json(directory, "tokenizer_config.json", {**config, **special})
  _write_json(directory, "special_tokens_map.json", special)
  return kind


def load(directory: str, kind: str | None, special_ids: Sequence[int | None]):
  """The tokenizer of a HF directory: ours for `kind` "byte" / "sentencepiece" (what
  `save` returned), else its tokenizer.json as an HFTokenizer with `special_ids`
  (bos, eos, pad; None = -1), else its SentencePiece tokenizer.model."""
  where = f"HF checkpoint {directory}"
  if kind == "byte":
    return tokenizers_lib.ByteTokenizer()
  tok_json = os.path.join(directory, TOKENIZER_JSON)
  if kind != "sentencepiece" and os.path.isfile(tok_json):
    try:
      tok = tokenizers.Tokenizer.from_file(tok_json)
    except Exception as e:  # noqa: BLE001  (tokenizers raises plain Exceptions)
      raise InitError(f"{where}: {TOKENIZER_JSON} does not load: {str(e)[:200]}") from None
    return HFTokenizer(tok, *[-1 if i is None else i for i in special_ids])
  sp_model = os.path.join(directory, SENTENCEPIECE_MODEL)
  if os.path.isfile(sp_model):
    try:
      return tokenizers_lib.SentencePieceTokenizer(sp_model)
    except DataError as e:
      raise InitError(f"{where}: {e}") from None
  raise InitError(f"{where}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}")
