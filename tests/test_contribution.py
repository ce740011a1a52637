"""The contribution check (federation.contribution, issue 17 scenario 6): the policy's
math, scores on a toy (a step down the validation gradient helps, a flipped and scaled one
hurts), the simulation's and the coordinator's scores equal bit for bit, a poisoned update
refused or down-weighted with its score in the signed global manifest and the audit
checking it, and a federation with a poisoned site trained with the check on and off."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fed_fakes
from experiments.configs import federation as fed_config
from tapestry_jax import audit
from tapestry_jax import contribution
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import model as model_lib
from tapestry_jax import outer
from tapestry_jax import simulate
from tapestry_jax import site as site_lib
from tapestry_jax import trees
from tapestry_jax.validate import ConfigError

SITES = fed_fakes.SITES  # cyrillic, greek, latin; greek is the poisoned one.
BAD = "greek"


def _config(mode="refuse", **fed):
  """fed_fakes' three tiny sites (FedAvg), the check on, validated on every site's
  languages; short sequences and few documents so that it runs in seconds."""
  c = fed_fakes.config(**{"quorum": 2, **fed})
  c.data.seq_len, c.data.synthetic.num_documents = 32, 100
  c.federation.contribution.update(mode=mode, languages=",".join(SITES), batches=2)
  return c


# ---------------------------------------------------------------------- the policy


def test_policy_weights_refusals_and_the_off_mode_bits():
  tokens, cap = [100, 300, 50], 200
  scores = [0.02, -0.5, None]  # None: the probe's loss was not finite.
  off = contribution.Policy()
  assert not off.on and off.weights(tokens, cap, scores).tobytes() == \
      outer.cap_weights(tokens, cap).tobytes()
  # Nothing flagged: bit for bit the plain capped weights, whatever the mode.
  for mode in contribution.MODES:
    p = contribution.Policy(mode=mode, threshold=-1.0)
    assert p.weights(tokens, cap, [0.1, -0.5, 0.0]).tobytes() == \
        outer.cap_weights(tokens, cap).tobytes()
  w = contribution.Policy(mode="weight", down_weight=0.25)
  np.testing.assert_allclose(w.weights(tokens, cap, scores),
                             np.array([100, 0.25 * 200, 0.25 * 50]) / 162.5, rtol=1e-6)
  assert [w.refuses(s) for s in scores] == [False, False, False]
  r = contribution.Policy(mode="refuse", threshold=0.01)
  assert [r.refuses(s) for s in scores] == [False, True, True]
  assert [r.refuses(s) for s in (0.01, 0.0099)] == [False, True]  # score < threshold.


@pytest.mark.parametrize("kw,match", [
    (dict(mode="gauntlet"), r"contribution\.mode must be one of off, weight, refuse; got "
                            r"'gauntlet'"),
    (dict(threshold=float("nan")), r"contribution\.threshold must be a finite number"),
    (dict(down_weight=0.0), r"contribution\.down_weight must be a number in \(0, 1\)"),
    (dict(down_weight=1.0), r"contribution\.down_weight must be a number in \(0, 1\)"),
    (dict(lr=-1.0), r"contribution\.lr must be a finite number > 0"),
    (dict(lr="1"), r"contribution\.lr must be a finite number > 0; got '1'"),
])
def test_bad_policies_are_one_clear_line(kw, match):
  with pytest.raises(ValueError, match=match):
    contribution.Policy(**kw)


def test_config_errors_name_the_field():
  federation.check_federation_config(_config())
  c = _config(mode="weight", quorum=3)
  c.federation.robust.aggregator = "median"
  with pytest.raises(ConfigError, match=r"contribution\.mode weight sets merge weights, which "
                                        r"robust\.aggregator median does not use"):
    federation.check_federation_config(c)
  c = _config()
  c.federation.contribution.batches = 0
  with pytest.raises(ConfigError, match=r"federation\.contribution\.batches must be an integer "
                                        r">= 1; got 0"):
    federation.check_federation_config(c)
  c = _config()
  c.federation.contribution.update(source="text_files", paths="/nonexistent/*.txt")
  with pytest.raises(ConfigError, match=r"federation\.contribution: the validation data: "):
    federation.check_federation_config(c)
  # Off by default: the shipped config does not score anything.
  assert not contribution.policy(fed_config.get_config("tiny")).on


# ---------------------------------------------------------------------- scores on a toy


def _validation_grad(scorer, flat) -> dict[str, np.ndarray]:
  """The gradient of the scorer's validation loss (mean over its tokens) at flat params."""
  like = scorer.trainer.param_shardings
  cfg = scorer.trainer.model_cfg

  def loss(params):
    total, n = 0.0, 0.0
    for b in scorer.batches:
      ce_BxL, _, mask_BxL = model_lib.token_losses(params, {k: jnp.asarray(v) for k, v in
                                                            b.items()}, cfg)
      total, n = total + ce_BxL.sum(), n + mask_BxL.sum()
    return total / n

  grads = jax.grad(loss)(trees.unflatten({k: jnp.asarray(v) for k, v in flat.items()}, like))
  return {n: np.asarray(g) for n, g in trees.flatten(grads).items()}


