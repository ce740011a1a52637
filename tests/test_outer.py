"""The outer step: FedAvg, Nesterov, Adam vs references; block-wise == whole; weights; errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax import trees


def _cfg(**kw):
  cfg = outer_config.default_outer_config()
  cfg.update(kw)
  return cfg


# One config per optimizer, each with non-trivial state where it has any.
OPTIMIZER_CFGS = {
    "nesterov": _cfg(name="nesterov", lr=0.7, momentum=0.9),
    "sgd": _cfg(name="sgd", lr=0.5, momentum=0.8),
    "adam": _cfg(name="adam", lr=0.3, b1=0.9, b2=0.99, eps=0.1),
    # FedAdam's outer step: Adam on a warmup + cosine schedule over rounds.
    "adam_cosine": _cfg(name="adam", lr=0.3, b1=0.9, b2=0.95, eps=1e-8, schedule="cosine",
                        warmup_rounds=0, decay_rounds=4),
    "none": _cfg(name="none"),
}


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "emb": {"w_VxD": jnp.asarray(scale * rng.normal(size=(10, 7)), jnp.float32)},
      "layers": [{"b_D": jnp.asarray(scale * rng.normal(size=(7,)), jnp.float32)},
                 {"s": jnp.asarray(scale * rng.normal(), jnp.float32)}],
  }


def _sites(global_params, n, seed=10):
  return [jax.tree.map(lambda g, d: g + d, global_params, _tree(seed + i, 0.1)) for i in range(n)]


def _weighted_mean(trees_, weights):
  return jax.tree.map(lambda *xs: sum(np.float64(w) * np.asarray(x, np.float64)
                                      for w, x in zip(weights, xs)), *trees_)


@pytest.mark.parametrize("name,kw", [("sgd", dict(lr=1.0, momentum=0.0)), ("none", {})])
def test_fedavg_and_none_give_weighted_mean_of_sites(name, kw):
  tx = outer_config.make_outer_optimizer(_cfg(name=name, **kw))
  g = _tree(0)
  sites = _sites(g, 3)
  w = outer.cap_weights([100, 300, 600], None)
  state = outer.init_outer_state(tx, g)
  deltas = [outer.pseudo_gradient(g, s) for s in sites]
  new, _ = outer.outer_step(tx, g, state, deltas, w)
  want = _weighted_mean(sites, w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), new, want)
  # The mean is far from the old global, so this is not passing trivially.
  assert np.max(np.abs(np.asarray(new["emb"]["w_VxD"] - g["emb"]["w_VxD"]))) > 0.05


def test_nesterov_two_rounds_match_numpy_reference():
  lr, mu = 0.7, 0.9
  tx = outer_config.make_outer_optimizer(_cfg(name="nesterov", lr=lr, momentum=mu))
  g = _tree(0)
  state = outer.init_outer_state(tx, g)
  w = np.array([0.25, 0.75], np.float32)

  ref = {k: np.asarray(v, np.float64) for k, v in trees.flatten(g).items()}
  trace = {k: np.zeros_like(v) for k, v in ref.items()}
  for rnd in range(2):
    sites = _sites(g, 2, seed=10 + 5 * rnd)
    deltas = [outer.pseudo_gradient(g, s) for s in sites]
    g, state = outer.outer_step(tx, g, state, deltas, w)
    flat_d = [trees.flatten(d) for d in deltas]
    for k in ref:
      d = sum(float(w[i]) * np.asarray(flat_d[i][k], np.float64) for i in range(2))
      trace[k] = d + mu * trace[k]  # momentum buffer
      ref[k] = ref[k] - lr * (d + mu * trace[k])  # Nesterov look-ahead step
    got = trees.flatten(g)
    for k in ref:
      np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
      np.testing.assert_allclose(np.asarray(state[k][0].trace), trace[k], rtol=1e-5, atol=1e-6)


def test_adam_per_leaf_matches_optax_on_whole_tree():
  tx = outer_config.make_outer_optimizer(OPTIMIZER_CFGS["adam"])
  g = _tree(0)
  w = np.array([0.5, 0.3, 0.2], np.float32)
  state = outer.init_outer_state(tx, g)
  ref_g, ref_state = g, tx.init(g)
  for rnd in range(3):
    sites = _sites(g, 3, seed=20 + 3 * rnd)
    deltas = [outer.pseudo_gradient(g, s) for s in sites]
    g, state = outer.outer_step(tx, g, state, deltas, w)
    delta = jax.tree.map(lambda *ds: sum(float(wi) * d for wi, d in zip(w, ds)), *deltas)
    upd, ref_state = tx.update(delta, ref_state, ref_g)
    ref_g = optax.apply_updates(ref_g, upd)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g, ref_g)
  assert all(int(s[0].count) == 3 for s in state.values())


def test_sign_convention_moves_global_toward_sites():
  g = {"w": jnp.zeros((4,), jnp.float32)}
  site = {"w": jnp.asarray([1.0, -2.0, 0.5, 3.0], jnp.float32)}
  delta = outer.pseudo_gradient(g, site)
  np.testing.assert_array_equal(np.asarray(delta["w"]), -np.asarray(site["w"]))  # old minus new
  for name, cfg in OPTIMIZER_CFGS.items():
    tx = outer_config.make_outer_optimizer(cfg)
    new, _ = outer.outer_step(tx, g, outer.init_outer_state(tx, g), [delta], [1.0])
    np.testing.assert_array_equal(np.sign(np.asarray(new["w"])), np.sign(np.asarray(site["w"])),
                                  err_msg=name)


def test_cap_weights_caps_inflated_counts():
  np.testing.assert_allclose(outer.cap_weights([100, 100, 10**9], 200), [0.25, 0.25, 0.5])
  np.testing.assert_allclose(outer.cap_weights([1, 3], None), [0.25, 0.75])
  assert outer.cap_weights([1, 3], None).dtype == np.float32
  # A site inflating its count above the cap changes nothing in the merge.
  tx = outer_config.make_outer_optimizer(OPTIMIZER_CFGS["nesterov"])
  g = _tree(0)
  deltas = [outer.pseudo_gradient(g, s) for s in _sites(g, 3)]
  state = outer.init_outer_state(tx, g)
  honest, _ = outer.outer_step(tx, g, state, deltas, outer.cap_weights([500, 800, 1000], 1000))
  inflated, _ = outer.outer_step(tx, g, state, deltas, outer.cap_weights([500, 800, 10**8], 1000))
  uncapped, _ = outer.outer_step(tx, g, state, deltas, outer.cap_weights([500, 800, 10**8], None))
  jax.tree.map(np.testing.assert_array_equal, honest, inflated)
  assert not np.allclose(honest["emb"]["w_VxD"], uncapped["emb"]["w_VxD"])


@pytest.mark.parametrize("tokens,cap,match", [
    ([0, 0], None, "zero tokens"), ([5, -1], None, ">= 0"), ([1, float("nan")], None, "finite"),
    ([1, 2], 0, "cap must be > 0"), ([], None, "no sites")])
def test_cap_weights_rejects_bad_input(tokens, cap, match):
  with pytest.raises(ValueError, match=match):
    outer.cap_weights(tokens, cap)


def _slice_state(tx, state, param_like, rows):
  """The state of rows [a:b] of one parameter, via its named leaves (as a coordinator stores it)."""
  leaves = outer.state_leaves(state)
  block = outer.blockable_leaves(tx, param_like)
  sliced = {n: (v[rows] if block[n] else v) for n, v in leaves.items()}
  return outer.state_from_leaves(tx, param_like[rows], sliced)


@pytest.mark.parametrize("name", list(OPTIMIZER_CFGS))
def test_blockwise_merge_is_bit_identical_to_whole(name):
  tx = outer_config.make_outer_optimizer(OPTIMIZER_CFGS[name])
  rng = np.random.default_rng(1)
  g_RxC = jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)
  state = tx.init(g_RxC)
  splits = [slice(0, 3), slice(3, 4), slice(4, 10)]  # uneven, one single row
  for rnd in range(3):  # several rounds so momentum / Adam moments and count are non-trivial
    deltas = [jnp.asarray(rng.normal(size=(10, 7)), jnp.float32) for _ in range(3)]
    w = outer.cap_weights([3, 5, 7], None)
    whole_g, whole_state = outer.merge_block(tx, g_RxC, state, deltas, w)

    blocks = [outer.merge_block(tx, g_RxC[rows], _slice_state(tx, state, g_RxC, rows),
                                [d[rows] for d in deltas], w) for rows in splits]
    np.testing.assert_array_equal(np.concatenate([np.asarray(b[0]) for b in blocks]),
                                  np.asarray(whole_g))
    whole_leaves = outer.state_leaves(whole_state)
    block_kind = outer.blockable_leaves(tx, g_RxC)
    for leaf_name, whole_leaf in whole_leaves.items():
      parts = [np.asarray(outer.state_leaves(b[1])[leaf_name]) for b in blocks]
      if block_kind[leaf_name]:
        np.testing.assert_array_equal(np.concatenate(parts), np.asarray(whole_leaf))
      else:  # scalars (Adam's count): every block must agree with the whole.
        for p in parts:
          np.testing.assert_array_equal(p, np.asarray(whole_leaf))
    assert not np.array_equal(np.asarray(whole_g), np.asarray(g_RxC))
    g_RxC, state = whole_g, whole_state


def test_state_leaves_round_trip_and_names():
  tx = outer_config.make_outer_optimizer(OPTIMIZER_CFGS["adam"])
  p = jnp.ones((4, 3), jnp.float32)
  state = tx.init(p)
  leaves = outer.state_leaves(state)
  assert set(leaves) == {"0/count", "0/mu", "0/nu"}
  assert outer.blockable_leaves(tx, p) == {"0/count": False, "0/mu": True, "0/nu": True}
  rebuilt = outer.state_from_leaves(tx, p, {k: np.asarray(v) for k, v in leaves.items()})
  assert jax.tree.structure(rebuilt) == jax.tree.structure(state)
  assert set(outer.state_leaves(tx.init(p))) == set(leaves)
  nesterov = outer_config.make_outer_optimizer(OPTIMIZER_CFGS["nesterov"])
  assert set(outer.state_leaves(nesterov.init(p))) == {"0/trace"}
  assert outer.state_leaves(outer_config.make_outer_optimizer(OPTIMIZER_CFGS["none"]).init(p)) == {}
  with pytest.raises(ValueError, match="0/mu"):  # a mis-sliced leaf fails loudly
    outer.state_from_leaves(tx, p, {**leaves, "0/mu": np.zeros((2, 3), np.float32)})
  with pytest.raises(KeyError, match="0/nu"):
    outer.state_from_leaves(tx, p, {"0/count": leaves["0/count"], "0/mu": leaves["0/mu"]})


def test_make_outer_optimizer_builds_the_named_transformation():
  for name, cfg in OPTIMIZER_CFGS.items():
    assert isinstance(outer_config.make_outer_optimizer(cfg), optax.GradientTransformation), name
  # A plain dict works too; missing fields take the defaults (nesterov 0.7 / 0.9).
  tx = outer_config.make_outer_optimizer({"name": "nesterov"})
  p = jnp.zeros((2,), jnp.float32)
  upd, _ = tx.update(jnp.ones((2,)), tx.init(p), p)
  np.testing.assert_allclose(np.asarray(upd), -0.7 * 1.9 * np.ones(2), rtol=1e-6)
  assert outer_config.default_outer_config().name in outer_config.OUTER_OPTIMIZERS
  # An explicit momentum=None means no momentum (not the 0.9 default): plain SGD, no state.
  plain = outer_config.make_outer_optimizer({"name": "sgd", "lr": 1.0, "momentum": None})
  assert outer.state_leaves(plain.init(p)) == {}


def test_outer_lr_schedules_over_rounds():
  p = jnp.zeros((1,), jnp.float32)

  def lrs(rounds, **kw):  # SGD on a unit gradient moves by exactly lr(round)
    tx = outer_config.make_outer_optimizer(_cfg(name="sgd", lr=2.0, momentum=0.0, **kw))
    state, out = tx.init(p), []
    for _ in range(rounds):
      upd, state = tx.update(jnp.ones((1,)), state, p)
      out.append(-float(upd[0]))
    return out

  assert lrs(3) == [2.0, 2.0, 2.0]  # the default: constant, no warmup, no state
  np.testing.assert_allclose(lrs(4, warmup_rounds=2), [0.0, 1.0, 2.0, 2.0], rtol=1e-6)
  want = optax.warmup_cosine_decay_schedule(0.0, 2.0, 2, 10, 0.2)
  np.testing.assert_allclose(lrs(12, schedule="cosine", warmup_rounds=2, decay_rounds=10),
                             [float(want(i)) for i in range(12)], rtol=1e-6)
  assert lrs(12, schedule="cosine", warmup_rounds=2, decay_rounds=10)[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("cfg,match", [
    (dict(name="sgd", schedule="linear"), r"outer\.schedule must be constant or cosine"),
    (dict(name="sgd", warmup_rounds=-1), r"outer\.warmup_rounds must be an integer >= 0"),
    (dict(name="adam", schedule="cosine", decay_rounds=0),
     r"outer\.decay_rounds must be an integer >= 1"),
    (dict(name="adam", schedule="cosine", warmup_rounds=5, decay_rounds=5),
     r"decay_rounds=5 must be greater than outer\.warmup_rounds=5"),
    (dict(name="adam", schedule="cosine", decay_rounds=9, min_lr_ratio=2.0),
     r"outer\.min_lr_ratio must be a number in \[0\.0, 1\.0\]"),
    (dict(name="nesterov", weight_decay=0.1), r"outer\.weight_decay is an Adam"),
    (dict(name="adam", weight_decay=-1.0), r"outer\.weight_decay must be a number"),
    (dict(name="lamb"), r"outer\.name must be one of nesterov, sgd, adam, none, moments; got 'lamb'"),
    (dict(name="nesterov", lr=-0.1), r"outer\.lr must be a number in \(0\.0, inf\)"),
    (dict(name="sgd", lr=float("nan")), r"outer\.lr must be"),
    (dict(name="sgd", lr="fast"), r"outer\.lr must be a number"),
    (dict(name="nesterov", momentum=1.0), r"outer\.momentum must be a number in \[0\.0, 1\.0\)"),
    (dict(name="adam", eps=0.0), r"outer\.eps must be"),
    (dict(name="adam", b2=1.5), r"outer\.b2 must be"),
    (dict(name="adam", lr=None), r"outer\.lr must be a number .*got None"),
    (dict(name="adam", clip_norm=-1.0), r"outer\.clip_norm must be a number in \[0\.0, inf\)"),
    (dict(name="sgd", clip_norm=float("inf")), r"outer\.clip_norm must be a number"),
    (dict(name="moments"), r"outer\.steps_per_round must be an integer >= 1"),
    (dict(name="moments", steps_per_round=2, schedule="cosine", decay_rounds=4),
     r"moments takes a constant outer\.lr"),
    (dict(name="moments", steps_per_round=2, clip_norm=1.0), r"outer\.clip_norm is not supported"),
    (dict(name="moments", steps_per_round=2, lr=0.0), r"outer\.lr must be a number"),
])
def test_bad_outer_config_is_one_clear_error(cfg, match):
  with pytest.raises(ValueError, match=match):
    outer_config.make_outer_optimizer(ml_collections.ConfigDict(cfg))


def test_merge_block_rejects_mismatched_inputs():
  tx = outer_config.make_outer_optimizer(OPTIMIZER_CFGS["sgd"])
  g = jnp.zeros((3, 2), jnp.float32)
  s = tx.init(g)
  with pytest.raises(ValueError, match="2 deltas but 1 weights"):
    outer.merge_block(tx, g, s, [g, g], [1.0])
  with pytest.raises(ValueError, match="delta 0 has shape"):
    outer.merge_block(tx, g, s, [g[:2]], [1.0])
  with pytest.raises(ValueError, match="at least one"):
    outer.merge_block(tx, g, s, [], [])


def test_outer_weight_decay_spares_excluded_leaves_like_train():
  """Outer AdamW decays every leaf but those named like weight_decay_exclude (default:
  norm scales, as train's AdamW), with one state layout for all leaves."""
  tx = outer_config.make_outer_optimizer({"name": "adam", "lr": 0.1, "eps": 1e-8,
                                   "weight_decay": 0.5})
  assert isinstance(tx, outer.MaskedDecay) and tx.exclude == ("norm",)
  g = {"layers/attn_norm": jnp.ones((2, 3)), "layers/wq": jnp.ones((2, 3))}
  state = outer.init_outer_state(tx, g)
  assert (outer.state_leaves(state["layers/attn_norm"]).keys()
          == outer.state_leaves(state["layers/wq"]).keys())
  zero = {n: jnp.zeros_like(v) for n, v in g.items()}
  new, _ = outer.outer_step(tx, g, state, [zero], [1.0])  # no update: decay alone moves
  np.testing.assert_array_equal(new["layers/attn_norm"], g["layers/attn_norm"])
  np.testing.assert_allclose(new["layers/wq"], 1 - 0.1 * 0.5, rtol=1e-6)
  everything = outer_config.make_outer_optimizer({"name": "adam", "lr": 0.1, "eps": 1e-8,
                                           "weight_decay": 0.5, "weight_decay_exclude": ""})
  new, _ = outer.outer_step(everything, g, outer.init_outer_state(everything, g), [zero], [1.0])
  np.testing.assert_allclose(new["layers/attn_norm"], 1 - 0.1 * 0.5, rtol=1e-6)
  with pytest.raises(ValueError, match="weight_decay_exclude must be a string"):
    outer_config.make_outer_optimizer({"name": "adam", "weight_decay": 0.1,
                                       "weight_decay_exclude": 3})


def _adam_rounds(gradients, weights, *, b1, b2, H, R, lr=1e-2):
  """R rounds of shared moments: every site runs H steps of optax.adam on its constant
  gradient from the global params and moments; returns (global params, outer state)."""
  inner = optax.adam(lr, b1=b1, b2=b2)
  tx = outer_config.make_outer_optimizer(_cfg(name="moments", lr=1.0, b1=b1, b2=b2,
                                              steps_per_round=H))
  params = {"w": jnp.zeros(gradients[0].shape, jnp.float32)}
  state = outer.init_outer_state(tx, params)
  for _ in range(R):
    updates = []
    for g in gradients:
      st = optax.tree_utils.tree_set(inner.init(params), mu={"w": state["w"].mu},
                                     nu={"w": state["w"].nu}, count=state["w"].count)
      p = params
      for _ in range(H):
        u, st = inner.update({"w": g}, st, p)
        p = optax.apply_updates(p, u)
      updates.append(outer.Update({"w": params["w"] - p["w"]},
                                  {"w": optax.tree_utils.tree_get(st, "mu")["w"]}))
    params, state = outer.outer_step(tx, params, state, updates, weights)
  return params, state


def test_shared_moments_carry_the_adam_state_of_the_mean_gradient():
  """With constant site gradients, the global moments after R rounds of H steps are
  exactly (to rounding) what one Adam on the weighted mean gradient keeps after R * H
  steps; with one site, the params are too (a site alone, continued)."""
  rng = np.random.default_rng(0)
  gradients = [jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(3)]
  weights = outer.cap_weights([1, 2, 3], None)
  b1, b2, H, R = 0.9, 0.95, 3, 4
  _, state = _adam_rounds(gradients, weights, b1=b1, b2=b2, H=H, R=R)
  mean = sum(float(w) * g for w, g in zip(weights, gradients))
  ref = optax.scale_by_adam(b1=b1, b2=b2)
  ref_state = ref.init(mean)
  for _ in range(R * H):
    _, ref_state = ref.update(mean, ref_state)
  assert int(state["w"].count) == R * H
  np.testing.assert_allclose(state["w"].mu, ref_state.mu, rtol=1e-5)
  np.testing.assert_allclose(state["w"].nu, ref_state.nu, rtol=1e-4)
  # The second moment is the mean gradient's, not the mean of the sites' squares.
  assert not np.allclose(state["w"].nu, sum(float(w) * g * g for w, g in zip(weights, gradients))
                         * (1 - b2 ** (R * H)), rtol=1e-2)
  one, _ = _adam_rounds(gradients[:1], [1.0], b1=b1, b2=b2, H=H, R=R)
  inner, p = optax.adam(1e-2, b1=b1, b2=b2), {"w": jnp.zeros(6, jnp.float32)}
  st = inner.init(p)
  for _ in range(R * H):
    u, st = inner.update({"w": gradients[0]}, st, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_allclose(one["w"], p["w"], rtol=1e-5, atol=1e-7)


def test_shared_moments_merge_blockwise_bit_identically_and_need_the_moments():
  tx = outer_config.make_outer_optimizer(_cfg(name="moments", lr=1.0, steps_per_round=2))
  rng = np.random.default_rng(2)
  g = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  state = tx.init(g)
  for _ in range(2):
    deltas = [jnp.asarray(rng.normal(size=(9, 4)), jnp.float32) for _ in range(3)]
    mus = [jnp.asarray(rng.normal(size=(9, 4)), jnp.float32) for _ in range(3)]
    w = outer.cap_weights([3, 5, 7], None)
    whole_g, whole_state = outer.merge_block(tx, g, state, deltas, w, moments=mus)
    rows = [slice(0, 2), slice(2, 9)]
    blocks = [outer.merge_block(tx, g[r], _slice_state(tx, state, g, r), [d[r] for d in deltas],
                                w, moments=[m[r] for m in mus]) for r in rows]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), whole_g)
    for leaf in ("mu", "nu"):
      np.testing.assert_array_equal(np.concatenate([getattr(b[1], leaf) for b in blocks]),
                                    getattr(whole_state, leaf))
    g, state = whole_g, whole_state
  assert int(state.count) == 4
  with pytest.raises(ValueError, match="first moments"):
    outer.merge_block(tx, g, state, deltas, w)
  with pytest.raises(ValueError, match="first moments"):
    outer.merge_block(outer_config.make_outer_optimizer(OPTIMIZER_CFGS["sgd"]), g,
                      outer_config.make_outer_optimizer(OPTIMIZER_CFGS["sgd"]).init(g), deltas, w,
                      moments=mus)
