"""Compute utilization of federated rounds and of data parallelism over WAN links: a model.

  python -m experiments.benchmarks.utilization_model        # 1B/7B/70B x 4/8/16 x 1/10/100
  python -m experiments.benchmarks.utilization_model --inner_steps=30 --overlap_steps=10
  python -m experiments.benchmarks.utilization_model --check=/tmp/fo.json  # vs a throttled run

Like Streaming DiLoCo's simulation table: a step costs 6 P T / (C peak MFU) seconds; a
federated round is H steps plus an exchange (site publishes, coordinator merges, site
reads), of which an overlap of tau steps hides up to tau steps; data parallelism ring
all-reduces a gradient every step over the same links. The functions are pure Python;
every assumption is a flag, and docs/utilization_model.md states them with a table.
`--check` reads `federation_overhead --max_mbps=X --json_out=PATH` and sets the model's
prediction of each site's exchange fraction beside the measured one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Mapping, Sequence

from absl import app, flags

MODELS = {"1B": 1e9, "7B": 7e9, "70B": 70e9}  # Parameters.
H100_BF16_PEAK_FLOPS = 989e12  # Dense bf16, per chip.


@dataclasses.dataclass(frozen=True)
class Codec:
  """Bytes per parameter a site sends (its update) and reads (the global round)."""
  up: float
  down: float
  about: str


CODECS = {
    "diloco_fp32": Codec(4, 4, "DiLoCo: float32 pseudo-gradient up, float32 params down"),
    "moments_fp8": Codec(2, 12, "shared moments today: float8 pseudo-gradient and first "
                         "moment up; float32 params and both moments down"),
    "moments_4bit": Codec(1.06, 1.6, "hypothetical: 4-bit pseudo-gradient and first moment "
                          "up, 4-bit deltas of params and both moments down (a 16-bit "
                          "scale per 64 values)"),
    "diloco_4bit": Codec(0.53, 0.53, "hypothetical: 4-bit pseudo-gradient up, 4-bit params "
                         "delta down (Streaming DiLoCo's 4-bit exchange)"),
}


class BadInput(ValueError):
  """A flag the model cannot use, or a --check file that is not a throttled
  federation_overhead result."""


def step_seconds(params: float, tokens: float, chips: int, peak_flops: float,
                 mfu: float) -> float:
  """One inner step of a site: 6 P T FLOPs at `mfu` of the chips' peak."""
  return 6 * params * tokens / (chips * peak_flops * mfu)


def transfer_seconds(nbytes: float, gbps: float, latency_s: float = 0.0) -> float:
  """`nbytes` over one link of `gbps` gigabit/s (math.inf: latency only), plus one latency."""
  return latency_s + (0.0 if math.isinf(gbps) else nbytes * 8 / (gbps * 1e9))


def federated_exchange_seconds(params: float, codec: Codec, sites: int, gbps: float,
                               latency_s: float = 0.0, coordinator_x: float = 1.0) -> float:
  """One round's exchange on its critical path: every site publishes (in parallel, each
  over its own link), the coordinator reads the `sites` updates and writes one round over
  its link of `coordinator_x` times `gbps` (the streaming merge overlaps the two
  directions: the larger counts), then every site reads the round. Four latencies."""
  publish = transfer_seconds(params * codec.up, gbps, latency_s)
  coord_gbps = gbps * coordinator_x
  merge = max(transfer_seconds(sites * params * codec.up, coord_gbps, latency_s),
              transfer_seconds(params * codec.down, coord_gbps, latency_s)) + latency_s
  read = transfer_seconds(params * codec.down, gbps, latency_s)
  return publish + merge + read


def ring_allreduce_seconds(nbytes: float, sites: int, gbps: float,
                           latency_s: float = 0.0) -> float:
  """A ring all-reduce of `nbytes` among `sites`, each with one link of `gbps`:
  2 (K - 1) / K of the bytes cross every link, in 2 (K - 1) latency-bound steps."""
  if sites <= 1:
    return 0.0
  return transfer_seconds(2 * (sites - 1) / sites * nbytes, gbps, 2 * (sites - 1) * latency_s)


def round_seconds(inner_steps: int, step_s: float, exchange_s: float,
                  overlap_steps: float = 0) -> float:
  """H steps plus what of the exchange `overlap_steps` steps of the next round leave exposed."""
  return inner_steps * step_s + max(0.0, exchange_s - overlap_steps * step_s)


