"""Buckets with `?max_mbps=N`: an emulated WAN link, per direction, shared by one URL."""

import threading
import time

import jax
import numpy as np
import pytest

from tapestry_jax import exchange as ex
from tapestry_jax.buckets import THROTTLE_BURST_BYTES, Bucket, BucketError, kvstore_spec, max_mbps

MBPS = 4.0  # 500,000 bytes/s
RATE = MBPS * 1e6 / 8
N = 250_000  # bytes per transfer: about 0.37 s at RATE after the burst


def _least_s(nbytes: int) -> float:
  """The shortest time `nbytes` may take through a fresh link."""
  return (nbytes - THROTTLE_BURST_BYTES) / RATE


def _timed(fn, *args) -> float:
  t0 = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t0


def _concurrently(*calls) -> float:
  threads = [threading.Thread(target=fn, args=args) for fn, *args in calls]
  t0 = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return time.perf_counter() - t0


def test_the_option_is_parsed_for_every_scheme_and_left_out_of_the_spec(tmp_path):
  for url, plain in [(f"file://{tmp_path}/b?max_mbps=2.5", f"file://{tmp_path}/b"),
                     ("memory://thr-a?max_mbps=2.5", "memory://thr-a"),
                     ("gs://bkt/pfx?max_mbps=2.5", "gs://bkt/pfx"),
                     ("s3://bkt/pfx?endpoint=http://h:1&max_mbps=2.5&region=r",
                      "s3://bkt/pfx?endpoint=http://h:1&region=r")]:
    assert kvstore_spec(url) == kvstore_spec(plain), url
    assert max_mbps(url) == 2.5 and max_mbps(plain) is None
  b = Bucket(f"file://{tmp_path}/b?max_mbps=2.5")
  assert b.url.endswith("?max_mbps=2.5") and b.max_mbps == 2.5  # child processes get it


def test_a_throttled_bucket_moves_bytes_no_faster_than_its_rate(tmp_path):
  data = np.random.default_rng(0).bytes(N)
  fast = Bucket(f"file://{tmp_path}/fast")
  slow = Bucket(f"file://{tmp_path}/slow?max_mbps={MBPS}")
  fast_s = _timed(fast.write, "k", data) + _timed(fast.read, "k")
  write_s, read_s = _timed(slow.write, "k", data), _timed(slow.read, "k")
  assert slow.read("k") == data and slow.bytes_written == N
  assert write_s >= _least_s(N) and read_s >= _least_s(N), (write_s, read_s)
  assert fast_s < _least_s(N) / 2, fast_s
  # A create-only write is counted and paced too.
  assert slow.create("c", data) and _timed(slow.create, "c2", data) >= N / RATE * 0.9


def test_reads_and_writes_are_limited_separately(tmp_path):
  Bucket(f"file://{tmp_path}/b").write("in", b"r" * N)
  b = Bucket(f"file://{tmp_path}/b?max_mbps={MBPS}")
  both_s = _concurrently((b.write, "out", b"w" * N), (b.read, "in"))
  # One shared budget would need (2N - burst) / RATE, about 0.87 s.
  assert _least_s(N) <= both_s < _least_s(2 * N) * 0.85, both_s


def test_buckets_with_one_url_share_their_link(tmp_path):
  url = f"file://{tmp_path}/shared?max_mbps={MBPS}"
  a, b = Bucket(url), Bucket(url)
  shared_s = _concurrently((a.write, "x", b"a" * N), (b.write, "y", b"b" * N))
  assert shared_s >= _least_s(2 * N), shared_s
  c = Bucket(f"file://{tmp_path}/other?max_mbps={MBPS}")  # another link
  apart_s = _concurrently((a.write, "z", b"a" * N), (c.write, "z", b"c" * N))
  assert _least_s(N) <= apart_s < _least_s(2 * N) * 0.85, apart_s


@pytest.mark.parametrize("value, why", [
    ("0", "positive, finite"), ("-3", "positive, finite"), ("nan", "positive, finite"),
    ("inf", "positive, finite"), ("1e999", "positive, finite"), ("fast", "got 'fast'"),
    ("", "got ''"), ("1&max_mbps=2", "given 2 times"),
])
def test_bad_rates_are_refused_in_one_line(tmp_path, value, why):
  for url in (f"file://{tmp_path}/b?max_mbps={value}", f"memory://thr-bad?max_mbps={value}",
              f"s3://bkt/p?endpoint=http://h:1&max_mbps={value}"):
    with pytest.raises(BucketError) as e:
      Bucket(url)
    assert why in str(e.value) and "max_mbps" in str(e.value) and "\n" not in str(e.value)


def test_other_query_items_are_still_refused(tmp_path):
  with pytest.raises(BucketError, match="file URLs take no query but max_mbps"):
    Bucket(f"file://{tmp_path}/b?max_mbps=1&x=2")


def test_exchange_arrays_move_through_a_throttled_bucket(tmp_path):
  arrays = {"w": np.arange(40_000, dtype=np.float32).reshape(200, 200),
            "b": np.linspace(-1, 1, 1000, dtype=np.float32)}
  nbytes = sum(x.nbytes for x in arrays.values())  # 164,000
  b = Bucket(f"file://{tmp_path}/b?max_mbps={MBPS}")
  attempt = ex.new_attempt("t")
  t0 = time.perf_counter()
  records = ex.write_arrays(b, ex.data_prefix(ex.update_prefix(1), attempt), arrays)
  write_s = time.perf_counter() - t0
  manifest = ex.make_manifest(federation="t", kind="update", round=1, author="s",
                              attempt=attempt, arrays=records, base_round=0, tokens=1)
  ex.write_manifest(b, ex.update_prefix(1), manifest)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  t0 = time.perf_counter()
  back = ex.read_arrays(b, ex.update_prefix(1), manifest, {n: one for n in arrays})
  read_s = time.perf_counter() - t0
  for n, x in arrays.items():
    np.testing.assert_array_equal(np.asarray(back[n]), x)
  assert write_s >= _least_s(nbytes) and read_s >= _least_s(nbytes), (write_s, read_s)
  assert b.bytes_read >= nbytes and b.bytes_written >= nbytes
