"""A Byzantine minority beyond sign flips: Gaussian-noise and "a little is enough" (ALIE,
Baruch et al. 2019) updates against the clipped mean, the trimmed mean and the median.

Each test asserts the bound the aggregator guarantees, read from `outer.merge_block`: the
clipped mean moves at most the attackers' weight times clip_norm away from the honest
sites' (clipped, weighted, not renormalized) contribution; the trimmed mean (attackers <=
trim) and the median (attackers < half) stay per coordinate within the honest sites'
(clipped) values. The same bounds hold as properties (hypothesis) over random shapes,
token weights, clip norms and attacker counts below each breakdown point; and a
federation with a malicious site is run in process (`diloco.run_diloco` on a toy loss,
`simulate` on the tiny transformer) and through the deployed coordinator.
"""
import statistics

import fed_fakes
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from experiments.configs import federation as fed_config
from tapestry_jax import coordinator as coord_lib
from tapestry_jax import diloco
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax import simulate
from tapestry_jax import site as site_lib
from tapestry_jax.outer_config import RoundMergeSpec

# FedAvg from zero params: the new global is minus the merged pseudo-gradient, exactly.
FEDAVG = {"name": "sgd", "lr": 1.0, "momentum": 0.0}
TX = outer_config.make_outer_optimizer(FEDAVG)
EPS32 = float(np.finfo(np.float32).eps)
SHAPES = {"a": (), "c": (7,), "d": (37, 6), "e": (5, 3, 4)}
ROBUST = {"clipped_mean": dict(clip_norm=1.0), "trimmed_mean": dict(aggregator="trimmed_mean"),
          "median": dict(aggregator="median")}


# ---------------------------------------------------------------------- attacks


def alie_z(n_sites: int, n_bad: int) -> float:
  """z_max of "a little is enough": with s = floor(n / 2 + 1) - m honest sites the
  attackers need on their side for a majority, z = Phi^-1((n - s) / n)."""
  s = n_sites // 2 + 1 - n_bad
  return statistics.NormalDist().inv_cdf((n_sites - s) / n_sites)


def alie(honest, n_bad: int, z: float | None = None) -> list:
  """n_bad copies of mean - z * std of the honest updates per coordinate (z default: z_max)."""
  z = alie_z(len(honest) + n_bad, n_bad) if z is None else z
  def forge(*xs):
    x_KxN = np.stack([np.asarray(x, np.float64) for x in xs])
    return (x_KxN.mean(0) - z * x_KxN.std(0)).astype(np.float32)
  return [jax.tree.map(forge, *honest)] * n_bad


def gaussian(honest, n_bad: int, rng, sigma: float) -> list:
  """n_bad independent updates of N(0, sigma^2) noise per coordinate."""
  return [jax.tree.map(lambda h: (sigma * rng.standard_normal(np.shape(h))).astype(np.float32),
                       honest[0]) for _ in range(n_bad)]


# ---------------------------------------------------------------------- helpers


def _honest(rng, n_sites, noise=0.1):
  """Honest sites: one shared direction plus small per-site noise."""
  common = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
  return [{n: (c + noise * rng.standard_normal(c.shape)).astype(np.float32)
           for n, c in common.items()} for _ in range(n_sites)]


def _merged(deltas, weights, **robust) -> dict[str, np.ndarray]:
  """The merged pseudo-gradient of the whole-tree outer step (the coordinator's program)."""
  zeros = jax.tree.map(lambda d: jnp.zeros(np.shape(d), jnp.float32), deltas[0])
  new, _ = outer.outer_step(TX, zeros, outer.init_outer_state(TX, zeros), deltas, weights,
                            **robust)
  return {n: -np.asarray(v, np.float64) for n, v in new.items()}


def _clipped(deltas, clip_norm) -> list[dict[str, np.ndarray]]:
  """Each delta times its clip scale min(1, clip_norm / ||delta||) in float32, as the merge
  multiplies; computed here, not by the library's clip, so a broken clip cannot hide."""
  scales = [np.float32(min(1.0, clip_norm / max(_norm(d), clip_norm))) if clip_norm
            else np.float32(1) for d in deltas]
  return [{n: (s * v).astype(np.float32) for n, v in d.items()} for s, d in zip(scales, deltas)]


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in tree.values())))


def _minus(a, b):
  return {n: np.asarray(a[n], np.float64) - np.asarray(b[n], np.float64) for n in a}


