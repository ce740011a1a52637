"""Time a deployed federation spends outside inner steps (exchange, merge, waiting).

  python -m experiments.benchmarks.federation_overhead          # 2 tiny sites, H=100, 3 rounds
  python -m experiments.benchmarks.federation_overhead --sites=4 --rounds=4 --eval
  python -m experiments.benchmarks.federation_overhead --max_mbps=100  # over emulated WAN links
  # issue 15: the exchange hidden behind tau steps trained ahead, against no overlap
  python -m experiments.benchmarks.federation_overhead --inner_steps=100 --rounds=6 \
      --max_mbps=50 --overlap_steps=50

Target (issue 3): with H=100 on file:// buckets, time spent outside inner steps
(exchange, merge, waiting) is at most 5% of a round.

What runs:
  1. The deployed path: `orchestrate.run_processes` starts the coordinator and one
     process per site (what `launch.federate` runs), sharing only file:// buckets under
     --workdir, on `experiments/configs/federation.py:PRESET/SITE,...` with
     federation.inner_steps=H and federation.rounds=R. Without --eval the sites evaluate
     only global rounds 0 and R (federation.eval_every = R + 1), so the measured rounds
     hold no evaluation; with --eval every round is evaluated and shown as its own column.
  2. The records the processes write: WORKDIR/sites/*/rounds.jsonl (compute_s = the H
     inner steps, read_s, publish_s, eval_s, wait_s) and WORKDIR/coordinator/rounds.jsonl
     (wait_s, merge_s, which includes publishing the round). Global round r lasts
     T_r = coordinator wait_s + merge_s (from publishing round r - 1 to publishing r).
     In it, each site reads global r - 1, trains, publishes its update r (its record for
     global round r - 1), checkpoints (untimed) and waits for global r (the wait_s of its
     record for global round r). So per site and round:
       inner = compute_s / T_r, exchange = (read_s + publish_s) / T_r, eval = eval_s / T_r,
       wait = wait_s / T_r (includes the coordinator's merge, polling, and the slowest
       site), other = the rest (checkpoint save, logging, and the up-to-poll_s offset
       between the coordinator publishing a round and a site seeing it, which makes
       single rounds' "other" slightly negative at times; it cancels over rounds).
     The steady-state summary (and --json_out) gives each site's exchange fraction
     (read_s + publish_s over its rounds), step time and bytes up/down per round, which
     `utilization_model --check` compares with the model's prediction.
     Round 1 also holds process start-up and compilation: it is shown but left out of the
     steady-state figures (rounds 2..R).
  3. Baselines, measured in this process after the federation has finished (nothing else
     of the federation running): each site's read of the last global round, H inner
     steps and publish of its update, alone (SiteWorker, after one untimed round that
     compiles), and the coordinator's merge of round R alone (merge.merge_round, second
     call).
     From them, the overhead of an uncontended round:
       (read + publish + merge + polling) / (inner alone + read + publish + merge + polling),
     polling being federation.poll_s (two hops, each half a poll on average).
With --max_mbps=X every bucket (each site's and the global one) is
file://WORKDIR/buckets/NAME?max_mbps=X: each party reads and writes each bucket through an
emulated link of X megabit/s per direction (tapestry_jax/buckets.py), the baselines too.
On a machine with fewer cores than processes (2 cores here), the site processes compete
for the CPU: their inner steps run slower than alone, and a site waits for the slowest
one, which is contention, not exchange. The exchange overhead (read + publish + merge) is
therefore reported apart from waiting. The machine's load average is printed too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments.configs import federation as fed_config

_SITES = flags.DEFINE_integer("sites", 2, "Sites (the first N of the preset's site list).")
_INNER = flags.DEFINE_integer("inner_steps", 100, "H: inner steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Global rounds R (steady state = rounds 2..R).")
_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "small", "debref"],
                            "Variant of experiments/configs/federation.py.")
_EVAL = flags.DEFINE_bool("eval", False, "Evaluate every global round (default: only rounds "
                          "0 and R, outside the measured rounds).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "More config overrides, e.g. "
                                       "--override=federation.poll_s=0.05.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 1800, "Give up on the deployed run after this.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Federation directory ('' = a new dir under /tmp).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep --workdir at the end.")
_JSON = flags.DEFINE_string("json_out", "", "Also write the results here.")
_MBPS = flags.DEFINE_float("max_mbps", 0.0, "Emulated WAN link of every bucket, megabit/s "
                           "per direction (the buckets' ?max_mbps=); 0 = unthrottled.")

_OVERLAP = flags.DEFINE_integer(
    "overlap_steps", 0, "> 0: the overlap benchmark (issue 15) instead: the same deployed "
    "federation without overlap and with federation.overlap_steps=N, one after the other; "
    "prints the exposed exchange time of each and the final held-out loss delta.")

CONFIG_PATH = "experiments/configs/federation.py"

# Targets (issue 15), with --overlap_steps at a --max_mbps where the exchange without
# overlap takes at least UNHIDDEN_MIN of a round.
UNHIDDEN_MIN = 0.20
EXPOSED_TARGET = 0.01  # The overlapped run's exchange not hidden behind inner steps.
LOSS_DELTA_TARGET = 0.005  # Its final held-out loss against the run without overlap.


def _throttled(url: str) -> str:
  """`url` with --max_mbps as its bucket option (unchanged when it is 0)."""
  return f"{url}?max_mbps={_MBPS.value!r}" if _MBPS.value else url


def _config_and_args(workdir: str):
  """The federation config (for this process) and the same as --config arguments (for
  the child processes)."""
  names = (fed_config.DEBREF_SITES if _PRESET.value == "debref"
           else fed_config.SYNTHETIC_SITES)[:_SITES.value]
  if len(names) < _SITES.value or _SITES.value < 1:
    raise app.UsageError(f"--sites must be between 1 and {len(names)} for {_PRESET.value}")
  if not _MBPS.value >= 0 or _MBPS.value == float("inf"):
    raise app.UsageError(f"--max_mbps must be a finite number >= 0, got {_MBPS.value}")
  variant = f"{_PRESET.value}/{','.join(names)}"
  overrides = {"federation.inner_steps": _INNER.value, "federation.rounds": _ROUNDS.value,
               "federation.compare_alone": False}
  if _MBPS.value:  # The default locations (federation.bucket_urls), throttled.
    base = os.path.join(os.path.abspath(workdir), "buckets")
    for name in names:
      overrides[f"sites.{name}.bucket"] = _throttled("file://" + os.path.join(base, name))
    overrides["federation.global_bucket"] = _throttled("file://" + os.path.join(base, "global"))
  if not _EVAL.value:
    overrides["federation.eval_every"] = _ROUNDS.value + 1
  for item in _OVERRIDES.value:
    key, _, value = item.partition("=")
    overrides[key] = value
  config = fed_config.get_config(variant)
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[last] = type(node[last])(value) if not isinstance(node[last], bool) else (
        str(value).lower() in ("1", "true"))
  args = [f"--config={os.path.abspath(CONFIG_PATH)}:{variant}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  return config, args


def _rows(site_recs: list[dict], coord_recs: list[dict], names: list[str]) -> list[dict]:
  """One row per (global round r >= 1, site): seconds and fractions of T_r."""
  by_site = {(r["site"], r["global_round"]): r for r in site_recs}
  rows = []
  for c in coord_recs:
    r = c["round"]
    T = c["wait_s"] + c["merge_s"]
    for name in names:
      rec, nxt = by_site.get((name, r - 1)), by_site.get((name, r))
      if rec is None or nxt is None or "compute_s" not in rec:
        continue
      row = {"round": r, "site": name, "round_s": T, "compute_s": rec["compute_s"],
             "read_s": rec["read_s"], "publish_s": rec["publish_s"],
             "eval_s": rec.get("eval_s", 0.0), "wait_s": nxt["wait_s"], "merge_s": c["merge_s"],
             "coordinator_wait_s": c["wait_s"], "bytes_up": rec.get("bytes_up", 0),
             "bytes_down": rec.get("bytes_down", 0)}
      row["other_s"] = T - sum(row[k] for k in ("compute_s", "read_s", "publish_s", "eval_s",
                                                "wait_s"))
      rows.append(row)
  return rows


def _alone(config, workdir: str, names: list[str]) -> dict:
  """Each site's H inner steps, read and publish, and the merge of round R, run alone."""
  from tapestry_jax import buckets, exchange, federation  # pylint: disable=import-outside-toplevel
  from tapestry_jax import merge as merge_lib  # pylint: disable=import-outside-toplevel
  from tapestry_jax import site as site_lib  # pylint: disable=import-outside-toplevel
  from tapestry_jax import trust  # pylint: disable=import-outside-toplevel
  f = config.federation
  # The trust root and keys run_processes made (WORKDIR/keys): the baselines sign and
  # verify exactly as the deployed parties do.
  root = trust.TrustRoot.from_config(config)
  signers = {p: trust.Signer.from_file(p, federation.default_key_file(workdir, p))
             for p in federation.party_names(config)}
  H, R = int(f.inner_steps), int(f.rounds)
  urls = federation.bucket_urls(config, workdir)
  glob = buckets.Bucket(urls[federation.GLOBAL])
  out: dict = {"sites": {}}
  for name in names:
    worker = site_lib.SiteWorker(config, name, os.path.join(workdir, "alone", name))
    scratch = buckets.Bucket(_throttled("file://" + os.path.join(workdir, "alone", "buckets",
                                                                 name)))
    # One untimed round first: it compiles the train step, the delta and the reads, as
    # round 1 of the deployment did.
    for timed, round_ in ((False, R - 1), (True, R)):
      t0 = time.perf_counter()
      # What the deployed site does (site.run_site): the global params (and moments),
      # then the encoded update.
      params, moments, _ = exchange.read_global_round(glob, config, round_,
                                                      worker.trainer.param_shardings, root=root)
      worker.adopt(params, moments)
      read_s = time.perf_counter() - t0
      compute_s = worker.train(H if timed else 2)["compute_s"]
      t0 = time.perf_counter()
      exchange.publish_update(scratch, config, name, round_ + 1, round_,
                              worker.encoded_update(), 1, extra={}, signer=signers[name])
      publish_s = time.perf_counter() - t0
    out["sites"][name] = {"compute_s": compute_s, "read_s": read_s, "publish_s": publish_s}
    worker.close()
  spec = federation.merge_spec(config)  # The coordinator's.
  base_prefix = exchange.global_prefix(R - 1)
  base = exchange.read_manifest(glob, base_prefix)
  inputs = []
  for name in sorted(names):  # The coordinator's fixed merge order.
    b = buckets.Bucket(urls[name])
    prefix = exchange.update_prefix(R)
    manifest = exchange.read_manifest(b, prefix)
    root.verify(manifest, name)
    inputs.append((b, prefix, manifest))
  weights = spec.weights([m["tokens"] for _, _, m in inputs])
  scratch = buckets.Bucket(_throttled("file://" + os.path.join(workdir, "alone", "buckets",
                                                               "global")))
  for attempt in range(2):  # The first call compiles merge_block for these shapes.
    t0 = time.perf_counter()
    data = exchange.new_attempt()
    records = merge_lib.merge_round(spec, glob, base_prefix, base, inputs, weights, scratch,
                                    exchange.data_prefix(exchange.global_prefix(R + attempt),
                                                         data))
    exchange.write_manifest(scratch, exchange.global_prefix(R + attempt),
                            signers[federation.COORDINATOR].sign(exchange.make_manifest(
        federation=f.id, kind="global", round=R + attempt, author=federation.COORDINATOR,
        attempt=data, base_round=R - 1, tokens=1, arrays=records)))
    out["merge_s"] = time.perf_counter() - t0
  out["bytes_per_update"] = sum(int(np.prod(r["shape"])) * np.dtype(r["dtype"]).itemsize
                                for r in inputs[0][2]["arrays"].values())
  return out


