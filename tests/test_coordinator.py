"""The coordinator's contract, with fake site updates instead of trained ones.

Every test writes site updates directly (random float32 arrays of the tiny model's
param schema, committed with a manifest) to file:// buckets, so nothing here trains:
quorum and deadline, late and rejected updates, the weight cap, restart after a crash,
the site-side checks on a global round, and bad input at the command line.
"""
import base64
import json
import logging
import os
import re
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import fed_fakes

from tapestry_jax import buckets
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = fed_fakes.SITES


_config, _signer, _coordinator = fed_fakes.config, fed_fakes.signer, fed_fakes.coordinator
_delta, _bucket, _read_round = fed_fakes.delta, fed_fakes.bucket, fed_fakes.read_round


def _declared_norm(delta) -> dict:
  """{'update_norm': L2 norm} as an honest site declares it ({} when it is not finite:
  JSON has no NaN; a hostile site's NaN update declares nothing)."""
  norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in delta.values())))
  return {"update_norm": norm} if np.isfinite(norm) else {}


def _publish(config, workdir, site: str, round_: int, delta, *, tokens=None, signer="own",
             **fields):
  """Commits `delta` as `site`'s update for `round_` in its own bucket, signed by `signer`
  (default: the site's own key; None = unsigned; a party name = that party's key);
  `fields` overrides manifest fields (author, base_round, federation, round) to forge
  bad ones."""
  bucket = _bucket(config, workdir, site)
  prefix = exchange.update_prefix(round_)
  attempt = exchange.new_attempt()
  records = exchange.write_arrays(bucket, exchange.data_prefix(prefix, attempt), delta)
  manifest = exchange.make_manifest(
      federation=fields.get("federation", config.federation.id), kind="update",
      round=fields.get("round", round_), author=fields.get("author", site), attempt=attempt,
      base_round=fields.get("base_round", round_ - 1),
      tokens=federation.weight_cap(config) if tokens is None else tokens, arrays=records,
      extra=_declared_norm(delta))
  if signer is not None:
    key = (signer if isinstance(signer, trust.ed25519.Ed25519PrivateKey)
           else _signer(manifest["author"] if signer == "own" else signer).key)
    manifest = trust.Signer(manifest["author"], key).sign(manifest)
  if "absurd" in fields:  # A declared shape no memory could hold, signed all the same.
    rec = manifest["arrays"][fields["absurd"]]
    rec["shape"] = rec["chunk_shape"] = [1 << 40, 1 << 20]  # One (absurd) chunk.
    rec["chunk_digests"] = rec["chunk_digests"][:1]
    rec["digest"] = exchange.combined_digest(rec["chunk_digests"])  # pylint: disable=protected-access
    manifest = trust.Signer(manifest["author"], _signer(manifest["author"]).key).sign(manifest)
  if fields.get("forge"):
    manifest["signature"]["value"] = base64.b64encode(bytes(64)).decode()
  if "alter_tokens" in fields:
    manifest["tokens"] = fields["alter_tokens"]
  exchange.write_manifest(bucket, prefix, manifest)
  return manifest


def _reference(config, rounds) -> tuple[dict, dict]:
  """Global params and outer state after whole-tree `outer.outer_step`s on numpy inputs;
  `rounds` is a list of (deltas in merge order, weights)."""
  tx = outer_config.make_outer_optimizer(config.federation.outer)
  params, state = coord_lib.initial_round(config)
  for deltas, weights in rounds:
    params, state = outer.outer_step(tx, params, state, deltas, weights)
  return jax.device_get(params), jax.device_get(state)


def _assert_round_equals(arrays, params, state=None):
  for name, want in params.items():
    np.testing.assert_array_equal(arrays[f"params/{name}"], want, err_msg=name)
  for name, s in (state or {}).items():
    for leaf, want in outer.state_leaves(s).items():
      np.testing.assert_array_equal(arrays[f"outer/{name}/{leaf}"], want, err_msg=f"{name}/{leaf}")


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _capture_logs(caplog):
  caplog.set_level(logging.INFO)


# ------------------------------------------------------------------ merging a round


