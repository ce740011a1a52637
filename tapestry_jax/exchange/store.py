"""Committed rounds of named arrays in a bucket: how sites and coordinator exchange models.

Data flow: a site's outer step produces named arrays (an update) -> `write_arrays` stores
each as a zarr3 array in the site's bucket, hashing every chunk as it goes ->
`make_manifest` + `write_manifest` publish a manifest and, last, a COMMIT marker holding
the manifest's hash. The coordinator (or another reader) trusts a round only through
`read_manifest` (no COMMIT = not there), checks it with `check_schema` before reading a
byte of array data, then reads it with `read_arrays` straight into its own shardings
(any mesh), or block by block with `iter_blocks` + `read_block` for a streaming merge.
Every chunk read is checked against the digest the writer recorded.

Layout of one round under `prefix` (e.g. `updates/round_000012`). Every attempt to write
the round goes to a directory of its own, and the round is committed by creating COMMIT
with a create-only write, so two writers racing on one round (two coordinators, or a
restarted one) cannot both commit it, and a reader never sees a mix of their data:
  {prefix}/{attempt}/arrays/{name}/zarr.json, .../c/...   one zarr3 array per name
  {prefix}/{attempt}/manifest.json    canonical JSON: round metadata (naming its attempt),
                                      signature, one record per array
  {prefix}/COMMIT     {"attempt": ..., "manifest_sha256": ...}, created last, never replaced
and at the bucket root `LATEST` (JSON) pointing at the newest committed round. An
attempt that lost the race, or crashed, leaves a directory no COMMIT names: garbage
that readers never look at (`uncommitted_attempts` lists it for cleaning).

An array record is {shape, dtype, chunk_shape, codec, chunk_digests, digest}: the chunk
grid is regular with `chunk_shape`; `chunk_digests` lists, in C order of the grid, the
BLAKE3-256 of each chunk's in-bounds elements as C-order little-endian bytes; `digest`
is the sha256 of the concatenated 32-byte chunk digests.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import itertools
import json
import math
import os
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import blake3
import jax
import ml_dtypes
import numpy as np
import tensorstore as ts

from tapestry_jax import quantize
from tapestry_jax import update_codecs
from tapestry_jax.buckets import Bucket, BucketError, check_key, describe_error

FORMAT_VERSION = 2
KINDS = ("update", "global")
DEFAULT_MAX_CHUNK_BYTES = 16 << 20
# Host copies of shards waiting for their writes to land; bounds host memory when an
# accelerator's shards are copied out faster than storage takes them.
MAX_INFLIGHT_BYTES = 1 << 30
MANIFEST = "manifest.json"
COMMIT = "COMMIT"
LATEST = "LATEST"
_TOP = {"update": "updates", "global": "rounds"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_RANK = 32
_MAX_DIM = 1 << 48

Region = tuple[tuple[int, int], ...]  # (start, stop) per dimension


class ExchangeError(Exception):
  """A round that cannot be written, is not committed as claimed, or fails verification."""


class CommitConflict(ExchangeError):
  """Another writer committed this round first (its COMMIT exists); ours is not used."""


# --------------------------------------------------------------------------- layout


def _round(value: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ExchangeError(f"round must be a non-negative integer, got {value!r}")
  return int(value)


def update_prefix(round: int) -> str:  # noqa: A002
  """Where a site's update for `round` lives in its bucket: 'updates/round_000012'."""
  return f"{_TOP['update']}/round_{_round(round):06d}"


def global_prefix(round: int) -> str:  # noqa: A002
  """Where the global model of `round` lives in the global bucket: 'rounds/round_000012'."""
  return f"{_TOP['global']}/round_{_round(round):06d}"


def round_prefix(kind: str, round: int) -> str:  # noqa: A002
  """`update_prefix` or `global_prefix` by manifest kind."""
  _check_kind(kind)
  return update_prefix(round) if kind == "update" else global_prefix(round)


_ATTEMPT = re.compile(r"^a-[0-9a-f]{16}$")


def new_attempt(seed: str | None = None) -> str:
  """A name for one attempt at writing a round: 'a-' + 16 hex digits.

  Random by default (racing coordinators must not share a directory). A site passes a
  `seed` (e.g. 'site/round/base') so that every process of a multi-process site writes
  into the same attempt; a site is the only writer of its bucket."""
  if seed is None:
    return "a-" + uuid.uuid4().hex[:16]
  return "a-" + hashlib.sha256(seed.encode()).hexdigest()[:16]


def data_prefix(prefix: str, manifest_or_attempt: Mapping | str) -> str:
  """Where a round's arrays live: `{prefix}/{attempt}` (the attempt its manifest names)."""
  attempt = (manifest_or_attempt.get("attempt") if isinstance(manifest_or_attempt, Mapping)
             else manifest_or_attempt)
  if not isinstance(attempt, str) or not _ATTEMPT.match(attempt):
    raise ExchangeError(f"round {prefix}: attempt {str(attempt)[:40]!r} is not of the form "
                        f"'a-' + 16 hex digits")
  return f"{prefix.rstrip('/')}/{attempt}"


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ExchangeError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_prefix(bucket: Bucket, prefix: str) -> str:
  try:
    return check_key(prefix.rstrip("/") if isinstance(prefix, str) else prefix, what="prefix")
  except BucketError as e:
    raise ExchangeError(f"bucket {bucket.url}: {e}") from None


