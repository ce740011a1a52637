"""Block-scaled 4-bit codes and top-k: error bounds, what is kept, decoding by rows,
norms, the schema of what a site sends, and the checks of hostile records and blocks."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from experiments.configs import federation as fed_config
from tapestry_jax import exchange as ex
from tapestry_jax import federation
from tapestry_jax import update_codecs as uc
from tapestry_jax.buckets import Bucket
from tapestry_jax.validate import ConfigError


def _heavy(rng, shape):
  """Heavy-tailed values, like a pseudo-gradient."""
  x = rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))
  return x.astype(np.float32)


def _per_element(scales, block, cols):
  return np.repeat(np.asarray(scales, np.float64), block, axis=-1)[..., :cols]


@pytest.mark.parametrize("shape, block", [((9, 37), 8), ((3, 4, 300), 128), ((5,), 2),
                                          ((6, 7), 64)])
def test_int4_codes_are_within_half_a_step_of_their_block_scale(shape, block):
  x = _heavy(np.random.default_rng(0), shape)
  x[0, ...] = 0  # an all-zero row: scale 1, exact
  leaf = uc.LeafCodec(uc.BLOCK, uc.INT4, block=block).encode(x)
  cols = shape[-1]
  assert leaf.codes.dtype == np.uint8 and leaf.codes.shape == (*shape[:-1], -(-cols // 2))
  assert leaf.scales.dtype == np.float32 and leaf.scales.shape == (*shape[:-1],
                                                                   -(-cols // block))
  nb = -(-cols // block)
  padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - cols)])
  peak = np.abs(padded.reshape(*shape[:-1], nb, block)).max(-1)
  want = np.where(peak == 0, np.float32(1), peak / np.float32(7))
  # absmax / 7 per block, in float32 (XLA divides by a constant as a product with its
  # reciprocal: within an ulp).
  np.testing.assert_allclose(leaf.scales, want, rtol=2.4e-7, atol=0)
  got = np.asarray(uc.decode_leaf(leaf), np.float64)
  step = _per_element(leaf.scales, block, cols)
  assert np.all(np.abs(got - x) <= step / 2 * (1 + 1e-6))
  codes = np.rint(got / step)
  assert codes.min() >= -7 and codes.max() <= 7 and np.abs(codes).max() == 7
  assert np.all(got[0] == 0)


def test_float4_codes_are_the_nearest_e2m1_value_of_their_block_scale():
  rng = np.random.default_rng(1)
  x = _heavy(rng, (17, 45))
  x[3, :8] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6], np.float32)  # ties: to even
  leaf = uc.LeafCodec(uc.BLOCK, uc.FP4, block=8).encode(x)
  scale = _per_element(leaf.scales, 8, 45)
  peak = np.abs(np.pad(x, [(0, 0), (0, 3)])).reshape(17, 6, 8).max(-1)
  np.testing.assert_allclose(leaf.scales, peak / np.float32(6), rtol=2.4e-7, atol=0)
  got = np.asarray(uc.decode_leaf(leaf))
  # The same codes as a cast of x / scale to float4_e2m1fn (round to nearest even).
  y = (x / scale.astype(np.float32)).clip(-6, 6)
  want = y.astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * scale.astype(np.float32)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[3, :7], [0, 1, 1, 2, 2, 4, 4])  # scale 6 / 6 = 1 there
  # Half a step of the grid at each magnitude: .25 below 2, .5 below 4, 1 up to 6.
  half = np.where(np.abs(y) < 2, .25, np.where(np.abs(y) < 4, .5, 1.0)) * scale
  assert np.all(np.abs(got - x) <= half * (1 + 1e-6))


@pytest.mark.parametrize("dtype", uc.DTYPES)
def test_topk_keeps_exactly_k_largest_per_row_with_sorted_indices(dtype):
  rng = np.random.default_rng(2)
  x = _heavy(rng, (4, 6, 50))
  codec = uc.UpdateSpec(dtype, density=0.1).leaf_codec(x.shape)
  assert codec == uc.LeafCodec(uc.TOPK, dtype, k=5)
  leaf = codec.encode(x)
  idx = np.asarray(leaf.indices)
  assert idx.dtype == np.uint16 and idx.shape == (4, 6, 5)
  assert np.all(np.diff(idx.astype(int), axis=-1) > 0)
  kept = np.take_along_axis(np.abs(x), idx.astype(int), -1)
  dropped = np.abs(x).copy()
  np.put_along_axis(dropped, idx.astype(int), -1, -1)
  assert np.all(kept.min(-1) > dropped.max(-1))  # the k largest of every row
  got = np.asarray(uc.decode_leaf(leaf))
  values = np.take_along_axis(got, idx.astype(int), -1)
  assert np.count_nonzero(got) == np.count_nonzero(values)  # zeros elsewhere
  truth = np.take_along_axis(x, idx.astype(int), -1)
  if dtype == "float32":
    np.testing.assert_array_equal(values, truth)
  elif leaf.scales is not None:  # per-row scale: max |kept| / the codes' largest value
    np.testing.assert_allclose(leaf.scales[..., 0], np.abs(truth).max(-1) /
                               uc._CODE_MAX[dtype], rtol=1e-6)
    scale = np.asarray(leaf.scales, np.float64)
    y = np.abs(truth) / scale
    half = {"int8": 0.5, "int4": 0.5,  # half a step of the row's scale; floats: of the grid
            "float4_e2m1fn": np.where(y < 2, .25, np.where(y < 4, .5, 1.0)),
            "float8_e4m3fn": np.maximum(y / 16, 2.0 ** -10)}[dtype]
    assert np.all(np.abs(values - truth) <= half * scale * (1 + 1e-5))
  assert uc.sum_squares(uc.to_host(leaf)) == pytest.approx(
      float(np.sum(got.astype(np.float64) ** 2)), rel=1e-12)


def test_which_leaves_are_sparsified_and_the_index_dtype():
  spec = uc.UpdateSpec(uc.INT4, density=0.03, block=64)
  assert uc.topk_k(384, 0.03) == 12 and uc.topk_k(10, 0.05) == 1 and uc.topk_k(5, 0.5) == 2
  assert spec.leaf_codec((128, 384)) == uc.LeafCodec(uc.TOPK, uc.INT4, k=12)
  assert spec.leaf_codec((384,)) == uc.LeafCodec(uc.BLOCK, uc.INT4, block=64)  # 1-D: dense
  assert spec.leaf_codec((4, 1)).kind == uc.BLOCK  # k == cols: dense
  assert spec.leaf_codec(()) == uc.LeafCodec(uc.CAST, "float32")  # no axis for 4-bit codes
  assert spec.leaf_codec((128, 384), moment=True).kind == uc.BLOCK  # moments: dense
  assert uc.UpdateSpec("int8", "bfloat16").leaf_codec((3, 3), moment=True) == uc.LeafCodec(
      uc.CAST, "bfloat16")
  assert uc.index_dtype(1 << 16) == "uint16" and uc.index_dtype((1 << 16) + 1) == "uint32"
  x = np.zeros((2, (1 << 16) + 1), np.float32)
  x[0, -1], x[1, 5] = 3.0, -2.0
  leaf = uc.LeafCodec(uc.TOPK, "float32", k=1).encode(x)
  assert leaf.indices.dtype == np.uint32 and list(np.asarray(leaf.indices)[:, 0]) == [1 << 16, 5]


@pytest.mark.parametrize("codec", [uc.LeafCodec(uc.BLOCK, uc.INT4, block=4),
                                   uc.LeafCodec(uc.BLOCK, uc.FP4, block=3),
                                   uc.LeafCodec(uc.TOPK, uc.FP4, k=3),
                                   uc.LeafCodec(uc.TOPK, "bfloat16", k=2)],
                         ids=["int4", "float4", "topk_float4", "topk_bfloat16"])
def test_any_row_block_decodes_to_the_rows_of_the_whole_leaf_bit_for_bit(codec):
  """What lets the coordinator decode its row-blocks on their own, with the simulation's bits."""
  x = _heavy(np.random.default_rng(3), (11, 3, 9))
  leaf = uc.to_host(codec.encode(x))
  whole = np.asarray(uc.decode_leaf(leaf))
  for rows in (slice(0, 4), slice(4, 5), slice(5, 11)):
    part = codec.leaf({role: a[rows] for role, a in leaf.parts().items()}, x.shape)
    np.testing.assert_array_equal(np.asarray(uc.decode_leaf(part)), whole[rows])
  assert uc.sum_squares(leaf) == pytest.approx(float(np.sum(whole.astype(np.float64) ** 2)),
                                               rel=1e-12)
  assert uc.max_abs(leaf) == float(np.abs(whole).max())