def _outside(merged, honest_clipped, rtol, drop=0) -> int:
  """How many coordinates of `merged` leave the range of the honest (clipped) values
  without their `drop` smallest and `drop` largest (0: [min, max]), up to `rtol` of the
  largest honest magnitude (float32 summation in the trimmed mean)."""
  count = 0
  for n, m in merged.items():
    h_KxN = np.sort(np.stack([np.asarray(h[n], np.float64) for h in honest_clipped]), axis=0)
    tol = rtol * np.abs(h_KxN).max(0, initial=0.0)
    count += int(np.sum((m < h_KxN[drop] - tol) | (m > h_KxN[len(h_KxN) - 1 - drop] + tol)))
  return count


def _dropped_per_end(aggregator, n_sites, trim) -> int:
  """Values the aggregator drops at each end per coordinate: trim, or for the median
  all but the middle one (odd count) or two (even count)."""
  return trim if aggregator == "trimmed_mean" else (n_sites - 1) // 2


def _clip_bound_check(merged, deltas, weights, bad, clip_norm, what, tol=0.0):
  """The clipped mean's bound: ||merged - sum_honest w_k s_k d_k|| <= sum_bad w_k * clip
  (+ `tol`, an error already in `merged`)."""
  coef = np.asarray(weights, np.float32)
  clipped = _clipped(deltas, clip_norm)
  honest_part = {n: sum(np.float64(coef[k]) * clipped[k][n] for k in range(len(deltas))
                        if k not in bad) for n in merged}
  w_bad = float(sum(np.float64(coef[k]) for k in bad))
  # float32 accumulation: each coordinate off by at most ~K eps of the sum of magnitudes.
  tol += 2 * len(deltas) * EPS32 * sum(float(coef[k]) * _norm(c) for k, c in enumerate(clipped))
  dev = _norm(_minus(merged, honest_part))
  assert dev <= w_bad * clip_norm * (1 + 4 * EPS32) + tol, (what, dev, w_bad * clip_norm)
  return honest_part, w_bad


# ---------------------------------------------------------------------- the attacks, one round


N_SITES, N_BAD = 7, 2  # Below every breakdown point used here: trim 2, median 3.


def _attacked_round(attack, rng):
  """(deltas, bad site indices, honest deltas): the attackers first and last in the
  merge's fixed order, so no aggregator gains from where they sit."""
  honest = _honest(rng, N_SITES - N_BAD)
  if attack == "gaussian":
    forged = gaussian(honest, N_BAD, rng, sigma=100.0)
  elif attack == "alie":
    forged = alie(honest, N_BAD)
  else:  # alie_x1000: ALIE without the stealth, z far beyond z_max.
    forged = alie(honest, N_BAD, z=1000.0)
  deltas = [forged[0], *honest, forged[1]]
  return deltas, {0, N_SITES - 1}, honest


@pytest.mark.parametrize("attack", ["gaussian", "alie", "alie_x1000"])
@pytest.mark.parametrize("robust", list(ROBUST))
def test_a_byzantine_minority_moves_the_robust_merge_at_most_its_bound(attack, robust):
  rng = np.random.default_rng(17)
  deltas, bad, honest = _attacked_round(attack, rng)
  w = outer.cap_weights(rng.integers(1, 1000, N_SITES), None)
  kw = dict(ROBUST[robust], trim=N_BAD)
  if robust == "clipped_mean":  # Below every norm, as an ALIE update is as long as an honest one.
    kw["clip_norm"] = 0.5 * min(outer.update_norm(h) for h in honest)
  got = _merged(deltas, w, **kw)
  if robust == "clipped_mean":
    _clip_bound_check(got, deltas, w, bad, kw["clip_norm"], attack)
  else:  # Per coordinate within the honest values, however large the attack. (ALIE at
    # z_max with attackers = trim sits inside [min, max] itself: the plain mean passes too.)
    drop = _dropped_per_end(robust, N_SITES, N_BAD) - N_BAD
    assert _outside(got, honest, 2 * N_SITES * EPS32, drop) == 0
  # The plain mean under the same attack leaves the honest range and the robust bound
  # (except stealthy ALIE, which stays inside the honest spread by design, see below).
  if attack != "alie":
    plain = _merged(deltas, w)
    assert _outside(plain, honest, 1e-3) > 0.9 * sum(np.size(v) for v in plain.values())
    honest_mean = _merged(honest, outer.cap_weights([1] * len(honest), None))
    assert _norm(_minus(plain, honest_mean)) > 10 * max(_norm(_minus(got, honest_mean)),
                                                         _norm(honest_mean))