def _toy_updates(scorer, flat) -> dict[str, dict[str, np.ndarray]]:
  """Honest sites send a step down the validation gradient (a pseudo-gradient is
  global - local, so + eta * grad); the poisoned one the same step flipped and x8."""
  g = _validation_grad(scorer, flat)
  eta = {"cyrillic": 0.5, "latin": 0.3, BAD: -8 * 0.5}
  return {n: {k: (eta[n] * v).astype(np.float32) for k, v in g.items()} for n in SITES}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """One scorer, round 0's params and the toy updates, shared by the tests below."""
  config = _config()
  scorer = contribution.Scorer(config)
  params, _ = coord_lib.initial_round(config)
  return config, scorer, params, _toy_updates(scorer, params)


def test_a_step_down_the_gradient_scores_positive_and_a_flipped_one_negative(toy):
  _, scorer, params, updates = toy
  checked = scorer.check_arrays(params, list(SITES), [updates[n] for n in SITES])
  scores = dict(zip(checked.sites, checked.scores))
  assert scores["cyrillic"] > 0 and scores["latin"] > 0, scores
  assert scores[BAD] < 0, scores
  assert checked.refused == [BAD]
  # score = L(theta) - L(theta - lr * delta), the probe being the site's update alone.
  probe = {n: params[n] - updates["latin"][n] for n in params}
  assert scores["latin"] == pytest.approx(checked.global_loss - scorer.loss(probe), abs=1e-6)
  assert checked.global_loss == scorer.loss(params)


def _publish_round(config, workdir, updates):
  coord = fed_fakes.coordinator(config, workdir)
  coord.publish_initial()
  for n in SITES:
    fed_fakes.publish(config, workdir, n, 1, updates[n])
  return coord


def test_the_coordinator_refuses_the_poisoned_update_and_signs_its_score(toy, tmp_path, caplog):
  config, scorer, params, updates = toy
  coord = _publish_round(config, tmp_path, updates)
  rec = coord.run_round(1)
  assert rec["sites"] == ["cyrillic", "latin"] and rec["contribution_refused"] == [BAD]
  assert any(f"refused update of site {BAD}" in r.getMessage() and "contribution score -" in
             r.getMessage() for r in caplog.records)
  manifest, arrays = fed_fakes.read_round(config, tmp_path, 1)
  coord.root.verify(manifest, federation.COORDINATOR)  # The scores are signed with the round.
  got = manifest["extra"]["contribution"]
  # The deployed scores are the simulation's, bit for bit (the probe merged by the
  # streaming merge == outer_step on whole arrays; the loss on one device).
  sim = scorer.check_arrays(params, list(SITES), [updates[n] for n in SITES])
  assert [s["score"] for s in got["sites"]] == sim.scores
  assert got["global_loss"] == sim.global_loss
  bad = got["sites"][SITES.index(BAD)]
  assert bad["refused"] and bad["score"] < 0 and got["policy"]["mode"] == "refuse"
  assert got["validation_sha256"] == scorer.validation_sha256
  # The round is the merge of the two kept updates.
  kept = ["cyrillic", "latin"]
  w = outer.cap_weights([federation.weight_cap(config)] * 2, federation.weight_cap(config))
  want, _ = federation.merge_spec(config).outer_step(
      params, outer.init_outer_state(federation.merge_spec(config).tx, params),
      [updates[n] for n in kept], w)
  for n in params:
    np.testing.assert_array_equal(arrays[f"params/{n}"], np.asarray(want[n]), err_msg=n)
  report = audit.audit_round(config, str(tmp_path), 1)
  assert report["identical"] and report["contribution"] == got
  assert f"{BAD}: score {bad['score']!r} (refused)" in audit.format_report(report)


