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
its first moment of each parameter (`exchange.moment_key`); those blocks are read,
verified and finiteness-checked like the deltas (a bad one refuses that site's update),
aggregated like them (a site's clip scale, from the norm of its delta, scales its moment
too), and the outer step takes both. The outer clip is refused there.

int8 and float8 updates (`tapestry_jax.quantize`) are read as their codes (float8's
checked for NaN codes like any float) and dequantized inside
`outer.merge_block` with the offset and scale of their signed records; their norms are
summed from the codes' histograms. Block-scaled 4-bit and top-k updates
(`tapestry_jax.update_codecs`) are read as their codes with their scales and indices
(companion arrays, `exchange.companion_key`) in blocks of whole rows, every input's
chunks of the other axes tiling them; each scales block is checked (finite, > 0, every
code decoding within float32) and each indices block (in range, strictly increasing in a
row) as it is read, a bad one refusing that site's update (BadUpdate) before anything
merged from it is written; they are decoded inside `outer.merge_block`.

Downloads (`RoundMergeSpec.download`, `federation.download_dtype`): each merged block also
yields the round's encoded download (`outer.Download`: block-scaled codes along the last
axis), written beside the params as `exchange.down_key` arrays, and the params (under
shared moments, the moments) written are the canonical ones, the previous round plus the
decoded download. Merge blocks are cut along the last axis only at multiples of the code
block (`exchange.common_blocks(..., last_multiple=)`), so each holds whole code blocks
(and, for 4-bit codes packed two per byte, whole bytes: `quantize.BlockFormat.align`).
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

from tapestry_jax import exchange
from tapestry_jax import outer as outer_lib
from tapestry_jax import outer_config
from tapestry_jax import quantize
from tapestry_jax import update_codecs
from tapestry_jax.buckets import Bucket
from tapestry_jax.exchange import ExchangeError

DEFAULT_MAX_BLOCK_BYTES = 16 << 20


def block_bytes(mib: float | None) -> int:
  """A merge block size given in MiB (config `federation.merge_block_mib`) in bytes;
  None is the default."""
  if mib is None:
    return DEFAULT_MAX_BLOCK_BYTES
  if not float(mib) > 0:
    raise ValueError(f"the merge block size must be > 0 MiB, got {mib!r}")
  return max(1, int(float(mib) * 2**20))


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
    self.work = -1  # The work item it was found in (-1: before or after the blocks).


class NonFiniteUpdate(BadUpdate):
  """A site's update holds a NaN or an infinity: merging it would poison the global
  model (a norm bound alone does not catch NaN)."""

  def __init__(self, message: str, index: int, name: str):
    super().__init__(message, index, name, f"non-finite values in array {name}")


@dataclasses.dataclass(frozen=True)
class Source:
  """One stored array a merge reads block by block; a site's part of a coded leaf says
  its `role` (`update_codecs.CODES`, `SCALES`, `INDICES`), the leaf's `codec` and the
  parameter's `cols` (what its blocks are checked against)."""
  bucket: Bucket
  prefix: str  # the round's data prefix (its committed attempt)
  name: str
  record: Mapping
  role: str = update_codecs.CODES
  codec: Any = None  # update_codecs.LeafCodec of a site's leaf
  cols: int = 0


@dataclasses.dataclass(frozen=True)
class SiteLeaf:
  """One site's pseudo-gradient (or first moment) of one parameter: its stored parts
  (codes first, then their scales and indices, if any) and how it is coded."""
  site: int  # position in the merge order
  codec: update_codecs.LeafCodec
  parts: tuple[Source, ...]

  @property
  def main(self) -> Source:
    return self.parts[0]


