"""Throughput and peak memory of the coordinator's streaming merge (`merge.merge_round`).

  python -m experiments.benchmarks.merge_throughput                     # 8 sites x 256 MiB
  python -m experiments.benchmarks.merge_throughput --repeats=2 --cache=both
  python -m experiments.benchmarks.merge_throughput --sites=4 --update_mib=64 --outer=adam
  python -m experiments.benchmarks.merge_throughput --sites=4 --update_mib=64 --workers=1,2 \
      --cache=cold --repeats=2

Target (issue 3): the coordinator merges K site updates at >= 50% of the raw TensorStore
read throughput of the same bytes, measured in the same run, and its peak memory stays
bounded: 8 updates of 256 MiB each merge in under 1 GiB resident.

Two page-cache states are measured (--cache=warm|cold|both, default both), each with its
own raw-read baselines, merges and ratio, because they answer different questions:
  warm  every input byte is in the page cache (read once, untimed, before each repeat's
        timed runs). Raw reads are then memory copies, so the merge is CPU-bound: the
        kernel's copies and page faults of its reads, the digest of every chunk read
        and written (BLAKE3; the digests are what signatures bind, so they cannot be
        skipped) and merge_block (--workers --profile splits them; docs/merge_workers.md).
        This isolates the merge's own CPU
        cost: the ratio is the verification + merge overhead over a bare memory copy.
  cold  before EACH timed measurement (every raw-read variant, the verified read, every
        merge) dirty pages are flushed (os.sync) and the page cache is dropped (write 3
        to /proc/sys/vm/drop_caches; needs root, and it drops the cache of the whole
        machine, other processes' included). Every byte then comes from storage, which
        is what a coordinator reading fresh site updates sees: the updates were written
        by other machines (or long enough ago), so they are not in its page cache. Here
        the raw baseline is storage throughput and hashing can hide behind the reads.
  both  warm, then cold, in every repeat. If the page cache cannot be dropped, --cache=cold
        fails with one line saying why and --cache=both measures warm only (with a note).

What runs, in order, under --workdir (a fresh temp dir, removed at the end unless --keep):
  1. Data: a previous global round (params/<name> and outer/<name>/<leaf> for --outer,
     the layout Coordinator.publish_initial writes) in file://WORKDIR/global, and K site
     updates in file://WORKDIR/site_k, all committed with exchange.write_arrays +
     write_manifest (16 MiB chunks). Every array is float32 [rows, --cols]; --num_arrays
     of them make --update_mib per update. They are generated and written one array at
     a time, then flushed to disk (os.sync).
  2. Baselines, in this process, over exactly the bytes the merge reads (K updates,
     global params, outer state):
       raw, blocks, W in flight
                     TensorStore reads of the merge's blocks (whole chunks), no checks,
                     W at a time: W = --read_window (1: more in flight was slower on 2
                     cores, warm), and W = the merge's own read concurrency (one block
                     of each parameter-shaped input: K + 1 + outer-state leaves), which
                     storage (cold) rewards;
       raw, arrays   whole zarr3 arrays with `ts.open(...).read()`, --read_window at a
                     time, no checks;
       verified      exchange.read_block over the same blocks (digest of every chunk
                     checked against the writer's digest, as the merge does), on
                     os.cpu_count() threads.
     The target ratio is taken against the FASTER raw read (of that cache state).
  3. The merge, in a child process (so its peak RSS is the merge's alone, not the data
     generator's): merge.merge_round of the K updates into a new global round, then its
     manifest and COMMIT, like Coordinator.run_round. Before timing, the child compiles
     outer.merge_block for the block shapes it will see (a long-running coordinator did
     that in its first round), resets its RSS high-water mark, syncs, and (cold) drops
     the page cache.
  4. Check: --check_blocks blocks of the first merged round are compared bit for bit
     with outer.merge_block on the same inputs read back here, and every later merged
     round (warm or cold) must have the same array records (chunk digests) as the first.
  3'. With --workers=M1,M2,... the merge instead runs, for each M, in M processes joined
     by jax.distributed on this machine (merge_workers.Workers, as a coordinator of M
     processes: each merges its merge.split_work range, the leader combines the records
     and commits). Every worker plans and compiles first; the leader then flushes (and,
     cold, drops) the page cache and starts them all. The time runs from that start to
     the leader's combined records and manifest. Each worker's own range time and peak
     RSS are reported, the speedup over the fewest workers (target, issue 13: M=2 >=
     1.6 x M=1 on 2 cores), and a round of a big model on several coordinator hosts
     estimated from the per-worker rate (--estimate_*). Every M must merge the same
     bits: all rounds' array records are compared.
Steps 2 and 3 run --repeats times per cache state (warm, then cold, in each repeat);
the best time of each is reported, with CPU seconds (user + system, all threads). Every
timed measurement starts after an os.sync(), so that writeback of the previous merge's
output does not overlap it. Peak RSS is the largest over all merges (page cache is not
RSS, so it is the same warm or cold). The machine's load average is printed too: other
processes competing for the CPU slow every measurement, warm ones most.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorstore as ts
from absl import app, flags

from tapestry_jax import exchange
from tapestry_jax import merge as merge_lib
from tapestry_jax import outer as outer_lib
from tapestry_jax import outer_config
from tapestry_jax.buckets import Bucket

_SITES = flags.DEFINE_integer("sites", 8, "K: site updates merged.")
_UPDATE_MIB = flags.DEFINE_integer("update_mib", 256, "Size of one site update, in MiB.")
_NUM_ARRAYS = flags.DEFINE_integer("num_arrays", 8, "Arrays (parameters) per update.")
_COLS = flags.DEFINE_integer("cols", 4096, "Trailing dimension of every array.")
_OUTER = flags.DEFINE_enum("outer", "nesterov", list(outer_config.OUTER_OPTIMIZERS),
                           "Outer optimizer (decides the outer-state arrays read and written).")
_MAX_BLOCK_MIB = flags.DEFINE_float("max_block_mib", merge_lib.DEFAULT_MAX_BLOCK_BYTES / 2**20,
                                    "merge_round's max_block_bytes, in MiB.")
_READ_AHEAD = flags.DEFINE_integer("read_ahead", merge_lib.DEFAULT_READ_AHEAD,
                                   "merge_round's read_ahead (block sets read while one merges).")
_READ_WINDOW = flags.DEFINE_integer("read_window", 1, "Reads in flight in the raw read "
                                    "baselines.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed (raw reads, merge) rounds per cache "
                                "state; best of each.")
_CACHE = flags.DEFINE_enum("cache", "both", ["warm", "cold", "both"],
                           "Page cache for the timed runs: warm (inputs cached: CPU-bound), "
                           "cold (os.sync + drop_caches before each: storage throughput; "
                           "needs root), or both (warm, then cold, each repeat).")
_CHECK_BLOCKS = flags.DEFINE_integer("check_blocks", 3, "Merged blocks checked against numpy.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the buckets go ('' = a new dir under /tmp).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep --workdir at the end.")
_JSON = flags.DEFINE_string("json_out", "", "Also write the results here.")
_CHILD = flags.DEFINE_string("merge_child", "", "Internal: run only the merge described by "
                             "this JSON file and print its measurements as JSON.")
_WORKERS = flags.DEFINE_list("workers", [], "Worker counts M (e.g. 1,2): merge with M "
                             "processes joined by jax.distributed (merge_workers.Workers), "
                             "each M in every repeat; '' = one merge_round child.")
_PROFILE = flags.DEFINE_bool("profile", False, "With --workers: time each worker's stages "
                              "(reads with their checks, chunk digests, merge_block, waits "
                              "for writes) and print them.")
_WORKER_ID = flags.DEFINE_integer("worker_id", -1, "Internal: this merge worker's process id "
                                  "(with --merge_child).")
# The scaling estimate printed with --workers: one coordinator round of a big model.
_EST_PARAMS = flags.DEFINE_float("estimate_params", 70e9, "Estimate: model parameters.")
_EST_SITES = flags.DEFINE_integer("estimate_sites", 10, "Estimate: site updates per round.")
_EST_HOSTS = flags.DEFINE_integer("estimate_hosts", 8, "Estimate: coordinator hosts (one "
                                  "merge worker each).")
_EST_STORAGE = flags.DEFINE_float("estimate_storage_gb_s", 2.0, "Estimate: storage read "
                                  "throughput of one coordinator host, GB/s.")

FEDERATION = "merge-benchmark"
MB = 1e6
DROP_CACHES = "/proc/sys/vm/drop_caches"


# ------------------------------------------------------------------------- page cache

def drop_page_cache() -> None:
  """Flushes dirty pages (os.sync) and drops the whole machine's clean page cache,
  dentries and inodes (needs root); raises OSError when that is refused."""
  os.sync()
  with open(DROP_CACHES, "w") as f:
    f.write("3")


def cannot_drop_page_cache() -> str | None:
  """None if this process can drop the page cache (it does so once to find out), else
  why not, in a few words."""
  try:
    drop_page_cache()
  except OSError as e:
    return f"writing 3 to {DROP_CACHES} failed ({e.strerror or e}; needs root on Linux)"
  return None


def prepare_cache(cache: str) -> None:
  """Just before a timed measurement: flush writeback (so that it does not overlap the
  measurement) and, for "cold", drop the page cache."""
  if cache == "cold":
    drop_page_cache()
  else:
    os.sync()


# ------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
  """A `Vm*` field of /proc/self/status in KiB (0 where /proc is not available)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _reset_peak_rss() -> bool:
  """Resets this process's VmHWM to its current RSS (Linux >= 4.0); False if refused."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _cpu_s() -> float:
  """User + system CPU seconds of this process so far (all threads)."""
  t = os.times()
  return t.user + t.system


def _usage() -> dict[str, float]:
  """This process's system CPU seconds and minor page faults so far, and the machine's
  CPU stall time (/proc/pressure/cpu "some": time any task waited for a CPU), seconds."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  out = {"sys_s": r.ru_stime, "minor_faults": r.ru_minflt, "cpu_stall_s": 0.0}
  try:
    with open("/proc/pressure/cpu") as f:
      out["cpu_stall_s"] = int(f.readline().rsplit("total=", 1)[1]) / 1e6
  except (OSError, IndexError, ValueError):
    pass
  return out


