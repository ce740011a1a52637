"""Compressed downloads (`federation.download_dtype`): a global round r >= 1 also holds its
encoded update, the round is defined as round r - 1 plus that update decoded, and a site
holding round r - 1 rebuilds round r bit for bit from a few bytes per parameter."""

import functools
import os

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
@pytest.mark.parametrize("shape", [(), (0, 5), (300,), (3, 2, 130)])
def test_block_codes_decode_within_half_a_step_of_their_block_scale(dtype, shape):
  rng = np.random.default_rng(0)
  x = (rng.standard_t(2, shape) * np.exp(rng.uniform(-8, 0, shape))).astype(np.float32)
  if len(shape) == 3:
    x[1, 1, 128:] = 0  # An all-zero block: scale 1, decoded exactly.
  codes, scales = quantize.encode_blocks(x, dtype, 128)
  codes, scales = np.asarray(codes), np.asarray(scales)
  assert codes.shape == x.shape and codes.dtype == ex.np_dtype(dtype)
  assert scales.shape == quantize.scales_shape(shape, 128) and scales.dtype == np.float32
  assert quantize.check_scales(scales, dtype) is None
  y = np.asarray(quantize.decode_blocks(codes, scales, 128))
  # Each element's own scale; the largest |x| maps to the largest code.
  s = scales if x.ndim == 0 else np.repeat(scales, 128, axis=-1)[..., :x.shape[-1]]
  code_values = codes.astype(np.float32)
  if x.size:
    assert np.max(np.abs(code_values)) == quantize.BLOCK_MAX[dtype]
  if dtype == "int8":  # Evenly spaced levels: half a step of the scale.
    step = s
  else:  # float8 e4m3: 3 mantissa bits, subnormal step 2^-9 (in units of the scale).
    exponent = np.floor(np.log2(np.maximum(np.abs(x / s), 2.0 ** -6)))
    step = s * 2.0 ** (exponent - 3)
  assert np.all(np.abs(y - x) <= 0.5 * step + 1e-6 * np.abs(x))
  if len(shape) == 3:
    assert scales[1, 1, 1] == 1 and np.all(y[1, 1, 128:] == 0)


def test_block_codes_are_row_local_so_any_merge_block_encodes_on_its_own():
  x = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
  whole = quantize.encode_blocks(x, "float8_e4m3fn", 128)
  index = (slice(2, 5), slice(128, 384))
  part = quantize.encode_blocks(x[index], "float8_e4m3fn", 128)
  np.testing.assert_array_equal(np.asarray(part.codes).view(np.uint8),
                                np.asarray(whole.codes)[index].view(np.uint8))
  np.testing.assert_array_equal(part.scales,
                                np.asarray(whole.scales)[quantize.scales_index(index, 128)])


@pytest.mark.parametrize("scales, match", [
    (np.array([1.0, np.nan], np.float32), "not finite numbers > 0"),
    (np.array([0.0, 1.0], np.float32), "not finite numbers > 0"),
    (np.array([-1.0, 1.0], np.float32), "not finite numbers > 0"),
    (np.array([1.0, 1e36], np.float32), "beyond float32's range"),
    (np.array([1.0, 2.0], np.float64), "not float32"),
])
def test_bad_block_scales(scales, match):
  assert match in quantize.check_scales(scales, "float8_e4m3fn")


def test_download_config_errors_are_one_clear_line():
  for fields, match in [({"download_dtype": "float16"}, "federation.download_dtype must be"),
                        ({"download_dtype": "int8", "download_block": 0},
                         "federation.download_block: the code block must be an integer"),
                        ({"download_dtype": "float8_e4m3fn", "download_block": -3},
                         "federation.download_block: ")]:
    c = fed_fakes.config(**fields)
    with pytest.raises(ConfigError, match=match) as e:
      federation.check_federation_config(c)
    assert "\n" not in str(e.value)
  c = fed_fakes.config(download_dtype="int8", download_block=64)
  federation.check_federation_config(c)
  assert federation.merge_spec(c).download == quantize.BlockFormat("int8", 64)
  assert federation.merge_spec(fed_fakes.config()).download is None  # float32: off


# ---------------------------------------------------------------------- the merge

SHAPES = {"a": (), "b": (0, 5), "c": (300,), "d": (6, 512), "e": (37, 300)}