@dataclasses.dataclass(frozen=True)
class ParamPlan:
  """How one parameter is merged: its inputs in merge order, its blocks."""
  name: str
  base: Source  # the previous global round's params
  state: tuple[tuple[str, Source], ...]  # its blockable outer-state leaves (sorted)
  deltas: tuple[SiteLeaf, ...]  # each site's update, in merge order
  moments: tuple[SiteLeaf, ...]  # (shared moments) each site's first moment, else ()
  whole_records: Mapping[str, Mapping]  # outer-state leaves read whole (Adam's count)
  chunk: tuple[int, ...]  # the output chunk shape (every input's chunks tile it)
  blocks: tuple[tuple[slice, ...], ...]
  rows: bool = False  # blocks span whole rows (some site sends block or top-k codes)

  @property
  def leaves(self) -> list[str]:
    return [leaf for leaf, _ in self.state]

  @property
  def sources(self) -> list[Source]:
    """Every block-wise input: the global ones (base, state), then the sites' parts
    (deltas', then first moments')."""
    return [self.base, *(src for _, src in self.state),
            *(src for leaf in self.site_leaves for src in leaf.parts)]

  @property
  def site_leaves(self) -> tuple[SiteLeaf, ...]:
    return (*self.deltas, *self.moments)

  @property
  def num_global(self) -> int:
    return 1 + len(self.state)

  @property
  def num_delta_sources(self) -> int:
    """Sources of the deltas (they follow the global ones)."""
    return sum(len(leaf.parts) for leaf in self.deltas)

  def site(self, j: int) -> int:
    """The site (position in the merge order) of site source j of `sources`."""
    j -= self.num_global
    for leaf in self.site_leaves:
      if j < len(leaf.parts):
        return leaf.site
      j -= len(leaf.parts)
    raise IndexError(f"{self.name}: no site source {j}")

  def index(self, j: int, i: int) -> tuple[slice, ...]:
    """Block i of source j: `blocks[i]`, whose last axis spans source j's own when
    blocks are whole rows."""
    idx = self.blocks[i]
    if not self.rows:
      return idx
    return (*idx[:-1], slice(0, int(self.sources[j].record["shape"][-1])))


@dataclasses.dataclass
class RoundPlan:
  """Everything that decides a merged round, and its work list: (param, block) pairs in
  the fixed merge order. Any split of the work merges the same bits."""
  spec: outer_config.RoundMergeSpec
  glob: Bucket
  base_prefix: str
  inputs: list[tuple[Bucket, str, Mapping]]  # (bucket, data prefix, manifest)
  weights: np.ndarray  # float32, per site
  scales: np.ndarray  # float32 per-site clip scales (times the outer clip's, once known)
  norms: list[float]  # declared norms (when the per-site clip uses them)
  params: list[ParamPlan]
  work: list[tuple[int, int]]

  def coefficients(self) -> np.ndarray:
    """Each site's coefficient in the merge (what an overflow is blamed on)."""
    return self.scales * self.weights if self.spec.aggregator == "mean" else self.scales

  def work_bytes(self, k: int) -> int:
    """Bytes read for work item k (its blocks of every input)."""
    pi, i = self.work[k]
    return sum(_block_nbytes(self.params[pi], j, i) for j in range(len(self.params[pi].sources)))


def _block_nbytes(p: ParamPlan, j: int, i: int) -> int:
  """Bytes of block i of source j of `p`."""
  n = math.prod(s.stop - s.start for s in p.index(j, i))
  return n * exchange.np_dtype(p.sources[j].record["dtype"]).itemsize


@dataclasses.dataclass
class RangeResult:
  """What merging one range of the work produced: its partial array records, and per
  work item each site's sum of squares (when the per-site clip checks declared norms)."""
  records: dict[str, dict]
  site_squares: list[list[float]] | None


def plan_round(spec: outer_config.RoundMergeSpec, glob: Bucket, base_prefix: str,
               base_manifest: Mapping, inputs: Sequence[tuple[Bucket, str, Mapping]],
               weights: Sequence[float], *, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
               declared_norms: Sequence[float] | None = None) -> RoundPlan:
  """Lays out the merge (no array data is read). See `merge_round` for the arguments and
  the errors."""
  # Committed rounds keep their arrays in the attempt directory their manifest names.
  base_prefix = exchange.data_prefix(base_prefix, base_manifest)
  inputs = [(b, exchange.data_prefix(p, m), m) for b, p, m in inputs]
  weights = np.asarray(weights, np.float32)
  if len(inputs) != len(weights):
    raise ValueError(f"{len(inputs)} inputs but {len(weights)} weights")
  outer_lib.check_update_count(spec.aggregator, spec.trim, len(inputs))
  scales, norms = _clip_scales(inputs, spec.clip_norm, declared_norms)
  arrays = base_manifest["arrays"]
  last_multiple = spec.download.align if spec.download is not None else 1
  params = [_plan_param(spec.tx, glob, base_prefix, arrays, n, inputs, max_block_bytes,
                        last_multiple) for n in exchange.params_of(base_manifest)]
  work = [(i, b) for i, p in enumerate(params) for b in range(len(p.blocks))]
  return RoundPlan(spec, glob, base_prefix, inputs, weights, scales, norms, params, work)


