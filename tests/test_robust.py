"""Robust outer step: norm clipping, trimmed mean and median, the config check, declared
norms in the streaming merge, and streaming == whole-tree outer step bit for bit."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tapestry_jax import diloco
from tapestry_jax import exchange as ex
from tapestry_jax import merge
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax.outer_config import RoundMergeSpec
from tapestry_jax.buckets import Bucket

# A scalar, an empty array, a vector, rows that no chunk size divides, and a 3-D array.
SHAPES = {"a": (), "b": (0, 5), "c": (7,), "d": (37, 6), "e": (5, 3, 4)}
# FedAvg: the new global is the old one minus the merged pseudo-gradient, so the merged
# delta can be read off the result.
FEDAVG = {"name": "sgd", "lr": 1.0, "momentum": 0.0}


def _robust(**kw) -> ml_collections.ConfigDict:
  cfg = outer_config.default_robust_config()
  cfg.update(kw)
  return cfg


def _deltas(rng, n_sites, bad=None, boost=100.0, noise=0.1):
  """Honest sites: one shared direction plus small noise. Site `bad` (if any) sends
  `boost` times an honest delta (use a negative boost for a sign flip)."""
  common = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  deltas = [{n: (c + noise * rng.standard_normal(c.shape)).astype(np.float32)
             for n, c in common.items()} for _ in range(n_sites)]
  if bad is not None:
    deltas[bad] = {n: np.float32(boost) * d for n, d in deltas[bad].items()}
  return deltas


def _params_and_state(tx, rng):
  """Random global params and a non-trivial per-leaf outer state (random momentum)."""
  params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  leaves = {}
  for n, p in params.items():
    for leaf, v in outer.state_leaves(jax.device_get(tx.init(p))).items():
      v = np.asarray(v)
      leaves[f"outer/{n}/{leaf}"] = (np.abs(rng.standard_normal(v.shape)).astype(v.dtype)
                                     if v.ndim else v)
  state = {n: outer.state_from_leaves(tx, p, {l: leaves[f"outer/{n}/{l}"]
                                              for l in outer.state_leaves(tx.init(p))})
           for n, p in params.items()}
  return params, state, leaves


def _store(tmp_path, params, leaves, deltas, norms):
  """Global round 0 and one update per site in file:// buckets, each written with its own
  chunk size (so merge blocks span several chunks); site k's manifest declares norms[k]
  (None: no declaration). Returns (glob, base prefix, base manifest, merge inputs)."""
  glob = Bucket(str(tmp_path / "global"))
  attempt = ex.new_attempt()
  base = ex.global_prefix(0)
  records = ex.write_arrays(glob, ex.data_prefix(base, attempt),
                            {**{f"params/{n}": p for n, p in params.items()}, **leaves},
                            max_chunk_bytes=256)
  base_manifest = {"attempt": attempt, "arrays": records, "extra": {}}
  inputs = []
  for k, (delta, norm) in enumerate(zip(deltas, norms)):
    bucket = Bucket(str(tmp_path / f"site{k}"))
    attempt = ex.new_attempt()
    records = ex.write_arrays(bucket, ex.data_prefix(ex.update_prefix(1), attempt), delta,
                              max_chunk_bytes=(128, 512, 300)[k % 3])
    extra = {} if norm is None else {"update_norm": norm}
    inputs.append((bucket, ex.update_prefix(1), {"attempt": attempt, "arrays": records,
                                                 "extra": extra}))
  return glob, base, base_manifest, inputs


def _merge(tx, stored, weights, declared_norms=None, **robust):
  """merge_round into a fresh attempt of global round 1, 64-byte blocks, with the robust
  settings `robust`; returns the merged arrays, read back whole."""
  glob, base, base_manifest, inputs = stored
  out = ex.data_prefix(ex.global_prefix(1), ex.new_attempt())
  records = merge.merge_round(RoundMergeSpec(tx, **robust), glob, base,
                              base_manifest, inputs, weights, glob, out, max_block_bytes=64,
                              declared_norms=declared_norms)
  return {n: ex.read_block(glob, out, n, r, tuple(slice(0, s) for s in r["shape"]))
          for n, r in records.items()}


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2)
                           for v in jax.tree.leaves(tree))))


def _minus(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


# ---------------------------------------------------------------------- config


def test_default_config_is_the_plain_mean_and_every_field_is_checked():
  cfg = outer_config.default_robust_config()
  assert outer_config.robust_kwargs(cfg) == {"clip_norm": 0.0, "aggregator": "mean", "trim": 1}
  assert outer_config.robust_kwargs(None) == outer_config.robust_kwargs(cfg)
  assert outer_config.robust_kwargs({"aggregator": "median"})["aggregator"] == "median"
  outer_config.check_robust_config(cfg, num_sites=2, quorum=1)
  trimmed = _robust(aggregator="trimmed_mean", trim=2)
  outer_config.check_robust_config(trimmed, num_sites=5, quorum=5)
  outer_config.check_robust_config(trimmed, num_sites=5, quorum=0)
  outer_config.check_robust_config(_robust(aggregator="median", clip_norm=1.5), num_sites=4,
                                   quorum=3)


@pytest.mark.parametrize("kw,num_sites,quorum,match", [
    (dict(aggregator="trimmed_mean", trim=2), 5, 4,
     r"trimmed_mean with trim=2 needs a quorum of at least 2 \* trim \+ 1 = 5 updates; "
     r"the quorum is 4"),
    (dict(aggregator="trimmed_mean", trim=1), 2, 0, r"at least 2 \* trim \+ 1 = 3 .* quorum is 2"),
    (dict(aggregator="median"), 4, 2, r"median needs a quorum of at least 3 updates"),
    (dict(aggregator="trimmed_mean", trim=0), 5, 5, r"robust\.trim must be >= 1"),
    (dict(trim=-1), 5, 5, r"robust\.trim must be an integer >= 0"),
    (dict(clip_norm=-1.0), 5, 5, r"robust\.clip_norm must be a finite number >= 0"),
    (dict(clip_norm=float("inf")), 5, 5, r"robust\.clip_norm must be a finite number"),
    (dict(aggregator="krum"), 5, 5, r"robust\.aggregator must be one of mean, trimmed_mean, "
                                    r"median; got 'krum'"),
    ({}, 3, 4, r"quorum must be between 0 \(= all\) and the number of sites 3; got 4"),
])
def test_check_robust_config_refuses_what_the_sites_cannot_support(kw, num_sites, quorum, match):
  with pytest.raises(ValueError, match=match):
    outer_config.check_robust_config(_robust(**kw), num_sites=num_sites, quorum=quorum)


def test_update_count_check_for_the_merged_round():
  assert outer.min_updates("trimmed_mean", 2) == 5
  assert outer.min_updates("median", 0) == outer.min_updates("mean", 3) == 1
  outer.check_update_count("trimmed_mean", 2, 5)
  with pytest.raises(ValueError, match=r"trimmed_mean with trim=2 needs at least 5 updates"):
    outer.check_update_count("trimmed_mean", 2, 4)
  tx = outer_config.make_outer_optimizer(FEDAVG)
  g = {"w": jnp.zeros((3,))}
  with pytest.raises(ValueError, match="needs at least 3 updates"):
    outer.outer_step(tx, g, outer.init_outer_state(tx, g), [g, g], [0.5, 0.5],
                     aggregator="trimmed_mean", trim=1)


# ---------------------------------------------------------------------- the math


@functools.partial(jax.jit, static_argnums=0)
def _merge_block_before_robust(tx, global_block, state_block, deltas, weights_K):
  """outer._merge_block_jit as it was before clipping and robust aggregators (frozen
  here): the clip-off mean must still give these bits."""
  delta = weights_K[0] * deltas[0].astype(jnp.float32)
  for k in range(1, len(deltas)):
    delta = delta + weights_K[k] * deltas[k].astype(jnp.float32)
  updates, new_state = tx.update(delta, state_block, global_block)
  return optax.apply_updates(global_block, updates), new_state


def test_clipping_bounds_a_norm_boosted_update():
  tx = outer_config.make_outer_optimizer(FEDAVG)
  rng = np.random.default_rng(0)
  g = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in SHAPES.items()}
  state = outer.init_outer_state(tx, g)
  deltas = _deltas(rng, 4, bad=3, boost=100.0)
  w = outer.cap_weights([1, 2, 3, 4], None)
  honest_norm = max(outer.update_norm(d) for d in deltas[:3])
  clip = 1.5 * honest_norm  # Honest sites are not clipped; the boosted one is.
  assert outer.update_norm(deltas[3]) > 50 * clip
  clipped, _ = outer.outer_step(tx, g, state, deltas, w, clip_norm=clip)
  plain, _ = outer.outer_step(tx, g, state, deltas, w)
  honest_only, _ = outer.outer_step(tx, g, state, deltas[:3] + [jax.tree.map(np.zeros_like,
                                                                             deltas[3])], w)
  # The boosted site moves the global by at most clip_norm times its weight...
  assert _norm(_minus(clipped, honest_only)) <= float(w[3]) * clip * (1 + 1e-5)
  assert _norm(_minus(clipped, honest_only)) >= float(w[3]) * clip * (1 - 1e-5)
  # ...so the whole step is at most clip_norm (weights sum to 1, nothing renormalized)...
  assert _norm(_minus(clipped, g)) <= clip * (1 + 1e-5)
  # ...while without clipping it moves the global by far more.
  assert _norm(_minus(plain, g)) > 20 * clip


def test_clip_above_every_norm_and_clip_off_are_bit_identical_to_the_plain_mean():
  tx = outer_config.make_outer_optimizer({"name": "nesterov"})
  rng = np.random.default_rng(1)
  params, state, _ = _params_and_state(tx, rng)
  deltas = _deltas(rng, 3)
  w = outer.cap_weights([3, 1, 2], None)
  plain, plain_state = outer.outer_step(tx, params, state, deltas, w)
  for kw in (dict(clip_norm=0.0, aggregator="mean", trim=0),
             dict(clip_norm=10 * max(outer.update_norm(d) for d in deltas))):
    got, got_state = outer.outer_step(tx, params, state, deltas, w, **kw)
    jax.tree.map(np.testing.assert_array_equal, got, plain)
    jax.tree.map(np.testing.assert_array_equal, got_state, plain_state)
  # And it is the merge as it was before robust merging existed, bit for bit.
  for n in SHAPES:
    want, want_state = _merge_block_before_robust(tx, params[n], state[n],
                                                  tuple(d[n] for d in deltas), w)
    np.testing.assert_array_equal(np.asarray(plain[n]), np.asarray(want))
    jax.tree.map(np.testing.assert_array_equal, plain_state[n], want_state)


@pytest.mark.parametrize("n_sites", [4, 5])
def test_robust_aggregators_match_a_numpy_reference(n_sites):
  rng = np.random.default_rng(2)
  x_KxN = rng.standard_normal((n_sites, 50)).astype(np.float32)
  scales = np.linspace(0.5, 1.0, n_sites).astype(np.float32)
  tx = outer_config.make_outer_optimizer(FEDAVG)
  g = jnp.zeros((50,), jnp.float32)
  w = outer.cap_weights([1] * n_sites, None)
  clipped = np.sort(scales[:, None].astype(np.float64) * x_KxN, axis=0)
  for aggregator, trim, want in [("median", 0, np.median(clipped, axis=0)),
                                 ("trimmed_mean", 1, clipped[1:-1].mean(axis=0))]:
    got, _ = outer.merge_block(tx, g, tx.init(g), list(x_KxN), w, scales=scales,
                               aggregator=aggregator, trim=trim)
    np.testing.assert_allclose(-np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg=aggregator)


@pytest.mark.parametrize("n_sites,boost", [(4, -100.0), (5, 1e4), (5, -1e4)])
def test_trimmed_mean_and_median_resist_one_bad_update(n_sites, boost):
  tx = outer_config.make_outer_optimizer(FEDAVG)
  rng = np.random.default_rng(3)
  g = {n: jnp.zeros(s, jnp.float32) for n, s in SHAPES.items()}
  state = outer.init_outer_state(tx, g)
  deltas = _deltas(rng, n_sites, bad=1, boost=boost)
  w = outer.cap_weights([1] * n_sites, None)
  honest = [d for k, d in enumerate(deltas) if k != 1]
  honest_mean = jax.tree.map(lambda *xs: -np.mean(np.stack(xs).astype(np.float64), axis=0),
                             *honest)
  scale = _norm(honest_mean)
  plain, _ = outer.outer_step(tx, g, state, deltas, w)
  assert _norm(_minus(plain, honest_mean)) > 10 * scale  # The plain mean is dragged away.
  for kw in (dict(aggregator="trimmed_mean", trim=1), dict(aggregator="median")):
    robust, _ = outer.outer_step(tx, g, state, deltas, w, **kw)
    # Honest sites differ by noise 0.1 per coordinate around a unit direction.
    assert _norm(_minus(robust, honest_mean)) < 0.2 * scale, kw


# ---------------------------------------------------------------------- streaming


@pytest.mark.parametrize("aggregator,trim", [("mean", 0), ("trimmed_mean", 1), ("median", 0)])
@pytest.mark.parametrize("clip", [False, True])
def test_streaming_merge_is_bit_identical_to_outer_step(tmp_path, aggregator, trim, clip):
  tx = outer_config.make_outer_optimizer({"name": "nesterov"})
  rng = np.random.default_rng(4)
  params, state, leaves = _params_and_state(tx, rng)
  deltas = _deltas(rng, 4, bad=2, boost=-50.0)
  norms = [outer.update_norm(d) for d in deltas]  # What each site declares.
  clip_norm = float(np.median(norms)) if clip else 0.0
  stored = _store(tmp_path, params, leaves, deltas, norms)
  w = outer.cap_weights([5, 1, 3, 2], None)
  kw = dict(clip_norm=clip_norm, aggregator=aggregator, trim=trim)
  want, want_state = outer.outer_step(tx, params, state, deltas, w, **kw)  # Norms computed.
  got = _merge(tx, stored, w, **kw)
  for n in SHAPES:
    np.testing.assert_array_equal(got[f"params/{n}"], want[n], err_msg=n)
    for leaf, v in outer.state_leaves(want_state[n]).items():
      np.testing.assert_array_equal(got[f"outer/{n}/{leaf}"], v, err_msg=f"{n}/{leaf}")
  if aggregator == "mean" and not clip:  # Clip off + mean: the merge as it always was.
    plain = _merge(tx, stored, w)
    for n in SHAPES:
      np.testing.assert_array_equal(got[f"params/{n}"], plain[f"params/{n}"])


def test_a_lying_declared_norm_is_a_bad_update_and_the_rest_merge(tmp_path):
  tx = outer_config.make_outer_optimizer(FEDAVG)
  rng = np.random.default_rng(5)
  params, state, leaves = _params_and_state(tx, rng)
  deltas = _deltas(rng, 4, bad=2, boost=100.0)
  norms = [outer.update_norm(d) for d in deltas]
  clip = norms[0]
  lied = norms[:2] + [clip / 2] + norms[3:]  # Site 2 claims to be small, escaping the clip.
  stored = _store(tmp_path, params, leaves, deltas, lied)
  w = outer.cap_weights([1, 1, 1, 1], None)
  with pytest.raises(merge.BadUpdate, match="declared norm") as e:
    _merge(tx, stored, w, clip_norm=clip)
  assert e.value.index == 2
  assert e.value.reason.startswith(f"declared norm {clip / 2!r} != actual norm ")
  # The coordinator merges again without it; that merge is the outer step of the rest.
  glob, base, base_manifest, inputs = stored
  rest = [0, 1, 3]
  w3 = outer.cap_weights([1, 1, 1], None)
  got = _merge(tx, (glob, base, base_manifest, [inputs[k] for k in rest]), w3, clip_norm=clip)
  want, _ = outer.outer_step(tx, params, state, [deltas[k] for k in rest], w3, clip_norm=clip)
  for n in SHAPES:
    np.testing.assert_array_equal(got[f"params/{n}"], want[n])


@pytest.mark.parametrize("bad", [None, float("nan"), -1.0, "3.0", True])
def test_an_unusable_declared_norm_is_refused_before_reading_when_clipping(tmp_path, bad):
  tx = outer_config.make_outer_optimizer(FEDAVG)
  rng = np.random.default_rng(6)
  params, _, leaves = _params_and_state(tx, rng)
  deltas = _deltas(rng, 3)
  norms = [outer.update_norm(d) for d in deltas]
  stored = _store(tmp_path, params, leaves, deltas, [norms[0], bad, norms[2]])
  buckets = [stored[0]] + [b for b, _, _ in stored[3]]
  read0 = [b.bytes_read for b in buckets]
  w = outer.cap_weights([1, 1, 1], None)
  with pytest.raises(merge.BadUpdate, match=r"declared update norm") as e:
    _merge(tx, stored, w, clip_norm=1.0)
  assert e.value.index == 1 and e.value.reason.startswith("bad declared norm")
  assert [b.bytes_read for b in buckets] == read0  # Refused before any array was read.
  # Without clipping the declared norm is not used, so the same updates merge.
  _merge(tx, stored, w)


def test_declared_norms_can_be_passed_explicitly(tmp_path):
  tx = outer_config.make_outer_optimizer(FEDAVG)
  rng = np.random.default_rng(7)
  params, state, leaves = _params_and_state(tx, rng)
  deltas = _deltas(rng, 3, bad=0)
  norms = [outer.update_norm(d) for d in deltas]
  stored = _store(tmp_path, params, leaves, deltas, [None] * 3)  # Nothing in the manifests.
  w = outer.cap_weights([1, 2, 3], None)
  got = _merge(tx, stored, w, clip_norm=norms[1], declared_norms=norms)
  want, _ = outer.outer_step(tx, params, state, deltas, w, clip_norm=norms[1], norms=norms)
  for n in SHAPES:
    np.testing.assert_array_equal(got[f"params/{n}"], want[n])
  with pytest.raises(ValueError, match="3 inputs but 2 declared norms"):
    _merge(tx, stored, w, clip_norm=1.0, declared_norms=norms[:2])


# ---------------------------------------------------------------------- run_diloco


def test_run_diloco_takes_the_robust_section():
  def loss_fn(params, batch):
    return jnp.mean((batch["x_B"] * params["w"] - batch["y_B"]) ** 2)

  def batches(seed, scale):
    rng = np.random.default_rng(seed)
    while True:
      x_B = rng.normal(size=8).astype(np.float32)
      yield {"x_B": x_B, "y_B": scale * 2.0 * x_B}

  def run(robust):
    return diloco.run_diloco(
        loss_fn, {"w": jnp.zeros(())}, [batches(0, 1.0), batches(1, 1.0), batches(2, -50.0)],
        optax.sgd(0.1), RoundMergeSpec.from_config(FEDAVG, robust), rounds=4,
        inner_steps=5)
  # Site 2 fits a target of -100; the median follows the two honest sites (w -> 2).
  assert abs(float(run(_robust(aggregator="median")).params["w"]) - 2.0) < 0.2
  assert float(run(None).params["w"]) < -10.0
  with pytest.raises(ValueError, match=r"needs at least 5 updates"):
    run(_robust(aggregator="trimmed_mean", trim=2))
