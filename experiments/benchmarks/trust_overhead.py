"""What signing, hashing and verification add to a round's exchange time.

  python -m experiments.benchmarks.trust_overhead                  # small preset, file:// and S3
  python -m experiments.benchmarks.trust_overhead --stores=s3 --s3_repeats=15

Target (issue 4): signing, hashing and verification add at most 5% to a round's
exchange time for the `small` preset.

One exchange = one party publishes the `small` model's parameters (~77 MiB of float32,
the size of a site update and of a global round's params) and another reads them back
into its own (host) sharding. Measured, alternately, `--repeats` times each:

  trusted   exchange.write_arrays (BLAKE3 of every chunk computed while the chunks are
            written, from the same host bytes) + Ed25519 signing + write_manifest (the
            manifest, then the create-only COMMIT); the reader's read_manifest + signature
            verification + schema check + read_arrays(verify=True) (every chunk's BLAKE3
            checked as it lands).
  baseline  the same zarr3 arrays, chunking and TensorStore writes without any digest, an
            unsigned manifest and COMMIT (two small writes); the reader reads the manifest
            and the arrays with read_arrays(verify=False).

Both move the same array bytes through the same store, in alternating order (ABBA).
Reported per store: the median seconds of each, and the overhead: the median over the
pairs (each trusted exchange and the baseline exchange next to it in time) of
trusted / baseline - 1, with its quartiles. Pairing cancels the machine's drift, which on
a shared 2-core host moves an exchange by more than the overhead being measured. Stores:
file:// (a local directory: the cheapest transfer, so the hardest case for the ratio)
and s3:// (SeaweedFS on loopback, with per-party credentials, the closest thing here to
a remote bucket).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import tensorstore as ts
from absl import app, flags

from experiments.configs import federation as fed_config
from tapestry_jax import buckets
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import trust

_STORES = flags.DEFINE_list("stores", ["file", "s3"], "Stores to measure: file, s3.")
_REPEATS = flags.DEFINE_integer("repeats", 41, "Exchanges per variant on file:// (median).")
_S3_REPEATS = flags.DEFINE_integer("s3_repeats", 9, "Exchanges per variant on S3 (median).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also print every exchange's time.")
_PRESET = flags.DEFINE_string("preset", "small", "Variant of experiments/configs/federation.py.")
_JSON = flags.DEFINE_string("json_out", "", "Also write the results here.")

# pylint: disable=protected-access  (the baseline writes exchange's layout without digests)


def _arrays(config) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {n: rng.standard_normal(shape).astype(dtype)
          for n, (shape, dtype) in federation.param_schema(config).items()}


def _raw_write(bucket: buckets.Bucket, prefix: str, arrays) -> dict:
  """exchange.write_arrays' zarr3 layout and chunking, without digests."""
  opens, records = {}, {}
  for name, a in arrays.items():
    chunk = exchange.choose_chunk_shape(a.shape, a.dtype, None)
    spec = {"driver": "zarr3", "kvstore": bucket.array_spec(exchange.store._array_key(prefix, name)),
            "metadata": dict(exchange.store._zarr_metadata(a.shape, a.dtype.name, chunk),
                             codecs=[{"name": "bytes", "configuration": {"endian": "little"}}])}
    opens[name] = ts.open(spec, create=True, delete_existing=True,
                                   context=bucket.context)
    records[name] = {"shape": list(a.shape), "dtype": a.dtype.name, "chunk_shape": list(chunk)}
  writes = [opens[n].result()[...].write(a) for n, a in arrays.items()]
  for w in writes:
    w.result()
  return records


def _baseline(writer, reader, arrays, shardings, r) -> float:
  prefix = exchange.update_prefix(r)
  attempt = exchange.new_attempt()
  t0 = time.perf_counter()
  records = _raw_write(writer, exchange.data_prefix(prefix, attempt), arrays)
  writer.write(f"{prefix}/{attempt}/manifest.json", json.dumps({"arrays": records}).encode())
  writer.write(f"{prefix}/COMMIT", b"{}")
  json.loads(reader.read(f"{prefix}/{attempt}/manifest.json"))
  reader.read(f"{prefix}/COMMIT")
  # Placeholder digests (the record format needs them; verify=False never reads them).
  unhashed = {n: exchange.store._finish(dict(rec, codec="raw", chunk_digests=["0" * 64] * int(
      np.prod(exchange.store._grid(rec["shape"], rec["chunk_shape"]))))) for n, rec in records.items()}
  out = exchange.read_arrays(reader, prefix, {"arrays": unhashed, "attempt": attempt},
                             shardings, verify=False)
  jax.block_until_ready(out)
  return time.perf_counter() - t0


def _trusted(writer, reader, arrays, shardings, r, signer, root, config, schema) -> float:
  prefix = exchange.update_prefix(r)
  attempt = exchange.new_attempt()
  t0 = time.perf_counter()
  records = exchange.write_arrays(writer, exchange.data_prefix(prefix, attempt), arrays)
  manifest = signer.sign(exchange.make_manifest(
      federation=config.federation.id, kind="update", round=r, author=signer.party,
      attempt=attempt, base_round=r - 1, tokens=1, arrays=records))
  exchange.write_manifest(writer, prefix, manifest)
  got = exchange.read_manifest(reader, prefix)
  root.verify(got, signer.party)
  exchange.check_schema(got, schema)
  out = exchange.read_arrays(reader, prefix, got, shardings, verify=True)
  jax.block_until_ready(out)
  return time.perf_counter() - t0


