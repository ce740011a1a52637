"""Buckets: the storage a federation talks through, addressed by URL.

Every site owns a bucket it publishes updates to and the coordinator owns the global
bucket; `exchange.py` stores rounds of arrays in them. A `Bucket` is a thin layer over
a TensorStore kvstore that adds what the federation needs and TensorStore does not:
URL parsing for the four accepted forms, keys confined to the bucket's prefix, errors
that say what failed, where and why in one sentence, and byte counters (the cost of a
round is measured in bytes moved).

Accepted URLs:
  file:///abs/dir  or a plain path                 local directory (file driver)
  memory://name                                    in-process store, for tests
  gs://bucket/prefix                               Google Cloud Storage
  s3://bucket/prefix?endpoint=URL&region=REGION    S3 or an S3-compatible store
Any of the URL forms may add `max_mbps=N` to its query (`file:///dir?max_mbps=100`): the
bucket then emulates a WAN link of N megabit/s per direction (see `Bucket`).
A file:// bucket refuses a key that a symbolic link leads out of the bucket (`Bucket`).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import urllib.parse
import uuid
from typing import Any

# A gs:// or s3:// request that moves less than 1 byte per second for 30 s (a stalled
# connection or a server that stopped answering) is aborted, then retried like any
# transient error, up to the bucket's max_retries: curl's low-speed limit, which
# TensorStore reads from these variables when it creates its HTTP transport. Without it a
# hung request would wait forever and no round deadline could be honoured. Set the
# variables yourself to change the bounds.
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "30")
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")

import tensorstore as ts  # noqa: E402  (after the defaults above)

ACCEPTED_FORMS = ("file:///abs/dir (or a plain path), memory://name, gs://bucket/prefix, "
                  "s3://bucket/prefix?endpoint=http://host:port&region=us-east-1, any of "
                  "them with ?max_mbps=N (or &max_mbps=N)")

# The query option that throttles a bucket (megabits per second, per direction), and the
# burst its token bucket allows: small, so that a transfer of a few MiB is paced.
THROTTLE_OPTION = "max_mbps"
THROTTLE_BURST_BYTES = 64 * 1024

# One context for every bucket of the process: `memory://name` must reach the same
# store from every Bucket (and every zarr array opened through one), and sharing it
# also shares TensorStore's connection and concurrency pools. Its cache pool is empty
# (TensorStore's default), so reads always see the stored bytes.
_SHARED_CONTEXT = ts.Context()
_CONTEXTS: dict[tuple, ts.Context] = {}
_CONTEXT_LOCK = threading.Lock()

_S3_QUERY_KEYS = {"endpoint": "endpoint", "region": "aws_region", "aws_region": "aws_region"}
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")


# TensorStore's StorageGeneration for "no value": a conditional write on it creates.
_NO_VALUE = b"\x02"


class BucketError(Exception):
  """A bucket URL that cannot be used, a key outside the bucket, or a failed storage op."""


def credentials_spec(credentials: str | None) -> dict | None:
  """TensorStore's `aws_credentials` resource for a party's S3 credentials.

  None: TensorStore's default chain (AWS_* environment variables, then the user's AWS
  profile). "env": only the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment
  variables of this process. A file path (optionally "PATH#PROFILE"): that party's own
  AWS-style credentials file, profile "default" unless named.
  """
  if credentials is None or credentials == "":
    return None
  if credentials == "env":
    return {"type": "environment"}
  path, _, profile = str(credentials).partition("#")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise BucketError(f"S3 credentials file {path} does not exist (credentials are 'env', "
                      f"a file path, or 'PATH#PROFILE')")
  # aws-c-auth also resolves a config file; the party's own (possibly empty) one.
  config = path + ".config"
  if not os.path.exists(config):
    config = os.devnull
  return {"type": "profile", "credentials_file": path, "config_file": config,
          "profile": profile or "default"}


def _context(max_retries: int | None, credentials: str | None = None) -> ts.Context:
  """The shared context, or one with the GCS/S3 drivers' retry limit and S3 credentials."""
  creds = credentials_spec(credentials)
  if max_retries is None and creds is None:
    return _SHARED_CONTEXT
  key = (max_retries, json.dumps(creds, sort_keys=True))
  with _CONTEXT_LOCK:
    if key not in _CONTEXTS:
      spec: dict[str, Any] = {}
      if max_retries is not None:
        retries = {"max_retries": int(max_retries), "initial_delay": "0.2s", "max_delay": "5s"}
        spec.update(s3_request_retries=retries, gcs_request_retries=retries)
      if creds is not None:
        spec["aws_credentials"] = creds
      # memory:// stores live in a context; the parent keeps them shared across all.
      _CONTEXTS[key] = ts.Context(spec, parent=_SHARED_CONTEXT)
    return _CONTEXTS[key]