def _where(bucket: Bucket, prefix: str, name: str | None = None) -> str:
  at = f"bucket {bucket.url}, round {prefix}"
  return at if name is None else f"array {name!r} ({at})"


# --------------------------------------------------------------------------- chunks


def np_dtype(name: str) -> np.dtype:
  try:
    return np.dtype(name)
  except TypeError:
    return np.dtype(getattr(ml_dtypes, name))


def chunk_digest(a: np.ndarray) -> str:
  """BLAKE3-256 of `a`'s elements as C-order little-endian bytes (hex).

  BLAKE3, not sha256: every byte of every round is hashed once when written and once
  when read, and BLAKE3 is a cryptographic hash ~3x faster than sha256 on one core here
  (experiments/benchmarks/trust_overhead.py measures what hashing costs a round)."""
  flat = np.ascontiguousarray(a).reshape(-1)
  if sys.byteorder != "little" and flat.dtype.itemsize > 1:
    flat = flat.byteswap()
  return blake3.blake3(flat.view(np.uint8)).hexdigest()


def combined_digest(chunk_digests: Sequence[str]) -> str:
  h = hashlib.sha256()
  for d in chunk_digests:
    h.update(bytes.fromhex(d))
  return h.hexdigest()


def _grid(shape: Sequence[int], chunk: Sequence[int]) -> tuple[int, ...]:
  return tuple(-(-s // c) for s, c in zip(shape, chunk))


def _chunk_region(coord: Sequence[int], chunk: Sequence[int], shape: Sequence[int]) -> Region:
  return tuple((k * c, min((k + 1) * c, s)) for k, c, s in zip(coord, chunk, shape))


def _slices(region: Region) -> tuple[slice, ...]:
  return tuple(slice(a, b) for a, b in region)


def _normalize(index, shape: Sequence[int]) -> Region:
  """A jax/numpy index (tuple of slices, possibly open-ended) as explicit (start, stop)s."""
  index = tuple(index) if index is not None else ()
  index = index + (slice(None),) * (len(shape) - len(index))
  out = []
  for sl, s in zip(index, shape):
    start, stop, step = sl.indices(s)
    if step != 1:
      raise ExchangeError(f"strided index {sl} is not supported")
    out.append((start, max(start, stop)))
  return tuple(out)


def _overlapping(region: Region, chunk: Sequence[int]) -> list[tuple[int, ...]]:
  """Chunk-grid coordinates (C order) of the chunks that intersect `region`."""
  if any(b <= a for a, b in region):
    return []
  ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(region, chunk)]
  return list(itertools.product(*ranges))


def _flat(coord: Sequence[int], grid: Sequence[int]) -> int:
  i = 0
  for k, g in zip(coord, grid):
    i = i * g + k
  return i


def choose_chunk_shape(shape: Sequence[int], dtype, shard_shape: Sequence[int] | None = None,
                       max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> tuple[int, ...]:
  """The zarr chunk shape for an array: its shard shape (or whole shape), split along
  the leading axis until a chunk is at most `max_chunk_bytes` (one leading row may
  still exceed it). When the array is split into several shards the leading chunk size
  divides the shard's, so every chunk belongs to exactly one shard and writers of
  different shards never touch the same chunk."""
  shape = tuple(int(s) for s in shape)
  base = tuple(max(1, int(s)) for s in (shard_shape if shard_shape is not None else shape))
  if not base:
    return ()
  row_bytes = max(1, np.dtype(dtype).itemsize * math.prod(base[1:]))
  rows = max(1, int(max_chunk_bytes) // row_bytes)
  if rows >= base[0]:
    return base
  if shard_shape is not None and tuple(shard_shape) != shape:
    rows = max(d for d in range(1, rows + 1) if base[0] % d == 0)
  return (rows,) + base[1:]


# --------------------------------------------------------------------------- records


def _record_problems(name: str, rec: Any) -> list[str]:
  """What is structurally wrong with an array record (empty list if nothing)."""
  if not isinstance(rec, Mapping):
    return [f"{name!r}: record is not a JSON object"]
  missing = [k for k in ("shape", "dtype", "chunk_shape", "chunk_digests", "digest")
             if k not in rec]
  if missing:
    return [f"{name!r}: record lacks {missing}"]
  shape, chunk = rec["shape"], rec["chunk_shape"]

  def ints(v):
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

  if not ints(shape) or len(shape) > _MAX_RANK or any(s < 0 or s > _MAX_DIM for s in shape):
    return [f"{name!r}: declared shape {shape!r} is not a list of sane sizes"]
  if not ints(chunk) or len(chunk) != len(shape) or any(
      c < 1 or c > max(1, s) for c, s in zip(chunk, shape)):
    return [f"{name!r}: declared chunk_shape {chunk!r} does not fit shape {shape!r}"]
  try:
    np_dtype(rec["dtype"])
  except (TypeError, AttributeError):
    return [f"{name!r}: unknown dtype {rec['dtype']!r}"]
  digests = rec["chunk_digests"]
  n = math.prod(_grid(shape, chunk))
  if not isinstance(digests, list) or len(digests) != n:
    return [f"{name!r}: expected {n} chunk digests for shape {shape} in chunks of {chunk}, "
            f"got {len(digests) if isinstance(digests, list) else type(digests).__name__}"]
  if not all(isinstance(d, str) and _HEX64.match(d) for d in digests):
    return [f"{name!r}: chunk digests are incomplete or not 64 hex digits"]
  if rec["digest"] != combined_digest(digests):
    return [f"{name!r}: record digest does not match its chunk digests"]
  if "quant" in rec:  # A coded update leaf (`tapestry_jax.quantize`, `update_codecs`).
    quant = rec["quant"]
    problem = (update_codecs.check_quant(quant, str(rec["dtype"]))
               if isinstance(quant, Mapping) and "codec" in quant
               else quantize.check_params(quant, str(rec["dtype"])))
    if problem:
      return [f"{name!r}: {problem}"]
  return []


def _check_record(bucket: Bucket, prefix: str, name: str, rec: Any) -> None:
  problems = _record_problems(name, rec)
  if problems:
    raise ExchangeError(f"{_where(bucket, prefix, name)}: bad array record: {problems[0]}")


def _finish(rec: dict) -> dict:
  digests = rec["chunk_digests"]
  rec["digest"] = combined_digest(digests) if all(d is not None for d in digests) else None
  return rec


def merge_records(per_process: Sequence[Mapping[str, dict]]) -> dict[str, dict]:
  """Combines `write_arrays` results of the processes of one multi-process site.

  Each process knows the digests of the chunks it wrote (None elsewhere); gather the
  per-process dicts (e.g. over the site's own coordination channel) and merge them here
  before `make_manifest`.
  """
  merged: dict[str, dict] = {}
  for records in per_process:
    for name, rec in records.items():
      if name not in merged:
        merged[name] = dict(rec, chunk_digests=list(rec["chunk_digests"]))
        continue
      m = merged[name]
      if [m["shape"], m["dtype"], m["chunk_shape"]] != [rec["shape"], rec["dtype"],
                                                        rec["chunk_shape"]]:
        raise ExchangeError(f"array {name!r}: processes disagree on shape/dtype/chunks")
      for i, d in enumerate(rec["chunk_digests"]):
        if d is not None and m["chunk_digests"][i] not in (None, d):
          raise ExchangeError(f"array {name!r}: processes disagree on chunk {i}'s digest")
        if d is not None:
          m["chunk_digests"][i] = d
  return {name: _finish(rec) for name, rec in merged.items()}


def compact_records(records: Mapping[str, dict]) -> dict[str, dict]:
  """One writer's partial records with only the chunk digests it wrote, keyed by chunk
  index (a small message to send to whoever combines them; `expand_records` undoes it)."""
  return {n: dict(r, chunk_digests={str(i): d for i, d in enumerate(r["chunk_digests"])
                                    if d is not None}, digest=None)
          for n, r in records.items()}


def expand_records(records: Mapping[str, dict]) -> dict[str, dict]:
  """`compact_records`' output as `merge_records` takes it (None for other writers' chunks)."""
  out = {}
  for n, r in records.items():
    digests: list[str | None] = [None] * math.prod(_grid(r["shape"], r["chunk_shape"]))
    for i, d in r["chunk_digests"].items():
      digests[int(i)] = d
    out[n] = dict(r, chunk_digests=digests)
  return out


# --------------------------------------------------------------------------- zarr stores


def _array_key(prefix: str, name: str) -> str:
  return f"{prefix}/arrays/{name}"


def _zarr_metadata(shape, dtype_name: str, chunk) -> dict:
  return {"shape": list(shape), "data_type": dtype_name,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}}}


def _check_names(bucket: Bucket, prefix: str, names: Sequence[str]) -> None:
  for name in names:
    try:
      check_key(name, what="array name")
    except BucketError as e:
      raise ExchangeError(f"{_where(bucket, prefix)}: {e}") from None
  # A name that is a directory of another ('a' and 'a/b') would nest one zarr array
  # inside the other's directory.
  parents = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
  nested = sorted(set(names) & parents)
  if nested:
    raise ExchangeError(f"{_where(bucket, prefix)}: array names {nested} are also parents "
                        f"of other names; names must not nest")


def _local_pieces(x) -> tuple[list[tuple[Region, Any]], bool]:
  """(region, host data) for each piece this process writes, and whether it writes all.

  A sharded jax.Array contributes its addressable shards with replica_id 0 (one copy
  of each distinct shard, across all processes).
  """
  if isinstance(x, jax.Array):
    pieces = [(_normalize(s.index, x.shape), s.data) for s in x.addressable_shards
              if s.replica_id == 0]
    for _, data in pieces:
      data.copy_to_host_async()  # overlap all device->host copies of this array
    return pieces, x.is_fully_addressable
  a = np.asarray(x)
  return [(tuple((0, s) for s in a.shape), a)], True


def write_arrays(bucket: Bucket, prefix: str, arrays: Mapping[str, Any], *,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 compress: bool = False) -> dict[str, dict]:
  """Stores each array as zarr3 at `{prefix}/arrays/{name}` and returns its record.

  `prefix` is an attempt's directory, `data_prefix(round prefix, new_attempt())`.

  A sharded jax.Array is chunked by its shard shape and every process writes only the
  shards it holds (replica 0 of each). Chunk digests are computed from the same host
  bytes that are written. In a multi-process site each process's records carry None
  for chunks other processes wrote: combine them with `merge_records`.
  `compress` adds zstd (level 3); off by default because rounds are latency-bound.
  Refuses to write into a committed round: committed rounds are immutable.
  """
  prefix = _check_prefix(bucket, prefix)
  parent, _, attempt = prefix.rpartition("/")
  if parent and _ATTEMPT.match(attempt) and _committed_attempt(bucket, parent) == attempt:
    raise ExchangeError(f"{_where(bucket, prefix)}: this attempt is committed; committed "
                        f"rounds are immutable")
  names = sorted(arrays)
  _check_names(bucket, prefix, names)
  codec = "zstd" if compress else "raw"
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if compress:
    codecs.append({"name": "zstd", "configuration": {"level": 3}})
  # One process: a retry after a crash starts from a clean directory. Several: each
  # process opens-or-creates the same metadata and writes only its own chunks.
  single = jax.process_count() == 1

  layouts, opens, specs = {}, {}, {}
  for name in names:
    x = arrays[name]
    shape, dtype = tuple(int(s) for s in x.shape), np.dtype(x.dtype)
    shard_shape = None
    if isinstance(x, jax.Array):
      shard_shape = x.sharding.shard_shape(x.shape)
    chunk = choose_chunk_shape(shape, dtype, shard_shape, max_chunk_bytes)
    layouts[name] = (shape, dtype, chunk)
    spec = {"driver": "zarr3", "kvstore": bucket.array_spec(_array_key(prefix, name)),
            "metadata": dict(_zarr_metadata(shape, dtype.name, chunk), codecs=codecs)}
    # All opens are issued before any is awaited: on a remote store each is a round trip.
    opens[name] = ts.open(spec, create=True, delete_existing=single, open=not single,
                          context=bucket.context)
    specs[name] = spec

  records: dict[str, dict] = {}
  pending: collections.deque = collections.deque()  # (name, commit future, nbytes)
  inflight = 0
  written = 0

  def settle(limit: int) -> None:
    nonlocal inflight
    while pending and inflight > limit:
      name, fut, nbytes = pending.popleft()
      try:
        fut.result()
      except Exception as e:  # noqa: BLE001
        raise ExchangeError(f"{_where(bucket, prefix, name)}: write failed: "
                            f"{describe_error(e)}") from None
      inflight -= nbytes

  # blake3 releases the GIL on large buffers, so chunks hash in parallel while
  # TensorStore writes them.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    hashes: dict[str, list] = {}
    covers: dict[str, bool] = {}  # whether this process writes all of the array
    for name in names:
      shape, dtype, chunk = layouts[name]
      try:
        try:
          store = opens[name].result()
        except ValueError as e:
          if "ALREADY_EXISTS" not in str(e):
            raise
          # The create-only metadata write landed but its answer was lost, and its retry
          # found it: open what this writer just created (the metadata must match).
          store = ts.open(specs[name], open=True, context=bucket.context).result()
      except Exception as e:  # noqa: BLE001
        settle(-1)
        raise ExchangeError(f"{_where(bucket, prefix, name)}: cannot create array: "
                            f"{describe_error(e)}") from None
      grid = _grid(shape, chunk)
      pieces, complete = _local_pieces(arrays[name])
      hashes[name] = []
      for region, data in pieces:
        data = np.asarray(data, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if any(a % c for (a, _), c in zip(region, chunk)):
          raise ExchangeError(f"{_where(bucket, prefix, name)}: shard {region} is not "
                              f"aligned to chunks {chunk}")
        pending.append((name, store[_slices(region)].write(data), data.nbytes))
        inflight += data.nbytes
        written += data.nbytes
        for coord in _overlapping(region, chunk):
          local = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in
                        zip(_chunk_region(coord, chunk, shape), region))
          hashes[name].append((_flat(coord, grid), pool.submit(chunk_digest, data[local])))
        settle(MAX_INFLIGHT_BYTES)
      covers[name] = complete
    # Digests are collected only once every write is issued: waiting for one array's
    # hashes before writing the next would put the hashing back on the critical path.
    for name in names:
      shape, dtype, chunk = layouts[name]
      digests: list[str | None] = [None] * math.prod(_grid(shape, chunk))
      for i, fut in hashes[name]:
        digests[i] = fut.result()
      if covers[name] and any(d is None for d in digests):
        settle(-1)
        raise ExchangeError(f"{_where(bucket, prefix, name)}: shards do not cover the array")
      records[name] = _finish({"shape": list(shape), "dtype": dtype.name,
                               "chunk_shape": list(chunk), "codec": codec,
                               "chunk_digests": digests})
    settle(-1)
  bucket.record_transfer(written=written)
  return records


def _open_for_read(bucket: Bucket, prefix: str, name: str, rec: Mapping) -> ts.Future:
  # The manifest's shape/dtype/chunks are constraints: TensorStore refuses stored
  # metadata that disagrees with them.
  spec = {"driver": "zarr3", "kvstore": bucket.array_spec(_array_key(prefix, name)),
          "metadata": _zarr_metadata(rec["shape"], rec["dtype"], rec["chunk_shape"])}
  return ts.open(spec, open=True, read=True, context=bucket.context)


def _await_store(bucket, prefix, name, fut):
  try:
    return fut.result()
  except Exception as e:  # noqa: BLE001
    raise ExchangeError(f"{_where(bucket, prefix, name)}: cannot open stored array: "
                        f"{describe_error(e)}") from None


def _read(bucket, prefix, name, fut) -> np.ndarray:
  try:
    return fut.result()
  except Exception as e:  # noqa: BLE001
    raise ExchangeError(f"{_where(bucket, prefix, name)}: read failed: "
                        f"{describe_error(e)}") from None


def _verify_chunk(bucket, prefix, name, rec, coord, data: np.ndarray, actual: str) -> None:
  grid = _grid(rec["shape"], rec["chunk_shape"])
  expected = rec["chunk_digests"][_flat(coord, grid)]
  if actual != expected:
    raise ExchangeError(f"{_where(bucket, prefix, name)}: chunk {tuple(coord)} is corrupt "
                        f"(blake3 {actual[:12]}... != recorded {expected[:12]}...)")


def _queue_digests(pool, queued: concurrent.futures.Future, dest: np.ndarray, region: Region,
                   chunk, shape, read_future) -> None:
  """TensorStore done-callback of a verified piece's read: submits each of its chunks'
  digests to `pool` and resolves `queued` with [(coord, view, digest future)] (nothing
  if the read failed: the reader reports that error)."""
  try:
    if read_future.cancelled() or read_future.exception() is not None:
      queued.set_result([])
      return
    jobs = []
    for c in _overlapping(region, chunk):
      view = dest[tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in
                        zip(_chunk_region(c, chunk, shape), region))]
      jobs.append((c, view, pool.submit(chunk_digest, view)))
    queued.set_result(jobs)
  except BaseException as e:  # noqa: BLE001  (a callback must not raise into TensorStore)
    queued.set_exception(e)


