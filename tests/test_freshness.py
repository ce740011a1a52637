"""Freeze and replay over time: every manifest carries a signed timestamp, and the trust
root an expiry. What must not be lost: a site never trains from a global round signed
longer ago than federation.trust.max_global_age_s (a frozen or replaying coordinator),
while clocks that differ within federation.trust.max_clock_skew_s are tolerated; nothing
is verified by a running party under an expired trust root. The audit judges each round
by the dates it was signed with, never by today's clock: old rounds still audit. Clocks
are injected (no test sleeps)."""

import json
import os
import time

import jax
import pytest

import fed_fakes

from tapestry_jax import audit
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import site as site_lib
from tapestry_jax import trust

SITES = fed_fakes.SITES
T0 = 1_900_000_000.0  # 2030-03-17: when the coordinator signed, in these tests.


def _shardings(config):
  mcfg = model_lib.ModelConfig.from_config(config.model)
  abstract = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, abstract)


def _signer(party, t):
  """`party`'s signer whose clock reads `t`."""
  return trust.Signer(party, fed_fakes.signer(party).key, clock=lambda: t)


def _publish(config, workdir, site, round_, t):
  return exchange.publish_update(
      fed_fakes.bucket(config, workdir, site), config, site, round_, round_ - 1,
      fed_fakes.delta(100 * round_ + SITES.index(site)), federation.weight_cap(config), {},
      signer=_signer(site, t))


def _federate(config, workdir, t0, rounds=2):
  """Rounds 0..`rounds`, the coordinator signing round r at t0 + 60 r, sites 30 s before."""
  coord = fed_fakes.coordinator(config, workdir)
  now = [t0]  # The coordinator's clock, for signing and verifying.
  coord.signer.clock = coord.root.clock = lambda: now[0]
  coord.publish_initial()
  for r in range(1, rounds + 1):
    for n in SITES:
      _publish(config, workdir, n, r, t0 + 60 * r - 30)
    now[0] = t0 + 60 * r
    coord.run_round(r)
  return coord


def test_a_site_refuses_a_stale_global_round_and_tolerates_clock_skew(tmp_path):
  """Round 0 signed at T0, bound 600 s, skew 60 s: a site whose clock reads up to 660 s
  later adopts it, 661 s later refuses it (frozen coordinator); a site clock 60 s behind
  (the round dated in its future) adopts it, 61 s behind refuses it. Bound 0: no age
  limit (the old behaviour). The coordinator likewise refuses an update dated beyond the
  skew in its future."""
  config = fed_fakes.config(quorum=2)
  config.federation.trust.max_global_age_s = 600.0
  config.federation.trust.max_clock_skew_s = 60.0
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.signer.clock = lambda: T0
  coord.publish_initial()
  assert exchange.read_manifest(coord.glob, exchange.global_prefix(0))["signed_at"] == \
      "2030-03-17T17:46:40.000Z"
  shardings = _shardings(config)

  def read(now, cfg=config):
    root = trust.TrustRoot.from_config(cfg, live=True, clock=lambda: now)
    return exchange.read_global(coord.glob, cfg, 0, shardings, root=root)

  read(T0 + 660)  # Within the bound plus the skew.
  read(T0 - 60)  # The coordinator's clock 60 s ahead.
  read0 = coord.glob.bytes_read
  with pytest.raises(exchange.StaleRoundError,
                     match=r"rounds/round_000000: global round 0 was signed at "
                           r"2030-03-17T17:46:40.000Z, 661 s ago: older than "
                           r"federation.trust.max_global_age_s=600 \(\+ max_clock_skew_s=60\); "
                           r"a frozen or replaying coordinator\?"):
    read(T0 + 661)
  assert coord.glob.bytes_read - read0 < 100_000  # Refused before the arrays are read.
  with pytest.raises(exchange.ExchangeError,
                     match=r"refusing the global model: manifest of 'coordinator' is signed at "
                           r"2030-03-17T17:46:40.000Z, 61 s in this party's future: more than "
                           r"federation.trust.max_clock_skew_s=60"):
    read(T0 - 61)
  unbounded = fed_fakes.config()
  unbounded.federation.trust.max_global_age_s = 0.0
  read(T0 + 10 ** 7, unbounded)

  # An update dated an hour in the coordinator's future (every other clock the real one).
  workdir = tmp_path / "real_clocks"
  coord = fed_fakes.coordinator(config, workdir)
  coord.publish_initial()
  now = time.time()
  for n in SITES:
    _publish(config, workdir, n, 1, now + (3600 if n == "greek" else 0))
  coord.run_round(1)
  assert [i["site"] for i in fed_fakes.read_round(config, workdir, 1)[0]["extra"]["inputs"]] \
      == ["cyrillic", "latin"]


def test_a_deployed_site_refuses_a_frozen_coordinators_round(tmp_path):
  """A coordinator frozen an hour ago (its last round signed then): the deployed site
  (`run_site`, the real clock) stops with the stale-round error before training on it."""
  config = fed_fakes.config(rounds=1)
  config.federation.trust.max_global_age_s = 600.0
  config.federation.site_wait_s = 5.0
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.signer.clock = lambda: time.time() - 3600
  coord.publish_initial()
  with pytest.raises(exchange.StaleRoundError, match=r"global round 0 was signed at .*, 36\d\d s "
                                                     r"ago: older than federation.trust."
                                                     r"max_global_age_s=600"):
    site_lib.run_site(config, "latin", str(tmp_path),
                      private_key=os.path.join(fed_fakes.KEYS, "latin.key"))