def _plan_param(tx, glob: Bucket, base_prefix: str, arrays: Mapping, name: str,
                inputs: Sequence[tuple[Bucket, str, Mapping]], max_block_bytes: int,
                last_multiple: int = 1) -> ParamPlan:
  prec = arrays[exchange.param_key(name)]
  top = exchange.outer_key(name, "")
  leaf_names = sorted(k[len(top):] for k in arrays if k.startswith(top))
  param_like = np.empty(prec["shape"], exchange.np_dtype(prec["dtype"]))
  blockable = outer_lib.blockable_leaves(tx, param_like)
  if sorted(blockable) != leaf_names:
    raise ExchangeError(f"global round {base_prefix}: outer state of {name!r} has leaves "
                        f"{leaf_names}, the outer optimizer needs {sorted(blockable)}")
  state = tuple((l, Source(glob, base_prefix, exchange.outer_key(name, l),
                           arrays[exchange.outer_key(name, l)]))
                for l in leaf_names if blockable[l])
  shape = tuple(prec["shape"])
  deltas = tuple(_site_leaf(k, b, p, m, name, shape) for k, (b, p, m) in enumerate(inputs))
  moments = ()
  if isinstance(tx, outer_lib.SharedMoments):
    key = exchange.moment_key(name)
    moments = tuple(_site_leaf(k, b, p, m, key, shape) for k, (b, p, m) in enumerate(inputs))
  base = Source(glob, base_prefix, exchange.param_key(name), prec)
  whole = {l: arrays[exchange.outer_key(name, l)] for l in leaf_names if not blockable[l]}
  rows = any(leaf.codec.kind in (update_codecs.BLOCK, update_codecs.TOPK)
             for leaf in (*deltas, *moments))
  records = [base.record, *(s.record for _, s in state),
             *(src.record for leaf in (*deltas, *moments) for src in leaf.parts)]
  chunk, blocks = exchange.common_blocks(records, max_block_bytes, whole_rows=rows,
                                         last_multiple=last_multiple)
  return ParamPlan(name, base, state, deltas, moments, whole, tuple(chunk), tuple(blocks),
                   rows)


def _site_leaf(k: int, bucket: Bucket, prefix: str, manifest: Mapping, name: str,
               shape: tuple[int, ...]) -> SiteLeaf:
  """Site k's array `name` (a pseudo-gradient or first moment of a parameter of
  `shape`) and its companions, as its record's codec lays them out; BadUpdate if they
  do not (the schema check refuses that first; this keeps the merge safe without it)."""
  arrays = manifest["arrays"]
  where = f"update {prefix} in bucket {bucket.url}"

  def refuse(key: str, why: str) -> BadUpdate:
    return BadUpdate(f"{where}: array {key!r} {why}", index=k, name=key, reason=f"{key} {why}")

  rec = arrays.get(name)
  if not isinstance(rec, Mapping) or "dtype" not in rec or "shape" not in rec:
    raise refuse(name, "is missing or has no shape and dtype")
  quant = rec.get("quant")
  if isinstance(quant, Mapping) and "codec" in quant:
    problem = update_codecs.check_quant(quant, str(rec["dtype"]))
    if problem:
      raise refuse(name, f"has a bad codec: {problem}")
  codec = update_codecs.LeafCodec.from_record(rec)
  if codec.kind in (update_codecs.BLOCK, update_codecs.TOPK) and not shape:
    raise refuse(name, f"is coded ({quant!r}) but its parameter is a scalar")
  parts = []
  for role, layout in codec.layout(shape).items():
    key = exchange.companion_key(role, name)
    r = arrays.get(key)
    want = (tuple(layout[0]), str(layout[1]))
    got = ((tuple(r["shape"]), str(r.get("dtype")))
           if isinstance(r, Mapping) and isinstance(r.get("shape"), list) else None)
    if got != want:
      raise refuse(key, f"is {got and f'{got[1]}{list(got[0])}' or 'missing'}; codec "
                        f"{quant!r} of {name!r} needs {want[1]}{list(want[0])}")
    parts.append(Source(bucket, prefix, key, r, role, codec, shape[-1] if shape else 0))
  return SiteLeaf(k, codec, tuple(parts))