# ------------------------------------------------------------------------- the merge child

def _tx(name: str):
  cfg = outer_config.default_outer_config()
  cfg.name = name
  return outer_config.make_outer_optimizer(cfg)


def _warm_up_jit(tx, manifest: dict, inputs, weights, max_block_bytes: int) -> None:
  """Compiles merge_block for every block shape merge_round will use, on one zero
  buffer aliased by every input (so that the warm-up adds little to the RSS)."""
  import jax  # pylint: disable=import-outside-toplevel
  arrays = manifest["arrays"]
  shapes = set()
  for key in sorted(k for k in arrays if k.startswith("params/")):
    name = key[len("params/"):]
    leaves = sorted(k[len(f"outer/{name}/"):] for k in arrays if k.startswith(f"outer/{name}/"))
    recs = [arrays[key], *(m["arrays"][name] for _, _, m in inputs),
            *(arrays[f"outer/{name}/{l}"] for l in leaves
              if arrays[f"outer/{name}/{l}"]["shape"] == arrays[key]["shape"])]
    shapes |= {tuple(s.stop - s.start for s in idx)
               for idx in exchange.common_blocks(recs, max_block_bytes)[1]}
  for shape in sorted(shapes):
    g = jax.device_put(np.zeros(shape, np.float32))
    jax.block_until_ready(outer_lib.merge_block(tx, g, tx.init(g), [g] * len(inputs), weights,
                                                with_finite=True))
    del g


