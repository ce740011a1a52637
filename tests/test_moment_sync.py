"""Shared moments synced every K rounds (`federation.moment_sync_every`, DES-LOC): the
config check, each round's merge rule, the coordinator's refusal of updates whose first
moments do not fit their round, the audit of such a run, and a deployed federation with
overlap and downloads that is its simulation. (Simulation == deployment as processes:
tests/test_federation.py.)"""

import functools
import os
import re

import jax
import numpy as np
import pytest

import fed_fakes
from experiments.configs import federation as fed_config
from experiments.sweeps import desloc as desloc_sweep
from tapestry_jax import audit
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax import report
from tapestry_jax import simulate
from tapestry_jax import site as site_lib
from tapestry_jax import sweep
from tapestry_jax import trust
from tapestry_jax.validate import ConfigError

H = 3  # Inner steps per round.


def _config(**fed):
  c = fed_fakes.config(**{"quorum": 2, "inner_steps": H, "moment_sync_every": 2, **fed})
  c.federation.outer.name, c.federation.outer.lr = "moments", 1.0
  return c


def test_moment_sync_every_must_be_an_integer_of_at_least_1_with_outer_moments():
  federation.check_federation_config(_config())
  for bad in (0, -1):
    c = _config()
    c.federation.moment_sync_every = bad
    with pytest.raises(ConfigError, match=rf"federation.moment_sync_every must be an integer "
                                          rf">= 1 .*got {bad}"):
      federation.check_federation_config(c)
  for bad in (1.5, "2", True):
    with pytest.raises(ValueError, match=r"moment_sync_every must be an integer >= 1"):
      outer_config.check_moment_sync_every(bad)
  c = _config()
  c.federation.outer.name = "nesterov"
  with pytest.raises(ConfigError, match=r"moment_sync_every=2 .* needs "
                                        r"federation.outer.name=moments"):
    federation.check_federation_config(c)
  federation.check_federation_config(_config(download_dtype="int8", overlap_steps=1))


def test_each_round_merges_with_its_own_rule():
  spec = federation.merge_spec(_config())
  assert [spec.moment_round(r) for r in range(5)] == [True, False, True, False, True]
  assert spec.for_round(1).tx == outer.SharedParams(1.0)
  assert spec.for_round(2).tx == spec.tx._replace(steps=2 * H)  # The K * H steps since round 0.
  every_round = federation.merge_spec(_config(moment_sync_every=1))
  assert every_round.for_round(1) is every_round  # K = 1: today's spec in every round.
  # A param round moves the params like a moment round and keeps the moments as they are.
  p = {"w": np.ones((2, 4), np.float32)}
  state = outer.init_outer_state(spec.tx, p)
  state["w"] = state["w"]._replace(count=np.int32(6), nu=np.full((2, 4), 0.5, np.float32))
  d = outer.Update({"w": np.full((2, 4), 0.25, np.float32)}, {"w": np.ones((2, 4), np.float32)})
  new_p, new_s = spec.for_round(1).outer_step(p, state, [outer.Update(d.delta)], [1.0])
  moment_p, moment_s = spec.for_round(2).outer_step(p, state, [d], [1.0])
  np.testing.assert_array_equal(new_p["w"], moment_p["w"])
  assert jax.tree.all(jax.tree.map(np.array_equal, new_s["w"], state["w"]))
  assert int(moment_s["w"].count) == 6 + 2 * H
  with pytest.raises(ValueError, match="first moment"):  # Moments on a param round.
    spec.for_round(1).outer_step(p, state, [d], [1.0])


def _moments(delta):
  return {exchange.moment_key(n): 0.5 * v for n, v in delta.items()}


