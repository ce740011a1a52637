"""Block-scaled 4-bit codes and top-k sparsification of what sites send, and the choice
of how each leaf is sent (`UpdateSpec.leaf_codec`).

A leaf is viewed as rows x cols along its LAST axis (rows = prod(shape[:-1])):
  int4           per block of `block` contiguous elements of a row, symmetric codes in
                 [-7, 7]: value = scale * code, scale = max|x| / 7 of the block
  float4_e2m1fn  per block, value = scale * code, code in +-{0, .5, 1, 1.5, 2, 3, 4, 6}
                 (nearest, ties to even: a cast to float4_e2m1fn), scale = max|x| / 6
                 (Streaming DiLoCo's 4-bit floats)
  top-k          per row, the k = max(1, round(density * cols)) entries of largest |x|:
                 their column indices (ascending; uint16 when cols <= 65536, else uint32)
                 and their values, float32 / bfloat16 as they are, or int4 / float4 / int8
                 / float8 codes with one scale per row (max|x| / the codes' largest value)
4-bit codes are packed two per byte (element 2i in the low nibble, 2i + 1 in the high
one) into uint8 (*shape[:-1], ceil(cols / 2)); scales are float32 (*shape[:-1], blocks
per row); an all-zero block has scale 1. Blocks never cross rows, so the coordinator's
streaming merge decodes any row-block on its own, inside the jitted merge (`decode`),
with the bits of the simulation's whole-leaf decode. The site computes the codes once
(`LeafCodec.encode`, jitted on its devices, the codes sharded like the leaf's rows);
everyone else only decodes. The per-tensor int8 / float8 codes are `quantize`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tapestry_jax import quantize

INT4 = quantize.INT4
FP4 = quantize.FP4
BLOCK_DTYPES = (INT4, FP4)  # Block-scaled 4-bit update dtypes (`federation.quant_block`).
FLOAT_DTYPES = ("float32", "bfloat16")  # Sent as they are (cast by XLA).
# Every update dtype, and what top-k values may be coded as.
DTYPES = (*FLOAT_DTYPES, *quantize.DTYPES, *BLOCK_DTYPES)
DEFAULT_BLOCK = 128
MAX_BLOCK = 1 << 20
TOPK = "topk"
# Leaf codecs: sent cast (float32 / bfloat16), per-tensor codes (`quantize`), block-scaled
# codes, or top-k.
CAST, AFFINE, BLOCK = "cast", "affine", "block"
# The roles of a coded leaf's arrays: its codes (or values) under the leaf's own name,
# and companions (stored under `exchange.companion_key(role, name)`).
CODES, SCALES, INDICES = "", "scales", "indices"

# The largest code value an encoder uses (scale = max|x| / this), and the largest
# magnitude any stored code decodes to (a hostile int4 nibble 8 is -8; int8 -128).
_CODE_MAX = {INT4: 7.0, FP4: 6.0, quantize.DTYPE: 127.0, quantize.FP8: quantize.FP8_MAX}
_HOSTILE_MAX = {INT4: 8.0, FP4: 6.0, quantize.DTYPE: 128.0, quantize.FP8: quantize.FP8_MAX}
_STORED = {INT4: "uint8", FP4: "uint8", quantize.DTYPE: "int8", quantize.FP8: "float8_e4m3fn",
           "float32": "float32", "bfloat16": "bfloat16"}
_F32_MAX = float(np.finfo(np.float32).max)


def topk_k(cols: int, density: float) -> int:
  """Entries kept per row of `cols` columns: max(1, round(density * cols)) (Python's
  round, half to even), at most cols."""
  return min(int(cols), max(1, round(float(density) * int(cols))))


def index_dtype(cols: int) -> str:
  """The dtype of top-k column indices: uint16 when they fit (cols <= 65536), else uint32."""
  return "uint16" if int(cols) <= 1 << 16 else "uint32"


def _per_row(codec: str, n: int) -> int:
  """Stored codes per row of `n` values."""
  return -(-n // 2) if codec in BLOCK_DTYPES else n


# ---------------------------------------------------------------------- coded leaves


@dataclasses.dataclass(frozen=True)
class BlockCoded:
  """One leaf as block-scaled codes (int4 / float4 packed in uint8; int8 / float8 one
  per byte). Not a pytree, like `quantize.Quantized`: one entry per parameter."""
  codes: Any  # (*lead, codes per row)
  scales: Any  # float32 (*lead, ceil(cols / block))
  codec: str
  block: int
  cols: int

  @property
  def shape(self) -> tuple[int, ...]:
    return (*np.shape(self.codes)[:-1], self.cols)

  def params(self) -> dict:
    """What the codes' record holds (`exchange` record field "quant")."""
    return {"codec": self.codec, "block": self.block}

  def parts(self) -> dict[str, Any]:
    return {CODES: self.codes, SCALES: self.scales}

  def key(self) -> tuple:
    return (BLOCK, self.codec, self.block, self.cols)