@pytest.mark.parametrize("codec", [uc.LeafCodec(uc.BLOCK, uc.INT4, block=4),
                                   uc.LeafCodec(uc.TOPK, uc.FP4, k=2)], ids=["int4", "topk"])
def test_non_finite_values_cannot_be_coded(codec):
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match="NaN or Inf"):
      codec.encode(np.array([[0.0, 1.0, bad, 2.0]], np.float32))


def test_codes_are_sharded_by_the_rows_of_their_leaf():
  mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jax.device_put(jnp.asarray(_heavy(np.random.default_rng(4), (8, 64))),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y")))
  for codec in (uc.LeafCodec(uc.BLOCK, uc.INT4, block=16), uc.LeafCodec(uc.TOPK, uc.INT4, k=6)):
    leaf = codec.encode(x)
    for a in leaf.parts().values():
      assert a.sharding.spec == jax.sharding.PartitionSpec("x", None)
    np.testing.assert_array_equal(np.asarray(uc.decode_leaf(leaf)),
                                  np.asarray(uc.decode_leaf(codec.encode(np.asarray(x)))))


@pytest.mark.parametrize("role, block, match", [
    (uc.SCALES, [[1.0, np.nan]], "NaN or Inf"),
    (uc.SCALES, [[1.0, np.inf]], "NaN or Inf"),
    (uc.SCALES, [[1.0, -0.5]], "must be > 0"),
    (uc.SCALES, [[0.0, 1.0]], "must be > 0"),
    (uc.SCALES, [[1.0, 1e38]], "beyond float32"),
    (uc.INDICES, [[0, 9]], "out of range for 9 columns"),
    (uc.INDICES, [[3, 3]], "not strictly increasing"),
    (uc.INDICES, [[4, 2]], "not strictly increasing"),
])
def test_bad_scales_and_indices_blocks(role, block, match):
  codec = uc.LeafCodec(uc.TOPK, uc.INT4, k=2)
  dtype = np.float32 if role == uc.SCALES else np.uint16
  assert match in codec.check_part(role, np.array(block, dtype), 9)
  ok = np.array([[1.0, 2.0]], np.float32) if role == uc.SCALES else np.array([[0, 8]], np.uint16)
  assert codec.check_part(role, ok, 9) is None


@pytest.mark.parametrize("quant, dtype, match", [
    ({"codec": "int3", "block": 8}, "uint8", "unknown update codec"),
    ({"codec": "int4", "block": 0}, "uint8", "block 0 is not an integer"),
    ({"codec": "int4", "block": True}, "uint8", "block True"),
    ({"codec": "int4", "block": 8, "x": 1}, "uint8", "are not"),
    ({"codec": "int4", "block": 8}, "int8", "must be stored as uint8"),
    ({"codec": "topk", "values": "float16", "k": 3}, "float16", "values codec"),
    ({"codec": "topk", "values": "int8", "k": -1}, "int8", "k -1"),
    ({"codec": "topk", "values": "int8", "k": 3}, "uint8", "must be stored as int8"),
])
def test_bad_codec_records(quant, dtype, match):
  assert match in uc.check_quant(quant, dtype)


def _config(**fed):
  c = fed_config.get_config("tiny+fedavg/latin,cyrillic")
  for k, v in fed.items():
    node = c.federation
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  return c


@pytest.mark.parametrize("fed, match", [
    ({"topk_density": 1.5}, r"topk_density must be 0 \(off\) or a fraction in \(0, 1\]; got 1.5"),
    ({"topk_density": -0.1}, "topk_density must be 0"),
    ({"topk_density": float("nan")}, "topk_density must be 0"),
    ({"quant_block": 0}, r"quant_block must be an integer in \[1, 1048576\]"),
    ({"update_dtype": "int3"}, "update_dtype must be one of"),
    ({"moment_dtype": "float16", "outer.name": "moments"}, "moment_dtype must be ''"),
    ({"moment_dtype": "int4"}, "moment_dtype='int4' is for the first moments"),
])
def test_config_errors_are_one_clear_line(fed, match):
  c = _config(**fed)
  with pytest.raises(ConfigError, match=match) as e:
    federation.check_federation_config(c)
  assert "\n" not in str(e.value)


def test_error_feedback_is_on_with_topk_and_under_shared_moments():
  assert federation.error_feedback(_config(topk_density=0.1))
  assert not federation.error_feedback(_config(update_dtype="int4"))
  moments = _config(**{"outer.name": "moments", "outer.lr": 1.0, "update_dtype": "int4",
                       "error_feedback": True, "moment_dtype": "int8", "topk_density": 0.05})
  federation.check_federation_config(moments)  # no longer refused under moments
  assert federation.error_feedback(moments)


def test_the_update_schema_names_every_array_and_its_codec():
  c = _config(**{"outer.name": "moments", "outer.lr": 1.0, "update_dtype": uc.FP4,
                 "moment_dtype": "float8_e4m3fn", "topk_density": 0.03, "quant_block": 64})
  schema = ex.update_schema(c)
  params = federation.param_schema(c)
  k = uc.topk_k(384, 0.03)
  assert schema["unembed"] == ((128, -(-k // 2)), "uint8",
                               {"codec": "topk", "values": uc.FP4, "k": k})
  assert schema["codec_indices/unembed"] == ((128, k), "uint16")
  assert schema["codec_scales/unembed"] == ((128, 1), "float32")
  assert schema["final_norm"] == ((64,), "uint8", {"codec": uc.FP4, "block": 64})  # 1-D: dense
  assert schema["codec_scales/final_norm"] == ((2,), "float32")
  assert schema["inner_mu/unembed"] == ((128, 384), "float8_e4m3fn", True)
  assert "codec_indices/inner_mu/unembed" not in schema
  assert {n for n in schema if not n.startswith("codec_")} == {
      *params, *(f"inner_mu/{n}" for n in params)}


def test_the_schema_check_refuses_wrong_companions_and_codecs(tmp_path):
  """Wrong shapes or dtypes of scales or indices, and a record naming another codec than
  the one expected, are refused before anything is allocated, each with its reason."""
  bucket = Bucket(str(tmp_path / "b"))
  spec = uc.UpdateSpec(uc.INT4, density=0.25)
  x = _heavy(np.random.default_rng(5), (6, 8))
  sent = {"w": spec.leaf_codec(x.shape).encode(x)}
  expected = {ex.companion_key(role, "w"): layout
              for role, layout in spec.leaf_codec(x.shape).layout(x.shape).items()}
  arrays = {n: np.asarray(a) for n, a in ex.stored_arrays(sent).items()}
  assert sorted(arrays) == ["codec_indices/w", "codec_scales/w", "w"]

  def manifest(arrays, quant=sent["w"].params()):
    records = ex.write_arrays(bucket, "r", arrays)
    records["w"] = dict(records["w"], quant=quant)
    return {"round": 1, "author": "s", "arrays": records}

  ex.check_schema(manifest(arrays), expected)
  bad = [
      (dict(arrays, **{"codec_scales/w": arrays["codec_scales/w"][:5]}),
       r"'codec_scales/w': shape \(5, 1\) != expected \(6, 1\)"),
      (dict(arrays, **{"codec_scales/w": arrays["codec_scales/w"].astype(np.float16)}),
       "'codec_scales/w': dtype float16 != expected float32"),
      (dict(arrays, **{"codec_indices/w": arrays["codec_indices/w"].astype(np.int32)}),
       "'codec_indices/w': dtype int32 != expected uint16"),
      ({n: a for n, a in arrays.items() if n != "codec_indices/w"},
       r"missing arrays \['codec_indices/w'\]"),
  ]
  for got, match in bad:
    with pytest.raises(ex.ExchangeError, match=match):
      ex.check_schema(manifest(got), expected)
  for quant, match in [({"codec": "topk", "values": uc.FP4, "k": 2}, "declares codec"),
                       ({"codec": "topk", "values": uc.INT4, "k": 3}, "declares codec"),
                       ({"codec": uc.INT4, "block": 128}, "declares codec"),
                       ({"offset": 0.0, "scale": 1.0}, "quantized array has dtype uint8"),
                       (None, "no quantization parameters")]:
    m = manifest(arrays)
    m["arrays"]["w"] = {k: v for k, v in m["arrays"]["w"].items() if k != "quant"}
    if quant is not None:
      m["arrays"]["w"]["quant"] = quant
    with pytest.raises(ex.ExchangeError, match=match):
      ex.check_schema(m, expected)
  # A per-tensor int8 array whose record names a block codec instead of offset and scale.
  i8 = ex.write_arrays(bucket, "i", {"m": np.zeros((6, 8), np.int8)})
  with pytest.raises(ex.ExchangeError, match="uint8, not int8|expected per-tensor"):
    ex.check_schema({"arrays": {"m": dict(i8["m"], quant={"codec": "int4", "block": 8})}},
                    {"m": ((6, 8), "int8", True)})


def test_the_codecs_sweep_applies_to_debref():
  from experiments.sweeps import codecs as codecs_sweep
  from tapestry_jax import sweep
  for run in codecs_sweep.get_sweep():
    c = sweep.apply_overrides(fed_config.get_config("debref"), run)
    spec = federation.update_spec(c)
    assert spec.dtype == run["federation.update_dtype"]
    assert spec.density == run.get("federation.topk_density", 0.0)
