"""run_diloco: special cases (FedAvg, H=1 == data parallelism), participation, weights, state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tapestry_jax import diloco
from tapestry_jax import outer_config
from tapestry_jax.outer_config import RoundMergeSpec

D = 3
W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)


def loss_fn(params, batch):
  pred_B = batch["x_BxD"] @ params["w_D"] + params["b"]
  return jnp.mean((pred_B - batch["y_B"]) ** 2)


def _batches(seed, n, B=8, shift=0.0):
  """`n` linear-regression batches; `shift` makes the sites' data non-IID."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    x_BxD = rng.normal(size=(B, D)).astype(np.float32) + shift
    y_B = (x_BxD @ W_TRUE + 0.3 + 0.1 * rng.normal(size=B)).astype(np.float32)
    out.append({"x_BxD": x_BxD, "y_B": y_B})
  return out


def _init():
  return {"w_D": jnp.zeros((D,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def _np_sgd_site(params, batches, lr):
  """Reference inner loop: plain SGD written out (p - lr * grad), one batch at a time."""
  for b in batches:
    g = jax.grad(loss_fn)(params, b)
    params = jax.tree.map(lambda p, gi: p - lr * gi, params, g)
  return params


def _close(a, b, tol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=tol, atol=tol), a, b)


def test_h1_sgd_fedavg_equals_data_parallel_step_on_combined_batch():
  lr = 0.1
  site_data = [_batches(0, 1), _batches(1, 1, shift=1.0)]
  fedavg = RoundMergeSpec.from_config({"name": "sgd", "lr": 1.0, "momentum": 0.0})
  res = diloco.run_diloco(loss_fn, _init(), site_data, optax.sgd(lr), fedavg,
                          rounds=1, inner_steps=1)
  combined = {k: np.concatenate([site_data[0][0][k], site_data[1][0][k]]) for k in ("x_BxD", "y_B")}
  g = jax.grad(loss_fn)(_init(), combined)
  want = jax.tree.map(lambda p, gi: p - lr * gi, _init(), g)
  _close(res.params, want)
  assert np.abs(np.asarray(want["w_D"])).max() > 0.05  # a real step, not zeros == zeros


def test_h1_sgd_fedadam_equals_adam_data_parallel_on_combined_batches():
  # FedAdam (Reddi et al. 2021): inner SGD lr 1, Adam as the outer optimizer. At H=1 the
  # pseudo-gradient is the sites' mean gradient, so T rounds are T steps of Adam (same
  # schedule) on the combined batches: the adaptivity lives at the coordinator.
  rounds = 6
  site_data = [_batches(0, rounds), _batches(1, rounds, shift=1.0)]
  cfg = {"name": "adam", "lr": 0.05, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
         "schedule": "cosine", "warmup_rounds": 2, "decay_rounds": rounds}
  res = diloco.run_diloco(loss_fn, _init(), site_data, optax.sgd(1.0),
                          RoundMergeSpec.from_config(cfg), rounds=rounds, inner_steps=1)
  adam = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, rounds, 0.005),
                    b1=0.9, b2=0.95, eps=1e-8)
  params, state = _init(), None
  state = adam.init(params)
  for r in range(rounds):
    combined = {k: np.concatenate([site_data[0][r][k], site_data[1][r][k]])
                for k in ("x_BxD", "y_B")}
    upd, state = adam.update(jax.grad(loss_fn)(params, combined), state, params)
    params = optax.apply_updates(params, upd)
  _close(res.params, params, tol=1e-5)
  assert np.abs(np.asarray(params["w_D"])).max() > 0.05  # it moved