def federated_utilization(inner_steps: int, step_s: float, exchange_s: float,
                          overlap_steps: float = 0) -> float:
  """Compute utilization of a round: H steps over the round."""
  return inner_steps * step_s / round_seconds(inner_steps, step_s, exchange_s, overlap_steps)


def data_parallel_utilization(step_s: float, allreduce_s: float, overlapped: bool = False) -> float:
  """A step over (step + its gradient's all-reduce); `overlapped`: the all-reduce runs
  entirely under the step (the best case, step / max(step, all-reduce))."""
  return step_s / (max(step_s, allreduce_s) if overlapped else step_s + allreduce_s)


def table(*, models: Mapping[str, float], sites: Sequence[int], gbps: Sequence[float],
          codecs: Mapping[str, Codec], inner_steps: int, overlap_steps: float,
          chips: int | Mapping[str, int],
          peak_flops: float, mfu: float, tokens: float, latency_s: float,
          dp_grad_bytes: float, coordinator_x: float = 1.0) -> list[dict[str, Any]]:
  """One row per (model, sites, link): step time, data parallelism's utilization (serial
  and overlapped) and, per codec, the exchange time and utilization without and with
  overlap. `chips`: per site, for every model or per model name."""
  rows = []
  for name, p in models.items():
    c = chips[name] if isinstance(chips, Mapping) else chips
    step = step_seconds(p, tokens, c, peak_flops, mfu)
    for k in sites:
      for g in gbps:
        ar = ring_allreduce_seconds(p * dp_grad_bytes, k, g, latency_s)
        row = {"model": name, "params": p, "chips": c, "sites": k, "gbps": g, "step_s": step,
               "allreduce_s": ar, "dp": data_parallel_utilization(step, ar),
               "dp_overlapped": data_parallel_utilization(step, ar, overlapped=True),
               "federated": {}}
        for c_name, codec in codecs.items():
          ex = federated_exchange_seconds(p, codec, k, g, latency_s, coordinator_x)
          row["federated"][c_name] = {
              "exchange_s": ex, "utilization": federated_utilization(inner_steps, step, ex),
              "utilization_overlap": federated_utilization(inner_steps, step, ex, overlap_steps)}
        rows.append(row)
  return rows


def _need(obj: Mapping, key: str, where: str) -> Any:
  if not isinstance(obj, Mapping) or key not in obj or obj[key] is None:
    raise BadInput(f"{where} has no {key!r}: not the --json_out of a throttled "
                     f"federation_overhead run (--max_mbps=X)")
  return obj[key]