@pytest.mark.parametrize("robust", ["trimmed_mean", "median"])
def test_alie_stays_inside_the_honest_spread_and_shifts_the_robust_merge_within_it(robust):
  """What the robust merge does not do, so that no one claims it: ALIE's value sits inside
  the honest spread, so the trimmed mean and the median keep it and are shifted by it
  (within their bounds, checked above). The guarantee is a range, not the honest mean."""
  rng = np.random.default_rng(18)
  deltas, _, honest = _attacked_round("alie", rng)
  w = outer.cap_weights([1] * N_SITES, None)
  kw = dict(ROBUST[robust], trim=N_BAD)
  forged = deltas[0]
  h_KxN = {n: np.stack([h[n] for h in honest]) for n in SHAPES}
  inside = np.mean(np.concatenate([((forged[n] >= h.min(0)) & (forged[n] <= h.max(0))).ravel()
                                   for n, h in h_KxN.items()]))
  assert inside > 0.9, inside  # Stealthy: not an outlier a coordinate-wise filter drops.
  got = _merged(deltas, w, **kw)
  honest_only = _merged(honest, outer.cap_weights([1] * len(honest), None), **dict(kw, trim=1))
  shift = np.concatenate([(got[n] - honest_only[n]).ravel() for n in SHAPES])
  assert np.mean(shift < 0) > 0.9  # Pulled toward mean - z * std on most coordinates.


# ---------------------------------------------------------------------- properties


