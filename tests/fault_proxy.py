"""A fault-injecting HTTP/1.1 reverse proxy for an S3 endpoint (tests only).

Parties point their s3:// endpoint at the proxy; it forwards each request to the real
store (SeaweedFS on loopback) unchanged, Host header included, so the client's SigV4
signature still verifies, or answers it with a fault instead:

  "429"       HTTP 429 SlowDown, nothing forwarded
  "503"       HTTP 503 ServiceUnavailable, nothing forwarded
  "reset"     the connection is reset before anything is forwarded
  "lost"      forwarded (the store applies it), then the connection is reset: a lost response
  "stall"     nothing is sent back for `stall_s`, then the connection is closed
  "truncate"  forwarded; the answer declares its full Content-Length but stops half-way
  "short"     forwarded; the answer carries half its body under a matching Content-Length
              (a truncation HTTP cannot see: only the reader's digests can)
  "corrupt"   forwarded; the answer's last byte is flipped (HTTP cannot see it either)

Which request gets which fault: `rules` first (a kind for requests whose method and path
match, at most `times` times), then the seeded schedule: a fault with probability `rate`,
decided by a hash of (seed, method, path, how many times this exact request came
before), so thread interleaving does not change which requests fail, of the kinds in
`kinds` in turn, so that a few faults cover every kind; at most
`max_consecutive` faults in a row for one request, so a client that retries more often
than that always gets through. Every request is logged (`log`), which is how tests count
retries and measure the backoff between them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.client
import http.server
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse

KINDS = ("429", "503", "reset", "lost", "stall", "truncate", "short", "corrupt")
# Faults that end the exchange without an HTTP answer or with a broken one.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection",
               "te", "trailer", "upgrade"}
_ERROR_CODES = {"429": ("SlowDown", "Please reduce your request rate."),
                "503": ("ServiceUnavailable", "The service is temporarily unavailable.")}


@dataclasses.dataclass
class Rule:
  """`kind` for requests whose method matches `method` (None: any) and whose path (with
  its query) matches the regular expression `path` (searched), the first `times` times
  each distinct request (method and path) comes (None: always)."""
  kind: str
  method: str | None = None
  path: str = ""
  times: int | None = None
  used: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def matches(self, method: str, path: str) -> bool:
    return ((self.method is None or self.method == method) and re.search(self.path, path)
            is not None and (self.times is None or self.used[(method, path)] < self.times))


@dataclasses.dataclass
class Entry:
  """One request the proxy saw: when (monotonic s), what, the fault it got (None: none)
  and the status the store answered (None: not forwarded, or no answer)."""
  t: float
  method: str
  path: str
  fault: str | None
  status: int | None


class FaultProxy:
  """The proxy on 127.0.0.1 (a free port), forwarding to 127.0.0.1:`upstream_port`; a
  context manager. `rules`, `rate`, `kinds`, `seed`, `max_consecutive`: which requests
  get faults (see the module docstring); `stall_s`: how long a stall lasts."""

  def __init__(self, upstream_port: int, *, rules=(), rate: float = 0.0, kinds=KINDS,
               seed: int = 0, max_consecutive: int = 2, stall_s: float = 3.0):
    for k in [r.kind for r in rules] + list(kinds):
      if k not in KINDS:
        raise ValueError(f"fault kind {k!r} is not one of {KINDS}")
    self.upstream_port = int(upstream_port)
    self.rules = list(rules)
    self.rate, self.kinds, self.seed = float(rate), tuple(kinds), int(seed)
    self.max_consecutive, self.stall_s = int(max_consecutive), float(stall_s)
    self.log: list[Entry] = []
    self._seen: collections.Counter = collections.Counter()  # (method, path) -> requests
    self._streak: collections.Counter = collections.Counter()  # ... -> faults in a row
    self._drawn = 0  # Faults the schedule has injected.
    self._lock = threading.Lock()
    self._server = _Server(("127.0.0.1", 0), _Handler)
    self._server.proxy = self
    self.port = self._server.server_address[1]
    self.endpoint = f"http://127.0.0.1:{self.port}"
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    kwargs={"poll_interval": 0.05}, daemon=True)

  def __enter__(self) -> "FaultProxy":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(5)

  def url(self, bucket: str, prefix: str = "") -> str:
    """A tapestry s3:// bucket URL whose endpoint is this proxy."""
    path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
    return f"s3://{bucket}{path}?endpoint={self.endpoint}&region=us-east-1"

  def via(self, url: str) -> str:
    """`url` (an s3:// URL of the upstream store) with its endpoint moved to this proxy."""
    return re.sub(r"endpoint=http://127\.0\.0\.1:\d+", f"endpoint={self.endpoint}", url)

  def entries(self, method: str | None = None, path: str = "") -> list[Entry]:
    with self._lock:
      return [e for e in self.log if (method is None or e.method == method)
              and re.search(path, e.path)]

  def decide(self, method: str, path: str) -> str | None:
    """The fault for this request (None: forward it), and counts it."""
    key = (method, path)
    with self._lock:
      n = self._seen[key]
      self._seen[key] += 1
      fault = None
      for rule in self.rules:
        if rule.matches(method, path):
          rule.used[key] += 1
          fault = rule.kind
          break
      if fault is None and self.rate > 0 and self._streak[key] < self.max_consecutive:
        h = hashlib.sha256(f"{self.seed}|{method}|{path}|{n}".encode()).digest()
        u, = struct.unpack("<Q", h[:8])
        if u / 2.0**64 < self.rate:  # The kinds in turn: each comes once `kinds` have.
          fault = self.kinds[self._drawn % len(self.kinds)]
          self._drawn += 1
      self._streak[key] = self._streak[key] + 1 if fault else 0
      return fault

  def record(self, method: str, path: str, fault: str | None, status: int | None) -> None:
    with self._lock:
      self.log.append(Entry(time.monotonic(), method, path, fault, status))


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True
  proxy: FaultProxy


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # Keep-alive, as curl expects; and 100-continue.

  def log_message(self, *args) -> None:  # The proxy's own log is `FaultProxy.log`.
    pass

  def do_GET(self):
    self._proxy()

  do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

  def _reset(self) -> None:
    """Closes the connection with a TCP reset (SO_LINGER 0), not a polite FIN."""
    try:
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
      pass
    self.close_connection = True

  def _body(self) -> bytes:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      raise RuntimeError("fault_proxy does not forward chunked request bodies")
    n = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(n) if n else b""

  def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", self.server.proxy.upstream_port, timeout=60)
    try:
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
      conn.request(self.command, self.path, body=body or None, headers=headers)
      resp = conn.getresponse()
      data = resp.read()
      kept = [(k, v) for k, v in resp.getheaders()
              if k.lower() not in _HOP_BY_HOP and (k.lower() != "content-length"
                                                   or self.command == "HEAD")]
      return resp.status, kept, data
    finally:
      conn.close()

  def _answer(self, status: int, headers, body: bytes) -> None:
    self.send_response_only(status)
    for k, v in headers:
      self.send_header(k, v)
    if self.command != "HEAD":  # A HEAD answer keeps the store's Content-Length.
      self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)
    self.wfile.flush()

  def _proxy(self) -> None:
    proxy = self.server.proxy
    method, path = self.command, self.path
    body = self._body()
    fault = proxy.decide(method, path)
    if fault in _ERROR_CODES:
      proxy.record(method, path, fault, None)  # Logged before the client hears back.
      code, message = _ERROR_CODES[fault]
      resource = urllib.parse.urlsplit(path).path
      xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
             f"<Message>{message}</Message><Resource>{resource}</Resource></Error>").encode()
      self._answer(int(fault), [("Content-Type", "application/xml")], xml)
      self.close_connection = True
      return
    if fault in ("reset", "stall"):
      proxy.record(method, path, fault, None)
      if fault == "stall":
        time.sleep(proxy.stall_s)
        self.close_connection = True
      else:
        self._reset()
      return
    try:
      status, headers, data = self._forward(body)
    except OSError:
      proxy.record(method, path, fault, None)
      self._reset()
      return
    proxy.record(method, path, fault, status)
    if fault == "lost" or (fault in ("truncate", "short", "corrupt") and len(data) < 2):
      self._reset()
    elif fault == "truncate":
      self.send_response_only(status)
      for k, v in headers:
        self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data[:len(data) // 2])
      self.wfile.flush()
      self._reset()
    elif fault == "short":
      self._answer(status, headers, data[:len(data) // 2])
    elif fault == "corrupt":
      self._answer(status, headers, data[:-1] + bytes([data[-1] ^ 0x01]))
    else:
      self._answer(status, headers, data)
