"""The outer momentum's warmup and decay over rounds (Pier): its values, the update it
gives, the streaming merge == the whole outer step, the audit, and bad settings."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_audit
import test_merge
from tapestry_jax import audit
from tapestry_jax import buckets
from tapestry_jax import exchange as ex
from tapestry_jax import federation
from tapestry_jax import merge
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax.outer_config import RoundMergeSpec

# Momentum 0.9 after 4 rounds of warmup from 0.5, falling to 0.1 over the last 3 of 10 rounds.
SCHEDULED = dict(name="nesterov", lr=0.7, momentum=0.9, momentum_warmup_rounds=4,
                 momentum_start=0.5, momentum_decay_rounds=3, momentum_end=0.1, total_rounds=10)


def test_momentum_schedule_values():
  m = outer_config.momentum_schedule(SCHEDULED)
  got = [float(m(t)) for t in range(10)]
  want = [0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9 - 0.8 / 3, 0.9 - 1.6 / 3, 0.1]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  only_decay = outer_config.momentum_schedule(dict(SCHEDULED, momentum_warmup_rounds=0))
  np.testing.assert_allclose([float(only_decay(t)) for t in (0, 6, 9)], [0.9, 0.9, 0.1],
                             rtol=1e-6)
  assert outer_config.momentum_schedule(dict(name="nesterov")) is None  # The default: off.


@pytest.mark.parametrize("name", ["nesterov", "sgd"])
def test_each_round_uses_its_scheduled_momentum(name):
  """trace <- g + m_t trace; Nesterov steps by -lr (g + m_t trace), heavy ball by -lr trace."""
  cfg = dict(SCHEDULED, name=name)
  tx = outer_config.make_outer_optimizer(cfg)
  m = outer_config.momentum_schedule(cfg)
  p = jnp.zeros((3,), jnp.float32)
  state, trace = tx.init(p), np.zeros(3)
  assert set(outer.state_leaves(state)) == {"0/count", "0/trace"}
  assert outer.blockable_leaves(tx, p) == {"0/count": False, "0/trace": True}
  rng = np.random.default_rng(0)
  for t in range(10):
    g = rng.standard_normal(3).astype(np.float32)
    upd, state = tx.update(jnp.asarray(g), state, p)
    m_t = float(m(t))
    trace = g + m_t * trace
    np.testing.assert_allclose(np.asarray(upd), -0.7 * (g + m_t * trace if name == "nesterov"
                                                         else trace), rtol=1e-5, atol=1e-6)
  assert int(outer.state_leaves(state)["0/count"]) == 10
  # Without a schedule: optax's own sgd, one trace leaf (today's state, bit for bit).
  plain = outer_config.make_outer_optimizer(dict(name=name, lr=0.7, momentum=0.9))
  assert set(outer.state_leaves(plain.init(p))) == {"0/trace"}


def _with_count(tx, count):
  """`tx` whose fresh state has taken `count` outer steps (a round deep into the schedule)."""
  return optax.GradientTransformation(
      lambda p: optax.tree_utils.tree_set(tx.init(p), count=jnp.asarray(count, jnp.int32)),
      tx.update)


@pytest.mark.parametrize("count", [0, 2, 8])
def test_merge_round_is_bit_identical_to_the_whole_outer_step(tmp_path, count):
  tx = outer_config.make_outer_optimizer(SCHEDULED)
  glob, inputs, params, state, deltas = test_merge._round(
      tmp_path, _with_count(tx, count), np.random.default_rng(count))
  weights = outer.cap_weights([1, 2, 3], None)
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights)
  base = ex.read_manifest(glob, ex.global_prefix(0))
  prefix = ex.data_prefix(ex.global_prefix(1), ex.new_attempt())
  records = merge.merge_round(RoundMergeSpec(tx), glob, ex.global_prefix(0), base, inputs,
                              weights, glob, prefix, max_block_bytes=64)
  test_merge._assert_stored(glob, prefix, records, want_params, want_state)
  assert int(outer.state_leaves(want_state["d"])["0/count"]) == count + 1
  # The schedule matters: constant momentum 0.9 gives other params.
  constant_state = {n: (optax.TraceState(trace=s[0].trace), s[1]) for n, s in state.items()}
  constant, _ = outer.outer_step(outer_config.make_outer_optimizer(
      dict(name="nesterov", lr=0.7, momentum=0.9)), params, constant_state, deltas, weights)
  assert not np.array_equal(constant["d"], want_params["d"])


def test_an_audit_of_rounds_with_the_schedule_passes(tmp_path):
  """Round 1 with momentum 0.5 (warmup from it), round 2 with 0.3 (decayed to it):
  the global manifests record the schedule and the audit recomputes both bit for bit."""
  config = test_audit._config()
  o = config.federation.outer
  o.momentum_warmup_rounds, o.momentum_start = 1, 0.5
  o.momentum_decay_rounds, o.momentum_end = 1, 0.3
  federation.check_federation_config(config)
  test_audit._federate(config, tmp_path)
  reports = [audit.audit_round(config, str(tmp_path), r) for r in (0, 1, 2)]
  assert all(r["identical"] and not r["mismatches"] for r in reports), reports
  recorded = reports[2]["outer"]
  assert (recorded["momentum_warmup_rounds"], recorded["momentum_decay_rounds"],
          recorded["total_rounds"]) == (1, 1, 2)
  glob = buckets.Bucket(federation.bucket_urls(config, str(tmp_path))[federation.GLOBAL])
  manifest = ex.read_manifest(glob, ex.global_prefix(2))
  count = ex.read_block(glob, ex.data_prefix(ex.global_prefix(2), manifest),
                        "outer/embed/0/count", manifest["arrays"]["outer/embed/0/count"], ())
  assert int(count) == 2


@pytest.mark.parametrize("cfg,match", [
    (dict(SCHEDULED, momentum_warmup_rounds=-1),
     r"outer\.momentum_warmup_rounds must be an integer >= 0; got -1"),
    (dict(SCHEDULED, momentum_decay_rounds=1.5),
     r"outer\.momentum_decay_rounds must be an integer >= 0; got 1\.5"),
    (dict(SCHEDULED, momentum_start=1.0), r"outer\.momentum_start must be a number in \[0\.0, 1\.0\)"),
    (dict(SCHEDULED, momentum_end=-0.1), r"outer\.momentum_end must be a number in \[0\.0, 1\.0\)"),
    (dict(SCHEDULED, total_rounds=6),
     r"outer\.momentum_warmup_rounds=4 \+ momentum_decay_rounds=3 must be at most "
     r"outer\.total_rounds=6"),
    (dict(SCHEDULED, total_rounds=0), r"must be at most outer\.total_rounds=0"),
    (dict(name="adam", momentum_warmup_rounds=2),
     r"outer\.momentum_warmup_rounds is a nesterov and sgd setting; set it to 0 for adam"),
    (dict(name="moments", steps_per_round=2, momentum_decay_rounds=2),
     r"outer\.momentum_decay_rounds is a nesterov and sgd setting; set it to 0 for moments"),
])
def test_bad_momentum_schedule_is_one_clear_error(cfg, match):
  with pytest.raises(ValueError, match=match):
    outer_config.make_outer_optimizer(cfg)


def test_a_bad_schedule_in_a_federation_config_is_one_config_error():
  config = test_audit._config()
  config.federation.outer.momentum_decay_rounds = 3  # More than the 2 rounds.
  with pytest.raises(federation.ConfigError,
                     match=r"^federation\.outer: outer\.momentum_warmup_rounds=0 \+ "
                           r"momentum_decay_rounds=3 must be at most outer\.total_rounds=2"):
    federation.check_federation_config(config)