def _chunk_aligned(region: Region, chunk, shape) -> bool:
  """Whether `region` is a union of whole chunks (its bounds on chunk or array edges)."""
  return all(a % c == 0 and (b % c == 0 or b == s)
             for (a, b), c, s in zip(region, chunk, shape))


def _assemble(region: Region, chunks: Mapping[tuple, np.ndarray], chunk, shape, dtype):
  out = np.empty(tuple(b - a for a, b in region), dtype)
  for coord in _overlapping(region, chunk):
    creg = _chunk_region(coord, chunk, shape)
    inter = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, creg))
    dst = tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(inter, region))
    src = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(inter, creg))
    out[dst] = chunks[coord][src]
  return out


def read_arrays(bucket: Bucket, prefix: str, manifest: Mapping,
                shardings: Mapping[str, jax.sharding.Sharding], *,
                verify: bool = True) -> dict[str, jax.Array]:
  """Reads the named arrays of committed round `prefix` straight into `shardings`.

  The shardings may live on any mesh (not the writer's). Each process reads only what
  its addressable devices need. With `verify`, the whole chunks overlapping those
  slices are read (each once per array) and checked against the manifest's digests;
  without it, exactly the needed slices are read. Names not in `shardings` are skipped.
  """
  prefix = _check_prefix(bucket, prefix)
  records = manifest.get("arrays") if isinstance(manifest, Mapping) else None
  if not isinstance(records, Mapping):
    raise ExchangeError(f"{_where(bucket, prefix)}: manifest has no 'arrays' table")
  prefix = data_prefix(prefix, manifest)
  unknown = sorted(set(shardings) - set(records))
  if unknown:
    raise ExchangeError(f"{_where(bucket, prefix)}: arrays {unknown} are not in the manifest")
  names = sorted(shardings)
  for name in names:
    _check_record(bucket, prefix, name, records[name])
  opens = {name: _open_for_read(bucket, prefix, name, records[name]) for name in names}

  out: dict[str, jax.Array] = {}
  layouts = {}
  for name in names:
    rec = records[name]
    shape, chunk = tuple(rec["shape"]), tuple(rec["chunk_shape"])
    sharding = shardings[name]
    try:
      indices = sharding.addressable_devices_indices_map(shape)
    except (ValueError, IndexError) as e:  # a mesh axis that does not divide a dim, or
      # a spec longer than the rank
      what = getattr(sharding, "spec", sharding)
      raise ExchangeError(f"{_where(bucket, prefix, name)}: requested sharding {what} "
                          f"does not fit shape {shape} ({str(e).splitlines()[0]})") from None
    regions = {_normalize(idx, shape) for idx in indices.values()}
    layouts[name] = (rec, shape, chunk, np_dtype(rec["dtype"]), sharding, regions)

  unsettled: list = []  # (name, record, chunk coord, data, digest future) to check
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    # The common verified case (every piece this process needs is whole chunks): all
    # reads are issued at once, straight into the output buffers (no extra memory: they
    # are the result), and a piece's chunks are queued for hashing (in place) the moment
    # TensorStore finishes it, in whatever order pieces land, while the rest is still
    # being read. Every check is settled before anything is returned.
    direct = {name: {} for name, (_, shape, chunk, _, _, regions) in layouts.items()
              if verify and all(_chunk_aligned(r, chunk, shape) for r in regions)}
    for name, pieces in direct.items():
      _, shape, chunk, dtype, _, regions = layouts[name]
      store = _await_store(bucket, prefix, name, opens[name])
      for r in regions:
        dest = np.empty(tuple(b - a for a, b in r), dtype)
        fut = ts.array(dest, copy=False, write=True).write(store[_slices(r)])
        queued: concurrent.futures.Future = concurrent.futures.Future()
        fut.add_done_callback(functools.partial(_queue_digests, pool, queued, dest, r, chunk,
                                                shape))
        pieces[r] = (dest, fut, queued)

    for name in names:
      rec, shape, chunk, dtype, sharding, regions = layouts[name]
      nbytes = 0
      if name in direct:
        pieces = {}
        for r, (dest, fut, queued) in direct.pop(name).items():
          _read(bucket, prefix, name, fut)
          unsettled.extend((name, rec, c, view, digest) for c, view, digest in queued.result())
          pieces[r] = dest
          nbytes += dest.nbytes
      elif verify:
        store = _await_store(bucket, prefix, name, opens[name])
        coords = sorted({c for r in regions for c in _overlapping(r, chunk)})
        reads = {c: store[_slices(_chunk_region(c, chunk, shape))].read() for c in coords}
        chunks, checks = {}, []
        for c in coords:
          chunks[c] = _read(bucket, prefix, name, reads[c])
          nbytes += chunks[c].nbytes
          checks.append((c, pool.submit(chunk_digest, chunks[c])))
        for c, fut in checks:
          _verify_chunk(bucket, prefix, name, rec, c, chunks[c], fut.result())
        pieces = {r: _assemble(r, chunks, chunk, shape, dtype) for r in regions}
        del chunks
      else:
        store = _await_store(bucket, prefix, name, opens[name])
        reads = {r: store[_slices(r)].read() for r in regions}
        pieces = {r: _read(bucket, prefix, name, f) for r, f in reads.items()}
        nbytes = sum(p.nbytes for p in pieces.values())
      bucket.record_transfer(read=nbytes)
      out[name] = jax.make_array_from_callback(
          shape, sharding, lambda idx, p=pieces, s=shape: p[_normalize(idx, s)], dtype=dtype)
      del pieces
    for name, rec, c, data, fut in unsettled:
      _verify_chunk(bucket, prefix, name, rec, c, data, fut.result())
  return out