def test_all_sites_commit_and_round_1_is_the_outer_step(tmp_path):
  config = _config(rounds=1)
  cap = federation.weight_cap(config)
  deltas = {n: _delta(i) for i, n in enumerate(SITES)}
  # cyrillic claims half a round's work, greek 3x the cap (counted as the cap), latin the cap.
  tokens = {"cyrillic": cap // 2, "greek": 3 * cap, "latin": cap}
  updates = {n: _publish(config, tmp_path, n, 1, deltas[n], tokens=tokens[n]) for n in SITES}

  records = _coordinator(config, tmp_path).run()

  assert [r["round"] for r in records] == [1]
  glob = _bucket(config, tmp_path, federation.GLOBAL)
  assert exchange.read_latest(glob) == 1
  assert exchange.committed_rounds(glob, "global") == [0, 1]
  manifest, arrays = _read_round(config, tmp_path, 1)
  assert manifest["base_round"] == 0 and manifest["author"] == federation.COORDINATOR
  inputs = manifest["extra"]["inputs"]
  assert [i["site"] for i in inputs] == list(SITES)
  assert [i["tokens"] for i in inputs] == [tokens[n] for n in SITES]
  np.testing.assert_allclose([i["weight"] for i in inputs], [0.2, 0.4, 0.4], rtol=1e-6)
  assert [i["manifest_sha256"] for i in inputs] == [
      exchange.manifest_digest(updates[n]) for n in SITES]
  weights = outer.cap_weights([tokens[n] for n in SITES], cap)
  params, state = _reference(config, [([deltas[n] for n in SITES], weights)])
  _assert_round_equals(arrays, params, state)


def test_quorum_closes_after_the_deadline_and_late_updates_are_ignored(tmp_path, caplog):
  config = _config(quorum=2, deadline_s=0.3)
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  r1 = {n: _delta(10 + i) for i, n in enumerate(SITES)}
  _publish(config, tmp_path, "cyrillic", 1, r1["cyrillic"])
  _publish(config, tmp_path, "latin", 1, r1["latin"])

  rec = coord.run_round(1)

  assert rec["sites"] == ["cyrillic", "latin"]
  assert rec["wait_s"] >= 0.3  # It waited the deadline for greek.
  assert any("round 1 closes on quorum 2/3" in m and "missing: ['greek']" in m
             for m in _warnings(caplog)), _warnings(caplog)
  manifest, _ = _read_round(config, tmp_path, 1)
  assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic", "latin"]

  # greek commits round 1 after it closed, then everyone commits round 2.
  _publish(config, tmp_path, "greek", 1, r1["greek"])
  r2 = {n: _delta(20 + i) for i, n in enumerate(SITES)}
  for n in SITES:
    _publish(config, tmp_path, n, 2, r2[n])
  caplog.clear()
  rec = coord.run_round(2)

  assert rec["sites"] == list(SITES)
  late = [m for m in _warnings(caplog) if "late update" in m]
  assert late == ["coordinator: late update of site greek for closed round 1 ignored"]
  manifest, arrays = _read_round(config, tmp_path, 2)
  assert [(i["site"], i["round"]) for i in manifest["extra"]["inputs"]] == [
      (n, 2) for n in SITES]
  # greek's late round-1 update is in neither round.
  params, state = _reference(config, [
      ([r1["cyrillic"], r1["latin"]], [0.5, 0.5]),
      ([r2[n] for n in SITES], np.full(3, 1 / 3, np.float32))])
  _assert_round_equals(arrays, params, state)


def test_a_round_with_its_quorum_is_not_abandoned_at_round_timeout(tmp_path):
  # round_timeout_s bounds the wait for the QUORUM; once it is there, the round closes
  # after the deadline even when that is later than round_timeout_s.
  config = _config(quorum=2, deadline_s=0.6, round_timeout_s=0.2)
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  _publish(config, tmp_path, "cyrillic", 1, _delta(1))
  _publish(config, tmp_path, "latin", 1, _delta(2))
  rec = coord.run_round(1)
  assert rec["sites"] == ["cyrillic", "latin"] and rec["wait_s"] >= 0.6


def test_no_quorum_by_round_timeout_raises_and_commits_nothing(tmp_path):
  config = _config(quorum=2, deadline_s=0.0, round_timeout_s=0.3)
  _publish(config, tmp_path, "latin", 1, _delta(1))
  coord = _coordinator(config, tmp_path)

  with pytest.raises(coord_lib.QuorumError,
                     match=r"round 1 reached 1 of quorum 2 .*missing sites: \['cyrillic', "
                           r"'greek'\].*latest global round stays 0"):
    coord.run()

  glob = _bucket(config, tmp_path, federation.GLOBAL)
  assert exchange.read_latest(glob) == 0
  assert exchange.committed_rounds(glob, "global") == [0]
  assert glob.list(exchange.global_prefix(1)) == []  # Not a byte of round 1.
  assert _coordinator(config, tmp_path).latest() == 0


# (round, what greek does wrong, the reason logged, a regex). Rounds >= 2 so that a stale base exists.
BAD_UPDATES = [
    (1, dict(author="latin"), r"manifest authored by 'latin', expected 'greek'"),
    (2, dict(base_round=0), r"trained from global round 0, expected 1 \(stale\)"),
    (3, dict(federation="someone-else"),
     r"not an update of this federation \('update' of federation 'someone-else', expected an "
     r"update of 'tapestry-tiny'\)"),
    (4, dict(round=5), r"manifest round 5 != 4"),
    (5, dict(tokens=0), r"token count 0 is not a positive integer"),
    (6, dict(drop="final_norm"), r"schema mismatch.*missing arrays \['final_norm'\]"),
    (7, dict(shape="embed"), r"schema mismatch.*'embed': shape \(384, 64\) != expected \(384, 128\)"),
    (8, dict(dtype="embed"), r"schema mismatch.*'embed': dtype bfloat16 != expected float32"),
    (9, dict(signer=None), r"bad signature: manifest of 'greek' is not signed"),
    # Signed with another party's key, or with a key nobody in the trust root has.
    (10, dict(signer="latin"), r"bad signature: manifest of 'greek' is signed by unknown key "
                               r"'[0-9a-f]{16}', not 'greek''s key"),
    (11, dict(signer=trust.generate_private_key()),
     r"bad signature: manifest of 'greek' is signed by unknown key"),
    # A forged signature value under greek's key id, and a manifest altered after signing.
    (12, dict(forge=True), r"bad signature: manifest of 'greek': the signature does not verify"),
    (13, dict(alter_tokens=7), r"bad signature: manifest of 'greek': the signature does not "
                               r"verify \(forged, or the manifest was changed after it was signed\)"),
    # Rejected from the manifest alone: nothing of that size is ever allocated or read.
    (14, dict(absurd="embed"), r"schema mismatch.*'embed': shape \(1099511627776, 1048576\) "
                               r"!= expected \(384, 128\) \(declares more elements than expected\)"),
]


def test_bad_updates_are_rejected_with_a_reason_and_not_merged(tmp_path, caplog):
  config = _config(rounds=len(BAD_UPDATES), quorum=2)
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  rounds = []
  for round_, bad, reason in BAD_UPDATES:
    bad = dict(bad)
    honest = {n: _delta(100 * round_ + i) for i, n in enumerate(["cyrillic", "latin"])}
    for n, d in honest.items():
      _publish(config, tmp_path, n, round_, d)
    d = _delta(100 * round_ + 9)
    if "drop" in bad:
      del d[bad.pop("drop")]
    if "shape" in bad:
      n = bad.pop("shape")
      d[n] = d[n][:, :64]
    if "dtype" in bad:
      n = bad.pop("dtype")
      d[n] = d[n].astype(ml_dtypes.bfloat16)
    _publish(config, tmp_path, "greek", round_, d, **bad)
    caplog.clear()
    read0 = coord.sites["greek"].bytes_read

    rec = coord.run_round(round_)

    assert rec["sites"] == ["cyrillic", "latin"], reason
    # Refused from its manifest: only that and the COMMIT were read (a few kB), none of
    # the update's arrays (~3.5 MB; an absurd shape is never allocated or read).
    assert coord.sites["greek"].bytes_read - read0 < 64 << 10, reason
    rejected = [m for m in _warnings(caplog) if "rejected update of site greek" in m]
    assert len(rejected) == 1 and f"round {round_}:" in rejected[0], _warnings(caplog)
    assert re.search(reason, rejected[0]), rejected[0]
    # A rejected update is not a late one: it is never reported as such.
    assert not [m for m in _warnings(caplog) if "late update" in m], _warnings(caplog)
    rounds.append(([honest["cyrillic"], honest["latin"]], [0.5, 0.5]))

  manifest, arrays = _read_round(config, tmp_path, len(BAD_UPDATES))
  assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic", "latin"]
  params, state = _reference(config, rounds)
  _assert_round_equals(arrays, params, state)


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean"])
def test_a_norm_boosted_update_is_bounded_by_clipping_and_robust_merges(tmp_path, aggregator):
  """greek publishes its honest update x100 (validly signed, finite, honest token
  count): with clip_norm the step it can cause is bounded; the median / trimmed mean
  of 3 sites ignores it per coordinate. What must not be lost: the honest sites' say."""
  clip = 0.5
  config = _config(rounds=1)
  config.federation.robust.clip_norm = clip
  config.federation.robust.aggregator = aggregator
  config.federation.robust.trim = 1
  honest = {n: _delta(90 + i) for i, n in enumerate(SITES)}
  boosted = {k: 100 * v for k, v in honest["greek"].items()}
  for n in SITES:
    _publish(config, tmp_path, n, 1, boosted if n == "greek" else honest[n])
  _coordinator(config, tmp_path).run()
  manifest, arrays = _read_round(config, tmp_path, 1)
  assert manifest["extra"]["merge"]["robust"]["aggregator"] == aggregator
  initial, _ = coord_lib.initial_round(config)
  step = np.sqrt(sum(np.sum(np.square(arrays[f"params/{n}"].astype(np.float64) - initial[n]))
                     for n in initial))
  norms = {n: outer.update_norm(d) for n, d in {**honest, "greek": boosted}.items()}
  assert norms["greek"] > 50 * clip  # The attack is large ...
  if aggregator == "mean":  # ... clipped to clip x its weight (1/3), + the others (clipped).
    assert step <= clip + 1e-5
  else:  # ... and the coordinate-wise median of 3 never takes the extreme value.
    assert step <= max(norms["cyrillic"], norms["latin"]) + 1e-5
    # It is the median, coordinate by coordinate, of the clipped updates (a trimmed mean
    # of 3 with trim 1 is their median), not some other bounded mix of them.
    sent = {**honest, "greek": boosted}
    scale = {n: np.float32(clip / max(norms[n], clip)) for n in SITES}
    median = {k: np.median(np.stack([scale[n] * sent[n][k] for n in SITES]), axis=0)
              for k in honest["greek"]}
    want, _ = _reference(config, [([median], [1.0])])
    for n, w in want.items():
      np.testing.assert_allclose(arrays[f"params/{n}"], w, rtol=1e-6, atol=1e-7, err_msg=n)
  # Without clipping, the plain mean is dragged by the boosted update.
  plain = _config(rounds=1)
  for n in SITES:
    _publish(plain, tmp_path / "plain", n, 1, boosted if n == "greek" else honest[n])
  _coordinator(plain, tmp_path / "plain").run()
  _, plain_arrays = _read_round(plain, tmp_path / "plain", 1)
  plain_step = np.sqrt(sum(np.sum(np.square(plain_arrays[f"params/{n}"].astype(np.float64)
                                            - initial[n])) for n in initial))
  assert plain_step > 10 * step


def test_robust_settings_the_quorum_cannot_support_are_refused(tmp_path):
  config = _config(quorum=2)
  config.federation.robust.aggregator = "median"
  with pytest.raises(ConfigError, match=r"federation.robust: robust.aggregator median needs a "
                                        r"quorum of at least 3"):
    _coordinator(config, tmp_path)


def test_an_inflated_token_count_merges_like_the_honest_one(tmp_path):
  config = _config(rounds=1)
  cap = federation.weight_cap(config)
  deltas = {n: _delta(30 + i) for i, n in enumerate(SITES)}
  results = {}
  for label, greek_tokens in (("honest", cap), ("inflated", 1000 * cap)):
    workdir = tmp_path / label
    for n in SITES:
      _publish(config, workdir, n, 1, deltas[n], tokens=greek_tokens if n == "greek" else cap)
    _coordinator(config, workdir).run()
    results[label] = _read_round(config, workdir, 1)

  (honest, h_arrays), (inflated, i_arrays) = results["honest"], results["inflated"]
  assert [i["tokens"] for i in inflated["extra"]["inputs"]] == [cap, 1000 * cap, cap]
  assert [i["weight"] for i in inflated["extra"]["inputs"]] == [
      i["weight"] for i in honest["extra"]["inputs"]]
  assert h_arrays.keys() == i_arrays.keys()
  for name in h_arrays:
    np.testing.assert_array_equal(i_arrays[name], h_arrays[name], err_msg=name)


def _poisoned(delta, value):
  """`delta` with `value` (NaN or Inf) in the last element of its last array, so that
  the merge has written blocks of round 1 before it reads the bad one."""
  name = sorted(delta)[-1]
  bad = delta[name].copy()
  bad.flat[-1] = value
  return {**delta, name: bad}, name


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_update_is_rejected_and_the_others_are_merged(tmp_path, caplog, value):
  config = _config(rounds=2, quorum=2)
  cap = federation.weight_cap(config)
  r1 = {n: _delta(60 + i) for i, n in enumerate(SITES)}
  greek, name = _poisoned(r1["greek"], value)
  for n in SITES:
    _publish(config, tmp_path, n, 1, greek if n == "greek" else r1[n])
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()

  rec = coord.run_round(1)

  assert rec["sites"] == ["cyrillic", "latin"]
  np.testing.assert_array_equal(rec["weights"], [0.5, 0.5])
  rejected = [m for m in _warnings(caplog) if "rejected update of site greek" in m]
  assert len(rejected) == 1 and re.fullmatch(
      rf"coordinator: round 1: rejected update of site greek \(manifest sha256 [0-9a-f]{{16}}\): "
      rf"non-finite values in array {name}", rejected[0]), _warnings(caplog)
  assert exchange.read_latest(_bucket(config, tmp_path, federation.GLOBAL)) == 1
  manifest, arrays = _read_round(config, tmp_path, 1)
  assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic", "latin"]
  weights = outer.cap_weights([cap, cap], cap)
  params, state = _reference(config, [([r1["cyrillic"], r1["latin"]], weights)])
  _assert_round_equals(arrays, params, state)
  assert all(np.isfinite(a).all() for a in arrays.values())

  # The refused update is not a late one: round 2 does not report it.
  for i, n in enumerate(SITES):
    _publish(config, tmp_path, n, 2, _delta(70 + i))
  caplog.clear()
  assert coord.run_round(2)["sites"] == list(SITES)
  assert not [m for m in _warnings(caplog) if "late update" in m], _warnings(caplog)


def test_a_non_finite_update_below_quorum_raises_and_commits_nothing(tmp_path, caplog):
  config = _config(rounds=1, quorum=3)
  deltas = {n: _delta(80 + i) for i, n in enumerate(SITES)}
  greek, name = _poisoned(deltas["greek"], np.nan)
  for n in SITES:
    _publish(config, tmp_path, n, 1, greek if n == "greek" else deltas[n])
  coord = _coordinator(config, tmp_path)

  with pytest.raises(coord_lib.QuorumError,
                     match=rf"round 1: rejected update of site greek: non-finite values in "
                           rf"array {name}; 2 updates remain, quorum 3; the latest global "
                           rf"round stays 0"):
    coord.run()

  assert any("round 1: rejected update of site greek" in m for m in _warnings(caplog))
  glob = _bucket(config, tmp_path, federation.GLOBAL)
  assert exchange.read_latest(glob) == 0
  assert exchange.committed_rounds(glob, "global") == [0]
  assert exchange.read_manifest(glob, exchange.global_prefix(1)) is None
  assert _coordinator(config, tmp_path).latest() == 0


# ------------------------------------------------------------------ restart


def _publish_two_rounds(config, workdir):
  for r in (1, 2):
    for i, n in enumerate(SITES):
      _publish(config, workdir, n, r, _delta(40 + 10 * r + i))


def test_restart_redoes_an_uncommitted_round_bit_identically(tmp_path, monkeypatch):
  config = _config(rounds=2)
  _publish_two_rounds(config, tmp_path / "straight")
  _coordinator(config, tmp_path / "straight").run()
  want_manifest, want = _read_round(config, tmp_path / "straight", 2)

  # The crash: round 1 is published, then the process dies half-way through round 2's
  # merge (some arrays written, no manifest, no COMMIT) ...
  workdir = tmp_path / "crashed"
  _publish_two_rounds(config, workdir)
  finish, calls = exchange.BlockWriter.finish, []

  def crash_in_round_2(self, partial=False):
    if self.prefix.startswith(exchange.global_prefix(2) + "/"):
      if len(calls) == 5:
        raise KeyboardInterrupt("killed")
      calls.append(self.name)
    return finish(self, partial)

  monkeypatch.setattr(exchange.BlockWriter, "finish", crash_in_round_2)
  with pytest.raises(KeyboardInterrupt):
    _coordinator(config, workdir).run()
  monkeypatch.undo()
  glob = _bucket(config, workdir, federation.GLOBAL)
  prefix = exchange.global_prefix(2)
  [crashed] = exchange.uncommitted_attempts(glob, prefix)
  assert len(calls) == 5 and glob.list(f"{prefix}/{crashed}/arrays/")
  # ... and a torn manifest without its COMMIT, as if it died between the two writes.
  glob.write(f"{prefix}/{crashed}/{exchange.MANIFEST}", b'{"torn": ')
  assert exchange.read_latest(glob) == 1 and exchange.read_manifest(glob, prefix) is None

  records = _coordinator(config, workdir).run()

  assert [r["round"] for r in records] == [2]
  assert exchange.read_latest(glob) == 2
  manifest, got = _read_round(config, workdir, 2)
  # The redo is a new attempt (its own directory, its own dated signature); the crashed
  # attempt is garbage that no COMMIT names. Everything else is bit-identical.
  assert exchange.uncommitted_attempts(glob, prefix) == [crashed] != [manifest["attempt"]]
  def unsigned(m):  # Without what names this run's attempts and inputs' manifests.
    extra = dict(m["extra"], base_manifest_sha256=None,
                 inputs=[dict(i, manifest_sha256=None) for i in m["extra"]["inputs"]])
    return {k: v for k, v in dict(m, extra=extra).items()
            if k not in ("attempt", "signature", "signed_at")}
  assert unsigned(manifest) == unsigned(want_manifest)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_restart_repairs_a_latest_pointer_left_behind_without_recomputing(tmp_path, caplog):
  config = _config(rounds=2)
  _publish_two_rounds(config, tmp_path)
  _coordinator(config, tmp_path).run()
  glob = _bucket(config, tmp_path, federation.GLOBAL)
  prefix = exchange.global_prefix(2)
  before = {k: (glob.read(k), os.stat(tmp_path / "buckets" / "global" / k).st_mtime_ns)
            for k in glob.list(prefix + "/")}
  # The crash: round 2's COMMIT is written, LATEST still says 1.
  glob.write(exchange.LATEST, json.dumps({"kind": "global", "round": 1}).encode())
  assert exchange.read_latest(glob) == 1

  coord = _coordinator(config, tmp_path)
  assert coord.latest() == 2
  assert exchange.read_latest(glob) == 2
  assert any("LATEST pointer said 1; round 2 is committed" in r.getMessage()
             for r in caplog.records)
  assert coord.run() == []  # Nothing left to do, nothing recomputed.
  after = {k: (glob.read(k), os.stat(tmp_path / "buckets" / "global" / k).st_mtime_ns)
           for k in glob.list(prefix + "/")}
  assert after == before


# ------------------------------------------------------------------ the site's side


def _shardings(config):
  mcfg = model_lib.ModelConfig.from_config(config.model)
  abstract = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, abstract)