def run_child(spec_path: str) -> None:
  """The merge as the coordinator runs it, measured alone; prints one JSON line."""
  with open(spec_path) as f:
    spec = json.load(f)
  rss_imports = _status_kib("VmRSS")
  tx = _tx(spec["outer"])
  glob = Bucket(spec["global_url"])
  base = exchange.read_manifest(glob, spec["base_prefix"])
  inputs = []
  for url in spec["site_urls"]:
    bucket = Bucket(url)
    prefix = spec["update_prefix"]
    inputs.append((bucket, prefix, exchange.read_manifest(bucket, prefix)))
  weights = np.asarray(spec["weights"], np.float32)
  t0 = time.perf_counter()
  _warm_up_jit(tx, base, inputs, weights, spec["max_block_bytes"])
  warmup_s = time.perf_counter() - t0
  rss_ready = _status_kib("VmRSS")
  reset = _reset_peak_rss()
  prepare_cache(spec["cache"])
  cpu0, t0 = _cpu_s(), time.perf_counter()
  attempt = exchange.new_attempt()
  records = merge_lib.merge_round(outer_config.RoundMergeSpec(tx), glob, spec["base_prefix"],
                                  base, inputs, weights, glob,
                                  exchange.data_prefix(spec["out_prefix"], attempt),
                                  max_block_bytes=spec["max_block_bytes"],
                                  read_ahead=spec["read_ahead"])
  exchange.write_manifest(glob, spec["out_prefix"], exchange.make_manifest(
      federation=FEDERATION, kind="global", round=spec["out_round"], author="global",
      attempt=attempt, base_round=0, tokens=0, arrays=records))
  merge_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
  print(json.dumps({
      "cache": spec["cache"], "merge_s": merge_s, "cpu_s": cpu_s, "warmup_s": warmup_s,
      "rss_after_imports_mib": rss_imports / 1024, "rss_before_merge_mib": rss_ready / 1024,
      # VmHWM after the reset: the peak of the merge itself (jit warm-up excluded).
      "peak_rss_merge_mib": _status_kib("VmHWM") / 1024 if reset else None,
      # ru_maxrss: the peak of the whole child process, warm-up included.
      "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "bytes_read": glob.bytes_read + sum(b.bytes_read for b, _, _ in inputs),
      "bytes_written": glob.bytes_written,
  }))


def run_worker(spec_path: str, worker_id: int) -> None:
  """One of M merge workers (`merge_workers.Workers`, as a coordinator of M processes
  merges): plans, compiles, waits for the leader's start, merges its `split_work` range;
  the leader combines the records and commits. Prints this process's measurements."""
  with open(spec_path) as f:
    spec = json.load(f)
  from tapestry_jax import distributed  # pylint: disable=import-outside-toplevel
  from tapestry_jax import merge_workers  # pylint: disable=import-outside-toplevel
  m = spec["num_workers"]
  group = distributed.initialize(spec["address"], m, worker_id)
  rss_imports = _status_kib("VmRSS")
  tx = _tx(spec["outer"])
  glob = Bucket(spec["global_url"])
  base = exchange.read_manifest(glob, spec["base_prefix"])
  inputs = []
  for url in spec["site_urls"]:
    bucket = Bucket(url)
    inputs.append((bucket, spec["update_prefix"],
                   exchange.read_manifest(bucket, spec["update_prefix"])))
  weights = np.asarray(spec["weights"], np.float32)
  plan = merge_lib.plan_round(outer_config.RoundMergeSpec(tx), glob, spec["base_prefix"], base,
                              inputs, weights, max_block_bytes=spec["max_block_bytes"])
  work = merge_lib.split_work(plan, m)[worker_id]
  t0 = time.perf_counter()
  _warm_up_jit(tx, base, inputs, weights, spec["max_block_bytes"])
  warmup_s = time.perf_counter() - t0
  # This process's own range, timed apart from the wait for the others' results.
  merge_work, own = merge_lib.merge_work, {}

  def timed_merge_work(*args, **kwargs):
    t = time.perf_counter()
    out = merge_work(*args, **kwargs)
    own["range_s"] = time.perf_counter() - t
    return out

  merge_lib.merge_work = timed_merge_work
  stages = _profile_stages() if spec["profile"] else {}
  workers = merge_workers.Workers(group)
  channel = distributed.Channel("benchmark") if m > 1 else None
  attempt = exchange.new_attempt()  # The leader's names the round's directory.
  if channel is not None:
    if group.primary:
      channel.put("attempt", attempt)
    attempt = channel.get("attempt", 600)
  rss_ready = _status_kib("VmRSS")
  reset = _reset_peak_rss()
  if channel is not None:
    channel.put(f"ready/{worker_id}", True)
  if group.primary:  # Every worker is compiled and waiting: flush (and drop) the cache, go.
    for w in range(m if channel is not None else 0):
      channel.get(f"ready/{w}", 600)
    prepare_cache(spec["cache"])
    if channel is not None:
      channel.put("go", True)
  else:
    channel.get("go", 600)
  cpu0, use0, t0 = _cpu_s(), _usage(), time.perf_counter()
  records = workers.merge("round", plan, glob, exchange.data_prefix(spec["out_prefix"], attempt),
                          read_ahead=spec["read_ahead"])
  if group.primary:
    exchange.write_manifest(glob, spec["out_prefix"], exchange.make_manifest(
        federation=FEDERATION, kind="global", round=spec["out_round"], author="global",
        attempt=attempt, base_round=0, tokens=0, arrays=records))
  merge_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
  use = {k: v - use0[k] for k, v in _usage().items()}
  print(json.dumps({
      "worker": worker_id, "sys_s": use["sys_s"], "minor_faults": use["minor_faults"],
      # The share of the merge's time in which some task on the machine waited for a CPU.
      "cpu_stall_share": use["cpu_stall_s"] / merge_s, "workers": m, "cache": spec["cache"],
      "merge_s": merge_s,
      "cpu_s": cpu_s, "range_s": own.get("range_s", 0.0), "work_items": len(work),
      "range_bytes": sum(plan.work_bytes(k) for k in work), "warmup_s": warmup_s,
      "rss_after_imports_mib": rss_imports / 1024, "rss_before_merge_mib": rss_ready / 1024,
      "peak_rss_merge_mib": _status_kib("VmHWM") / 1024 if reset else None,
      "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "bytes_read": glob.bytes_read + sum(b.bytes_read for b, _, _ in inputs),
      "bytes_written": glob.bytes_written, "stages_s": stages,
  }), flush=True)
  distributed.shutdown()


