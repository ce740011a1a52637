"""Key rotation and revocation: the trust root changes only by trust-root updates signed
with the federation's root key, each from a round on. What must not be lost: that only a
party's key for a round signs that round (an old or revoked key is refused from its round
on, with a clear error), and that the whole run still audits across the change (earlier
rounds verify with the keys they were signed with). A forged update changes nothing."""

import json
import logging
import os
import subprocess
import sys

import jax
import pytest

import fed_fakes

from tapestry_jax import audit
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import trust

SITES = fed_fakes.SITES
# The federation's root key, held offline by its governance (one per test process).
ROOT_KEY = trust.generate_private_key()
ROOT = trust.Signer(trust.ROOT_PARTY, ROOT_KEY)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(rounds=3, quorum=2):
  c = fed_fakes.config(rounds=rounds, quorum=quorum)
  c.federation.trust.root_key = trust.public_key_text(ROOT_KEY)
  return c


def _publish(config, workdir, site, round_, signer, seed=None):
  """`site`'s update for `round_`, trained from round_ - 1, signed by `signer`."""
  return exchange.publish_update(
      fed_fakes.bucket(config, workdir, site), config, site, round_, round_ - 1,
      fed_fakes.delta(100 * round_ + SITES.index(site) if seed is None else seed),
      federation.weight_cap(config), {}, signer=signer)


def _new_key(tmp_path, party):
  """A fresh key pair for `party`: (its signer, the key file, its public key text)."""
  key = trust.generate_private_key()
  path = str(tmp_path / f"{party}.new.key")
  trust.write_private_key(path, key)
  return trust.Signer(party, key), path, trust.public_key_text(key)


def _publish_key_update(config, workdir, party, from_round, new_key, signer=ROOT) -> dict:
  """Signs (with `signer`) and publishes the next trust-root update in the global bucket."""
  glob = fed_fakes.bucket(config, workdir, federation.GLOBAL)
  root = trust.TrustRoot.from_config(config)
  exchange.refresh_trust(root, glob)
  record = trust.key_update(signer, root, party, from_round, new_key)
  exchange.publish_trust_update(glob, record)
  return record


def _rejections(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and "rejected update" in r.getMessage()]


def _inputs(config, workdir, round_):
  return [i["site"] for i in fed_fakes.read_round(config, workdir, round_)[0]["extra"]["inputs"]]


def _audit_all(config, workdir, rounds):
  reports = audit.audit_federation(config, str(workdir), rounds)
  assert all(r["identical"] for r in reports), audit.verdict(reports)
  return reports


def test_a_site_key_rotated_at_a_round_boundary_and_the_whole_run_audits(tmp_path, caplog):
  """greek's key is rotated from round 2 on. Its round-2 update signed with the old key is
  refused (named: a rotated key); round 3, signed with the new key, is merged; every round,
  0 to 3, audits bit-identically (round 1 with the old key, round 3 with the new)."""
  config = _config()
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.publish_initial()
  for n in SITES:
    _publish(config, tmp_path, n, 1, fed_fakes.signer(n))
  coord.run_round(1)

  new_signer, new_path, new_text = _new_key(tmp_path, "greek")
  record = _publish_key_update(config, tmp_path, "greek", 2, new_text)
  assert record["old_key"] == config.federation.trust.public_keys.greek
  caplog.set_level(logging.WARNING)
  for n in SITES:  # greek still signs with its old key.
    _publish(config, tmp_path, n, 2, fed_fakes.signer(n))
  coord.run_round(2)
  assert _inputs(config, tmp_path, 2) == ["cyrillic", "latin"]
  old_id = fed_fakes.signer("greek").key_id
  (msg,) = _rejections(caplog)
  assert ("rejected update of site greek" in msg and f"manifest of 'greek' for round 2 is "
          f"signed with its key {old_id}, which is not its key for that round "
          f"({new_signer.key_id}, from round 2 on, by trust-root update #1): a rotated key"
          in msg), msg

  for n in SITES:
    _publish(config, tmp_path, n, 3, new_signer if n == "greek" else fed_fakes.signer(n))
  coord.run_round(3)
  assert _inputs(config, tmp_path, 3) == list(SITES)
  reports = _audit_all(config, tmp_path, [0, 1, 2, 3])
  keys = {r["round"]: {i["site"]: i["signature"] for i in r["inputs"]} for r in reports}
  assert keys[1]["greek"] == f"ok (key {old_id})"
  assert keys[3]["greek"] == f"ok (key {new_signer.key_id})"
  # A site restarted with its new key passes the startup check (through the log); a key the
  # trust root never gave it does not.
  glob = fed_fakes.bucket(config, tmp_path, federation.GLOBAL)
  log = exchange.read_trust_updates(glob)
  federation.party_trust(config, "greek", str(tmp_path), new_path, updates=log)
  with pytest.raises(federation.ConfigError, match=r"party 'greek': the private key given "
                                                   r"for party 'greek' does not match"):
    federation.party_trust(config, "greek", str(tmp_path), new_path, updates=[])


