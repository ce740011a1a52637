"""Block-level reading and writing of a round's arrays: what a streaming merge uses.

A committed round's arrays are read block by block (`iter_blocks` / `common_blocks`
give chunk-aligned blocks, `open_array` + `read_block` read one, every chunk checked
against the manifest's digests), and a new round's arrays are written block by block
(`BlockWriter`, hashing each chunk as it goes, with the record format of
`store.write_arrays`). Blocks are whole chunks, so several writers (the workers of one
coordinator) can write disjoint blocks of one array and combine their records with
`store.merge_records`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from tapestry_jax.buckets import Bucket, describe_error
from tapestry_jax.exchange.store import (
    ExchangeError, _array_key, _await_store, _check_prefix, _check_record, _chunk_aligned,
    _chunk_region, _finish, _flat, _grid, _normalize, _open_for_read, _overlapping, _read,
    _record_problems, _slices, _verify_chunk, _where, _zarr_metadata, chunk_digest, np_dtype)

def iter_blocks(record: Mapping, max_block_bytes: int) -> Iterator[tuple[slice, ...]]:
  """Chunk-aligned blocks that cover the array exactly once, in a fixed order.

  A block is a run of whole chunk-rows along the leading axis spanning all other axes,
  as many as fit in `max_block_bytes` (at least one). When one chunk-row alone is too
  big, blocks are single chunks in C order of the chunk grid.
  """
  if max_block_bytes <= 0:
    raise ExchangeError(f"max_block_bytes must be positive, got {max_block_bytes}")
  problems = _record_problems("record", record)
  if problems:
    raise ExchangeError(f"bad array record: {problems[0]}")
  shape, chunk = tuple(record["shape"]), tuple(record["chunk_shape"])
  if not shape:
    yield ()
    return
  grid = _grid(shape, chunk)
  itemsize = np_dtype(record["dtype"]).itemsize
  row_bytes = chunk[0] * math.prod(shape[1:]) * itemsize
  rest = tuple(slice(0, s) for s in shape[1:])
  if row_bytes <= max_block_bytes:
    rows = max(1, max_block_bytes // max(1, row_bytes))
    for i in range(0, grid[0], rows):
      yield (slice(i * chunk[0], min((i + rows) * chunk[0], shape[0])),) + rest
    return
  for coord in itertools.product(*(range(g) for g in grid)):
    yield _slices(_chunk_region(coord, chunk, shape))


def open_array(bucket: Bucket, prefix: str, name: str, record: Mapping) -> ts.Future:
  """Starts opening a stored array for reading and returns the future TensorStore.

  Pass it (or its result) as `read_block(..., store=...)` to read many blocks of one
  array without reopening it (and re-reading its metadata) for every block.
  """
  prefix = _check_prefix(bucket, prefix)
  _check_record(bucket, prefix, name, record)
  return _open_for_read(bucket, prefix, name, record)


def read_block(bucket: Bucket, prefix: str, name: str, record: Mapping,
               index: tuple[slice, ...], *, verify: bool = True,
               store: ts.TensorStore | ts.Future | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
  """Reads one chunk-aligned block (e.g. from `iter_blocks`) of a stored array on the
  host, checking every chunk in it against the record's digests when `verify`.

  `store` is the array opened by `open_array` (opened here when None). `out`, a
  C-contiguous array of the block's shape and dtype, receives the block and is
  returned: reading into reused, aligned buffers saves an allocation per block and lets
  JAX on CPU use the data without copying it.
  """
  prefix = _check_prefix(bucket, prefix)
  _check_record(bucket, prefix, name, record)
  shape, chunk = tuple(record["shape"]), tuple(record["chunk_shape"])
  if len(tuple(index)) != len(shape):
    raise ExchangeError(f"{_where(bucket, prefix, name)}: block index {index} has rank "
                        f"{len(tuple(index))}, array has rank {len(shape)}")
  region = _normalize(index, shape)
  if not _chunk_aligned(region, chunk, shape):
    raise ExchangeError(f"{_where(bucket, prefix, name)}: block {region} is not aligned to "
                        f"chunks {chunk}")
  if store is None:
    store = _open_for_read(bucket, prefix, name, record)
  if isinstance(store, ts.Future):
    store = _await_store(bucket, prefix, name, store)
  source = store[_slices(region)]
  if out is None:
    block = _read(bucket, prefix, name, source.read())
  else:
    want = tuple(b - a for a, b in region)
    if (tuple(out.shape) != want or out.dtype != np_dtype(record["dtype"])
        or not out.flags.c_contiguous or not out.flags.writeable):
      raise ExchangeError(f"{_where(bucket, prefix, name)}: `out` must be a writable "
                          f"C-contiguous {record['dtype']}{list(want)} array, got "
                          f"{out.dtype}{list(out.shape)}")
    _read(bucket, prefix, name, ts.array(out, copy=False, write=True).write(source))
    block = out
  bucket.record_transfer(read=block.nbytes)
  if verify:
    for coord in _overlapping(region, chunk):
      local = tuple(slice(a - r, b - r) for (a, b), (r, _) in
                    zip(_chunk_region(coord, chunk, shape), region))
      _verify_chunk(bucket, prefix, name, record, coord, block[local], chunk_digest(block[local]))
  return block


class BlockWriter:
  """Writes one zarr3 array of a round block by block, hashing each chunk as it goes
  (the same record format as `exchange.write_arrays`).

  With `hasher` (an executor), chunks are hashed there instead of in the caller."""

  def __init__(self, bucket: Bucket, prefix: str, name: str, shape, dtype, chunk, *,
               hasher: concurrent.futures.Executor | None = None):
    self.bucket, self.prefix, self.name = bucket, prefix, name
    self.shape, self.dtype, self.chunk = tuple(shape), np.dtype(dtype), tuple(chunk)
    self.grid = _grid(self.shape, self.chunk)
    self.digests: list[Any] = [None] * math.prod(self.grid)
    spec = {"driver": "zarr3",
            "kvstore": bucket.array_spec(_array_key(prefix, name)),
            "metadata": dict(_zarr_metadata(self.shape, self.dtype.name, self.chunk),
                             codecs=[{"name": "bytes", "configuration": {"endian": "little"}}])}
    # Create-or-open, never delete: the workers of one coordinator write disjoint blocks
    # of the same array, and a redo into the same attempt rewrites every block.
    self._open = ts.open(spec, create=True, open=True, context=bucket.context)
    self._hasher = hasher
    self._pending: list[Any] = []
    self.nbytes = 0

  def write(self, index: tuple[slice, ...], data: np.ndarray):
    """Starts writing `data` at `index`; returns the write's future (durable when done).
    `data` must not change until then."""
    region = _normalize(index, self.shape)
    data = np.asarray(data, dtype=self.dtype, order="C")
    store = self._result(self._open, "create")
    # Callers hand over `data` (never modified afterwards), so TensorStore need not copy it.
    fut = store[_slices(region)].write(
        data, can_reference_source_data_indefinitely=True)
    self._pending.append(fut)
    for coord in _overlapping(region, self.chunk):
      creg = _chunk_region(coord, self.chunk, self.shape)
      local = tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(creg, region))
      i = _flat(coord, self.grid)
      self.digests[i] = (self._hasher.submit(chunk_digest, data[local]) if self._hasher
                         else chunk_digest(data[local]))
    self.nbytes += data.nbytes
    return fut

  def wait(self, fut) -> None:
    """Waits for one write returned by `write`, raising ExchangeError if it failed."""
    self._result(fut, "write")

  def _result(self, fut, what: str):
    try:
      return fut.result()
    except Exception as e:  # noqa: BLE001
      raise ExchangeError(f"array {self.name!r} (bucket {self.bucket.url}, round {self.prefix}): "
                          f"{what} failed: {describe_error(e)}") from None

  def finish(self, partial: bool = False) -> dict:
    """Waits until every block is durable; returns the array's record. `partial`: this
    writer wrote only some blocks (one worker's range); the other chunks' digests are
    None, to be combined with the other writers' records by `store.merge_records`."""
    self.wait_all()
    digests = [d.result() if isinstance(d, concurrent.futures.Future) else d
               for d in self.digests]
    if not partial and any(d is None for d in digests):
      raise ExchangeError(f"array {self.name!r}: blocks did not cover the array")
    self.bucket.record_transfer(written=self.nbytes)
    return _finish({"shape": list(self.shape), "dtype": self.dtype.name,
                    "chunk_shape": list(self.chunk), "codec": "raw",
                    "chunk_digests": digests})

  def wait_all(self, ignore_errors: bool = False) -> None:
    """Waits for the open and every write issued so far (raising the first failure
    unless `ignore_errors`: an abandoned attempt only needs its writes to have landed)."""
    for fut in [self._open, *self._pending]:
      try:
        self._result(fut, "write")
      except ExchangeError:
        if not ignore_errors:
          raise
    self._pending = []


def common_blocks(records: Sequence[Mapping], max_block_bytes: int, *, whole_rows: bool = False,
                  last_multiple: int = 1):
  """(block chunk shape, blocks): blocks of the first record's array aligned to every
  record's chunk grid, grouped along the leading axis up to `max_block_bytes`. An array
  with no elements is one (empty) block, so that its records are still written.

  `whole_rows`: every block spans the last axis whole and is aligned to the chunks of the
  other axes only, where the records must agree in shape (their last axes may differ:
  the codes of a row, `update_codecs`); a block of another record spans its own last
  axis whole. `last_multiple` (otherwise): the blocks' bounds along the last axis are
  also multiples of it (or the array's end), e.g. so that they hold whole blocks of
  block-scaled codes (`quantize.BlockFormat`)."""
  shape = tuple(records[0]["shape"])
  if not shape:
    return (), [()]
  last = len(shape) - 1
  if whole_rows:
    step = tuple(max(1, min(s, math.lcm(*(int(r["chunk_shape"][d]) for r in records))))
                 for d, s in enumerate(shape[:last])) + (max(1, shape[-1]),)
  else:
    step = tuple(max(1, min(s, math.lcm(*(int(r["chunk_shape"][d]) for r in records),
                                        int(last_multiple) if d == last else 1)))
                 for d, s in enumerate(shape))
  if 0 in shape:
    return step, [tuple(slice(0, s) for s in shape)]
  itemsize = np_dtype(records[0]["dtype"]).itemsize
  cell = itemsize * math.prod(step)
  rows = max(1, max_block_bytes // max(1, cell)) if step[1:] == shape[1:] else 1
  blocks = []
  for i0 in range(0, shape[0], step[0] * rows):
    lead = slice(i0, min(i0 + step[0] * rows, shape[0]))
    others = [range(0, s, st) for s, st in zip(shape[1:], step[1:])]
    for starts in (np.ndindex(*[len(o) for o in others]) if others else [()]):
      rest = tuple(slice(o[k], min(o[k] + st, s))
                   for o, k, st, s in zip(others, starts, step[1:], shape[1:]))
      blocks.append((lead,) + rest)
  return step, blocks
