"""Overlapped outer updates (federation.overlap_steps): the carry of local progress onto
the next global round, its checks, and that a deployed site with overlap computes its
simulation's bits, also when preempted in the middle of the steps it trains ahead."""
import functools
import os
import threading
import types

import jax
import numpy as np
import optax
import pytest

from experiments.configs import federation as fed_config
from experiments.sweeps import overlap as overlap_sweep
import fed_fakes

from tapestry_jax import coordinator as coord_lib
from tapestry_jax import federation
from tapestry_jax import preemption
from tapestry_jax import report
from tapestry_jax import simulate
from tapestry_jax import site as site_lib
from tapestry_jax import sweep
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax.validate import ConfigError

H, TAU = 4, 2
_read_round = fed_fakes.read_round


def _config(names="latin", **fed):
  c = fed_config.get_config(f"tiny/{names}")  # Shared moments, float8 updates.
  f = c.federation
  f.rounds, f.inner_steps, f.overlap_steps, f.eval_every = 3, H, TAU, 1
  f.poll_s, f.compare_alone = 0.01, False
  c.train.update(global_batch_size=8, warmup_steps=2, eval_batches=1)
  c.data.seq_len, c.data.synthetic.num_documents = 32, 100
  for k, v in fed.items():
    f[k] = v
  return c


def _host(tree) -> dict[str, np.ndarray]:
  return {n: np.asarray(v) for n, v in trees.flatten(jax.device_get(tree)).items()}


def test_overlap_steps_must_be_between_0_and_h():
  for tau in (0, 1, H):
    federation.check_federation_config(_config(overlap_steps=tau))
  for tau in (-1, H + 1):
    with pytest.raises(ConfigError, match=rf"federation.overlap_steps={tau} must be an "
                                          rf"integer from 0 \(off\) to federation.inner_steps={H}"):
      federation.check_federation_config(_config(overlap_steps=tau))
  base = fed_config.get_config("debref")  # The shipped sweep's runs are valid.
  runs = overlap_sweep.get_sweep()
  assert len({r["name"] for r in runs}) == len(runs) > 1
  for run in runs:
    federation.check_federation_config(sweep.apply_overrides(base, run))


