"""Shared moments synced every K rounds (`federation.moment_sync_every`, DES-LOC): the
config check, each round's merge rule, the coordinator's refusal of updates whose first
moments do not fit their round, and the audit of such a run. (Simulation == deployment:
tests/test_federation.py.)"""

import re

import jax
import numpy as np
import pytest

import fed_fakes
from tapestry_jax import audit
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import outer
from tapestry_jax import outer_config
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
  c = _config(download_dtype="int8")
  with pytest.raises(ConfigError, match=r"moment_sync_every=2 with "
                                        r"federation.download_dtype='int8' is not supported"):
    federation.check_federation_config(c)
  c.federation.moment_sync_every = 1  # Today's shared moments, every round.
  federation.check_federation_config(c)


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

  m0, a0 = fed_fakes.read_round(config, tmp_path, 0)
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
  params, state = fed_fakes.coord_lib.initial_round(config)
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
