"""One-byte pseudo-gradients: what a site sends with `federation.update_dtype` "int8" or
"float8_e4m3fn"; either is 4x smaller than float32.

  int8           INTELLECT-1's scheme (arXiv 2412.01152): per
                 tensor, values are clipped to mean +- 6 standard deviations and rounded
                 to one of 255 evenly spaced levels, an int8 code in [-127, 127]:
                   value = offset + scale * code, offset = mean(x), scale = 6 std(x) / 127
  float8_e4m3fn  per tensor, scaled so that the largest magnitude is float8's largest
                 (448) and rounded to float8 (XLA, to nearest even): levels spaced
                 logarithmically, like Streaming DiLoCo's 4-bit floats, so the many small
                 coordinates of a heavy-tailed update keep ~2 significant bits instead of
                 rounding to 0:  value = scale * code, offset = 0, scale = max|x| / 448

The codes are the stored array; `offset` and `scale` (float32 values) go into the
array's record in the site's signed manifest
(`exchange` validates them, `check_schema` requires them exactly for quantized leaves).
The coordinator dequantizes inside the merge (`outer.merge_block`, in float32), so the
simulation and the streaming merge compute the same bits; the site declares the norm of
the dequantized values (`sum_squares`), which is what clipping bounds.

A site quantizes on its own devices (`quantize`, jitted; the codes keep the delta's
sharding, so each process writes only its own shards).

Block-scaled codes (the last sections: `encode_blocks`, `decode_blocks`, `BlockFormat`) are
what a site READS with `federation.download_dtype`: one scale per block of the last axis,
one-byte codes or 4-bit ones packed two per byte (`pack_nibbles`, also what
`update_codecs` packs a site's 4-bit updates with).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DTYPE = "int8"
FP8 = "float8_e4m3fn"
DTYPES = (DTYPE, FP8)  # The encoded update dtypes (`federation.update_dtype`).
LEVELS = 127  # int8 codes are in [-LEVELS, LEVELS]: 255 levels, symmetric around the mean.
SIGMAS = 6.0  # Values beyond mean +- SIGMAS * std are clipped to the outermost level.
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value.
# The largest |code| a record's parameters must keep finite (a hostile int8 code of -128
# is still a valid int8).
_MAX_CODE = {DTYPE: 128.0, FP8: FP8_MAX}


@dataclasses.dataclass(frozen=True)
class Quantized:
  """One quantized leaf: int8 or float8 `codes` and the affine map back to float32.

  Not a pytree node on purpose: a flat `{name: Quantized}` dict keeps one entry per
  parameter, like a float update."""
  codes: Any  # int8 / float8_e4m3fn array (jax or numpy)
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


@jax.jit
def _quantize_fp8(x):
  x = x.astype(jnp.float32)
  peak = jnp.max(jnp.abs(x))
  # (peak == 0, not peak > 0: a NaN peak must give a NaN scale, which `quantize` refuses.)
  scale = jnp.where(peak == 0, jnp.float32(1), peak / jnp.float32(FP8_MAX))
  # |x / scale| <= 448 up to rounding; the clip keeps a rounded-up 448.00003 off NaN.
  codes = jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
  return codes, jnp.float32(0), scale


def quantize(x, dtype: str = DTYPE) -> Quantized:
  """`x` (a floating array, any sharding) as `dtype` codes (int8 or float8_e4m3fn) on
  the same devices.

  Raises ValueError if `x` has a NaN or an infinity (its statistics are then not
  finite: there is nothing meaningful to send)."""
  if dtype not in DTYPES:
    raise ValueError(f"unknown encoded update dtype {dtype!r}; known: {DTYPES}")
  if math.prod(np.shape(x)) == 0:
    return Quantized(jnp.zeros(np.shape(x), jnp.dtype(dtype)), 0.0, 1.0)
  codes, mean, scale = (_quantize if dtype == DTYPE else _quantize_fp8)(x)
  offset, scale = (float(v) for v in jax.device_get((mean, scale)))
  if not (math.isfinite(offset) and math.isfinite(scale)):
    raise ValueError("cannot quantize an array with NaN or Inf values")
  return Quantized(codes, offset, scale)


def dequantize(codes, offset, scale):
  """float32 values of `codes` (jnp; traced inside the merge's jit)."""
  return jnp.float32(offset) + codes.astype(jnp.float32) * jnp.float32(scale)


def check_params(quant: Any, dtype: str = DTYPE) -> str | None:
  """What is wrong with a record's "quant" field for codes of `dtype` (None if
  nothing): it must be {"offset": finite number, "scale": finite number > 0}, with every
  code's value within float32's range (so the dequantized update is finite; float8's
  NaN codes are caught by the merge's finiteness check)."""
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
  if dtype not in DTYPES:
    return f"quantized array has dtype {dtype}, not one of {', '.join(DTYPES)}"
  if abs(quant["offset"]) + _MAX_CODE[dtype] * quant["scale"] > float(np.finfo(np.float32).max):
    return "quantization parameters dequantize beyond float32's range"
  return None


# The value of each of the 256 one-byte codes, by its bit pattern (float8's 2 NaN codes
# are NaN here too: an update holding one has a NaN norm).
_CODE_VALUES = {
    np.dtype(DTYPE): np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64),
    np.dtype(jnp.float8_e4m3fn): np.arange(256, dtype=np.uint8).view(
        jnp.float8_e4m3fn).astype(np.float64),
}