def _bad_url(url: str, why: str) -> BucketError:
  return BucketError(f"bucket URL {url!r} is not usable ({why}); accepted forms are "
                     f"{ACCEPTED_FORMS}")


def _clean_prefix(url: str, path: str) -> str:
  """'a/b/' -> 'a/b/' after checking its components; '' stays ''."""
  parts = [p for p in path.strip("/").split("/")] if path.strip("/") else []
  for p in parts:
    if p in ("", ".", ".."):
      raise _bad_url(url, f"its path {path!r} has an empty, '.' or '..' component")
  return "/".join(parts) + "/" if parts else ""


def _split_throttle(url: str, query: str) -> tuple[str, float | None]:
  """(`query` without its max_mbps item, the rate it asks for in megabit/s or None)."""
  items = [item for item in query.split("&") if item]
  mine = [item for item in items
          if urllib.parse.unquote_plus(item.partition("=")[0]) == THROTTLE_OPTION]
  if not mine:
    return query, None
  if len(mine) > 1:
    raise _bad_url(url, f"{THROTTLE_OPTION} is given {len(mine)} times")
  value = urllib.parse.unquote_plus(mine[0].partition("=")[2])
  try:
    rate = float(value)
  except ValueError:
    rate = math.nan
  if not (math.isfinite(rate) and rate > 0):
    raise _bad_url(url, f"{THROTTLE_OPTION} must be a positive, finite number of megabit/s, "
                        f"got {value!r}")
  return "&".join(item for item in items if item not in mine), rate


def max_mbps(url: str) -> float | None:
  """The link rate (megabit/s per direction) that a bucket URL's `max_mbps` asks for, or
  None (unthrottled). BucketError for a malformed URL or a bad value."""
  kvstore_spec(url)
  if "://" not in url:
    return None
  return _split_throttle(url, urllib.parse.urlsplit(url).query)[1]


def kvstore_spec(url: str) -> dict[str, Any]:
  """The TensorStore kvstore spec (a JSON dict) for a bucket URL.

  The spec's `path` always ends with '/', so keys are appended as sub-paths. A
  `max_mbps` query item is checked and left out (it is the Bucket's, not TensorStore's).
  Raises BucketError for an unknown scheme or a malformed URL.
  """
  if not isinstance(url, str) or not url.strip():
    raise _bad_url(str(url), "it is empty")
  if "://" not in url:
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    if scheme and scheme.group(1).lower() in ("file", "memory", "gs", "s3"):
      raise _bad_url(url, f"'{scheme.group(1)}:' must be followed by '//'")
    if scheme:
      raise _bad_url(url, f"unknown scheme {scheme.group(1)!r}")
    return {"driver": "file", "path": os.path.abspath(os.path.expanduser(url)).rstrip("/") + "/"}
  parts = urllib.parse.urlsplit(url)
  scheme = parts.scheme.lower()
  if scheme in ("file", "memory", "gs", "s3"):
    parts = parts._replace(query=_split_throttle(url, parts.query)[0])
  if parts.fragment:
    raise _bad_url(url, "it has a '#' fragment")
  if scheme == "file":
    if parts.netloc not in ("", "localhost"):
      raise _bad_url(url, "a file URL needs an absolute path, file:///abs/dir")
    if parts.query:
      raise _bad_url(url, f"file URLs take no query but {THROTTLE_OPTION}")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or path.strip("/") == "":
      raise _bad_url(url, "a file URL needs an absolute directory below /")
    return {"driver": "file", "path": "/" + _clean_prefix(url, path)}
  if scheme == "memory":
    if parts.query:
      raise _bad_url(url, f"memory URLs take no query but {THROTTLE_OPTION}")
    name = _clean_prefix(url, parts.netloc + parts.path)
    if not name:
      raise _bad_url(url, "a memory URL needs a name, memory://name")
    return {"driver": "memory", "path": name}
  if scheme in ("gs", "s3"):
    bucket = parts.netloc
    if not bucket or not _BUCKET_NAME.match(bucket):
      raise _bad_url(url, f"{bucket!r} is not a valid bucket name")
    spec = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket,
            "path": _clean_prefix(url, urllib.parse.unquote(parts.path))}
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    if scheme == "gs" and query:
      raise _bad_url(url, f"gs URLs take no query but {THROTTLE_OPTION}")
    for key, values in query.items():
      if key not in _S3_QUERY_KEYS:
        raise _bad_url(url, f"unknown query parameter {key!r} (s3 takes endpoint, region "
                            f"and {THROTTLE_OPTION})")
      if len(values) != 1 or not values[0]:
        raise _bad_url(url, f"query parameter {key!r} needs exactly one non-empty value")
      spec[_S3_QUERY_KEYS[key]] = values[0]
    endpoint = spec.get("endpoint")
    if endpoint is not None and not re.match(r"^https?://[^/]+", endpoint):
      raise _bad_url(url, f"endpoint {endpoint!r} must look like http://host:port")
    return spec
  raise _bad_url(url, f"unknown scheme {scheme!r}")