def test_outer_clip_makes_h1_fedadam_data_parallel_clipped_adam():
  # Data parallelism clips the MEAN gradient; clipping each site's instead is another
  # algorithm. With the outer clip (the merged pseudo-gradient's global norm) and
  # unclipped inner SGD lr 1, T rounds are T steps of clipped Adam on the combined batches.
  rounds, clip = 5, 0.5
  site_data = [_batches(0, rounds), _batches(1, rounds, shift=1.0)]
  cfg = {"name": "adam", "lr": 0.05, "b1": 0.9, "b2": 0.95, "eps": 1e-8}
  res = diloco.run_diloco(loss_fn, _init(), site_data, optax.sgd(1.0),
                          RoundMergeSpec.from_config({**cfg, "clip_norm": clip}),
                          rounds=rounds, inner_steps=1)
  dp = optax.chain(optax.clip_by_global_norm(clip), optax.adam(0.05, b1=0.9, b2=0.95, eps=1e-8))
  per_site = optax.adam(0.05, b1=0.9, b2=0.95, eps=1e-8)  # each site's gradient clipped
  params, state = _init(), dp.init(_init())
  other, other_state = _init(), per_site.init(_init())
  norms = []
  for r in range(rounds):
    combined = {k: np.concatenate([site_data[0][r][k], site_data[1][r][k]])
                for k in ("x_BxD", "y_B")}
    g = jax.grad(loss_fn)(params, combined)
    norms.append(float(optax.tree.norm(g)))
    upd, state = dp.update(g, state, params)
    params = optax.apply_updates(params, upd)
    site_g = [jax.grad(loss_fn)(other, site_data[i][r]) for i in range(2)]
    site_g = [jax.tree.map(lambda x, n=optax.tree.norm(s): x * jnp.minimum(1.0, clip / n), s)
              for s in site_g]
    upd, other_state = per_site.update(jax.tree.map(lambda a, b: (a + b) / 2, *site_g),
                                       other_state, other)
    other = optax.apply_updates(other, upd)
  assert max(norms) > 2 * clip  # The clip bites.
  _close(res.params, params, tol=1e-5)
  with pytest.raises(AssertionError):  # ... and per-site clipping is not the same thing.
    _close(res.params, other, tol=1e-5)


def test_fedavg_global_is_weighted_mean_of_sites_with_token_weights():
  # Unequal batch sizes, weighted by examples: site 1 has 3x the data.
  site_data = [_batches(0, 4, B=4), _batches(1, 4, B=12, shift=0.5)]
  fedavg = RoundMergeSpec.from_config({"name": "sgd", "lr": 1.0, "momentum": 0.0})
  res = diloco.run_diloco(loss_fn, _init(), site_data, optax.adam(0.05), fedavg, rounds=2,
                          inner_steps=2, tokens_fn=lambda b: b["y_B"].shape[0])
  np.testing.assert_allclose(res.history[-1]["weights"], [0.25, 0.75], rtol=1e-6)
  assert res.history[-1]["tokens"] == [8, 24]
  want = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, *res.site_params)
  _close(res.params, want)


def test_weight_cap_limits_an_inflating_site():
  # Each batch carries the token count its site reports; site 1 inflates its claim.
  site_data = [[{**b, "claimed": np.int32(100)} for b in _batches(0, 2)],
               [{**b, "claimed": np.int32(10**6)} for b in _batches(1, 2)]]
  tokens_fn = lambda b: int(b["claimed"])
  avg = RoundMergeSpec.from_config({"name": "none"})
  capped = diloco.run_diloco(loss_fn, _init(), site_data, optax.sgd(0.05),
                             RoundMergeSpec.from_config({"name": "none"},
                                                                     weight_cap=200),
                             rounds=1, inner_steps=2, tokens_fn=tokens_fn)
  # Per round: site 0 reports 200, site 1 reports 2*10**6, capped at 200: equal weights.
  np.testing.assert_allclose(capped.history[0]["weights"], [0.5, 0.5])
  _close(capped.params, jax.tree.map(lambda a, b: 0.5 * (a + b), *capped.site_params))
  uncapped = diloco.run_diloco(loss_fn, _init(), site_data, optax.sgd(0.05), avg, rounds=1,
                               inner_steps=2, tokens_fn=tokens_fn)
  assert uncapped.history[0]["weights"][1] > 0.99