def split_work(plan: RoundPlan, num_workers: int) -> list[range]:
  """Contiguous ranges of `plan.work`, one per worker, of about equal bytes read. Blocks
  are whole output chunks, so the workers write disjoint chunks."""
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  sizes = [plan.work_bytes(k) for k in range(len(plan.work))]
  total = sum(sizes)
  ranges, start, acc = [], 0, 0
  for w in range(num_workers):
    target = total * (w + 1) / num_workers
    end = start
    while end < len(sizes) and (w == num_workers - 1 or acc + sizes[end] / 2 <= target):
      acc += sizes[end]
      end += 1
    ranges.append(range(start, end))
    start = end
  return ranges


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


def _read_checked(src: Source, index: tuple[slice, ...], store, out: np.ndarray | None, *,
                  check_finite: bool) -> tuple[np.ndarray, bool, str | None]:
  """`exchange.read_block` of `src` into `out` (every chunk's digest checked), whether
  all of its values are finite (True when not `check_finite`), and what is wrong with
  it if it is a site's scales or indices (None if nothing). Runs on the merge's pool,
  so the scans of a block set's inputs run in parallel, right after each read, instead
  of one after another on the merging thread."""
  block = exchange.read_block(src.bucket, src.prefix, src.name, src.record, index,
                              store=store, out=out)
  problem = (src.codec.check_part(src.role, block, src.cols)
             if src.role != update_codecs.CODES else None)
  if not check_finite:
    return block, True, problem
  flat = block.reshape(-1)  # In slices: a small, cache-resident mask instead of a whole one.
  return block, all(bool(np.isfinite(flat[i:i + _FINITE_SLICE]).all())
                    for i in range(0, flat.size, _FINITE_SLICE)), problem


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


def _can_be_non_finite(record: Mapping) -> bool:
  """Whether a stored array's values can be NaN or Inf (not integer codes)."""
  return not np.issubdtype(exchange.np_dtype(record["dtype"]), np.integer)


class _ParamIO:
  """One worker's open stores, writers and whole-read leaves of one parameter."""

  def __init__(self, p: ParamPlan):
    self.p = p
    self.stores: list[Any] = []
    self.whole: dict[str, np.ndarray] = {}
    self.writers: dict[str, exchange.BlockWriter] = {}
    # (download on) {array name: writer} of the download's codes and scales.
    self.down_writers: dict[str, exchange.BlockWriter] = {}
    self.scale_keys: set[str] = set()  # Which of them hold scales.

  def open_sources(self) -> None:
    """Opens every input array (once); a site's missing or damaged array refuses that
    update (BadUpdate), the global round's fails the merge."""
    if self.stores:
      return
    for j, src in enumerate(self.p.sources):
      try:
        self.stores.append(exchange.open_array(src.bucket, src.prefix, src.name, src.record))
      except ExchangeError as e:
        if j < self.p.num_global:
          raise
        raise BadUpdate(str(e), index=self.p.site(j), name=src.name,
                        reason=f"unreadable or corrupt: {e}") from None

  def open_writers(self, out: Bucket, out_prefix: str, hasher) -> None:
    p = self.p
    base = p.base
    self.whole = {l: exchange.read_block(base.bucket, base.prefix, exchange.outer_key(p.name, l),
                                         r, tuple(slice(0, s) for s in r["shape"]))
                  for l, r in p.whole_records.items()}
    records = {**{l: src.record for l, src in p.state}, **p.whole_records}
    for leaf in sorted(records):
      r = records[leaf]
      self.writers[leaf] = exchange.BlockWriter(
          out, out_prefix, exchange.outer_key(p.name, leaf), r["shape"],
          exchange.np_dtype(r["dtype"]), p.chunk if leaf in p.leaves else r["shape"],
          hasher=hasher)
    self.writers["params"] = exchange.BlockWriter(
        out, out_prefix, exchange.param_key(p.name), base.record["shape"],
        exchange.np_dtype(base.record["dtype"]), p.chunk, hasher=hasher)

  def open_down_writers(self, out: Bucket, out_prefix: str, hasher,
                        fmt: quantize.BlockFormat, parts: Sequence[str]) -> None:
    """Writers of the download's codes (chunked like the params) and scales."""
    shape = self.p.base.record["shape"]
    for part in parts:
      self.down_writers[exchange.down_key(part, self.p.name)] = exchange.BlockWriter(
          out, out_prefix, exchange.down_key(part, self.p.name), fmt.codes_shape(shape),
          exchange.np_dtype(quantize.stored_dtype(fmt.dtype)), fmt.codes_shape(self.p.chunk),
          hasher=hasher)
      key = exchange.down_key(part, self.p.name, scales=True)
      self.scale_keys.add(key)
      self.down_writers[key] = exchange.BlockWriter(
          out, out_prefix, key, quantize.scales_shape(shape, fmt.block), np.float32,
          quantize.scales_shape(self.p.chunk, fmt.block), hasher=hasher)

  def all_writers(self) -> list[exchange.BlockWriter]:
    return [*self.writers.values(), *self.down_writers.values()]

  def site_block(self, j: int, fut) -> np.ndarray:
    """The block read by `fut` (`_read_checked` of site source j), or the BadUpdate that
    refuses that site's update (corrupt, unreadable, non-finite, or bad scales or
    indices)."""
    src = self.p.sources[j]
    try:
      block, ok, problem = fut.result()
    except ExchangeError as e:
      raise BadUpdate(str(e), index=self.p.site(j), name=src.name,
                      reason=f"unreadable or corrupt: {e}") from None
    if problem is not None:
      raise BadUpdate(f"update {src.prefix} in bucket {src.bucket.url}: array {src.name!r}: "
                      f"{problem}", index=self.p.site(j), name=src.name,
                      reason=f"{src.name}: {problem}")
    if not ok:
      raise NonFiniteUpdate(f"update {src.prefix} in bucket {src.bucket.url}: array "
                            f"{src.name!r} has non-finite values (NaN or Inf)",
                            index=self.p.site(j), name=src.name)
    return block


