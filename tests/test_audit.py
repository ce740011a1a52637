"""Audit: every committed global round is recomputed, bit for bit, from the signed inputs
it names; a dishonest merge or a swapped input is caught and named."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from experiments.configs import federation as fed_config
from tapestry_jax import audit
from tapestry_jax import buckets
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import merge as merge_lib
from tapestry_jax import outer
from tapestry_jax import trust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = ("cyrillic", "greek", "latin")
_KEYS = tempfile.mkdtemp(prefix="tapestry-audit-keys-")


def _config(**fed):
  c = fed_config.get_config("tiny+fedavg/latin,cyrillic,greek")
  f = c.federation
  f.rounds, f.poll_s, f.deadline_s, f.round_timeout_s = 2, 0.01, 0.0, 20.0
  f.outer.name, f.outer.lr, f.outer.momentum = "nesterov", 0.7, 0.9  # Stateful: a harder audit.
  for k, v in fed.items():
    f[k] = v
  trust.ensure_local_keys(c, _KEYS, federation.party_names(c))
  return c


def _signer(party):
  return trust.Signer.from_file(party, os.path.join(_KEYS, f"{party}.key"))


def _publish(config, workdir, site, round_, seed, tokens=None):
  rng = np.random.default_rng(seed)
  delta = {n: (1e-2 * rng.standard_normal(shape)).astype(dtype)
           for n, (shape, dtype) in federation.param_schema(config).items()}
  bucket = buckets.Bucket(federation.bucket_urls(config, str(workdir))[site])
  prefix = exchange.update_prefix(round_)
  attempt = exchange.new_attempt()
  records = exchange.write_arrays(bucket, exchange.data_prefix(prefix, attempt), delta)
  manifest = _signer(site).sign(exchange.make_manifest(
      federation=config.federation.id, kind="update", round=round_, author=site,
      attempt=attempt, base_round=round_ - 1,
      tokens=tokens or federation.weight_cap(config), arrays=records,
      extra={"update_norm": outer.update_norm(delta)}))
  exchange.write_manifest(bucket, prefix, manifest)


def _federate(config, workdir, tokens=None):
  for r in (1, 2):
    for i, n in enumerate(SITES):
      _publish(config, workdir, n, r, 10 * r + i, tokens=(tokens or {}).get(n))
  coord = coord_lib.Coordinator(config, str(workdir),
                                private_key=os.path.join(_KEYS, "coordinator.key"))
  coord.run()
  return coord


def test_every_round_is_recomputed_bit_identically_with_its_provenance(tmp_path):
  config = _config()
  cap = federation.weight_cap(config)
  _federate(config, tmp_path, tokens={"greek": 5 * cap, "latin": cap // 4})
  for r in (0, 1, 2):
    report = audit.audit_round(config, str(tmp_path), r)
    assert report["identical"] and report["mismatches"] == [], report
    assert report["signature"].startswith("ok (coordinator")
    assert report["stored_bytes_verified"] > 0
  assert [i["site"] for i in report["inputs"]] == list(SITES)
  assert [i["tokens"] for i in report["inputs"]] == [cap, 5 * cap, cap // 4]
  assert all(i["signature"].startswith("ok") for i in report["inputs"])
  glob = buckets.Bucket(federation.bucket_urls(config, str(tmp_path))[federation.GLOBAL])
  base = exchange.read_manifest(glob, exchange.global_prefix(1))
  assert report["base"] == {"round": 1, "manifest_sha256": exchange.manifest_digest(base)}


def test_a_dishonest_merge_signed_by_the_coordinator_is_caught(tmp_path):
  """The coordinator publishes round 2 merged with other weights than it claims (e.g.
  to favour one site): signatures and digests are all valid, the recomputation differs."""
  config = _config()
  coord = _federate(config, tmp_path)
  glob = coord.glob
  prefix = exchange.global_prefix(2)
  honest = exchange.read_manifest(glob, prefix)
  # Replace round 2 by a dishonest one (the honest one is moved away first).
  for key in glob.list(prefix + "/"):
    glob.delete(key)
  base = exchange.read_manifest(glob, exchange.global_prefix(1))
  inputs = [(coord.sites[n], exchange.update_prefix(2),
             exchange.read_manifest(coord.sites[n], exchange.update_prefix(2))) for n in SITES]
  attempt = exchange.new_attempt()
  records = merge_lib.merge_round(coord.spec, glob, exchange.global_prefix(1), base, inputs,
                                  [0.8, 0.1, 0.1], glob, exchange.data_prefix(prefix, attempt))
  exchange.write_manifest(glob, prefix, _signer("coordinator").sign(
      dict(honest, attempt=attempt, arrays=records)))

  report = audit.audit_round(config, str(tmp_path), 2)
  assert not report["identical"]
  assert "params/embed" in report["mismatches"]
  assert report["signature"].startswith("ok")  # Validly signed, and still caught.
  assert "recomputed" in audit.format_report(report)
  assert f"DIFFERS in {report['mismatches']}" in audit.format_report(report)
  assert audit.verdict([dict(report, round=1, identical=True), report]) == \
      "audited 2 rounds: rounds [2] differ"


def test_a_round_naming_a_different_update_than_the_committed_one_cannot_be_audited(tmp_path):
  config = _config()
  coord = _federate(config, tmp_path)
  # greek's committed round-2 update is replaced after the fact (its bucket is greek's):
  greek = coord.sites["greek"]
  for key in greek.list(exchange.update_prefix(2) + "/"):
    greek.delete(key)
  _publish(config, tmp_path, "greek", 2, 999)
  with pytest.raises(audit.AuditError, match=r"names update [0-9a-f]{16}\.\.\. of site greek; "
                                             r"its committed update is"):
    audit.audit_round(config, str(tmp_path), 2)
  # A round signed by someone else than the coordinator:
  glob = coord.glob
  m = exchange.read_manifest(glob, exchange.global_prefix(1))
  glob.delete(f"{exchange.global_prefix(1)}/COMMIT")
  exchange.write_manifest(glob, exchange.global_prefix(1),
                          trust.Signer("coordinator", trust.generate_private_key()).sign(m))
  with pytest.raises(audit.AuditError, match=r"global round 1: manifest of 'coordinator' is "
                                             r"signed by unknown key"):
    audit.audit_round(config, str(tmp_path), 1)


def test_audit_federation_audits_every_committed_round_and_shows_each(tmp_path):
  config = _config()
  latin = config.federation.trust.public_keys.latin
  with pytest.raises(audit.AuditError, match=r"buckets/global has no committed global round"):
    audit.audit_federation(config, str(tmp_path))
  _federate(config, tmp_path)
  config.federation.trust.public_keys.latin = ""  # Filled from the directory of .pub files.
  shown = []
  reports = audit.audit_federation(config, str(tmp_path), public_keys_dir=_KEYS,
                                   echo=shown.append)
  assert config.federation.trust.public_keys.latin == latin
  assert [r["round"] for r in reports] == [0, 1, 2] and all(r["identical"] for r in reports)
  assert shown == [audit.format_report(r) for r in reports]
  assert shown[2].startswith("global round 2 of ") and shown[2].count("\n  input ") == 3
  assert shown[2].endswith(" arrays: BIT-IDENTICAL; stored chunks verified "
                           f"({reports[2]['stored_bytes_verified']} bytes)")
  assert audit.verdict(reports) == "audited 3 rounds: all bit-identical"
  assert [r["round"] for r in audit.audit_federation(config, str(tmp_path), [1])] == [1]
  with pytest.raises(audit.AuditError, match=r"global round 7 .* is not committed"):
    audit.audit_federation(config, str(tmp_path), [7])


def test_launch_audit_prints_provenance_and_exits_0(tmp_path):
  config = _config(rounds=1)
  for i, n in enumerate(SITES):
    _publish(config, tmp_path, n, 1, i)
  coord_lib.Coordinator(config, str(tmp_path),
                        private_key=os.path.join(_KEYS, "coordinator.key")).run()
  # The trust root: one party's key as a config override, the others from their .pub files.
  keys = [f"--config.federation.trust.public_keys.latin="
          f"{config.federation.trust.public_keys.latin}", f"--public_keys_dir={_KEYS}"]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, "-m", "launch.audit", "--config=experiments/configs/federation.py:"
       "tiny+fedavg/latin,cyrillic,greek", "--config.federation.outer.name=nesterov",
       "--config.federation.outer.lr=0.7", "--config.federation.outer.momentum=0.9",
       "--config.federation.rounds=1", *keys, f"--workdir={tmp_path}",
       f"--json_out={tmp_path}/audit.json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "audited 2 rounds: all bit-identical" in out.stdout, out.stdout
  assert "input        greek: update" in out.stdout, out.stdout
  reports = json.load(open(tmp_path / "audit.json"))
  assert [r["round"] for r in reports] == [0, 1] and all(r["identical"] for r in reports)


def _publish_coded(config, workdir, site, round_, seed, edit=None):
  """`site`'s update for `round_` as a site sends it (`exchange.publish_update`: encoded
  with the config's codec, signed, its norm declared); `edit` changes the encoded leaves
  first (a hostile site signs what it likes)."""
  rng = np.random.default_rng(seed)
  delta = {n: (1e-2 * rng.standard_normal(shape)).astype(dtype)
           for n, (shape, dtype) in federation.param_schema(config).items()}
  sent = exchange.encode_update(delta, config)
  if edit is not None:
    edit(sent)
  bucket = buckets.Bucket(federation.bucket_urls(config, str(workdir))[site])
  return exchange.publish_update(bucket, config, site, round_, round_ - 1, sent,
                                 federation.weight_cap(config), extra={},
                                 signer=_signer(site))


@pytest.mark.parametrize("fed", [
    {"update_dtype": "int4", "quant_block": 64},
    {"update_dtype": "float4_e2m1fn"},
    {"update_dtype": "int8", "topk_density": 0.05},
    {"update_dtype": "float32", "topk_density": 0.05, "robust.aggregator": "median"},
], ids=["int4", "float4", "topk_int8", "topk_float32_median"])
def test_rounds_of_coded_updates_are_recomputed_bit_identically(tmp_path, fed):
  config = _config(**{k: v for k, v in fed.items() if "." not in k})
  if "robust.aggregator" in fed:
    config.federation.robust.aggregator = fed["robust.aggregator"]
  for r in (1, 2):
    for i, n in enumerate(SITES):
      _publish_coded(config, tmp_path, n, r, 10 * r + i)
  coord_lib.Coordinator(config, str(tmp_path),
                        private_key=os.path.join(_KEYS, "coordinator.key")).run()
  latin = buckets.Bucket(federation.bucket_urls(config, str(tmp_path))["latin"])
  arrays = exchange.read_manifest(latin, exchange.update_prefix(2))["arrays"]
  if "topk_density" in fed:
    assert "codec_indices/embed" in arrays and arrays["embed"]["quant"]["codec"] == "topk"
  else:
    assert arrays["embed"]["quant"] == {"codec": fed["update_dtype"],
                                        "block": fed.get("quant_block", 128)}
  reports = audit.audit_federation(config, str(tmp_path))
  assert [r["round"] for r in reports] == [0, 1, 2] and all(r["identical"] for r in reports)
  assert [i["site"] for i in reports[2]["inputs"]] == list(SITES)


def test_a_hostile_coded_update_is_refused_and_the_round_audits_without_it(tmp_path, caplog):
  """greek signs top-k codes with a duplicated column index: the coordinator refuses
  that update while reading it (naming greek and why), commits the round from the
  others, and the audit recomputes that round bit for bit."""
  config = _config(update_dtype="int4", topk_density=0.05, rounds=1, quorum=2)

  def duplicate(sent):
    idx = np.array(sent["unembed"].indices)
    idx[3, 1] = idx[3, 0]
    sent["unembed"] = dataclasses.replace(sent["unembed"], indices=idx)

  for i, n in enumerate(SITES):
    _publish_coded(config, tmp_path, n, 1, i, edit=duplicate if n == "greek" else None)
  with caplog.at_level(logging.WARNING):
    coord_lib.Coordinator(config, str(tmp_path),
                          private_key=os.path.join(_KEYS, "coordinator.key")).run()
  refused = [r.getMessage() for r in caplog.records if "rejected update of site greek" in
             r.getMessage()]
  assert len(refused) == 1 and refused[0].endswith(
      "codec_indices/unembed: column indices of a row are not strictly increasing "
      "(unsorted or duplicated)"), refused
  report = audit.audit_round(config, str(tmp_path), 1)
  assert report["identical"] and [i["site"] for i in report["inputs"]] == ["cyrillic", "latin"]
