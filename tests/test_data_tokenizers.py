"""Tokenizers: round trips, special ids, token_bytes, SentencePiece training/loading."""

import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

import data_pipelines as dp
from data_pipelines import tokenizers
from data_pipelines import train_sentencepiece
from data_pipelines.sources import synthetic

MULTILINGUAL = [
    "plain ascii",
    "Grüße aus Köln, naïve café",
    "東京は日本の首都です。数据管道",
    "한국어 문장입니다",
    "Ελληνικά και русский текст",
    "हिंदी पाठ। emoji 🙂🚀",
    "tabs\tand\n\nnewlines  and  double  spaces ",
    "",
]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_byte_tokenizer_round_trip_and_byte_counts(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert (ids >= 3).all() and (ids < tok.vocab_size).all()
  assert tok.decode(ids) == text
  assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))


def test_byte_tokenizer_ids():
  tok = dp.make_tokenizer(dp.default_config())
  assert isinstance(tok, tokenizers.ByteTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert tok.token_bytes.shape == (259,) and tok.token_bytes.dtype == np.int32
  assert list(tok.token_bytes[:4]) == [0, 0, 0, 1]
  np.testing.assert_array_equal(tok.encode("A\u00e9"), [65 + 3, 0xC3 + 3, 0xA9 + 3])
  # Specials are dropped on decode.
  assert tok.decode([1, 65 + 3, 2, 0]) == "A"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small multi-script corpus (latin, greek, kana) from the synthetic languages."""
  path = tmp_path_factory.mktemp("spm") / "corpus.txt"
  text = "\n".join(synthetic.generate_document(0, [0, 2, 4][i % 3], "train", i)
                   for i in range(120))
  path.write_text(text, encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def sp_model(corpus):
  return train_sentencepiece.train([str(corpus)], str(corpus.parent / "sp"), 600)


def test_trained_sentencepiece_model_contract(sp_model):
  cfg = dp.default_config()
  cfg.tokenizer = "sentencepiece"
  cfg.tokenizer_model = sp_model
  dp.validate(cfg)
  tok = dp.make_tokenizer(cfg)
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (600, 0, 2, 3)
  assert tok.token_bytes.shape == (600,) and tok.token_bytes.dtype == np.int32
  assert (tok.token_bytes[:4] == 0).all()  # pad, unk, bos, eos
  # It learned multi-byte pieces from the corpus (not just byte fallback).
  sample = synthetic.generate_document(0, 4, "eval", 0)
  assert len(tok.encode(sample)) < len(sample.encode("utf-8")) / 2


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_sentencepiece_round_trip_and_byte_counts(sp_model, text):
  # Includes scripts absent from the training corpus: byte fallback covers them.
  tok = tokenizers.SentencePieceTokenizer(sp_model)
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert tok.decode(ids) == text
  assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))


def test_sentencepiece_without_pad_zero_is_rejected(corpus, tmp_path):
  prefix = str(tmp_path / "nopad")
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=300,
                                 minloglevel=2)  # Default pad_id=-1.
  with pytest.raises(dp.DataError, match=r"pad_id=-1.*masks pad id 0"):
    tokenizers.SentencePieceTokenizer(prefix + ".model")


def test_sentencepiece_model_that_is_not_a_model(tmp_path):
  bogus = tmp_path / "bogus.model"
  bogus.write_bytes(b"not a protobuf")
  with pytest.raises(dp.DataError, match="bogus.model is not a loadable SentencePiece"):
    tokenizers.SentencePieceTokenizer(str(bogus))


def test_train_rejects_tiny_vocab(corpus, tmp_path):
  with pytest.raises(dp.DataError, match="--vocab_size=100 is too small"):
    train_sentencepiece.train([str(corpus)], str(tmp_path / "m"), 100)


def test_train_reports_vocab_too_small_for_the_characters(tmp_path):
  path = tmp_path / "hangul.txt"
  path.write_text("\n".join(synthetic.generate_document(0, 5, "train", i)
                            for i in range(200)), encoding="utf-8")
  with pytest.raises(dp.DataError, match="Vocabulary size is smaller than required"):
    train_sentencepiece.train([str(path)], str(tmp_path / "m"), 300)


def test_train_sentencepiece_command(corpus, tmp_path):
  prefix = tmp_path / "out" / "cli"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.train_sentencepiece",
       f"--input={corpus.parent}/*.txt", f"--model_prefix={prefix}",
       "--vocab_size=500", "--model_type=bpe"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  tok = tokenizers.SentencePieceTokenizer(str(prefix) + ".model")
  assert tok.vocab_size == 500 and tok.pad_id == 0
  text = synthetic.generate_document(0, 2, "eval", 1)
  assert tok.decode(tok.encode(text)) == text


def test_train_sentencepiece_command_bad_glob(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.train_sentencepiece",
       f"--input={tmp_path}/nothing*.txt", f"--model_prefix={tmp_path}/m"],
      capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"train_sentencepiece: --input: glob '{tmp_path}/nothing*.txt' matches no files")
  assert "Traceback" not in result.stderr
