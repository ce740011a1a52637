"""Ablation sweeps over a federation config, run in simulation and tabulated.

A sweep file (`experiments/sweeps/*.py`) has `get_sweep() -> list[dict]`; each dict is
one run: `name` plus config overrides by dotted path (`"federation.inner_steps": 10`).
Two keys are not config paths: `sites` (comma-separated names to keep) and
`drop_probability` (each site's update is dropped from each round with this probability,
seeded, as if it missed the deadline).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging

from tapestry_jax import plots
from tapestry_jax import references
from tapestry_jax import report
from tapestry_jax import simulate
from tapestry_jax.validate import ConfigError


def select_runs(runs: list[dict], names: list[str]) -> list[dict]:
  """The runs named `names`, in the sweep's order; an unknown name is a ConfigError."""
  unknown = sorted(set(names) - {r.get("name") for r in runs})
  if unknown:
    raise ConfigError(f"--runs: unknown run(s) {unknown}; the sweep has "
                      f"{[r.get('name') for r in runs]}")
  return [r for r in runs if r.get("name") in names]


def apply_overrides(config, overrides: dict[str, Any]):
  """A copy of `config` with dotted-path overrides; unknown paths are a ConfigError."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    if key in ("name", "drop_probability"):
      continue
    if key == "sites":
      keep = [s.strip() for s in str(value).split(",") if s.strip()]
      unknown = sorted(set(keep) - set(c.sites.keys()))
      if unknown:
        raise ConfigError(f"sweep keeps unknown sites {unknown}; known: {list(c.sites.keys())}")
      with c.sites.unlocked():
        for name in list(c.sites.keys()):
          if name not in keep:
            del c.sites[name]
      continue
    *path, last = key.split(".")
    node = c
    try:
      for p in path:
        node = node[p]
      node[last]  # pylint: disable=pointless-statement  (KeyError for a typo)
      node[last] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise ConfigError(f"sweep override {key}={value!r} does not apply: {e}") from None
  return c


def run_sweep(config, runs: list[dict[str, Any]], workdir: str, *, alone: bool = True,
              data_parallel: bool = False, reference_cache: str | None = None) -> list[dict]:
  """Simulates every run; returns one row per run with the mean final metrics.

  `alone` / `data_parallel`: also the references (`tapestry_jax.references`), cached in
  `reference_cache` by their recipe ('' or None: computed for every run), so runs that
  differ only in their outer settings share them."""
  rows = []
  for i, run in enumerate(runs):
    name = run.get("name", f"run{i}")
    c = apply_overrides(config, run)
    p = float(run.get("drop_probability", 0.0))
    rng = np.random.default_rng(int(c.train.seed))
    drops = {(r, s): rng.random() < p for r in range(1, int(c.federation.rounds) + 1)
             for s in sorted(c.sites.keys())}
    run_dir = os.path.join(workdir, name)
    logging.info("sweep: run %s %s", name, {k: v for k, v in run.items() if k != "name"})
    sim = simulate.simulate(c, run_dir, drop=(lambda r, s: drops[(r, s)]) if p else None)
    refs = {kind: references.reference(c, kind, run_dir, reference_cache)
            for kind, on in (("alone", alone), ("data_parallel", data_parallel)) if on}
    summary = report.summarize(c, sim["records"], alone=refs.get("alone"),
                               data_parallel=refs.get("data_parallel"))
    report.write(summary, run_dir)
    fin = summary["final"].values()
    row = {"name": name, "overrides": {k: v for k, v in run.items() if k != "name"},
           "eval_loss": float(np.mean([v["federated"]["eval_loss"] for v in fin])),
           "eval_bits_per_byte": float(np.mean([v["federated"]["eval_bits_per_byte"] for v in fin])),
           "bytes_sent": int(sum(v["bytes_sent"] for v in fin)),
           "bytes_received": int(sum(v["bytes_received"] for v in fin)),
           "data_parallel_bytes": int(sum(v["data_parallel_bytes_sent"] for v in fin))}
    for kind in refs:
      row[f"{kind}_eval_loss"] = float(np.mean([v[kind]["eval_loss"] for v in fin]))
      row[f"{kind}_eval_bits_per_byte"] = float(np.mean([v[kind]["eval_bits_per_byte"]
                                                         for v in fin]))
    if "data_parallel" in refs:  # The mean and worst site of federated / data-parallel - 1.
      ratios = [v["federated"]["eval_loss"] / v["data_parallel"]["eval_loss"] - 1 for v in fin]
      row["vs_data_parallel_mean"] = float(np.mean(ratios))
      row["vs_data_parallel_worst"] = float(np.max(ratios))
    rows.append(row)
    with open(os.path.join(workdir, "sweep.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
  plots.plot_run_or_warn(workdir)
  return rows


def table(rows: list[dict]) -> str:
  """The rows as a fixed-width table: bits per byte, the references', the loss against
  data parallelism's (mean and worst site), and the array bytes sent and read per site
  against data parallelism's (a float32 gradient per step each way)."""
  head = ["run", "fed loss", "fed bpb", "alone bpb", "DP bpb", "vs DP mean", "vs DP worst",
          "sent x", "read x", "overrides"]
  opt = lambda r, k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
  ratio = lambda r, k: f"{r['data_parallel_bytes'] / max(1, r[k]):.1f}" if r.get(k) else "-"  # noqa: E731
  body = [[r["name"], f"{r['eval_loss']:.4f}", f"{r['eval_bits_per_byte']:.4f}",
           opt(r, "alone_eval_bits_per_byte", "{:.4f}"),
           opt(r, "data_parallel_eval_bits_per_byte", "{:.4f}"),
           opt(r, "vs_data_parallel_mean", "{:+.2%}"), opt(r, "vs_data_parallel_worst", "{:+.2%}"),
           ratio(r, "bytes_sent") if "data_parallel_bytes" in r else "-",
           ratio(r, "bytes_received") if "data_parallel_bytes" in r else "-",
           json.dumps(r["overrides"])] for r in rows]
  widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
  fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths))  # noqa: E731
  return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in body])
