"""Retention (federation.retention.keep_rounds): which rounds the policy keeps, that the
collector removes old rounds and uncommitted attempts but never a round a site may still
read (a slow site paused in the middle of reading one, a site restarting from its
checkpoint), and that the audit reports collected rounds instead of failing on them."""
import functools
import os
import threading

import jax
import numpy as np
import pytest

from experiments.configs import federation as fed_config
import fed_fakes

from tapestry_jax import audit
from tapestry_jax import buckets
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import preemption
from tapestry_jax import retention
from tapestry_jax import site as site_lib
from tapestry_jax import trust
from tapestry_jax.exchange import store
from tapestry_jax.validate import ConfigError

SITES = fed_fakes.SITES


def test_the_policy_keeps_the_last_k_rounds_and_every_round_a_site_may_resume_from():
  committed = list(range(10))
  markers = {"a": 9, "b": 9}
  assert retention.collectable(committed, 9, 3, markers) == [0, 1, 2, 3, 4, 5, 6]
  assert retention.collectable(committed, 9, 1, markers) == list(range(9))  # LATEST stays.
  # A slow site's marker holds back everything from its round on.
  assert retention.collectable(committed, 9, 3, {"a": 9, "b": 4}) == [0, 1, 2, 3]
  assert retention.floor(9, 3, {"a": 9, "b": 4}) == 4
  # A site without a marker (not started, or one that does not verify) keeps every round;
  # so does keep_rounds 0 (off, the default).
  assert retention.collectable(committed, 9, 3, {"a": 9, "b": None}) == []
  assert retention.collectable(committed, 9, 0, markers) == []
  assert retention.collectable(committed, 1, 5, markers) == []  # Fewer rounds than K.


def test_keep_rounds_must_be_a_non_negative_integer():
  cfg = fed_fakes.config()
  assert retention.keep_rounds(cfg) == 0  # The default: keep everything.
  for bad in (-1, 1.5, True):
    cfg.federation.retention = {"keep_rounds": bad}
    with pytest.raises(ConfigError, match=r"federation.retention.keep_rounds=.* must be an "
                                          r"integer >= 0"):
      federation.check_federation_config(cfg)  # Up front, before any party starts.


def _mark(cfg, workdir, site: str, round_: int) -> None:
  """What site `site` writes after its checkpoints: the oldest global round it may read."""
  retention.write_resume(fed_fakes.bucket(cfg, workdir, site), cfg, site, round_,
                         fed_fakes.signer(site))


def _global_rounds(cfg, workdir) -> list[int]:
  return exchange.committed_rounds(fed_fakes.bucket(cfg, workdir, federation.GLOBAL), "global")


def _round_keys(cfg, workdir, round_: int) -> list[str]:
  return fed_fakes.bucket(cfg, workdir, federation.GLOBAL).list(exchange.global_prefix(round_) + "/")