@dataclasses.dataclass(frozen=True)
class TopK:
  """One leaf as the k largest-magnitude entries of each row: values (float, or codes
  with one scale per row) and their ascending column indices."""
  values: Any  # (*lead, k) float32 / bfloat16 / int8 / float8, or (*lead, ceil(k/2)) uint8
  indices: Any  # uint16 / uint32 (*lead, k)
  scales: Any  # float32 (*lead, 1) for coded values, else None
  codec: str  # the values' dtype
  k: int
  cols: int

  @property
  def shape(self) -> tuple[int, ...]:
    return (*np.shape(self.indices)[:-1], self.cols)

  def params(self) -> dict:
    return {"codec": TOPK, "values": self.codec, "k": self.k}

  def parts(self) -> dict[str, Any]:
    out = {CODES: self.values, INDICES: self.indices}
    if self.scales is not None:
      out[SCALES] = self.scales
    return out

  def key(self) -> tuple:
    return (TOPK, self.codec, self.k, self.cols)


CODED = (quantize.Quantized, BlockCoded, TopK)  # What an encoded leaf may be, besides an array.


def codec_of(leaf) -> "LeafCodec":
  """The `LeafCodec` that made a coded leaf (CAST for an array)."""
  if isinstance(leaf, BlockCoded):
    return LeafCodec(BLOCK, leaf.codec, block=leaf.block)
  if isinstance(leaf, TopK):
    return LeafCodec(TOPK, leaf.codec, k=leaf.k)
  if isinstance(leaf, quantize.Quantized):
    return LeafCodec(AFFINE, str(leaf.codes.dtype))
  return LeafCodec(CAST, str(leaf.dtype))


def shape_of(leaf) -> tuple[int, ...]:
  """The shape of the values a leaf (array or coded) stands for."""
  if isinstance(leaf, (BlockCoded, TopK)):
    return leaf.shape
  return tuple(np.shape(getattr(leaf, "codes", leaf)))


def stored(leaf) -> dict[str, Any]:
  """{role: array} of what is stored for a leaf (`CODES` is the leaf's own name)."""
  if isinstance(leaf, (BlockCoded, TopK)):
    return leaf.parts()
  return {CODES: getattr(leaf, "codes", leaf)}


def to_host(leaf):
  """A leaf (array or coded) with its arrays fetched to the host (numpy)."""
  if isinstance(leaf, quantize.Quantized):
    return dataclasses.replace(leaf, codes=np.asarray(jax.device_get(leaf.codes)))
  if isinstance(leaf, BlockCoded):
    return dataclasses.replace(leaf, codes=np.asarray(jax.device_get(leaf.codes)),
                               scales=np.asarray(jax.device_get(leaf.scales)))
  if isinstance(leaf, TopK):
    return dataclasses.replace(
        leaf, values=np.asarray(jax.device_get(leaf.values)),
        indices=np.asarray(jax.device_get(leaf.indices)),
        scales=None if leaf.scales is None else np.asarray(jax.device_get(leaf.scales)))
  return np.asarray(jax.device_get(leaf))


# ---------------------------------------------------------------------- encoding


def _codes(y, codec: str):
  """Codes of `y` = x / scale (|y| <= the codec's largest value, up to rounding)."""
  if codec in BLOCK_DTYPES:  # Packed two per byte (`quantize.nibble_codes`).
    return quantize.nibble_codes(y, codec)
  if codec == quantize.DTYPE:
    return jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
  return jnp.clip(y, -quantize.FP8_MAX, quantize.FP8_MAX).astype(jnp.float8_e4m3fn)