def test_read_global_refuses_a_round_that_is_not_the_one_asked_for(tmp_path):
  config = _config()
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  glob = coord.glob
  shardings = _shardings(config)
  root = trust.TrustRoot.from_config(config)
  params, manifest = exchange.read_global(glob, config, 0, shardings, root=root)
  assert manifest["round"] == 0
  initial, _ = coord_lib.initial_round(config)
  for name, p in trees.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(p), initial[name], err_msg=name)

  with pytest.raises(exchange.ExchangeError, match=r"rounds/round_000003 is not committed"):
    exchange.read_global(glob, config, 3, shardings)
  other = _config()
  other.federation.id = "someone-else"
  with pytest.raises(exchange.ExchangeError,
                     match=r"manifest is not global round 0 of federation 'someone-else'"):
    exchange.read_global(glob, other, 0, shardings)
  # Round 0's (validly signed) manifest replayed under round 1's prefix: it says round 0.
  p0, p1 = exchange.global_prefix(0), exchange.global_prefix(1)
  data0 = exchange.data_prefix(p0, manifest)[len(p0):]
  glob.write(f"{p1}{data0}/{exchange.MANIFEST}", glob.read(f"{p0}{data0}/{exchange.MANIFEST}"))
  glob.write(f"{p1}/{exchange.COMMIT}", glob.read(f"{p0}/{exchange.COMMIT}"))
  with pytest.raises(exchange.ExchangeError, match=r"manifest is not global round 1 of federation"):
    exchange.read_global(glob, config, 1, shardings, root=root)
  # A site configured with another model: refused before a byte of array data is read.
  wider = _config()
  wider.model.d_model = 64
  read0 = glob.bytes_read
  with pytest.raises(exchange.ExchangeError,
                     match=r"schema mismatch.*'params/embed': shape \(384, 128\) != expected "
                           r"\(384, 64\)"):
    exchange.read_global(glob, wider, 0, _shardings(wider), root=root)
  assert glob.bytes_read - read0 < 100_000  # The manifest and COMMIT only.


