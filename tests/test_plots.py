"""Plots of finished runs: a real tiny launch.train run, a federation and a sweep written
by their real code paths (with the slow simulation replaced by fixed records), the plotted
series checked against those files, the PNGs read back, and the CLI's errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from experiments.configs import federation as fed_config
from experiments.configs import lm
from tapestry_jax import loop
from tapestry_jax import model as model_lib
from tapestry_jax import orchestrate
from tapestry_jax import plots
from tapestry_jax import report
from tapestry_jax import simulate
from tapestry_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = ["cyrillic", "greek", "latin"]


def _check_png(path):
  img = image.imread(path)
  assert img.shape[:2] == (round(plots.FIGSIZE[1] * plots.DPI), round(plots.FIGSIZE[0] * plots.DPI))
  assert img[..., :3].var() > 0, f"{path} is blank"


def _line(fig, gid):
  """The (x, y) data of the artist with this gid (a line, or the bars of a bar chart)."""
  for ax in fig.axes:
    for line in ax.get_lines():
      if line.get_gid() == gid:
        x, y = line.get_data()
        return np.asarray(x, float), np.asarray(y, float)
  gids = [l.get_gid() for a in fig.axes for l in a.get_lines()]
  raise AssertionError(f"no series {gid!r} in {gids}")


def test_a_train_run_writes_its_plot(tmp_path):
  c = lm.get_config("tiny")
  c.data.seq_len = 32
  c.data.synthetic.num_documents = 200
  c.train.update(dict(global_batch_size=8, steps=6, warmup_steps=2, log_every=2, eval_every=3,
                      eval_batches=1, checkpoint_every=6, progress_bar=False, peak_flops=1e11))
  loop.train_and_evaluate(c, str(tmp_path))
  png = tmp_path / "loss.png"
  assert png.exists(), "train_and_evaluate wrote no plot"
  _check_png(png)

  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  fig = plots.figures(str(tmp_path))["loss.png"]
  x, y = _line(fig, "train_loss")
  np.testing.assert_array_equal(x, [r["step"] * 8 * 32 for r in train])
  np.testing.assert_array_equal(y, [r["loss"] for r in train])
  x, y = _line(fig, "eval_loss")
  np.testing.assert_array_equal(x, [r["step"] * 8 * 32 for r in evals])
  np.testing.assert_array_equal(y, [r["eval_loss"] for r in evals])
  np.testing.assert_array_equal(_line(fig, "lr")[1], [r["lr"] for r in train])
  assert plots.run_kind(str(tmp_path)) == "train"


def _fed_config(rounds=4, inner_steps=3, eval_every=2):
  c = fed_config.get_config("tiny/" + ",".join(SITES))
  c.federation.update(dict(rounds=rounds, inner_steps=inner_steps, eval_every=eval_every))
  return c


def _records(c, seed=0):
  """Site records with the fields and cadence simulate.simulate writes: global round g
  evaluated when federation.evaluate_round says so; rounds < R train and send."""
  rng = np.random.default_rng(seed)
  f = c.federation
  recs = []
  for g in range(int(f.rounds) + 1):
    for site in sorted(c.sites.keys()):
      rec = {"site": site, "global_round": g, "bytes_down": 1000}
      if g == int(f.rounds) or g % int(f.eval_every) == 0:
        loss = 6.0 / (1 + g) + rng.uniform(0, 0.5)
        rec.update(eval_loss=loss, eval_bits_per_byte=loss * 1.44)
      if g < int(f.rounds):
        rec.update(train_loss=5.0, tokens=int(f.inner_steps) * 8 * 128, compute_s=1.0,
                   bytes_up=int(rng.integers(50_000, 60_000)))
      recs.append(rec)
  return recs


def _alone(c, seed=1):
  rng = np.random.default_rng(seed)
  return {s: {"eval_loss": float(rng.uniform(1, 2)), "eval_bits_per_byte": 2.0}
          for s in sorted(c.sites.keys())}


def test_a_federation_writes_its_plots(tmp_path, monkeypatch):
  c = _fed_config()
  recs, alone = _records(c), _alone(c)
  monkeypatch.setattr(simulate, "simulate", lambda config, workdir: {"records": recs})
  monkeypatch.setattr(simulate, "train_alone", lambda config, workdir: alone)
  summary, _ = orchestrate.run_federation(c, str(tmp_path), mode="simulate")
  paths = [tmp_path / n for n in
           ("federation_rounds.png", "federation_tokens.png", "federation_bytes.png")]
  for p in paths:
    assert p.exists(), f"run_federation wrote no {p.name}"
    _check_png(p)

  figs = plots.figures(str(tmp_path))
  evaluated = [0, 2, 4]
  for site in SITES:
    mine = [r for r in recs if r["site"] == site]
    x, y = _line(figs["federation_rounds.png"], f"federated/{site}")
    np.testing.assert_array_equal(x, evaluated)
    np.testing.assert_array_equal(y, [r["eval_loss"] for r in mine if "eval_loss" in r])
    assert _line(figs["federation_rounds.png"], f"alone/{site}")[1][0] == alone[site]["eval_loss"]
  # Global round g was merged from rounds 0..g-1: the tokens and bytes sent before it.
  sent = lambda g: np.mean([sum(r.get("bytes_up", 0) for r in recs
                                if r["site"] == s and r["global_round"] < g) for s in SITES])
  mean_loss = [np.mean([r["eval_loss"] for r in recs if r["global_round"] == g]) for g in evaluated]
  x, y = _line(figs["federation_tokens.png"], "federated/mean")
  np.testing.assert_allclose(x, [g * 3 * 8 * 128 for g in evaluated])
  np.testing.assert_allclose(y, mean_loss)
  x, y = _line(figs["federation_tokens.png"], "alone/mean")
  assert x[0] == 4 * 3 * 8 * 128
  np.testing.assert_allclose(y, [np.mean([v["eval_loss"] for v in alone.values()])])
  x, y = _line(figs["federation_bytes.png"], "federated/bytes")  # Round 0 sent nothing.
  np.testing.assert_allclose(x, [sent(g) for g in evaluated[1:]])
  np.testing.assert_allclose(y, mean_loss[1:])
  n = model_lib.count_params(model_lib.ModelConfig.from_config(c.model))
  x, _ = _line(figs["federation_bytes.png"], "data_parallel/bytes")
  assert x[0] == 4 * n * 4 * 3, "data parallelism: 4 bytes x params x 12 steps"
  assert summary["final"]["latin"]["alone"]["eval_loss"] == alone["latin"]["eval_loss"]


def test_the_data_parallel_reference_is_plotted_where_it_exists(tmp_path):
  c = _fed_config()
  dp = _alone(c, seed=2)
  report.write(report.summarize(c, _records(c), alone=_alone(c), data_parallel=dp), str(tmp_path))
  figs = plots.figures(str(tmp_path))  # No config.json: the summary's byte count is used.
  for site in SITES:
    y = _line(figs["federation_rounds.png"], f"data_parallel/{site}")[1]
    assert y[0] == dp[site]["eval_loss"]
  np.testing.assert_allclose(_line(figs["federation_tokens.png"], "data_parallel/mean")[1],
                             [np.mean([v["eval_loss"] for v in dp.values()])])
  steps = int(c.federation.rounds) * int(c.federation.inner_steps)
  x = _line(figs["federation_bytes.png"], "data_parallel/bytes")[0]
  assert x[0] == report.data_parallel_bytes(c.model, steps)
  assert len(plots.plot_run(str(tmp_path))) == 3


def test_a_sweep_writes_its_plots(tmp_path, monkeypatch):
  monkeypatch.setattr(simulate, "simulate",
                      lambda config, workdir, drop=None: {"records": _records(config)})
  monkeypatch.setattr(simulate, "train_alone", lambda config, workdir: _alone(config))
  runs = [{"name": f"H{h}", "federation.inner_steps": h, "federation.rounds": 12 // h}
          for h in (6, 2, 3)]
  rows = sweep.run_sweep(_fed_config(), runs, str(tmp_path))
  for name in ("sweep_final.png", "sweep_curves.png"):
    assert (tmp_path / name).exists(), f"run_sweep wrote no {name}"
    _check_png(tmp_path / name)
  figs = plots.figures(str(tmp_path))
  by_h = sorted(rows, key=lambda r: r["overrides"]["federation.inner_steps"])
  x, y = _line(figs["sweep_final.png"], "federated")
  np.testing.assert_array_equal(x, [2, 3, 6])
  np.testing.assert_array_equal(y, [r["eval_loss"] for r in by_h])
  np.testing.assert_array_equal(_line(figs["sweep_final.png"], "alone")[1],
                                [r["alone_eval_loss"] for r in by_h])
  assert figs["sweep_final.png"].axes[0].get_xlabel() == "federation.inner_steps"
  for r in rows:  # Each run's curve ends at the run's final mean loss.
    assert _line(figs["sweep_curves.png"], f"federated/{r['name']}")[1][-1] == pytest.approx(
        r["eval_loss"])


def test_a_corrupt_summary_is_a_plot_error_and_only_a_warning_at_the_end_of_a_run(tmp_path):
  (tmp_path / "summary.json").write_text('{"per_round": [')
  with pytest.raises(plots.PlotError, match="summary.json: not valid JSON"):
    plots.plot_run(str(tmp_path))
  assert plots.plot_run_or_warn(str(tmp_path)) == []


def _cli(*workdirs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "launch.plot", *workdirs], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_the_cli_plots_runs_and_rejects_other_directories(tmp_path):
  fed = tmp_path / "fed"
  c = _fed_config()
  report.write(report.summarize(c, _records(c), alone=_alone(c)), str(fed))
  (tmp_path / "empty").mkdir()
  r = _cli(str(fed))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.splitlines() == [f"federation: {fed / n}" for n in (
      "federation_rounds.png", "federation_tokens.png", "federation_bytes.png")]
  for bad, why in ((tmp_path / "empty", "not a finished run"),
                   (tmp_path / "missing", "no such directory")):
    r = _cli(str(fed), str(bad))
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert errors == [f"error: {bad}: {why}" + (
        " (no sweep.jsonl, summary.json, or metrics.jsonl with final_metrics.json)"
        if why == "not a finished run" else "")]
    assert r.stdout == "", "a bad directory is reported before any plot is written"


def test_a_sweep_without_one_numeric_setting_is_a_bar_chart(tmp_path, monkeypatch):
  monkeypatch.setattr(simulate, "simulate",
                      lambda config, workdir, drop=None: {"records": _records(config)})
  monkeypatch.setattr(simulate, "train_alone", lambda config, workdir: _alone(config))
  runs = [{"name": "two", "sites": "latin,greek"}, {"name": "three", "sites": ",".join(SITES)}]
  rows = sweep.run_sweep(_fed_config(), runs, str(tmp_path))
  _check_png(tmp_path / "sweep_final.png")
  ax = plots.figures(str(tmp_path))["sweep_final.png"].axes[0]
  heights = lambda gid: [p.get_height() for p in ax.patches if p.get_gid() == gid]  # noqa: E731
  assert heights("federated") == [r["eval_loss"] for r in rows]
  assert heights("alone") == [r["alone_eval_loss"] for r in rows]
  assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["two", "three"]