def test_updates_whose_first_moments_do_not_fit_their_round_are_refused_and_audited(
    tmp_path, caplog):
  config = _config()
  coord = fed_fakes.coordinator(config, tmp_path)
  coord.publish_initial()
  honest = ["cyrillic", "latin"]
  # Round 1 is a param round: greek also sends first moments. Round 2 syncs the
  # moments: greek sends none.
  for round_, hostile, reason in ((1, True, "carries first moments .* a param round"),
                                  (2, False, "lacks the first moments .* a moment round")):
    for i, n in enumerate(honest):
      d = fed_fakes.delta(10 * round_ + i)
      fed_fakes.publish(config, tmp_path, n, round_, {**d, **(_moments(d) if round_ == 2 else {})})
    d = fed_fakes.delta(10 * round_ + 9)
    fed_fakes.publish(config, tmp_path, "greek", round_, {**d, **(_moments(d) if hostile else {})})
    caplog.clear()
    rec = coord.run_round(round_)
    assert rec["sites"] == honest
    assert any("rejected update of site greek" in m.getMessage() and
               re.search(reason, m.getMessage()) for m in caplog.records), \
        [m.getMessage() for m in caplog.records]

  _, a0 = fed_fakes.read_round(config, tmp_path, 0)
  m1, a1 = fed_fakes.read_round(config, tmp_path, 1)
  m2, a2 = fed_fakes.read_round(config, tmp_path, 2)
  assert (m1["extra"]["moment_round"], m2["extra"]["moment_round"]) == (False, True)
  assert m1["extra"]["merge"]["moment_sync_every"] == 2
  outer_keys = [k for k in a0 if k.startswith(exchange.OUTER)]
  for k in outer_keys:  # A param round keeps the moments (and the count) of round 0.
    np.testing.assert_array_equal(a1[k], a0[k], err_msg=k)
  assert {int(v) for k, v in a2.items() if k.endswith("/count")} == {2 * H}
  assert any(not np.array_equal(a2[k], a1[k]) for k in outer_keys if k.endswith("/nu"))
  # Bit for bit the simulation's whole-array merge of each round.
  spec = federation.merge_spec(config)
  params, state = coord_lib.initial_round(config)
  for r in (1, 2):
    ups = []
    for i, n in enumerate(honest):
      d = fed_fakes.delta(10 * r + i)
      ups.append(outer.Update(d, {k: 0.5 * v for k, v in d.items()} if r == 2 else None))
    params, state = spec.for_round(r).outer_step(params, state, ups, [0.5, 0.5])
  params, state = jax.device_get(params), jax.device_get(state)
  for n, want in params.items():
    np.testing.assert_array_equal(a2[f"params/{n}"], want, err_msg=n)
  for n, s in state.items():
    for leaf, want in outer.state_leaves(s).items():
      np.testing.assert_array_equal(a2[f"outer/{n}/{leaf}"], want, err_msg=f"{n}/{leaf}")

  reports = audit.audit_federation(config, str(tmp_path))
  assert audit.verdict(reports) == "audited 3 rounds: all bit-identical"
  # A site refuses a global round that records another kind of round than the schedule's.
  exchange.check_moment_round(m1, config, 1, "here")
  with pytest.raises(exchange.ExchangeError, match=r"here: global round 1 records "
                                                   r"moment_round=True; .* makes it False"):
    exchange.check_moment_round(dict(m1, extra={**m1["extra"], "moment_round": True}),
                                config, 1, "here")


def _threads_config():
  """Two sites, shared moments synced every 2 rounds at H=4, overlap tau=2 and float8
  downloads: round 1 and 3 are param rounds, round 2 a moment round."""
  c = fed_config.get_config("tiny/latin,cyrillic")  # Shared moments, float8 updates.
  f = c.federation
  f.rounds, f.inner_steps, f.overlap_steps, f.eval_every = 3, 4, 2, 1
  f.moment_sync_every, f.download_dtype = 2, "float8_e4m3fn"
  f.poll_s, f.compare_alone = 0.01, False
  f.round_timeout_s = f.site_wait_s = 300.0  # A party that fails ends the others soon.
  c.train.update(global_batch_size=8, warmup_steps=2, eval_batches=1)
  c.data.seq_len, c.data.synthetic.num_documents = 32, 100
  return c