def _pct(x: float) -> str:
  return f"{100 * x:5.1f}%"


def _overlap_main(workdir: str) -> None:
  """--overlap_steps: the deployed federation without and with overlap (see the flag)."""
  from tapestry_jax import orchestrate, report  # pylint: disable=import-outside-toplevel
  tau, arms = _OVERLAP.value, {}
  if _ROUNDS.value < 4 or not 0 < tau < _INNER.value:
    raise app.UsageError(f"--overlap_steps needs 0 < N < --inner_steps and --rounds >= 4; got "
                         f"N={tau}, inner_steps={_INNER.value}, rounds={_ROUNDS.value}")
  load0 = os.getloadavg()
  for arm in (0, tau):
    arm_dir = os.path.join(workdir, f"overlap_{arm}")
    config, args = _config_and_args(arm_dir)
    config.federation.overlap_steps = arm
    args.append(f"--config.federation.overlap_steps={arm}")
    t0 = time.perf_counter()
    try:
      orchestrate.run_processes(config, arm_dir, args, progress=False,
                                timeout_s=_TIMEOUT.value)
    except orchestrate.PartyFailed as e:
      print(f"the deployed federation (overlap_steps={arm}) failed, nothing to measure:\n{e}")
      raise SystemExit(1) from None
    names = list(config.sites.keys())
    site_recs, _ = report.deployment_records(arm_dir, names)
    arms[arm] = {"deployed_s": time.perf_counter() - t0, "sites": {
        n: report.steady_exposure([r for r in site_recs if r["site"] == n], _ROUNDS.value)
        for n in names}}
  load1 = os.getloadavg()
  link = f"{_MBPS.value:g} Mbit/s per direction" if _MBPS.value else "unthrottled"
  print(f"deployed federation: {len(names)} sites {names} ({_PRESET.value}), H={_INNER.value}, "
        f"{_ROUNDS.value} rounds, buckets {link}; without overlap, then with "
        f"federation.overlap_steps={tau}; steady state from adopting global round 1 to "
        f"adopting round {_ROUNDS.value - 1}; final loss: global round {_ROUNDS.value}")
  print(f"{'overlap':>7} {'site':>10} {'round s':>8} {'inner':>7} {'exchange':>9} {'other':>7} "
        f"{'eval':>6} {'final loss':>11}")
  for arm, a in arms.items():
    for n, e in a["sites"].items():
      w = e["wall_s"]
      print(f"{arm:>7} {n:>10} {w / (_ROUNDS.value - 2):8.2f} {_pct(e['inner_s'] / w):>7} "
            f"{_pct(e['exchange_fraction']):>9} {_pct(e['other_s'] / w):>7} "
            f"{_pct(e['eval_s'] / w):>6} {e['final_loss']:11.4f}")
  plain = min(e["exchange_fraction"] for e in arms[0]["sites"].values())
  exposed = max(e["exchange_fraction"] for e in arms[tau]["sites"].values())
  outside = max(e["outside_inner_fraction"] for e in arms[tau]["sites"].values())
  loss = {arm: sum(e["final_loss"] for e in a["sites"].values()) / len(a["sites"])
          for arm, a in arms.items()}
  delta = loss[tau] / loss[0] - 1
  print(f"without overlap the exchange takes {_pct(plain).strip()} of a round (least site; the "
        f"setting needs >= {UNHIDDEN_MIN:.0%}: {'yes' if plain >= UNHIDDEN_MIN else 'NO'})")
  print(f"target: exchange not hidden behind inner steps <= {EXPOSED_TARGET:.0%} of wall time "
        f"with overlap: {_pct(exposed).strip()} (worst site, "
        f"{'met' if exposed <= EXPOSED_TARGET else 'NOT met'}); everything outside inner steps "
        f"and evaluation (checkpoints, logging too): {_pct(outside).strip()}")
  print(f"target: final held-out loss (mean over sites) at most +{LOSS_DELTA_TARGET:.1%} "
        f"against no overlap: {loss[tau]:.4f} vs {loss[0]:.4f} ({delta:+.2%}, "
        f"{'met' if delta <= LOSS_DELTA_TARGET else 'NOT met'}); load average {load0[0]:.1f} "
        f"-> {load1[0]:.1f} on {os.cpu_count()} CPUs")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"preset": _PRESET.value, "inner_steps": _INNER.value, "rounds": _ROUNDS.value,
                 "overlap_steps": tau, "max_mbps": _MBPS.value or None, "arms": arms,
                 "unhidden_fraction": plain, "exposed_fraction": exposed,
                 "outside_inner_fraction": outside, "loss": loss, "loss_delta": delta,
                 "targets": {"unhidden_min": UNHIDDEN_MIN, "exposed": EXPOSED_TARGET,
                             "loss_delta": LOSS_DELTA_TARGET},
                 "load_average_1m_before_after": [load0[0], load1[0]]}, f, indent=2)