def check(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Per site of a throttled federation_overhead run: the model's exchange fraction
  (read + publish over the round) beside the measured one.

  The model gets the run's measured step time, bytes per round and link (max_mbps), and
  the emulation's topology: no latency (file:// buckets), each party's limiter per bucket
  (the coordinator reads every site's update in parallel, each over that site's link, and
  the base round over the global bucket's, then writes the round: the merge counts its
  writes when it finishes), and polling (federation.poll_s: two waits of half a poll on
  average). The round is set by the slowest site."""
  mbps = float(_need(summary, "max_mbps", "the file"))
  gbps, H = mbps / 1000, int(_need(summary, "inner_steps", "the file"))
  sites = _need(summary, "sites", "the file")
  if not sites:
    raise BadInput("the file has no steady-state rounds (run --rounds=3 or more)")
  coord = [c for c in _need(summary, "coordinator", "the file") if c.get("round", 0) >= 2]
  if not coord:
    raise BadInput("the file has no coordinator record of a steady-state round")
  bytes_read = sum(_need(c, "bytes_read", "a coordinator record") for c in coord) / len(coord)
  written = sum(_need(c, "bytes_written", "a coordinator record") for c in coord) / len(coord)
  ups = {n: float(_need(s, "bytes_up_per_round", f"site {n}")) for n, s in sites.items()}
  downs = {n: float(_need(s, "bytes_down_per_round", f"site {n}")) for n, s in sites.items()}
  steps = {n: float(_need(s, "step_s_mean", f"site {n}")) for n, s in sites.items()}
  base = max(0.0, bytes_read - sum(ups.values()))
  coord_s = (transfer_seconds(max(base, *ups.values()), gbps)
             + transfer_seconds(written, gbps))
  site_ex = {n: transfer_seconds(ups[n], gbps) + transfer_seconds(downs[n], gbps) for n in sites}
  poll = float(summary.get("poll_s", 0.0))
  round_s = max(H * steps[n] + site_ex[n] for n in sites) + coord_s + poll
  out = []
  for n, s in sites.items():
    measured = float(_need(s, "exchange_fraction", f"site {n}"))
    predicted = site_ex[n] / round_s
    out.append({"site": n, "max_mbps": mbps, "step_s": steps[n], "bytes_up": ups[n],
                "bytes_down": downs[n], "exchange_s_predicted": site_ex[n],
                "exchange_s_measured": measured * float(s.get("round_s_mean", math.nan)),
                "round_s_predicted": round_s, "round_s_measured": s.get("round_s_mean"),
                "coordinator_s_predicted": coord_s,
                "coordinator_s_measured": summary.get("merge_s_deployed_mean"),
                "predicted": predicted, "measured": measured, "ratio": predicted / measured})
  return out


def load_check(path: str) -> list[dict[str, Any]]:
  """`check` of a JSON file; FileNotFoundError or BadInput (one line) if it is unusable."""
  with open(path) as f:
    try:
      summary = json.load(f)
    except json.JSONDecodeError as e:
      raise BadInput(f"{path} is not JSON ({e})") from None
  try:
    return check(summary)
  except BadInput as e:
    raise BadInput(f"{path}: {e}") from None


# ------------------------------------------------------------------------------ the CLI

_MODELS = flags.DEFINE_list("models", list(MODELS), f"Model sizes, of {list(MODELS)}.")
_SITES = flags.DEFINE_list("sites", ["4", "8", "16"], "Numbers of sites K.")
_GBPS = flags.DEFINE_list("gbps", ["1", "10", "100"], "Link bandwidths between sites, Gbit/s "
                          "per direction (each site's, and the coordinator's).")
_CODECS = flags.DEFINE_list("codecs", ["diloco_fp32", "moments_fp8", "moments_4bit"],
                            f"Federated configurations, of {list(CODECS)}.")
_UP = flags.DEFINE_float("up_bytes_per_param", 0.0, "With --down_bytes_per_param: one more "
                         "configuration, 'custom', sending this many bytes per parameter.")
_DOWN = flags.DEFINE_float("down_bytes_per_param", 0.0, "... and reading this many.")
_H = flags.DEFINE_integer("inner_steps", 100, "H: inner steps per round.")
_TAU = flags.DEFINE_float("overlap_steps", 5, "tau: steps of the next round the exchange "
                          "overlaps (the 'overlap' columns).")
_CHIPS = flags.DEFINE_list("chips", ["8"], "Chips per site: one number for every model, or "
                           "one per --models entry (e.g. 8,64,512).")
_PEAK = flags.DEFINE_float("peak_tflops", H100_BF16_PEAK_FLOPS / 1e12, "Peak TFLOP/s per chip "
                           "(H100 SXM dense bf16).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilization of a step.")
_TOKENS = flags.DEFINE_float("tokens_per_step", 2**20, "Tokens per site per inner step "
                             "(2^20: 512 sequences of 2048).")
_LATENCY = flags.DEFINE_float("latency_ms", 50, "Latency per hop (per transfer), ms.")
_DP_BYTES = flags.DEFINE_float("dp_grad_bytes", 2, "Bytes per gradient element data "
                               "parallelism all-reduces every step (2: bf16).")
_COORD_X = flags.DEFINE_float("coordinator_link_x", 1.0, "The coordinator's link, in "
                              "multiples of a site's.")
_CHECK = flags.DEFINE_string("check", "", "Instead of the table: compare with this "
                             "federation_overhead --max_mbps=X --json_out file.")


def _floats(values: Sequence[str], flag: str) -> list[float]:
  try:
    out = [float(v) for v in values]
  except ValueError:
    raise BadInput(f"--{flag} takes numbers, got {','.join(values)}") from None
  if not out or any(not (v > 0) for v in out):
    raise BadInput(f"--{flag} takes positive numbers, got {','.join(values)}")
  return out


def _print_check(path: str) -> None:
  rows = load_check(path)
  r0 = rows[0]
  print(f"{path}: link {r0['max_mbps']:g} Mbit/s per direction; predicted round "
        f"{r0['round_s_predicted']:.2f} s (coordinator {r0['coordinator_s_predicted']:.2f} s, "
        f"measured {r0['coordinator_s_measured']:.2f} s)")
  print(f"{'site':>10} {'step s':>7} {'MiB up':>7} {'MiB down':>9} {'exch s model':>13} "
        f"{'exch s meas':>12} {'round s meas':>13} {'model':>7} {'measured':>9} {'ratio':>6}")
  for r in rows:
    print(f"{r['site']:>10} {r['step_s']:7.3f} {r['bytes_up'] / 2**20:7.2f} "
          f"{r['bytes_down'] / 2**20:9.2f} {r['exchange_s_predicted']:13.2f} "
          f"{r['exchange_s_measured']:12.2f} {r['round_s_measured']:13.2f} "
          f"{100 * r['predicted']:6.1f}% {100 * r['measured']:8.1f}% {r['ratio']:6.2f}")


def _print_table() -> None:
  unknown = [m for m in _MODELS.value if m not in MODELS] + [
      c for c in _CODECS.value if c not in CODECS]
  if unknown:
    raise BadInput(f"unknown {unknown}; models are {list(MODELS)}, codecs {list(CODECS)}")
  codecs = {c: CODECS[c] for c in _CODECS.value}
  if _UP.value > 0 and _DOWN.value > 0:
    codecs["custom"] = Codec(_UP.value, _DOWN.value, "--up/--down_bytes_per_param")
  sites = [int(s) for s in _floats(_SITES.value, "sites")]
  chips = [int(c) for c in _floats(_CHIPS.value, "chips")]
  if len(chips) not in (1, len(_MODELS.value)):
    raise BadInput(f"--chips takes one number or one per model ({len(_MODELS.value)})")
  chips = dict(zip(_MODELS.value, chips * len(_MODELS.value) if len(chips) == 1 else chips))
  gbps = _floats(_GBPS.value, "gbps")
  for flag in (_PEAK, _MFU, _TOKENS, _DP_BYTES, _COORD_X):
    if not flag.value > 0:
      raise BadInput(f"--{flag.name} must be positive, got {flag.value}")
  if not _LATENCY.value >= 0:
    raise BadInput(f"--latency_ms must be >= 0, got {_LATENCY.value}")
  if _H.value < 1 or not 0 <= _TAU.value <= _H.value:
    raise BadInput("need --inner_steps >= 1 and 0 <= --overlap_steps <= --inner_steps")
  rows = table(models={m: MODELS[m] for m in _MODELS.value}, sites=sites, gbps=gbps,
               codecs=codecs, inner_steps=_H.value, overlap_steps=_TAU.value,
               chips=chips, peak_flops=_PEAK.value * 1e12, mfu=_MFU.value,
               tokens=_TOKENS.value, latency_s=_LATENCY.value / 1000,
               dp_grad_bytes=_DP_BYTES.value, coordinator_x=_COORD_X.value)
  print(f"compute utilization: {','.join(_CHIPS.value)} chips per site at {_PEAK.value:g} "
        f"TFLOP/s, MFU "
        f"{_MFU.value:g}, {_TOKENS.value:,.0f} tokens per site-step; links per direction, "
        f"{_LATENCY.value:g} ms per hop, coordinator link x{_COORD_X.value:g}; data "
        f"parallelism: ring all-reduce of a {_DP_BYTES.value:g}-byte gradient every step "
        f"(DP: after the step, DP||: entirely under it); federated: H={_H.value}, overlap "
        f"tau={_TAU.value:g} steps")
  for name, c in codecs.items():
    print(f"  {name}: {c.up:g} B/param up, {c.down:g} B/param down ({c.about})")
  top = " " * 37
  head = f"{'model':>5} {'K':>3} {'Gbit/s':>6} {'step s':>7} {'DP':>6} {'DP||':>6}"
  top += " " * (len(head) - len(top))
  for name in codecs:
    top += f" | {name[:22]:^22}"
    head += f" | {'exch s':>8} {'none':>6} {'tau':>6}"
  print(top)
  print(head)
  for r in rows:
    line = (f"{r['model']:>5} {r['sites']:>3} {r['gbps']:>6g} {r['step_s']:7.2f} "
            f"{100 * r['dp']:5.1f}% {100 * r['dp_overlapped']:5.1f}%")
    for name in codecs:
      f = r["federated"][name]
      line += (f" | {f['exchange_s']:8.1f} {100 * f['utilization']:5.1f}% "
               f"{100 * f['utilization_overlap']:5.1f}%")
    print(line)


def main(argv):
  del argv
  try:
    if _CHECK.value:
      _print_check(_CHECK.value)
    else:
      _print_table()
  except (BadInput, OSError) as e:
    message = (f"{e.strerror.lower()}: {e.filename}" if isinstance(e, OSError) and e.filename
               else str(e))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
