"""The coordinator's streaming merge: K committed site updates + the previous global
round -> the next global round, block by block.

For every parameter, blocks are aligned to the chunks of every input (the least common
multiple of their chunk sizes per dimension), so each block is read as whole chunks and
checked against the writers' digests. A block of the previous global params, of the
outer state and of each site's update is read (the K site reads concurrently), merged
by `outer.merge_block` (the same jitted function the simulation uses on whole arrays,
bit-identical by construction), and written to the new round while the next block is
read. Peak memory is a few blocks times (K + 3), independent of the model's size.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optax
import tensorstore as ts

from tapestry_jax import exchange
from tapestry_jax import outer as outer_lib
from tapestry_jax.buckets import Bucket, describe_error
from tapestry_jax.exchange import ExchangeError

DEFAULT_MAX_BLOCK_BYTES = 16 << 20


class BlockWriter:
  """Writes one zarr3 array of a round block by block, hashing each chunk as it goes
  (the same record format as `exchange.write_arrays`)."""

  def __init__(self, bucket: Bucket, prefix: str, name: str, shape, dtype, chunk):
    self.bucket, self.prefix, self.name = bucket, prefix, name
    self.shape, self.dtype, self.chunk = tuple(shape), np.dtype(dtype), tuple(chunk)
    self.grid = exchange._grid(self.shape, self.chunk)  # pylint: disable=protected-access
    self.digests: list[str | None] = [None] * math.prod(self.grid)
    spec = {"driver": "zarr3",
            "kvstore": bucket.array_spec(exchange._array_key(prefix, name)),  # pylint: disable=protected-access
            "metadata": dict(exchange._zarr_metadata(self.shape, self.dtype.name, self.chunk),  # pylint: disable=protected-access
                             codecs=[{"name": "bytes", "configuration": {"endian": "little"}}])}
    self._open = ts.open(spec, create=True, delete_existing=True, context=bucket.context)
    self._pending: list[Any] = []
    self.nbytes = 0

  def write(self, index: tuple[slice, ...], data: np.ndarray) -> None:
    region = exchange._normalize(index, self.shape)  # pylint: disable=protected-access
    data = np.asarray(data, dtype=self.dtype, order="C")
    store = self._result(self._open, "create")
    self._pending.append(store[exchange._slices(region)].write(data))  # pylint: disable=protected-access
    for coord in exchange._overlapping(region, self.chunk):  # pylint: disable=protected-access
      creg = exchange._chunk_region(coord, self.chunk, self.shape)  # pylint: disable=protected-access
      local = tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(creg, region))
      self.digests[exchange._flat(coord, self.grid)] = exchange._digest(data[local])  # pylint: disable=protected-access
    self.nbytes += data.nbytes

  def _result(self, fut, what: str):
    try:
      return fut.result()
    except Exception as e:  # noqa: BLE001
      raise ExchangeError(f"array {self.name!r} (bucket {self.bucket.url}, round {self.prefix}): "
                          f"{what} failed: {describe_error(e)}") from None

  def finish(self) -> dict:
    """Waits until every block is durable; returns the array's record."""
    for fut in self._pending:
      self._result(fut, "write")
    if any(d is None for d in self.digests):
      raise ExchangeError(f"array {self.name!r}: blocks did not cover the array")
    self.bucket.record_transfer(written=self.nbytes)
    return exchange._finish({"shape": list(self.shape), "dtype": self.dtype.name,  # pylint: disable=protected-access
                             "chunk_shape": list(self.chunk), "codec": "raw",
                             "chunk_digests": list(self.digests)})


def common_blocks(records: Sequence[Mapping], max_block_bytes: int):
  """(block chunk shape, blocks): blocks aligned to every record's chunk grid, grouped
  along the leading axis up to `max_block_bytes`."""
  shape = tuple(records[0]["shape"])
  if not shape:
    return (), [()]
  step = tuple(min(s, math.lcm(*(int(r["chunk_shape"][d]) for r in records)))
               for d, s in enumerate(shape))
  itemsize = exchange._np_dtype(records[0]["dtype"]).itemsize  # pylint: disable=protected-access
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


