"""Faults the federation must survive, each with what it must not lose.

A site process SIGKILLed while it trains, while it publishes and while its checkpoint is
written (a real `launch.site` process, stopped at each point by tests/paused_site.py,
against an in-process coordinator, compared with an uninterrupted run computed here), two coordinators racing on one round, an update replayed into a
later round, a rolled-back or foreign-signed global round on the site's side, and an
upload that stopped half-way. Everything runs on file:// buckets.
"""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import fed_fakes

from experiments.configs import federation as fed_config
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax import site as site_lib
from tapestry_jax import trees
from tapestry_jax import trust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = fed_fakes.SITES

_config, _coordinator, _delta = fed_fakes.config, fed_fakes.coordinator, fed_fakes.delta
_bucket, _read_arrays, _read_round = fed_fakes.bucket, fed_fakes.read_arrays, fed_fakes.read_round


def _publish(config, workdir, site: str, round_: int, delta) -> dict:
  """Commits `delta` as `site`'s honest update for `round_` (signed with its own key)."""
  return exchange.publish_update(
      _bucket(config, workdir, site), config, site, round_, round_ - 1, delta,
      federation.weight_cap(config), {},
      signer=fed_fakes.signer(site))


def _reference(config, rounds) -> dict:
  """Global params after whole-tree `outer.outer_step`s; `rounds`: [(deltas, weights)]."""
  tx = outer_config.make_outer_optimizer(config.federation.outer)
  params, state = coord_lib.initial_round(config)
  for deltas, weights in rounds:
    params, state = outer.outer_step(tx, params, state, deltas, weights)
  return jax.device_get(params)


def _assert_params_equal(arrays, params):
  for name, want in params.items():
    np.testing.assert_array_equal(arrays[f"params/{name}"], want, err_msg=name)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _capture_logs(caplog):
  caplog.set_level(logging.INFO)


# ------------------------------------------------------------------ 1. a site killed and restarted

# One site (quorum 1, so the coordinator moves on as soon as the site publishes), four
# rounds of 24 inner steps (with overlap, 12 of them after the round is adopted: a
# half-way point to stop at either way).
SITE_OVERRIDES = {
    "federation.rounds": 4, "federation.inner_steps": 24, "federation.poll_s": 0.02,
    "federation.deadline_s": 0.0, "federation.round_timeout_s": 300.0,
    "federation.eval_every": 100, "federation.compare_alone": False,
    "train.global_batch_size": 8, "train.warmup_steps": 2, "train.eval_batches": 1,
    "data.seq_len": 64, "data.synthetic.num_documents": 200,
}


def _site_config(overlap_steps: int = 0):
  c = fed_config.get_config("tiny+fedavg/latin")
  for k, v in {**SITE_OVERRIDES, "federation.overlap_steps": overlap_steps}.items():
    *path, last = k.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = v
  return c


