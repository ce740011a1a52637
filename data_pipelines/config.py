"""The `data` section of an experiment config, and its up-front validation.

Data flow: experiment config -> `config.data` (this ConfigDict) -> `validate` (cheap,
before the trainer compiles anything) -> `make_dataset` (pipeline.py). Every field the
data pipeline reads is declared here with its meaning and unit.
"""

import os

import ml_collections

from data_pipelines import registry
from data_pipelines.errors import DataError

TOKENIZERS = ("byte", "sentencepiece")
TEXT_DOCUMENTS = ("paragraphs", "files")


def default_config() -> ml_collections.ConfigDict:
  """Default data section: the embedded synthetic multilingual corpus, byte tokenizer."""
  c = ml_collections.ConfigDict()
  # Registered source name: synthetic | text_files | jsonl | parquet | array_record
  # (or a partner's; see data_pipelines/README.md).
  c.source = "synthetic"
  # Comma-separated file globs for file sources ("~" and "**" expand); unused by synthetic.
  c.paths = ""
  # jsonl: key of the text in each JSON object; parquet: name of the string column.
  c.field = "text"
  # text_files: "paragraphs" = documents separated by blank lines; "files" = one document
  # per file (per split part of each file).
  c.text_documents = "paragraphs"
  # "byte" (UTF-8 bytes, vocab 259) or "sentencepiece" (needs tokenizer_model).
  c.tokenizer = "byte"
  # Path to a SentencePiece .model trained with pad_id=0 (python -m
  # data_pipelines.train_sentencepiece makes one); used when tokenizer="sentencepiece".
  c.tokenizer_model = ""
  # Tokens per packed sequence (the model's context length), in tokens.
  c.seq_len = 128
  # Held-out fraction of each file (bytes for text_files, records otherwise) used as
  # the eval split, in [0, 1). Synthetic: eval documents per language as a fraction of
  # synthetic.num_documents.
  c.eval_fraction = 0.1
  # Seed of the train shuffle (a new permutation per epoch) and of packed-row order.
  c.seed = 0
  # Independent data streams the global batch is made of (data_pipelines/shards.py):
  # stream s reads documents s, s+S, ... and gives global_batch_size / S rows of every
  # batch. A fixed S gives the same batches on any process count that divides it, so a
  # checkpoint moves between process counts; 0 = one stream per process (the batches
  # then depend on the process count).
  c.shards = 0
  # Packing bins filled at once (first-fit); more bins = less padding but documents of
  # one batch come from a longer window of the stream. 0 = the stream's batch rows.
  c.packing_bins = 0
  # Most documents (pieces) packed into one row; 0 = no limit. cuDNN attention on GPUs
  # is built for at most model.max_segments runs per row, padding being one more.
  c.max_documents_per_row = 0
  # Host threads that read and tokenize documents ahead of packing (0 = inline).
  c.prefetch_threads = 4
  # Host prefetch depth: documents read ahead by the reader threads; the final batch
  # queue holds min(this, 8) batches (batches are large, documents small).
  c.prefetch_buffer = 64

  c.synthetic = s = ml_collections.ConfigDict()
  # Comma-separated language names or indices, or "all"; see
  # data_pipelines/sources/synthetic.py (latin, cyrillic, greek, devanagari, kana,
  # hangul). Each site typically picks one.
  s.languages = "all"
  # Train documents per selected language (eval documents are generated separately,
  # disjoint by construction).
  s.num_documents = 20_000
  # Seed of the latent world (concepts, topics, facts, lexicons). Keep it the SAME at
  # every site so the languages share structure; vary data.seed instead.
  s.seed = 0
  # Sentences per document, inclusive range.
  s.min_sentences = 3
  s.max_sentences = 12
  # True = document i of every language renders the same latent content (a parallel
  # corpus); False = each language has its own documents drawn from the shared world.
  s.parallel = False
  return c


def validate(data_cfg: ml_collections.ConfigDict) -> None:
  """Checks a data config cheaply (globs and file existence only, no data reads).

  Call before any heavy work; the trainer calls it before compiling.

  Raises:
    DataError: a one-line message naming the bad field or file.
  """
  source_cls = registry.get_source(data_cfg.source)
  if data_cfg.tokenizer not in TOKENIZERS:
    raise DataError(f"unknown data.tokenizer {data_cfg.tokenizer!r}; expected one of "
                    f"{', '.join(TOKENIZERS)}")
  if data_cfg.tokenizer == "sentencepiece":
    model = data_cfg.tokenizer_model
    if not model:
      raise DataError('data.tokenizer="sentencepiece" needs data.tokenizer_model '
                      "(a .model file; see python -m data_pipelines.train_sentencepiece)")
    if not os.path.isfile(os.path.expanduser(model)):
      raise DataError(f"data.tokenizer_model {model!r}: no such file")
  if not isinstance(data_cfg.seq_len, int) or data_cfg.seq_len < 1:
    raise DataError(f"data.seq_len must be a positive integer, got {data_cfg.seq_len!r}")
  frac = data_cfg.eval_fraction
  if not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
    raise DataError(f"data.eval_fraction must be in [0, 1), got {frac!r}")
  if data_cfg.text_documents not in TEXT_DOCUMENTS:
    raise DataError(f"unknown data.text_documents {data_cfg.text_documents!r}; "
                    f"expected one of {', '.join(TEXT_DOCUMENTS)}")
  for name in ("shards", "packing_bins", "max_documents_per_row", "prefetch_threads",
               "prefetch_buffer"):
    value = data_cfg[name]
    if not isinstance(value, int) or value < 0:
      raise DataError(f"data.{name} must be a non-negative integer, got {value!r}")
  source_cls.check_config(data_cfg)