def sum_squares(codes, offset: float, scale: float) -> float:
  """sum(dequantized ** 2) in float64, from a histogram of the codes (one cheap pass; no
  float copy of the array)."""
  codes = np.ascontiguousarray(np.asarray(codes))
  counts = np.bincount(codes.reshape(-1).view(np.uint8), minlength=256).astype(np.float64)
  values = (np.float64(np.float32(offset))
            + np.float64(np.float32(scale)) * _CODE_VALUES[codes.dtype])
  used = counts > 0  # 0 * NaN would be NaN: only codes that occur count.
  counts, values = counts[used], values[used]
  return float(np.dot(counts, values * values))


# ------------------------------------------------------------------ 4-bit codes
# int4 (two's complement, the encoders use [-7, 7]) and float4_e2m1fn (sign bit 8 over the
# magnitudes +-{0, .5, 1, 1.5, 2, 3, 4, 6}) codes are packed two per uint8 along the last
# axis: element 2i in the low nibble, 2i + 1 in the high one; an odd last axis is padded
# with one zero nibble (the high nibble of each row's last byte).

INT4 = "int4"
FP4 = "float4_e2m1fn"
NIBBLE_DTYPES = (INT4, FP4)
FP4_GRID = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float32)  # e2m1 magnitudes, by bits
# The value of each nibble: int4 two's complement; float4 sign bit 8 over the grid.
NIBBLE_VALUES = {INT4: np.array([*range(8), *range(-8, 0)], np.float32),
                 FP4: np.concatenate([FP4_GRID, -FP4_GRID]).astype(np.float32)}


