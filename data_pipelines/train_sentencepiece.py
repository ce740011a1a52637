r"""Trains a SentencePiece tokenizer on local text files.

Where it sits: offline, before training. Its output `PATH.model` is what
`data.tokenizer_model` points at (with `data.tokenizer="sentencepiece"`).

  python -m data_pipelines.train_sentencepiece \
      --input='data_pipelines/corpora/debref/*.txt.xz' --model_prefix=/tmp/debref_sp \
      --vocab_size=8000

The model is trained so that the pipeline's contract holds: pad id 0 (the trainer masks
it), then unk 1, bos 2, eos 3; byte fallback so no text is ever unknown; identity
normalisation and no dummy prefix so decode(encode(text)) == text and token byte counts
add up to the text's UTF-8 length (exact bits per byte).
"""

import os
import sys
from typing import Sequence

from absl import app
from absl import flags
import sentencepiece as spm

from data_pipelines import files
from data_pipelines.errors import DataError

_INPUT = flags.DEFINE_string(
    "input", None, "Comma-separated globs of UTF-8 text files (one sentence per line "
    "is ideal; long lines are fine).")
_MODEL_PREFIX = flags.DEFINE_string(
    "model_prefix", None, "Output prefix: writes PREFIX.model and PREFIX.vocab.")
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", 8000, "Number of pieces, including pad/unk/bos/eos and the 256 "
    "byte-fallback pieces.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"],
                                "SentencePiece algorithm.")
_CHARACTER_COVERAGE = flags.DEFINE_float(
    "character_coverage", 0.9995, "Fraction of characters covered by pieces; the "
    "rest fall back to bytes. 0.9995 is SentencePiece's advice for CJK-rich text.")
_INPUT_SENTENCE_SIZE = flags.DEFINE_integer(
    "input_sentence_size", 2_000_000, "At most this many lines are sampled from the "
    "input (0 = all).")

# 4 special pieces + 256 byte-fallback pieces must fit, plus at least a few real ones.
MIN_VOCAB_SIZE = 4 + 256 + 8


def train(input_files: Sequence[str], model_prefix: str, vocab_size: int, *,
          model_type: str = "unigram", character_coverage: float = 0.9995,
          input_sentence_size: int = 2_000_000) -> str:
  """Trains a model on `input_files`; returns the path of the written .model file.

  Raises:
    DataError: for a too-small vocabulary, unreadable/non-UTF-8 input, or a corpus too
      small for the requested vocabulary.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise DataError(f"--vocab_size={vocab_size} is too small: the 4 special and 256 "
                    f"byte-fallback pieces need at least {MIN_VOCAB_SIZE}")
  for path in input_files:
    files.read_utf8(path)  # SentencePiece would silently mangle invalid UTF-8.
  out_dir = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(out_dir, exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        input=list(input_files),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=1,
    )
  except RuntimeError as e:
    raise DataError(f"SentencePiece training on {len(input_files)} file(s) failed: "
                    f"{str(e).strip().splitlines()[-1]}") from e
  return model_prefix + ".model"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    input_files = files.expand_paths(_INPUT.value, what="--input")
    path = train(input_files, _MODEL_PREFIX.value, _VOCAB_SIZE.value,
                 model_type=_MODEL_TYPE.value,
                 character_coverage=_CHARACTER_COVERAGE.value,
                 input_sentence_size=_INPUT_SENTENCE_SIZE.value)
  except DataError as e:
    sys.exit(f"train_sentencepiece: {e}")  # One line, no traceback, exit status 1.
  print(f"wrote {path} ({_VOCAB_SIZE.value} pieces from {len(input_files)} files)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "model_prefix"])
  app.run(main)
