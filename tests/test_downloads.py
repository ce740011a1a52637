"""Compressed downloads (`federation.download_dtype`): a global round r >= 1 also holds its
encoded update, the round is defined as round r - 1 plus that update decoded, and a site
holding round r - 1 rebuilds round r bit for bit from a few bytes per parameter."""

import functools
import os
import re

import jax
import numpy as np
import pytest

import fed_fakes
from tapestry_jax import audit
from tapestry_jax import exchange as ex
from tapestry_jax import federation
from tapestry_jax import merge
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax import quantize
from tapestry_jax import site as site_lib
from tapestry_jax import trees
from tapestry_jax.buckets import Bucket
from tapestry_jax.outer_config import RoundMergeSpec
from tapestry_jax.validate import ConfigError


# ---------------------------------------------------------------------- the codec


@pytest.mark.parametrize("dtype", quantize.BLOCK_DTYPES)
@pytest.mark.parametrize("shape", [(), (0, 5), (300,), (3, 2, 130), (5, 131)])
def test_block_codes_decode_within_half_a_step_of_their_block_scale(dtype, shape):
  rng = np.random.default_rng(0)
  x = (rng.standard_t(2, shape) * np.exp(rng.uniform(-8, 0, shape))).astype(np.float32)
  if len(shape) == 3:
    x[1, 1, 128:] = 0  # An all-zero block: scale 1, decoded exactly.
  codes, scales = quantize.encode_blocks(x, dtype, 128)
  codes, scales = np.asarray(codes), np.asarray(scales)
  assert codes.shape == quantize.codes_shape(shape, dtype)
  assert codes.dtype == ex.np_dtype(quantize.stored_dtype(dtype))
  assert scales.shape == quantize.scales_shape(shape, 128) and scales.dtype == np.float32
  assert quantize.check_scales(scales, dtype) is None
  assert quantize.check_codes(codes, dtype, shape) is None
  y = np.asarray(quantize.decode_blocks(codes, scales, 128, dtype=dtype, shape=shape))
  assert y.shape == shape and y.dtype == np.float32
  # Each element's own scale; the largest |x| maps to the largest code.
  s = scales if x.ndim == 0 else np.repeat(scales, 128, axis=-1)[..., :x.shape[-1]]
  code_values = (codes.astype(np.float32) if dtype not in quantize.NIBBLE_DTYPES
                 else np.asarray(quantize.nibble_values(codes.reshape(codes.shape or (1,)),
                                                        dtype, shape[-1] if shape else 1)))
  if x.size:
    assert np.max(np.abs(code_values)) == quantize.BLOCK_MAX[dtype]
  if dtype in ("int8", "int4"):  # Evenly spaced levels: half a step of the scale.
    step = s
  elif dtype == "float4_e2m1fn":  # e2m1: 1 mantissa bit, subnormal step 1/2.
    exponent = np.floor(np.log2(np.maximum(np.abs(x / s), 1.0)))
    step = s * 2.0 ** (exponent - 1)
  else:  # float8 e4m3: 3 mantissa bits, subnormal step 2^-9 (in units of the scale).
    exponent = np.floor(np.log2(np.maximum(np.abs(x / s), 2.0 ** -6)))
    step = s * 2.0 ** (exponent - 3)
  assert np.all(np.abs(y - x) <= 0.5 * step + 1e-6 * np.abs(x))
  if len(shape) == 3:
    assert scales[1, 1, 1] == 1 and np.all(y[1, 1, 128:] == 0)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float4_e2m1fn"])
@pytest.mark.parametrize("index", [(slice(2, 5), slice(128, 384)), (slice(0, 6), slice(384, 515))])
def test_block_codes_are_row_local_so_any_merge_block_encodes_on_its_own(dtype, index):
  """Also packed codes: a block with an odd last-axis end packs to the whole array's
  bytes (its padding nibble is the whole array's too)."""
  x = np.random.default_rng(1).standard_normal((6, 515)).astype(np.float32)
  fmt = quantize.BlockFormat(dtype, 128)
  whole = fmt.encode(x)
  part = fmt.encode(x[index])
  np.testing.assert_array_equal(np.asarray(part.codes).view(np.uint8),
                                np.asarray(whole.codes)[fmt.codes_index(index)].view(np.uint8))
  np.testing.assert_array_equal(part.scales,
                                np.asarray(whole.scales)[quantize.scales_index(index, 128)])