def test_a_revoked_key_is_refused_from_its_round_on_and_earlier_rounds_still_audit(tmp_path,
                                                                                   caplog):
  """latin's key is found compromised after round 2 was merged, and revoked from round 2
  on: round 1 still audits, round 2 (which merged latin's update) no longer does (named:
  revoked), and the coordinator refuses latin's round-3 update; round 3 audits."""
  config = _config()
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.publish_initial()
  for r in (1, 2):
    for n in SITES:
      _publish(config, tmp_path, n, r, fed_fakes.signer(n))
    coord.run_round(r)
  _audit_all(config, tmp_path, [1, 2])

  _publish_key_update(config, tmp_path, "latin", 2, None)
  _audit_all(config, tmp_path, [0, 1])
  with pytest.raises(audit.AuditError, match=r"update of site latin for round 2 would be "
                                             r"refused: bad signature: party 'latin''s key is "
                                             r"revoked from round 2 on \(trust-root update #1\)"):
    audit.audit_round(config, str(tmp_path), 2)

  caplog.set_level(logging.WARNING)
  for n in SITES:
    _publish(config, tmp_path, n, 3, fed_fakes.signer(n))
  coord.run_round(3)
  assert _inputs(config, tmp_path, 3) == ["cyrillic", "greek"]
  (msg,) = _rejections(caplog)
  assert "site latin" in msg and "party 'latin''s key is revoked from round 2 on" in msg, msg
  _audit_all(config, tmp_path, [3])


def _shardings(config):
  mcfg = model_lib.ModelConfig.from_config(config.model)
  abstract = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, abstract)


def _resign(glob, prefix, signer):
  """Re-signs committed round `prefix` with `signer`, COMMIT rewritten to match."""
  manifest = exchange.read_manifest(glob, prefix)
  forged = signer.sign(manifest)
  data = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
  glob.write(f"{exchange.data_prefix(prefix, manifest)}/{exchange.MANIFEST}", data)
  glob.write(f"{prefix}/{exchange.COMMIT}", json.dumps(
      {"attempt": manifest["attempt"], "manifest_sha256": exchange.manifest_digest(forged)},
      sort_keys=True, separators=(",", ":")).encode())


def test_the_coordinator_key_rotated_sites_verify_each_round_with_its_key(tmp_path):
  """The coordinator's key is rotated from round 2 on and the coordinator restarted with
  the new key: a site verifies round 1 (old key) and round 2 (new key); round 2 signed
  with the old key is refused; the run audits across the change."""
  config = _config(rounds=2, quorum=0)
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.publish_initial()
  for n in SITES:
    _publish(config, tmp_path, n, 1, fed_fakes.signer(n))
  coord.run_round(1)
  new_signer, new_path, new_text = _new_key(tmp_path, federation.COORDINATOR)
  _publish_key_update(config, tmp_path, federation.COORDINATOR, 2, new_text)
  coord = coord_lib.Coordinator(config, str(tmp_path), private_key=new_path)
  for n in SITES:
    _publish(config, tmp_path, n, 2, fed_fakes.signer(n))
  coord.run_round(2)

  glob = coord.glob
  shardings = _shardings(config)
  site_root = trust.TrustRoot.from_config(config, live=True)  # Learns the log on reading.
  for r in (1, 2):
    exchange.read_global(glob, config, r, shardings, root=site_root)
  assert exchange.read_manifest(glob, exchange.global_prefix(2))["signature"]["key_id"] == \
      new_signer.key_id
  _audit_all(config, tmp_path, [0, 1, 2])

  _resign(glob, exchange.global_prefix(2), fed_fakes.signer(federation.COORDINATOR))
  with pytest.raises(exchange.ExchangeError,
                     match=r"refusing the global model: manifest of 'coordinator' for round 2 "
                           r"is signed with its key [0-9a-f]{16}, which is not its key for "
                           r"that round \([0-9a-f]{16}, from round 2 on, by trust-root update "
                           r"#1\): a rotated key"):
    exchange.read_global(glob, config, 2, shardings, root=trust.TrustRoot.from_config(config))