# --------------------------------------------------------------------------- manifests


def _canonical(bucket_url: str, prefix: str, obj: Any) -> bytes:
  try:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
  except (TypeError, ValueError) as e:
    raise ExchangeError(f"bucket {bucket_url}, round {prefix}: manifest is not plain JSON "
                        f"({e})") from None


def manifest_digest(manifest: Mapping) -> str:
  """The sha256 hex a committed manifest's COMMIT marker holds (of its canonical JSON)."""
  return hashlib.sha256(_canonical("-", "-", manifest)).hexdigest()


def make_manifest(*, federation: str, kind: str, round: int, author: str,  # noqa: A002
                  attempt: str, arrays: Mapping[str, dict], base_round: int | None = None,
                  tokens: int = 0, extra: Mapping[str, Any] | None = None) -> dict:
  """A manifest dict: `kind` is 'update' (a site's) or 'global' (the coordinator's),
  `attempt` the directory the arrays were written to (`new_attempt`), `base_round` the
  global round the update was computed from, `tokens` how many training tokens it
  consumed, `arrays` the records from `write_arrays`, `extra` any small JSON dict.
  Sign it (`trust.Signer.sign`) before `write_manifest`."""
  _check_kind(kind)
  for field, value in (("federation", federation), ("author", author)):
    if not isinstance(value, str) or not value:
      raise ExchangeError(f"manifest {field} must be a non-empty string, got {value!r}")
  if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 0:
    raise ExchangeError(f"manifest tokens must be a non-negative integer, got {tokens!r}")
  data_prefix("-", attempt)  # Checks its form.
  return {
      "format": FORMAT_VERSION,
      "federation": federation,
      "kind": kind,
      "round": _round(round),
      "author": author,
      "attempt": attempt,
      "base_round": None if base_round is None else _round(base_round),
      "tokens": int(tokens),
      "arrays": {name: dict(rec) for name, rec in arrays.items()},
      "extra": dict(extra or {}),
  }