@pytest.mark.parametrize("dtype, x, packed, decoded", [
    # Element 2i in the low nibble; int4 two's complement (-7 is nibble 9); an odd last
    # axis ends in a zero padding nibble.
    ("int4", [7, -7, 1], [0x97, 0x01], [7, -7, 1]),
    ("int4", [[7, 0], [-3, -7]], [[0x07], [0x9D]], [[7, 0], [-3, -7]]),
    # float4: sign bit 8 over the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (6 is nibble 7),
    # ties to the even code (2.5 -> 2, 5 -> 4, -0.25 -> +0).
    ("float4_e2m1fn", [6, -6, 0.5], [0xF7, 0x01], [6, -6, 0.5]),
    ("float4_e2m1fn", [-6, 2.5, 5, -0.25, 0], [0x4F, 0x06, 0x00], [-6, 2, 4, 0, 0]),
    ("int4", 7, 0x07, 7),  # A scalar: one byte, its code in the low nibble.
])
def test_4bit_codes_are_packed_two_per_byte_low_nibble_first(dtype, x, packed, decoded):
  x = np.asarray(x, np.float32)
  codes, scales = quantize.encode_blocks(x, dtype, 128)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(packed, np.uint8))
  np.testing.assert_array_equal(scales, np.ones(quantize.scales_shape(x.shape, 128)))
  np.testing.assert_array_equal(quantize.decode_blocks(codes, scales, 128, dtype=dtype,
                                                       shape=x.shape), decoded)


@pytest.mark.parametrize("dtype, codes, shape, match", [
    ("int4", [0x81, 0x01], (3,), "1 int4 codes are -8, outside the encoders' \\[-7, 7\\]"),
    ("int4", [[0x18], [0x88]], (2, 2), "3 int4 codes are -8"),
    ("int4", [0x77, 0x17], (3,), "1 padding nibbles after the odd last axis are not 0"),
    ("float4_e2m1fn", [0x77, 0x87], (3,), "1 padding nibbles"),
    ("int4", 0x10, (), "padding nibbles"),
])
def test_4bit_codes_no_encoder_writes_are_refused(dtype, codes, shape, match):
  codes = np.asarray(codes, np.uint8)
  assert re.search(match, quantize.check_codes(codes, dtype, shape))


def test_every_float4_nibble_is_a_valid_code():
  """Nothing to refuse in float4 codes but the padding: all 16 nibbles are values (8 is
  -0, which no encoder writes but which decodes to 0)."""
  codes = np.arange(256, dtype=np.uint8).reshape(8, 32)
  assert quantize.check_codes(codes, "float4_e2m1fn", (8, 64)) is None
  assert quantize.check_codes(codes, "int4", (8, 64)).startswith("32 int4 codes are -8")


@pytest.mark.parametrize("scales, match", [
    (np.array([1.0, np.nan], np.float32), "not finite numbers > 0"),
    (np.array([0.0, 1.0], np.float32), "not finite numbers > 0"),
    (np.array([-1.0, 1.0], np.float32), "not finite numbers > 0"),
    (np.array([1.0, 1e36], np.float32), "beyond float32's range"),
    (np.array([1.0, 2.0], np.float64), "not float32"),
])
def test_bad_block_scales(scales, match):
  assert match in quantize.check_scales(scales, "float8_e4m3fn")


def test_4bit_block_scales_are_bounded_by_their_largest_code():
  # A hostile int4 code -8 times the scale must stay finite too.
  assert quantize.check_scales(np.array([4e37], np.float32), "int4") is None
  assert "beyond float32's range" in quantize.check_scales(np.array([4.3e37], np.float32), "int4")
  assert quantize.check_scales(np.array([4.8e37], np.float32), "float4_e2m1fn") is None