def _measure(store: str, tmp: str, config, arrays, repeats: int) -> dict:
  keys = os.path.join(tmp, "keys")
  trust.ensure_local_keys(config, keys, federation.party_names(config))
  site = federation.site_names(config)[0]
  signer = trust.Signer.from_file(site, os.path.join(keys, f"{site}.key"))
  root = trust.TrustRoot.from_config(config)
  server = None
  if store == "file":
    writer = reader = buckets.Bucket("file://" + os.path.join(tmp, "file-bucket"))
  else:
    from tapestry_jax import seaweed
    server = seaweed.SeaweedS3(os.path.join(tmp, "s3"), {
        site: {"write": ["site-a"]}, "coordinator": {"read": ["site-a"]}},
        max_volumes=8 + 4 * repeats).start()  # Deletes are not reclaimed at once.
    writer = buckets.Bucket(server.url("site-a", "bench"), max_retries=3,
                            credentials=server.credentials_file(site, os.path.join(tmp, site)))
    reader = buckets.Bucket(server.url("site-a", "bench"), max_retries=3,
                            credentials=server.credentials_file("coordinator",
                                                                os.path.join(tmp, "coord")))
  try:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {n: device for n in arrays}
    schema = {n: (a.shape, a.dtype) for n, a in arrays.items()}
    base, trusted = [], []
    r = 1
    _baseline(writer, reader, arrays, shardings, 1000)  # Warm-up: opens, connections, pages.
    _trusted(writer, reader, arrays, shardings, 1001, signer, root, config, schema)
    for warm in (1000, 1001):
      writer.delete_prefix(exchange.update_prefix(warm) + "/")
    for i in range(repeats):
      # Which variant goes first alternates (ABBA...): on a shared machine the second of
      # two back-to-back exchanges is measurably cheaper or dearer than the first (page
      # reclaim of the deleted previous exchange, cache state), and a fixed order would
      # charge that to one variant.
      if i % 2 == 0:
        base.append(_baseline(writer, reader, arrays, shardings, r))
      trusted.append(_trusted(writer, reader, arrays, shardings, r + 1, signer, root, config,
                              schema))
      if i % 2 == 1:
        base.append(_baseline(writer, reader, arrays, shardings, r))
      for done in (r, r + 1):  # Untimed: keeps the store's footprint to one exchange.
        writer.delete_prefix(exchange.update_prefix(done) + "/")
      r += 2
  finally:
    if server is not None:
      server.stop()
  b, t = statistics.median(base), statistics.median(trusted)
  # Each trusted exchange against the baseline exchange next to it in time: the machine's
  # drift (other load, page reclaim) moves both alike, so the paired ratios spread less
  # than the two medians do.
  paired = sorted(tt / bb - 1 for bb, tt in zip(base, trusted))
  quart = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
  return {"store": store, "baseline_s": b, "trusted_s": t, "overhead": quart[1],
          "overhead_quartiles": [quart[0], quart[2]], "overhead_of_medians": t / b - 1,
          "baseline_all_s": base, "trusted_all_s": trusted}


def main(argv):
  del argv
  config = fed_config.get_config(_PRESET.value)
  arrays = _arrays(config)
  nbytes = sum(a.nbytes for a in arrays.values())
  print(f"preset {_PRESET.value}: {len(arrays)} arrays, {nbytes / 2**20:.1f} MiB per exchange; "
        f"{_REPEATS.value} (file) / {_S3_REPEATS.value} (S3) exchanges per variant, "
        f"alternating; load average "
        f"{os.getloadavg()[0]:.2f}")
  results = []
  for store in _STORES.value:
    tmp = tempfile.mkdtemp(prefix=f"tapestry-trust-{store}-")
    try:
      res = _measure(store, tmp, fed_config.get_config(_PRESET.value), arrays,
                     _S3_REPEATS.value if store == "s3" else _REPEATS.value)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    results.append(res)
    lo, hi = res["overhead_quartiles"]
    print(f"{store:>5}: baseline {res['baseline_s']:.3f} s, signed+hashed+verified "
          f"{res['trusted_s']:.3f} s (medians) -> overhead {100 * res['overhead']:+.1f}% "
          f"(target <= +5%; median of the {len(res['baseline_all_s'])} paired ratios, "
          f"quartiles {100 * lo:+.1f}% .. {100 * hi:+.1f}%; ratio of the medians "
          f"{100 * res['overhead_of_medians']:+.1f}%)")
    if _VERBOSE.value:
      print(f"       all: base {[round(x, 3) for x in res['baseline_all_s']]}, "
            f"trusted {[round(x, 3) for x in res['trusted_all_s']]}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"preset": _PRESET.value, "bytes": nbytes, "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
