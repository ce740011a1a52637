"""int8 pseudo-gradients: the codes, their error bound, norms, and the record checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapestry_jax import exchange as ex
from tapestry_jax import quantize
from tapestry_jax.buckets import Bucket


def _dequantized(q: quantize.Quantized) -> np.ndarray:
  return (np.float64(q.offset) + np.asarray(q.codes).astype(np.float64) * q.scale)


def test_codes_are_within_half_a_step_inside_six_sigma_and_clipped_outside():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((200, 50)).astype(np.float32) * 0.01 + 0.002
  x[3, 4] = 1.0  # an outlier, far beyond 6 sigma
  q = quantize.quantize(x)
  codes = np.asarray(q.codes)
  assert codes.dtype == np.int8 and codes.min() >= -127 and codes.max() == 127
  mean, std = float(np.mean(x, dtype=np.float64)), float(np.std(x, dtype=np.float64))
  assert q.offset == pytest.approx(mean, rel=1e-5)
  assert q.scale == pytest.approx(6 * std / 127, rel=1e-4)
  err = np.abs(_dequantized(q) - x)
  inside = np.abs(x - q.offset) <= 127 * q.scale
  assert err[inside].max() <= q.scale / 2 * (1 + 1e-5)
  assert _dequantized(q)[3, 4] == pytest.approx(q.offset + 127 * q.scale)  # clipped
  # offset and scale are float32 values, so JSON carries them exactly.
  assert np.float32(q.offset) == q.offset and np.float32(q.scale) == q.scale


def test_float8_codes_keep_relative_precision_across_magnitudes():
  rng = np.random.default_rng(2)
  # Heavy-tailed, like a gradient: most coordinates tiny next to a few large ones.
  x = (rng.standard_normal(20_000) * np.exp(3 * rng.standard_normal(20_000))).astype(np.float32)
  q8, i8 = quantize.quantize(x, quantize.FP8), quantize.quantize(x)
  assert str(np.asarray(q8.codes).dtype) == "float8_e4m3fn" and q8.offset == 0.0
  assert q8.scale == pytest.approx(np.abs(x).max() / 448, rel=1e-6)
  got = _dequantized(q8)
  assert got[np.argmax(np.abs(x))] == pytest.approx(x[np.argmax(np.abs(x))], rel=1e-6)
  big = np.abs(x) > 1e-3 * np.abs(x).max()  # 3 mantissa bits: within 1/16 relative
  assert np.all(np.abs(got - x)[big] <= np.abs(x)[big] / 16 * (1 + 1e-6))
  # int8's even levels round the small coordinates away; float8 keeps far more of them.
  small = np.abs(x) < 1e-2 * np.abs(x).max()
  assert (_dequantized(i8)[small] == i8.offset).mean() > (got[small] == 0).mean() + 0.2


def test_quantize_keeps_the_sharding():
  mesh = jax.make_mesh((len(jax.devices()),), ("x",))
  x = jax.device_put(jnp.arange(8 * 16, dtype=jnp.float32).reshape(8 * 2, 8),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
  q = quantize.quantize(x)
  assert q.codes.sharding.is_equivalent_to(x.sharding, x.ndim)


@pytest.mark.parametrize("x", [np.float32(3.5), np.full((4, 3), -2.25, np.float32),
                               np.zeros((0, 7), np.float32)], ids=["scalar", "constant", "empty"])
def test_degenerate_leaves_are_exact(x):
  q = quantize.quantize(x)
  assert q.scale == 1.0 and np.asarray(q.codes).shape == np.shape(x)
  np.testing.assert_array_equal(_dequantized(q), x)
  # float8: the largest magnitude is 448 codes of max / 448 (a float32 quotient).
  np.testing.assert_allclose(_dequantized(quantize.quantize(x, quantize.FP8)), x, rtol=1e-6)


@pytest.mark.parametrize("dtype", quantize.DTYPES)
def test_non_finite_values_cannot_be_quantized(dtype):
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match="NaN or Inf"):
      quantize.quantize(np.array([0.0, 1.0, bad], np.float32), dtype)


@pytest.mark.parametrize("dtype", quantize.DTYPES)
def test_sum_squares_from_the_histogram_matches_the_dequantized_values(dtype):
  x = np.random.default_rng(1).standard_normal(10_001).astype(np.float32)
  q = quantize.quantize(x, dtype)
  want = float(np.sum(_dequantized(q) ** 2))
  assert quantize.sum_squares(q.codes, q.offset, q.scale) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("quant, match", [
    ({"offset": 0.0}, "are not"),
    ({"offset": 0.0, "scale": 1.0, "x": 1}, "are not"),
    ({"offset": float("nan"), "scale": 1.0}, "offset nan is not a finite"),
    ({"offset": 0.0, "scale": 0.0}, "must be > 0"),
    ({"offset": 0.0, "scale": -1.0}, "must be > 0"),
    ({"offset": 0.0, "scale": "1"}, "not a finite number"),
    ({"offset": 0.0, "scale": True}, "not a finite number"),
    ({"offset": 0.0, "scale": 1e37}, "beyond float32"),
    ({"offset": 0.0, "scale": float(np.finfo(np.float32).max) / 127.5}, "beyond float32"),
    ({"offset": 1e39, "scale": 1.0}, "does not fit float32"),
])
def test_bad_quantization_parameters(quant, match):
  assert match in quantize.check_params(quant)


def test_schema_requires_quantization_parameters_exactly_for_int8_leaves(tmp_path):
  bucket = Bucket(str(tmp_path / "b"))
  q = quantize.quantize(np.linspace(-1, 1, 64, dtype=np.float32))
  rec = ex.write_arrays(bucket, "r", {"w": np.asarray(q.codes)})["w"]
  good = {"round": 1, "author": "s", "arrays": {"w": dict(rec, quant=q.params())}}
  ex.check_schema(good, {"w": ((64,), "int8", True)})
  with pytest.raises(ex.ExchangeError, match="no quantization parameters"):
    ex.check_schema({"arrays": {"w": rec}}, {"w": ((64,), "int8", True)})
  with pytest.raises(ex.ExchangeError, match="not a quantized array"):
    ex.check_schema(good, {"w": ((64,), "int8")})
  bad = {"arrays": {"w": dict(rec, quant={"offset": 0.0, "scale": float("inf")})}}
  with pytest.raises(ex.ExchangeError, match="scale inf is not a finite"):
    ex.check_schema(bad, {"w": ((64,), "int8", True)})
  with pytest.raises(ex.ExchangeError, match="beyond float32"):  # float8 codes reach 448
    ex.check_schema({"arrays": {"w": dict(ex.write_arrays(
        bucket, "q", {"w": np.zeros(64, "float8_e4m3fn")})["w"], quant={
            "offset": 0.0, "scale": 1e36})}}, {"w": ((64,), "float8_e4m3fn", True)})
  f32 = ex.write_arrays(bucket, "f", {"w": np.zeros(64, np.float32)})["w"]
  with pytest.raises(ex.ExchangeError, match="quantized array has dtype float32"):
    ex.check_schema({"arrays": {"w": dict(f32, quant=q.params())}},
                    {"w": ((64,), "int8", True)})
