"""Buckets: URL forms, keys confined to the bucket, counters, and one-sentence errors."""

import os
import socket
import subprocess
import sys

import pytest

from tapestry_jax.buckets import Bucket, BucketError, kvstore_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_url_forms(tmp_path, monkeypatch):
  assert kvstore_spec(f"file://{tmp_path}/b") == {"driver": "file", "path": f"{tmp_path}/b/"}
  monkeypatch.chdir(tmp_path)
  assert kvstore_spec("rel/dir/") == {"driver": "file", "path": f"{tmp_path}/rel/dir/"}
  assert kvstore_spec("memory://site-fr/x") == {"driver": "memory", "path": "site-fr/x/"}
  assert kvstore_spec("gs://my-bucket/fed/a") == {"driver": "gcs", "bucket": "my-bucket",
                                                  "path": "fed/a/"}
  assert kvstore_spec("gs://my-bucket") == {"driver": "gcs", "bucket": "my-bucket", "path": ""}
  assert kvstore_spec("s3://site-fr/pfx?endpoint=http://127.0.0.1:9000&region=us-east-1") == {
      "driver": "s3", "bucket": "site-fr", "path": "pfx/",
      "endpoint": "http://127.0.0.1:9000", "aws_region": "us-east-1"}


@pytest.mark.parametrize("url, why", [
    ("ftp://host/x", "unknown scheme 'ftp'"),
    ("gs:/bucket/x", "must be followed by '//'"),
    ("gs:///x", "not a valid bucket name"),
    ("s3://b_B/x", "not a valid bucket name"),
    ("s3://bkt/x?endpont=http://h:1", "unknown query parameter 'endpont'"),
    ("s3://bkt/x?endpoint=127.0.0.1:9000", "must look like http://host:port"),
    ("gs://bkt/a/../b", "'..' component"),
    ("file://host/dir", "absolute path"),
    ("file:///", "absolute directory"),
    ("memory://", "needs a name"),
    ("", "empty"),
])
def test_bad_urls_say_what_is_accepted(url, why):
  with pytest.raises(BucketError) as e:
    Bucket(url)
  msg = str(e.value)
  assert why in msg and repr(url) in msg
  assert "file:///abs/dir" in msg and "memory://name" in msg and "s3://bucket/prefix" in msg
  assert "\n" not in msg


@pytest.mark.parametrize("url", ["memory://test-buckets-ops", "file"])
def test_read_write_list_delete(url, tmp_path):
  b = Bucket(str(tmp_path / "b") if url == "file" else url)
  assert b.read("a/x") is None and not b.exists("a/x")
  b.write("a/x", b"12345")
  b.write("a/y", b"")
  b.write("ab", b"z")
  assert b.read("a/x") == b"12345" and b.read("a/y") == b""
  assert b.exists("a/x") and b.exists("a/y")
  assert b.list("a/") == ["a/x", "a/y"]
  assert b.list("a") == ["a/x", "a/y", "ab"]
  assert b.list() == ["a/x", "a/y", "ab"]
  b.delete("a/x")
  b.delete("a/x")  # deleting a missing key is fine
  assert b.read("a/x") is None and b.list("a/") == ["a/y"]
  b.delete_prefix("a/")
  assert b.list() == ["ab"]
  assert b.bytes_written == 6 and b.bytes_read == 5
  b.record_transfer(written=10, read=4)
  assert b.bytes_written == 16 and b.bytes_read == 9
  b.check_writable()
  assert b.list() == ["ab"]  # the probe is gone


def test_memory_buckets_share_by_name():
  Bucket("memory://test-share-a").write("k", b"v")
  assert Bucket("memory://test-share-a").read("k") == b"v"
  assert Bucket("memory://test-share-b").read("k") is None
  assert Bucket("memory://test-share-a/k").list() == []  # a sub-prefix is another namespace


def test_file_bucket_is_a_directory(tmp_path):
  b = Bucket(f"file://{tmp_path}/b")
  b.write("x/y", b"data")
  assert (tmp_path / "b" / "x" / "y").read_bytes() == b"data"
  assert b.array_spec("r/arrays/w") == {"driver": "file", "path": f"{tmp_path}/b/r/arrays/w/"}


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "", "a/",
                                 "a\\b"])