def test_download_config_errors_are_one_clear_line():
  for fields, match in [({"download_dtype": "float16"}, "federation.download_dtype must be "
                         "one of float32, int8, float8_e4m3fn, int4, float4_e2m1fn; got"),
                        ({"download_dtype": "int8", "download_block": 0},
                         "federation.download_block: the code block must be an integer"),
                        ({"download_dtype": "float8_e4m3fn", "download_block": -3},
                         "federation.download_block: "),
                        ({"download_dtype": "int4", "download_block": 0},
                         "federation.download_block: the code block must be an integer")]:
    c = fed_fakes.config(**fields)
    with pytest.raises(ConfigError, match=match) as e:
      federation.check_federation_config(c)
    assert "\n" not in str(e.value)
  c = fed_fakes.config(download_dtype="int8", download_block=64)
  federation.check_federation_config(c)
  assert federation.merge_spec(c).download == quantize.BlockFormat("int8", 64)
  c = fed_fakes.config(download_dtype="float4_e2m1fn", download_block=33)
  federation.check_federation_config(c)  # Odd blocks too: merge blocks align to lcm(33, 2).
  assert federation.merge_spec(c).download.align == 66
  assert federation.merge_spec(fed_fakes.config()).download is None  # float32: off


# ---------------------------------------------------------------------- the merge

SHAPES = {"a": (), "b": (0, 5), "c": (300,), "d": (6, 512), "e": (37, 300), "f": (4, 131)}


