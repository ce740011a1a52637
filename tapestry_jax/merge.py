"""The coordinator's streaming merge: K committed site updates + the previous global
round -> the next global round, block by block.

For every parameter, blocks are aligned to the chunks of every input (the least common
multiple of their chunk sizes per dimension), so each block is read as whole chunks and
checked against the writers' digests. A block of the previous global params, of the
outer state and of each site's update is read (all concurrently, into reused 64-byte
aligned buffers that JAX on CPU uses without a copy), merged by `outer.merge_block` (the
same jitted function the simulation uses on whole arrays, bit-identical by
construction), and written to the new round. The blocks of all parameters form one
pipeline: the merged blocks are hashed and written while the next blocks are read (and
`read_ahead` more block sets are read while one merges). Peak memory is
(read_ahead + 1) block sets of K + 1 + (outer-state leaves) blocks, plus up to
`MAX_PENDING_WRITE_BLOCKS` + 1 merged blocks being written, plus TensorStore's transient
copy of each chunk in flight: independent of the model's size.

No committed global round holds a NaN or Inf. Every merged block comes with a flag
(`outer.merge_block(..., with_finite=True)`, computed in the same jitted call) saying
whether its merged pseudo-gradient, new params and new outer state are all finite. With
the mean that flag covers the sites' values too (a NaN or Inf in any of them propagates
into the weighted sum), so their blocks are scanned only when it is down, to name the
site (NonFiniteUpdate); the robust aggregators can sort a NaN or Inf out of their result,
so there every site block is scanned as it is read. Finite values whose merge overflows
float32 (a hostile site's 1e38s under Nesterov's momentum, with no norm clip) refuse the
update with the largest |coefficient * value| in the block (BadUpdate). The simulation
(`outer.outer_step`) has no such refusal: there the same values give an Inf.

Robust merging (`outer_config.default_robust_config`): with clip_norm > 0 each site's update is
scaled by min(1, clip_norm / norm), where the norm is the one the site declared in its
signed manifest (`extra["update_norm"]`), so every update is read once. While its blocks
are read, the actual sum of squares of each update is accumulated (float64); after the
last block, an update whose actual norm is not the declared one is refused (BadUpdate)
before anything is committed. The trimmed-mean and median aggregators are coordinate-wise,
so they stream block by block like the mean.

The outer clip (`RoundMergeSpec.outer_clip_norm`) needs the global norm of the merged
pseudo-gradient before any block of it is applied: a first pass reads every update's blocks
(verified and finiteness-checked like the merge's), aggregates them and sums their squares;
the merge proper then reads them again with every coefficient scaled. It doubles the reads
of the updates, not the memory.

Shared moments (outer "moments", `outer.SharedMoments`): every site's update also holds
its first moment of each parameter (`outer.MOMENT_PREFIX` + name); those blocks are read,
verified and finiteness-checked like the deltas (a bad one refuses that site's update),
aggregated like them (a site's clip scale, from the norm of its delta, scales its moment
too), and the outer step takes both. The outer clip is refused there.

int8 and float8 updates (`tapestry_jax.quantize`) are read as their codes (float8's
checked for NaN codes like any float) and dequantized inside
`outer.merge_block` with the offset and scale of their signed records; their norms are
summed from the codes' histograms.
"""

from __future__ import annotations

# This module is exchange.py's block-level writer and reader: it uses its layout helpers.
# pylint: disable=protected-access

import collections
import concurrent.futures
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from tapestry_jax import exchange
from tapestry_jax import outer as outer_lib
from tapestry_jax import outer_config
from tapestry_jax import quantize
from tapestry_jax.buckets import Bucket, describe_error
from tapestry_jax.exchange import ExchangeError

DEFAULT_MAX_BLOCK_BYTES = 16 << 20
# Block sets read while another one merges. 0 still overlaps the reads of block i + 1
# with the hashing and writing of block i; 1 also overlaps them with its merge, at the
# cost of one more block set of memory. Reading and hashing dominate (the merge itself
# is a few fused elementwise passes), so on a 2-core host reading file:// buckets 1 was
# no faster than 0 and took ~200 MiB more for 8 sites with 16 MiB blocks
# (experiments/benchmarks/merge_throughput.py).
DEFAULT_READ_AHEAD = 0
# Merged blocks whose writes may be in flight before the merge waits for the oldest.
MAX_PENDING_WRITE_BLOCKS = 2
_FINITE_SLICE = 1 << 18  # Elements per finiteness scan (a 256 KiB mask).
_ALIGN = 64  # XLA:CPU uses host buffers aligned to 64 bytes without copying them.
# A declared update norm must match the norm of the values read to this relative
# tolerance (the two float64 sums add the same squares in different orders), plus this
# absolute one (for all-zero updates).
NORM_RTOL = 1e-4
NORM_ATOL = 1e-12