def test_dropped_site_continues_from_its_own_weights_and_rejoins():
  lr, H = 0.05, 3
  data = [_batches(s, 3 * H, shift=0.5 * s) for s in range(3)]
  dropped = {(1, 1)}  # site 1 misses round 1
  fedavg = RoundMergeSpec.from_config({"name": "sgd", "lr": 1.0, "momentum": 0.0})

  # Reference: the algorithm written out by hand, with a snapshot after every round.
  g = _init()
  site = [_init()] * 3
  snapshots = []
  for r in range(3):
    live = [(r, s) not in dropped for s in range(3)]
    for s in range(3):
      start = g if live[s] else site[s]
      site[s] = _np_sgd_site(start, data[s][r * H:(r + 1) * H], lr)
    ids = [s for s in range(3) if live[s]]
    g = jax.tree.map(lambda *xs: sum(xs) / len(ids), *[site[s] for s in ids])
    snapshots.append((g, list(site)))
  # Site 1 did not restart from the global in round 1: that is not what restarting gives.
  restarted = _np_sgd_site(snapshots[0][0], data[1][H:2 * H], lr)
  assert not np.allclose(snapshots[1][1][1]["w_D"], restarted["w_D"], atol=1e-3)

  # Stop right after the dropped round (site 1's own trajectory), and one round later (rejoined).
  for rounds in (2, 3):
    res = diloco.run_diloco(loss_fn, _init(), data, optax.sgd(lr), fedavg, rounds=rounds,
                            inner_steps=H, tokens_fn=lambda b: 8,
                            participating=lambda r, s: (r, s) not in dropped)
    want_g, want_sites = snapshots[rounds - 1]
    _close(res.params, want_g, 1e-5)
    for s in range(3):
      _close(res.site_params[s], want_sites[s], 1e-5)
  assert res.history[1]["live"] == [True, False, True]
  np.testing.assert_allclose(res.history[1]["weights"], [0.5, 0.0, 0.5])  # renormalised over live
  np.testing.assert_allclose(res.history[2]["weights"], [1 / 3] * 3, rtol=1e-6)
  assert res.history[0]["tokens"] == [3 * 8] * 3


def test_round_with_no_live_site_keeps_global_and_outer_state():
  data = [_batches(0, 4), _batches(1, 4)]
  tx = RoundMergeSpec.from_config(outer_config.default_outer_config())
  res = diloco.run_diloco(loss_fn, _init(), data, optax.sgd(0.05), tx, rounds=2, inner_steps=2,
                          participating=lambda r, s: r == 0)
  one = diloco.run_diloco(loss_fn, _init(), [iter(d) for d in data], optax.sgd(0.05), tx,
                          rounds=1, inner_steps=2)
  jax.tree.map(np.testing.assert_array_equal, res.params, one.params)
  jax.tree.map(np.testing.assert_array_equal, res.outer_state, one.outer_state)
  assert res.history[1]["weights"] == [0.0, 0.0]


def test_sites_keep_their_inner_state_and_training_converges():
  H, R = 10, 8
  data = [_batches(s, H * R, shift=0.3 * s) for s in range(2)]
  inner = [optax.adam(0.1), optax.adam(0.05)]  # per-site optimizers
  records = []
  # Milder outer momentum than the paper's 0.9: with 8 rounds, 0.9 still oscillates here.
  outer_tx = RoundMergeSpec.from_config({"name": "nesterov", "lr": 1.0, "momentum": 0.3})
  res = diloco.run_diloco(loss_fn, _init(), data, inner, outer_tx, rounds=R, inner_steps=H,
                          callback=records.append)
  assert records == res.history and len(records) == R
  # Inner Adam counts span all rounds: the state was not reset at each sync.
  assert [int(s[0].count) for s in res.site_opt_states] == [H * R, H * R]
  assert all(np.any(np.asarray(s[0].trace) != 0) for s in res.outer_state.values())  # momentum
  first, last = np.mean(records[0]["loss"]), np.mean(records[-1]["loss"])
  assert last < 0.1 * first, (first, last)
  np.testing.assert_allclose(res.params["w_D"], W_TRUE, atol=0.15)