def check_key(key: str, *, what: str = "key") -> str:
  """Returns `key` if it is relative and stays inside the bucket, else BucketError."""
  if not isinstance(key, str) or not key:
    raise BucketError(f"{what} {key!r} must be a non-empty string")
  if key.startswith("/") or "\\" in key or "\x00" in key:
    raise BucketError(f"{what} {key!r} must be relative, with '/' separators")
  if any(p in ("", ".", "..") for p in key.split("/")):
    raise BucketError(f"{what} {key!r} has an empty, '.' or '..' component; keys must "
                      f"stay inside the bucket")
  return key


def describe_error(exc: BaseException) -> str:
  """A short reason for a TensorStore/OS failure: 'permission denied (detail)' etc."""
  text = str(exc).strip()
  first = text.splitlines()[0] if text else type(exc).__name__
  # TensorStore appends payloads ([http_response_body=...], [tensorstore_spec=...]) that
  # bury the reason; keep only the status line.
  detail = re.split(r"\s*\[[A-Za-z_-]+=", first, maxsplit=1)[0].strip()
  detail = detail if len(detail) <= 300 else detail[:297] + "..."
  low = text.lower()
  if ("unauthenticated" in low or "invalidaccesskeyid" in low or "signaturedoesnotmatch" in low
      or "expiredtoken" in low or "'401'" in low):
    reason = "credentials were missing or rejected"
  elif ("permission_denied" in low or "permission denied" in low or "accessdenied" in low
        or "access denied" in low or "'403'" in low):
    reason = "permission denied"
  elif "retry attempts failed" in low and "curl error" not in low:
    # Every try was answered, with an error (503 ServiceUnavailable, 429 SlowDown, ...).
    reason = "the store kept answering with errors"
  elif ("could not connect" in low or "couldn't connect" in low or "resolve host" in low
        or "unavailable" in low or "deadline_exceeded" in low or "timed out" in low
        or "curl error" in low):
    reason = "cannot reach endpoint"
  elif "not a directory" in low:
    reason = "a parent of the path is a file, not a directory"
  elif "read-only file system" in low:
    reason = "read-only file system"
  elif "no space left" in low or "resource_exhausted" in low:
    reason = "out of space or quota"
  elif "nosuchbucket" in low or "not_found" in low:
    reason = "the bucket or directory does not exist"
  else:
    reason = "storage error"
  return f"{reason} ({detail})"


def _prefix_successor(prefix: bytes) -> bytes:
  """The smallest key greater than every key that starts with `prefix` (b'' = no bound)."""
  p = bytearray(prefix)
  while p and p[-1] == 0xFF:
    p.pop()
  if not p:
    return b""
  p[-1] += 1
  return bytes(p)