def test_a_forged_or_tampered_trust_root_update_is_refused_by_every_party(tmp_path):
  """Refused: an update signed by another key than the root key (here the coordinator's,
  posing as the root), one altered after signing, one for another federation, one out of
  order, any update when no root key is configured, and a log that lost a record. Every
  reader refuses: the coordinator at startup, a site reading a round, the audit."""
  config = _config(rounds=1, quorum=0)
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.publish_initial()
  glob = coord.glob
  _, _, new_text = _new_key(tmp_path, "latin")
  root = trust.TrustRoot.from_config(config)

  def refused(record, match, cfg=config):
    with pytest.raises(trust.TrustError, match=match):
      trust.TrustRoot.from_config(cfg).apply_updates([record])

  impostor = trust.Signer(trust.ROOT_PARTY, fed_fakes.signer(federation.COORDINATOR).key)
  with pytest.raises(trust.TrustError, match=r"not the federation's root key"):
    trust.key_update(impostor, root, "latin", 1, new_text)
  forged = impostor.sign(trust.key_update(ROOT, root, "latin", 1, new_text))
  refused(forged, r"trust-root update #1 is signed by unknown key '[0-9a-f]{16}', not "
                  r"'trust-root''s key")
  with pytest.raises(trust.TrustError, match=r"signed by party 'trust-root'"):
    trust.key_update(fed_fakes.signer("greek"), root, "latin", 1, new_text)
  good = trust.key_update(ROOT, root, "latin", 1, new_text)
  refused(dict(good, new_key=trust.public_key_text(fed_fakes.signer("greek").key)),
          r"trust-root update #1: the signature does not verify")
  refused(ROOT.sign(dict(good, federation="another")), r"is for federation 'another'")
  refused(ROOT.sign(dict(good, seq=2)), r"trust-root update #1 says it is #2")
  refused(ROOT.sign(dict(good, old_key=new_text)), r"which is not its current key")
  unrooted = _config()
  unrooted.federation.trust.root_key = ""
  refused(good, r"federation.trust.root_key is not set", unrooted)
  shrunk = trust.TrustRoot.from_config(config)
  shrunk.apply_updates([good])
  with pytest.raises(trust.TrustError, match=r"holds 0 updates, fewer than the 1 already"):
    shrunk.apply_updates([])

  # The forged update in the global bucket: every party refuses the log, nobody adopts it.
  exchange.publish_trust_update(glob, forged)
  with pytest.raises(exchange.ExchangeError, match=r"already published"):
    exchange.publish_trust_update(glob, good)  # Create-only: not replaced.
  with pytest.raises(federation.ConfigError, match=r"party 'coordinator': trust-root update "
                                                   r"#1 is signed by unknown key"):
    fed_fakes.coordinator(config, tmp_path)
  with pytest.raises(exchange.ExchangeError, match=r"refusing the trust-root log: trust-root "
                                                   r"update #1 is signed by unknown key"):
    exchange.read_global(glob, config, 0, _shardings(config),
                         root=trust.TrustRoot.from_config(config, live=True))
  with pytest.raises(audit.AuditError, match=r"refusing the trust-root log"):
    audit.audit_round(config, str(tmp_path), 0)
  # A gap in the log (update #1 removed, #2 left).
  glob.delete(exchange.trust_update_key(1))
  glob.write(exchange.trust_update_key(2), json.dumps(good).encode())
  with pytest.raises(exchange.ExchangeError, match=r"the trust-root log has a gap: update #1 "
                                                   r"is missing"):
    exchange.read_trust_updates(glob)


def test_launch_keygen_makes_the_root_key_and_publishes_a_key_change(tmp_path):
  """`launch.keygen --party=trust-root` prints the root_key line; `--change_key` publishes
  a rotation every reader applies; the same with another key than the root key is one
  line and exit status 2, and publishes nothing."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)

  def keygen(*args):
    return subprocess.run([sys.executable, "-m", "launch.keygen", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)

  made = keygen("--party=trust-root", f"--out={tmp_path}/root")
  assert made.returncode == 0, made.stderr[-2000:]
  root_line = made.stdout.strip().splitlines()[-1]
  assert root_line.startswith("--config.federation.trust.root_key=ed25519:"), made.stdout
  assert keygen("--party=latin", f"--out={tmp_path}/new").returncode == 0
  config = fed_fakes.config()
  config.federation.trust.root_key = root_line.split("=", 1)[1]
  args = ["--config=experiments/configs/federation.py:tiny+fedavg/latin,cyrillic,greek",
          root_line, f"--workdir={tmp_path}", "--change_key=latin", "--from_round=3",
          f"--new_key={tmp_path}/new/latin.pub"]
  args += [f"--config.federation.trust.public_keys.{p}={k}"
           for p, k in config.federation.trust.public_keys.items()]

  stranger = trust.keygen(str(tmp_path / "stranger"), trust.ROOT_PARTY)[0]
  refused = keygen(*args, f"--root_key={stranger}")
  assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
      f"error: file://{tmp_path}/buckets/global: refusing to publish the trust-root update: "
      f"this key is not the federation's root key (federation.trust.root_key)"], refused.stderr
  out = keygen(*args, f"--root_key={tmp_path}/root/trust-root.key")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "published trust-root update #1" in out.stdout, out.stdout

  glob = fed_fakes.bucket(config, tmp_path, federation.GLOBAL)
  root = trust.TrustRoot.from_config(config)
  exchange.refresh_trust(root, glob)
  new_text = open(tmp_path / "new" / "latin.pub").read().strip()
  assert trust.public_key_text(root.key_for("latin", 3)) == new_text
  assert root.key_for("latin", 2) is root.keys["latin"]  # Before round 3: the configured key.