_REQUIRED = ("format", "federation", "kind", "round", "author", "attempt", "base_round",
             "tokens", "arrays", "extra")


def _manifest_problems(manifest: Any) -> list[str]:
  if not isinstance(manifest, Mapping):
    return ["manifest is not a JSON object"]
  missing = [k for k in _REQUIRED if k not in manifest]
  if missing:
    return [f"manifest lacks fields {missing}"]
  if manifest["format"] != FORMAT_VERSION:
    return [f"manifest format {manifest['format']!r} is not {FORMAT_VERSION} (written by "
            f"another version of tapestry_jax?)"]
  if manifest["kind"] not in KINDS:
    return [f"manifest kind {manifest['kind']!r} is not one of {KINDS}"]
  if not isinstance(manifest["attempt"], str) or not _ATTEMPT.match(manifest["attempt"]):
    return [f"manifest attempt {str(manifest['attempt'])[:40]!r} is not 'a-' + 16 hex digits"]
  if not isinstance(manifest["arrays"], Mapping):
    return ["manifest 'arrays' is not a JSON object"]
  problems = []
  for name, rec in manifest["arrays"].items():
    problems += _record_problems(name, rec)
  return problems


def _read_commit(bucket: Bucket, prefix: str) -> dict | None:
  """The parsed COMMIT marker of round `prefix`, or None when there is none."""
  data = bucket.read(f"{prefix}/{COMMIT}")
  if data is None:
    return None
  try:
    commit = json.loads(data)
    if not (isinstance(commit, dict) and _ATTEMPT.match(commit["attempt"])
            and re.fullmatch(r"[0-9a-f]{64}", commit["manifest_sha256"])):
      raise ValueError
  except (ValueError, KeyError, TypeError):
    raise ExchangeError(f"{_where(bucket, prefix)}: COMMIT is not a commit marker: "
                        f"{data[:80]!r}") from None
  return commit