def test_keys_stay_inside_the_bucket(key):
  b = Bucket("memory://test-keys")
  for op in (lambda: b.read(key), lambda: b.write(key, b"x"), lambda: b.exists(key),
             lambda: b.delete(key), lambda: b.array_spec(key)):
    with pytest.raises(BucketError, match="key"):
      op()
  with pytest.raises(BucketError, match="prefix"):
    b.list("../")
  with pytest.raises(BucketError):
    b.delete_prefix("")


def test_bucket_under_a_regular_file_is_not_writable(tmp_path):
  (tmp_path / "plain").write_text("not a directory")
  b = Bucket(f"file://{tmp_path}/plain/bucket")
  with pytest.raises(BucketError) as e:
    b.check_writable()
  msg = str(e.value)
  assert f"bucket file://{tmp_path}/plain/bucket is not writable" in msg
  assert "a parent of the path is a file, not a directory" in msg
  assert "\n" not in msg
  with pytest.raises(BucketError, match=r"cannot write 'k' \(file://.*/plain/bucket/k\)"):
    b.write("k", b"x")


# Drops every capability of its process (capset(2)), so that even root obeys directory
# permissions as an unprivileged user does (CAP_DAC_OVERRIDE is what lets root ignore
# them), then checks the bucket named by argv[1]. A subprocess: the drop is for good.
_CHECK_WITHOUT_CAPABILITIES = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process.
if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:  # Effective, permitted, inheritable.
  raise OSError(ctypes.get_errno(), "capset")
from tapestry_jax.buckets import Bucket, BucketError
try:
  Bucket(sys.argv[1]).check_writable()
except BucketError as e:
  print(e)
else:
  print("writable")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="capabilities are Linux's")