def _profile_stages() -> dict[str, float]:
  """Wraps the merge's stages in this process with timers; returns their running totals
  in seconds, summed over threads (reads and digests run on many)."""
  import threading  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from tapestry_jax.exchange import blocks  # pylint: disable=import-outside-toplevel
  totals = {"read_verify": 0.0, "digest": 0.0, "merge_block": 0.0, "wait_writes": 0.0}
  lock = threading.Lock()

  def timed(stage, fn, sync=False):
    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      out = fn(*args, **kwargs)
      if sync:
        jax.block_until_ready(out)
      with lock:
        totals[stage] += time.perf_counter() - t
      return out
    return wrapper

  # Reads, digest checks and finiteness scans of one input block, on the merge's pool.
  # pylint: disable-next=protected-access
  merge_lib._read_checked = timed("read_verify", merge_lib._read_checked)
  # Every chunk's BLAKE3, of reads (inside read_verify) and of writes.
  blocks.chunk_digest = timed("digest", blocks.chunk_digest)
  outer_lib.merge_block = timed("merge_block", outer_lib.merge_block, sync=True)
  exchange.BlockWriter.wait = timed("wait_writes", exchange.BlockWriter.wait)
  exchange.BlockWriter.wait_all = timed("wait_writes", exchange.BlockWriter.wait_all)
  return totals


# ------------------------------------------------------------------------- data

def _names(n: int) -> list[str]:
  return [f"layer_{i:02d}/kernel" for i in range(n)]


def _write_round(bucket: Bucket, prefix: str, arrays_fn, names: list[str], **manifest_kw) -> dict:
  """Writes the arrays one at a time (`arrays_fn(name)` -> {key: array}) and commits."""
  records = {}
  attempt = exchange.new_attempt()
  for name in names:
    records.update(exchange.write_arrays(bucket, exchange.data_prefix(prefix, attempt),
                                         arrays_fn(name)))
  manifest = exchange.make_manifest(federation=FEDERATION, arrays=records, attempt=attempt,
                                    **manifest_kw)
  exchange.write_manifest(bucket, prefix, manifest)
  return manifest


def write_inputs(workdir: str, tx, K: int, names: list[str], shape: tuple[int, int]):
  """The previous global round and K site updates; returns (global bucket, site buckets)."""
  glob = Bucket(f"file://{workdir}/global")
  rng = np.random.default_rng(0)

  def global_arrays(name):
    p = rng.standard_normal(shape, dtype=np.float32)
    out = {f"params/{name}": p}
    for leaf, v in outer_lib.state_leaves(tx.init(np.zeros((1,) * len(shape), np.float32))).items():
      # Parameter-shaped leaves get positive random values (Adam's nu must be >= 0);
      # scalars (Adam's count) keep their initial value.
      out[f"outer/{name}/{leaf}"] = (np.abs(rng.standard_normal(shape, dtype=np.float32)) * 0.01
                                     if np.ndim(v) else np.asarray(v))
    return out

  _write_round(glob, exchange.global_prefix(0), global_arrays, names, kind="global", round=0,
               author="global", base_round=None, tokens=0)
  exchange.write_latest(glob, 0)
  sites = []
  for k in range(K):
    bucket = Bucket(f"file://{workdir}/site_{k}")
    srng = np.random.default_rng(1 + k)
    _write_round(bucket, exchange.update_prefix(1),
                 lambda name, r=srng: {name: r.standard_normal(shape, dtype=np.float32) * 0.01},
                 names, kind="update", round=1, author=f"site_{k}", base_round=0,
                 tokens=1000 * (k + 1))
    sites.append(bucket)
  return glob, sites


def input_arrays(glob: Bucket, sites: list[Bucket]) -> list[tuple[Bucket, str, str, dict]]:
  """(bucket, prefix, name, record) of every array the merge reads."""
  out = []
  for bucket, prefix in [(glob, exchange.global_prefix(0))] + [
      (b, exchange.update_prefix(1)) for b in sites]:
    manifest = exchange.read_manifest(bucket, prefix)
    for name, rec in sorted(manifest["arrays"].items()):
      out.append((bucket, exchange.data_prefix(prefix, manifest), name, rec))
  return out


# ------------------------------------------------------------------------- baseline

def _spec(bucket: Bucket, prefix: str, name: str) -> dict:
  return {"driver": "zarr3", "kvstore": bucket.array_spec(f"{prefix}/arrays/{name}")}


def raw_read(arrays, max_block_bytes: int | None, window: int) -> tuple[float, float, int]:
  """(seconds, CPU seconds, bytes) to read every array through TensorStore without
  checks: block by block (merge_round's blocks for one array, `iter_blocks`) or, with
  `max_block_bytes` None, whole; `window` reads in flight."""
  cpu0, t0 = _cpu_s(), time.perf_counter()
  opens = [ts.open(_spec(b, p, n), open=True, read=True, context=b.context)
           for b, p, n, _ in arrays]
  inflight, nbytes = [], 0
  for fut, (_, _, _, rec) in zip(opens, arrays):
    store = fut.result()
    blocks = [()] if max_block_bytes is None else exchange.iter_blocks(rec, max_block_bytes)
    for idx in blocks:
      inflight.append(store[idx].read() if idx else store.read())
      if len(inflight) >= window:
        nbytes += inflight.pop(0).result().nbytes
  for fut in inflight:
    nbytes += fut.result().nbytes
  return time.perf_counter() - t0, _cpu_s() - cpu0, nbytes