def _committed_attempt(bucket: Bucket, prefix: str) -> str | None:
  try:
    commit = _read_commit(bucket, prefix)
  except ExchangeError:
    return None
  return None if commit is None else commit["attempt"]


def write_manifest(bucket: Bucket, prefix: str, manifest: Mapping) -> str:
  """Publishes a round: `{prefix}/{attempt}/manifest.json` (canonical JSON), then, last,
  creates `{prefix}/COMMIT` naming the attempt and the manifest's sha256 with a
  create-only write. Returns that hash.

  Write the arrays into the attempt first (`write_arrays` returns once they are
  durable). Raises CommitConflict when the round was already committed (by anyone):
  committed rounds are immutable and exactly one attempt commits a round.
  """
  prefix = _check_prefix(bucket, prefix)
  problems = _manifest_problems(manifest)
  if problems:
    raise ExchangeError(f"{_where(bucket, prefix)}: refusing to publish a bad manifest: "
                        + "; ".join(problems[:5]))
  data = _canonical(bucket.url, prefix, manifest)
  if bucket.exists(f"{prefix}/{COMMIT}"):  # Cheap early out; the create below decides.
    raise CommitConflict(f"{_where(bucket, prefix)}: round is already committed; committed "
                         f"rounds are immutable")
  digest = hashlib.sha256(data).hexdigest()
  attempt = manifest["attempt"]
  bucket.write(f"{data_prefix(prefix, attempt)}/{MANIFEST}", data)
  marker = _canonical(bucket.url, prefix, {"attempt": attempt, "manifest_sha256": digest})
  if not bucket.create(f"{prefix}/{COMMIT}", marker):
    # A retried create (the first try landed, its response was lost) finds our own
    # marker: that is our commit, not a conflict.
    if bucket.read(f"{prefix}/{COMMIT}") == marker:
      return digest
    raise CommitConflict(f"{_where(bucket, prefix)}: another writer committed this round "
                         f"first; attempt {attempt} is not used")
  return digest


