"""Chaos on real processes and a real object store (SeaweedFS on loopback).

Coordinator processes (`launch.coordinator`, through tests/chaos_coordinator.py, which
adds named pause points) SIGKILLed mid-merge and before COMMIT, then restarted: the
global rounds equal an uninterrupted run's bit for bit. Two coordinator processes racing
on every round: exactly one commits each round and the other adopts it. Storage faults
injected by tests/fault_proxy.py between the parties and the store (429 and 503 answers,
resets, lost answers, stalls, truncated bodies): every request is retried with
TensorStore's bounded, jittered backoff; no round is committed twice; nothing is lost;
a permanent fault ends a site or coordinator process with one `error:` line within its
bound (docs/trust.md), and a coordinator cut off from the sites mid-run gives up in bound
and, rerun, resumes exactly. `python -m tests.chaos` reruns the fault test under other
schedules for longer.
"""
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fault_proxy

from experiments.configs import federation as fed_config
from tapestry_jax import buckets
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import seaweed
from tapestry_jax import trust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = ("cyrillic", "latin")  # Sorted: the merge's order.
PARTIES = seaweed.federation_parties(SITES)
ROUNDS = 2
# What every coordinator process and its in-process reference run with.
FED = {"rounds": ROUNDS, "poll_s": 0.05, "deadline_s": 0.0, "round_timeout_s": 60.0,
       "storage_retries": 4}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
  try:
    seaweed.weed_binary()
  except seaweed.SeaweedError as e:
    if os.environ.get("TAPESTRY_REQUIRE_S3"):  # Set by .ci/run: CI must run these.
      raise
    pytest.skip(f"chaos tests need SeaweedFS: {e}")
  with seaweed.SeaweedS3(str(tmp_path_factory.mktemp("seaweed")), PARTIES) as server:
    yield server


@pytest.fixture(scope="module")
def creds(s3, tmp_path_factory):
  home = tmp_path_factory.mktemp("parties")
  return {p: s3.credentials_file(p, str(home / p)) for p in PARTIES}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
  return str(tmp_path_factory.mktemp("keys"))


def _config(keys: str, urls: dict[str, str] | None = None, **fed):
  """The two-site tiny federation; `urls`: party -> bucket URL (None: file:// buckets in
  the workdir). The trust root holds the keys in `keys`."""
  c = fed_config.get_config("tiny+fedavg/" + ",".join(SITES))
  for k, v in {**FED, **fed}.items():
    c.federation[k] = v
  for party, url in (urls or {}).items():
    if party == federation.GLOBAL:
      c.federation.global_bucket = url
    else:
      c.sites[party].bucket = url
  trust.ensure_local_keys(c, keys, federation.party_names(c))
  return c


def _s3_urls(server, prefix: str) -> dict[str, str]:
  """Party -> its bucket on `server` (a SeaweedS3 or a FaultProxy in front of one)."""
  return {**{n: server.url(f"site-{n}", prefix) for n in SITES},
          federation.GLOBAL: server.url(federation.GLOBAL, prefix)}


def _overrides(config) -> list[str]:
  """The --config.* flags that make a process's config equal `config`."""
  f = config.federation
  flat = {**{f"federation.{k}": f[k] for k in FED}, "federation.global_bucket": f.global_bucket,
          **{f"sites.{n}.bucket": config.sites[n].bucket for n in SITES},
          **{f"federation.trust.public_keys.{p}": k for p, k in f.trust.public_keys.items()}}
  return [f"--config.{k}={v}" for k, v in flat.items()]


def _delta(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  config = fed_config.get_config("tiny+fedavg/" + ",".join(SITES))
  return {n: (1e-2 * rng.standard_normal(shape)).astype(dtype)
          for n, (shape, dtype) in federation.param_schema(config).items()}


@functools.lru_cache(maxsize=None)
def _deltas(round_: int) -> dict[str, dict[str, np.ndarray]]:
  """Each site's fake pseudo-gradient for `round_` (fixed seeds)."""
  return {n: _delta(100 * round_ + i) for i, n in enumerate(SITES)}


def _publish_updates(config, keys: str, site_buckets: dict[str, buckets.Bucket]) -> None:
  """Every site's signed update for every round (fake pseudo-gradients, fixed seeds)."""
  for r in range(1, ROUNDS + 1):
    for n in SITES:
      signer = trust.Signer.from_file(n, os.path.join(keys, f"{n}.key"))
      exchange.publish_update(site_buckets[n], config, n, r, r - 1, _deltas(r)[n],
                              federation.weight_cap(config), {}, signer=signer)


def _shardings(config):
  """The model's params as a pytree of one-device shardings (what a site reads into)."""
  mcfg = model_lib.ModelConfig.from_config(config.model)
  abstract = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, abstract)