def test_an_expired_trust_root_is_refused_and_rounds_signed_before_it_still_audit(tmp_path):
  """The trust root expires at E (in the past now). Rounds signed before E audit
  bit-identically today, even with an age bound of 60 s (not applied to history). A
  running party refuses to start or verify under it; a round signed after E does not
  audit."""
  expiry = time.time() - 3600
  t0 = expiry - 1000
  config = fed_fakes.config()
  _federate(config, tmp_path, t0)

  expired = fed_fakes.config()
  expired.federation.trust.expires_at = trust.utc_text(expiry)
  expired.federation.trust.max_global_age_s = 60.0
  reports = audit.audit_federation(expired, str(tmp_path), [0, 1, 2])
  assert all(r["identical"] for r in reports)

  with pytest.raises(federation.ConfigError,
                     match=r"party 'coordinator': the trust root expired at .*Z "
                           r"\(federation.trust.expires_at\): nothing is verified under it"):
    fed_fakes.coordinator(expired, tmp_path)
  live = trust.TrustRoot.from_config(expired, live=True)
  with pytest.raises(exchange.ExchangeError, match=r"the trust root expired at"):
    exchange.read_global(fed_fakes.bucket(expired, tmp_path, federation.GLOBAL), expired, 2,
                         _shardings(expired), root=live)
  # The clock rewound before E: a running party verifies again.
  live.clock = lambda: expiry - 1
  exchange.read_global_manifest(fed_fakes.bucket(expired, tmp_path, federation.GLOBAL),
                                exchange.global_prefix(2), live)

  _resign(fed_fakes.bucket(config, tmp_path, federation.GLOBAL), exchange.global_prefix(2),
          _signer(federation.COORDINATOR, expiry + 1))
  with pytest.raises(audit.AuditError, match=r"global round 2: manifest of 'coordinator' was "
                                             r"signed at .*, after the trust root expired at"):
    audit.audit_round(expired, str(tmp_path), 2)
  with pytest.raises(trust.TrustError, match=r"federation.trust.expires_at '2030-01-01' is not "
                                             r"an ISO-8601 UTC time .*end it with 'Z'"):
    expired.federation.trust.expires_at = "2030-01-01"
    trust.TrustRoot.from_config(expired)


def _resign(glob, prefix, signer):
  """Re-signs committed round `prefix` with `signer`, COMMIT rewritten to match."""
  manifest = exchange.read_manifest(glob, prefix)
  forged = signer.sign(manifest)
  data = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
  glob.write(f"{exchange.data_prefix(prefix, manifest)}/{exchange.MANIFEST}", data)
  glob.write(f"{prefix}/{exchange.COMMIT}", json.dumps(
      {"attempt": manifest["attempt"], "manifest_sha256": exchange.manifest_digest(forged)},
      sort_keys=True, separators=(",", ":")).encode())


def test_the_audit_refuses_rounds_whose_dates_go_backwards(tmp_path):
  """Round 2 re-dated (validly signed by the coordinator) before its base round: the audit
  names it; round 2 dated before an input it merged is refused too; the skew is allowed."""
  config = fed_fakes.config()
  _federate(config, tmp_path, T0)
  glob = fed_fakes.bucket(config, tmp_path, federation.GLOBAL)
  prefix = exchange.global_prefix(2)
  coordinator = federation.COORDINATOR
  # Round 1 is dated T0 + 60, round 2's inputs T0 + 90: within the 300 s skew of both.
  _resign(glob, prefix, _signer(coordinator, T0 + 90 - 300))
  assert audit.audit_round(config, str(tmp_path), 2)["identical"]
  _resign(glob, prefix, _signer(coordinator, T0 + 60 - 301))
  with pytest.raises(audit.AuditError, match=r"global round 2 is dated .*, before its base "
                                             r"round 1 \(.*\): dates go backwards"):
    audit.audit_round(config, str(tmp_path), 2)
  config.federation.trust.max_clock_skew_s = 0.0
  _resign(glob, prefix, _signer(coordinator, T0 + 70))
  with pytest.raises(audit.AuditError, match=r"update of site cyrillic for round 2 is dated "
                                             r".*, after the global round merged from it"):
    audit.audit_round(config, str(tmp_path), 2)


@pytest.mark.parametrize("field, value, message", [
    ("max_global_age_s", -1.0, r"federation.trust.max_global_age_s must be seconds >= 0, got -1.0"),
    ("max_clock_skew_s", float("nan"), r"federation.trust.max_clock_skew_s must be seconds >= 0"),
    ("expires_at", "2030-01-01T00:00:00+02:00", r"federation.trust.expires_at "
                                                r"'2030-01-01T00:00:00\+02:00' is not an ISO-8601 "
                                                r"UTC time"),
    ("expires_at", "next year", r"federation.trust.expires_at 'next year' is not an ISO-8601"),
])
def test_bad_time_settings_are_one_clear_error(tmp_path, field, value, message):
  config = fed_fakes.config()
  config.federation.trust[field] = value
  with pytest.raises(federation.ConfigError, match=r"party 'latin': " + message):
    federation.party_trust(config, "latin", str(tmp_path),
                           os.path.join(fed_fakes.KEYS, "latin.key"))