def read_manifest(bucket: Bucket, prefix: str) -> dict | None:
  """The manifest of a committed round, or None when `{prefix}/COMMIT` is absent.

  ExchangeError when COMMIT exists but the manifest it names is missing, does not hash
  to it, names another attempt, or is not a manifest this version understands.
  Signatures are checked by the caller (`trust.TrustRoot.verify`).
  """
  prefix = _check_prefix(bucket, prefix)
  commit = _read_commit(bucket, prefix)
  if commit is None:
    return None
  where = f"{data_prefix(prefix, commit['attempt'])}/{MANIFEST}"
  data = bucket.read(where)
  if data is None:
    raise ExchangeError(f"{_where(bucket, prefix)}: COMMIT names {where}, which is missing")
  actual = hashlib.sha256(data).hexdigest()
  if commit["manifest_sha256"] != actual:
    raise ExchangeError(f"{_where(bucket, prefix)}: manifest.json does not match COMMIT "
                        f"(sha256 {actual[:12]}... != committed "
                        f"{commit['manifest_sha256'][:12]}...); it was changed after the "
                        f"round was committed")
  try:
    manifest = json.loads(data)
  except ValueError as e:
    raise ExchangeError(f"{_where(bucket, prefix)}: manifest.json is not JSON ({e})") from None
  problems = _manifest_problems(manifest)
  if problems:
    raise ExchangeError(f"{_where(bucket, prefix)}: bad manifest: " + "; ".join(problems[:5]))
  if manifest["attempt"] != commit["attempt"]:
    raise ExchangeError(f"{_where(bucket, prefix)}: manifest names attempt "
                        f"{manifest['attempt']}, COMMIT {commit['attempt']}")
  return manifest


def uncommitted_attempts(bucket: Bucket, prefix: str) -> list[str]:
  """Attempt directories under round `prefix` that its COMMIT does not name (garbage left
  by a crashed or beaten writer; safe to delete once the round is committed)."""
  prefix = _check_prefix(bucket, prefix)
  committed = _committed_attempt(bucket, prefix)
  found = {k[len(prefix) + 1:].split("/", 1)[0] for k in bucket.list(prefix + "/")}
  return sorted(a for a in found if _ATTEMPT.match(a) and a != committed)


def _expected_shape_dtype(spec) -> tuple[tuple[int, ...], np.dtype, Any]:
  if hasattr(spec, "shape") and hasattr(spec, "dtype"):
    return tuple(spec.shape), np.dtype(spec.dtype), False
  shape, dtype, *quantized = spec
  dtype = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
  quant = quantized[0] if quantized else False
  return tuple(shape), dtype, quant if isinstance(quant, Mapping) else bool(quant)


