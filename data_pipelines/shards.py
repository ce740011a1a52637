"""The global batch as S independent streams, so it does not depend on the process count.

Data flow: documents -> S streams (stream s reads documents s, s+S, ...; each a grain
pipeline from pipeline.make_dataset with global_batch_size / S rows per batch) ->
process i of n owns streams [i*S/n, (i+1)*S/n) and reads only those -> its rows of the
global batch are its streams' batches concatenated in stream order -> Trainer.shard_batch.

The global batch at step t is therefore a function of (data config, seed, t) alone: a
fixed S (`data.shards`) gives the same batches on 1, 2 or S processes, and a data
position (every stream's grain state, keyed by stream) restores onto any process count
that divides S. `data.shards = 0` means one stream per process (the batches then depend
on the process count). This is grain's ElasticIterator idea with whole streams, so the
packing of each stream stays as it is.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from data_pipelines import pipeline
from data_pipelines import tokenizers
from data_pipelines.errors import DataError


def num_streams(data_cfg: ml_collections.ConfigDict, global_batch_size: int,
                process_count: int | None = None) -> int:
  """S, from `data.shards` (0 = the process count); DataError, one line, unless the
  processes and the global batch split evenly over the streams."""
  n = jax.process_count() if process_count is None else process_count
  shards = data_cfg.shards
  if not isinstance(shards, int) or shards < 0:
    raise DataError(f"data.shards must be a non-negative integer, got {shards!r}")
  S = shards or n
  if S % n:
    raise DataError(f"data.shards={S} is not a multiple of the {n} processes (every "
                    f"process reads the same number of streams)")
  if global_batch_size % S:
    raise DataError(f"train.global_batch_size={global_batch_size} is not divisible by "
                    f"data.shards={S} (every stream gives the same number of rows)")
  return S


def owned_streams(S: int, process_index: int, process_count: int) -> range:
  """The streams process `process_index` of `process_count` reads."""
  per = S // process_count
  return range(process_index * per, (process_index + 1) * per)


class StreamsIterator:
  """This process's rows of each global batch: its streams' batches, in stream order.

  `get_state()` is {"num_streams": S, "streams": {"s": grain state}} for the owned
  streams; `set_state` takes any dict holding at least the owned streams' states, so
  the states of several processes, merged, restore onto another process count.
  """

  def __init__(self, datasets: dict[int, Any], S: int, *, finite: bool,
               all_done: Callable[[bool], bool] | None = None):
    self.num_streams = S
    self.streams = tuple(sorted(datasets))
    self._iters = {s: iter(ds) for s, ds in datasets.items()}
    self._finite = finite
    self._all_done = all_done or _all_processes_done
    self._done: set[int] = set()
    self._spec: dict[str, tuple[tuple[int, ...], Any]] | None = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = []
    for s in self.streams:
      batch = None
      if s not in self._done:
        try:
          batch = next(self._iters[s])
          if self._spec is None:
            self._spec = {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
        except StopIteration:
          if not self._finite:
            raise
          self._done.add(s)
      batches.append(batch)
    if self._finite and self._all_done(self.exhausted):
      raise StopIteration
    if self._spec is None:  # Every owned stream ended before its first batch.
      raise DataError("an eval stream gave no batch at all")
    # An ended eval stream pads with empty rows (segment_ids 0) while others still run.
    batches = [b if b is not None else {k: np.zeros(*v) for k, v in self._spec.items()}
               for b in batches]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  @property
  def exhausted(self) -> bool:
    """Whether every stream of this process has ended (eval)."""
    return len(self._done) == len(self.streams)

  def get_state(self) -> dict[str, Any]:
    return {"num_streams": self.num_streams,
            "streams": {str(s): self._iters[s].get_state() for s in self.streams}}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("num_streams") != self.num_streams:
      raise DataError(f"the saved data position has {state.get('num_streams')} streams, "
                      f"this run {self.num_streams}: set data.shards="
                      f"{state.get('num_streams')} to resume it")
    for s in self.streams:
      self._iters[s].set_state(state["streams"][str(s)])


def _all_processes_done(local_done: bool) -> bool:
  """Whether every process's eval streams have ended (all must stop at one batch)."""
  if jax.process_count() == 1:
    return local_done
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(local_done))))


def make_iterator(data_cfg: ml_collections.ConfigDict, *, split: str, global_batch_size: int,
                  seed: int | None = None, tokenizer: tokenizers.Tokenizer | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  all_done: Callable[[bool], bool] | None = None) -> StreamsIterator:
  """This process's iterator over `split`: S streams of global_batch_size / S rows each.

  train: every stream repeats forever. eval: one pass; a stream that ends gives
  zero-padded rows until all streams (of all processes) have ended.
  `all_done(local_done) -> bool` is how the processes agree that an eval pass ended
  (default: a tiny collective; tests that simulate processes pass their own).
  DataError, one line, for a bad layout or a stream without data.
  """
  n = jax.process_count() if process_count is None else process_count
  i = jax.process_index() if process_index is None else process_index
  S = num_streams(data_cfg, global_batch_size, n)
  tokenizer = tokenizer or tokenizers.make_tokenizer(data_cfg)
  datasets = {s: pipeline.make_dataset(data_cfg, split=split, batch_size=global_batch_size // S,
                                       seed=seed, tokenizer=tokenizer, shard=(s, S))
              for s in owned_streams(S, i, n)}
  return StreamsIterator(datasets, S, finite=split != "train", all_done=all_done)