class _SiteProcess:
  """`python -m launch.site` for site latin, in a process group of its own (so SIGKILL
  reaches nothing else); the log is WORKDIR/logs/latin.N.log. With `pause_at`
  (tests/paused_site.py: "train:STEP", "publish:ROUND" or "checkpoint:STEP") the same
  site stops for good at that point and says so in WORKDIR/logs/pause.N.json."""

  def __init__(self, config, workdir, run: int, pause_at: str = ""):
    args = [f"--config={ROOT}/experiments/configs/federation.py:tiny+fedavg/latin",
            *[f"--config.{k}={v}" for k, v in SITE_OVERRIDES.items()],
            f"--config.federation.overlap_steps={config.federation.overlap_steps}",
            *[f"--config.federation.trust.public_keys.{p}={k}"
              for p, k in config.federation.trust.public_keys.items()],
            f"--workdir={workdir}", "--site=latin"]
    # The test process's compilation cache: a restart (and this test's reference run)
    # skips XLA compilation. Cached executables compute what fresh ones do.
    cache = jax.config.jax_compilation_cache_dir
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               **({"JAX_COMPILATION_CACHE_DIR": cache,
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"} if cache else {}))
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    self.log = os.path.join(workdir, "logs", f"latin.{run}.log")
    self.pause_file = os.path.join(workdir, "logs", f"pause.{run}.json")
    main = ["-m", "launch.site"]
    if pause_at:
      main = [os.path.join(ROOT, "tests", "paused_site.py")]
      env.update(PAUSE_AT=pause_at, PAUSE_FILE=self.pause_file)
    with open(self.log, "w") as log:
      self.proc = subprocess.Popen([sys.executable, *main, *args], cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)

  def tail(self) -> str:
    with open(self.log, errors="replace") as f:
      return "".join(f.readlines()[-25:])

  def until(self, what: str, cond, timeout_s: float = 240.0) -> None:
    """Polls `cond` every millisecond while the site runs."""
    t0 = time.monotonic()
    while not cond():
      assert self.proc.poll() is None, f"site exited ({self.proc.returncode}) before {what}:\n" \
                                       f"{self.tail()}"
      if time.monotonic() - t0 > timeout_s:
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
      time.sleep(0.001)

  def kill(self) -> None:
    os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait()

  def kill_when_paused(self) -> dict:
    """SIGKILLs the site once it has stopped at its pause point; returns what it said."""
    self.until("its pause point", lambda: os.path.exists(self.pause_file))
    self.kill()
    with open(self.pause_file) as f:
      return json.load(f)

  def finish(self, timeout_s: float = 240.0) -> None:
    try:
      rc = self.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"site did not finish in {timeout_s} s:\n{self.tail()}") from None
    assert rc == 0, f"site exited with {rc}:\n{self.tail()}"


def _checkpoints(site_dir) -> list[int]:
  """Finalised checkpoint steps (Orbax renames a step's tmp directory to its number last)."""
  path = os.path.join(site_dir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _unfinished_checkpoints(site_dir) -> list[str]:
  """Orbax's temporary directories of checkpoints not finalised (STEP.orbax-checkpoint-tmp*)."""
  path = os.path.join(site_dir, "checkpoints")
  return sorted(d for d in os.listdir(path) if not d.isdigit()) if os.path.isdir(path) else []


@pytest.mark.parametrize("overlap_steps", [0, 12], ids=["no_overlap", "overlap"])
def test_a_site_killed_mid_steps_mid_publish_and_mid_checkpoint_resumes_exactly(
    tmp_path, overlap_steps):
  """Must not be lost: the site's data position (no batch skipped or trained twice from
  another position), its train state, and the federation's result. A site SIGKILLed
  (a) half-way through a round's inner steps, (b) half-way through writing its update's
  arrays (no manifest, no COMMIT) and (c) after its update's COMMIT, half-way through
  writing that round's checkpoint (the coordinator has meanwhile moved on to the next
  round), restarted on the same workdir each time, trains every round exactly once from
  the right data position: each committed update, the final global model, the final
  train state and the next batch of its data equal an uninterrupted run's bit for bit;
  every update is accepted (named in the global round's inputs); tokens add up to
  rounds x H x batch x seq_len. Each kill lands in its phase on every run: the site stops
  there for good (tests/paused_site.py) and the test asserts the phase from the site's
  checkpoints and bucket before it goes on. With federation.overlap_steps (tau=12 of
  H=24), a site publishes in the background while it trains tau steps ahead and
  checkpoints when it joins that exchange, at step r x H + tau: kill (a) lands after it
  carried those steps onto global round 1, (b) while it trains ahead of round 2's
  exchange, and (c) before global round 3, whose replay carries them onto it again."""
  config = _site_config(overlap_steps)
  f = config.federation
  rounds, h = int(f.rounds), int(f.inner_steps)
  tokens_per_round = h * int(config.train.global_batch_size) * int(config.data.seq_len)
  workdir = str(tmp_path / "fed")
  trust.ensure_local_keys(config, os.path.join(workdir, "keys"), federation.party_names(config))
  coord = coord_lib.Coordinator(config, workdir)
  coord_out = {}

  def run_coordinator():
    try:
      coord_out["records"] = coord.run()
    except BaseException as e:  # noqa: BLE001  (reported by the main thread)
      coord_out["error"] = e

  coordinator = threading.Thread(target=run_coordinator, daemon=True)
  coordinator.start()
  glob, own = coord.glob, coord.sites["latin"]
  site_dir = os.path.join(workdir, "sites", "latin")
  committed = lambda r: own.exists(f"{exchange.update_prefix(r)}/{exchange.COMMIT}")
  # With overlap, a published round's checkpoint is the state trained tau steps ahead.
  offset = overlap_steps

  # (a) Mid-inner-steps: half-way through the phase trained from global round 1, which
  # starts at the round-1 checkpoint (step H + tau). Nothing of it is on disk: the
  # checkpoints end at that step and the site's bucket has no byte of round 2's update.
  said = _SiteProcess(config, workdir, 0, f"train:{h + offset}").kill_when_paused()
  assert said["phase_start"] < said["step"] < said["phase_start"] + said["phase_steps"], said
  assert _checkpoints(site_dir) == [h + offset] and not _unfinished_checkpoints(site_dir)
  assert committed(1) and not own.list(exchange.update_prefix(2))

  # (b) Mid-publish: the restarted site trains that phase again and is killed half-way
  # through writing round 2's arrays: some are in its bucket, the rest, the manifest and
  # the COMMIT are not, and its checkpoints still end at step H + tau.
  said = _SiteProcess(config, workdir, 1, "publish:2").kill_when_paused()
  keys = own.list(exchange.update_prefix(2))
  stored = {n for n in said["arrays"] if any(f"/arrays/{n}/" in k for k in keys)}
  assert 0 < len(said["written"]) < len(said["arrays"]) and stored == set(said["written"]), \
      (said, keys)
  assert not any(k.endswith((exchange.COMMIT, exchange.MANIFEST)) for k in keys), keys
  assert _checkpoints(site_dir) == [h + offset]

  # (c) Mid-checkpoint: killed after round 3's COMMIT, with that round's checkpoint begun
  # (Orbax's temporary directory holds its data position) and not finalised.
  said = _SiteProcess(config, workdir, 2, f"checkpoint:{3 * h + offset}").kill_when_paused()
  assert committed(3) and not own.list(exchange.update_prefix(4))
  assert 3 * h + offset not in _checkpoints(site_dir), _checkpoints(site_dir)
  assert [d.split(".")[0] for d in _unfinished_checkpoints(site_dir)] == [str(3 * h + offset)]
  assert said["written"], said
  # The coordinator does not wait for the site's checkpoint: global round 3 is committed
  # while the site is down, so the restarted site must not simply train from LATEST.
  deadline = time.monotonic() + 60
  while exchange.read_latest(glob) != 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  assert exchange.read_latest(glob) == 3

  site = _SiteProcess(config, workdir, 3)
  site.finish()
  coordinator.join(60)
  assert not coordinator.is_alive(), "the coordinator did not finish"
  assert "error" not in coord_out, coord_out.get("error")
  assert exchange.read_latest(glob) == rounds

  # Every update was accepted: the global round names it by its manifest digest.
  root = trust.TrustRoot.from_config(config)
  updates = {}
  for r in range(1, rounds + 1):
    g = exchange.read_manifest(glob, exchange.global_prefix(r))
    root.verify(g, federation.COORDINATOR)
    updates[r] = exchange.read_manifest(own, exchange.update_prefix(r))
    assert [(i["site"], i["manifest_sha256"]) for i in g["extra"]["inputs"]] == [
        ("latin", exchange.manifest_digest(updates[r]))], r
    assert updates[r]["base_round"] == r - 1 and updates[r]["extra"]["step"] == r * h, r
  assert sum(exchange.read_manifest(glob, exchange.global_prefix(r))["tokens"]
             for r in range(1, rounds + 1)) == rounds * tokens_per_round

  # The site's own records: every round trained once from its own position (a round in
  # the records twice, trained again after a kill, ends at the same step).
  with open(os.path.join(site_dir, "rounds.jsonl")) as fh:
    records = [json.loads(line) for line in fh]
  trained = [r for r in records if "step" in r]
  assert {r["global_round"] for r in trained} == set(range(rounds))
  for r in trained:
    assert r["step"] == (r["global_round"] + 1) * h and r["tokens"] == tokens_per_round, r
  assert [r["global_round"] for r in records if "eval_loss" in r][-1] == rounds

  # The uninterrupted run: the same site, here, never killed, under the same outer steps.
  tx = outer_config.make_outer_optimizer(f.outer)
  params, state = coord_lib.initial_round(config)
  ref = site_lib.SiteWorker(config, "latin", str(tmp_path / "ref"))
  weights = outer.cap_weights([tokens_per_round], federation.weight_cap(config))
  for g in range(rounds):
    ahead = overlap_steps if g > 0 else 0  # Trained from what it sent, then carried.
    if ahead:
      ref.train(ahead)
    ref.adopt(trees.unflatten(params, ref.trainer.param_shardings), carry=ahead > 0)
    ref.train(h - ahead)
    if overlap_steps and g + 1 < rounds:
      ref.keep_sent()
    delta = trees.flatten(jax.device_get(ref.delta()))
    got = _read_arrays(own, exchange.update_prefix(g + 1), updates[g + 1])
    for name, want in delta.items():
      np.testing.assert_array_equal(got[name], want, err_msg=f"update of round {g + 1}: {name}")
    params, state = jax.device_get(outer.outer_step(tx, params, state, [delta], weights))
  _assert_params_equal(_read_round(config, workdir, rounds)[1], params)

  # The last checkpoint holds the uninterrupted run's train state and data position.
  resumed = site_lib.SiteWorker(config, "latin", site_dir, trainer=ref.trainer)
  meta = resumed.restore()
  assert (meta["base_round"], meta["steps_done"], meta["published"]) == (rounds - 1, h, True)
  assert int(resumed.state.step) == int(ref.state.step) == rounds * h
  for name, want in trees.flatten(jax.device_get(ref.state.params)).items():
    np.testing.assert_array_equal(np.asarray(trees.flatten(resumed.state.params)[name]), want,
                                  err_msg=name)
  want_batch, got_batch = next(ref.train_iter), next(resumed.train_iter)
  for k in want_batch:
    np.testing.assert_array_equal(got_batch[k], want_batch[k], err_msg=k)
  resumed.close()
  ref.close()


# ------------------------------------------------------------------ 2. two coordinators race


def test_two_coordinators_racing_on_a_round_commit_it_exactly_once(tmp_path, caplog):
  """Must not be lost: a single, verifiable round 1. Two coordinators (same config, key
  and buckets) run round 1 at once and both reach the create-only COMMIT write together:
  exactly one commits, the other logs that another coordinator committed first and
  returns the committed round's sites and weights with `committed_by_us` False; LATEST is
  1; the round verifies and equals the outer step; the loser's attempt is garbage that
  `uncommitted_attempts` lists."""
  config = _config(rounds=1)
  deltas = {n: _delta(200 + i) for i, n in enumerate(SITES)}
  for n in SITES:
    _publish(config, tmp_path, n, 1, deltas[n])
  coords = [_coordinator(config, tmp_path) for _ in range(2)]
  coords[0].publish_initial()
  # Both wait at the COMMIT write until the other has got there too (past the cheap
  # `exists` early-out, manifests written): the create-only write alone decides.
  barrier = threading.Barrier(2, timeout=60)
  for c in coords:
    create = c.glob.create

    def racing_create(key, data, create=create):
      if key.endswith(exchange.COMMIT):
        barrier.wait()
      return create(key, data)

    c.glob.create = racing_create
  results = [None, None]

  def run(i):
    try:
      results[i] = coords[i].run_round(1)
    except BaseException as e:  # noqa: BLE001
      results[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert all(isinstance(r, dict) for r in results), results
  assert sorted(r["committed_by_us"] for r in results) == [False, True]
  loser = next(r for r in results if not r["committed_by_us"])
  assert loser["sites"] == list(SITES) and loser["weights"] == pytest.approx([1 / 3] * 3)
  conflicts = [m for m in _warnings(caplog) if "committed by another coordinator" in m]
  assert len(conflicts) == 1, _warnings(caplog)
  theirs, ours = re.search(r"\(attempt (a-[0-9a-f]+)\) before ours \(attempt (a-[0-9a-f]+)\)",
                           conflicts[0]).groups()

  glob = _bucket(config, tmp_path, federation.GLOBAL)
  prefix = exchange.global_prefix(1)
  assert exchange.read_latest(glob) == 1
  manifest, arrays = _read_round(config, tmp_path, 1)
  trust.TrustRoot.from_config(config).verify(manifest, federation.COORDINATOR)
  assert manifest["attempt"] == theirs
  assert exchange.uncommitted_attempts(glob, prefix) == [ours]
  _assert_params_equal(arrays, _reference(config, [([deltas[n] for n in SITES],
                                                    np.full(3, 1 / 3, np.float32))]))
  assert _coordinator(config, tmp_path).latest() == 1


# ------------------------------------------------------------------ 3. a replayed update


def test_an_update_replayed_into_a_later_round_is_rejected(tmp_path, caplog):
  """Must not be lost: freshness. greek's valid, signed round-1 update copied byte for
  byte (its COMMIT and attempt directory) into its round-2 prefix verifies and is
  committed, but round 2 refuses it, logging site, round and manifest digest, and closes
  on the quorum of the two fresh updates."""
  config = _config(rounds=2, quorum=2)
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  r1 = {n: _delta(300 + i) for i, n in enumerate(SITES)}
  old = {n: _publish(config, tmp_path, n, 1, r1[n]) for n in SITES}
  assert coord.run_round(1)["sites"] == list(SITES)

  greek = _bucket(config, tmp_path, "greek")
  p1, p2 = exchange.update_prefix(1), exchange.update_prefix(2)
  for key in greek.list(p1 + "/"):
    greek.write(p2 + key[len(p1):], greek.read(key))
  replayed = exchange.read_manifest(greek, p2)
  assert replayed == old["greek"]
  trust.TrustRoot.from_config(config).verify(replayed, "greek")  # Authentic, only stale.
  r2 = {n: _delta(310 + i) for i, n in enumerate(SITES)}
  for n in ("cyrillic", "latin"):
    _publish(config, tmp_path, n, 2, r2[n])
  caplog.clear()

  rec = coord.run_round(2)

  assert rec["sites"] == ["cyrillic", "latin"]
  digest = exchange.manifest_digest(old["greek"])[:16]
  rejected = [m for m in _warnings(caplog) if "rejected update" in m]
  assert rejected == [f"coordinator: round 2: rejected update of site greek (manifest sha256 "
                      f"{digest}): manifest round 1 != 2 (replayed from another round?)"]
  manifest, arrays = _read_round(config, tmp_path, 2)
  assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic", "latin"]
  _assert_params_equal(arrays, _reference(config, [
      ([r1[n] for n in SITES], np.full(3, 1 / 3, np.float32)),
      ([r2["cyrillic"], r2["latin"]], [0.5, 0.5])]))


# ------------------------------------------------------------------ 4. the site's side


def _shardings(config):
  mcfg = model_lib.ModelConfig.from_config(config.model)
  abstract = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, abstract)


def test_a_site_refuses_a_rollback_and_a_global_round_signed_by_an_unknown_key(tmp_path,
                                                                                caplog):
  """Must not be lost: the site's trust in what it trains from. With global rounds 0..3
  committed, a site that trained from round 3 refuses round 2 (RollbackError), its loop
  does not adopt a LATEST rewound to 1 (logged once: 'refusing rollback'), and a round
  re-signed by a key outside the trust root (manifest and COMMIT rewritten to match) is
  refused with a message that names the unknown key."""
  config = _config(rounds=3, quorum=1)
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  for r in (1, 2, 3):
    _publish(config, tmp_path, "latin", r, _delta(400 + r))
    coord.run_round(r)
  glob = _bucket(config, tmp_path, federation.GLOBAL)
  shardings = _shardings(config)
  root = trust.TrustRoot.from_config(config)
  exchange.read_global(glob, config, 3, shardings, root=root, last_round=2)  # Forward: fine.

  read0 = glob.bytes_read
  with pytest.raises(exchange.RollbackError,
                     match=r"global round 2 is older than round 3, which this site already "
                           r"trained from; refusing to roll back"):
    exchange.read_global(glob, config, 2, shardings, root=root, last_round=3)
  assert glob.bytes_read == read0  # Refused before reading anything.

  # LATEST rewound by a faulty or hostile writer of the global bucket.
  glob.write(exchange.LATEST, json.dumps({"kind": "global", "round": 1}).encode())
  caplog.clear()
  assert exchange.newer_global_round(glob, 3) is None
  assert exchange.newer_global_round(glob, 3) is None
  refusals = [m for m in _warnings(caplog) if "refusing rollback" in m]
  assert len(refusals) == 1 and "LATEST names global round 1, older than round 3" in \
      refusals[0], _warnings(caplog)
  assert exchange.newer_global_round(glob, 0) == 1  # A newer round is still adopted.

  # Round 3 re-signed by a key nobody put in the trust root, COMMIT rewritten to match.
  prefix = exchange.global_prefix(3)
  manifest = exchange.read_manifest(glob, prefix)
  stranger = trust.generate_private_key()
  forged = trust.Signer(federation.COORDINATOR, stranger).sign(manifest)
  data = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
  glob.write(f"{exchange.data_prefix(prefix, manifest)}/{exchange.MANIFEST}", data)
  glob.write(f"{prefix}/{exchange.COMMIT}", json.dumps(
      {"attempt": manifest["attempt"], "manifest_sha256": exchange.manifest_digest(forged)},
      sort_keys=True, separators=(",", ":")).encode())
  assert exchange.read_manifest(glob, prefix) == forged  # Well-formed and committed.
  with pytest.raises(exchange.ExchangeError,
                     match=r"rounds/round_000003: refusing the global model: manifest of "
                           r"'coordinator' is signed by unknown key '[0-9a-f]{16}', not "
                           r"'coordinator''s key"):
    exchange.read_global(glob, config, 3, shardings, root=root, last_round=2)


# ------------------------------------------------------------------ 5. an upload cut short


@pytest.mark.parametrize("cut", ["mid-arrays", "at-manifest", "at-commit"])
def test_an_upload_cut_short_is_ignored_and_the_round_closes_on_quorum(tmp_path, caplog,
                                                                       monkeypatch, cut):
  """Must not be lost: the rule that only a commit marker makes an update exist. greek's
  upload stopped after some of its arrays, or inside `publish_update` as it wrote its
  manifest or created its COMMIT (the manifest landed, the marker did not): the
  coordinator reads not a byte of it, closes round 1 on the quorum of the two committed
  updates, and the global round's inputs name only those (by their committed manifests'
  digests)."""
  config = _config(rounds=1, quorum=2, deadline_s=0.2)
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  deltas = {n: _delta(500 + i) for i, n in enumerate(SITES)}
  committed = {n: _publish(config, tmp_path, n, 1, deltas[n]) for n in ("cyrillic", "latin")}
  greek = _bucket(config, tmp_path, "greek")
  prefix = exchange.update_prefix(1)
  attempt = exchange.new_attempt("greek/1/0")
  if cut == "mid-arrays":
    names = sorted(deltas["greek"])
    exchange.write_arrays(greek, exchange.data_prefix(prefix, attempt),
                          {n: deltas["greek"][n] for n in names[:len(names) // 2]})
  else:  # The process dies inside publish_update, at the manifest's write or COMMIT's create.
    method, name = ("write", exchange.MANIFEST) if cut == "at-manifest" else ("create",
                                                                             exchange.COMMIT)
    real = getattr(greek, method)

    def killed(key, *args, **kwargs):
      if key.endswith("/" + name):
        raise KeyboardInterrupt(f"killed at {name}")
      return real(key, *args, **kwargs)

    monkeypatch.setattr(greek, method, killed)
    with pytest.raises(KeyboardInterrupt, match=f"killed at {name}"):
      exchange.publish_update(greek, config, "greek", 1, 0, deltas["greek"],
                              federation.weight_cap(config), {},
                              signer=fed_fakes.signer("greek"))
    assert greek.exists(f"{exchange.data_prefix(prefix, attempt)}/{exchange.MANIFEST}") == (
        cut == "at-commit")
  assert greek.list(f"{prefix}/{attempt}/") and exchange.read_manifest(greek, prefix) is None

  rec = coord.run_round(1)

  assert rec["sites"] == ["cyrillic", "latin"]
  assert any("round 1 closes on quorum 2/3; missing: ['greek']" in m
             for m in _warnings(caplog)), _warnings(caplog)
  assert not [m for m in _warnings(caplog) if "rejected" in m], _warnings(caplog)
  assert coord.sites["greek"].bytes_read == 0  # Not a byte of the partial upload.
  manifest, arrays = _read_round(config, tmp_path, 1)
  assert [(i["site"], i["manifest_sha256"]) for i in manifest["extra"]["inputs"]] == [
      (n, exchange.manifest_digest(committed[n])) for n in ("cyrillic", "latin")]
  _assert_params_equal(arrays, _reference(config, [
      ([deltas["cyrillic"], deltas["latin"]], [0.5, 0.5])]))
  # The partial attempt stays garbage: uncommitted, and named by no global round.
  assert exchange.uncommitted_attempts(greek, prefix) == [attempt]
  glob = _bucket(config, tmp_path, federation.GLOBAL)
  for r in exchange.committed_rounds(glob, "global"):
    m = exchange.read_manifest(glob, exchange.global_prefix(r))
    assert all(i["site"] != "greek" for i in m["extra"]["inputs"]), r
