"""int8 pseudo-gradients: what a site sends with `federation.update_dtype = "int8"`.

INTELLECT-1's scheme (arXiv 2412.01152; `../shared/ALGORITHMS.md`): per tensor, values
are clipped to mean +- 6 standard deviations and rounded to one of 255 evenly spaced
levels, an int8 code in [-127, 127]:

  value = offset + scale * code,   offset = mean(x),   scale = 6 * std(x) / 127

so an update is 4x smaller than in float32. The codes are the stored array; `offset`
and `scale` (float32 values) go into the array's record in the site's signed manifest
(`exchange` validates them, `check_schema` requires them exactly for quantized leaves).
The coordinator dequantizes inside the merge (`outer.merge_block`, in float32), so the
simulation and the streaming merge compute the same bits; the site declares the norm of
the dequantized values (`sum_squares`), which is what clipping bounds.

A site quantizes on its own devices (`quantize`, jitted; the codes keep the delta's
sharding, so each process writes only its own shards).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DTYPE = "int8"
LEVELS = 127  # Codes are in [-LEVELS, LEVELS]: 255 levels, symmetric around the mean.
SIGMAS = 6.0  # Values beyond mean +- SIGMAS * std are clipped to the outermost level.


@dataclasses.dataclass(frozen=True)
class Quantized:
  """One quantized leaf: int8 `codes` and the affine map back to float32 values.

  Not a pytree node on purpose: a flat `{name: Quantized}` dict keeps one entry per
  parameter, like a float update."""
  codes: Any  # int8 array (jax or numpy)
  offset: float  # float32 values, as Python floats (exact in JSON)
  scale: float

  def params(self) -> dict[str, float]:
    """What the array's record holds (`exchange` record field "quant")."""
    return {"offset": self.offset, "scale": self.scale}


@jax.jit
def _quantize(x):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x)
  std = jnp.std(x)
  # A constant leaf (std 0) is all code 0: it dequantizes to its mean exactly.
  scale = jnp.where(std > 0, std * jnp.float32(SIGMAS / LEVELS), jnp.float32(1))
  codes = jnp.clip(jnp.round((x - mean) / scale), -LEVELS, LEVELS).astype(jnp.int8)
  return codes, mean, scale


def quantize(x) -> Quantized:
  """`x` (a floating array, any sharding) as int8 codes on the same devices.

  Raises ValueError if `x` has a NaN or an infinity (its mean and std are then not
  finite: there is nothing meaningful to send)."""
  if math.prod(np.shape(x)) == 0:
    return Quantized(jnp.zeros(np.shape(x), jnp.int8), 0.0, 1.0)
  codes, mean, scale = _quantize(x)
  offset, scale = (float(v) for v in jax.device_get((mean, scale)))
  if not (math.isfinite(offset) and math.isfinite(scale)):
    raise ValueError("cannot quantize an array with NaN or Inf values")
  return Quantized(codes, offset, scale)


def dequantize(codes, offset, scale):
  """float32 values of int8 `codes` (jnp; traced inside the merge's jit)."""
  return jnp.float32(offset) + codes.astype(jnp.float32) * jnp.float32(scale)


def check_params(quant: Any) -> str | None:
  """What is wrong with a record's "quant" field (None if nothing): it must be
  {"offset": finite number, "scale": finite number > 0}, with every code's value
  within float32's range (so the dequantized update is finite)."""
  if not isinstance(quant, dict) or set(quant) != {"offset", "scale"}:
    return f"quantization parameters {quant!r} are not {{'offset': ..., 'scale': ...}}"
  for key in ("offset", "scale"):
    v = quant[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return f"quantization {key} {v!r} is not a finite number"
    if abs(v) > float(np.finfo(np.float32).max):
      return f"quantization {key} {v!r} does not fit float32"
  if not quant["scale"] > 0:
    return f"quantization scale {quant['scale']!r} must be > 0"
  # 128: a (hostile) code of -128 is still a valid int8 and must dequantize finitely too.
  if abs(quant["offset"]) + 128 * quant["scale"] > float(np.finfo(np.float32).max):
    return "quantization parameters dequantize beyond float32's range"
  return None


_SIGNED = np.arange(256, dtype=np.int64)
_SIGNED = np.where(_SIGNED < 128, _SIGNED, _SIGNED - 256).astype(np.float64)  # uint8 -> int8


def sum_squares(codes, offset: float, scale: float) -> float:
  """sum(dequantized ** 2) in float64, from a histogram of the codes (one cheap pass; no
  float copy of the array)."""
  flat = np.ascontiguousarray(np.asarray(codes)).reshape(-1).view(np.uint8)
  counts = np.bincount(flat, minlength=256).astype(np.float64)
  values = np.float64(np.float32(offset)) + np.float64(np.float32(scale)) * _SIGNED
  return float(np.dot(counts, values * values))