def _write(bucket, prefix, arrays, chunk_bytes):
  """Writes `arrays`; "d" in shard-shaped chunks that cut its last axis (64 wide), as a
  site of several processes writes them."""
  arrays = dict(arrays)
  for key in [k for k in arrays if "d" in k.split("/") and np.ndim(arrays[k]) == 2]:
    mesh = jax.make_mesh((8,), ("x",))
    arrays[key] = jax.device_put(arrays[key], jax.NamedSharding(mesh, jax.P(None, "x")))
  return ex.write_arrays(bucket, prefix, arrays, max_chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("name, fmt", [("moments", quantize.BlockFormat("float8_e4m3fn", 128)),
                                       ("nesterov", quantize.BlockFormat("int8", 128))])
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
  assert records["down/update/d"]["chunk_shape"][1] == 128  # Cut at the code blocks.
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
    assert np.abs(want_params[n] - exact[n]).max(initial=0) <= 0.07 * step
  assert not np.array_equal(want_params["e"], exact["e"])


# ---------------------------------------------------------------------- a site's reads


def _config(name: str, dtype: str = "float8_e4m3fn"):
  c = fed_fakes.config(download_dtype=dtype, download_block=128)
  c.federation.outer.name = name
  if name == "moments":
    c.federation.outer.lr, c.federation.outer.momentum = 1.0, 0.0
  return c


@functools.lru_cache(maxsize=None)
def _federation(name: str, workdir: str):
  """Rounds 1 and 2 of a fake three-site federation with downloads on, published by the
  coordinator; and one site's worker."""
  cfg = _config(name)
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
  return lambda name: _federation(name, str(tmp_path_factory.mktemp(name)))


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


@pytest.mark.parametrize("name", ["moments", "nesterov"])
def test_a_site_rebuilds_the_committed_round_from_the_previous_one_and_its_download(
    federated, name):
  """Round 1 read whole, round 2 rebuilt from round 1 and round 2's download: exactly
  the float32 round 2 the coordinator committed (params, and the moments the site
  trains on), from a few bytes per parameter; the audit recomputes both rounds."""
  cfg, coord, worker, workdir = federated(name)
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
  # float32 params (and both moments) against one-byte codes of the update (and gradient).
  arrays, codes = (3, 2) if name == "moments" else (1, 1)
  assert full_bytes > 4 * arrays * n_params
  assert down_bytes < 1.2 * codes * n_params, (down_bytes, full_bytes)
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
  cfg, coord, worker, _ = federated("moments")
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
# shared moments with float8 updates, downloads in int8 blocks of 64.
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


def test_simulation_and_deployment_with_downloads_give_the_same_global_model(tmp_path):
  from experiments.configs import federation as fed_config
  from tapestry_jax import orchestrate
  from tapestry_jax import report
  from tapestry_jax import simulate

  config = fed_config.get_config("tiny+fedavg/latin,cyrillic")
  for k, v in DEPLOY.items():
    *path, last = k.split(".")
    functools.reduce(lambda node, p: node[p], path, config)[last] = v
  sim = simulate.simulate(config, str(tmp_path / "sim"))
  workdir = tmp_path / "deploy"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  args = [f"--config={ROOT}/experiments/configs/federation.py:tiny+fedavg/latin,cyrillic",
          *(f"--config.{k}={v}" for k, v in DEPLOY.items())]
  orchestrate.run_processes(config, str(workdir), args, env=env, progress=False,
                            timeout_s=600)
  glob = Bucket("file://" + str(workdir / "buckets" / "global"))
  manifest = ex.read_manifest(glob, ex.global_prefix(2))
  assert manifest["extra"]["merge"]["download"] == {"dtype": "int8", "block": 64}
  for name, want in sim["params"].items():
    got = ex.read_block(glob, ex.data_prefix(ex.global_prefix(2), manifest), f"params/{name}",
                        manifest["arrays"][f"params/{name}"],
                        tuple(slice(0, n) for n in want.shape))
    np.testing.assert_array_equal(got, want, err_msg=name)
  # Every site read round 0 whole and rounds 1 and 2 as their downloads, as simulated:
  # int8 codes of the update and the gradient instead of float32 params, mu and nu.
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
