"""The utilization model: limits, monotonicity, overlap, data parallelism, and --check."""

import json
import math
import subprocess
import sys

import pytest

from experiments.benchmarks import utilization_model as um

P = 7e9
FP8 = um.CODECS["moments_fp8"]


def _table(**kw):
  args = dict(models={"7B": P}, sites=[8], gbps=[1, 10, 100], codecs={"fp8": FP8},
              inner_steps=30, overlap_steps=5, chips=8, peak_flops=989e12, mfu=0.4,
              tokens=2**20, latency_s=0.05, dp_grad_bytes=2)
  return um.table(**{**args, **kw})


def test_utilization_grows_with_bandwidth():
  rows = _table(gbps=[0.5, 1, 3, 10, 30, 100, 1000])
  for key in ("dp", "dp_overlapped"):
    values = [r[key] for r in rows]
    assert values == sorted(values) and values[0] < values[-1], key
  for key in ("utilization", "utilization_overlap"):
    values = [r["federated"]["fp8"][key] for r in rows]
    assert values == sorted(values) and values[0] < 0.5 < values[-1], key


def test_infinite_bandwidth_and_no_latency_give_full_utilization():
  (row,) = _table(gbps=[math.inf], latency_s=0.0)
  assert row["federated"]["fp8"]["exchange_s"] == 0.0 and row["allreduce_s"] == 0.0
  assert row["dp"] == 1.0 and row["federated"]["fp8"]["utilization"] == 1.0


def test_overlap_hides_an_exchange_shorter_than_tau_steps_entirely():
  step, H, tau = 2.0, 30, 5
  assert um.federated_utilization(H, step, 9.9, overlap_steps=tau) == 1.0
  assert um.federated_utilization(H, step, 9.9) == pytest.approx(60 / 69.9)
  # Longer than tau steps: only the rest is exposed.
  assert um.round_seconds(H, step, 14.0, overlap_steps=tau) == pytest.approx(60 + 4.0)


def test_exchange_counts_publish_coordinator_and_read():
  # 8 sites x 2 B/param up = 16 B/param into the coordinator > the 12 it writes.
  ex = um.federated_exchange_seconds(P, FP8, 8, 10, latency_s=0.0)
  assert ex == pytest.approx((2 + 16 + 12) * P * 8 / 10e9)
  # 4 sites: 8 B/param in, 12 out; the writes set the coordinator's time.
  assert um.federated_exchange_seconds(P, FP8, 4, 10, latency_s=0.0) == pytest.approx(
      (2 + 12 + 12) * P * 8 / 10e9)
  # A coordinator link 4x wider: a quarter of its 16 B/param.
  wide = um.federated_exchange_seconds(P, FP8, 8, 10, latency_s=0.0, coordinator_x=4)
  assert wide == pytest.approx((2 + 16 / 4 + 12) * P * 8 / 10e9)
  assert um.federated_exchange_seconds(P, FP8, 8, 10, latency_s=0.05) == pytest.approx(ex + 0.2)


def test_data_parallelism_all_reduces_a_gradient_every_step():
  short, long_ = _table(inner_steps=10), _table(inner_steps=100)
  for a, b in zip(short, long_):
    assert a["dp"] == b["dp"]  # per step, whatever H
    assert a["federated"]["fp8"]["utilization"] < b["federated"]["fp8"]["utilization"]
  for r in short:
    step = 6 * P * 2**20 / (8 * 989e12 * 0.4)
    allreduce = 2 * 7 / 8 * P * 2 * 8 / (r["gbps"] * 1e9) + 2 * 7 * 0.05
    assert r["step_s"] == pytest.approx(step)
    assert r["dp"] == pytest.approx(step / (step + allreduce))
  # A float32 gradient takes twice the bytes: lower utilization on a slow link.
  assert _table(dp_grad_bytes=4)[0]["dp"] < short[0]["dp"]


def _summary(mbps=8.0):
  mib = 2**20
  return {"max_mbps": mbps, "inner_steps": 20, "poll_s": 0.2, "merge_s_deployed_mean": 3.0,
          "sites": {n: {"step_s_mean": step, "bytes_up_per_round": 1 * mib,
                        "bytes_down_per_round": 6 * mib, "exchange_fraction": 0.3,
                        "round_s_mean": 20.0} for n, step in (("a", 0.1), ("b", 0.2))},
          "coordinator": [{"round": 1, "bytes_read": 0, "bytes_written": 0},
                          {"round": 2, "bytes_read": 8 * mib, "bytes_written": 6 * mib}]}


def test_check_predicts_from_the_measured_step_bytes_and_link():
  rows = {r["site"]: r for r in um.check(_summary())}
  bw = 8e6 / 8  # bytes/s
  site_ex = 7 * 2**20 / bw
  coord = (6 * 2**20 + 6 * 2**20) / bw  # base round (8 - 2 updates) read, then written
  round_s = 20 * 0.2 + site_ex + coord + 0.2  # the slower site sets the round
  assert rows["a"]["round_s_predicted"] == pytest.approx(round_s)
  assert rows["a"]["predicted"] == pytest.approx(site_ex / round_s)
  assert rows["b"]["ratio"] == pytest.approx(site_ex / round_s / 0.3)
  # A faster link: a smaller predicted fraction.
  assert um.check(_summary(80.0))[0]["predicted"] < rows["a"]["predicted"]


def test_check_refuses_an_unthrottled_or_foreign_file_in_one_line(tmp_path):
  path = tmp_path / "fo.json"
  path.write_text(json.dumps({**_summary(), "max_mbps": None}))
  with pytest.raises(um.BadInput, match="no 'max_mbps'.*--max_mbps=X"):
    um.load_check(str(path))
  with pytest.raises(FileNotFoundError):
    um.load_check(str(tmp_path / "missing.json"))
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.utilization_model",
                         f"--check={path}"], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: {path}: the file has no 'max_mbps': not the --json_out of a throttled "
      f"federation_overhead run (--max_mbps=X)"]


def test_the_cli_prints_every_model_sites_and_link():
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.utilization_model",
                         "--codecs=moments_fp8"], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  rows = [l.split() for l in proc.stdout.splitlines() if l.split()[:1] in (["1B"], ["7B"],
                                                                           ["70B"])]
  assert sorted({(r[0], r[1], r[2]) for r in rows}) == sorted(
      (m, k, g) for m in ("1B", "7B", "70B") for k in ("4", "8", "16") for g in ("1", "10", "100"))