class BadUpdate(ExchangeError):
  """A site's update cannot be merged: found while its blocks are read, so nothing of the
  round is committed. `index` is the update's position in `merge_round`'s `inputs`,
  `name` the array's name, `reason` a short why (for the coordinator's log)."""

  def __init__(self, message: str, index: int, name: str, reason: str):
    super().__init__(message)
    self.index, self.name, self.reason = index, name, reason


class NonFiniteUpdate(BadUpdate):
  """A site's update holds a NaN or an infinity: merging it would poison the global
  model (a norm bound alone does not catch NaN)."""

  def __init__(self, message: str, index: int, name: str):
    super().__init__(message, index, name, f"non-finite values in array {name}")


class BlockWriter:
  """Writes one zarr3 array of a round block by block, hashing each chunk as it goes
  (the same record format as `exchange.write_arrays`).

  With `hasher` (an executor), chunks are hashed there instead of in the caller."""

  def __init__(self, bucket: Bucket, prefix: str, name: str, shape, dtype, chunk, *,
               hasher: concurrent.futures.Executor | None = None):
    self.bucket, self.prefix, self.name = bucket, prefix, name
    self.shape, self.dtype, self.chunk = tuple(shape), np.dtype(dtype), tuple(chunk)
    self.grid = exchange._grid(self.shape, self.chunk)
    self.digests: list[Any] = [None] * math.prod(self.grid)
    spec = {"driver": "zarr3",
            "kvstore": bucket.array_spec(exchange._array_key(prefix, name)),
            "metadata": dict(exchange._zarr_metadata(self.shape, self.dtype.name, self.chunk),
                             codecs=[{"name": "bytes", "configuration": {"endian": "little"}}])}
    self._open = ts.open(spec, create=True, delete_existing=True, context=bucket.context)
    self._hasher = hasher
    self._pending: list[Any] = []
    self.nbytes = 0

  def write(self, index: tuple[slice, ...], data: np.ndarray):
    """Starts writing `data` at `index`; returns the write's future (durable when done).
    `data` must not change until then."""
    region = exchange._normalize(index, self.shape)
    data = np.asarray(data, dtype=self.dtype, order="C")
    store = self._result(self._open, "create")
    # Callers hand over `data` (never modified afterwards), so TensorStore need not copy it.
    fut = store[exchange._slices(region)].write(
        data, can_reference_source_data_indefinitely=True)
    self._pending.append(fut)
    for coord in exchange._overlapping(region, self.chunk):
      creg = exchange._chunk_region(coord, self.chunk, self.shape)
      local = tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(creg, region))
      i = exchange._flat(coord, self.grid)
      self.digests[i] = (self._hasher.submit(exchange._digest, data[local]) if self._hasher
                         else exchange._digest(data[local]))
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

  def finish(self) -> dict:
    """Waits until every block is durable; returns the array's record."""
    for fut in self._pending:
      self._result(fut, "write")
    self._pending = []
    digests = [d.result() if isinstance(d, concurrent.futures.Future) else d
               for d in self.digests]
    if any(d is None for d in digests):
      raise ExchangeError(f"array {self.name!r}: blocks did not cover the array")
    self.bucket.record_transfer(written=self.nbytes)
    return exchange._finish({"shape": list(self.shape), "dtype": self.dtype.name,
                             "chunk_shape": list(self.chunk), "codec": "raw",
                             "chunk_digests": digests})


def common_blocks(records: Sequence[Mapping], max_block_bytes: int):
  """(block chunk shape, blocks): blocks aligned to every record's chunk grid, grouped
  along the leading axis up to `max_block_bytes`. An array with no elements is one
  (empty) block, so that its records are still written."""
  shape = tuple(records[0]["shape"])
  if not shape:
    return (), [()]
  step = tuple(max(1, min(s, math.lcm(*(int(r["chunk_shape"][d]) for r in records))))
               for d, s in enumerate(shape))
  if 0 in shape:
    return step, [tuple(slice(0, s) for s in shape)]
  itemsize = exchange._np_dtype(records[0]["dtype"]).itemsize
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