def test_read_only_directory_is_not_writable(tmp_path):
  """Also as root (how CI runs): the check runs in a process with no capabilities."""
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    out = subprocess.run([sys.executable, "-c", _CHECK_WITHOUT_CAPABILITIES, f"{ro}/b"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
                         env=dict(os.environ, PYTHONPATH=ROOT))
  finally:
    ro.chmod(0o755)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(f"bucket {ro}/b is not writable"), out.stdout
  assert "permission denied" in out.stdout, out.stdout


def test_unreachable_endpoint_is_named(monkeypatch):
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"s3://site-fr/p?endpoint=http://127.0.0.1:{port}&region=us-east-1"
  b = Bucket(url, max_retries=1)
  with pytest.raises(BucketError) as e:
    b.write("k", b"x")
  assert f"bucket {url}: cannot write 'k'" in str(e.value)
  assert "cannot reach endpoint" in str(e.value)


def test_a_stalled_endpoint_is_given_up_within_bounded_time(tmp_path):
  """A server that accepts connections and never answers (slow responses at their
  worst): curl's low-speed limit aborts each request, TensorStore retries it a bounded
  number of times with backoff, and the caller gets a clear BucketError instead of a
  hang. Run in a fresh process: the limit is read when the HTTP transport is created."""
  import socket
  import subprocess
  import sys
  import threading

  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(16)
  held = []

  def accept_and_hold():
    while True:
      try:
        conn, _ = server.accept()
      except OSError:
        return
      held.append(conn)  # Never read from, never answered.

  threading.Thread(target=accept_and_hold, daemon=True).start()
  port = server.getsockname()[1]
  code = (
      "import time\n"
      "from tapestry_jax import buckets\n"
      f"b = buckets.Bucket('s3://stalled/x?endpoint=http://127.0.0.1:{port}&region=us-east-1',"
      " max_retries=1)\n"
      "t0 = time.monotonic()\n"
      "try:\n"
      "  b.write('k', b'v')\n"
      "  print('WROTE')\n"
      "except buckets.BucketError as e:\n"
      "  print(f'GAVE UP after {time.monotonic() - t0:.1f} s: {e}')\n")
  env = dict(os.environ, TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS="2",
             TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES="1", AWS_ACCESS_KEY_ID="stall",
             AWS_SECRET_ACCESS_KEY="stall", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
  finally:
    server.close()
    for conn in held:
      conn.close()
  line = [l for l in out.stdout.splitlines() if l.startswith(("GAVE UP", "WROTE"))]
  assert line and line[0].startswith("GAVE UP"), (out.stdout, out.stderr[-2000:])
  seconds = float(line[0].split()[3])
  assert seconds < 60, line[0]
  assert "cannot write 'k'" in line[0], line[0]
  assert len(held) >= 2  # The request was retried (a new connection per attempt).


# ---------------------------------------------------------------- links out of a file:// bucket


def _outside(tmp_path):
  """A directory next to the bucket holding a file `s` that must stay unread and unchanged."""
  out = tmp_path / "outside"
  out.mkdir()
  (out / "s").write_bytes(b"secret")
  return out


def _refused(op, key, why="symbolic link leads it out of the bucket"):
  with pytest.raises(BucketError) as e:
    op()
  msg = str(e.value)
  assert repr(key) in msg and why in msg and "\n" not in msg, msg


@pytest.mark.parametrize("link, key", [
    ("f", "f"),                    # the key itself is a link to a file outside
    ("d", "d/s"),                  # a directory link, the key below it
    ("a/b/d", "a/b/d/s"),          # a directory link in the middle of a longer key
])
def test_links_out_of_a_file_bucket_are_refused(tmp_path, link, key):
  out = _outside(tmp_path)
  root = tmp_path / "b"
  (root / link).parent.mkdir(parents=True, exist_ok=True)
  (root / link).symlink_to(out / "s" if link == "f" else out)
  b = Bucket(f"file://{root}")
  _refused(lambda: b.read(key), key)
  _refused(lambda: b.exists(key), key)
  _refused(lambda: b.write(key, b"x"), key)
  _refused(lambda: b.create(key, b"x"), key)
  _refused(lambda: b.delete(key), key)
  _refused(lambda: b.array_spec(key), key)
  _refused(lambda: b.list(), link)  # The link is listed as a key: refused by name.
  if link != "f":
    _refused(lambda: b.write(f"{link}/new", b"x"), f"{link}/new")
    _refused(lambda: b.list(f"{link}/"), link)
    _refused(lambda: b.delete_prefix(f"{link}/"), link)
  assert sorted(os.listdir(out)) == ["s"] and (out / "s").read_bytes() == b"secret"


def test_links_inside_a_file_bucket_and_a_linked_root_work(tmp_path):
  """A link that stays inside the bucket is allowed; a bucket URL naming a link to the
  bucket's directory is resolved once, when the Bucket is made."""
  real = tmp_path / "real"
  Bucket(f"file://{real}").write("a/x", b"12")
  (real / "alias").symlink_to(real / "a")
  (tmp_path / "root-link").symlink_to(real)
  b = Bucket(f"file://{tmp_path}/root-link")
  assert b.read("alias/x") == b"12" and b.read("a/x") == b"12"
  b.write("alias/y", b"3")
  assert (real / "a" / "y").read_bytes() == b"3"
  assert b.list() == ["a/x", "a/y", "alias"]
  assert b.array_spec("a")["path"] == f"{real}/a/"


def test_a_party_reading_an_update_through_a_link_gets_a_clear_error(tmp_path):
  """A committed update whose array directory, or COMMIT, was replaced by a link to a
  copy outside the bucket: the exchange read that a coordinator or merge worker makes
  refuses it with a BucketError naming the key, before TensorStore follows the link."""
  import shutil

  import jax
  import numpy as np

  from tapestry_jax import exchange as ex

  root = tmp_path / "site-fr"
  bucket = Bucket(f"file://{root}")
  prefix, attempt = ex.update_prefix(1), ex.new_attempt("links")
  data = ex.data_prefix(prefix, attempt)
  records = ex.write_arrays(bucket, data, {"w": np.arange(6, dtype=np.float32)})
  ex.write_manifest(bucket, prefix, ex.make_manifest(
      federation="test", kind="update", round=1, author="fr", attempt=attempt,
      arrays=records, base_round=0, tokens=1, extra={}))
  manifest = ex.read_manifest(bucket, prefix)
  cpu = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
  np.testing.assert_array_equal(np.asarray(ex.read_arrays(bucket, prefix, manifest, cpu)["w"]),
                                np.arange(6))

  array_dir = root / data / "arrays" / "w"
  chunk = next(p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json")
  key = str(chunk.relative_to(root))
  moved = tmp_path / "elsewhere"
  shutil.copytree(array_dir, moved)
  chunk.unlink()
  chunk.symlink_to(moved / chunk.relative_to(array_dir))  # One chunk leads out.
  _refused(lambda: ex.read_arrays(bucket, prefix, manifest, cpu), key)
  _refused(lambda: ex.open_array(bucket, data, "w", manifest["arrays"]["w"]), key)

  commit = root / prefix / "COMMIT"
  shutil.copy(commit, tmp_path / "COMMIT")
  commit.unlink()
  commit.symlink_to(tmp_path / "COMMIT")
  _refused(lambda: ex.read_manifest(bucket, prefix), f"{prefix}/COMMIT")
