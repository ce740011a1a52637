"""The federation's summary: per-round records and the final comparison table.

Reads the same record fields from a deployment (each site's `rounds.jsonl`, the
coordinator's `rounds.jsonl`) or a simulation, and writes `WORKDIR/summary.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


def data_parallel_bytes(model_cfg, steps: int) -> int:
  """Bytes one site of data parallelism sends for `steps` optimizer steps with the model
  `model_cfg` (a config's `model` section, ConfigDict or dict): a float32 gradient of
  every parameter per step (what an all-reduce must move out of each site; a ring
  all-reduce moves up to twice that)."""
  from tapestry_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  return 4 * model_lib.count_params(model_lib.ModelConfig.from_config(model_cfg)) * steps


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _exchange_s(rec: dict) -> float:
  """Seconds a site spent outside training in one round: waiting, reading, publishing."""
  return sum(rec.get(k, 0.0) for k in ("wait_s", "read_s", "publish_s"))


def deployment_records(workdir: str, names: Iterable[str]) -> tuple[list[dict], list[dict]]:
  """(site records, coordinator records) written by the processes of a deployment.
  A restarted site appends; the last record per (site, round) wins."""
  latest: dict[tuple[str, int], dict] = {}
  for name in names:
    for rec in read_jsonl(os.path.join(workdir, "sites", name, "rounds.jsonl")):
      latest[(name, rec["global_round"])] = rec
  coord = {r["round"]: r for r in read_jsonl(os.path.join(workdir, "coordinator", "rounds.jsonl"))}
  return [latest[k] for k in sorted(latest)], [coord[k] for k in sorted(coord)]


def steady_exposure(recs: list[dict], rounds: int) -> dict[str, float]:
  """One site's steady state out of its rounds.jsonl records: wall seconds, inner steps,
  evaluation, the exchange the site's main thread waited on (publishing, or only
  encoding when the publish ran in the background; waiting for and reading or applying
  the next round) and the rest (checkpoints, logging). From adopting global round 1
  (round 0's phase holds the compilation) to adopting round R - 1: the last round's
  exchange has no next phase to hide behind in any run of R rounds."""
  by = {r["global_round"]: r for r in recs if "adopted_at" in r}
  last = rounds - 1
  wall = by[last]["adopted_at"] - by[1]["adopted_at"]
  phases = [by[g] for g in range(1, last)]
  # A phase's compute_s holds the steps trained ahead before adopting its round.
  inner = (sum(p["compute_s"] for p in phases) - by[1].get("ahead_s", 0.0)
           + by[last].get("ahead_s", 0.0))
  evals = sum(p.get("eval_s", 0.0) for p in phases)
  exchange = (sum(p["encode_s"] if "encode_s" in p else p["publish_s"] for p in phases)
              + sum(by[g]["wait_s"] + by[g]["read_s"] for g in range(2, last + 1)))
  return {"wall_s": wall, "inner_s": inner, "eval_s": evals, "exchange_s": exchange,
          "other_s": wall - inner - evals - exchange,
          "exchange_fraction": exchange / wall,
          "outside_inner_fraction": (wall - inner - evals) / wall,
          "final_loss": by[rounds]["eval_loss"]}


def summarize(config, site_records: list[dict], coordinator_records: list[dict] | None = None,
              alone: dict[str, dict] | None = None,
              data_parallel: dict[str, dict] | None = None) -> dict[str, Any]:
  """Per-round records and, per site, the final global model against the references."""
  rounds_total = int(config.federation.rounds)
  by_round: dict[int, dict] = {}
  for rec in site_records:
    g = rec["global_round"]
    r = by_round.setdefault(g, {"round": g, "sites": {}})
    r["sites"][rec["site"]] = {
        k: rec[k] for k in ("eval_loss", "eval_bits_per_byte", "train_loss", "tokens",
                            "compute_s", "eval_s", "bytes_up", "bytes_down", "wait_s",
                            "read_s", "publish_s", "dropped") if k in rec}
    s = r["sites"][rec["site"]]
    s["exchange_s"] = _exchange_s(rec)
  for rec in coordinator_records or []:
    by_round.setdefault(rec["round"], {"round": rec["round"], "sites": {}})["coordinator"] = rec
  final = {}
  steps = int(config.federation.rounds) * int(config.federation.inner_steps)
  names = sorted({rec["site"] for rec in site_records})
  for name in names:
    recs = [r for r in site_records if r["site"] == name]
    last = max((r for r in recs if "eval_loss" in r), key=lambda r: r["global_round"])
    final[name] = {
        "global_round": last["global_round"],
        "federated": {"eval_loss": last["eval_loss"],
                      "eval_bits_per_byte": last["eval_bits_per_byte"]},
        "bytes_sent": sum(r.get("bytes_up", 0) for r in recs),
        "bytes_received": sum(r.get("bytes_down", 0) for r in recs),
        "data_parallel_bytes_sent": data_parallel_bytes(config.model, steps),
        "compute_s": sum(r.get("compute_s", 0.0) for r in recs),
        "exchange_s": sum(_exchange_s(r) for r in recs),
    }
    for key, ref in (("alone", alone), ("data_parallel", data_parallel)):
      if ref and name in ref:
        final[name][key] = {k: ref[name][k] for k in ("eval_loss", "eval_bits_per_byte")}
  complete = all(max(r["global_round"] for r in site_records if r["site"] == n) == rounds_total
                 for n in names)
  return {"federation": config.federation.id, "rounds": rounds_total,
          "inner_steps": int(config.federation.inner_steps), "complete": complete,
          "outer": config.federation.outer.to_dict(),
          "per_round": [by_round[g] for g in sorted(by_round)], "final": final}


def _mib(n: float) -> str:
  return f"{n / 2**20:.2f} MiB"


def _vs_dp(v: dict) -> str:
  """What data parallelism would have sent for the same steps, and how many times more."""
  dp = v.get("data_parallel_bytes_sent")
  if not dp:
    return "-"
  return f"{_mib(dp)} ({dp / max(1, v['bytes_sent']):.1f}x)"


def table(summary: dict[str, Any]) -> str:
  """The final comparison as a fixed-width text table."""
  final = summary["final"]
  refs = [k for k in ("alone", "data_parallel") if any(k in v for v in final.values())]
  head = ["site", "fed loss", "fed bpb"]
  for k in refs:
    head += [f"{k} loss", f"{k} bpb"]
  head += ["sent", "received", "DP sends"]
  rows = [head]
  for name, v in final.items():
    row = [name, f"{v['federated']['eval_loss']:.4f}", f"{v['federated']['eval_bits_per_byte']:.4f}"]
    for k in refs:
      ref = v.get(k)
      row += [f"{ref['eval_loss']:.4f}", f"{ref['eval_bits_per_byte']:.4f}"] if ref else ["-", "-"]
    row += [_mib(v["bytes_sent"]), _mib(v["bytes_received"]), _vs_dp(v)]
    rows.append(row)
  if final:
    mean = lambda k, m: sum(v[k][m] for v in final.values() if k in v) / max(
        1, sum(1 for v in final.values() if k in v))
    row = ["mean", f"{mean('federated', 'eval_loss'):.4f}",
           f"{mean('federated', 'eval_bits_per_byte'):.4f}"]
    for k in refs:
      row += [f"{mean(k, 'eval_loss'):.4f}", f"{mean(k, 'eval_bits_per_byte'):.4f}"]
    row += [_mib(sum(v["bytes_sent"] for v in final.values())),
            _mib(sum(v["bytes_received"] for v in final.values())),
            _vs_dp({k: sum(v.get(k, 0) for v in final.values())
                    for k in ("bytes_sent", "data_parallel_bytes_sent")})]
    rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def write(summary: dict[str, Any], workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "summary.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  return path