class Throttle:
  """A token bucket of `bytes_per_s` with a burst of `burst_bytes`, shared by threads.

  `wait(n)` reserves n bytes and sleeps the calling thread until they fit under the rate;
  a reservation may exceed the burst (it then waits for the debt), so the bytes whose
  waits have ended t seconds after the throttle was made never exceed burst + rate * t."""

  def __init__(self, bytes_per_s: float, burst_bytes: int = THROTTLE_BURST_BYTES):
    self.bytes_per_s, self.burst_bytes = float(bytes_per_s), int(burst_bytes)
    self._tokens = float(burst_bytes)
    self._last = time.monotonic()
    self._lock = threading.Lock()

  def wait(self, nbytes: int) -> float:
    """Blocks until `nbytes` more may move; returns the seconds slept."""
    if nbytes <= 0:
      return 0.0
    with self._lock:
      now = time.monotonic()
      self._tokens = min(float(self.burst_bytes),
                         self._tokens + (now - self._last) * self.bytes_per_s)
      self._last = now
      self._tokens -= nbytes
      delay = -self._tokens / self.bytes_per_s if self._tokens < 0 else 0.0
    if delay > 0:  # Outside the lock: later callers queue behind this debt, not the lock.
      time.sleep(delay)
    return delay


# (kvstore spec, megabit/s) -> (writes' throttle, reads' throttle): Buckets with the same
# URL in one process share their link.
_THROTTLES: dict[tuple[str, float], tuple[Throttle, Throttle]] = {}
_THROTTLE_LOCK = threading.Lock()


def _link_throttles(spec: dict[str, Any], mbps: float) -> tuple[Throttle, Throttle]:
  key = (json.dumps(spec, sort_keys=True), mbps)
  with _THROTTLE_LOCK:
    if key not in _THROTTLES:
      rate = mbps * 1e6 / 8
      _THROTTLES[key] = (Throttle(rate), Throttle(rate))
    return _THROTTLES[key]


# Retries of a failing GCS/S3 request unless a caller says otherwise (the federation's
# parties pass federation.storage_retries, the same number by default).
DEFAULT_MAX_RETRIES = 6