def verified_read(arrays, max_block_bytes: int) -> tuple[float, float, int]:
  """Like `raw_read` by blocks, through exchange.read_block (every chunk's digest
  checked), on os.cpu_count() threads."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  cpu0, t0 = _cpu_s(), time.perf_counter()
  workers = os.cpu_count() or 1
  nbytes, inflight = 0, []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for b, p, n, rec in arrays:
      store = exchange.open_array(b, p, n, rec)
      for idx in exchange.iter_blocks(rec, max_block_bytes):
        inflight.append(pool.submit(exchange.read_block, b, p, n, rec, idx, store=store))
        if len(inflight) >= 2 * workers:
          nbytes += inflight.pop(0).result().nbytes
    for fut in inflight:
      nbytes += fut.result().nbytes
  return time.perf_counter() - t0, _cpu_s() - cpu0, nbytes


def hash_mb_s() -> float:
  """Chunk-digest (BLAKE3) throughput of one core (MB per CPU second), 16 MiB buffers."""
  data = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)
  cpu0, n = _cpu_s(), 0
  while _cpu_s() - cpu0 < 1.0:
    exchange.chunk_digest(data)  # pylint: disable=protected-access
    n += data.nbytes
  return n / (_cpu_s() - cpu0) / MB


def run_merge(spec: dict, workdir: str) -> dict:
  path = os.path.join(workdir, f"merge_spec_{spec['out_round']}.json")
  with open(path, "w") as f:
    json.dump(spec, f)
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.merge_throughput",
                         f"--merge_child={path}"], capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"the merge child failed (status {proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def run_merge_workers(spec: dict, workdir: str, m: int, timeout_s: float = 3600) -> list[dict]:
  """The merge with `m` worker processes on this machine (jax.distributed on CPU);
  every worker's measurements, the leader's first."""
  spec = dict(spec, num_workers=m, address=f"127.0.0.1:{_free_port()}")
  path = os.path.join(workdir, f"merge_spec_{spec['out_round']}.json")
  with open(path, "w") as f:
    json.dump(spec, f)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  logs = [os.path.join(workdir, f"worker_{spec['out_round']}_{w}") for w in range(m)]
  procs = []
  for w in range(m):
    with open(logs[w] + ".out", "w") as out, open(logs[w] + ".err", "w") as err:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "experiments.benchmarks.merge_throughput",
           f"--merge_child={path}", f"--worker_id={w}"], stdout=out, stderr=err, env=env))
  deadline = time.monotonic() + timeout_s
  try:
    codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for w, code in enumerate(codes):
    with open(logs[w] + ".out") as out, open(logs[w] + ".err") as err:
      stdout, stderr = out.read(), err.read()
    if code != 0:
      raise RuntimeError(f"merge worker {w} of {m} failed (status {code}):\n{stderr[-4000:]}")
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  return results


# ------------------------------------------------------------------------- check

def check_blocks(tx, glob: Bucket, sites: list[Bucket], weights, out_prefix: str,
                 max_block_bytes: int, n_blocks: int) -> int:
  """Compares `n_blocks` merged blocks (spread over the arrays) with outer.merge_block on
  the same inputs; returns how many were checked, raises AssertionError on a mismatch."""
  base = exchange.read_manifest(glob, exchange.global_prefix(0))
  out = exchange.read_manifest(glob, out_prefix)
  updates = [exchange.read_manifest(b, exchange.update_prefix(1)) for b in sites]
  base_data = exchange.data_prefix(exchange.global_prefix(0), base)
  out_data = exchange.data_prefix(out_prefix, out)
  arrays = base["arrays"]
  names = sorted(k[len("params/"):] for k in arrays if k.startswith("params/"))
  picks = []
  for i in range(n_blocks):
    name = names[(i * (len(names) - 1)) // max(1, n_blocks - 1)]
    prec = arrays[f"params/{name}"]
    leaves = sorted(k[len(f"outer/{name}/"):] for k in arrays if k.startswith(f"outer/{name}/"))
    _, blocks = exchange.common_blocks(
        [prec, *(u["arrays"][name] for u in updates),
         *(arrays[f"outer/{name}/{l}"] for l in leaves
           if arrays[f"outer/{name}/{l}"]["shape"] == prec["shape"])], max_block_bytes)
    picks.append((name, leaves, blocks[(i * (len(blocks) - 1)) // max(1, n_blocks - 1)]))
  for name, leaves, idx in picks:
    g = exchange.read_block(glob, base_data, f"params/{name}",
                            arrays[f"params/{name}"], idx)
    blockable = outer_lib.blockable_leaves(tx, g)
    state_leaves = {}
    for leaf in leaves:
      key = f"outer/{name}/{leaf}"
      index = idx if blockable[leaf] else tuple(slice(0, s) for s in arrays[key]["shape"])
      state_leaves[leaf] = exchange.read_block(glob, base_data, key,
                                               arrays[key], index)
    deltas = [exchange.read_block(b, exchange.data_prefix(exchange.update_prefix(1), u), name,
                                  u["arrays"][name], idx)
              for b, u in zip(sites, updates)]
    want_g, want_state = outer_lib.merge_block(
        tx, g, outer_lib.state_from_leaves(tx, g, state_leaves), deltas, weights)
    got = exchange.read_block(glob, out_data, f"params/{name}", out["arrays"][f"params/{name}"],
                              idx)
    assert np.array_equal(got, np.asarray(want_g)), f"params/{name}{idx} differs from merge_block"
    for leaf, want in outer_lib.state_leaves(want_state).items():
      key = f"outer/{name}/{leaf}"
      index = idx if blockable[leaf] else tuple(slice(0, s) for s in out["arrays"][key]["shape"])
      got = exchange.read_block(glob, out_data, key, out["arrays"][key], index)
      assert np.array_equal(got, np.asarray(want)), f"{key}{idx} differs from merge_block"
  return len(picks)


# ------------------------------------------------------------------------- main

def summarize(runs: dict, merges: list[dict], input_bytes: int) -> dict:
  """The results of one cache state: best runs, baseline, ratios, peak RSS."""
  best = {label: min(r) for label, r in runs.items()}  # (seconds, cpu) of the fastest run
  merge_best = min(merges, key=lambda m: m["merge_s"])
  merge_mbs = input_bytes / merge_best["merge_s"] / MB
  raw_label = min((l for l in best if l.startswith("raw")), key=lambda l: best[l][0])
  raw_mbs = input_bytes / best[raw_label][0] / MB
  return {
      "runs_s_cpu_s": {**runs, "merge": [(m["merge_s"], m["cpu_s"]) for m in merges]},
      "best_s_cpu_s": {**best, "merge": (merge_best["merge_s"], merge_best["cpu_s"])},
      "mb_s": {**{l: input_bytes / b[0] / MB for l, b in best.items()}, "merge": merge_mbs},
      "baseline": raw_label, "raw_read_mb_s": raw_mbs, "merge_mb_s": merge_mbs,
      "ratio_merge_vs_raw": merge_mbs / raw_mbs, "target_ratio": 0.5,
      "ratio_merge_vs": {l: merge_mbs / (input_bytes / b[0] / MB) for l, b in best.items()},
      "peak_rss_merge_mib": max(m["peak_rss_merge_mib"] or m["peak_rss_process_mib"]
                                for m in merges),
      "peak_rss_process_mib": max(m["peak_rss_process_mib"] for m in merges),
      "rss_before_merge_mib": merge_best["rss_before_merge_mib"],
      "rss_after_imports_mib": merge_best["rss_after_imports_mib"],
      "jit_warmup_s": merge_best["warmup_s"],
      "merge_bytes_read": merge_best["bytes_read"], "output_bytes": merge_best["bytes_written"],
  }


CACHE_TITLES = {
    "warm": "WARM page cache (inputs cached; CPU-bound)",
    "cold": "COLD page cache (os.sync + drop_caches before each run; storage throughput, "
            "what a coordinator reading fresh updates sees)",
}


def summarize_workers(merges: dict[int, list[list[dict]]], input_bytes: int) -> dict:
  """Per worker count M (each run: every worker's measurements, the leader's first): the
  fastest run's time, rate and CPU, each worker's own range, every worker's peak RSS."""
  out = {}
  one = None
  for m in sorted(merges):
    best = min(merges[m], key=lambda run: run[0]["merge_s"])
    mb_s = input_bytes / best[0]["merge_s"] / MB
    one = one or (m, mb_s)
    out[m] = {
        "merge_s": best[0]["merge_s"], "cpu_s": sum(w["cpu_s"] for w in best),
        "mb_s": mb_s, "per_worker_mb_s": mb_s / m, f"speedup_vs_m{one[0]}": mb_s / one[1],
        "runs_s_cpu_s": [(run[0]["merge_s"], sum(w["cpu_s"] for w in run))
                         for run in merges[m]],
        "median_s": sorted(run[0]["merge_s"] for run in merges[m])[len(merges[m]) // 2],
        # Per run: the leader's CPU stall share, all workers' system CPU s and page faults.
        "runs_cpu_stall_share": [run[0]["cpu_stall_share"] for run in merges[m]],
        "runs_sys_s": [sum(w["sys_s"] for w in run) for run in merges[m]],
        "runs_minor_faults": [sum(w["minor_faults"] for w in run) for run in merges[m]],
        # Each worker's own range in the fastest run: seconds, bytes read, MB/s.
        "range_s": [w["range_s"] for w in best],
        "range_mb_s": [w["range_bytes"] / w["range_s"] / MB if w["range_s"] else 0.0
                       for w in best],
        "work_items": [w["work_items"] for w in best],
        "worker_cpu_s": [w["cpu_s"] for w in best],
        # The largest over all runs, per worker (jit warm-up excluded).
        "peak_rss_merge_mib": [max(run[w]["peak_rss_merge_mib"] or run[w]["peak_rss_process_mib"]
                                   for run in merges[m]) for w in range(m)],
        "peak_rss_process_mib": [max(run[w]["peak_rss_process_mib"] for run in merges[m])
                                 for w in range(m)],
        "jit_warmup_s": max(w["warmup_s"] for w in best),
        "bytes_read": sum(w["bytes_read"] for w in best),
        "bytes_written": sum(w["bytes_written"] for w in best),
        "stages_s": [w["stages_s"] for w in best],
    }
  return out


def print_workers(cache: str, r: dict) -> None:
  ms = sorted(r)
  ref = ms[0]
  print(f"-- {cache}: merge by M worker processes (merge_workers.Workers, jax.distributed); "
        f"from the leader's start to its combined records and manifest")
  print(f"{'M':>3}{'seconds':>9}{'CPU s':>8}{'MB/s':>8}{f'x M={ref}':>8}  per worker: own "
        f"range s / MB/s, CPU s, peak RSS MiB")
  for m in ms:
    w = r[m]
    per = "; ".join(f"{s:.2f} / {mbs:.0f}, {c:.2f}, {rss:.0f}" for s, mbs, c, rss in zip(
        w["range_s"], w["range_mb_s"], w["worker_cpu_s"], w["peak_rss_merge_mib"]))
    print(f"{m:3d}{w['merge_s']:9.2f}{w['cpu_s']:8.2f}{w['mb_s']:8.0f}"
          f"{w[f'speedup_vs_m{ref}']:8.2f}  {per}")
  if ref == 1 and 2 in r:
    x = r[2]["speedup_vs_m1"]
    print(f"{cache} speedup, M=2 / M=1: {r[2]['mb_s']:.0f} / {r[1]['mb_s']:.0f} MB/s = {x:.2f} "
          f"(target >= 1.60: {'met' if x >= 1.6 else 'NOT met'})")
  peak_one = max(r[ref]["peak_rss_merge_mib"])
  print(f"{cache} peak RSS per worker: " + ", ".join(
      f"M={m} {max(r[m]['peak_rss_merge_mib']):.0f} MiB" for m in ms)
        + f" (the largest worker's / M={ref}'s: "
        + ", ".join(f"{max(r[m]['peak_rss_merge_mib']) / peak_one:.2f}" for m in ms) + ")")
  for m in ms:
    for w, st in enumerate(r[m]["stages_s"]):
      if st:
        rest = r[m]["range_s"][w] - st["merge_block"] - st["wait_writes"]
        print(f"{cache} M={m} worker {w}: own range {r[m]['range_s'][w]:.2f} s = merge_block "
              f"{st['merge_block']:.2f} + waiting for writes {st['wait_writes']:.2f} + the "
              f"rest {rest:.2f} (mostly waiting for reads); on the read threads, read + verify "
              f"{st['read_verify']:.2f} s; chunk digests (reads and writes) {st['digest']:.2f} s")
  print(f"{cache} runs (s, CPU s of all workers, of it system; minor page faults; share of "
        f"the time some task on the machine waited for a CPU):")
  for m in ms:
    w = r[m]
    print(f"  M={m}: median {w['median_s']:.2f} s; " + "; ".join(
        f"{a:.2f} s, {b:.2f} CPU s ({sy:.2f} sys), {f / 1e3:.0f}k faults, stall {st:.0%}"
        for (a, b), sy, f, st in zip(w["runs_s_cpu_s"], w["runs_sys_s"],
                                     w["runs_minor_faults"], w["runs_cpu_stall_share"])))


def scaling_estimate(worker_mb_s: float, outer_leaves: int) -> dict:
  """One round of a big model merged by one worker per coordinator host, from a measured
  per-worker merge rate (the --estimate_* flags)."""
  param_bytes = _EST_PARAMS.value * 4  # float32
  round_bytes = (_EST_SITES.value + 1 + outer_leaves) * param_bytes
  rate = min(_EST_STORAGE.value * 1e9, worker_mb_s * MB)
  return {"params": _EST_PARAMS.value, "sites": _EST_SITES.value, "hosts": _EST_HOSTS.value,
          "storage_gb_s_per_host": _EST_STORAGE.value, "outer_state_leaves": outer_leaves,
          "round_bytes": round_bytes, "worker_mb_s": worker_mb_s, "rate_mb_s": rate / MB,
          "limited_by": "storage" if rate < worker_mb_s * MB else "the per-worker merge rate",
          "seconds": round_bytes / rate / _EST_HOSTS.value}


def print_table(cache: str, r: dict, merge_label: str = "merge_round (child process)") -> None:
  print(f"-- {CACHE_TITLES[cache]}")
  print(f"{'':36}{'seconds':>9}{'CPU s':>8}{'MB/s':>8}{'merge/this':>12}")
  for label, (seconds, cpu_s) in r["best_s_cpu_s"].items():
    if label == "merge":
      continue
    mbs = r["mb_s"][label]
    print(f"{label + (' (baseline)' if label == r['baseline'] else ''):36}{seconds:9.2f}"
          f"{cpu_s:8.2f}{mbs:8.0f}{r['merge_mb_s'] / mbs:12.2f}")
  seconds, cpu_s = r["best_s_cpu_s"]["merge"]
  print(f"{merge_label:36}{seconds:9.2f}{cpu_s:8.2f}{r['merge_mb_s']:8.0f}")
  ratio = r["ratio_merge_vs_raw"]
  print(f"{cache} ratio, merge / {r['baseline']} read: {r['merge_mb_s']:.0f} / "
        f"{r['raw_read_mb_s']:.0f} MB/s = {ratio:.2f} (target >= 0.50: "
        f"{'met' if ratio >= 0.5 else 'NOT met'}); peak RSS of the merge "
        f"{r['peak_rss_merge_mib']:.0f} MiB")
  print(f"{cache} runs (s, CPU s): " + "; ".join(
      f"{l} {[(round(a, 2), round(b, 2)) for a, b in v]}" for l, v in r["runs_s_cpu_s"].items()))


def main(argv):
  del argv
  if _CHILD.value:
    if _WORKER_ID.value >= 0:
      run_worker(_CHILD.value, _WORKER_ID.value)
    else:
      run_child(_CHILD.value)
    return
  try:
    workers = sorted({int(m) for m in _WORKERS.value})
  except ValueError:
    raise app.UsageError(f"--workers: worker counts, e.g. 1,2; got {_WORKERS.value}") from None
  if any(m < 1 for m in workers):
    raise app.UsageError(f"--workers: counts must be >= 1, got {workers}")
  K, n_arrays, cols = _SITES.value, _NUM_ARRAYS.value, _COLS.value
  rows = (_UPDATE_MIB.value << 20) // (n_arrays * cols * 4)
  if K < 1 or rows < 1:
    raise app.UsageError(f"need --sites >= 1 and --update_mib large enough for {n_arrays} "
                         f"arrays of [rows, {cols}] float32")
  caches = ["warm", "cold"] if _CACHE.value == "both" else [_CACHE.value]
  cache_note = None
  if "cold" in caches:
    why = cannot_drop_page_cache()
    if why and _CACHE.value == "cold":
      sys.exit(f"merge_throughput: --cache=cold cannot drop the page cache: {why}")
    if why:
      cache_note = f"cold cache not measured, warm only: {why}"
      print(f"note: {cache_note}")
      caches = ["warm"]
  shape = (rows, cols)
  max_block_bytes = max(1, int(_MAX_BLOCK_MIB.value * 2**20))
  window = _READ_WINDOW.value
  tx = _tx(_OUTER.value)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="merge_throughput_", dir="/tmp")
  os.makedirs(workdir, exist_ok=True)
  load0 = os.getloadavg()
  merges: dict[str, list[dict]] = {c: [] for c in caches}
  # With --workers: per cache state and M, every run's measurements of every worker.
  worker_merges: dict[str, dict[int, list[list[dict]]]] = {c: {m: [] for m in workers}
                                                          for c in caches}
  out_records = []  # (what merged it, its array records), every merged round in order.
  try:
    t0 = time.perf_counter()
    glob, sites = write_inputs(workdir, tx, K, _names(n_arrays), shape)
    write_s = time.perf_counter() - t0
    os.sync()  # Flush the inputs now, so that writeback does not overlap the timed reads.
    arrays = input_arrays(glob, sites)
    input_bytes = sum(math.prod(r["shape"]) * np.dtype(r["dtype"]).itemsize
                      for _, _, _, r in arrays)
    weights = outer_lib.cap_weights([1000 * (k + 1) for k in range(K)], None)
    # The merge reads one block of each parameter-shaped input at once: K updates, the
    # global params and the parameter-shaped outer-state leaves.
    merge_window = sum(tuple(r["shape"]) == shape for _, _, _, r in arrays) // n_arrays
    variants = {f"raw, blocks, {w} in flight": (max_block_bytes, w)
                for w in sorted({window, merge_window})}
    variants["raw, arrays"] = (None, window)
    runs = {c: {**{l: [] for l in variants}, "verified": []} for c in caches}

    for repeat in range(_REPEATS.value):
      for cache in caches:
        if cache == "warm":
          raw_read(arrays, max_block_bytes, window)  # Warm the page cache (untimed).
        for label in runs[cache]:
          prepare_cache(cache)
          seconds, cpu_s, nbytes = (verified_read(arrays, max_block_bytes) if label == "verified"
                                    else raw_read(arrays, *variants[label]))
          if nbytes != input_bytes:
            raise RuntimeError(f"{label} read {nbytes} bytes, expected {input_bytes}")
          runs[cache][label].append((seconds, cpu_s))
        # Alternate the order of the worker counts, so that a drift in the machine's
        # load does not favour one of them.
        for m in (workers[::-1] if repeat % 2 else workers) or [0]:
          out_round = 1 + len(out_records)
          spec = {
              "outer": _OUTER.value, "global_url": glob.url,
              "base_prefix": exchange.global_prefix(0), "site_urls": [b.url for b in sites],
              "update_prefix": exchange.update_prefix(1),
              "weights": [float(w) for w in weights],
              "out_prefix": exchange.global_prefix(out_round), "out_round": out_round,
              "max_block_bytes": max_block_bytes, "read_ahead": _READ_AHEAD.value,
              "cache": cache, "profile": _PROFILE.value}
          if m:
            worker_merges[cache][m].append(run_merge_workers(spec, workdir, m))
          else:
            merges[cache].append(run_merge(spec, workdir))
          out_records.append((f"{cache}, M={m}" if m else cache, exchange.read_manifest(
              glob, exchange.global_prefix(out_round))["arrays"]))
    checked = check_blocks(tx, glob, sites, weights, exchange.global_prefix(1), max_block_bytes,
                           _CHECK_BLOCKS.value)
    for r, (how, records) in enumerate(out_records[1:], start=2):
      if records != out_records[0][1]:
        raise AssertionError(f"merged round {r} ({how}) differs from round 1 "
                             f"({out_records[0][0]}) in its array records")
  finally:
    if not _KEEP.value:
      shutil.rmtree(workdir, ignore_errors=True)
  load1 = os.getloadavg()
  sha_mb_s = hash_mb_s()

  if workers:  # The baseline table compares the raw reads with the fewest workers' merge.
    for c in caches:
      merges[c] = [run[0] for run in worker_merges[c][workers[0]]]
  per_cache = {c: summarize(runs[c], merges[c], input_bytes) for c in caches}
  per_workers = {c: summarize_workers(worker_merges[c], input_bytes) for c in caches
                 } if workers else {}
  # One worker per host: the per-worker rate is the fewest workers' rate per worker (the
  # CPU-bound warm one when measured: the estimate accounts for storage separately).
  outer_leaves = merge_window - K - 1
  estimates = {c: scaling_estimate(r[workers[0]]["per_worker_mb_s"], outer_leaves)
               for c, r in per_workers.items()}
  peak = max(r["peak_rss_merge_mib"] for r in per_cache.values())
  first = per_cache[caches[0]]
  result = {
      "sites": K, "update_mib": _UPDATE_MIB.value, "arrays": n_arrays, "array_shape": list(shape),
      "outer": _OUTER.value, "max_block_bytes": max_block_bytes, "read_ahead": _READ_AHEAD.value,
      "read_window": window, "merge_read_window": merge_window, "repeats": _REPEATS.value,
      "cache": caches, "cache_note": cache_note,
      "cache_meaning": {
          "warm": "every input byte read once (untimed) before each repeat's timed runs",
          "cold": "os.sync() and 3 > /proc/sys/vm/drop_caches before each timed run"},
      "input_bytes": input_bytes, "output_bytes": first["output_bytes"],
      "merge_bytes_read": first["merge_bytes_read"], "write_inputs_s": write_s,
      **per_cache,
      "ratio_merge_vs_raw": {c: r["ratio_merge_vs_raw"] for c, r in per_cache.items()},
      "target_ratio": 0.5,
      "peak_rss_merge_mib": peak, "target_peak_rss_mib": 1024,
      "peak_rss_process_mib": max(r["peak_rss_process_mib"] for r in per_cache.values()),
      "hash_mb_per_cpu_s": sha_mb_s,
      "blocks_checked_bit_identical": checked, "merged_rounds_identical": len(out_records),
      "load_average_1m_before_after": [load0[0], load1[0]], "cpus": os.cpu_count(),
      "workers": workers, "per_workers": per_workers, "scaling_estimate": estimates,
  }
  print(f"merge_round: {K} site updates x {_UPDATE_MIB.value} MiB ({n_arrays} arrays "
        f"{list(shape)} float32 each), outer {_OUTER.value}, blocks <= "
        f"{max_block_bytes / 2**20:g} MiB, read_ahead {_READ_AHEAD.value}, "
        f"best of {_REPEATS.value}")
  print(f"bytes merged (updates + global params + outer state): {input_bytes / 2**20:.0f} MiB "
        f"read, {first['output_bytes'] / 2**20:.0f} MiB written; page cache: "
        + ", ".join(caches) + (f" ({cache_note})" if cache_note else ""))
  for cache in caches:
    print_table(cache, per_cache[cache], f"merge, M={workers[0]} worker(s)" if workers
                else "merge_round (child process)")
    if workers:
      print_workers(cache, per_workers[cache])
  print("ratios, merge MB/s / raw read MB/s: " + ", ".join(
      f"{c} {r['ratio_merge_vs_raw']:.2f}" for c, r in per_cache.items())
        + " (target >= 0.50)")
  print(f"peak RSS of the merge: {peak:.0f} MiB (target < 1024: "
        f"{'met' if peak < 1024 else 'NOT met'}); the child held "
        f"{first['rss_before_merge_mib']:.0f} MiB before merging (Python, JAX, TensorStore, "
        f"compiled merge), {result['peak_rss_process_mib']:.0f} MiB at most over its life")
  print(f"chunk digest (BLAKE3): {sha_mb_s:.0f} MB per CPU second on one core")
  print(f"{checked} merged blocks bit-identical to outer.merge_block; all {len(out_records)} "
        f"merged rounds have identical array records (chunk digests)"
        + (f", every M ({', '.join(map(str, workers))}) the same bits as M={workers[0]}"
           if workers else "")
        + f"; load average {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} CPUs")
  for cache, e in estimates.items():
    print(f"estimate from {cache} ({'CPU-bound' if cache == 'warm' else 'this disk'}): "
          f"{e['params'] / 1e9:g}B params, {e['sites']} sites, {e['hosts']} coordinator hosts "
          f"(one merge worker each) at {e['storage_gb_s_per_host']:g} GB/s storage each: "
          f"bytes per round = {e['sites']} sites x {e['params'] * 4 / 1e9:g} GB float32 deltas "
          f"+ global params + {e['outer_state_leaves']} outer-state leaves = "
          f"{e['round_bytes'] / 1e9:.0f} GB; time = bytes / min(per-host storage "
          f"{e['storage_gb_s_per_host'] * 1e3:.0f}, per-worker merge {e['worker_mb_s']:.0f} "
          f"MB/s) / {e['hosts']} hosts = {e['seconds']:.0f} s ({e['seconds'] / 60:.1f} min; "
          f"limited by {e['limited_by']})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