def merge_round(tx: optax.GradientTransformation, glob: Bucket, base_prefix: str,
                base_manifest: Mapping, inputs: Sequence[tuple[Bucket, str, Mapping]],
                weights: Sequence[float], out: Bucket, out_prefix: str, *,
                max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> dict[str, dict]:
  """Merges `inputs` ((site bucket, prefix, manifest), in the fixed merge order) into
  the global round at `out_prefix`; returns the new round's array records
  (`params/<name>` and `outer/<name>/<leaf>`). Manifests must already be schema-checked."""
  arrays = base_manifest["arrays"]
  names = sorted(n[len("params/"):] for n in arrays if n.startswith("params/"))
  weights = np.asarray(weights, np.float32)
  records: dict[str, dict] = {}
  if len(inputs) != len(weights):
    raise ValueError(f"{len(inputs)} inputs but {len(weights)} weights")
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, len(inputs) + 2)) as pool:
    for name in names:
      prec = arrays[f"params/{name}"]
      srecs = [m["arrays"][name] for _, _, m in inputs]
      leaf_names = sorted(k[len(f"outer/{name}/"):] for k in arrays
                          if k.startswith(f"outer/{name}/"))
      param_like = np.empty(prec["shape"], exchange._np_dtype(prec["dtype"]))  # pylint: disable=protected-access
      blockable = outer_lib.blockable_leaves(tx, param_like)
      if sorted(blockable) != leaf_names:
        raise ExchangeError(f"global round {base_prefix}: outer state of {name!r} has leaves "
                            f"{leaf_names}, the outer optimizer needs {sorted(blockable)}")
      whole = {leaf: exchange.read_block(
                   glob, base_prefix, f"outer/{name}/{leaf}", arrays[f"outer/{name}/{leaf}"],
                   tuple(slice(0, s) for s in arrays[f"outer/{name}/{leaf}"]["shape"]))
               for leaf in leaf_names if not blockable[leaf]}
      chunk, blocks = common_blocks(
          [prec, *srecs, *(arrays[f"outer/{name}/{l}"] for l in leaf_names if blockable[l])],
          max_block_bytes)
      writers = {"params": BlockWriter(out, out_prefix, f"params/{name}", prec["shape"],
                                       exchange._np_dtype(prec["dtype"]), chunk)}  # pylint: disable=protected-access
      for leaf in leaf_names:
        r = arrays[f"outer/{name}/{leaf}"]
        writers[leaf] = BlockWriter(out, out_prefix, f"outer/{name}/{leaf}", r["shape"],
                                    exchange._np_dtype(r["dtype"]),  # pylint: disable=protected-access
                                    chunk if blockable[leaf] else r["shape"])

      def read(idx):
        futs = [pool.submit(exchange.read_block, b, p, name, r, idx)
                for (b, p, _), r in zip(inputs, srecs)]
        g = exchange.read_block(glob, base_prefix, f"params/{name}", prec, idx)
        leaves = {l: exchange.read_block(glob, base_prefix, f"outer/{name}/{l}",
                                         arrays[f"outer/{name}/{l}"], idx)
                  for l in leaf_names if blockable[l]}
        return g, leaves, [f.result() for f in futs]

      nxt = pool.submit(read, blocks[0])
      for i, idx in enumerate(blocks):
        g, leaves, deltas = nxt.result()
        if i + 1 < len(blocks):
          nxt = pool.submit(read, blocks[i + 1])  # Read ahead while this block merges.
        state = outer_lib.state_from_leaves(tx, g, {**whole, **leaves})
        new_g, new_state = outer_lib.merge_block(tx, g, state, deltas, weights)
        writers["params"].write(idx, np.asarray(new_g))
        new_leaves = outer_lib.state_leaves(new_state)
        for leaf in leaf_names:
          if blockable[leaf]:
            writers[leaf].write(idx, np.asarray(new_leaves[leaf]))
          elif i == 0:
            shape = arrays[f"outer/{name}/{leaf}"]["shape"]
            writers[leaf].write(tuple(slice(0, s) for s in shape), np.asarray(new_leaves[leaf]))
      records[f"params/{name}"] = writers["params"].finish()
      for leaf in leaf_names:
        records[f"outer/{name}/{leaf}"] = writers[leaf].finish()
  return records