def _refuse_non_finite(p: ParamPlan, i: int, host: Sequence[np.ndarray], coef_K) -> None:
  """Block i of `p` merged into non-finite values: raises NonFiniteUpdate for the first
  site update holding a NaN or Inf there; if none does, the finite values overflowed
  float32 in the merge, and BadUpdate refuses the update whose |coefficient * value| is
  the largest in the block (what a norm clip would have scaled down). `host` are the
  block's inputs in `p.sources` order; `coef_K` each site's coefficient in the merge."""
  where = f"block {i} of {p.name!r}"
  sources = p.sources
  for j in range(p.num_global):  # The previous global round: never committed non-finite.
    if not np.isfinite(host[j]).all():
      src = sources[j]
      raise ExchangeError(f"global round {src.prefix} in bucket {src.bucket.url}: array "
                          f"{src.name!r} has non-finite values in {where}; cannot merge on it")
  for j in range(p.num_global, len(host)):
    src = sources[j]
    if _can_be_non_finite(src.record) and not np.isfinite(host[j]).all():
      raise NonFiniteUpdate(f"update {src.prefix} in bucket {src.bucket.url}: array "
                            f"{src.name!r} has non-finite values (NaN or Inf)",
                            index=p.site(j), name=src.name)
  largest = []
  for n, (leaf, x) in enumerate(zip(p.site_leaves, _as_updates(p, host[p.num_global:]))):
    largest.append((update_codecs.max_abs(x) * abs(float(coef_K[leaf.site])), leaf.site, n))
  _, k, n = max(largest)
  src = p.site_leaves[n].main
  raise BadUpdate(f"update {src.prefix} in bucket {src.bucket.url}: merging array "
                  f"{src.name!r} overflows float32 in {where} (its values are finite but the "
                  f"largest there; clip the updates' norm with robust.clip_norm)", index=k,
                  name=src.name, reason=f"values of {src.name} overflow the merge")


def _as_updates(p: ParamPlan, blocks: Sequence[Any]) -> list[Any]:
  """Site blocks (in `sources` order, from the first site source; the deltas' alone
  will do) as the outer math takes them, one per site leaf: arrays, per-tensor codes
  with their parameters, or block / top-k codes with their scales and indices."""
  out, j = [], 0
  shape = tuple(p.base.record["shape"])
  for leaf in p.site_leaves:
    if j >= len(blocks):
      break
    parts = {src.role: b for src, b in zip(leaf.parts, blocks[j:j + len(leaf.parts)])}
    out.append(leaf.codec.leaf(parts, shape, leaf.main.record.get("quant")))
    j += len(leaf.parts)
  return out