def _digests(glob: buckets.Bucket, round_: int) -> dict[str, str]:
  """Array name -> digest (of its chunk digests) of committed global round `round_`."""
  manifest = exchange.read_manifest(glob, exchange.global_prefix(round_))
  assert manifest is not None, f"global round {round_} is not committed in {glob.url}"
  return {n: rec["digest"] for n, rec in manifest["arrays"].items()}


@pytest.fixture(scope="module")
def reference(keys, tmp_path_factory) -> dict[int, dict[str, str]]:
  """Round -> array digests of an uninterrupted, fault-free run: this process's own
  coordinator over file:// buckets, the same updates."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = _config(keys)
  urls = federation.bucket_urls(config, workdir)
  _publish_updates(config, keys, {n: buckets.Bucket(urls[n]) for n in SITES})
  coord = coord_lib.Coordinator(config, workdir, private_key=os.path.join(keys, "coordinator.key"))
  coord.run()
  return {r: _digests(coord.glob, r) for r in range(ROUNDS + 1)}


class _Party:
  """A party's process in a process group of its own: the coordinator through
  tests/chaos_coordinator.py (`launch.coordinator` with pause points), a site through
  `launch.site`; its log is WORKDIR/PARTY.N.log."""

  def __init__(self, config, workdir: str, keys: str, credentials: str, run: int = 0, *,
               party: str = federation.COORDINATOR, **env):
    cache = jax.config.jax_compilation_cache_dir
    penv = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "TAPESTRY_CHAOS_"))}
    penv.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1", **env)
    if cache:
      penv.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    main = ([os.path.join(ROOT, "tests", "chaos_coordinator.py")]
            if party == federation.COORDINATOR else ["-m", "launch.site", f"--site={party}"])
    args = [sys.executable, *main,
            f"--config={ROOT}/experiments/configs/federation.py:tiny+fedavg/{','.join(SITES)}",
            *_overrides(config), f"--workdir={workdir}",
            f"--private_key={os.path.join(keys, party + '.key')}",
            f"--credentials={credentials}"]
    os.makedirs(workdir, exist_ok=True)
    self.log = os.path.join(workdir, f"{party}.{run}.log")
    with open(self.log, "w") as log:
      self.proc = subprocess.Popen(args, cwd=ROOT, env=penv, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)

  def text(self) -> str:
    with open(self.log, errors="replace") as f:
      return f.read()

  def until_line(self, line: str, timeout_s: float = 120.0) -> None:
    t0 = time.monotonic()
    while line not in self.text():
      if self.proc.poll() is not None:
        raise AssertionError(f"coordinator exited ({self.proc.returncode}) before "
                             f"{line!r}:\n{self.text()[-3000:]}")
      if time.monotonic() - t0 > timeout_s:
        self.kill()
        raise AssertionError(f"timed out waiting for {line!r}:\n{self.text()[-3000:]}")
      time.sleep(0.01)

  def kill(self) -> None:
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait()

  def finish(self, timeout_s: float = 120.0) -> int:
    try:
      return self.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"coordinator did not finish in {timeout_s} s:\n"
                           f"{self.text()[-3000:]}") from None


def _attempt_keys(glob: buckets.Bucket, round_: int) -> dict[str, list[str]]:
  """Attempt -> its keys (relative to the attempt) under global round `round_`."""
  prefix = exchange.global_prefix(round_)
  out: dict[str, list[str]] = {}
  for key in glob.list(prefix + "/"):
    attempt, _, rest = key[len(prefix) + 1:].partition("/")
    if rest:
      out.setdefault(attempt, []).append(rest)
  return out


# ------------------------------------------------------------------ 1. coordinator processes


def test_a_coordinator_process_killed_mid_merge_and_before_commit_redoes_rounds_exactly(
    s3, creds, keys, reference, tmp_path):
  """Must not be lost: the global rounds. A real coordinator process is SIGKILLed (a)
  mid-merge of round 1, once the first array of the round is durable in its attempt,
  and, restarted, (b) before round 2's COMMIT, with the round's arrays and manifest
  written. Each kill's phase is the pause point the process announced, and the bucket
  shows it. The last restart finishes; rounds 1 and 2 are committed once each, by the
  attempts the restarts made, and every array equals an uninterrupted run's bit for bit
  (by digest of its chunks, which every reader checks); the killed attempts stay
  uncommitted garbage."""
  config = _config(keys, _s3_urls(s3, "kill"))
  coord_creds = creds["coordinator"]
  glob = buckets.Bucket(config.federation.global_bucket, max_retries=2, credentials=coord_creds)
  _publish_updates(config, keys, {n: buckets.Bucket(config.sites[n].bucket, max_retries=2,
                                                    credentials=creds[n]) for n in SITES})
  workdir = str(tmp_path / "coord")

  # (a) Mid-merge of round 1.
  proc = _Party(config, workdir, keys, coord_creds, 0,
                             TAPESTRY_CHAOS_PAUSE="merging@1")
  proc.until_line("chaos: paused at merging, round 1")
  proc.kill()
  assert exchange.read_latest(glob) == 0
  assert exchange.read_manifest(glob, exchange.global_prefix(1)) is None
  [(killed_1, written)] = _attempt_keys(glob, 1).items()
  assert any(k.startswith("arrays/") for k in written), written
  assert exchange.MANIFEST not in written, "the merge had finished before the kill"

  # (b) Before round 2's COMMIT.
  proc = _Party(config, workdir, keys, coord_creds, 1,
                             TAPESTRY_CHAOS_PAUSE="before-commit@2")
  proc.until_line("chaos: paused at before-commit, round 2")
  proc.kill()
  assert exchange.read_latest(glob) == 1
  assert exchange.read_manifest(glob, exchange.global_prefix(2)) is None
  [(killed_2, written)] = _attempt_keys(glob, 2).items()
  assert exchange.MANIFEST in written, "the kill came before the manifest was written"

  proc = _Party(config, workdir, keys, coord_creds, 2)
  assert proc.finish() == 0, proc.text()[-3000:]
  assert f"coordinator: published {ROUNDS - 1} rounds" in proc.text()  # Round 2 only.

  root = trust.TrustRoot.from_config(config)
  assert exchange.read_latest(glob) == ROUNDS
  for r in range(ROUNDS + 1):
    root.verify(exchange.read_manifest(glob, exchange.global_prefix(r)), federation.COORDINATOR)
    assert _digests(glob, r) == reference[r], f"global round {r} differs from the uninterrupted run"
  assert exchange.uncommitted_attempts(glob, exchange.global_prefix(1)) == [killed_1]
  assert exchange.uncommitted_attempts(glob, exchange.global_prefix(2)) == [killed_2]


def test_two_coordinator_processes_racing_on_s3_commit_each_round_exactly_once(
    s3, creds, keys, reference, tmp_path):
  """Must not be lost: one verifiable history. Two coordinator processes (same config,
  key and S3 buckets, workdirs of their own) run the whole federation at once; before
  every global COMMIT each waits until the other has reached the same create, so both
  are past every earlier check and the create-only write alone decides. Every round
  (0, 1, 2) is committed exactly once: one process records it as its own, the other
  logs that another coordinator committed it and goes on from the committed round; both
  end with every round; the rounds equal an uninterrupted run's bit for bit, and each
  round has exactly one uncommitted (losing) attempt."""
  config = _config(keys, _s3_urls(s3, "race"))
  coord_creds = creds["coordinator"]
  glob = buckets.Bucket(config.federation.global_bucket, max_retries=2, credentials=coord_creds)
  _publish_updates(config, keys, {n: buckets.Bucket(config.sites[n].bucket, max_retries=2,
                                                    credentials=creds[n]) for n in SITES})
  barrier = tmp_path / "barrier"
  barrier.mkdir()
  procs = [_Party(config, str(tmp_path / f"coord{i}"), keys, coord_creds, i,
                               TAPESTRY_CHAOS_BARRIER=f"{barrier},2") for i in range(2)]
  for p in procs:
    assert p.finish() == 0, p.text()[-3000:]
  logs = [p.text() for p in procs]
  for r in range(ROUNDS + 1):
    for log in logs:
      assert f"chaos: 2 coordinators at the create of rounds/round_{r:06d}/COMMIT" in log
    lost = [log for log in logs if f"rounds/round_{r:06d} was committed by another "
                                   f"coordinator" in log]
    assert len(lost) == 1, f"round {r}: {len(lost)} coordinators lost the race"
  records = []
  for i in range(2):
    with open(tmp_path / f"coord{i}" / "coordinator" / "rounds.jsonl") as f:
      records.append({rec["round"]: rec for rec in map(json.loads, f)})
  for r in range(1, ROUNDS + 1):
    ours = sorted(rec[r]["committed_by_us"] for rec in records)
    assert ours == [False, True], f"round {r}: committed_by_us {ours}"
    assert records[0][r]["sites"] == records[1][r]["sites"] == list(SITES)
    assert records[0][r]["weights"] == records[1][r]["weights"]

  root = trust.TrustRoot.from_config(config)
  assert exchange.read_latest(glob) == ROUNDS
  for r in range(ROUNDS + 1):
    prefix = exchange.global_prefix(r)
    manifest = exchange.read_manifest(glob, prefix)
    root.verify(manifest, federation.COORDINATOR)
    assert _digests(glob, r) == reference[r], f"global round {r} differs from the uninterrupted run"
    losers = exchange.uncommitted_attempts(glob, prefix)
    assert len(losers) == 1 and losers[0] != manifest["attempt"], (r, losers)
    if r:  # Each round's base is the one committed round before it.
      assert manifest["extra"]["base_manifest_sha256"] == exchange.manifest_digest(
          exchange.read_manifest(glob, exchange.global_prefix(r - 1)))


# ------------------------------------------------------------------ 2. transient storage faults

# TensorStore's backoff before retry k (from 0) of a failing S3 request, as buckets.py
# configures it: 0.2 s x 2^k, capped at 5 s, plus a random jitter of up to 0.2 s.
def _backoff_s(k: int) -> float:
  return min(0.2 * 2**k, 5.0)


JITTER_S = 0.2


def _put_ok(proxy: fault_proxy.FaultProxy, path: str) -> int:
  """How many PUTs of `path` the store itself accepted (whatever the client heard)."""
  return len([e for e in proxy.entries("PUT", path) if e.status == 200])


def test_a_request_that_keeps_failing_is_retried_with_bounded_jittered_backoff(s3, creds):
  """Must not be lost: the bound on how long one storage operation can hang. A store
  that answers 503 to every request: the write fails after exactly max_retries retries,
  with one clear error naming the key; the gaps between tries follow the exponential
  backoff (0.2 s x 2^k) plus a jitter of at most 0.2 s that varies from try to try."""
  retries = 4
  with fault_proxy.FaultProxy(s3.port, rules=[fault_proxy.Rule("503")]) as proxy:
    b = buckets.Bucket(proxy.url("site-latin", "perm"), max_retries=retries,
                       credentials=creds["latin"])
    t0 = time.monotonic()
    with pytest.raises(buckets.BucketError) as e:
      b.write("k", b"never lands")
    elapsed = time.monotonic() - t0
  msg = str(e.value)
  assert "s3://site-latin/perm/k" in msg and f"All {retries} retry attempts failed" in msg, msg
  assert "the store kept answering with errors" in msg and "ServiceUnavailable" in msg, msg
  assert "\n" not in msg, msg
  tries = proxy.entries("PUT", "/site-latin/perm/k")
  assert len(tries) == retries + 1 and all(t.fault == "503" for t in tries)
  extra = [b.t - a.t - _backoff_s(k) for k, (a, b) in enumerate(zip(tries, tries[1:]))]
  assert all(-0.01 < x < JITTER_S + 0.5 for x in extra), extra  # 0.5 s: a loaded machine.
  # Uniform jitter in [0, 0.2 s] averages 0.1 s; four tries average under 0.015 s with
  # probability 3e-4. (Scheduling delays on a loaded machine add to it, too.)
  assert np.mean(extra) > 0.015 and max(extra) - min(extra) > 0.005, f"no jitter: {extra}"
  bound = sum(_backoff_s(k) + JITTER_S for k in range(retries))
  assert elapsed < bound + 2.0, (elapsed, bound)


def _faults_by_kind(proxy: fault_proxy.FaultProxy) -> dict[str, int]:
  out: dict[str, int] = {}
  for e in proxy.log:
    if e.fault:
      out[e.fault] = out.get(e.fault, 0) + 1
  return out


def _retried(proxy: fault_proxy.FaultProxy) -> None:
  """Every request that got a fault was sent again (the client retried it)."""
  log = list(proxy.log)
  for i, e in enumerate(log):
    if e.fault:
      assert any(later.method == e.method and later.path == e.path for later in log[i + 1:]), \
          f"{e.method} {e.path} got {e.fault} and was never retried"


def test_a_lost_answer_to_an_array_create_is_retried_not_fatal(s3, creds):
  """Must not be lost: an upload. The create-only write of a zarr array's metadata
  lands, but its answer is lost: TensorStore's retry finds the metadata there
  (ALREADY_EXISTS). A site's `write_arrays` and the merge's BlockWriter open what they
  created and finish; the arrays read back, verified, equal to what was written."""
  rule = fault_proxy.Rule("lost", "PUT", r"/zarr.json$", times=1)
  with fault_proxy.FaultProxy(s3.port, rules=[rule]) as proxy:
    b = buckets.Bucket(proxy.url("site-latin", "lost-create"), max_retries=3,
                       credentials=creds["latin"])
    x = np.arange(48, dtype=np.float32).reshape(6, 8)
    records = exchange.write_arrays(b, "a/site", {"x": x})
    writer = exchange.BlockWriter(b, "a/merge", "y", x.shape, x.dtype, (3, 8))
    writer.wait(writer.write((slice(0, 6), slice(0, 8)), x))
    records["y"] = writer.finish()
    lost = [e.path for e in proxy.log if e.fault == "lost"]
    assert len(lost) == 2 and all(p.endswith("/zarr.json") for p in lost), lost
    for prefix, name in (("a/site", "x"), ("a/merge", "y")):
      got = exchange.read_block(b, prefix, name, records[name], (slice(0, 6), slice(0, 8)))
      np.testing.assert_array_equal(got, x)


def test_parties_under_transient_storage_faults_retry_and_lose_nothing(
    s3, creds, keys, reference, tmp_path):
  """Must not be lost: any round, and the rule that a round is committed once. The sites
  publish every update, and a coordinator process runs the federation, each through a
  proxy that answers about one request in ten (seeded) with 429 or 503, resets the
  connection before or after the store applied the request, truncates the answer's
  body, or (the coordinator's) stalls longer than its curl low-speed window (set to 1 s
  through the variable buckets.py reads); the first PUT of every COMMIT loses its
  answer. Every fault was retried; the store accepted each COMMIT exactly once (a retry
  of a lost COMMIT finds it and knows it as its own); the coordinator exits 0 and every
  global round equals the fault-free run's bit for bit; a site reads every global round
  back through its faulty proxy, verified."""
  kinds = ("429", "503", "reset", "lost", "truncate")  # Not "short": see the test below.
  lost_commits = dict(kind="lost", method="PUT", path=r"/COMMIT$", times=1)
  # Stalls (each costs a low-speed window and a backoff) only where named: the first
  # reads of round 1's updates and the first write of round 1's manifest.
  stalls = [fault_proxy.Rule("stall", "GET", r"/updates/round_000001/COMMIT$", times=1),
            fault_proxy.Rule("stall", "PUT", r"/rounds/round_000001/a-\w+/manifest.json$",
                             times=1)]
  # tests/chaos.py reruns this test with other schedules.
  seed = int(os.environ.get("TAPESTRY_CHAOS_SEED", "1"))
  rate = float(os.environ.get("TAPESTRY_CHAOS_RATE", "0.1"))
  with fault_proxy.FaultProxy(s3.port, seed=seed, rate=rate, kinds=kinds,
                              rules=[fault_proxy.Rule(**lost_commits)]) as to_sites, \
       fault_proxy.FaultProxy(s3.port, seed=seed + 1, rate=rate, kinds=kinds, stall_s=2.5,
                              rules=[fault_proxy.Rule(**lost_commits), *stalls]) as to_coord:
    config = _config(keys, _s3_urls(to_sites, "faults"))
    _publish_updates(config, keys, {n: buckets.Bucket(config.sites[n].bucket, max_retries=4,
                                                      credentials=creds[n]) for n in SITES})
    coord_config = _config(keys, _s3_urls(to_coord, "faults"))
    proc = _Party(coord_config, str(tmp_path / "coord"), keys,
                               creds["coordinator"], 0,
                               TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS="1")
    assert proc.finish(180) == 0, proc.text()[-3000:]
    # A site's read path under the same faults: LATEST, then every global round, its
    # signature and every chunk's digest checked as it is read.
    site_glob = buckets.Bucket(config.federation.global_bucket, max_retries=4,
                               credentials=creds["latin"])
    assert exchange.newer_global_round(site_glob, 0) == ROUNDS
    root, shardings = trust.TrustRoot.from_config(config), _shardings(config)
    for r in range(ROUNDS + 1):
      _, manifest = exchange.read_global(site_glob, config, r, shardings, root=root,
                                         last_round=r - 1 if r else None)
      assert {n: rec["digest"] for n, rec in manifest["arrays"].items()} == reference[r]

  for proxy, want_kinds in ((to_sites, set(kinds)), (to_coord, {*kinds, "stall"})):
    seen = _faults_by_kind(proxy)
    assert want_kinds <= set(seen), f"never injected: {want_kinds - set(seen)} ({seen})"
    _retried(proxy)
  commits = {e.path for p in (to_sites, to_coord) for e in p.entries("PUT", r"/COMMIT$")}
  assert len(commits) == len(SITES) * ROUNDS + ROUNDS + 1, sorted(commits)
  for path in commits:
    proxy = to_coord if path.startswith("/global/") else to_sites
    assert _put_ok(proxy, path) == 1, f"{path}: the store accepted {_put_ok(proxy, path)} PUTs"
  glob = buckets.Bucket(s3.url(federation.GLOBAL, "faults"), max_retries=2,
                        credentials=creds["coordinator"])
  assert exchange.read_latest(glob) == ROUNDS
  for r in range(ROUNDS + 1):
    assert _digests(glob, r) == reference[r], f"global round {r} differs from the fault-free run"
    assert exchange.uncommitted_attempts(glob, exchange.global_prefix(r)) == []


def test_a_permanent_storage_fault_ends_each_cli_with_one_error_line_within_its_bound(
    s3, creds, keys, tmp_path):
  """Must not be lost: the operator's time. Behind a store that answers every request
  with 503, a coordinator process and a site process each stop with exit status 2 and
  one `error:` line that names the bucket, the operation and the store's answer, after
  exactly federation.storage_retries retries of their first operation (counted at the
  proxy), within the backoff bound docs/trust.md states from that operation's first
  request to the process's exit."""
  retries = 3
  bound = sum(_backoff_s(k) + JITTER_S for k in range(retries)) + 8.0  # + exiting
  for party in (federation.COORDINATOR, "latin"):
    with fault_proxy.FaultProxy(s3.port, rules=[fault_proxy.Rule("503")]) as proxy:
      config = _config(keys, _s3_urls(proxy, "down"), storage_retries=retries)
      p = _Party(config, str(tmp_path / party), keys, creds[party], party=party)
      try:
        p.proc.wait(120)
      except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"{party} did not give up within 120 s") from None
      end = time.monotonic()
    text = p.text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert p.proc.returncode == 2 and len(errors) == 1, f"{party}: exit " \
        f"{p.proc.returncode}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert re.search(r"^error: bucket s3://[a-z-]+/down\S*: .*cannot \w+ .*: the store kept "
                     r"answering with errors \(ABORTED: All \d+ retry attempts failed: "
                     r"ServiceUnavailable", errors[0]), errors[0]
    assert f"All {retries} retry attempts failed" in errors[0], errors[0]
    tries = proxy.entries()
    assert len(tries) == retries + 1, [(e.method, e.path) for e in tries]
    assert len({(e.method, e.path) for e in tries}) == 1, "more than one operation failed"
    assert end - tries[0].t < bound, (party, end - tries[0].t, bound)