# Fixed examples (the same every run) and no example database in the tree; generation is
# not what a loaded CI machine should be judged on.
PROPERTY = dict(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _round(draw, aggregator):
  """A merge round of K sites, n_bad of them (up to the aggregator's breakdown point, at
  random places in the merge order) attackers sending arbitrary finite values, each its
  own or all the same (colluding); random leaf shapes, token counts, weight cap, clip."""
  k = draw(st.integers(3, 8))
  trim = draw(st.integers(1, (k - 1) // 2)) if aggregator == "trimmed_mean" else 0
  most = {"trimmed_mean": trim, "median": (k - 1) // 2, "mean": k - 1}[aggregator]
  n_bad = draw(st.integers(0, most))
  shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
                         min_size=1, max_size=2))
  # Honest values on a 1/1024 grid: no float32 subnormals, which XLA:CPU flushes to zero.
  honest_el = st.floats(-100, 100, width=32)
  bad_el = st.floats(-2.0**100, 2.0**100, width=32)
  deltas = []
  for i in range(k):
    tree = {}
    for j, shape in enumerate(shapes):
      x = draw(hnp.arrays(np.float32, shape, elements=bad_el if i < n_bad else honest_el))
      tree[f"p{j}"] = (np.round(x * 1024) / 1024).astype(np.float32)
    deltas.append(tree)
  if n_bad and draw(st.booleans()):  # Colluding: every attacker sends the same values.
    deltas[1:n_bad] = [deltas[0]] * (n_bad - 1)
  order = draw(st.permutations(range(k)))
  deltas = [deltas[i] for i in order]
  bad = {order.index(i) for i in range(n_bad)}
  tokens = draw(st.lists(st.integers(1, 10**6), min_size=k, max_size=k))
  cap = draw(st.none() | st.integers(1, 10**6))
  clips = st.floats(0.01, 1000)  # The clipped mean needs a clip; the others may have none.
  clip = draw(clips if aggregator == "mean" else st.just(0.0) | clips)
  return dict(deltas=deltas, bad=bad, weights=outer.cap_weights(tokens, cap), clip=clip,
              trim=trim)


@settings(**PROPERTY)
@given(_round("mean"))
def test_property_the_clipped_mean_moves_at_most_attacker_weight_times_clip(r):
  got = _merged(r["deltas"], r["weights"], clip_norm=r["clip"])
  _, w_bad = _clip_bound_check(got, r["deltas"], r["weights"], r["bad"], r["clip"],
                               "clipped mean")
  # Hence within w_bad * (clip + ||honest mean||) of the honest sites' weighted mean (the
  # weights are not renormalized: the honest part is (1 - w_bad) x that mean).
  honest = [d for k, d in enumerate(r["deltas"]) if k not in r["bad"]]
  w_h = [float(r["weights"][k]) for k in range(len(r["deltas"])) if k not in r["bad"]]
  mean = {n: sum(w * c[n] for w, c in zip(w_h, _clipped(honest, r["clip"]))) / sum(w_h)
          for n in got}
  tol = 4 * len(r["deltas"]) * EPS32 * (r["clip"] + _norm(mean))
  assert _norm(_minus(got, mean)) <= w_bad * (r["clip"] + _norm(mean)) + tol


@pytest.mark.parametrize("aggregator", ["trimmed_mean", "median"])
def test_property_trimmed_mean_and_median_stay_in_the_honest_range(aggregator):
  """With b attackers and t values dropped at each end (b <= t), every kept value has at
  least t - b honest values below it and above it: the output lies within the honest
  values less their t - b smallest and largest, [min, max] at the breakdown point."""
  @settings(**PROPERTY)
  @given(_round(aggregator))
  def check(r):
    got = _merged(r["deltas"], r["weights"], clip_norm=r["clip"], aggregator=aggregator,
                  trim=r["trim"])
    honest = [c for k, c in enumerate(_clipped(r["deltas"], r["clip"])) if k not in r["bad"]]
    # The median picks (or halves the sum of two) honest-bounded values: exact, but for
    # the last bit of a clip scale (norms summed in another order). The trimmed mean sums
    # up to K values in float32 first.
    rtol = (2 * EPS32 if r["clip"] else 0.0) if aggregator == "median" else (
        2 * len(r["deltas"]) * EPS32)
    drop = _dropped_per_end(aggregator, len(r["deltas"]), r["trim"]) - len(r["bad"])
    assert _outside(got, honest, rtol, drop) == 0, drop
  check()


# ---------------------------------------------------------------------- a federation


D = 8
W_STAR_D = np.random.default_rng(99).standard_normal(D).astype(np.float32)


def _loss(params, batch):
  return jnp.mean((batch["x_BxD"] @ params["w_D"] + params["b"] - batch["y_B"]) ** 2)


def _batches(seed):
  """A site's data: one linear model for every site, plus label noise."""
  rng = np.random.default_rng(seed)
  while True:
    x_BxD = rng.standard_normal((16, D)).astype(np.float32)
    y_B = x_BxD @ W_STAR_D + 0.5 + 0.1 * rng.standard_normal(16)
    yield {"x_BxD": x_BxD, "y_B": y_B.astype(np.float32)}


class _Malicious:
  """A round merge whose first `n_bad` sites send Gaussian noise instead of their
  pseudo-gradients: a malicious site controls its update, never the merge itself."""

  def __init__(self, spec: RoundMergeSpec, n_bad: int, sigma: float):
    self.spec, self.n_bad, self.sigma = spec, n_bad, sigma
    self.rng = np.random.default_rng(0)

  def __getattr__(self, name):  # tx, shared_moments, weights: the spec's own.
    return getattr(self.spec, name)

  def outer_step(self, params, state, updates, weights):
    honest = [u.delta for u in updates[self.n_bad:]]
    forged = [outer.Update(f) for f in gaussian(honest, self.n_bad, self.rng, self.sigma)]
    return self.spec.outer_step(params, state, forged + list(updates[self.n_bad:]), weights)


def _federation_loss(n_sites, spec) -> float:
  """Held-out loss of the global model after 10 rounds of 5 inner SGD steps per site."""
  init = {"w_D": jnp.zeros(D), "b": jnp.zeros(())}
  result = diloco.run_diloco(_loss, init, [_batches(i) for i in range(n_sites)],
                             optax.sgd(0.05), spec, rounds=10, inner_steps=5)
  return float(_loss(result.params, next(_batches(1234))))


def test_a_gaussian_noise_site_in_a_federation_is_contained_by_the_robust_merge():
  """One site of five sends N(0, 10^2) noise every round. The trimmed mean and the median
  end near the honest-only federation; the clipped mean within the attacker's per-round
  push (weight x clip) of it; the plain mean is ruined."""
  honest = _federation_loss(4, RoundMergeSpec.from_config(FEDAVG))
  losses = {}
  for name, robust in [("mean", None), *ROBUST.items()]:
    spec = _Malicious(RoundMergeSpec.from_config(FEDAVG, robust), n_bad=1, sigma=10.0)
    losses[name] = _federation_loss(5, spec)
  assert losses["trimmed_mean"] < 1.5 * honest, (honest, losses)
  assert losses["median"] < 1.5 * honest, (honest, losses)
  # clip 1 is above every honest norm; the attacker moves the global <= 1/5 per round.
  assert losses["clipped_mean"] < honest + 3 * (1.0 / 5) ** 2, (honest, losses)
  assert losses["mean"] > 100 * max(honest, losses["clipped_mean"]), (honest, losses)


# ---------------------------------------------------------------------- the real system


# Tiny sites, one round of 3 inner steps: enough for the held-out loss to fall clearly.
SIM = {"federation.rounds": 1, "federation.inner_steps": 3, "federation.compare_alone": False,
       "federation.eval_every": 1, "train.global_batch_size": 8, "train.warmup_steps": 2,
       "train.eval_batches": 2, "data.seq_len": 64, "data.synthetic.num_documents": 200}


def _sim_config(sites: str, aggregator: str):
  c = fed_config.get_config(f"tiny+fedavg/{sites}")
  for key, value in SIM.items():
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  c.federation.robust.aggregator = aggregator
  return c


def test_a_gaussian_noise_site_in_the_simulated_federation(tmp_path, monkeypatch):
  """The transformer federation as `simulate` runs it (the sites' trainers, the encoded
  updates and declared norms, the coordinator's merge spec); greek sends N(0, 1) noise in
  place of its update every round. The honest sites' held-out loss of the final global:
  with the median as without greek; with the plain mean worse than the untrained model."""
  honest_update = site_lib.SiteWorker.encoded_update

  def noisy(worker, round_=None):
    sent = honest_update(worker, round_)
    if worker.name != "greek":
      return sent
    rng = np.random.default_rng(round_)
    return {n: jnp.asarray(rng.standard_normal(np.shape(v)), jnp.float32)
            for n, v in sent.items()}

  monkeypatch.setattr(site_lib.SiteWorker, "encoded_update", noisy)
  honest_sites = ("cyrillic", "latin")
  losses = {}
  for run, sites, aggregator in [("honest_only", "latin,cyrillic", "mean"),
                                 ("mean", "latin,cyrillic,greek", "mean"),
                                 ("median", "latin,cyrillic,greek", "median")]:
    records = simulate.simulate(_sim_config(sites, aggregator), str(tmp_path / run))["records"]
    losses[run] = {r["site"]: r["eval_loss"] for r in records if r["global_round"] == 1}
    losses["initial"] = {r["site"]: r["eval_loss"] for r in records if r["global_round"] == 0}
  for site in honest_sites:
    honest = losses["honest_only"][site]
    assert honest < 0.8 * losses["initial"][site], losses  # Training works at all.
    assert abs(losses["median"][site] - honest) < 0.02 * honest, losses
    assert losses["mean"][site] > losses["initial"][site], losses


# ---------------------------------------------------------------------- the deployed merge


@pytest.mark.parametrize("robust", ["mean", *ROBUST])
def test_the_coordinator_contains_a_gaussian_noise_site(tmp_path, robust):
  """greek publishes N(0, 1) noise (100x an honest update's scale), validly signed, with
  its true norm declared; the deployed coordinator streams the merge from the buckets."""
  config = fed_fakes.config(rounds=1)
  kw = {"mean": {}, **ROBUST}[robust]
  for key, value in kw.items():
    config.federation.robust[key] = value
  config.federation.robust.trim = 1
  honest = {n: fed_fakes.delta(40 + i) for i, n in enumerate(fed_fakes.SITES) if n != "greek"}
  noise = gaussian(list(honest.values()), 1, np.random.default_rng(41), sigma=1.0)[0]
  for n in fed_fakes.SITES:
    fed_fakes.publish(config, tmp_path, n, 1, noise if n == "greek" else honest[n])
  fed_fakes.coordinator(config, tmp_path).run()
  _, arrays = fed_fakes.read_round(config, tmp_path, 1)
  initial, _ = coord_lib.initial_round(config)
  # Equal token counts: weights 1/3 each. new = initial - merged, rounded once in float32,
  # and rounding is monotone: a merged value within [lo, hi] gives new within these.
  new = {n: arrays[f"params/{n}"] for n in initial}
  clip = kw.get("clip_norm", 0.0)
  clipped = _clipped(list(honest.values()), clip)
  lo = {n: np.minimum(*(c[n] for c in clipped)) for n in initial}
  hi = {n: np.maximum(*(c[n] for c in clipped)) for n in initial}
  inside = all(((initial[n] - hi[n] <= new[n]) & (new[n] <= initial[n] - lo[n])).all()
               for n in initial)
  step = _norm(_minus(new, initial))
  if robust in ("trimmed_mean", "median"):  # 3 sites, trim 1: the median of 3 either way.
    assert inside
  elif robust == "clipped_mean":
    merged = {n: -v for n, v in _minus(new, initial).items()}
    # Reading merged back from new - initial costs up to an ulp of each per coordinate.
    ulps = _norm({n: np.spacing(np.abs(initial[n])) + np.spacing(np.abs(new[n]))
                  for n in initial})
    _clip_bound_check(merged, [honest["cyrillic"], noise, honest["latin"]],
                      outer.cap_weights([1, 1, 1], None), {1}, clip, "coordinator", tol=ulps)
  else:
    assert not inside and step > 10 * max(_norm(d) for d in honest.values())