def test_a_slow_site_mid_read_keeps_its_round_while_the_collector_runs(tmp_path, monkeypatch):
  """keep_rounds=1, quorum 2: site latin verified global round 1's manifest and is paused
  before reading its arrays (its marker says 1) while greek and cyrillic go on alone to
  round 5 and the coordinator collects after every round. Round 0 goes, latin's round 1
  and everything after it stay, and latin's read completes, every chunk verified; a stray
  attempt of a committed round goes, the attempt of the round in flight stays. Once latin
  moves its marker on, the rounds before the last one go, and the audit reports them as
  collected and audits the rest bit for bit."""
  cfg = fed_fakes.config(rounds=5, quorum=2)
  cfg.federation.retention.keep_rounds = 1
  wd = str(tmp_path)
  coord = fed_fakes.coordinator(cfg, wd)
  coord.publish_initial()
  for s in SITES:
    _mark(cfg, wd, s, 0)
  for s in SITES:
    fed_fakes.publish(cfg, wd, s, 1, fed_fakes.delta(10 + SITES.index(s)))
  coord.run_round(1)
  reports = [coord.collect()]  # Every marker says 0: nothing goes.
  _mark(cfg, wd, "latin", 1)  # Latin's checkpoint is trained from round 1...

  paused, release, done = threading.Event(), threading.Event(), {}
  read_arrays = store.read_arrays

  def slow_read(*args, **kwargs):  # ... and it is slow to read round 1's arrays.
    if threading.current_thread().name == "latin":
      paused.set()
      assert release.wait(60)
    return read_arrays(*args, **kwargs)

  monkeypatch.setattr(store, "read_arrays", slow_read)
  glob = fed_fakes.bucket(cfg, wd, federation.GLOBAL)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0])
               for n in federation.param_schema(cfg)}
  reader = fed_fakes.start_party(done, "latin", lambda: exchange.read_global_round(
      glob, cfg, 1, shardings, root=trust.TrustRoot.from_config(cfg), last_round=1))
  assert paused.wait(60)

  for r in range(2, 6):
    for s in ("cyrillic", "greek"):
      fed_fakes.publish(cfg, wd, s, r, fed_fakes.delta(10 * r + SITES.index(s)))
      _mark(cfg, wd, s, r - 1)
    if r == 3:  # Garbage of a beaten coordinator in round 2; one in flight for round 4.
      glob.write(f"{exchange.global_prefix(2)}/a-00000000000000aa/manifest.json", b"{}")
      glob.write(f"{exchange.global_prefix(4)}/a-00000000000000bb/manifest.json", b"{}")
    coord.run_round(r)
    reports.append(coord.collect())
    if r == 3:
      assert not any("a-00000000000000aa" in k for k in _round_keys(cfg, wd, 2))
      assert any("a-00000000000000bb" in k for k in _round_keys(cfg, wd, 4))  # In flight.

  release.set()
  reader.join(60)
  assert not isinstance(done["latin"], BaseException), done["latin"]
  params, _, manifest = done["latin"]  # Read in full, every chunk checked.
  assert manifest["round"] == 1
  assert [(x["floor"], x["rounds"], x["attempts"]) for x in reports] == [
      (0, [], 0), (1, [0], 0), (1, [], 1), (1, [], 1), (1, [], 0)]  # 4 committed: bb goes.
  assert _global_rounds(cfg, wd) == [1, 2, 3, 4, 5]
  want = fed_fakes.read_round(cfg, wd, 1)[1]
  for n, v in params.items():
    np.testing.assert_array_equal(np.asarray(v), want[f"params/{n}"], err_msg=n)

  _mark(cfg, wd, "latin", 5)  # Latin adopted round 5 and checkpointed after it.
  assert coord.collect()["rounds"] == [1, 2, 3]  # Greek and cyrillic mark round 4.
  assert _global_rounds(cfg, wd) == [4, 5] and _round_keys(cfg, wd, 3) == []
  assert retention.collected_below(glob, cfg, coord.root) == 4
  # Each site collects its own updates at or below the floor (the coordinator may not).
  # (Not above its own marker either: a restart may look at those, `site._unsaved_base`.)
  greek = fed_fakes.bucket(cfg, wd, "greek")
  assert retention.collect_updates(greek, glob, cfg, "greek", 2, coord.root)["rounds"] == [1, 2]
  assert exchange.committed_rounds(greek, "update") == [3, 4, 5]
  retention.collect_updates(greek, glob, cfg, "greek", 4, coord.root)
  assert exchange.committed_rounds(greek, "update") == [5]

  shown = []
  reports = audit.audit_federation(cfg, wd, echo=shown.append)
  assert [r["round"] for r in reports] == [5] and reports[0]["identical"]
  assert "global rounds 0..4: collected by retention" in shown[0]
  with pytest.raises(audit.AuditError, match="retention .* collected the global rounds below 4"):
    audit.audit_round(cfg, wd, 4)


