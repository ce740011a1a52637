"""PNG plots of a finished run, written next to its metrics.

`plot_run(workdir)` reads what a run left on disk and draws it; it knows three kinds:
  train       launch.train (loop.py): metrics.jsonl, config.json, final_metrics.json.
  federation  launch.federate (orchestrate.py): summary.json (report.py), config.json.
  sweep       launch.sweep (sweep.py): sweep.jsonl and one summary.json per run.
Figures use matplotlib's object API (a `Figure` saved through the Agg canvas), never
pyplot: plotting opens no window and sets no global backend. matplotlib is imported
only when a figure is drawn.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from absl import logging

from tapestry_jax import report

FIGSIZE = (8.0, 5.0)  # Inches.
DPI = 110


class PlotError(ValueError):
  """A directory that is not a finished run of a known kind, or a corrupt run file."""


# ---------------------------------------------------------------------------- reading


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise PlotError(f"{path}: not valid JSON ({e})") from None


def _read_jsonl(path: str) -> list[dict]:
  try:
    return report.read_jsonl(path)
  except json.JSONDecodeError as e:
    raise PlotError(f"{path}: not valid JSON lines ({e})") from None


def run_kind(workdir: str) -> str:
  """'train', 'federation' or 'sweep': the kind of finished run in `workdir`."""
  if not os.path.isdir(workdir):
    raise PlotError(f"{workdir}: no such directory")
  has = lambda name: os.path.isfile(os.path.join(workdir, name))  # noqa: E731
  if has("sweep.jsonl"):
    return "sweep"
  if has("summary.json"):
    return "federation"
  if has("metrics.jsonl") and has("final_metrics.json"):
    return "train"
  raise PlotError(f"{workdir}: not a finished run (no sweep.jsonl, summary.json, or "
                  f"metrics.jsonl with final_metrics.json)")


def _n_params(config: dict) -> int:
  from tapestry_jax import model as model_lib  # Deferred: jax.

  return model_lib.count_params(model_lib.ModelConfig.from_config(config["model"]))


def train_series(workdir: str) -> dict[str, Any]:
  """A launch.train run's curves against tokens (step x global batch x sequence length):
  train loss and lr at each logged step, eval loss at each evaluation. A resumed run's
  repeated steps count once (the last line wins)."""
  config = _read_json(os.path.join(workdir, "config.json"))
  tokens_per_step = int(config["train"]["global_batch_size"]) * int(config["data"]["seq_len"])
  train, evals = {}, {}
  for rec in _read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if "loss" in rec:
      train[rec["step"]] = rec
    if "eval_loss" in rec:
      evals[rec["step"]] = rec
  steps, eval_steps = sorted(train), sorted(evals)
  return {
      "tokens_per_step": tokens_per_step,
      "preset": config.get("preset", ""), "n_params": _n_params(config),
      "train_tokens": [s * tokens_per_step for s in steps],
      "train_loss": [train[s]["loss"] for s in steps],
      "lr_tokens": [s * tokens_per_step for s in steps if "lr" in train[s]],
      "lr": [train[s]["lr"] for s in steps if "lr" in train[s]],
      "eval_tokens": [s * tokens_per_step for s in eval_steps],
      "eval_loss": [evals[s]["eval_loss"] for s in eval_steps],
  }


def federation_series(summary: dict, config: dict | None = None) -> dict[str, Any]:
  """A federation summary's curves. Per site: the rounds whose global model it evaluated,
  their held-out loss, and the tokens it trained on and bytes it sent before that global
  model existed (global round g merges the updates of rounds 0..g-1). The mean over sites
  at the rounds every site evaluated. The final references (alone, data parallel) per
  site, at the federated run's tokens. With the run's `config`, the bytes data
  parallelism sends per site for the same steps: a float32 gradient of every parameter
  every step, 4 x n_params x rounds x inner_steps."""
  sites = sorted(summary["final"])
  per: dict[str, dict[str, list]] = {s: {"round": [], "eval_loss": [], "tokens": [],
                                         "bytes_sent": []} for s in sites}
  tokens = dict.fromkeys(sites, 0)
  sent = dict.fromkeys(sites, 0)
  for r in sorted(summary["per_round"], key=lambda r: r["round"]):
    for s in sites:
      rec = r["sites"].get(s)
      if rec is None:
        continue
      if "eval_loss" in rec:
        per[s]["round"].append(r["round"])
        per[s]["eval_loss"].append(rec["eval_loss"])
        per[s]["tokens"].append(tokens[s])
        per[s]["bytes_sent"].append(sent[s])
      tokens[s] += rec.get("tokens", 0)
      sent[s] += rec.get("bytes_up", 0)
  common = sorted(set.intersection(*(set(per[s]["round"]) for s in sites))) if sites else []
  at = lambda s, key, g: per[s][key][per[s]["round"].index(g)]  # noqa: E731
  mean = {"round": common,
          "eval_loss": [float(np.mean([at(s, "eval_loss", g) for s in sites])) for g in common],
          "tokens": [float(np.mean([at(s, "tokens", g) for s in sites])) for g in common],
          "bytes_sent": [float(np.mean([at(s, "bytes_sent", g) for s in sites]))
                         for g in common]}
  refs = {}
  for key in ("alone", "data_parallel"):
    losses = {s: summary["final"][s][key]["eval_loss"] for s in sites
              if key in summary["final"][s]}
    if losses:
      refs[key] = {"eval_loss": losses, "mean_eval_loss": float(np.mean(list(losses.values())))}
  out = {"sites": sites, "per_site": per, "mean": mean, "references": refs,
         "tokens_per_site": float(np.mean([tokens[s] for s in sites])) if sites else 0.0,
         "rounds": int(summary["rounds"]), "inner_steps": int(summary["inner_steps"]),
         "federation": summary.get("federation", "")}
  if config is not None:
    out["n_params"] = _n_params(config)
    out["update_dtype"] = config["federation"]["update_dtype"]
    out["data_parallel_bytes"] = report.data_parallel_bytes(
        config["model"], out["rounds"] * out["inner_steps"])
  dp_sent = {v.get("data_parallel_bytes_sent") for v in summary["final"].values()}
  if len(dp_sent) == 1 and None not in dp_sent:  # report.data_parallel_bytes, when recorded
    out["data_parallel_bytes"] = dp_sent.pop()
    out["n_params"] = out["data_parallel_bytes"] // (4 * out["rounds"] * out["inner_steps"])
  return out


def _federation_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  return _read_json(path) if os.path.isfile(path) else None


def sweep_series(workdir: str) -> dict[str, Any]:
  """A sweep's rows (sweep.jsonl; a rerun's row replaces the earlier one of that name),
  the swept setting if one numeric override tells the runs apart, and each run's
  federation curves where its summary.json exists."""
  rows: dict[str, dict] = {}
  for row in _read_jsonl(os.path.join(workdir, "sweep.jsonl")):
    rows[row["name"]] = row
  runs = list(rows.values())
  if not runs:
    raise PlotError(f"{os.path.join(workdir, 'sweep.jsonl')}: no rows")
  keys = list(dict.fromkeys(k for r in runs for k in r["overrides"]))
  varying = [k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in runs}) > 1]
  swept = None
  for k in varying:
    values = [r["overrides"].get(k) for r in runs]
    if (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        and len(set(values)) == len(values)):
      swept = k
      break
  curves = {}
  for r in runs:
    path = os.path.join(workdir, r["name"], "summary.json")
    if os.path.isfile(path):
      curves[r["name"]] = federation_series(_read_json(path))
  return {"names": [r["name"] for r in runs], "rows": runs, "swept": swept,
          "values": [r["overrides"][swept] for r in runs] if swept else None,
          "eval_loss": [r["eval_loss"] for r in runs],
          "alone_eval_loss": [r.get("alone_eval_loss") for r in runs], "curves": curves}


# ---------------------------------------------------------------------------- drawing


def _figure(rows: int = 1, **kw):
  from matplotlib.figure import Figure  # Deferred: only drawing needs matplotlib.

  fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
  axes = fig.subplots(rows, 1, squeeze=False, **kw)[:, 0]
  for ax in axes:
    ax.grid(True, alpha=0.3)
  return fig, axes


def _colors(names: list[str]) -> dict[str, Any]:
  """One color per name, stable for a given sorted list (site names are sorted)."""
  import matplotlib

  cmap = matplotlib.colormaps["tab10"]
  return {n: cmap(i % 10) for i, n in enumerate(names)}


def _eng(unit: str = ""):
  from matplotlib.ticker import EngFormatter

  return EngFormatter(unit=unit, places=0)


def _log_bytes_axis(axis) -> None:
  """Log scale with ticks at 1, 2 and 5 times powers of ten, in B / kB / MB / GB."""
  from matplotlib.ticker import LogLocator, NullFormatter

  axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(_eng("B"))
  axis.set_minor_formatter(NullFormatter())


def _pad_ylim(ax, values) -> None:
  """y limits that show every value with a margin (axhline references included)."""
  values = [v for v in values if math.isfinite(v)]
  if not values:
    return
  lo, hi = min(values), max(values)
  pad = 0.06 * ((hi - lo) or abs(hi) or 1.0)
  ax.set_ylim(lo - pad, hi + pad)


def _log_y(ax) -> None:
  """A log y axis labelled with plain numbers (major and minor ticks)."""
  from matplotlib.ticker import FormatStrFormatter

  lo, hi = ax.get_ylim()
  ax.set_yscale("log")
  ax.set_ylim(max(lo, 1e-3), hi)
  ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def _mb(n: float) -> str:
  return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def _train_figures(workdir: str) -> dict[str, Any]:
  s = train_series(workdir)
  fig, (ax, ax_lr) = _figure(2, sharex=True, height_ratios=[3, 1])
  ax.plot(s["train_tokens"], s["train_loss"], color="tab:blue", lw=1.2, gid="train_loss",
          label="train loss (one batch)")
  if s["eval_loss"]:
    ax.plot(s["eval_tokens"], s["eval_loss"], color="tab:orange", marker="o", lw=1.8,
            gid="eval_loss", label=f"held-out loss (final {s['eval_loss'][-1]:.3f})")
  ax.set_ylabel("loss (nats/token)")
  ax.legend(loc="upper right")
  ax.set_title(f"{os.path.basename(os.path.abspath(workdir))}: {s['preset'] or 'LM'} "
               f"({s['n_params'] / 1e6:.2f}M params), {s['tokens_per_step']:,} tokens/step")
  per_step = s["tokens_per_step"]
  top = ax.secondary_xaxis("top", functions=(lambda t: t / per_step, lambda n: n * per_step))
  top.set_xlabel("step")
  ax_lr.plot(s["lr_tokens"], s["lr"], color="tab:green", lw=1.2, gid="lr")
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("tokens trained on")
  ax_lr.xaxis.set_major_formatter(_eng())
  ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
  return {"loss.png": fig}


def _federation_figures(workdir: str) -> dict[str, Any]:
  from matplotlib.lines import Line2D

  s = federation_series(_read_json(os.path.join(workdir, "summary.json")),
                        _federation_config(workdir))
  sites, per, mean, refs = s["sites"], s["per_site"], s["mean"], s["references"]
  colors = _colors(sites)
  ref_style = {"alone": ("--", "each site alone"), "data_parallel": (":", "data parallel")}
  name = s["federation"] or os.path.basename(os.path.abspath(workdir))
  budget = f"{s['rounds']} rounds x {s['inner_steps']} inner steps"
  out = {}

  # (a) Each site's held-out loss of the global model, round by round.
  fig, (ax,) = _figure()
  for site in sites:
    ax.plot(per[site]["round"], per[site]["eval_loss"], color=colors[site], marker="o", ms=3,
            lw=1.5, gid=f"federated/{site}")
    for key, (ls, _) in ref_style.items():
      if key in refs and site in refs[key]["eval_loss"]:
        ax.axhline(refs[key]["eval_loss"][site], color=colors[site], ls=ls, lw=1.2,
                   gid=f"{key}/{site}")
  handles = [Line2D([], [], color=colors[x], marker="o", ms=3, label=x) for x in sites]
  handles.append(Line2D([], [], color="0.3", label="global model (federated)"))
  handles += [Line2D([], [], color="0.3", ls=ref_style[k][0], label=f"{ref_style[k][1]} (final)")
              for k in refs]
  ax.legend(handles=handles, loc="upper right", ncols=2, fontsize="small")
  _pad_ylim(ax, [v for x in sites for v in per[x]["eval_loss"]] +
            [v for r in refs.values() for v in r["eval_loss"].values()])
  _log_y(ax)  # The first rounds fall far; the sites differ, and meet the references, late.
  ax.set_xlabel("global round")
  ax.set_ylabel("held-out loss on the site's data (nats/token, log scale)")
  ax.set_title(f"{name}: the global model on each site's held-out data ({budget})")
  out["federation_rounds.png"] = fig

  # (b) Mean held-out loss against tokens: federated curve, references' final points.
  fig, (ax,) = _figure()
  ax.plot(mean["tokens"], mean["eval_loss"], color="black", marker="o", ms=3, lw=1.8,
          gid="federated/mean", label=f"federated (final {mean['eval_loss'][-1]:.3f})"
          if mean["eval_loss"] else "federated")
  for key, marker, color in (("alone", "s", "tab:red"), ("data_parallel", "*", "tab:blue")):
    if key in refs:
      loss = refs[key]["mean_eval_loss"]
      ax.plot([s["tokens_per_site"]], [loss], ls="none", marker=marker, ms=11, color=color,
              gid=f"{key}/mean", label=f"{ref_style[key][1]}, same tokens ({loss:.3f})")
  ax.set_xlabel("tokens trained on per site")
  ax.xaxis.set_major_formatter(_eng())
  ax.set_ylabel("held-out loss, mean over sites (nats/token)")
  ax.set_title(f"{name}: mean held-out loss against tokens ({len(sites)} sites)")
  ax.legend(loc="upper right")
  out["federation_tokens.png"] = fig

  # (c) Mean held-out loss against the bytes each site sent (log x; round 0 sent nothing).
  fig, (ax,) = _figure()
  dtype = f", {s['update_dtype']} updates" if "update_dtype" in s else ""
  keep = [i for i, b in enumerate(mean["bytes_sent"]) if b > 0]
  xs = [mean["bytes_sent"][i] for i in keep]
  ax.plot(xs, [mean["eval_loss"][i] for i in keep], color="black", marker="o", ms=3, lw=1.8,
          gid="federated/bytes", label=f"federated{dtype} ({_mb(xs[-1])} sent per site)"
          if xs else "federated")
  if "alone" in refs:
    ax.axhline(refs["alone"]["mean_eval_loss"], color="tab:red", ls="--", lw=1.2,
               gid="alone/bytes", label=f"each site alone, sends nothing "
               f"({refs['alone']['mean_eval_loss']:.3f})")
  if "data_parallel_bytes" in s:
    dp = s["data_parallel_bytes"]
    ratio = f", {dp / xs[-1]:.1f}x the federation's" if xs else ""
    ax.axvline(dp, color="tab:blue", ls=":", lw=1.5, gid="data_parallel/bytes",
               label=f"data parallel, same steps: {_mb(dp)}{ratio}\n"
               f"(float32 gradient of {s['n_params'] / 1e6:.2f}M params x "
               f"{s['rounds'] * s['inner_steps']} steps)")
    if "data_parallel" in refs:
      ax.plot([dp], [refs["data_parallel"]["mean_eval_loss"]], ls="none", marker="*", ms=11,
              color="tab:blue", gid="data_parallel/point",
              label=f"data parallel loss ({refs['data_parallel']['mean_eval_loss']:.3f})")
  _pad_ylim(ax, [mean["eval_loss"][i] for i in keep] +
            [r["mean_eval_loss"] for r in refs.values()])
  ax.set_xscale("log")
  _log_bytes_axis(ax.xaxis)
  ax.set_xlabel("bytes sent per site, cumulative (log scale)")
  ax.set_ylabel("held-out loss, mean over sites (nats/token)")
  ax.set_title(f"{name}: held-out loss against communication")
  ax.legend(loc="upper right", fontsize="small")
  out["federation_bytes.png"] = fig
  return out


def _sweep_figures(workdir: str) -> dict[str, Any]:
  s = sweep_series(workdir)
  name = os.path.basename(os.path.abspath(workdir))
  out = {}
  fig, (ax,) = _figure()
  has_alone = all(v is not None for v in s["alone_eval_loss"])
  if s["swept"]:
    order = np.argsort(s["values"])
    xs = [s["values"][i] for i in order]
    ax.plot(xs, [s["eval_loss"][i] for i in order], color="black", marker="o", lw=1.8,
            gid="federated", label="federated")
    if has_alone:
      ax.plot(xs, [s["alone_eval_loss"][i] for i in order], color="tab:red", marker="s",
              ls="--", lw=1.2, gid="alone", label="each site alone")
    for i in order:  # The rightmost label is set left of its point, inside the axes.
      last = s["values"][i] == xs[-1]
      ax.annotate(f"{s['names'][i]}: {_mb(s['rows'][i]['bytes_sent'])} sent in all",
                  (s["values"][i], s["eval_loss"][i]), fontsize="small",
                  textcoords="offset points", xytext=(-4 if last else 4, 6),
                  ha="right" if last else "left",
                  bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.margins(y=0.12)
    if min(xs) > 0 and max(xs) / min(xs) >= 10:
      ax.set_xscale("log")
    ax.set_xlabel(s["swept"])
  else:
    x = np.arange(len(s["names"]))
    width = 0.4 if has_alone else 0.6
    bars = ax.bar(x - (width / 2 if has_alone else 0), s["eval_loss"], width, color="0.3",
                  gid="federated", label="federated")
    ax.bar_label(bars, fmt="%.3f", fontsize="small")
    if has_alone:
      bars = ax.bar(x + width / 2, s["alone_eval_loss"], width, color="tab:red", gid="alone",
                    label="each site alone")
      ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(x, [f"{n}\n{_mb(r['bytes_sent'])} sent in all"
                      for n, r in zip(s["names"], s["rows"])],
                  rotation=30 if len(x) > 6 else 0, ha="right" if len(x) > 6 else "center")
    ax.set_xlabel("sweep run")
    ax.set_ylim(0, 1.15 * max(filter(None, s["eval_loss"] + s["alone_eval_loss"])))
  ax.set_ylabel("final held-out loss, mean over sites (nats/token)")
  ax.set_title(f"sweep {name}: final held-out loss per run")
  fig.legend(loc="outside lower center", ncols=2)
  out["sweep_final.png"] = fig

  if s["curves"]:
    fig, (ax,) = _figure()
    colors = _colors(list(s["curves"]))
    for run, c in s["curves"].items():
      ax.plot(c["mean"]["tokens"], c["mean"]["eval_loss"], color=colors[run], marker="o",
              ms=3, lw=1.5, gid=f"federated/{run}", label=run)
      if "alone" in c["references"]:
        ax.plot([c["tokens_per_site"]], [c["references"]["alone"]["mean_eval_loss"]],
                ls="none", marker="s", ms=7, mfc="none", color=colors[run], gid=f"alone/{run}")
    if any("alone" in c["references"] for c in s["curves"].values()):
      ax.plot([], [], ls="none", marker="s", mfc="none", color="0.3",
              label="each site alone (final)")
    ax.set_xlabel("tokens trained on per site")
    ax.xaxis.set_major_formatter(_eng())
    ax.set_ylabel("held-out loss, mean over sites (nats/token)")
    ax.set_title(f"sweep {name}: the global model's mean held-out loss per run")
    ax.legend(loc="upper right", fontsize="small", ncols=1 + len(s["curves"]) // 8)
    out["sweep_curves.png"] = fig
  return out


_DRAW = {"train": _train_figures, "federation": _federation_figures, "sweep": _sweep_figures}


def figures(workdir: str) -> dict[str, Any]:
  """The run's figures, by the file name each is saved under (matplotlib Figures; each
  line and reference marker carries a `gid` naming its series)."""
  kind = run_kind(workdir)
  try:
    return _DRAW[kind](workdir)
  except (KeyError, TypeError, IndexError) as e:
    raise PlotError(f"{workdir}: a {kind} run's files lack what its plots need "
                    f"({type(e).__name__}: {e})") from None


def plot_run(workdir: str) -> list[str]:
  """Writes the run's plots as PNGs into `workdir`; returns their paths."""
  paths = []
  for name, fig in figures(workdir).items():
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=DPI)
    paths.append(path)
  return paths


def plot_run_or_warn(workdir: str) -> list[str]:
  """`plot_run` for the end of a run: a failure to plot is a logged warning, never the
  run's failure."""
  try:
    paths = plot_run(workdir)
  except Exception as e:  # noqa: BLE001  (plots are a by-product)
    logging.warning("no plots for %s: %s: %s", workdir, type(e).__name__, e)
    return []
  logging.info("plots: %s", ", ".join(paths))
  return paths