def _scaled_codes(x, codec: str, block: int):
  """(codes, float32 scales) of `x` (..., n) in blocks of `block` along the last axis."""
  n = x.shape[-1]
  nb = -(-n // block)
  xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)]).reshape(
      *x.shape[:-1], nb, block)
  peak = jnp.max(jnp.abs(xb), axis=-1)
  # (peak == 0, not peak > 0: a NaN peak gives a NaN scale, which `encode` refuses.)
  scales = jnp.where(peak == 0, jnp.float32(1), peak / jnp.float32(_CODE_MAX[codec]))
  y = (xb / scales[..., None]).reshape(*x.shape[:-1], nb * block)[..., :n]
  return _codes(y, codec), scales


def _block_fn(x, codec, block):
  return _scaled_codes(x.astype(jnp.float32), codec, block)


def _topk_fn(x, codec, k):
  x = x.astype(jnp.float32)
  _, idx = jax.lax.top_k(jnp.abs(x), k)
  idx = jnp.sort(idx, axis=-1)
  values = jnp.take_along_axis(x, idx, axis=-1)
  scales = None
  if codec in FLOAT_DTYPES:
    values = values.astype(jnp.dtype(codec))
  else:
    values, scales = _scaled_codes(values, codec, k)
  return values, idx.astype(jnp.dtype(index_dtype(x.shape[-1]))), scales


@functools.lru_cache(maxsize=None)
def _encoder(kind: str, codec: str, size: int, sharding):
  """The jitted encoder of block (`size` = block) or top-k (`size` = k) codes, its
  outputs placed on `sharding` (the leaf's rows; None: where XLA puts them)."""
  fn = (functools.partial(_block_fn, codec=codec, block=size) if kind == BLOCK
        else functools.partial(_topk_fn, codec=codec, k=size))
  return jax.jit(fn) if sharding is None else jax.jit(fn, out_shardings=sharding)


def _row_sharding(x):
  """The sharding of `x`'s rows (its last axis whole) for its codes, or None."""
  s = getattr(x, "sharding", None)
  if not isinstance(s, jax.sharding.NamedSharding):
    return None
  spec = (*s.spec, *([None] * (np.ndim(x) - len(s.spec))))
  return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec[:-1], None))


# ---------------------------------------------------------------------- decoding


def _code_values(codes, codec: str, n: int):
  """float32 code values (..., n) of stored codes (4-bit: unpacked; no scale)."""
  if codec in BLOCK_DTYPES:
    return quantize.nibble_values(codes, codec, n)
  return codes.astype(jnp.float32)


def decode(key: tuple, parts: dict[str, Any]):
  """float32 values of a coded leaf given as its `key()` and `parts()` (jnp, traceable:
  the merge decodes inside its jit)."""
  kind, codec = key[0], key[1]
  if kind == BLOCK:
    block, cols = key[2], key[3]
    scales = parts[SCALES]
    per = jnp.repeat(scales, block, axis=-1, total_repeat_length=scales.shape[-1] * block)
    return _code_values(parts[CODES], codec, cols) * per[..., :cols]
  k, cols = key[2], key[3]
  if codec in FLOAT_DTYPES:
    values = parts[CODES].astype(jnp.float32)
  else:
    values = _code_values(parts[CODES], codec, k) * parts[SCALES]
  indices = parts[INDICES]
  lead = indices.shape[:-1]
  rows = math.prod(lead)
  dense = jnp.zeros((rows, cols), jnp.float32).at[
      jnp.arange(rows)[:, None], indices.reshape(rows, k).astype(jnp.int32)].set(
          values.reshape(rows, k), mode="drop")
  return dense.reshape(*lead, cols)


_decode_jit = jax.jit(decode, static_argnums=0)


def decode_leaf(leaf):
  """float32 values of any leaf (array, `quantize.Quantized`, `BlockCoded`, `TopK`), on
  its devices."""
  if isinstance(leaf, (BlockCoded, TopK)):
    return _decode_jit(leaf.key(), leaf.parts())
  if isinstance(leaf, quantize.Quantized):
    return quantize.dequantize(leaf.codes, leaf.offset, leaf.scale)
  return leaf.astype(jnp.float32) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf


# ---------------------------------------------------------------------- host side


_ROWS_SLICE = 1 << 20  # Elements per slice of host-side sums (bounds the float64 copy).


def _values_np(codes: np.ndarray, codec: str, n: int, scales: np.ndarray, block: int):
  """The decoded float32 values (rows, n) of host codes (rows, codes per row) with their
  scales (rows, blocks): the same float32 products as `decode`."""
  if codec in BLOCK_DTYPES:
    nib = np.stack([codes & 15, codes >> 4], axis=-1).reshape(
        codes.shape[0], 2 * codes.shape[1])[:, :n]
    v = quantize.NIBBLE_VALUES[codec][nib]
  else:
    v = codes.astype(np.float32)
  per = np.repeat(scales.astype(np.float32), block, axis=-1)[:, :n]
  return v * per


def values(leaf, rows: slice | None = None) -> np.ndarray:
  """The decoded float32 values a host leaf sends, as (rows, n): every value of a
  `BlockCoded` leaf, the kept ones of a `TopK` (the others are zeros); `rows`: a slice
  of the rows x cols view only."""
  n = math.prod(leaf.shape[:-1])
  rows = rows or slice(0, n)
  as2d = lambda a: np.asarray(a).reshape(n, np.shape(a)[-1])[rows]  # noqa: E731
  if isinstance(leaf, BlockCoded):
    return _values_np(as2d(leaf.codes), leaf.codec, leaf.cols, as2d(leaf.scales), leaf.block)
  if leaf.scales is None:
    return as2d(leaf.values).astype(np.float32)
  return _values_np(as2d(leaf.values), leaf.codec, leaf.k, as2d(leaf.scales), leaf.k)


def dense_sum_squares(x) -> float:
  """sum(x ** 2) of one plain array in float64, in slices of `_ROWS_SLICE` elements (so a
  big leaf needs no float64 copy of itself); `outer.sum_squares` is this."""
  flat = np.asarray(x).reshape(-1)
  total = 0.0
  for i in range(0, flat.size, _ROWS_SLICE):
    part = flat[i:i + _ROWS_SLICE].astype(np.float64)
    total += float(np.dot(part, part))
  return total