def test_weight_mode_keeps_the_poisoned_update_down_weighted(toy, tmp_path):
  config, _, params, updates = toy
  config = _config(mode="weight")
  config.federation.contribution.down_weight = 0.01
  coord = _publish_round(config, tmp_path, updates)
  rec = coord.run_round(1)
  assert rec["sites"] == list(SITES) and rec["contribution_refused"] == []
  np.testing.assert_allclose(rec["weights"], np.array([1, 0.01, 1]) / 2.01, rtol=1e-6)
  manifest, _ = fed_fakes.read_round(config, tmp_path, 1)
  assert [i["weight"] for i in manifest["extra"]["inputs"]] == rec["weights"]
  assert audit.audit_round(config, str(tmp_path), 1)["identical"]


def test_an_update_the_merge_would_refuse_is_refused_unscored(toy, tmp_path, caplog):
  config, _, _, updates = toy
  nan = {k: v.copy() for k, v in updates[BAD].items()}
  nan["embed"].flat[7] = np.nan
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.publish_initial()
  for n in ("cyrillic", "latin"):
    fed_fakes.publish(config, tmp_path, n, 1, updates[n])
  # Signed by greek, without a declared norm (no clip needs one; NaN is not JSON).
  b, attempt = fed_fakes.bucket(config, tmp_path, BAD), exchange.new_attempt()
  prefix = exchange.update_prefix(1)
  records = exchange.write_arrays(b, exchange.data_prefix(prefix, attempt), nan)
  exchange.write_manifest(b, prefix, fed_fakes.signer(BAD).sign(exchange.make_manifest(
      federation=config.federation.id, kind="update", round=1, author=BAD, attempt=attempt,
      base_round=0, tokens=federation.weight_cap(config), arrays=records, extra={})))
  rec = coord.run_round(1)
  assert rec["sites"] == ["cyrillic", "latin"] and rec["contribution_refused"] == []
  assert any(f"refused update of site {BAD}" in r.getMessage() and "non-finite values in array "
             "embed" in r.getMessage() for r in caplog.records)
  manifest, _ = fed_fakes.read_round(config, tmp_path, 1)
  assert [s["site"] for s in manifest["extra"]["contribution"]["sites"]] == ["cyrillic", "latin"]
  assert audit.audit_round(config, str(tmp_path), 1)["identical"]


def test_refusals_below_the_quorum_commit_nothing(toy, tmp_path):
  config, _, _, updates = toy
  config = _config()
  config.federation.contribution.threshold = 10.0  # No update gains 10 nats per token.
  coord = _publish_round(config, tmp_path, updates)
  with pytest.raises(coord_lib.QuorumError, match=r"round 1: refused updates of \['cyrillic', "
                                                  r"'greek', 'latin'\]; 0 updates remain"):
    coord.run_round(1)
  assert coord.latest() == 0


@pytest.mark.parametrize("tamper,match", [
    (lambda r: r["sites"][1].update(refused=False), r"site greek: refused=False but policy"),
    (lambda r: r["sites"][0].update(score=1.0), r"site cyrillic: recorded score 1\.0 is not "),
    (lambda r: r["sites"].pop(0), r"input cyrillic .* has no recorded score"),
], ids=["refusal_flipped", "score_changed", "input_unscored"])
def test_check_record_catches_what_disagrees(toy, tamper, match):
  _, scorer, params, updates = toy
  checked = scorer.check_arrays(params, list(SITES), [updates[n] for n in SITES])
  checked.digests = ["d0", "d1", "d2"]
  kept, tokens, cap = ["cyrillic", "latin"], [10, 10], 10
  record = checked.record()
  want = contribution.check_record(record, kept, ["d0", "d2"], tokens, cap)
  assert want.tobytes() == checked.weights(kept, tokens, cap).tobytes()
  tamper(record)
  with pytest.raises(ValueError, match=match):
    contribution.check_record(record, kept, ["d0", "d2"], tokens, cap)


# ---------------------------------------------------------------------- a federation


def _poisoned(monkeypatch, scale=-4.0):
  """Site greek sends its honest update flipped and scaled (validly signed, finite)."""
  honest = site_lib.SiteWorker.encoded_update

  def encoded_update(self, round_=None):
    sent = honest(self, round_=round_)
    return {n: scale * v for n, v in sent.items()} if self.name == BAD else sent
  monkeypatch.setattr(site_lib.SiteWorker, "encoded_update", encoded_update)