def test_sign_one_round_moves_global_toward_sites():
  data = [_batches(0, 3)]
  res = diloco.run_diloco(loss_fn, _init(), data, optax.sgd(0.05),
                          RoundMergeSpec.from_config(
                              {"name": "sgd", "lr": 0.5, "momentum": 0.0}),
                          rounds=1, inner_steps=3)
  # Outer lr 0.5: the global lands halfway between the old global (0) and the site.
  _close(res.params, jax.tree.map(lambda x: 0.5 * x, res.site_params[0]))


def test_bad_arguments_are_clear_errors():
  tx = optax.sgd(0.1)
  spec = RoundMergeSpec(tx)
  with pytest.raises(ValueError, match="ran out of batches at round 1"):
    diloco.run_diloco(loss_fn, _init(), [_batches(0, 3)], tx, spec, rounds=2, inner_steps=2)
  with pytest.raises(ValueError, match="2 inner optimizers for 1 sites"):
    diloco.run_diloco(loss_fn, _init(), [_batches(0, 3)], [tx, tx], spec, rounds=1, inner_steps=1)
  with pytest.raises(ValueError, match="must be >= 1"):
    diloco.run_diloco(loss_fn, _init(), [_batches(0, 3)], tx, spec, rounds=0, inner_steps=1)


def test_shared_moments_carry_adam_of_the_mean_gradient_and_one_site_continues_alone():
  # A linear loss has a constant gradient per site: the global Adam moments after R rounds
  # of H steps are then exactly those of one Adam on the mean gradient (R * H steps), and
  # a single site's federation is that site training alone.
  def linear(params, batch):
    return jnp.sum(params["w"] * batch["c"])

  rng = np.random.default_rng(4)
  cs = [rng.normal(size=5).astype(np.float32) for _ in range(2)]
  R, H, b1, b2 = 3, 4, 0.9, 0.95
  tx = RoundMergeSpec.from_config({"name": "moments", "lr": 1.0, "b1": b1,
                                                "b2": b2, "steps_per_round": H})
  init = {"w": jnp.zeros(5, jnp.float32)}
  res = diloco.run_diloco(linear, init, [[{"c": c}] * (R * H) for c in cs],
                          optax.adamw(1e-2, b1=b1, b2=b2, weight_decay=0.0), tx,
                          rounds=R, inner_steps=H)
  ref = optax.scale_by_adam(b1=b1, b2=b2)
  st = ref.init(init["w"])
  for _ in range(R * H):
    _, st = ref.update(jnp.asarray((cs[0] + cs[1]) / 2), st)
  assert int(res.outer_state["w"].count) == R * H
  np.testing.assert_allclose(res.outer_state["w"].mu, st.mu, rtol=1e-5)
  np.testing.assert_allclose(res.outer_state["w"].nu, st.nu, rtol=1e-4)
  # Each site started its last round from the global second moment (the mean gradient's),
  # not from its own: its own squares entered only in that round's H steps.
  c_mean = (cs[0] + cs[1]) / 2
  for c, site_state in zip(cs, res.site_opt_states):
    nu_global = (1 - b2 ** ((R - 1) * H)) * c_mean ** 2
    want = b2 ** H * nu_global + (1 - b2 ** H) * c ** 2
    np.testing.assert_allclose(optax.tree_utils.tree_get(site_state, "nu")["w"], want, rtol=1e-4)
  one = diloco.run_diloco(linear, init, [[{"c": cs[0]}] * (R * H)], optax.adam(1e-2, b1=b1, b2=b2),
                          tx, rounds=R, inner_steps=H)
  alone = diloco.run_diloco(linear, init, [[{"c": cs[0]}] * (R * H)],
                            optax.adam(1e-2, b1=b1, b2=b2),
                            RoundMergeSpec.from_config({"name": "none"}), rounds=1,
                            inner_steps=R * H)
  _close(one.params, alone.params, tol=1e-5)
