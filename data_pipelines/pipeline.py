"""The input pipeline: a source's documents -> packed, batched int32 arrays.

Data flow (grain, all steps deterministic and checkpointable):
  source.documents(split)           MapDataset of str / int32 arrays (random access)
  -> [s::S]                         one stream's documents (shards.py; default: this
                                    JAX process's, [process_index::process_count])
  -> train: shuffle(seed) + repeat  a new permutation every epoch, forever
     eval:  as is                   one ordered pass
  -> tokenize                       [BOS] + ids + [EOS], int32 (threaded read-ahead)
  -> split into pieces              <= seq_len + 1 tokens, consecutive pieces overlap
                                    by one token so every token is a target once
  -> inputs = piece[:-1], targets = piece[1:]
  -> first-fit packing              rows of seq_len; segment_ids / positions per piece
  -> + target_bytes                 tokenizer.token_bytes[targets], 0 on padding
  -> batch                          train: drop remainder; eval: zero-pad the last
  -> thread prefetch                overlaps host work with the device step

`pack_documents` runs the same steps from "tokenize" on, as for eval, over documents
the caller gives (no source, no shards).

Iterator state is grain's: a few integers (document index, piece index, packed row),
never buffers; restoring it replays the packing window and yields the same batches.
"""

import functools
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from data_pipelines import config as config_lib
from data_pipelines import registry
from data_pipelines import tokenizers
from data_pipelines.errors import DataError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "target_bytes")


def _tokenize(doc: str | np.ndarray, *, tokenizer: tokenizers.Tokenizer,
              pretokenized: bool) -> np.ndarray:
  ids = np.asarray(doc, np.int32) if pretokenized else tokenizer.encode(doc)
  return np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)