def _fed_config(mode, **fed):
  """Two rounds of 3 inner steps; the coordinator waits for every site (quorum 2 lets a
  round close without the refused one)."""
  c = _config(mode=mode, rounds=2, inner_steps=3, eval_every=2, compare_alone=False,
              deadline_s=300.0, round_timeout_s=300.0, site_wait_s=300.0, **fed)
  c.train.update(global_batch_size=8, warmup_steps=2, eval_batches=1)
  return c


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
  """The poisoned federation simulated with the check on, off, and without greek at all,
  every site on one device (the deployed test's mesh shape); and the validation set."""
  tmp = tmp_path_factory.mktemp("poisoned")
  one = jax.devices()[:1]
  with pytest.MonkeyPatch.context() as mp:
    _poisoned(mp)
    runs = {"on": simulate.simulate(_fed_config("refuse"), str(tmp / "on"), devices=one),
            "off": simulate.simulate(_fed_config("off"), str(tmp / "off"), devices=one),
            "honest": simulate.simulate(_fed_config("off"), str(tmp / "honest"), devices=one,
                                        drop=lambda r, n: n == BAD)}
  return runs, contribution.Scorer(_fed_config("refuse"))


def test_a_federation_with_a_poisoned_site_learns_like_the_honest_one(poisoned):
  runs, scorer = poisoned
  loss = {k: scorer.loss(v["params"]) for k, v in runs.items()}
  initial = scorer.loss(coord_lib.initial_round(_fed_config("off"))[0])
  # Refused in every round (its score below 0 each time), so the check's run is the
  # honest-only federation; without the check the poisoned site drags it off.
  assert loss["on"] == loss["honest"] < initial, loss
  assert loss["off"] > loss["honest"] + 0.5 * (initial - loss["honest"]), loss
  assert [c["round"] for c in runs["on"]["contribution"]] == [1, 2]
  for c in runs["on"]["contribution"]:
    scores = {s["site"]: s["score"] for s in c["sites"]}
    assert scores[BAD] < 0 < min(scores["cyrillic"], scores["latin"]), c
    assert [s["site"] for s in c["sites"] if s["refused"]] == [BAD]
  for n, v in runs["honest"]["params"].items():
    np.testing.assert_array_equal(runs["on"]["params"][n], v, err_msg=n)


class _NoPreemption:
  """A `preemption.Preemption` for a site in a thread (signals are the main thread's)."""

  def should_stop(self, step: int) -> bool:
    del step
    return False

  def close(self):
    pass


def test_deployed_parties_score_and_refuse_as_the_simulation(poisoned, tmp_path, monkeypatch):
  """The coordinator and the three sites as threads sharing only file:// buckets, each
  site on a device of its own: every round scored, refused and merged as simulated, bit
  for bit, and the audit recomputes every round from the signed scores."""
  runs, _ = poisoned
  config = _fed_config("refuse")
  _poisoned(monkeypatch)
  monkeypatch.setattr(site_lib.preemption, "Preemption", _NoPreemption)
  workdir = str(tmp_path)
  out = {}
  party = functools.partial(fed_fakes.start_party, out)
  coordinator = party("coordinator", fed_fakes.coordinator(config, workdir).run)
  sites = [party(n, lambda n=n, d=d: site_lib.run_site(
      config, n, workdir, devices=[d], private_key=os.path.join(fed_fakes.KEYS, f"{n}.key")))
           for n, d in zip(SITES, jax.devices())]
  for t in (*sites, coordinator):  # A site that fails leaves the coordinator waiting.
    t.join(900)
    assert not t.is_alive() and not isinstance(out[t.name], BaseException), (t.name, out)
  for r, want in enumerate(runs["on"]["contribution"], start=1):
    manifest, arrays = fed_fakes.read_round(config, workdir, r)
    got = manifest["extra"]["contribution"]
    assert [i["site"] for i in manifest["extra"]["inputs"]] == ["cyrillic", "latin"]
    assert [(s["site"], s["score"], s["loss"], s["refused"]) for s in got["sites"]] == \
        [(s["site"], s["score"], s["loss"], s["refused"]) for s in want["sites"]]
    assert got["global_loss"] == want["global_loss"]
  for n, v in runs["on"]["params"].items():
    np.testing.assert_array_equal(arrays[f"params/{n}"], v, err_msg=n)
  reports = audit.audit_federation(config, workdir)
  assert audit.verdict(reports) == "audited 3 rounds: all bit-identical"