class _NoPreemption:
  """A `preemption.Preemption` for a site in a thread (signals are the main thread's)."""

  def should_stop(self, step: int) -> bool:
    del step
    return False

  def close(self):
    pass


def test_a_deployed_federation_with_overlap_and_downloads_is_its_simulation(
    tmp_path, monkeypatch):
  """Two sites and a coordinator (threads sharing only file:// buckets) with the sync
  period, overlap and downloads together: a site holding round r - 1 applies round r's
  download in param rounds (params only, its own moments kept) and in the moment round
  (the moments of round 0 advanced over 2 x H steps), and carries only its params onto
  a param round. Every global round is the simulation's bit for bit, and audits."""
  config = _threads_config()
  devices = {"latin": jax.devices()[:1], "cyrillic": jax.devices()[1:2]}
  workdir = str(tmp_path / "deploy")
  trust.ensure_local_keys(config, os.path.join(workdir, "keys"), federation.party_names(config))
  monkeypatch.setattr(site_lib.preemption, "Preemption", _NoPreemption)
  out = {}

  party = functools.partial(fed_fakes.start_party, out)

  threads = [party("coordinator", coord_lib.Coordinator(config, workdir).run)]
  threads += [party(n, lambda n=n: site_lib.run_site(config, n, workdir, devices=devices[n]))
              for n in ("latin", "cyrillic")]
  for t in threads:
    t.join(900)
    assert not t.is_alive()
  for name in ("latin", "cyrillic", "coordinator"):
    assert not isinstance(out[name], BaseException), (name, out[name])

  sim = simulate.simulate(config, str(tmp_path / "sim"), devices=devices["latin"])
  rounds = {r: fed_fakes.read_round(config, workdir, r) for r in (1, 2, 3)}
  assert [m["extra"]["moment_round"] for m, _ in rounds.values()] == [False, True, False]
  _, arrays = rounds[3]
  for n, want in sim["params"].items():
    np.testing.assert_array_equal(arrays[f"params/{n}"], want, err_msg=n)
  for n, st in sim["outer_state"].items():
    for leaf in ("mu", "nu"):
      np.testing.assert_array_equal(arrays[f"outer/{n}/{leaf}"], getattr(st, leaf), err_msg=n)
      np.testing.assert_array_equal(rounds[2][1][f"outer/{n}/{leaf}"], getattr(st, leaf))
    assert int(st.count) == 2 * 4
  # A param round's download holds the params' update only.
  assert not any(k.startswith("down/grad") for k in rounds[1][1])
  assert any(k.startswith("down/grad") for k in rounds[2][1])
  records, _ = report.deployment_records(workdir, ["latin", "cyrillic"])
  deployed = {(r["site"], r["global_round"]): r for r in records}
  for r in sim["records"]:
    got = deployed[(r["site"], r["global_round"])]
    assert got["eval_loss"] == r["eval_loss"], r
    assert (got.get("carried"), got.get("overlap_steps")) == \
        (r.get("carried"), r.get("overlap_steps")), r
    assert got["bytes_down"] >= r["bytes_down"], (got, r)  # The buckets' metadata too.
  for n in ("latin", "cyrillic"):  # Downloads: a param round's half of a moment round's.
    down = [deployed[(n, g)]["bytes_down"] for g in range(4)]
    assert down[1] < down[2] < down[0] and down[3] < down[2], down
  assert audit.verdict(audit.audit_federation(config, workdir)) == \
      "audited 4 rounds: all bit-identical"


def test_the_shipped_sweep_gives_valid_configs():
  base = fed_config.get_config("debref2k")
  runs = desloc_sweep.get_sweep()
  assert len({r["name"] for r in runs}) == len(runs) > 1
  assert {r["federation.moment_sync_every"] for r in runs} == {1, 2, 4, 8}
  for run in runs:
    federation.check_federation_config(sweep.apply_overrides(base, run))