def test_adopt_with_carry_moves_the_local_progress_onto_the_global_round(tmp_path):
  """params <- G + (now - L); the moments of tau AdamW steps from the global ones, mu <-
  b1^tau mu_G + (mu_now - b1^tau mu_L), nu likewise with b2 (never negative, also where
  the global nu is 0 and the site's large); count <- count_G + tau; the kept L survives a
  checkpoint; without carry the global round is taken as it is."""
  config = _config()
  w = site_lib.SiteWorker(config, "latin", str(tmp_path / "a"))
  params0, state0 = coord_lib.initial_round(config)
  w.adopt(trees.unflatten(params0, w.trainer.param_shardings), state0)
  w.train(H)
  w.keep_sent()
  sent_p, sent_mu = _host(w.state.params), _host(optax.tree_utils.tree_get(w.state.opt_state, "mu"))
  sent_nu = _host(optax.tree_utils.tree_get(w.state.opt_state, "nu"))
  w.save({"base_round": 0})  # The kept L goes into the checkpoint, and comes back.
  w.train(TAU)
  now_p, now_mu = _host(w.state.params), _host(optax.tree_utils.tree_get(w.state.opt_state, "mu"))
  now_nu = _host(optax.tree_utils.tree_get(w.state.opt_state, "nu"))
  assert all(not np.array_equal(now_p[n], sent_p[n]) for n in now_p)

  # A next global round: other params, moments (nu 0: the floor must bite), count 2H.
  rng = np.random.default_rng(0)
  g_p = {n: v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype) for n, v in params0.items()}
  g_mu = {n: 1e-3 * rng.standard_normal(v.shape).astype(np.float32) for n, v in params0.items()}
  moments = {n: {"count": np.int32(2 * H), "mu": g_mu[n], "nu": np.zeros_like(g_mu[n])}
             for n in params0}
  w.adopt(trees.unflatten(g_p, w.trainer.param_shardings), moments, carry=True)
  assert w.sent is None
  got_p, got_mu = _host(w.state.params), _host(optax.tree_utils.tree_get(w.state.opt_state, "mu"))
  got_nu = _host(optax.tree_utils.tree_get(w.state.opt_state, "nu"))
  c1, c2 = np.float32(0.9 ** TAU), np.float32(0.95 ** TAU)
  assert (config.train.b1, config.train.b2) == (0.9, 0.95)
  for n in params0:
    np.testing.assert_allclose(got_p[n], g_p[n] + (now_p[n] - sent_p[n]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_mu[n], c1 * g_mu[n] + (now_mu[n] - c1 * sent_mu[n]),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(got_nu[n], np.maximum(now_nu[n] - c2 * sent_nu[n], 0),
                               rtol=0, atol=1e-6 * np.abs(now_nu[n]).max())  # Cancels.
    assert np.all(got_nu[n] >= 0) and np.any(got_nu[n] > 0), n
  # The plain difference nu_G + (nu_now - nu_L) would go negative here (a site whose
  # squared gradients shrink): what the decayed one never does.
  assert any(np.any(now_nu[n] - sent_nu[n] < 0) for n in params0)
  counts = {int(x) for x in jax.tree.leaves(jax.tree_util.tree_map_with_path(
      lambda p, x: x if getattr(p[-1], "name", None) == "count" else None,
      w.state.opt_state)) if x is not None}
  assert counts == {2 * H + TAU}
  for n, v in _host(w.base).items():  # The pseudo-gradient is taken from G.
    np.testing.assert_array_equal(v, g_p[n])

  # Restored: the kept L and the state it was saved with.
  r = site_lib.SiteWorker(config, "latin", str(tmp_path / "a"), trainer=w.trainer)
  assert r.restore() == {"base_round": 0}
  for got, want in ((r.sent["params"], sent_p), (r.sent["mu"], sent_mu), (r.sent["nu"], sent_nu)):
    for n, v in _host(got).items():
      np.testing.assert_array_equal(v, want[n], err_msg=n)
  # Without carry (a missed round): the global round as it is, L dropped.
  r.adopt(trees.unflatten(g_p, r.trainer.param_shardings), moments)
  assert r.sent is None
  for n, v in _host(r.state.params).items():
    np.testing.assert_array_equal(v, g_p[n])
  for n, v in _host(optax.tree_utils.tree_get(r.state.opt_state, "mu")).items():
    np.testing.assert_array_equal(v, g_mu[n])
  with pytest.raises(ValueError, match="without keep_sent"):
    r.adopt(trees.unflatten(g_p, r.trainer.param_shardings), moments, carry=True)
  r.close()
  w.close()


class _StopLatinOnce:
  """A `preemption.Preemption` that stops site latin's thread once, at step STOP_AT (the
  first step it trains ahead of global round 1), as a SIGTERM there would."""
  fired = False

  def __init__(self):
    self.stopped_at = None
    self.mine = threading.current_thread().name == "latin" and not _StopLatinOnce.fired

  def should_stop(self, step: int) -> bool:
    if self.stopped_at is None and self.mine and step == H + 1:
      self.stopped_at = _StopLatinOnce.fired = step
    return self.stopped_at is not None

  def close(self):
    pass


def test_a_deployed_federation_with_overlap_is_its_simulation_through_a_preemption(
    tmp_path, monkeypatch):
  """Two sites and a coordinator (threads sharing only file:// buckets), tau=2 of H=4
  under shared moments, reading float8 downloads (a site holding round r rebuilds round
  r + 1 from it while it trains ahead, `federation.download_dtype`); site latin is preempted after the first of the steps it trains
  ahead of global round 1 (its checkpoint then holds what it sent) and restarted. Every
  global round (params and moments) is the simulation's bit for bit; both sites carried
  their progress onto rounds 1 and 2 and not the last; a site whose update was dropped
  from a round does not carry onto it."""
  config = _config("latin,cyrillic", download_dtype="float8_e4m3fn")
  # Each site on a device of its own, without collectives (in one process, two programs'
  # collectives can take every thread of XLA's CPU pool and wait on each other forever);
  # the simulation on the first (the same mesh shape: the same bits).
  devices = {"latin": jax.devices()[:1], "cyrillic": jax.devices()[1:2]}
  workdir = str(tmp_path / "deploy")
  trust.ensure_local_keys(config, os.path.join(workdir, "keys"), federation.party_names(config))
  monkeypatch.setattr(site_lib.preemption, "Preemption", _StopLatinOnce)
  out = {}

  party = functools.partial(fed_fakes.start_party, out)

  coordinator = party("coordinator", coord_lib.Coordinator(config, workdir).run)
  sites = {n: party(n, lambda n=n: site_lib.run_site(config, n, workdir, devices=devices[n]))
           for n in ("latin", "cyrillic")}
  sites["latin"].join(900)
  assert isinstance(out.get("latin"), preemption.Preempted), out
  meta = site_lib.SiteWorker(config, "latin", os.path.join(workdir, "sites", "latin"),
                             devices=devices["latin"])
  progress = site_lib.Progress.from_meta(meta.restore())
  assert (progress.base_round, progress.published, len(progress.ahead)) == (0, True, 1)
  assert meta.sent is not None  # What it sent, saved with the state it trained on to.
  meta.close()
  sites["latin"] = party("latin", lambda: site_lib.run_site(config, "latin", workdir,
                                                             devices=devices["latin"]))
  for t in (*sites.values(), coordinator):
    t.join(900)
    assert not t.is_alive()
  for name in ("latin", "cyrillic", "coordinator"):
    assert not isinstance(out[name], BaseException), (name, out[name])

  sim = simulate.simulate(config, str(tmp_path / "sim"), devices=devices["latin"])
  manifest, arrays = _read_round(config, workdir, 3)
  for n, want in sim["params"].items():
    np.testing.assert_array_equal(arrays[f"params/{n}"], want, err_msg=n)
  for n, st in sim["outer_state"].items():
    for leaf in ("mu", "nu"):
      np.testing.assert_array_equal(arrays[f"outer/{n}/{leaf}"], getattr(st, leaf), err_msg=n)
  records, _ = report.deployment_records(workdir, ["latin", "cyrillic"])
  deployed = {(r["site"], r["global_round"]): r for r in records}
  for r in sim["records"]:
    got = deployed[(r["site"], r["global_round"])]
    assert got["eval_loss"] == r["eval_loss"], r
    assert (got.get("carried"), got.get("overlap_steps")) == \
        (r.get("carried"), r.get("overlap_steps")), r
    assert bool(r.get("carried")) == (1 <= r["global_round"] <= 2), r
    if r.get("carried") and (r["site"], r["global_round"]) != ("latin", 1):  # Not restarted.
      assert got["ahead_s"] > 0 and got["hidden_s"] > 0, got
      assert got["round_trip_s"] == pytest.approx(got["wait_s"] + got["hidden_s"]), got

  # Read as downloads (a fraction of the whole round 0) while it trained ahead.
  assert deployed[("cyrillic", 2)]["bytes_down"] < deployed[("cyrillic", 0)]["bytes_down"] / 2

  dropped = simulate.simulate(config, str(tmp_path / "dropped"), devices=devices["latin"],
                              drop=lambda r, s: (r, s) == (2, "latin"))
  carried = {(r["site"], r["global_round"]): r.get("carried") for r in dropped["records"]}
  assert carried[("latin", 2)] is False and carried[("cyrillic", 2)] is True


def test_a_background_exchange_raises_what_failed_and_stops_waiting_when_cancelled():
  """`_Exchange`: a publish that fails is raised in the main thread (and no commit is
  claimed); once published, a cancelled wait for the next global round ends the thread."""

  class _Site:
    name = "latin"
    own = glob = types.SimpleNamespace(bytes_written=0, bytes_read=0)

    def __init__(self, fail):
      self.fail = fail

    def publish(self, progress, rec, sent):
      if self.fail:
        raise OSError("bucket unreachable")

    def next_round(self, last_base, stop):
      return site_lib._wait("a global round", lambda: None, 60, 0.01, stop), 0.0

  progress, rec = site_lib.Progress(0, H, False), {"tokens": 1}
  failed = site_lib._Exchange(_Site(fail=True), progress, rec, {})
  with pytest.raises(OSError, match="bucket unreachable"):
    failed.wait_published()
  waiting = site_lib._Exchange(_Site(fail=False), progress, rec, {})
  assert waiting.wait_published() == {"publish_s": pytest.approx(0, abs=1), "bytes_up": 0}
  waiting.cancel()
  with pytest.raises(site_lib.Cancelled):
    waiting.join()


def test_the_overlap_benchmark_counts_only_the_exchange_the_main_thread_waits_on():
  """federation_overhead's steady state (`report.steady_exposure`), from records: a background publish counts as
  its encoding only; steps trained ahead count as inner steps of the window they ran in;
  the window ends at adopting round R - 1 (the last round cannot overlap)."""
  recs = [
      {"global_round": 0, "adopted_at": 0.0, "compute_s": 5.0, "encode_s": 0.1, "wait_s": 0,
       "read_s": 1.0},
      {"global_round": 1, "adopted_at": 10.0, "compute_s": 9.0, "ahead_s": 3.0,
       "encode_s": 0.1, "wait_s": 0.2, "read_s": 0.1},
      {"global_round": 2, "adopted_at": 20.0, "compute_s": 9.0, "ahead_s": 3.0,
       "publish_s": 0.5, "wait_s": 0.3, "read_s": 0.1},
      {"global_round": 3, "adopted_at": 31.0, "compute_s": 9.0, "ahead_s": 3.0,
       "publish_s": 2.0, "wait_s": 0.4, "read_s": 0.2},
      {"global_round": 4, "adopted_at": 45.0, "wait_s": 4.0, "read_s": 0.2, "eval_loss": 2.0},
  ]
  got = report.steady_exposure(recs, 4)
  assert got["wall_s"] == 21.0
  assert got["inner_s"] == pytest.approx(9 + 9 - 3 + 3)  # Round 1's ahead ran before.
  # Round 1's publish in the background (its encoding), round 2's in the foreground,
  # then waiting for and reading rounds 2 and 3; not round 3's phase and round 4.
  assert got["exchange_s"] == pytest.approx(0.1 + 0.5 + 0.3 + 0.1 + 0.4 + 0.2)
  assert got["other_s"] == pytest.approx(21 - 18 - 1.6)
  assert got["final_loss"] == 2.0
