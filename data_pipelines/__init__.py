"""Tapestry-JAX data pipelines: sources -> tokenizer -> packed int32 batches.

Public API (what the trainer relies on):
  DataError                      bad data config or input (a ValueError)
  default_config(), validate()   the `data` config section and its cheap checks
  make_tokenizer(data_cfg)       byte or SentencePiece tokenizer with token_bytes
  make_dataset(data_cfg, *, split, batch_size, seed=None, tokenizer=None)
                                 a grain.IterDataset of one stream's batches (pipeline.py)
  make_iterator(data_cfg, *, split, global_batch_size, seed=None, ...)
                                 this process's rows of the global batch from its
                                 data.shards streams, process-count invariant (shards.py)
  pack_documents(documents, data_cfg, *, batch_size, tokenizer)
                                 given documents as one eval pass (pipeline.py)
  register, source_names         the source registry (see README.md)
  write_array_record(path, docs) writes pre-tokenized documents
"""

from data_pipelines.config import default_config
from data_pipelines.config import validate
from data_pipelines.errors import DataError
from data_pipelines.pipeline import element_spec
from data_pipelines.pipeline import make_dataset
from data_pipelines.pipeline import pack_documents
from data_pipelines.registry import register
from data_pipelines.registry import source_names
from data_pipelines.shards import make_iterator
from data_pipelines.sources.array_record import write_array_record
from data_pipelines.tokenizers import make_tokenizer

__all__ = [
    "DataError", "default_config", "element_spec", "make_dataset", "make_iterator",
    "make_tokenizer", "pack_documents",
    "register", "source_names", "validate", "write_array_record",
]