@dataclasses.dataclass
class _Param:
  """How one parameter is merged: its inputs (in merge order), blocks and writers."""
  name: str
  # (bucket, prefix, array name, record) of each block-wise input: the global params,
  # then the parameter-shaped outer-state leaves (sorted), then each site's update.
  sources: list[tuple[Bucket, str, str, Mapping]]
  leaves: list[str]  # blockable leaf names, in `sources` order
  whole: dict[str, np.ndarray]  # leaves read whole (scalars such as Adam's count)
  whole_records: dict[str, Mapping]
  chunk: tuple[int, ...]
  blocks: list[tuple[slice, ...]]
  stores: list[Any] | None = None  # ts.open futures, started when the first block is read
  writers: dict[str, BlockWriter] | None = None
  num_sites: int = 0  # Site sources: num_sites updates (then as many first moments)


class _Buffers:
  """A fixed set of reusable, 64-byte aligned host buffers of `capacity` bytes each."""

  def __init__(self, count: int, capacity: int):
    self._free = []
    for _ in range(count):
      raw = np.empty(capacity + _ALIGN, np.uint8)
      off = (-raw.ctypes.data) % _ALIGN
      self._free.append(raw[off:off + capacity])

  def take(self, shape, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(raw buffer, a view of it with `shape` and `dtype`); raises when none is free."""
    raw = self._free.pop()
    n = math.prod(shape) * np.dtype(dtype).itemsize
    return raw, raw[:n].view(dtype).reshape(shape)

  def give(self, raws: Sequence[np.ndarray]) -> None:
    self._free.extend(raws)


def _own(x: np.ndarray, buffers: Sequence[np.ndarray]) -> np.ndarray:
  """`x`, copied if it lies in one of `buffers` (which are about to be reused)."""
  return x.copy() if any(np.may_share_memory(x, b) for b in buffers) else x


def _plan(tx, glob: Bucket, base_prefix: str, arrays: Mapping, name: str,
          inputs: Sequence[tuple[Bucket, str, Mapping]], max_block_bytes: int) -> _Param:
  prec = arrays[f"params/{name}"]
  leaf_names = sorted(k[len(f"outer/{name}/"):] for k in arrays if k.startswith(f"outer/{name}/"))
  param_like = np.empty(prec["shape"], exchange._np_dtype(prec["dtype"]))
  blockable = outer_lib.blockable_leaves(tx, param_like)
  if sorted(blockable) != leaf_names:
    raise ExchangeError(f"global round {base_prefix}: outer state of {name!r} has leaves "
                        f"{leaf_names}, the outer optimizer needs {sorted(blockable)}")
  leaves = [l for l in leaf_names if blockable[l]]
  sources = ([(glob, base_prefix, f"params/{name}", prec)]
             + [(glob, base_prefix, f"outer/{name}/{l}", arrays[f"outer/{name}/{l}"])
                for l in leaves]
             + [(b, p, name, m["arrays"][name]) for b, p, m in inputs])
  if isinstance(tx, outer_lib.SharedMoments):  # Then each site's first moment, same order.
    moment = outer_lib.MOMENT_PREFIX + name
    sources += [(b, p, moment, m["arrays"][moment]) for b, p, m in inputs]
  whole_records = {l: arrays[f"outer/{name}/{l}"] for l in leaf_names if not blockable[l]}
  chunk, blocks = common_blocks([r for _, _, _, r in sources], max_block_bytes)
  return _Param(name, sources, leaves, {}, whole_records, chunk, blocks, num_sites=len(inputs))


def _read_checked(bucket: Bucket, prefix: str, name: str, record: Mapping,
                  index: tuple[slice, ...], store, out: np.ndarray, *,
                  check_finite: bool) -> tuple[np.ndarray, bool]:
  """`exchange.read_block` into `out` (every chunk's digest checked), and whether all of
  its values are finite (True when not `check_finite`). Runs on the merge's pool, so
  the finiteness scans of a block set's inputs run in parallel, right after each read,
  instead of one after another on the merging thread."""
  block = exchange.read_block(bucket, prefix, name, record, index, store=store, out=out)
  if not check_finite:
    return block, True
  flat = block.reshape(-1)  # In slices: a small, cache-resident mask instead of a whole one.
  return block, all(bool(np.isfinite(flat[i:i + _FINITE_SLICE]).all())
                    for i in range(0, flat.size, _FINITE_SLICE))


def declared_norm(manifest: Mapping) -> Any:
  """The update norm a site declared in its manifest (`extra["update_norm"]`), or None."""
  extra = manifest.get("extra")
  return extra.get("update_norm") if isinstance(extra, Mapping) else None


def _clip_scales(inputs: Sequence[tuple[Bucket, str, Mapping]], clip_norm: float,
                 declared_norms: Sequence[Any] | None) -> tuple[np.ndarray, list[float]]:
  """(per-site clip scales, declared norms as floats); BadUpdate for the first site whose
  declared norm is missing, not a number, non-finite or negative while clipping is on."""
  if declared_norms is None:
    declared_norms = [declared_norm(m) for _, _, m in inputs]
  if len(declared_norms) != len(inputs):
    raise ValueError(f"{len(inputs)} inputs but {len(declared_norms)} declared norms")
  if not clip_norm:
    return np.ones(len(inputs), np.float32), []
  norms = []
  for k, ((b, pre, _), v) in enumerate(zip(inputs, declared_norms)):
    ok = (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
          and math.isfinite(float(v)) and float(v) >= 0)
    if not ok:
      raise BadUpdate(f"update {pre} in bucket {b.url}: declared update norm "
                      f"(extra.update_norm) is {v!r}, clipping needs a finite number >= 0",
                      index=k, name="update_norm", reason=f"bad declared norm {v!r}")
    norms.append(float(v))
  return outer_lib.clip_scales(norms, clip_norm), norms


def _open_sources(p: _Param) -> None:
  """Opens every input array of `p` (once); a site's missing or damaged array refuses
  that update (BadUpdate), the global round's fails the merge."""
  if p.stores is not None:
    return
  stores = []
  first = 1 + len(p.leaves)
  for j, (b, pre, n, r) in enumerate(p.sources):
    try:
      stores.append(exchange.open_array(b, pre, n, r))
    except ExchangeError as e:
      if j < first:
        raise
      raise BadUpdate(str(e), index=(j - first) % p.num_sites, name=n,
                      reason=f"unreadable or corrupt: {e}") from None
  p.stores = stores


def _can_be_non_finite(record: Mapping) -> bool:
  """Whether a stored array's values can be NaN or Inf (not integer codes)."""
  return not np.issubdtype(exchange._np_dtype(record["dtype"]), np.integer)


def _site_block(p: _Param, j: int, fut) -> np.ndarray:
  """The block read by `fut` (`_read_checked` of source j >= first), or the BadUpdate
  that refuses that site's update (corrupt, unreadable or non-finite). Site sources
  follow the global ones, one per site, then (outer moments) one more per site."""
  first = 1 + len(p.leaves)
  index = (j - first) % p.num_sites
  try:
    block, ok = fut.result()
  except ExchangeError as e:
    raise BadUpdate(str(e), index=index, name=p.sources[j][2],
                    reason=f"unreadable or corrupt: {e}") from None
  if not ok:
    b, pre, n, _ = p.sources[j]
    raise NonFiniteUpdate(f"update {pre} in bucket {b.url}: array {n!r} has non-finite values "
                          f"(NaN or Inf)", index=index, name=n)
  return block


def _refuse_non_finite(p: _Param, i: int, host: Sequence[np.ndarray], coef_K) -> None:
  """Block i of `p` merged into non-finite values: raises NonFiniteUpdate for the first
  site update holding a NaN or Inf there; if none does, the finite values overflowed
  float32 in the merge, and BadUpdate refuses the update whose |coefficient * value| is
  the largest in the block (what a norm clip would have scaled down). `host` are the
  block's inputs in `p.sources` order (the global ones first); `coef_K` each site's
  coefficient in the merge."""
  first = 1 + len(p.leaves)
  where = f"block {i} of {p.name!r}"
  for j in range(first):  # The previous global round: never committed non-finite.
    if not np.isfinite(host[j]).all():
      b, pre, n, _ = p.sources[j]
      raise ExchangeError(f"global round {pre} in bucket {b.url}: array {n!r} has "
                          f"non-finite values in {where}; cannot merge on it")
  for j in range(first, len(host)):
    b, pre, n, r = p.sources[j]
    if _can_be_non_finite(r) and not np.isfinite(host[j]).all():
      raise NonFiniteUpdate(f"update {pre} in bucket {b.url}: array {n!r} has non-finite "
                            f"values (NaN or Inf)", index=(j - first) % p.num_sites, name=n)
  largest = []
  for j in range(first, len(host)):
    r = p.sources[j][3]
    q = r.get("quant")
    x = host[j].astype(np.float64)
    if q is not None:
      x = q["offset"] + q["scale"] * x
    k = (j - first) % p.num_sites
    largest.append((float(np.abs(x).max(initial=0.0)) * abs(float(coef_K[k])), k, j))
  _, k, j = max(largest)
  b, pre, n, _ = p.sources[j]
  raise BadUpdate(f"update {pre} in bucket {b.url}: merging array {n!r} overflows float32 in "
                  f"{where} (its values are finite but the largest there; clip the updates' "
                  f"norm with robust.clip_norm)", index=k, name=n,
                  reason=f"values of {n} overflow the merge")


def _merged_norm(params: Sequence[_Param], pool, weights, scales, aggregator: str,
                 trim: int) -> float:
  """The global L2 norm of the merged pseudo-gradient (before the outer clip), in
  float64, from one pass over the updates' blocks (parameters in name order, blocks in
  order, each site's block read in parallel and checked like the merge's)."""
  squares = 0.0
  for p in params:
    _open_sources(p)
    first = 1 + len(p.leaves)
    quants = [r.get("quant") for _, _, _, r in p.sources[first:]]
    for idx in p.blocks:
      futs = [pool.submit(_read_checked, b, pre, n, r, idx, store, None,
                          check_finite=_can_be_non_finite(r))
              for (b, pre, n, r), store in zip(p.sources[first:], p.stores[first:])]
      deltas = [_site_block(p, first + k, fut) for k, fut in enumerate(futs)]
      deltas = [d if q is None else quantize.Quantized(d, q["offset"], q["scale"])
                for d, q in zip(deltas, quants)]
      squares += outer_lib.sum_squares(outer_lib.aggregate_block(
          deltas, weights, scales=scales, aggregator=aggregator, trim=trim))
  return math.sqrt(squares)


def merge_round(spec: outer_config.RoundMergeSpec, glob: Bucket, base_prefix: str,
                base_manifest: Mapping, inputs: Sequence[tuple[Bucket, str, Mapping]],
                weights: Sequence[float], out: Bucket, out_prefix: str, *,
                max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                read_ahead: int = DEFAULT_READ_AHEAD,
                declared_norms: Sequence[float] | None = None) -> dict[str, dict]:
  """Merges `inputs` ((site bucket, round prefix, manifest), in the fixed merge order)
  into the global round's attempt directory `out_prefix` (`exchange.data_prefix`);
  returns the new round's array records (`params/<name>` and `outer/<name>/<leaf>`). Manifests must already be schema-checked.
  `read_ahead` block sets are read while one merges (see the module docstring).

  `spec` holds the outer optimizer and the checked merge settings. With
  `spec.clip_norm` > 0 the clip scales come from `declared_norms` (default: each
  manifest's `extra["update_norm"]`), and the result is bit-identical to
  `spec.outer_step(..., norms=declared_norms)`.

  `spec.outer_clip_norm` > 0 clips the merged pseudo-gradient's global
  norm: a first pass reads every update's blocks (verified and checked for finiteness
  like the merge's) and sums the squares of the merged blocks (`_merged_norm`); the
  merge then runs with every site's coefficient scaled by `outer.merged_clip_scale`. The
  updates are read twice; memory stays one block set. Raises BadUpdate
  (index = the update's position in `inputs`) for an update that is unreadable, corrupt or
  non-finite, whose declared norm is unusable (before anything is read) or differs from
  the norm of its values (after the last block; nothing is committed either way), and
  ValueError for robust settings the number of inputs cannot support."""
  # Committed rounds keep their arrays in the attempt directory their manifest names.
  base_prefix = exchange.data_prefix(base_prefix, base_manifest)
  inputs = [(b, exchange.data_prefix(p, m), m) for b, p, m in inputs]
  arrays = base_manifest["arrays"]
  names = sorted(n[len("params/"):] for n in arrays if n.startswith("params/"))
  weights = np.asarray(weights, np.float32)
  if len(inputs) != len(weights):
    raise ValueError(f"{len(inputs)} inputs but {len(weights)} weights")
  if read_ahead < 0:
    raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
  tx, clip_norm, aggregator, trim = spec.tx, spec.clip_norm, spec.aggregator, spec.trim
  outer_clip_norm = spec.outer_clip_norm
  outer_lib.check_update_count(aggregator, trim, len(inputs))
  scales, norms = _clip_scales(inputs, clip_norm, declared_norms)
  # Each update's sum of squares over the blocks read so far (only when clipping uses it).
  sum_squares = [0.0] * len(inputs) if clip_norm else None
  params = [_plan(tx, glob, base_prefix, arrays, n, inputs, max_block_bytes) for n in names]
  work = [(p, i) for p in params for i in range(len(p.blocks))]
  if not work:
    return {}
  n_sources = max(len(p.sources) for p in params)
  capacity = max(math.prod(s.stop - s.start for s in idx)
                 * exchange._np_dtype(r["dtype"]).itemsize
                 for p in params for idx in p.blocks for _, _, _, r in p.sources)
  buffers = _Buffers((read_ahead + 1) * n_sources, max(1, capacity))
  writes: collections.deque = collections.deque()  # (writer, future, block number)
  records: dict[str, dict] = {}

  # The mean's finiteness flag (merge_block's with_finite) covers its inputs: a NaN or Inf
  # in any of them makes the merged block non-finite, and only then are the inputs
  # scanned to find whose it was. The robust aggregators can sort a NaN or Inf out of the
  # result, so every site block is scanned as it is read.
  scan_inputs = aggregator != "mean"
  with concurrent.futures.ThreadPoolExecutor(max_workers=n_sources + 2) as pool:

    def start(p: _Param, i: int):
      """Starts reading block i of p into free buffers: (raw buffers, read futures)."""
      if p.writers is None:
        _open_sources(p)
        p.whole = {l: exchange.read_block(glob, base_prefix, f"outer/{p.name}/{l}", r,
                                          tuple(slice(0, s) for s in r["shape"]))
                   for l, r in p.whole_records.items()}
        p.writers = {leaf: BlockWriter(out, out_prefix, f"outer/{p.name}/{leaf}", r["shape"],
                                       exchange._np_dtype(r["dtype"]),
                                       p.chunk if leaf in p.leaves else r["shape"], hasher=pool)
                     for leaf, r in [(l, arrays[f"outer/{p.name}/{l}"])
                                     for l in sorted([*p.leaves, *p.whole_records])]}
        prec = p.sources[0][3]
        p.writers["params"] = BlockWriter(out, out_prefix, f"params/{p.name}", prec["shape"],
                                          exchange._np_dtype(prec["dtype"]), p.chunk,
                                          hasher=pool)
      idx = p.blocks[i]
      shape = tuple(s.stop - s.start for s in idx)
      raws, futs = [], []
      first = 1 + len(p.leaves)
      for j, ((b, pre, n, r), store) in enumerate(zip(p.sources, p.stores)):
        raw, view = buffers.take(shape, exchange._np_dtype(r["dtype"]))
        raws.append(raw)
        futs.append(pool.submit(_read_checked, b, pre, n, r, idx, store, view,
                                check_finite=(j >= first and scan_inputs
                                              and _can_be_non_finite(r))))
      return raws, futs

    def settle(keep_blocks: int, block: int) -> None:
      while writes and writes[0][2] < block - keep_blocks:
        writer, fut, _ = writes.popleft()
        writer.wait(fut)

    reading: collections.deque = collections.deque()
    started = 0

    def fill(sets: int) -> None:
      nonlocal started
      while started < len(work) and len(reading) < sets:
        reading.append(start(*work[started]))
        started += 1

    def merge_all() -> None:
      for k, (p, i) in enumerate(work):
        fill(1)
        raws, futs = reading.popleft()
        first = 1 + len(p.leaves)
        # Every site's block is verified (digests) before a value of it is merged, and
        # found finite before anything merged from it is written.
        host = [fut.result()[0] if j < first else _site_block(p, j, fut)
                for j, fut in enumerate(futs)]
        # Squares are summed on the pool while this block merges; the buffers stay
        # untouched until the sums are in.
        quants = [r.get("quant") for _, _, _, r in p.sources[first:]]  # None: not quantized
        squares = ([pool.submit(outer_lib.sum_squares, h) if q is None else
                    pool.submit(quantize.sum_squares, h, q["offset"], q["scale"])
                    for h, q in zip(host[first:first + p.num_sites], quants)]
                   if sum_squares is not None else [])
        # On CPU, device_put uses the aligned buffers without copying them (jnp.asarray,
        # inside state_from_leaves, would copy).
        blocks = [jax.device_put(h) for h in host]
        fill(read_ahead)  # Read the next blocks while this one merges.
        n_leaves = len(p.leaves)
        g, leaf_blocks, deltas = blocks[0], blocks[1:1 + n_leaves], blocks[1 + n_leaves:]
        deltas = [d if q is None else quantize.Quantized(d, q["offset"], q["scale"])
                  for d, q in zip(deltas, quants)]
        # Outer moments: the sites' first moments follow their deltas.
        deltas, moments = deltas[:p.num_sites], deltas[p.num_sites:] or None
        state = outer_lib.state_from_leaves(tx, g,
                                            {**p.whole, **dict(zip(p.leaves, leaf_blocks))})
        new_g, new_state, finite = outer_lib.merge_block(
            outer_lib.leaf_optimizer(tx, p.name), g, state, deltas, weights, scales=scales,
            aggregator=aggregator, trim=trim, moments=moments, with_finite=True)
        if not bool(finite):  # Raises, naming the update to refuse.
          _refuse_non_finite(p, i, host, scales * weights if aggregator == "mean" else scales)
        del host
        # Materialized on the host: the merge has consumed its inputs (which JAX may alias
        # without copying), so their buffers can be reused; an output that JAX forwarded
        # from an input is copied out first.
        new_g = _own(np.asarray(new_g), raws)
        new_leaves = {l: _own(np.asarray(v), raws)
                      for l, v in outer_lib.state_leaves(new_state).items()}
        del state, new_state, blocks, g, leaf_blocks, deltas
        for j, fut in enumerate(squares):
          sum_squares[j] += fut.result()
        buffers.give(raws)
        idx = p.blocks[i]
        writes.append((p.writers["params"], p.writers["params"].write(idx, new_g), k))
        for leaf in p.leaves:
          writes.append((p.writers[leaf], p.writers[leaf].write(idx, new_leaves[leaf]), k))
        if i == 0:
          for leaf, r in p.whole_records.items():
            p.writers[leaf].write(tuple(slice(0, s) for s in r["shape"]), new_leaves[leaf])
        settle(MAX_PENDING_WRITE_BLOCKS, k)
      if sum_squares is not None:
        check_norms()

    def check_norms() -> None:
      """Raises BadUpdate for the first update whose declared norm is not its actual one."""
      for j, (declared, ss) in enumerate(zip(norms, sum_squares)):
        actual = math.sqrt(ss)
        if abs(actual - declared) > NORM_RTOL * max(actual, declared) + NORM_ATOL:
          b, pre, _ = inputs[j]
          raise BadUpdate(f"update {pre} in bucket {b.url}: declared norm {declared!r} != "
                          f"actual norm {actual!r}", index=j, name="update_norm",
                          reason=f"declared norm {declared!r} != actual norm {actual!r}")

    try:
      if outer_clip_norm:
        norm = _merged_norm(params, pool, weights, scales, aggregator, trim)
        scales = scales * outer_lib.merged_clip_scale(norm, outer_clip_norm)
      merge_all()
    except Exception:
      # Nothing of this attempt is committed; let its writes land before the caller
      # may redo the merge into the same prefix (a late write would overwrite the redo's).
      for p in params:
        for writer in (p.writers or {}).values():
          for fut in [writer._open, *writer._pending]:
            try:
              fut.result()
            except Exception:  # noqa: BLE001
              pass
      raise
    for p in params:
      records[f"params/{p.name}"] = p.writers["params"].finish()
      for leaf in sorted([*p.leaves, *p.whole_records]):
        records[f"outer/{p.name}/{leaf}"] = p.writers[leaf].finish()
  return records