@pytest.mark.parametrize("kind, path, error", [
    ("short", r"/COMMIT$", r"COMMIT is not a commit marker"),
    ("short", r"/manifest.json$", r"manifest.json does not match COMMIT"),
    ("short", r"/arrays/[^?]+/zarr.json$", r"array '[^']+' .*cannot open"),
    ("short", r"/arrays/[^?]+/c/[0-9/]+$", r"array '[^']+' .*read failed"),
    ("corrupt", r"/arrays/[^?]+/c/[0-9/]+$", r"array '[^']+' .*chunk \(0, 0\) is corrupt \(blake3"),
], ids=["short-commit", "short-manifest", "short-metadata", "short-chunk", "corrupt-chunk"])
def test_a_body_truncated_under_a_matching_length_is_refused_with_a_clear_error(
    s3, creds, keys, kind, path, error):
  """Must not be lost: the bytes of a round. A middlebox that cuts an answer's body
  short and fixes its Content-Length up to match, or flips a bit of a chunk (HTTP sees
  neither), on the reads of a committed update's COMMIT, manifest, array metadata or
  chunk: the coordinator's reader refuses it with an ExchangeError that names the round
  (and the array), in one line; it never returns the damaged data."""
  config = _config(keys, _s3_urls(s3, "short"))
  latin = buckets.Bucket(config.sites.latin.bucket, max_retries=2, credentials=creds["latin"])
  prefix = exchange.update_prefix(1)
  if exchange.read_manifest(latin, prefix) is None:  # Once for all the cases.
    signer = trust.Signer.from_file("latin", os.path.join(keys, "latin.key"))
    exchange.publish_update(latin, config, "latin", 1, 0, _deltas(1)["latin"],
                            federation.weight_cap(config), {}, signer=signer)
  with fault_proxy.FaultProxy(s3.port, rules=[fault_proxy.Rule(kind, "GET", path)]) as proxy:
    b = buckets.Bucket(proxy.via(config.sites.latin.bucket), max_retries=2,
                       credentials=creds["coordinator"])
    with pytest.raises(exchange.ExchangeError, match=error) as e:
      manifest = exchange.read_manifest(b, prefix)
      exchange.read_arrays(b, prefix, manifest, {
          n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in manifest["arrays"]})
  assert [x.fault for x in proxy.log if x.fault] and "updates/round_000001" in str(e.value)
  assert "\n" not in str(e.value)