def test_a_missing_or_forged_marker_keeps_every_round(tmp_path):
  """A site that has not marked yet, or whose marker is not signed by its key (written by
  someone else with access to its bucket), may still need any round: nothing goes."""
  cfg = fed_fakes.config(rounds=3)
  cfg.federation.retention.keep_rounds = 1
  wd = str(tmp_path)
  coord = fed_fakes.coordinator(cfg, wd)
  coord.publish_initial()
  for r in (1, 2, 3):
    for s in SITES:
      fed_fakes.publish(cfg, wd, s, r, fed_fakes.delta(r))
    coord.run_round(r)
  _mark(cfg, wd, "cyrillic", 3)
  _mark(cfg, wd, "greek", 3)
  assert coord.collect()["rounds"] == []  # Latin has no marker.
  latin = fed_fakes.bucket(cfg, wd, "latin")
  forged = trust.Signer("latin", trust.generate_private_key())
  retention.write_resume(latin, cfg, "latin", 3, forged)
  assert retention.read_resume(latin, cfg, "latin", coord.root) is None
  assert coord.collect()["rounds"] == []
  latin.write(retention.RESUME, b"not json")
  assert coord.collect()["rounds"] == []
  _mark(cfg, wd, "latin", 3)
  assert coord.collect()["rounds"] == [0, 1, 2]
  assert _global_rounds(cfg, wd) == [3]


H = 2  # Inner steps per round in the deployed test.


class _StopLatinOnce:
  """A `preemption.Preemption` that stops site latin's thread once, at step H + 1 (the
  first step it trains from global round 1), as a SIGTERM there would."""
  fired = False

  def __init__(self):
    self.stopped = False
    self.mine = threading.current_thread().name == "latin" and not _StopLatinOnce.fired

  def should_stop(self, step: int) -> bool:
    if self.mine and step == H + 1:
      self.stopped = _StopLatinOnce.fired = True
    return self.stopped

  def close(self):
    pass


def test_a_site_restarting_from_its_checkpoint_after_collection_resumes(tmp_path, monkeypatch):
  """Deployed parties (threads sharing only file:// buckets), keep_rounds=1, quorum 1:
  site latin is preempted at the first step it trains from global round 1 (its
  checkpoint: round 1, not yet published); cyrillic then runs alone to round 4 while the
  coordinator collects after every round. Latin's marker keeps round 1: latin restarts
  from its checkpoint, reads round 1 again and completes. The next collection, with both
  sites' markers moved on, removes round 0."""
  config = fed_config.get_config("tiny+fedavg/latin,cyrillic")
  f = config.federation
  f.rounds, f.inner_steps, f.quorum, f.eval_every = 4, H, 1, 100
  f.poll_s, f.deadline_s, f.round_timeout_s, f.compare_alone = 0.01, 0.0, 300.0, False
  f.retention.keep_rounds = 1
  config.train.update(global_batch_size=8, warmup_steps=2, eval_batches=1)
  config.data.seq_len, config.data.synthetic.num_documents = 32, 100
  workdir = str(tmp_path)
  trust.ensure_local_keys(config, os.path.join(workdir, "keys"), federation.party_names(config))
  devices = {"latin": jax.devices()[:1], "cyrillic": jax.devices()[1:2]}
  monkeypatch.setattr(site_lib.preemption, "Preemption", _StopLatinOnce)
  out = {}
  party = functools.partial(fed_fakes.start_party, out)
  site = lambda n: party(n, lambda: site_lib.run_site(config, n, workdir,  # noqa: E731
                                                       devices=devices[n]))

  coordinator = party("coordinator", coord_lib.Coordinator(config, workdir).run)
  site("latin").join(600)
  assert isinstance(out.get("latin"), preemption.Preempted), out
  site("cyrillic").join(600)
  coordinator.join(600)
  for name in ("cyrillic", "coordinator"):
    assert not isinstance(out[name], BaseException), (name, out[name])

  latin = site("latin")  # Restarts from its checkpoint of global round 1.
  latin.join(600)
  assert not isinstance(out["latin"], BaseException), out["latin"]
  assert [(r["global_round"], r.get("resumed_at_step")) for r in out["latin"]] == \
      [(1, 1), (4, None)]
  # Latin's marker (round 0: its newest durable checkpoint before the one of round 1)
  # held every round while it was away.
  assert [r["retention"]["floor"] for r in out["coordinator"]] == [0, 0, 0, 0]

  glob = buckets.Bucket(federation.bucket_urls(config, workdir)[federation.GLOBAL])
  assert exchange.committed_rounds(glob, "global") == [0, 1, 2, 3, 4]
  assert coord_lib.Coordinator(config, workdir).run() == []  # A rerun after the last round.
  assert exchange.committed_rounds(glob, "global") == [1, 2, 3, 4]  # It collected round 0.