def test_a_site_reads_the_global_moments_verified_under_outer_moments(tmp_path):
  config = _config()
  config.federation.outer.name, config.federation.outer.lr = "moments", 1.0
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  shardings = _shardings(config)
  root = trust.TrustRoot.from_config(config)
  _, manifest = exchange.read_global(coord.glob, config, 0, shardings, root=root)
  moments = exchange.read_global_moments(coord.glob, config, 0, manifest, shardings)
  assert sorted(moments) == sorted(federation.param_schema(config))
  for leaves in moments.values():
    assert int(leaves["count"]) == 0 and not np.asarray(leaves["nu"]).any()
  # A planted chunk in a moment (zero chunks are not stored: a chunk of the params, same
  # shape): its digest is not the signed one.
  data = exchange.data_prefix(exchange.global_prefix(0), manifest)
  key = next(k for k in coord.glob.list(f"{data}/arrays/params/embed/") if "/c/" in k)
  coord.glob.write(key.replace("/params/embed/", "/outer/embed/mu/"), coord.glob.read(key))
  with pytest.raises(exchange.ExchangeError, match=r"outer/embed/mu.*chunk \(0, 0\) is corrupt"):
    exchange.read_global_moments(coord.glob, config, 0, manifest, shardings)
  # A model the moments do not fit: refused before their data is read.
  wider = _config()
  wider.model.d_model = 64
  with pytest.raises(exchange.ExchangeError, match=r"schema mismatch.*outer/embed/mu"):
    exchange.read_global_moments(coord.glob, wider, 0, manifest, _shardings(wider))