def test_a_coordinator_cut_off_from_the_sites_mid_run_gives_up_in_bound_and_resumes_exactly(
    s3, creds, keys, reference, tmp_path):
  """Must not be lost: the rounds before the outage and after it. A coordinator process
  whose every request for round 2's updates fails (503) after it published round 1
  keeps polling, then ends with exit status 2 and one `error:` line (the round missed
  its quorum; the latest global round stays 1) within round_timeout_s plus one pass over
  the sites' buckets, each read failing after storage_retries retries. Restarted once
  the store answers again, it publishes round 2, equal to an uninterrupted run's."""
  retries, timeout_s = 3, 3.0
  outage = fault_proxy.Rule("503", path=r"/updates/round_000002/")
  with fault_proxy.FaultProxy(s3.port, rules=[outage]) as proxy:
    config = _config(keys, _s3_urls(proxy, "outage"), storage_retries=retries,
                     round_timeout_s=timeout_s)
    direct = _config(keys, _s3_urls(s3, "outage"), storage_retries=retries,
                     round_timeout_s=timeout_s)
    _publish_updates(direct, keys, {n: buckets.Bucket(direct.sites[n].bucket, max_retries=2,
                                                      credentials=creds[n]) for n in SITES})
    workdir = str(tmp_path / "coord")
    proc = _Party(config, workdir, keys, creds["coordinator"])
    assert proc.finish() == 2, proc.text()[-3000:]
  errors = [line for line in proc.text().splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.text(), proc.text()[-3000:]
  assert re.search(r"round 2 reached 0 of quorum 2 updates in \d+ s; missing sites: "
                   r"\['cyrillic', 'latin'\]; the latest global round stays 1", errors[0]), errors
  first = next(e.t for e in proxy.log if "/updates/round_000002/" in e.path)
  last = proxy.log[-1].t
  op_bound = sum(_backoff_s(k) + JITTER_S for k in range(retries)) + 1.0
  assert last - first < timeout_s + len(SITES) * op_bound + 1.0, last - first
  glob = buckets.Bucket(direct.federation.global_bucket, max_retries=2,
                        credentials=creds["coordinator"])
  assert exchange.read_latest(glob) == 1
  assert exchange.read_manifest(glob, exchange.global_prefix(2)) is None

  proc = _Party(direct, workdir, keys, creds["coordinator"], 1)
  assert proc.finish() == 0, proc.text()[-3000:]
  assert exchange.read_latest(glob) == ROUNDS
  for r in range(ROUNDS + 1):
    assert _digests(glob, r) == reference[r], f"global round {r} differs from the uninterrupted run"