def main(argv):
  del argv
  from tapestry_jax import orchestrate, report  # pylint: disable=import-outside-toplevel
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="federation_overhead_", dir="/tmp")
  if _OVERLAP.value:
    try:
      _overlap_main(workdir)
    finally:
      if not _KEEP.value:
        shutil.rmtree(workdir, ignore_errors=True)
    return
  try:
    config, args = _config_and_args(workdir)
  except app.UsageError:
    if not _WORKDIR.value:
      os.rmdir(workdir)
    raise
  names = list(config.sites.keys())
  load0 = os.getloadavg()
  try:
    t0 = time.perf_counter()
    try:
      orchestrate.run_processes(config, workdir, args, progress=False, timeout_s=_TIMEOUT.value)
    except orchestrate.PartyFailed as e:
      print(f"the deployed federation failed, nothing to measure:\n{e}")
      raise SystemExit(1) from None
    deployed_s = time.perf_counter() - t0
    load1 = os.getloadavg()
    site_recs, coord_recs = report.deployment_records(workdir, names)
    alone = _alone(config, workdir, names)
  finally:
    if not _KEEP.value:
      shutil.rmtree(workdir, ignore_errors=True)

  rows = _rows(site_recs, coord_recs, names)
  steady = [r for r in rows if r["round"] >= 2]
  poll = float(config.federation.poll_s)
  print(f"deployed federation: {len(names)} sites {names} ({_PRESET.value}), H={_INNER.value}, "
        f"{_ROUNDS.value} rounds, coordinator + {len(names)} site processes on "
        f"{os.cpu_count()} CPUs, file:// buckets"
        f"{f' throttled to {_MBPS.value:g} Mbit/s per direction' if _MBPS.value else ''}, "
        f"{alone['bytes_per_update'] / 2**20:.2f} MiB "
        f"per update; {deployed_s:.0f} s in all; evaluation of "
        f"{'every round' if _EVAL.value else 'rounds 0 and R only'}")
  head = (f"{'round':>5} {'site':>10} {'T_r s':>7} {'inner':>7} {'exchange':>9} {'eval':>7} "
          f"{'wait':>7} {'other':>7} {'(merge)':>8}")
  print(head)
  for r in rows:
    T = r["round_s"]
    print(f"{r['round']:>5} {r['site']:>10} {T:7.2f} {_pct(r['compute_s'] / T):>7} "
          f"{_pct((r['read_s'] + r['publish_s']) / T):>9} {_pct(r['eval_s'] / T):>7} "
          f"{_pct(r['wait_s'] / T):>7} {_pct(r['other_s'] / T):>7} {_pct(r['merge_s'] / T):>8}"
          + ("   (start-up round)" if r["round"] == 1 else ""))

  summary: dict = {"sites": {}}
  print(f"\nsteady state (rounds 2..{_ROUNDS.value}), per site, seconds summed over rounds:")
  print(f"{'site':>10} {'outside inner':>14} {'exchange':>9} {'+merge':>7} {'waiting':>8} "
        f"{'inner fed s':>12} {'inner alone s':>14} {'slow-down':>10} {'uncontended':>12}")
  merge_alone = alone["merge_s"]
  for name in names:
    mine = [r for r in steady if r["site"] == name]
    if not mine:
      continue
    total = sum(r["round_s"] for r in mine)
    tot = {k: sum(r[k] for r in mine) for k in ("compute_s", "read_s", "publish_s", "eval_s",
                                               "wait_s", "merge_s", "other_s")}
    n = len(mine)
    a = alone["sites"][name]
    exch_alone = a["read_s"] + a["publish_s"] + merge_alone + poll
    uncontended = exch_alone / (a["compute_s"] + exch_alone)
    s = {"rounds": n, "round_s_mean": total / n,
         "outside_inner_fraction": 1 - tot["compute_s"] / total,
         "exchange_fraction": (tot["read_s"] + tot["publish_s"]) / total,
         "exchange_plus_merge_fraction":
             (tot["read_s"] + tot["publish_s"] + tot["merge_s"]) / total,
         "waiting_fraction": tot["wait_s"] / total, "eval_fraction": tot["eval_s"] / total,
         "other_fraction": tot["other_s"] / total,
         "inner_s_federated_mean": tot["compute_s"] / n, "inner_s_alone": a["compute_s"],
         "slow_down": tot["compute_s"] / n / a["compute_s"],
         "alone": a, "uncontended_overhead_fraction": uncontended,
         "step_s_mean": tot["compute_s"] / n / _INNER.value,
         "bytes_up_per_round": sum(r["bytes_up"] for r in mine) / n,
         "bytes_down_per_round": sum(r["bytes_down"] for r in mine) / n}
    summary["sites"][name] = s
    print(f"{name:>10} {_pct(s['outside_inner_fraction']):>14} {_pct(s['exchange_fraction']):>9} "
          f"{_pct(s['exchange_plus_merge_fraction']):>7} {_pct(s['waiting_fraction']):>8} "
          f"{s['inner_s_federated_mean']:12.2f} {a['compute_s']:14.2f} {s['slow_down']:9.2f}x "
          f"{_pct(uncontended):>12}")
  for name, s in summary["sites"].items():
    print(f"{name}: exchange (read + publish) {_pct(s['exchange_fraction']).strip()} of a round "
          f"of {s['round_s_mean']:.2f} s; step {s['step_s_mean']:.3f} s; per round "
          f"{s['bytes_up_per_round'] / 2**20:.2f} MiB up, {s['bytes_down_per_round'] / 2**20:.2f} "
          f"MiB down")
  for name, a in alone["sites"].items():
    print(f"alone, {name}: {_INNER.value} inner steps {a['compute_s']:.2f} s, read of the last "
          f"global round {a['read_s']:.3f} s, publish of an update {a['publish_s']:.3f} s")
  coord_steady = [c for c in coord_recs if c["round"] >= 2]
  merge_fed = float(np.mean([c["merge_s"] for c in coord_steady])) if coord_steady else float("nan")
  print(f"coordinator merge + publish: {merge_fed:.3f} s per round deployed, {merge_alone:.3f} s "
        f"alone; polling adds up to {poll:g} s per hop (federation.poll_s)")
  worst = max((s["outside_inner_fraction"] for s in summary["sites"].values()),
              default=float("nan"))
  worst_unc = max((s["uncontended_overhead_fraction"] for s in summary["sites"].values()),
                  default=float("nan"))
  print(f"target: outside inner steps <= 5.0% of a round. Deployed here: {_pct(worst).strip()} "
        f"(worst site, {'met' if worst <= 0.05 else 'NOT met'}); uncontended estimate from the "
        f"alone baselines: {_pct(worst_unc).strip()} "
        f"({'met' if worst_unc <= 0.05 else 'NOT met'}); load average {load0[0]:.1f} -> "
        f"{load1[0]:.1f} on {os.cpu_count()} CPUs")
  summary.update({"preset": _PRESET.value, "site_names": names, "inner_steps": _INNER.value,
                  "max_mbps": _MBPS.value or None,
                  "rounds": _ROUNDS.value, "eval_every_round": _EVAL.value, "poll_s": poll,
                  "deployed_s": deployed_s, "rows": rows, "coordinator": coord_recs,
                  "merge_s_alone": merge_alone, "merge_s_deployed_mean": merge_fed,
                  "bytes_per_update": alone["bytes_per_update"], "config_args": args,
                  "worst_outside_inner_fraction": worst,
                  "worst_uncontended_overhead_fraction": worst_unc, "target_fraction": 0.05,
                  "load_average_1m_before_after": [load0[0], load1[0]], "cpus": os.cpu_count()})
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  app.run(main)