class Bucket:
  """A storage bucket addressed by URL, with keys relative to the URL's prefix.

  `max_retries` bounds how often the GCS/S3 drivers retry a failing request, with
  exponential backoff from 0.2 s to at most 5 s between tries (DEFAULT_MAX_RETRIES: an
  unreachable endpoint fails an operation in about 12 s; None keeps TensorStore's own
  default, which waits many minutes). `credentials` says where this party's S3 credentials come
  from (see `credentials_spec`); each party passes its own.
  Counters `bytes_written`/`bytes_read` count payload bytes moved through this object,
  including arrays that exchange.py moves (uncompressed sizes, see `record_transfer`).

  A URL with `max_mbps=N` in its query emulates a WAN link of N megabit/s per direction
  for the party using the bucket: every counted transfer (`read`, `write`, `create`, and
  the arrays exchange.py moves) waits in the calling thread, when it is counted, until the
  bytes moved in that direction fit under N (a token bucket, `Throttle`, with a 64 KiB
  burst); reads and writes are limited separately. Buckets with the same URL in one
  process share one link; other processes (other parties) have their own. `url` keeps the
  option, so the parties a federation starts get it through their config.
  """

  def __init__(self, url: str, *, max_retries: int | None = DEFAULT_MAX_RETRIES,
               credentials: str | None = None):
    self.url = url
    self._spec = kvstore_spec(url)
    if self._spec["driver"] == "s3":
      # TensorStore sends conditional writes (If-None-Match / If-Match) only to AWS's own
      # endpoints; elsewhere it checks with a HEAD, then PUTs: racy, so two writers could
      # both "create" a COMMIT. S3-compatible stores (SeaweedFS, MinIO) honour the headers.
      self._spec["use_conditional_write"] = True
    self.context = _context(max_retries, credentials)
    # A file:// bucket's real directory, resolved once (the URL may name a symlink) and
    # given to TensorStore, so a later change of that link does not move the bucket.
    self._root = None
    if self._spec["driver"] == "file":
      self._root = os.path.realpath(self._spec["path"])
      self._spec["path"] = self._root.rstrip("/") + "/"
    self.bytes_written = 0
    self.bytes_read = 0
    self._lock = threading.Lock()
    self.max_mbps = max_mbps(url)
    self._throttles = (None if self.max_mbps is None
                       else _link_throttles(self._spec, self.max_mbps))
    try:
      self._kv = ts.KvStore.open(self._spec, context=self.context).result()
    except Exception as e:  # noqa: BLE001  (TensorStore raises ValueError for everything)
      raise BucketError(f"bucket {url}: cannot open: {describe_error(e)}") from None

  def __repr__(self) -> str:
    return f"Bucket({self.url!r})"

  def _where(self, key: str) -> str:
    """Where `key` lives, as a URL without the query (s3's endpoint would hide the key)."""
    return f"{self.url.split('?', 1)[0].rstrip('/')}/{key}"

  def _fail(self, op: str, key: str, exc: BaseException) -> BucketError:
    return BucketError(f"bucket {self.url}: cannot {op} {key!r} ({self._where(key)}): "
                       f"{describe_error(exc)}")

  def _confine(self, op: str, key: str) -> None:
    """BucketError if, in a file:// bucket, a symbolic link on the way to `key` (its
    own, or a directory's in the middle) leads out of the bucket's real directory.

    Checked on every call, just before TensorStore opens the path, so a link planted
    later is caught by the next operation; a link swapped in between this check and
    the open is not (TensorStore follows links). Links that stay inside are allowed."""
    if self._root is None:
      return
    real = os.path.realpath(os.path.join(self._root, key))
    if os.path.commonpath([real, self._root]) != self._root:
      raise BucketError(f"bucket {self.url}: cannot {op} {key!r} ({self._where(key)}): a "
                        f"symbolic link leads it out of the bucket's directory "
                        f"{self._root}, to {real}; file:// buckets refuse such links")

  def _confine_tree(self, op: str, key: str) -> None:
    """`_confine` for `key` and everything stored under it (a zarr array's directory)."""
    self._confine(op, key)
    if self._root is None:
      return
    todo = [os.path.realpath(os.path.join(self._root, key))]
    while todo:
      try:
        entries = list(os.scandir(todo.pop()))
      except (FileNotFoundError, NotADirectoryError):
        continue
      for entry in entries:
        if entry.is_symlink():
          self._confine(op, os.path.relpath(entry.path, self._root))
        elif entry.is_dir():
          todo.append(entry.path)

  def record_transfer(self, *, written: int = 0, read: int = 0) -> None:
    """Adds bytes moved to the counters (`read`/`write` call it, exchange.py for its zarr
    arrays); with `max_mbps`, waits until they fit under the link's rate."""
    with self._lock:
      self.bytes_written += int(written)
      self.bytes_read += int(read)
    if self._throttles is not None:
      up, down = self._throttles
      up.wait(int(written))
      down.wait(int(read))

  def read(self, key: str) -> bytes | None:
    """The value stored at `key`, or None if there is none."""
    return self.read_versioned(key)[0]

  def write(self, key: str, data: bytes) -> None:
    """Stores `data` at `key`; returns once the store reports it durable."""
    check_key(key)
    self._confine("write", key)
    if not isinstance(data, (bytes, bytearray, memoryview)):
      raise BucketError(f"bucket {self.url}: value for {key!r} must be bytes, got "
                        f"{type(data).__name__}")
    data = bytes(data)
    try:
      self._kv.write(key, data).result()
    except Exception as e:  # noqa: BLE001
      raise self._fail("write", key, e) from None
    self.record_transfer(written=len(data))

  def create(self, key: str, data: bytes) -> bool:
    """Stores `data` at `key` only if `key` holds no value: a create-only (conditional)
    write. True if this call created it, False if a value was already there (left as
    it is). On S3-like stores, which cannot rename atomically, this is what lets two
    racing writers agree that exactly one of them committed."""
    check_key(key)
    self._confine("create", key)
    data = bytes(data)
    try:
      # The write applies only if the key is absent.
      stamp = self._kv.write(key, data, if_equal=_NO_VALUE).result()
    except Exception as e:  # noqa: BLE001
      raise self._fail("create", key, e) from None
    if not stamp.generation:  # The condition failed: someone else's value is there.
      return False
    self.record_transfer(written=len(data))
    return True

  def read_versioned(self, key: str) -> tuple[bytes | None, bytes]:
    """The value at `key` (None if there is none) and the storage generation it was read
    at, for `replace`."""
    check_key(key)
    self._confine("read", key)
    try:
      result = self._kv.read(key).result()
    except Exception as e:  # noqa: BLE001
      raise self._fail("read", key, e) from None
    if result.state != "value":
      return None, _NO_VALUE
    value = bytes(result.value)
    self.record_transfer(read=len(value))
    return value, bytes(result.stamp.generation)

  def replace(self, key: str, data: bytes, generation: bytes) -> bool:
    """Stores `data` at `key` only if `key` is still at `generation` (from
    `read_versioned`): a compare-and-swap. False if another writer changed it since."""
    check_key(key)
    self._confine("write", key)
    data = bytes(data)
    try:
      stamp = self._kv.write(key, data, if_equal=generation).result()
    except Exception as e:  # noqa: BLE001
      raise self._fail("write", key, e) from None
    if not stamp.generation:
      return False
    self.record_transfer(written=len(data))
    return True

  def exists(self, key: str) -> bool:
    """Whether `key` holds a value (reads zero bytes of it)."""
    check_key(key)
    self._confine("check", key)
    try:
      result = self._kv.read(key, byte_range=slice(0, 0)).result()
    except Exception as e:  # noqa: BLE001
      raise self._fail("check", key, e) from None
    return result.state == "value"

  def delete(self, key: str) -> None:
    """Removes `key`; deleting a missing key is not an error."""
    check_key(key)
    self._confine("delete", key)
    try:
      self._kv.write(key, None).result()
    except Exception as e:  # noqa: BLE001
      raise self._fail("delete", key, e) from None

  def _key_range(self, prefix: str) -> ts.KvStore.KeyRange:
    if prefix:
      # A prefix may end mid-name ("updates/round_") or with '/'; only its complete
      # components are checked.
      check_key(prefix.rstrip("/") or "/", what="prefix")
    raw = prefix.encode()
    return ts.KvStore.KeyRange(inclusive_min=raw, exclusive_max=_prefix_successor(raw))

  def list(self, prefix: str = "") -> list[str]:
    """Sorted keys (relative to the bucket) that start with `prefix` ('' lists all)."""
    try:
      key_range = self._key_range(prefix)
      if "/" in prefix:  # TensorStore follows a link in the prefix's directories.
        self._confine("list", prefix.rsplit("/", 1)[0])
      keys = self._kv.list(key_range).result()
    except BucketError:
      raise
    except Exception as e:  # noqa: BLE001
      raise self._fail("list", prefix + "*", e) from None
    keys = sorted(k.decode() for k in keys)
    if self._root is not None:  # A link is listed as a key (its target is not walked).
      for key in keys:
        if os.path.islink(os.path.join(self._root, key)):
          self._confine("list", key)
    return keys

  def delete_prefix(self, prefix: str) -> None:
    """Removes every key that starts with `prefix` (which must be non-empty)."""
    if not prefix:
      raise BucketError(f"bucket {self.url}: refusing to delete with an empty prefix")
    if self._root is not None:  # TensorStore would delete what a link leads to.
      self.list(prefix)
    try:
      self._kv.delete_range(self._key_range(prefix)).result()
    except BucketError:
      raise
    except Exception as e:  # noqa: BLE001
      raise self._fail("delete", prefix + "*", e) from None

  def array_spec(self, key: str) -> dict[str, Any]:
    """A kvstore spec rooted at `key` (for a zarr3 array stored there).

    Open arrays with `context=bucket.context`: `memory://` stores are only shared
    within that context. In a file:// bucket, every file and directory under `key` is
    checked for links out of the bucket now (see `_confine`).
    """
    check_key(key)
    self._confine_tree("open", key)
    spec = dict(self._spec)
    spec["path"] = spec["path"] + key.rstrip("/") + "/"
    return spec

  def check_writable(self) -> None:
    """Writes, reads back and deletes a probe key; BucketError saying why if that fails."""
    key = f".tapestry-probe-{uuid.uuid4().hex}"
    payload = b"tapestry write probe"
    try:
      self._kv.write(key, payload).result()
      back = self._kv.read(key).result()
      self._kv.write(key, None).result()
    except Exception as e:  # noqa: BLE001
      raise BucketError(f"bucket {self.url} is not writable: writing a probe key at "
                        f"{self._where(key)} failed: {describe_error(e)}") from None
    if back.state != "value" or bytes(back.value) != payload:
      raise BucketError(f"bucket {self.url} is not writable: a probe key written to "
                        f"{self._where(key)} did not read back")
