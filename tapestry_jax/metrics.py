"""Where training metrics go: JSON lines, TensorBoard event files, and MFU arithmetic.

The trainer hands finished (host) metric dicts to `MetricWriter.write`; this module
never touches device arrays, so it cannot make the training loop block.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s per device for MFU, from vendor spec sheets (no sparsity).
# Keys are matched against `device.device_kind` (lower-cased substring match).
_PEAK_FLOPS = {
    "bfloat16": {
        "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12,
        "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
        "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
    },
    "float32": {  # TF32 tensor cores on NVIDIA; TPUs run fp32 matmuls through bf16 passes.
        "h200": 494e12, "h100": 494e12, "a100": 156e12, "l4": 60e12,
    },
}


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, seconds: float = 1.0) -> float:
  """Measures this host's sustained matmul FLOP/s on one device (used for CPU MFU)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  reps, best = 0, math.inf
  start = time.perf_counter()
  while time.perf_counter() - start < seconds or reps < 3:
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
    reps += 1
  return 2.0 * n**3 / best


def peak_flops(compute_dtype: str, devices: list[jax.Device] | None = None) -> float | None:
  """Total peak FLOP/s of `devices` for MFU, or None if the hardware is unknown.

  On CPU the peak is *measured* (a fp32/bf16 matmul on this host), since simulated
  CPU devices share the same cores and there is no spec sheet to look up."""
  devices = devices or jax.devices()
  if devices[0].platform == "cpu":
    return measure_matmul_peak(jnp.dtype(compute_dtype))
  kind = devices[0].device_kind.lower()
  table = _PEAK_FLOPS.get(compute_dtype, {})
  for key, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
    if key in kind:
      return value * len(devices)
  return None


class MetricWriter:
  """Appends metric dicts to WORKDIR/metrics.jsonl and TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    # Imported lazily: tensorboardX pulls in protobuf, which tests need not pay for twice.
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step)}
    for k, v in metrics.items():
      v = np.asarray(v).item() if not isinstance(v, (str, int, float)) else v
      record[k] = v
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