def _write(bucket, prefix, arrays, chunk_bytes):
  """Writes `arrays`; "d" in shard-shaped chunks that cut its last axis (64 wide), as a
  site of several processes writes them."""
  arrays = dict(arrays)
  for key in [k for k in arrays if "d" in k.split("/") and np.ndim(arrays[k]) == 2]:
    mesh = jax.make_mesh((8,), ("x",))
    arrays[key] = jax.device_put(arrays[key], jax.NamedSharding(mesh, jax.P(None, "x")))
  return ex.write_arrays(bucket, prefix, arrays, max_chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("name, fmt", [("moments", quantize.BlockFormat("float8_e4m3fn", 128)),
                                       ("nesterov", quantize.BlockFormat("int8", 128)),
                                       ("moments", quantize.BlockFormat("float4_e2m1fn", 128)),
                                       ("nesterov", quantize.BlockFormat("int4", 128))],
                         ids=lambda v: getattr(v, "dtype", v))
def test_merge_round_with_downloads_is_the_whole_outer_step_bit_for_bit(tmp_path, name, fmt):
  """Small merge blocks (a parameter spans many, cut along the last axis where every
  input's chunks are): the stored params, outer state and encoded download are
  `outer_step`'s; the params are the previous round plus the decoded update."""
  rng = np.random.default_rng(2)
  tx = outer_config.make_outer_optimizer({"name": name, "lr": 1.0, "steps_per_round": 3}
                                         if name == "moments" else {"name": name})
  glob = Bucket(str(tmp_path / "global"))
  params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  arrays = {f"params/{n}": p for n, p in params.items()}
  for n, p in params.items():
    for leaf, v in outer.state_leaves(jax.device_get(tx.init(p))).items():
      arrays[f"outer/{n}/{leaf}"] = np.abs(rng.standard_normal(np.shape(v))).astype(v.dtype)
  attempt = ex.new_attempt()
  records = _write(glob, ex.data_prefix(ex.global_prefix(0), attempt), arrays, 256)
  ex.write_manifest(glob, ex.global_prefix(0), ex.make_manifest(
      federation="t", kind="global", round=0, author="global", attempt=attempt, arrays=records))
  inputs, updates = [], []
  for k, chunk_bytes in enumerate((128, 512, 300)):
    bucket = Bucket(str(tmp_path / f"site{k}"))
    delta = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    mu = ({n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
          if name == "moments" else {})
    attempt = ex.new_attempt()
    records = _write(bucket, ex.data_prefix(ex.update_prefix(1), attempt),
                     {**delta, **{ex.moment_key(n): v for n, v in mu.items()}}, chunk_bytes)
    ex.write_manifest(bucket, ex.update_prefix(1), ex.make_manifest(
        federation="t", kind="update", round=1, author=f"s{k}", attempt=attempt,
        arrays=records, base_round=0, tokens=1))
    inputs.append((bucket, ex.update_prefix(1), ex.read_manifest(bucket, ex.update_prefix(1))))
    updates.append(outer.Update(delta, mu or None))
  state = {n: outer.state_from_leaves(tx, p, {l: arrays[f"outer/{n}/{l}"]
                                              for l in outer.state_leaves(tx.init(p))})
           for n, p in params.items()}
  weights = outer.cap_weights([1, 2, 3], None)
  spec = RoundMergeSpec(tx, download=fmt)
  want_params, want_state, want_down = spec.outer_step(params, state, updates, weights)
  exact, _ = RoundMergeSpec(tx).outer_step(params, state, updates, weights)
  base = ex.read_manifest(glob, ex.global_prefix(0))
  prefix = ex.data_prefix(ex.global_prefix(1), ex.new_attempt())
  records = merge.merge_round(spec, glob, ex.global_prefix(0), base, inputs, weights, glob,
                              prefix, max_block_bytes=64)
  # Cut at the code blocks (packed codes: 64 bytes of 128 codes).
  assert records["down/update/d"]["chunk_shape"][1] == fmt.codes_shape((128,))[0]
  assert records["down/update/f"]["shape"] == list(fmt.codes_shape(SHAPES["f"]))
  assert records["down/update_scale/d"]["chunk_shape"][1] == 1
  read = lambda k: ex.read_block(glob, prefix, k, records[k],  # noqa: E731
                                 tuple(slice(0, s) for s in records[k]["shape"]))
  parts = ex.DOWN_PARTS if name == "moments" else ex.DOWN_PARTS[:1]
  assert sorted(records) == sorted([*base["arrays"], *(
      ex.down_key(part, n, scales) for n in SHAPES for part in parts for scales in (0, 1))])
  for n in SHAPES:
    np.testing.assert_array_equal(read(f"params/{n}"), want_params[n], err_msg=n)
    for leaf, v in outer.state_leaves(want_state[n]).items():
      np.testing.assert_array_equal(read(f"outer/{n}/{leaf}"), v, err_msg=f"{n} {leaf}")
    for part, codes in zip(parts, want_down[n]):
      assert records[ex.down_key(part, n)]["block"] == fmt.block
      np.testing.assert_array_equal(read(ex.down_key(part, n)).view(np.uint8),
                                    np.asarray(codes.codes).view(np.uint8))
      np.testing.assert_array_equal(read(ex.down_key(part, n, scales=True)), codes.scales)
    # Canonical = previous + decoded update (the sites' function); close to the exact
    # step, not equal to it.
    rebuilt, rebuilt_state, finite = outer.download_step(fmt, tx, params[n], want_down[n],
                                                         state[n])
    assert bool(finite)
    np.testing.assert_array_equal(rebuilt, want_params[n])
    if name == "moments":
      for leaf, v in outer.state_leaves(want_state[n]).items():
        np.testing.assert_array_equal(outer.state_leaves(rebuilt_state)[leaf], v)
    step = np.abs(exact[n] - params[n]).max(initial=0)
    # Half the coarsest code step, relative to the block's largest value.
    tol = {"int4": 0.5 / 7, "float4_e2m1fn": 1 / 6}.get(fmt.dtype, 0.07) * 1.01
    assert np.abs(want_params[n] - exact[n]).max(initial=0) <= tol * step
  assert not np.array_equal(want_params["e"], exact["e"])


# ---------------------------------------------------------------------- a site's reads


def _config(name: str, dtype: str = "float8_e4m3fn"):
  c = fed_fakes.config(download_dtype=dtype, download_block=128)
  c.federation.outer.name = name
  if name == "moments":
    c.federation.outer.lr, c.federation.outer.momentum = 1.0, 0.0
  return c


@functools.lru_cache(maxsize=None)
def _federation(name: str, workdir: str, dtype: str = "float8_e4m3fn"):
  """Rounds 1 and 2 of a fake three-site federation with `dtype` downloads on, published
  by the coordinator; and one site's worker."""
  cfg = _config(name, dtype)
  for r in (1, 2):
    for i, site in enumerate(fed_fakes.SITES):
      arrays = fed_fakes.delta(10 * r + i)
      if name == "moments":
        arrays.update({ex.moment_key(n): 10 * v for n, v in fed_fakes.delta(99 + r + i).items()})
      fed_fakes.publish(cfg, workdir, site, r, arrays)
  coord = fed_fakes.coordinator(cfg, workdir)
  coord.run()
  worker = site_lib.SiteWorker(cfg, "latin", os.path.join(workdir, "site"))
  return cfg, coord, worker, workdir


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
  return lambda name, dtype="float8_e4m3fn": _federation(
      name, str(tmp_path_factory.mktemp(name)), dtype)


def _flat(tree):
  return {n: np.asarray(jax.device_get(v)) for n, v in trees.flatten(tree).items()}


def _assert_same_round(got, want, name):
  (params, moments), (want_params, want_moments) = got, want
  for n, v in _flat(want_params).items():
    np.testing.assert_array_equal(_flat(params)[n], v, err_msg=n)
  assert (moments is None) == (name != "moments")
  for n, st in (want_moments or {}).items():
    for leaf in ("count", "mu", "nu"):
      np.testing.assert_array_equal(np.asarray(jax.device_get(moments[n][leaf])),
                                    np.asarray(st[leaf]), err_msg=f"{n} {leaf}")


@pytest.mark.parametrize("name, dtype", [
    ("moments", "float8_e4m3fn"), ("nesterov", "float8_e4m3fn"), ("moments", "float4_e2m1fn"),
    ("nesterov", "int4")])
def test_a_site_rebuilds_the_committed_round_from_the_previous_one_and_its_download(
    federated, name, dtype):
  """Round 1 read whole, round 2 rebuilt from round 1 and round 2's download: exactly
  the float32 round 2 the coordinator committed (params, and the moments the site
  trains on), from a few bytes per parameter (4-bit codes: half a byte, packed); the
  audit recomputes both rounds."""
  cfg, coord, worker, workdir = federated(name, dtype)
  glob = Bucket(coord.glob.url)
  shardings = worker.trainer.param_shardings
  assert not worker.holds(0)
  read0 = glob.bytes_read
  first = site_lib.read_global(worker, glob, 1, root=coord.root, last_round=0)
  full_bytes = glob.bytes_read - read0
  worker.adopt(*first, round_=1)
  assert worker.holds(1)
  read0 = glob.bytes_read
  got = site_lib.read_global(worker, glob, 2, root=coord.root, last_round=1)
  down_bytes = glob.bytes_read - read0
  want = ex.read_global_round(glob, cfg, 2, shardings, root=coord.root)[:2]
  _assert_same_round(got, want, name)
  n_params = sum(np.prod(s) for s, _ in federation.param_schema(cfg).values())
  # float32 params (and both moments) against codes of the update (and gradient): one
  # byte, or half a byte, per parameter, and a float32 scale per 128.
  arrays, codes = (3, 2) if name == "moments" else (1, 1)
  per_param = (0.5 if dtype in quantize.NIBBLE_DTYPES else 1) + 4 / 128
  assert full_bytes > 4 * arrays * n_params
  assert codes * per_param * n_params < down_bytes < 1.1 * codes * per_param * n_params, (
      down_bytes, full_bytes)
  for r in (1, 2):
    report = audit.audit_round(cfg, workdir, r)
    assert report["identical"], report["mismatches"]
  # A restarted site (a fresh worker) holds no round: it reads the whole round.
  again = site_lib.SiteWorker(cfg, "latin", worker.workdir, trainer=worker.trainer)
  assert not again.holds(1)
  read0 = glob.bytes_read
  _assert_same_round(site_lib.read_global(again, glob, 2, root=coord.root), want, name)
  assert glob.bytes_read - read0 > 4 * arrays * n_params
  # The simulation's and the coordinator's round 2 is what the site adopts next.
  worker.adopt(*got, round_=2)
  assert worker.holds(2) and not worker.holds(1)


def _hostile_round(cfg, coord, edit):
  """Commits a global round 3 on round 2, signed by the coordinator, whose download is
  round 2's with `edit` applied to its {name: array}; returns its bucket."""
  glob = coord.glob
  prefix = ex.global_prefix(3)
  for key in glob.list(prefix + "/"):
    glob.delete(key)
  manifest = ex.read_manifest(glob, ex.global_prefix(2))
  arrays = {n: a for n, a in fed_fakes.read_arrays(glob, ex.global_prefix(2), manifest).items()
            if n.startswith(ex.DOWN)}
  edit(arrays)
  attempt = ex.new_attempt()
  records = ex.write_arrays(glob, ex.data_prefix(prefix, attempt), arrays)
  for n, r in records.items():
    r.update({k: v for k, v in manifest["arrays"][n].items() if k == "block"})
  signed = fed_fakes.signer(federation.COORDINATOR).sign(ex.make_manifest(
      federation=cfg.federation.id, kind="global", round=3, author=federation.COORDINATOR,
      attempt=attempt, base_round=2, tokens=1, arrays=records))
  ex.write_manifest(glob, prefix, signed)
  return Bucket(glob.url)


def _set(key, index, value):
  def edit(arrays):
    arrays[key][index] = value
  return edit


def _huge_gradient(arrays):  # Finite codes and scales, but the second moment overflows.
  arrays["down/grad_scale/layers/w_up"][:] = np.finfo(np.float32).max / 449
  arrays["down/grad/layers/w_up"][0, 0, 0] = 448


@pytest.mark.parametrize("edit, match", [
    (_set("down/update_scale/embed", (3, 0), np.nan), "not finite numbers > 0"),
    (_set("down/update_scale/embed", (3, 0), 0.0), "not finite numbers > 0"),
    (_set("down/grad_scale/embed", (0, 0), -1.0), "not finite numbers > 0"),
    (_set("down/update_scale/embed", (0, 0), 3e38), "beyond float32's range"),
    (lambda a: a.__setitem__("down/update_scale/embed", a["down/update_scale/embed"][:-1]),
     "schema mismatch.*update_scale/embed"),
    (_set("down/update/embed", (1, 2), np.nan), "decodes to non-finite values in .*embed"),
    (_huge_gradient, "decodes to non-finite values in .*w_up"),
], ids=["nan_scale", "zero_scale", "negative_scale", "inf_decoding_scale", "scales_shape",
        "nan_code", "overflowing_moment"])
def test_a_hostile_download_is_refused_and_leaves_the_site_as_it_was(federated, edit, match):
  _assert_refused(federated("moments"), edit, match)


def _replace(key, fn):
  def edit(arrays):
    arrays[key] = fn(arrays[key])
  return edit


@pytest.mark.parametrize("edit, match", [
    (_replace("down/update/embed", lambda c: np.zeros((384, 128), np.uint8)),
     "schema mismatch.*update/embed"),  # Unpacked: one code per byte.
    (_replace("down/grad/embed", lambda c: c.view(np.int8)), "schema mismatch.*grad/embed"),
    (_set("down/update_scale/embed", (3, 0), np.nan), "not finite numbers > 0"),
    (_set("down/grad_scale/embed", (2, 0), np.inf), "not finite numbers > 0"),
    (_set("down/grad_scale/embed", (0, 0), -1.0), "not finite numbers > 0"),
    (_set("down/update/embed", (1, 2), 0x78), "update/embed.*1 int4 codes are -8"),
    (_set("down/grad/layers/w_up", (0, 0, 0), 0x88), "grad/layers/w_up.*2 int4 codes are -8"),
], ids=["packed_shape", "packed_dtype", "nan_scale", "inf_scale", "negative_scale",
        "int4_code_-8", "int4_codes_-8_in_grad"])
def test_a_hostile_4bit_download_is_refused_and_leaves_the_site_as_it_was(federated, edit,
                                                                          match):
  """(The model has no odd last axis: a nonzero padding nibble is refused by the same
  `quantize.check_codes`, tested above.)"""
  _assert_refused(federated("moments", "int4"), edit, match)


def test_float4_downloads_have_no_invalid_codes_to_refuse(federated):
  """All 16 float4 nibbles are values (8 is -0, which no encoder writes): a download of
  them is applied, and -0 leaves the params as they were."""
  cfg, coord, worker, _ = federated("nesterov", "float4_e2m1fn")
  glob = Bucket(coord.glob.url)
  worker.adopt(*site_lib.read_global(worker, glob, 2, root=coord.root), round_=2)
  before = _flat(worker.base)
  bad = _hostile_round(cfg, coord, _set("down/update/embed", (0,), 0x88))
  params, _ = site_lib.read_global(worker, bad, 3, root=coord.root, last_round=2)
  np.testing.assert_array_equal(_flat(params)["embed"][0], before["embed"][0])
  assert not np.array_equal(_flat(params)["embed"][1], before["embed"][1])


def _assert_refused(federated_, edit, match):
  cfg, coord, worker, _ = federated_
  glob = Bucket(coord.glob.url)
  if not worker.holds(2):
    worker.adopt(*site_lib.read_global(worker, glob, 2, root=coord.root), round_=2)
  before = _flat(worker.base), {n: _flat(s) for n, s in worker.base_moments.items()}
  bad = _hostile_round(cfg, coord, edit)
  with pytest.raises(ex.ExchangeError, match=match):
    site_lib.read_global(worker, bad, 3, root=coord.root, last_round=2)
  assert worker.holds(2)
  for n, v in before[0].items():
    np.testing.assert_array_equal(_flat(worker.base)[n], v)
  for n, st in before[1].items():
    for leaf, v in st.items():
      np.testing.assert_array_equal(_flat(worker.base_moments[n])[leaf], v)


# ---------------------------------------------------------------------- sim == deploy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two sites (cyrillic's params sharded over 2 x 2 x 2 devices), two rounds of 3 steps,
# shared moments with float8 updates, downloads in int8 (or packed float4) blocks of 64.
DEPLOY = {
    "federation.rounds": 2, "federation.inner_steps": 3, "federation.poll_s": 0.05,
    "federation.compare_alone": False, "federation.eval_every": 1,
    "train.global_batch_size": 8, "train.warmup_steps": 2, "train.eval_batches": 2,
    "data.seq_len": 64, "data.synthetic.num_documents": 200, "mesh.fsdp": -1,
    "federation.update_dtype": "float8_e4m3fn", "federation.outer.name": "moments",
    "federation.outer.lr": 1.0, "federation.download_dtype": "int8",
    "federation.download_block": 64,
    "sites.cyrillic.mesh.data": 2, "sites.cyrillic.mesh.fsdp": 2, "sites.cyrillic.mesh.tensor": 2,
}


# Packed 4-bit codes (float8 downloads deployed: tests/test_overlap.py; int8 downloads merged
# bit for bit: test_merge_round_with_downloads_is_the_whole_outer_step_bit_for_bit).
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float4_e2m1fn"])
def test_simulation_and_deployment_with_downloads_give_the_same_global_model(tmp_path, dtype):
  from experiments.configs import federation as fed_config
  from tapestry_jax import orchestrate
  from tapestry_jax import report
  from tapestry_jax import simulate

  config = fed_config.get_config("tiny+fedavg/latin,cyrillic")
  deploy = dict(DEPLOY, **{"federation.download_dtype": dtype})
  for k, v in deploy.items():
    *path, last = k.split(".")
    functools.reduce(lambda node, p: node[p], path, config)[last] = v
  sim = simulate.simulate(config, str(tmp_path / "sim"))
  workdir = tmp_path / "deploy"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  args = [f"--config={ROOT}/experiments/configs/federation.py:tiny+fedavg/latin,cyrillic",
          *(f"--config.{k}={v}" for k, v in deploy.items())]
  orchestrate.run_processes(config, str(workdir), args, env=env, progress=False,
                            timeout_s=600)
  glob = Bucket("file://" + str(workdir / "buckets" / "global"))
  manifest = ex.read_manifest(glob, ex.global_prefix(2))
  assert manifest["extra"]["merge"]["download"] == {"dtype": dtype, "block": 64}
  for name, want in sim["params"].items():
    got = ex.read_block(glob, ex.data_prefix(ex.global_prefix(2), manifest), f"params/{name}",
                        manifest["arrays"][f"params/{name}"],
                        tuple(slice(0, n) for n in want.shape))
    np.testing.assert_array_equal(got, want, err_msg=name)
  # Every site read round 0 whole and rounds 1 and 2 as their downloads, as simulated:
  # int8 (float4) codes of the update and the gradient instead of float32 params, mu, nu.
  sites, _ = report.deployment_records(str(workdir), ["latin", "cyrillic"])
  for records in (sites, sim["records"]):
    down = {(r["site"], r["global_round"]): r["bytes_down"] for r in records}
    for site in ("latin", "cyrillic"):
      assert down[site, 1] < down[site, 0] / 5 and down[site, 2] < down[site, 0] / 5, down
  deployed = {(r["site"], r["global_round"]): r["eval_loss"] for r in sites}
  simulated = {(r["site"], r["global_round"]): r["eval_loss"] for r in sim["records"]}
  assert deployed == simulated
  reports = audit.audit_federation(config, str(workdir), public_keys_dir=str(workdir / "keys"))
  assert audit.verdict(reports) == "audited 3 rounds: all bit-identical"