def check_schema(manifest: Mapping, expected: Mapping[str, Any]) -> None:
  """Checks, before anything is allocated or read, that the manifest declares exactly
  the expected arrays with the expected shapes and dtypes.

  `expected` maps name -> (shape, dtype), (shape, dtype, quantized) or anything with
  .shape/.dtype (arrays, jax.ShapeDtypeStruct). A quantized array's record must carry its
  dequantization parameters ("quant"): any valid per-tensor ones (`tapestry_jax.quantize`)
  when `quantized` is True, exactly `quantized` when it is a dict (the codec of block or
  top-k codes, `tapestry_jax.update_codecs`); any other array's record must not.
  Raises ExchangeError listing every problem.
  """
  records = manifest.get("arrays") if isinstance(manifest, Mapping) else None
  where = (f"round {manifest.get('round')!r} by {manifest.get('author')!r}"
           if isinstance(manifest, Mapping) else "manifest")
  if not isinstance(records, Mapping):
    raise ExchangeError(f"schema mismatch in {where}: manifest has no 'arrays' table")
  problems = []
  missing = sorted(set(expected) - set(records))
  unexpected = sorted(set(records) - set(expected))
  if missing:
    problems.append(f"missing arrays {missing}")
  if unexpected:
    problems.append(f"unexpected arrays {unexpected}")
  for name in sorted(set(expected) & set(records)):
    rec = records[name]
    shape, dtype, quantized = _expected_shape_dtype(expected[name])
    structural = _record_problems(name, rec)
    if structural:
      problems += structural
      continue
    if tuple(rec["shape"]) != shape:
      n_decl, n_exp = math.prod(rec["shape"]), math.prod(shape)
      size = " (declares more elements than expected)" if n_decl > n_exp else ""
      problems.append(f"{name!r}: shape {tuple(rec['shape'])} != expected {shape}{size}")
    if np_dtype(rec["dtype"]) != dtype:
      problems.append(f"{name!r}: dtype {rec['dtype']} != expected {dtype.name}")
    if quantized and "quant" not in rec:
      problems.append(f"{name!r}: quantized ({dtype.name}) but its record has no "
                      f"quantization parameters ('quant')")
    elif not quantized and "quant" in rec:
      problems.append(f"{name!r}: not a quantized array, but its record has 'quant'")
    elif isinstance(quantized, Mapping) and dict(rec["quant"]) != dict(quantized):
      problems.append(f"{name!r}: its record declares codec {rec['quant']!r}, expected "
                      f"{dict(quantized)!r}")
    elif quantized is True and "codec" in rec["quant"]:
      problems.append(f"{name!r}: its record declares codec {rec['quant']!r}, expected "
                      f"per-tensor {dtype.name} codes (offset and scale)")
  if problems:
    shown = "; ".join(problems[:10])
    more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise ExchangeError(f"schema mismatch in {where}: {shown}{more}")


# --------------------------------------------------------------------------- rounds


_LATEST_TRIES = 8


def write_latest(bucket: Bucket, round: int, kind: str = "global") -> None:  # noqa: A002
  """Points `LATEST` at `round`; refuses unless that round is committed in `bucket`.

  Never moves it backwards: a slower writer of an older round (a second coordinator)
  leaves a newer pointer as it is."""
  prefix = round_prefix(kind, round)
  manifest = read_manifest(bucket, prefix)
  if manifest is None:
    raise ExchangeError(f"{_where(bucket, prefix)}: not committed (no COMMIT); LATEST may "
                        f"only point at committed rounds")
  if manifest["round"] != round or manifest["kind"] != kind:
    raise ExchangeError(f"{_where(bucket, prefix)}: manifest says {manifest['kind']} round "
                        f"{manifest['round']}, not {kind} round {round}")
  pointer = _canonical(bucket.url, LATEST, {"kind": kind, "round": int(round), "prefix": prefix})
  # Compare-and-swap: a newer pointer written between our read and our write (a second
  # coordinator) makes the write fail instead of moving LATEST back.
  for _ in range(_LATEST_TRIES):
    data, generation = bucket.read_versioned(LATEST)
    try:
      current = None if data is None else _latest_round(data)
    except ExchangeError:
      current = None  # An unreadable pointer is replaced.
    if current is not None and current >= round:
      return
    if bucket.replace(LATEST, pointer, generation):
      return
  raise ExchangeError(f"bucket {bucket.url}: LATEST changed under every one of "
                      f"{_LATEST_TRIES} tries to point it at round {round}")


def read_latest(bucket: Bucket) -> int | None:
  """The round `LATEST` points at, or None if the bucket has no LATEST yet."""
  data = bucket.read(LATEST)
  if data is None:
    return None
  try:
    return _latest_round(data)
  except ExchangeError:
    raise ExchangeError(f"bucket {bucket.url}: LATEST is not a round pointer: "
                        f"{data[:80]!r}") from None


def _latest_round(data: bytes) -> int:
  try:
    return _round(json.loads(data)["round"])
  except (ValueError, KeyError, TypeError) as e:
    raise ExchangeError(f"not a round pointer ({e})") from None


def committed_rounds(bucket: Bucket, kind: str) -> list[int]:
  """Sorted rounds of `kind` that have a COMMIT marker in `bucket` (by listing keys)."""
  _check_kind(kind)
  top = _TOP[kind]
  pattern = re.compile(rf"^{top}/round_(\d+)/{COMMIT}$")
  rounds = []
  for key in bucket.list(f"{top}/"):
    m = pattern.match(key)
    if m:
      rounds.append(int(m.group(1)))
  return sorted(rounds)