def norm_squares(plan: RoundPlan, work: range) -> list[float]:
  """First pass of the outer clip over `work`: per work item, the float64 sum of squares
  of the merged (aggregated, clip-scaled) pseudo-gradient block, every site block read,
  verified and finiteness-checked like the merge's."""
  out = []
  ios: dict[int, _ParamIO] = {}
  n_sites = len(plan.inputs)
  with concurrent.futures.ThreadPoolExecutor(max_workers=n_sites + 2) as pool:
    for k in work:
      pi, i = plan.work[k]
      p = plan.params[pi]
      io = ios.setdefault(pi, _ParamIO(p))
      io.open_sources()
      first, stop = p.num_global, p.num_global + p.num_delta_sources
      futs = [pool.submit(_read_checked, p.sources[j], p.index(j, i), io.stores[j], None,
                          check_finite=_can_be_non_finite(p.sources[j].record))
              for j in range(first, stop)]
      try:
        deltas = _as_updates(p, [io.site_block(first + j, f) for j, f in enumerate(futs)])
      except BadUpdate as e:
        e.work = k
        raise
      out.append(outer_lib.sum_squares(outer_lib.aggregate_block(
          deltas, plan.weights, scales=plan.scales, aggregator=plan.spec.aggregator,
          trim=plan.spec.trim)))
  return out


def apply_outer_clip(plan: RoundPlan, squares: Sequence[float]) -> None:
  """Scales every site's coefficient by the outer clip's factor, from the per-item
  squares of `norm_squares` over the whole work (summed in work order)."""
  total = 0.0
  for x in squares:  # In order, one by one: the same float64 sum however the work is split.
    total += x
  plan.scales = plan.scales * outer_lib.merged_clip_scale(math.sqrt(total),
                                                          plan.spec.outer_clip_norm)