def sum_squares(leaf) -> float:
  """sum(decoded ** 2) of a host leaf of any kind, in float64 (in row slices)."""
  if isinstance(leaf, quantize.Quantized):
    return quantize.sum_squares(leaf.codes, leaf.offset, leaf.scale)
  if not isinstance(leaf, (BlockCoded, TopK)):
    return dense_sum_squares(leaf)
  rows = math.prod(leaf.shape[:-1])
  step = max(1, _ROWS_SLICE // max(1, leaf.cols))
  total = 0.0
  for r in range(0, rows, step):
    part = values(leaf, slice(r, r + step)).astype(np.float64).reshape(-1)
    total += float(np.dot(part, part))
  return total


def max_abs(leaf) -> float:
  """The largest |decoded value| of a host leaf of any kind (what an overflow blames)."""
  if isinstance(leaf, quantize.Quantized):
    x = np.float64(leaf.offset) + np.float64(leaf.scale) * np.asarray(leaf.codes, np.float64)
  elif isinstance(leaf, (BlockCoded, TopK)):
    x = values(leaf).astype(np.float64)
  else:
    x = np.asarray(leaf, np.float64)
  return float(np.abs(x).max(initial=0.0))


# ---------------------------------------------------------------------- leaf codecs


@dataclasses.dataclass(frozen=True)
class LeafCodec:
  """How one floating leaf is sent: `kind` CAST (as `dtype`), AFFINE (`quantize`'s
  per-tensor codes), BLOCK (block-scaled codes of `block` elements) or TOPK (`k`
  entries per row, values coded as `dtype`)."""
  kind: str
  dtype: str
  block: int = 0
  k: int = 0

  def quant(self) -> dict | bool | None:
    """What the codes' record must say ("quant"): True for per-tensor parameters (any
    finite offset and scale), the exact dict for block and top-k codes, None: nothing."""
    if self.kind == CAST:
      return None
    if self.kind == AFFINE:
      return True
    if self.kind == BLOCK:
      return {"codec": self.dtype, "block": self.block}
    return {"codec": TOPK, "values": self.dtype, "k": self.k}

  def layout(self, shape) -> dict[str, tuple]:
    """{role: (shape, dtype) or (shape, dtype, quant)} of the arrays sent for a leaf of
    `shape`: exactly what the schema check expects."""
    shape = tuple(int(s) for s in shape)
    if self.kind == CAST:
      return {CODES: (shape, self.dtype)}
    if self.kind == AFFINE:
      return {CODES: (shape, self.dtype, True)}
    lead, cols = shape[:-1], shape[-1]
    if self.kind == BLOCK:
      return {CODES: ((*lead, _per_row(self.dtype, cols)), _STORED[self.dtype], self.quant()),
              SCALES: ((*lead, -(-cols // self.block)), "float32")}
    out = {CODES: ((*lead, _per_row(self.dtype, self.k)), _STORED[self.dtype], self.quant()),
           INDICES: ((*lead, self.k), index_dtype(cols))}
    if self.dtype not in FLOAT_DTYPES:
      out[SCALES] = ((*lead, 1), "float32")
    return out

  def encode(self, x):
    """`x` (a floating array, any sharding) as it is sent, on its devices. ValueError
    when scales come out non-finite (a NaN or Inf in `x`: nothing meaningful to send)."""
    if self.kind == CAST:
      return x.astype(jnp.dtype(self.dtype))
    if self.kind == AFFINE:
      return quantize.quantize(x, self.dtype)
    cols = int(np.shape(x)[-1])
    size = self.block if self.kind == BLOCK else self.k
    out = _encoder(self.kind, self.dtype, size, _row_sharding(x))(x)
    leaf = (BlockCoded(*out, self.dtype, self.block, cols) if self.kind == BLOCK
            else TopK(*out, self.dtype, self.k, cols))
    if leaf.scales is not None and not bool(jnp.isfinite(leaf.scales).all()):
      raise ValueError("cannot quantize an array with NaN or Inf values")
    return leaf

  def leaf(self, parts: dict[str, Any], shape, quant: Any = None):
    """The leaf of stored `parts` ({role: array or block}, e.g. rows of each) standing
    for values of `shape`'s last axis; `quant`: the record's (AFFINE's offset/scale)."""
    codes = parts[CODES]
    if self.kind == CAST:
      return codes
    if self.kind == AFFINE:
      return quantize.Quantized(codes, quant["offset"], quant["scale"])
    cols = int(shape[-1])
    if self.kind == BLOCK:
      return BlockCoded(codes, parts[SCALES], self.dtype, self.block, cols)
    return TopK(codes, parts[INDICES], parts.get(SCALES), self.dtype, self.k, cols)

  def check_part(self, role: str, block: np.ndarray, cols: int) -> str | None:
    """What is wrong with a read block of companion `role` (None if nothing): scales
    must be finite, > 0 and small enough that every code decodes within float32;
    indices within [0, cols) and strictly increasing along each row (sorted, no
    duplicates)."""
    if role == SCALES:
      s = np.asarray(block, np.float64)
      if not np.isfinite(s).all():
        return "scales hold NaN or Inf"
      if not (s > 0).all():
        return f"scales must be > 0; found {float(s.min())!r}"
      if s.size and float(s.max()) * _HOSTILE_MAX[self.dtype] > _F32_MAX:
        return f"scale {float(s.max())!r} decodes beyond float32's range"
    elif role == INDICES:
      idx = np.asarray(block)
      if idx.size and int(idx.max()) >= cols:
        return f"column index {int(idx.max())} is out of range for {cols} columns"
      if idx.shape[-1] > 1 and not (np.diff(idx.astype(np.int64), axis=-1) > 0).all():
        return "column indices of a row are not strictly increasing (unsorted or duplicated)"
    return None

  @classmethod
  def from_record(cls, record) -> "LeafCodec":
    """The codec a stored array's record declares (its "quant" and dtype)."""
    quant = record.get("quant")
    if quant is None:
      return cls(CAST, str(record["dtype"]))
    if "codec" not in quant:
      return cls(AFFINE, str(record["dtype"]))
    if quant["codec"] == TOPK:
      return cls(TOPK, quant["values"], k=int(quant["k"]))
    return cls(BLOCK, quant["codec"], block=int(quant["block"]))


def check_quant(quant: Any, dtype: str) -> str | None:
  """What is wrong with a record's "quant" for block or top-k codes stored as `dtype`
  (None if nothing)."""
  def count(key, lo, hi):
    v = quant.get(key)
    ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
    return None if ok else f"quantization {key} {v!r} is not an integer in [{lo}, {hi}]"

  codec = quant.get("codec")
  if codec in BLOCK_DTYPES:
    if set(quant) != {"codec", "block"}:
      return f"quantization parameters {quant!r} are not {{'codec', 'block'}}"
    problem = count("block", 1, MAX_BLOCK)
    want = _STORED[codec]
  elif codec == TOPK:
    if set(quant) != {"codec", "values", "k"}:
      return f"quantization parameters {quant!r} are not {{'codec', 'values', 'k'}}"
    if quant["values"] not in DTYPES:
      return f"top-k values codec {quant['values']!r} is not one of {', '.join(DTYPES)}"
    problem = count("k", 1, 1 << 32)
    want = _STORED[quant["values"]]
  else:
    return f"unknown update codec {codec!r}; known: {', '.join((*BLOCK_DTYPES, TOPK))}"
  if problem:
    return problem
  if str(dtype) != want:
    return f"codes of codec {quant!r} must be stored as {want}, not {dtype}"
  return None


@dataclasses.dataclass(frozen=True)
class UpdateSpec:
  """What a site sends, for every leaf: `dtype` (`federation.update_dtype`) for its
  pseudo-gradient, `moment_dtype` for its first moments (shared moments; "" = dtype),
  `block` elements per 4-bit scale, top-k `density` (0 = off) of the pseudo-gradient.
  Checked when built (ValueError naming the field)."""
  dtype: str = "float32"
  moment_dtype: str = ""
  block: int = DEFAULT_BLOCK
  density: float = 0.0

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"federation.update_dtype must be one of {', '.join(DTYPES)}; "
                       f"got {self.dtype!r}")
    if self.moment_dtype not in ("", *DTYPES):
      raise ValueError(f"federation.moment_dtype must be '' (= update_dtype) or one of "
                       f"{', '.join(DTYPES)}; got {self.moment_dtype!r}")
    b = self.block
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= MAX_BLOCK:
      raise ValueError(f"federation.quant_block must be an integer in [1, {MAX_BLOCK}] "
                       f"(elements per 4-bit scale); got {b!r}")
    d = self.density
    ok = (not isinstance(d, bool) and isinstance(d, (int, float, np.number))
          and math.isfinite(float(d)) and 0 <= float(d) <= 1)
    if not ok:
      raise ValueError(f"federation.topk_density must be 0 (off) or a fraction in (0, 1]; "
                       f"got {d!r}")
    object.__setattr__(self, "block", int(b))
    object.__setattr__(self, "density", float(d))

  @property
  def error_feedback(self) -> bool:
    """Whether top-k needs the sites to carry what it drops (always: density > 0)."""
    return self.density > 0

  def leaf_codec(self, shape, moment: bool = False) -> LeafCodec:
    """How a floating leaf of `shape` is sent (`moment`: a first moment, sent dense in
    `moment_dtype`). Top-k applies to leaves of 2 or more axes whose rows it shortens
    (k < cols); the others are sent dense. 4-bit codes need an axis: a scalar goes as
    float32."""
    shape = tuple(shape)
    dtype = (self.moment_dtype or self.dtype) if moment else self.dtype
    if not moment and self.density and len(shape) >= 2:
      k = topk_k(shape[-1], self.density)
      if k < shape[-1]:
        return LeafCodec(TOPK, dtype, k=k)
    if dtype in BLOCK_DTYPES:
      return LeafCodec(BLOCK, dtype, block=self.block) if shape else LeafCodec(CAST, "float32")
    if dtype in quantize.DTYPES:
      return LeafCodec(AFFINE, dtype)
    return LeafCodec(CAST, dtype)