def packed_cols(n: int) -> int:
  """Bytes per row of `n` 4-bit codes."""
  return -(-int(n) // 2)


def pack_nibbles(nibbles):
  """uint8 nibbles (..., n) -> bytes (..., ceil(n / 2)), element 2i in the low nibble."""
  n = nibbles.shape[-1]
  if n % 2:
    nibbles = jnp.pad(nibbles, [(0, 0)] * (nibbles.ndim - 1) + [(0, 1)])
  pairs = nibbles.reshape(*nibbles.shape[:-1], nibbles.shape[-1] // 2, 2)
  return pairs[..., 0] | (pairs[..., 1] << 4)


def nibble_codes(y, dtype: str):
  """Packed 4-bit `dtype` codes of `y` = x / scale (..., n) (|y| <= 7 for int4, 6 for
  float4, up to rounding): int4 rounds half to even and clips to [-7, 7]; float4 rounds
  to the nearest e2m1 value, ties to the even code (a cast to float4_e2m1fn), -0 as +0."""
  if dtype == INT4:
    c = jnp.clip(jnp.round(y), -7, 7).astype(jnp.int32)  # round: half to even
    return pack_nibbles(jnp.where(c < 0, c + 16, c).astype(jnp.uint8))
  m = jnp.minimum(jnp.abs(y), jnp.float32(6))
  # Index into the grid: past each midpoint, or on it when the upper code is even.
  mids = (FP4_GRID[1:] + FP4_GRID[:-1]) / 2
  idx = sum(((m > mid) | ((m == mid) & (i % 2 == 1))).astype(jnp.int32)
            for i, mid in enumerate(mids.tolist()))
  sign = ((y < 0) & (idx > 0)).astype(jnp.int32)  # -0 is sent as +0
  return pack_nibbles((idx + 8 * sign).astype(jnp.uint8))


def nibble_values(codes, dtype: str, n: int):
  """float32 values (..., n) of packed 4-bit `dtype` codes (..., ceil(n / 2)), unscaled
  (jnp; traceable)."""
  nib = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(
      *codes.shape[:-1], 2 * codes.shape[-1])[..., :n]
  nib = nib.astype(jnp.int32)
  if dtype == INT4:  # Elementwise (no table gather): row-blocks shard and fuse freely.
    return (nib - 16 * (nib >= 8)).astype(jnp.float32)
  mag = nib & 7
  value = sum(jnp.where(mag == i, jnp.float32(g), jnp.float32(0))
              for i, g in enumerate(FP4_GRID.tolist()) if g)
  return jnp.where(nib >= 8, -value, value)


# ------------------------------------------------------------------ block-scaled codes
# What a site READS each round with `federation.download_dtype` (the encoded update of the
# global state, `outer.Download`): one-byte codes with one float32 absmax scale per block
# of `block` contiguous elements along the LAST axis (the first block starts at index 0,
# the last may be shorter; a scalar is one block). Row-local, so any row-block of an array
# (the coordinator's streaming merge) encodes on its own, and a merge block whose
# last-axis bounds are multiples of `block` holds whole code blocks:
#   value = scale * code,  scale = max|x over the block| / BLOCK_MAX[dtype]  (1 if all 0)
# 4-bit codes (int4, float4_e2m1fn) are stored packed, uint8 (*shape[:-1], ceil(cols / 2))
# (a scalar: one byte, its code in the low nibble); merge blocks of them are cut at even
# last-axis bounds too (`BlockFormat.align`), so each holds whole bytes.

DEFAULT_BLOCK = 128
MAX_BLOCK = 1 << 20
# The largest code magnitude of each block-scaled dtype (the absmax maps to it).
BLOCK_MAX = {DTYPE: float(LEVELS), FP8: FP8_MAX, INT4: 7.0, FP4: 6.0}
BLOCK_DTYPES = tuple(BLOCK_MAX)


def stored_dtype(dtype: str) -> str:
  """The dtype block-scaled `dtype` codes are stored as (uint8 for packed 4-bit ones)."""
  return "uint8" if dtype in NIBBLE_DTYPES else dtype


def codes_shape(shape, dtype: str) -> tuple[int, ...]:
  """The shape of the stored codes of an array of `shape`: the same, or for 4-bit codes
  the last axis packed to ceil(cols / 2) bytes (a scalar stays one byte)."""
  shape = tuple(int(s) for s in shape)
  if dtype not in NIBBLE_DTYPES or not shape:
    return shape
  return shape[:-1] + (packed_cols(shape[-1]),)


@dataclasses.dataclass(frozen=True)
class BlockFormat:
  """A block-scaled code setting, checked when built (ValueError): `dtype` codes with one
  scale per `block` elements. Hashable: jitted code takes it as a static argument."""
  dtype: str
  block: int = DEFAULT_BLOCK

  def __post_init__(self):
    problem = check_block(self.dtype, self.block)
    if problem:
      raise ValueError(problem)
    object.__setattr__(self, "block", int(self.block))

  @property
  def packed(self) -> bool:
    """Whether codes are 4-bit, stored two per byte."""
    return self.dtype in NIBBLE_DTYPES

  @property
  def align(self) -> int:
    """What a merge block's last-axis bounds must be multiples of (or the array's end):
    whole code blocks and, for packed codes, whole bytes."""
    return math.lcm(self.block, 2) if self.packed else self.block

  def codes_shape(self, shape) -> tuple[int, ...]:
    return codes_shape(shape, self.dtype)

  def codes_index(self, index: tuple[slice, ...]) -> tuple[slice, ...]:
    """The stored codes of a block `index` (explicit slices, last-axis bounds multiples
    of `align` or the array's end) of an array."""
    if not self.packed or not index:
      return tuple(index)
    last = index[-1]
    return tuple(index[:-1]) + (slice(last.start // 2, packed_cols(last.stop)),)

  def codes_sharding(self, sharding, ndim: int):
    """Where the codes of an array of rank `ndim` placed on `sharding` go: there too, or
    for packed codes with the last axis whole (ceil(cols / 2) bytes need not split
    evenly over the devices that split the cols)."""
    if not self.packed or not isinstance(sharding, jax.sharding.NamedSharding):
      return sharding
    spec = tuple(sharding.spec)
    if ndim == 0 or len(spec) < ndim or spec[ndim - 1] is None:
      return sharding
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*spec[:ndim - 1], None))

  def encode(self, x) -> "BlockCodes":
    return encode_blocks(x, self.dtype, self.block)

  def decode(self, codes, scales, shape=None):
    """float32 values of `codes` (`shape`: theirs, needed for packed codes of an odd
    last axis)."""
    return decode_blocks(codes, scales, self.block, dtype=self.dtype, shape=shape)


class BlockCodes(NamedTuple):
  """One array as block-scaled codes: `codes` (`codes_shape` of the array's, stored as
  `stored_dtype`) and float32 `scales` (`scales_shape` of the array's shape). A pytree."""
  codes: Any
  scales: Any


def check_block(dtype: str, block: Any) -> str | None:
  """What is wrong with a block-scaled code setting (None if nothing)."""
  if dtype not in BLOCK_MAX:
    return f"block-scaled codes must be one of {', '.join(BLOCK_DTYPES)}; got {dtype!r}"
  if (isinstance(block, bool) or not isinstance(block, (int, np.integer))
      or not 1 <= block <= MAX_BLOCK):
    return f"the code block must be an integer in [1, {MAX_BLOCK}] elements; got {block!r}"
  return None


def scales_shape(shape, block: int) -> tuple[int, ...]:
  """The shape of the scales of an array of `shape`: the last axis in blocks of `block`."""
  shape = tuple(int(s) for s in shape)
  return shape[:-1] + (-(-shape[-1] // int(block)),) if shape else ()


def scales_index(index: tuple[slice, ...], block: int) -> tuple[slice, ...]:
  """The scales of a block `index` (explicit slices) of an array: its last-axis bounds
  must be multiples of `block` or the array's end."""
  if not index:
    return ()
  last = index[-1]
  return tuple(index[:-1]) + (slice(last.start // block, -(-last.stop // block)),)


def _blocked(x, block: int):
  """`x` (rank >= 1) zero-padded to whole blocks, shaped (..., blocks, block)."""
  n = x.shape[-1]
  nb = -(-n // block)
  pad = [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)]
  return jnp.pad(x, pad).reshape(*x.shape[:-1], nb, block)


def encode_blocks(x, dtype: str, block: int) -> BlockCodes:
  """`x` as block-scaled `dtype` codes (jnp; traceable, so it runs inside the merge's
  jit). A block that is all zero gets scale 1; one whose scale would not be a normal
  float32 (values below ~1e-36) is all code 0 with scale 1."""
  x = jnp.asarray(x, jnp.float32)
  flat = x.reshape(1) if x.ndim == 0 else x
  top = np.float32(BLOCK_MAX[dtype])
  xb = _blocked(flat, block)
  raw = jnp.max(jnp.abs(xb), axis=-1) / top
  # (raw < tiny, not raw > 0: a NaN or Inf block keeps a NaN or Inf scale, which decodes
  # to non-finite values that the merge's finiteness check refuses.)
  scales = jnp.where(raw < np.finfo(np.float32).tiny, np.float32(1), raw)
  y = jnp.clip(xb / scales[..., None], -top, top)
  if dtype in NIBBLE_DTYPES:
    y = y.reshape(*flat.shape[:-1], xb.shape[-2] * block)[..., :flat.shape[-1]]
    codes = nibble_codes(y, dtype).reshape(codes_shape(x.shape, dtype))
    return BlockCodes(codes, scales.reshape(scales_shape(x.shape, block)))
  codes = (jnp.round(y).astype(jnp.int8) if dtype == DTYPE else y.astype(jnp.dtype(dtype)))
  codes = codes.reshape(*flat.shape[:-1], xb.shape[-2] * block)[..., :flat.shape[-1]]
  return BlockCodes(codes.reshape(x.shape), scales.reshape(scales_shape(x.shape, block)))


def decode_blocks(codes, scales, block: int, *, dtype: str | None = None, shape=None):
  """float32 values of block-scaled codes (jnp; traceable): code * its block's scale,
  one rounding per element, so any program computes the same bits. Packed 4-bit codes
  need their `dtype`, and `shape` (the values') when the last axis is odd (default: even)."""
  if codes.dtype == jnp.uint8:
    if dtype not in NIBBLE_DTYPES:
      raise ValueError(f"packed uint8 codes need dtype one of {NIBBLE_DTYPES}; got {dtype!r}")
    if shape is None:
      shape = (*codes.shape[:-1], 2 * codes.shape[-1]) if codes.ndim else ()
    shape = tuple(shape)
    if not shape:
      x = nibble_values(codes.reshape(1), dtype, 1).reshape(())
    else:
      x = nibble_values(codes, dtype, shape[-1])
  else:
    x = codes.astype(jnp.float32)
  if x.ndim == 0:
    return x * scales
  s = jnp.repeat(scales, block, axis=-1, total_repeat_length=scales.shape[-1] * block)
  return x * s[..., :x.shape[-1]]


def check_scales(scales: np.ndarray, dtype: str) -> str | None:
  """What is wrong with stored block scales for `dtype` codes (None if nothing): each
  must be finite, > 0 and small enough that every code decodes to a finite float32."""
  s = np.asarray(scales)
  if s.dtype != np.float32:
    return f"scales are {s.dtype}, not float32"
  if s.size == 0:
    return None
  bad = ~(np.isfinite(s) & (s > 0))
  if bad.any():
    return f"{int(bad.sum())} scales are not finite numbers > 0 (e.g. {s[bad].flat[0]!r})"
  limit = np.finfo(np.float32).max / np.float32(BLOCK_MAX[dtype] + 1)
  if float(s.max()) > limit:
    return f"scale {float(s.max())!r} decodes {dtype} codes beyond float32's range"
  return None


@functools.partial(jax.jit, static_argnums=(1, 2))
def _bad_nibbles(codes, dtype: str, cols: int):
  """(int4 codes -8, nonzero padding nibbles) in packed codes of rows of `cols` values."""
  nib = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
  low = jnp.sum(nib[..., :cols] == 8) if dtype == INT4 else jnp.int32(0)
  return low, jnp.sum(nib[..., cols:] != 0)


def check_codes(codes, dtype: str, shape) -> str | None:
  """What is wrong with stored block-scaled `dtype` codes of values of `shape` (None if
  nothing). Packed 4-bit codes must be what an encoder writes: no int4 code -8 (nibble 8:
  the encoders use [-7, 7]) and a zero padding nibble after an odd last axis (every
  float4 nibble is a valid value: 8 is -0). One jitted count over the whole (possibly
  multi-process) array, so every process gets the same answer. One-byte codes are not
  checked here (float8's NaN codes fail the finiteness check where they are applied)."""
  if dtype not in NIBBLE_DTYPES:
    return None
  shape = tuple(int(s) for s in shape)
  if math.prod(shape) == 0:
    return None
  flat = codes.reshape(1) if not shape else codes
  low, pad = (int(np.asarray(v.addressable_data(0)))
              for v in _bad_nibbles(flat, dtype, shape[-1] if shape else 1))
  if low:
    return f"{low} int4 codes are -8, outside the encoders' [-7, 7]"
  if pad:
    return f"{pad} padding nibbles after the odd last axis are not 0"
  return None