def merge_work(plan: RoundPlan, out: Bucket, out_prefix: str, work: range, *,
               read_ahead: int = DEFAULT_READ_AHEAD, partial: bool = False) -> RangeResult:
  """Merges the work items `work` of `plan` into the attempt directory `out_prefix`:
  read ahead -> verify -> merge -> hash and write. Returns the records of what it wrote
  (`partial`: other workers write the rest) and the per-site squares it saw."""
  if read_ahead < 0:
    raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
  items = [plan.work[k] for k in work]
  if not items:
    return RangeResult({}, [] if plan.norms else None)
  ios: dict[int, _ParamIO] = {}
  n_sources = max(len(plan.params[pi].sources) for pi, _ in items)
  capacity = max(_block_nbytes(plan.params[pi], j, i)
                 for pi, i in items for j in range(len(plan.params[pi].sources)))
  buffers = _Buffers((read_ahead + 1) * n_sources, max(1, capacity))
  writes: collections.deque = collections.deque()  # (writer, future, item number)
  site_squares: list[list[float]] | None = [] if plan.norms else None
  # The mean's finiteness flag (merge_block's with_finite) covers its inputs: a NaN or Inf
  # in any of them makes the merged block non-finite, and only then are the inputs
  # scanned to find whose it was. The robust aggregators can sort a NaN or Inf out of the
  # result, so every site block is scanned as it is read.
  scan_inputs = plan.spec.aggregator != "mean"
  coef_K = plan.coefficients()
  fmt = plan.spec.download
  parts = exchange.DOWN_PARTS if plan.spec.shared_moments else exchange.DOWN_PARTS[:1]
  with concurrent.futures.ThreadPoolExecutor(max_workers=n_sources + 2) as pool:

    def start(pi: int, i: int):
      """Starts reading block i of param pi into free buffers: (raw buffers, futures)."""
      io = ios.get(pi)
      if io is None:
        io = ios[pi] = _ParamIO(plan.params[pi])
        io.open_sources()
        io.open_writers(out, out_prefix, pool)
        if fmt is not None:
          io.open_down_writers(out, out_prefix, pool, fmt, parts)
      p = io.p
      raws, futs = [], []
      for j, (src, store) in enumerate(zip(p.sources, io.stores)):
        idx = p.index(j, i)
        raw, view = buffers.take(tuple(s.stop - s.start for s in idx),
                                 exchange.np_dtype(src.record["dtype"]))
        raws.append(raw)
        futs.append(pool.submit(_read_checked, src, idx, store, view,
                                check_finite=(j >= p.num_global and scan_inputs
                                              and _can_be_non_finite(src.record))))
      return raws, futs

    reading: collections.deque = collections.deque()
    started = 0

    def fill(sets: int) -> None:
      nonlocal started
      while started < len(items) and len(reading) < sets:
        reading.append(start(*items[started]))
        started += 1

    def merge_one(n: int, pi: int, i: int) -> None:
      io = ios[pi]
      p = io.p
      raws, futs = reading.popleft()
      first, n_sites = p.num_global, len(p.deltas)
      # Every site's block is verified (digests, scales, indices) before a value of it is
      # merged, and found finite before anything merged from it is written.
      host = [fut.result()[0] if j < first else io.site_block(j, fut)
              for j, fut in enumerate(futs)]
      # Squares are summed on the pool while this block merges; the buffers stay
      # untouched until the sums are in.
      squares = []
      if site_squares is not None:
        squares = [pool.submit(update_codecs.sum_squares, d)
                   for d in _as_updates(p, host[first:first + p.num_delta_sources])]
      # On CPU, device_put uses the aligned buffers without copying them (jnp.asarray,
      # inside state_from_leaves, would copy).
      blocks = [jax.device_put(h) for h in host]
      fill(read_ahead)  # Read the next blocks while this one merges.
      g, leaf_blocks = blocks[0], blocks[1:first]
      updates = _as_updates(p, blocks[first:])
      deltas, moments = updates[:n_sites], updates[n_sites:] or None
      state = outer_lib.state_from_leaves(plan.spec.tx, g,
                                          {**io.whole, **dict(zip(p.leaves, leaf_blocks))})
      new_g, new_state, *down, finite = outer_lib.merge_block(
          outer_lib.leaf_optimizer(plan.spec.tx, p.name), g, state, deltas, plan.weights,
          scales=plan.scales, aggregator=plan.spec.aggregator, trim=plan.spec.trim,
          moments=moments,
          with_finite=True, download=fmt)
      if not bool(finite):  # Raises, naming the update to refuse.
        _refuse_non_finite(p, i, host, coef_K)
      del host
      # Materialized on the host: the merge has consumed its inputs (which JAX may alias
      # without copying), so their buffers can be reused; an output that JAX forwarded
      # from an input is copied out first.
      new_g = _own(np.asarray(new_g), raws)
      new_leaves = {l: _own(np.asarray(v), raws)
                    for l, v in outer_lib.state_leaves(new_state).items()}
      new_down = {}
      for part, codes in (zip(parts, down[0]) if down else ()):
        new_down[exchange.down_key(part, p.name)] = _own(np.asarray(codes.codes), raws)
        new_down[exchange.down_key(part, p.name, scales=True)] = _own(np.asarray(codes.scales),
                                                                      raws)
      del state, new_state, blocks, g, leaf_blocks, deltas, moments, updates, down
      if site_squares is not None:
        site_squares.append([f.result() for f in squares])
      buffers.give(raws)
      idx = p.blocks[i]
      writes.append((io.writers["params"], io.writers["params"].write(idx, new_g), n))
      for leaf in p.leaves:
        writes.append((io.writers[leaf], io.writers[leaf].write(idx, new_leaves[leaf]), n))
      for key, x in new_down.items():
        where = (quantize.scales_index(idx, fmt.block) if key in io.scale_keys
                 else fmt.codes_index(idx))
        writes.append((io.down_writers[key], io.down_writers[key].write(where, x), n))
      if i == 0:
        for leaf, r in p.whole_records.items():
          io.writers[leaf].write(tuple(slice(0, s) for s in r["shape"]), new_leaves[leaf])
      while writes and writes[0][2] < n - MAX_PENDING_WRITE_BLOCKS:
        writer, fut, _ = writes.popleft()
        writer.wait(fut)

    try:
      for n, (pi, i) in enumerate(items):
        fill(1)
        try:
          merge_one(n, pi, i)
        except BadUpdate as e:
          e.work = work.start + n  # Where in the work order (the first one is refused).
          raise
    except Exception:
      # Nothing of this attempt is committed; let its writes land before the caller
      # may redo the merge into the same prefix (a late write would overwrite the redo's).
      for io in ios.values():
        for writer in io.all_writers():
          writer.wait_all(ignore_errors=True)
      raise
    records = {}
    for io in ios.values():
      for leaf, writer in io.writers.items():
        key = (exchange.param_key(io.p.name) if leaf == "params"
               else exchange.outer_key(io.p.name, leaf))
        records[key] = writer.finish(partial=partial)
      for key, writer in io.down_writers.items():
        records[key] = writer.finish(partial=partial)
        if key not in io.scale_keys:
          records[key]["block"] = fmt.block  # Signed with the rest: how to decode the codes.
  return RangeResult(records, site_squares)