class _SplitIntoPieces(grain.experimental.FlatMapTransform):
  """Cuts a token sequence into (inputs, targets) pieces of at most seq_len tokens."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len
    self.max_fan_out = 1 << 30  # Only read by MapDataset flat maps; unbounded here.

  def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    # Piece k covers tokens[k*L : k*L + L + 1]: the shared boundary token is the last
    # target of piece k and the first input of piece k+1, so no target is lost.
    pieces = []
    for start in range(0, len(tokens) - 1, self._seq_len):
      piece = tokens[start:start + self._seq_len + 1]
      pieces.append({"inputs": piece[:-1], "targets": piece[1:]})
    return pieces


def _finish_row(row: dict[str, np.ndarray], *, token_bytes: np.ndarray) -> dict[str, np.ndarray]:
  segment_ids = row["inputs_segment_ids"]
  targets = row["targets"]
  return {
      "inputs": row["inputs"],
      "targets": targets,
      "segment_ids": segment_ids,
      "positions": row["inputs_positions"],
      "target_bytes": np.where(segment_ids > 0, token_bytes[targets], 0).astype(np.int32),
  }


def _check_enough_tokens(tokens: grain.MapDataset, seq_len: int, what: str) -> None:
  """Raises DataError unless the shard holds at least one full piece (seq_len + 1).

  Stops as soon as enough tokens are seen, so it costs one document in practice.
  """
  total = 0
  for i in range(len(tokens)):
    total += len(tokens[i])
    if total >= seq_len + 1:
      return
  raise DataError(f"{what} has only {total} tokens (with BOS/EOS), fewer than one "
                  f"sequence of data.seq_len + 1 = {seq_len + 1}; add data or lower "
                  "data.seq_len")


def make_dataset(data_cfg: ml_collections.ConfigDict, *, split: str, batch_size: int,
                 seed: int | None = None,
                 tokenizer: tokenizers.Tokenizer | None = None,
                 shard: tuple[int, int] | None = None) -> grain.IterDataset:
  """Builds the packed, batched dataset of `split` for one stream of documents.

  Args:
    data_cfg: the data config (see config.default_config()); validated here too.
    split: "train" (shuffled, repeats forever) or "eval" (one ordered pass; the last
      batch is zero-padded, so padded rows have segment_ids == 0).
    batch_size: rows per batch of this stream.
    seed: shuffle seed; defaults to data_cfg.seed.
    tokenizer: a prebuilt tokenizer (default: make_tokenizer(data_cfg)).
    shard: (s, S): read documents s, s+S, ... (default: this JAX process's share,
      (process_index, process_count)).

  Returns:
    A grain.IterDataset whose elements are dicts of int32 [batch_size, seq_len] arrays
    `inputs`, `targets`, `segment_ids` (1..k per packed piece, 0 = padding),
    `positions` (0-based within the piece) and `target_bytes` (UTF-8 bytes of each
    target token, 0 on padding). Its iterators have JSON-serialisable
    get_state()/set_state().

  Raises:
    DataError: bad config or input, an empty split, or a split (shard) with fewer
      tokens than one sequence.
  """
  config_lib.validate(data_cfg)
  registry.check_split(split)
  if not isinstance(batch_size, int) or batch_size < 1:
    raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
  seed = data_cfg.seed if seed is None else seed
  seq_len = data_cfg.seq_len
  tokenizer = tokenizer or tokenizers.make_tokenizer(data_cfg)
  source = registry.get_source(data_cfg.source)(data_cfg)

  docs = source.documents(split)
  what = f"the {split} split of data.source {data_cfg.source!r}"
  if len(docs) == 0:
    hint = " (data.eval_fraction is 0 or the files are too small)" if split == "eval" else ""
    raise DataError(f"{what} is empty{hint}")
  if shard is None:
    index, count, unit, units = jax.process_index(), jax.process_count(), "process", "processes"
  else:
    (index, count), unit, units = shard, "stream", "streams (data.shards)"
  docs = docs[index::count]
  if count > 1:
    what += f" on {unit} {index} of {count}"
  if len(docs) == 0:
    raise DataError(f"{what} is empty: fewer documents than {units}")

  tokens = docs.map(functools.partial(
      _tokenize, tokenizer=tokenizer, pretokenized=source.pretokenized))
  _check_enough_tokens(tokens, seq_len, what)
  return _packed_batches(tokens, data_cfg, train=split == "train", batch_size=batch_size,
                         seed=seed, tokenizer=tokenizer)


def pack_documents(documents: grain.MapDataset, data_cfg: ml_collections.ConfigDict, *,
                   batch_size: int, tokenizer: tokenizers.Tokenizer,
                   pretokenized: bool = False) -> grain.IterDataset:
  """`documents` (str, or int32 ids if `pretokenized`) the way `make_dataset` treats an
  eval split: one ordered pass, packed into rows of `data_cfg.seq_len`, the last batch
  zero-padded to `batch_size`. For text no source holds (e.g. a whole file a model is
  evaluated on, tapestry_jax/evaluate.py); a short text is fine (its row is padded), no
  documents give no batches."""
  if not isinstance(batch_size, int) or batch_size < 1:
    raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
  tokens = documents.map(functools.partial(
      _tokenize, tokenizer=tokenizer, pretokenized=pretokenized))
  return _packed_batches(tokens, data_cfg, train=False, batch_size=batch_size,
                         seed=data_cfg.seed, tokenizer=tokenizer)


def _packed_batches(tokens: grain.MapDataset, data_cfg: ml_collections.ConfigDict, *,
                    train: bool, batch_size: int, seed: int,
                    tokenizer: tokenizers.Tokenizer) -> grain.IterDataset:
  """Tokenized documents -> (train: shuffled, repeated) pieces -> packed rows -> batches."""
  seq_len = data_cfg.seq_len
  if train:
    # Shuffling the random-access dataset then repeating gives every epoch its own
    # permutation (grain reseeds per epoch), and the state is just an index.
    tokens = tokens.shuffle(seed=seed % 2**32).repeat()
  ds = tokens.to_iter_dataset(grain.ReadOptions(
      num_threads=data_cfg.prefetch_threads,
      prefetch_buffer_size=data_cfg.prefetch_buffer))
  ds = grain.experimental.FlatMapIterDataset(ds, _SplitIntoPieces(seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=data_cfg.packing_bins or batch_size,
      max_sequences_per_bin=data_cfg.get("max_documents_per_row", 0) or None,
      # Shuffled rows keep one batch from holding only the pieces of one long doc.
      shuffle_bins=train, seed=(seed + 1) % 2**32)
  ds = ds.map(functools.partial(
      _finish_row, token_bytes=np.asarray(tokenizer.token_bytes, np.int32)))
  if train:
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = ds.batch(batch_size, batch_fn=functools.partial(
        grain.experimental.batch_and_pad, batch_size=batch_size))
  return grain.experimental.ThreadPrefetchIterDataset(
      ds, prefetch_buffer_size=min(data_cfg.prefetch_buffer, 8))


def element_spec(data_cfg: ml_collections.ConfigDict,
                 batch_size: int) -> dict[str, Any]:
  """Shapes/dtypes of one batch (e.g. to compile the train step before data arrives)."""
  shape = (batch_size, data_cfg.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, np.int32) for k in BATCH_KEYS}