def test_publish_update_keeps_an_already_committed_round(tmp_path, caplog):
  config = _config()
  bucket = _bucket(config, tmp_path, "latin")
  first = exchange.publish_update(bucket, config, "latin", 1, 0, _delta(1), 100,
                                  {"train_loss": 1.0}, signer=_signer("latin"))
  again = exchange.publish_update(bucket, config, "latin", 1, 0, _delta(2), 200,
                                  {"train_loss": 2.0}, signer=_signer("latin"))
  assert again == first == exchange.read_manifest(bucket, exchange.update_prefix(1))
  assert any("round 1 already committed" in r.getMessage() for r in caplog.records)
  rec = first["arrays"]["embed"]
  np.testing.assert_array_equal(
      exchange.read_block(bucket, exchange.data_prefix(exchange.update_prefix(1), first),
                          "embed", rec, tuple(slice(0, s) for s in rec["shape"])),
      _delta(1)["embed"])
  trust.TrustRoot.from_config(config).verify(first, "latin")


# ------------------------------------------------------------------ bad input, command line


CLI_CONFIG = "--config=experiments/configs/federation.py:tiny+fedavg/latin,cyrillic"
KEY = trust.public_key_text(trust.generate_private_key())


def test_bad_input_at_the_command_line_is_one_line_and_exit_status_2(tmp_path):
  regular = tmp_path / "a-file"
  regular.write_text("not a directory")
  unsigned = "--config.federation.trust.require_signatures=false"
  cases = {
      "unknown site": (["launch.site", "--site=klingon"], r"unknown site 'klingon'"),
      "no trust root": (["launch.site", "--site=latin"],
                        r"federation.trust.public_keys has no key for \['cyrillic', 'latin', "
                        r"'coordinator'\]; every party needs one.*launch.keygen"),
      "private key missing": (
          ["launch.coordinator", *[f"--config.federation.trust.public_keys.{p}={KEY}"
                                   for p in ("latin", "cyrillic", "coordinator")],
           f"--private_key={tmp_path}/nowhere.key"],
          r"party 'coordinator': private key .*/nowhere.key does not exist; create one with "
          r"`python -m launch.keygen"),
      "global bucket under a file": (
          [unsigned, "launch.coordinator", f"--config.federation.global_bucket=file://{regular}/global"],
          r"bucket file://.*/a-file/global is not writable.*a parent of the path is a file"),
      "global bucket in /proc": (
          [unsigned, "launch.coordinator", "--config.federation.global_bucket=file:///proc/forbidden"],
          r"bucket file:///proc/forbidden is not writable"),
      "site bucket under a file": (
          [unsigned, "launch.site", "--site=latin", f"--config.sites.latin.bucket=file://{regular}/latin"],
          r"bucket file://.*/a-file/latin is not writable.*a parent of the path is a file"),
      "malformed bucket URL": (
          [unsigned, "launch.coordinator", "--config.federation.global_bucket=ftp://host/x"],
          r"bucket URL 'ftp://host/x' is not usable \(unknown scheme 'ftp'\)"),
  }
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = {}
  for label, (args, _) in cases.items():  # All at once: most of each is the imports.
    args = [a for a in args if a != unsigned]
    module, *rest = args
    rest += [unsigned] if unsigned in cases[label][0] else []
    procs[label] = subprocess.Popen(
        [sys.executable, "-m", module, CLI_CONFIG, f"--workdir={tmp_path / 'w'}", *rest],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for label, p in procs.items():
    _, stderr = p.communicate(timeout=120)
    errors = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert p.returncode == 2, (label, stderr[-2000:])
    assert "Traceback" not in stderr, (label, stderr[-2000:])
    assert len(errors) == 1, (label, stderr[-2000:])
    assert re.search(cases[label][1], errors[0]), (label, errors[0])


@pytest.mark.parametrize("trick", ["../cyrillic/updates/round_000001/arrays/embed",
                                   "/etc/passwd", "layers/../../../x"])
def test_a_manifest_with_path_tricks_is_rejected_before_any_read(tmp_path, caplog, trick):
  """A hand-crafted (but committed) manifest that names an array outside the site's
  prefix is refused by the schema check; no read leaves the owner's prefix."""
  config = _config(quorum=2)
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()
  for i, n in enumerate(["cyrillic", "latin"]):
    _publish(config, tmp_path, n, 1, _delta(i))
  bucket = _bucket(config, tmp_path, "greek")
  prefix = exchange.update_prefix(1)
  attempt = exchange.new_attempt()
  records = exchange.write_arrays(bucket, exchange.data_prefix(prefix, attempt), _delta(9))
  records[trick] = records.pop("embed")
  manifest = _signer("greek").sign(exchange.make_manifest(  # Signed by greek itself.
      federation=config.federation.id, kind="update", round=1, author="greek", base_round=0,
      attempt=attempt, tokens=federation.weight_cap(config), arrays=records))
  data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
  # Forged by hand: write_manifest would refuse it.
  bucket.write(f"{exchange.data_prefix(prefix, attempt)}/manifest.json", data)
  bucket.write(f"{prefix}/COMMIT", json.dumps(
      {"attempt": attempt, "manifest_sha256": exchange.manifest_digest(manifest)}).encode())
  read_before = coord.sites["greek"].bytes_read
  rec = coord.run_round(1)
  assert rec["sites"] == ["cyrillic", "latin"]
  rejected = [m for m in _warnings(caplog) if "rejected update of site greek" in m]
  assert len(rejected) == 1 and "unexpected arrays" in rejected[0], _warnings(caplog)
  # Only greek's manifest and COMMIT were read (a few kB), none of its ~3.5 MB of arrays.
  assert coord.sites["greek"].bytes_read - read_before < 64 << 10
  with pytest.raises(buckets.BucketError, match="keys must stay inside the bucket"):
    exchange.read_block(bucket, exchange.data_prefix(prefix, attempt), trick, records[trick],
                        tuple(slice(0, s) for s in records[trick]["shape"]))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_corrupt_committed_update_is_rejected_and_the_others_are_merged(tmp_path, caplog,
                                                                          damage):
  """One flipped byte (or a missing chunk) in a committed update fails its digest: the
  update is refused with its site and array named, the others make the round."""
  config = _config(quorum=2)
  cap = federation.weight_cap(config)
  r1 = {n: _delta(80 + i) for i, n in enumerate(SITES)}
  for n in SITES:
    _publish(config, tmp_path, n, 1, r1[n])
  chunk = next((tmp_path / "buckets" / "greek" / exchange.update_prefix(1)).glob(
      "a-*/arrays/embed/c/*"))
  while chunk.is_dir():
    chunk = next(chunk.iterdir())
  if damage == "flip":
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x10  # Uncompressed chunks end with the element bytes.
    chunk.write_bytes(bytes(data))
  else:
    chunk.unlink()
  coord = _coordinator(config, tmp_path)
  coord.publish_initial()

  rec = coord.run_round(1)

  assert rec["sites"] == ["cyrillic", "latin"]
  rejected = [m for m in _warnings(caplog) if "rejected update of site greek" in m]
  assert len(rejected) == 1 and "'embed'" in rejected[0] and "corrupt" in rejected[0], \
      _warnings(caplog)
  manifest, arrays = _read_round(config, tmp_path, 1)
  assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic", "latin"]
  params, state = _reference(config, [([r1["cyrillic"], r1["latin"]],
                                       outer.cap_weights([cap, cap], cap))])
  _assert_round_equals(arrays, params, state)