def finish_round(plan: RoundPlan, results: Sequence[RangeResult]) -> dict[str, dict]:
  """The new round's array records from every range's (in work order): their chunk
  digests combined; BadUpdate for the first update whose declared norm is not the norm
  of its values (summed in work order)."""
  records = exchange.merge_records([r.records for r in results])
  for name, rec in records.items():
    if rec["digest"] is None:
      raise ExchangeError(f"array {name!r}: the workers' blocks did not cover the array")
  if plan.norms:
    totals = [0.0] * len(plan.inputs)
    for r in results:
      for per_site in r.site_squares:
        for j, x in enumerate(per_site):
          totals[j] += x
    for j, (declared, ss) in enumerate(zip(plan.norms, totals)):
      actual = math.sqrt(ss)
      if abs(actual - declared) > NORM_RTOL * max(actual, declared) + NORM_ATOL:
        b, pre, _ = plan.inputs[j]
        raise BadUpdate(f"update {pre} in bucket {b.url}: declared norm {declared!r} != "
                        f"actual norm {actual!r}", index=j, name="update_norm",
                        reason=f"declared norm {declared!r} != actual norm {actual!r}")
  return records


def merge_round(spec: outer_config.RoundMergeSpec, glob: Bucket, base_prefix: str,
                base_manifest: Mapping, inputs: Sequence[tuple[Bucket, str, Mapping]],
                weights: Sequence[float], out: Bucket, out_prefix: str, *,
                max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                read_ahead: int = DEFAULT_READ_AHEAD,
                declared_norms: Sequence[float] | None = None) -> dict[str, dict]:
  """Merges `inputs` ((site bucket, round prefix, manifest), in the fixed merge order)
  into the global round's attempt directory `out_prefix` (`exchange.data_prefix`) in
  this process: plan -> (outer clip: norm pass) -> merge -> records. Returns the new
  round's array records (`params/<name>` and `outer/<name>/<leaf>`; with
  `spec.download`, also the download's `exchange.down_key` arrays). Manifests must
  already be schema-checked. `read_ahead` block sets are read while one merges.

  `spec` holds the outer optimizer and the robust settings. With `spec.clip_norm` > 0
  the clip scales come from `declared_norms` (default: each manifest's
  `extra["update_norm"]`), and the result is bit-identical to
  `spec.outer_step(..., norms=declared_norms)`. `spec.outer_clip_norm` > 0 clips the
  merged pseudo-gradient's global norm: a first pass reads every update's blocks and
  sums the squares of the merged blocks; the merge then runs with every site's
  coefficient scaled by `outer.merged_clip_scale`. Raises BadUpdate (index = the
  update's position in `inputs`) for an update that is unreadable, corrupt or
  non-finite, whose declared norm is unusable (before anything is read) or differs from
  the norm of its values (after the last block; nothing is committed either way), and
  ValueError for robust settings the number of inputs cannot support."""
  plan = plan_round(spec, glob, base_prefix, base_manifest, inputs, weights,
                    max_block_bytes=max_block_bytes, declared_norms=declared_norms)
  return merge_round_plan(plan, out, out_prefix, read_ahead=read_ahead)


def merge_round_plan(plan: RoundPlan, out: Bucket, out_prefix: str, *,
                     read_ahead: int = DEFAULT_READ_AHEAD) -> dict[str, dict]:
  """`merge_round` of a plan, all of its work in this process."""
  if read_ahead < 0:
    raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
  everything = range(len(plan.work))
  if plan.spec.outer_clip_norm:
    apply_outer_clip(plan, norm_squares(plan, everything))
  return finish_round(plan, [merge_work(plan, out, out_prefix, everything,
                                        read_ahead=read_ahead)])
